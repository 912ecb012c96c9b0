//! The bidirectional copy between a plain socket and an HBONE stream.
//!
//! - End of data propagates as a half-close: TCP FIN → END_STREAM → `shutdown(SHUT_WR)` on the
//!   other side's socket, in both directions, while the other direction keeps flowing.
//! - Failures propagate as aborts: a TCP reset or write error resets the stream with
//!   `CONNECT_ERROR` (RFC 9113 §8.5); a stream reset or connection failure closes the TCP socket
//!   with RST, noticed even while the socket has nothing to send and the other direction waits
//!   on a socket that does not drain.
//! - Back-pressure: data read from the stream is given back to HTTP/2 flow control only after
//!   it was written to the socket, and socket reads wait for HTTP/2 send capacity, so memory
//!   per splice is bounded by the stream window plus the send buffer.
//! - The socket → stream direction reads into one reused buffer and hands h2 frozen slices of
//!   it (no copy); the stream → socket direction writes the `Bytes` h2 decoded.
use std::{
    future::Future,
    io,
    pin::pin,
    sync::atomic::{AtomicU64, Ordering},
    task::Poll,
};

use bytes::{Buf, BufMut, BytesMut};
use h2::Reason;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

use super::{HboneRecvHalf, HboneSendHalf, HboneStream};

/// First read size from the socket; doubles while reads fill it, up to [`MAX_READ`], so idle
/// connections hold little memory and bulk ones make few syscalls.
const FIRST_READ: usize = 16 * 1024;
/// Largest single read from the socket. Buffers stay below glibc's mmap threshold (128 KiB),
/// which measured faster than larger ones (fewer page faults).
const MAX_READ: usize = 64 * 1024;

/// A byte stream that can be spliced to an HBONE stream: split into halves, and aborted.
pub trait SpliceIo: Send + 'static {
    /// The read half.
    type Read: AsyncRead + Unpin + Send;
    /// The write half; `shutdown` must half-close.
    type Write: AsyncWrite + Unpin + Send;
    /// Splits into halves.
    fn into_halves(self) -> (Self::Read, Self::Write);
    /// Closes abortively (for TCP: RST instead of FIN).
    fn abort(read: Self::Read, write: Self::Write);
}

impl SpliceIo for TcpStream {
    type Read = OwnedReadHalf;
    type Write = OwnedWriteHalf;

    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }

    fn abort(read: Self::Read, write: Self::Write) {
        // SO_LINGER 0 makes close() send RST. `forget` keeps the write half from sending a FIN
        // first (which the peer would read as a clean end).
        crate::proxy::socket::reset_on_close(write.as_ref());
        write.forget();
        drop(read);
    }
}

/// Bytes moved so far, readable while the splice runs (for metrics).
#[derive(Debug, Default)]
pub struct SpliceCounters {
    /// Socket → HBONE stream.
    pub tcp_to_hbone: AtomicU64,
    /// HBONE stream → socket.
    pub hbone_to_tcp: AtomicU64,
}

/// How a splice ended.
#[derive(Debug)]
pub enum SpliceEnd {
    /// Both directions ended with FIN / END_STREAM.
    Closed,
    /// The socket failed (reset, write error); the stream was reset with `CONNECT_ERROR`.
    Tcp(io::Error),
    /// The stream was reset by the peer or its connection failed; the socket was reset.
    Hbone(h2::Error),
}

/// What a splice did.
#[derive(Debug)]
pub struct SpliceReport {
    /// Bytes socket → stream.
    pub tcp_to_hbone: u64,
    /// Bytes stream → socket.
    pub hbone_to_tcp: u64,
    /// How it ended.
    pub end: SpliceEnd,
}

enum Failure {
    Tcp(io::Error),
    Hbone(h2::Error),
}

/// Copies both ways between `io` and `hbone` until both directions ended or one failed;
/// `counters` follow the bytes as they go.
pub async fn splice<T: SpliceIo>(
    io: T,
    hbone: HboneStream,
    counters: &SpliceCounters,
) -> SpliceReport {
    let (mut io_read, mut io_write) = io.into_halves();
    let (mut recv, mut send) = hbone.into_split();
    let failure = first_failure(
        tcp_to_hbone(&mut io_read, &mut send, &counters.tcp_to_hbone),
        hbone_to_tcp(&mut recv, &mut io_write, &counters.hbone_to_tcp),
    )
    .await;
    let end = match failure {
        None => SpliceEnd::Closed,
        Some(failure) => {
            send.reset(Reason::CONNECT_ERROR);
            T::abort(io_read, io_write);
            match failure {
                Failure::Tcp(e) => SpliceEnd::Tcp(e),
                Failure::Hbone(e) => SpliceEnd::Hbone(e),
            }
        }
    };
    SpliceReport {
        tcp_to_hbone: counters.tcp_to_hbone.load(Ordering::Relaxed),
        hbone_to_tcp: counters.hbone_to_tcp.load(Ordering::Relaxed),
        end,
    }
}

/// Runs both directions; returns the first failure, or `None` once both ended cleanly.
async fn first_failure(
    a: impl Future<Output = Result<(), Failure>>,
    b: impl Future<Output = Result<(), Failure>>,
) -> Option<Failure> {
    let (mut a, mut b) = (pin!(a), pin!(b));
    let (mut a_done, mut b_done) = (false, false);
    std::future::poll_fn(|cx| {
        if !a_done && let Poll::Ready(r) = a.as_mut().poll(cx) {
            if let Err(f) = r {
                return Poll::Ready(Some(f));
            }
            a_done = true;
        }
        if !b_done && let Poll::Ready(r) = b.as_mut().poll(cx) {
            if let Err(f) = r {
                return Poll::Ready(Some(f));
            }
            b_done = true;
        }
        if a_done && b_done {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    })
    .await
}

async fn tcp_to_hbone<R: AsyncRead + Unpin>(
    read: &mut R,
    send: &mut HboneSendHalf,
    counter: &AtomicU64,
) -> Result<(), Failure> {
    let mut read_size = FIRST_READ;
    let mut buf = BytesMut::with_capacity(read_size);
    loop {
        if buf.capacity() < read_size {
            // Reclaims the buffer when h2 has released every chunk cut from it.
            buf.reserve(read_size);
        }
        // While the socket is quiet, watch the stream too: if the peer resets it or its
        // connection fails, the splice ends now, even when the other direction is stalled
        // writing to an application that does not read.
        let n = {
            let mut room = (&mut buf).limit(read_size);
            let mut reading = pin!(read.read_buf(&mut room));
            std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = reading.as_mut().poll(cx) {
                    return Poll::Ready(r.map_err(Failure::Tcp));
                }
                // A reset with NO_ERROR is a peer that is done sending, not a failure.
                match send.reset_reason(cx) {
                    Some(e) if e.reason() != Some(Reason::NO_ERROR) => {
                        Poll::Ready(Err(Failure::Hbone(e)))
                    }
                    _ => Poll::Pending,
                }
            })
            .await?
        };
        if n == 0 {
            return send.finish().map_err(Failure::Hbone);
        }
        if n == read_size && read_size < MAX_READ {
            read_size *= 2;
        }
        send.send(buf.split().freeze())
            .await
            .map_err(Failure::Hbone)?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn hbone_to_tcp<W: AsyncWrite + Unpin>(
    recv: &mut HboneRecvHalf,
    write: &mut W,
    counter: &AtomicU64,
) -> Result<(), Failure> {
    loop {
        let chunk = std::future::poll_fn(|cx| recv.poll_chunk(cx))
            .await
            .map_err(Failure::Hbone)?;
        let Some(mut chunk) = chunk else {
            return match write.shutdown().await {
                // The peer is already gone; nothing left to half-close.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                r => r.map_err(Failure::Tcp),
            };
        };
        while !chunk.is_empty() {
            let n = write.write(&chunk).await.map_err(Failure::Tcp)?;
            if n == 0 {
                return Err(Failure::Tcp(io::ErrorKind::WriteZero.into()));
            }
            chunk.advance(n);
            recv.release(n);
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

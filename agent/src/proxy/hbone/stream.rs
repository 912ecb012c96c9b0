//! One HBONE tunnel: an HTTP/2 stream after the `200` answer, as a byte stream.
//!
//! Reads hand out the `Bytes` h2 decoded (no copy on the splice path) and give HTTP/2 flow
//! control credit back only once the bytes have left this process (`release`), so a slow
//! reader slows the sender down. Writes wait for send capacity, which bounds what is queued.
use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::StreamSlot;

/// An established HBONE tunnel (either side). Implements `AsyncRead + AsyncWrite`;
/// `shutdown` sends END_STREAM (half-close), dropping it before both directions ended resets
/// the stream (RST_STREAM CANCEL).
pub struct HboneStream {
    send: HboneSendHalf,
    recv: HboneRecvHalf,
}

impl HboneStream {
    pub(crate) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        slot: Option<Arc<StreamSlot>>,
    ) -> Self {
        Self {
            send: HboneSendHalf {
                stream: send,
                finished: false,
                _slot: slot.clone(),
            },
            recv: HboneRecvHalf {
                stream: recv,
                pending: Bytes::new(),
                _slot: slot,
            },
        }
    }

    /// The two directions, usable from separate tasks.
    pub fn into_split(self) -> (HboneRecvHalf, HboneSendHalf) {
        (self.recv, self.send)
    }

    /// Resets the stream with `reason` (RST_STREAM): the peer sees an abort, not an end.
    pub fn reset(&mut self, reason: Reason) {
        self.send.reset(reason);
    }
}

impl std::fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneStream")
            .field("finished", &self.send.finished)
            .finish_non_exhaustive()
    }
}

/// The sending direction of an [`HboneStream`].
pub struct HboneSendHalf {
    stream: SendStream<Bytes>,
    finished: bool,
    _slot: Option<Arc<StreamSlot>>,
}

impl HboneSendHalf {
    /// Waits until up to `want` bytes may be queued; returns how many (at least 1).
    fn poll_capacity(
        &mut self,
        cx: &mut Context<'_>,
        want: usize,
    ) -> Poll<Result<usize, h2::Error>> {
        loop {
            // The reservation is a total, not an increment: asking again for `want` is idempotent.
            self.stream.reserve_capacity(want);
            match ready!(self.stream.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => return Poll::Ready(Ok(n.min(want))),
                Some(Err(e)) => return Poll::Ready(Err(self.reset_reason(cx).unwrap_or(e))),
                None => {
                    let closed = h2::Error::from(Reason::STREAM_CLOSED);
                    return Poll::Ready(Err(self.reset_reason(cx).unwrap_or(closed)));
                }
            }
        }
    }

    /// The reason the peer reset the stream with (or its connection's failure), when it did;
    /// otherwise registers `cx` to be woken when that happens.
    pub(crate) fn reset_reason(&mut self, cx: &mut Context<'_>) -> Option<h2::Error> {
        match self.stream.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => Some(reason.into()),
            Poll::Ready(Err(e)) => Some(e),
            Poll::Pending => None,
        }
    }

    /// Queues `data` without copying, waiting for flow-control capacity as needed.
    pub async fn send(&mut self, mut data: Bytes) -> Result<(), h2::Error> {
        while !data.is_empty() {
            let n = std::future::poll_fn(|cx| self.poll_capacity(cx, data.len())).await?;
            self.stream.send_data(data.split_to(n), false)?;
        }
        Ok(())
    }

    /// Half-closes the stream (END_STREAM). Idempotent.
    pub fn finish(&mut self) -> Result<(), h2::Error> {
        if !self.finished {
            self.stream.reserve_capacity(0);
            self.stream.send_data(Bytes::new(), true)?;
            self.finished = true;
        }
        Ok(())
    }

    /// Resets the stream (RST_STREAM with `reason`).
    pub fn reset(&mut self, reason: Reason) {
        self.stream.send_reset(reason);
        self.finished = true;
    }
}

/// The receiving direction of an [`HboneStream`].
pub struct HboneRecvHalf {
    stream: RecvStream,
    /// Received but not yet handed out through `AsyncRead`.
    pending: Bytes,
    _slot: Option<Arc<StreamSlot>>,
}

impl HboneRecvHalf {
    /// The next chunk of data, `None` at END_STREAM. The caller owes [`Self::release`] for every
    /// byte once it has passed the bytes on; until then they count against the peer's window.
    pub(crate) fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, h2::Error>> {
        loop {
            return Poll::Ready(match ready!(self.stream.poll_data(cx)) {
                None => Ok(None),
                Some(Ok(b)) if b.is_empty() => continue,
                Some(Ok(b)) => Ok(Some(b)),
                // RST_STREAM(NO_ERROR): the peer has said all it will say.
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) && e.is_reset() => Ok(None),
                Some(Err(e)) => Err(e),
            });
        }
    }

    /// Gives `n` bytes of flow-control credit back to the peer.
    pub(crate) fn release(&mut self, n: usize) {
        if n > 0 {
            // Fails only when releasing more than was received, which callers never do.
            let _ = self.stream.flow_control().release_capacity(n);
        }
    }
}

/// An HTTP/2 error as an `io::Error`: transport errors as they were, stream or connection
/// resets as `ConnectionReset`.
pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    if e.is_reset() || e.is_go_away() {
        return io::Error::new(io::ErrorKind::ConnectionReset, e);
    }
    io::Error::other(e)
}

impl AsyncRead for HboneRecvHalf {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pending.is_empty() {
            match ready!(self.poll_chunk(cx)) {
                Ok(Some(chunk)) => self.pending = chunk,
                Ok(None) => return Poll::Ready(Ok(())),
                Err(e) => return Poll::Ready(Err(h2_to_io(e))),
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        self.release(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HboneSendHalf {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.finished {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = ready!(self.poll_capacity(cx, buf.len())).map_err(h2_to_io)?;
        self.stream
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes queued frames out on its own.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.finish().map_err(h2_to_io))
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.send).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_shutdown(cx)
    }
}

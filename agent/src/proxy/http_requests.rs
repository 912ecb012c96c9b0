//! HTTP/1.1 requests on a client's byte stream, one by one (the egress gateway's HTTP modes), so
//! that every request on a keep-alive connection is held to the decision made for the
//! connection, not only the first: each request head is held back until it is complete, its
//! `Host` (and an absolute-form target's authority) is compared with the host the connection was
//! decided by, and only then are its bytes forwarded. Bodies pass as they come
//! (`Content-Length`, or chunked); after a `CONNECT` or an `Upgrade` the stream is no longer
//! HTTP and passes untouched. A request for another host ends the connection: the client opens
//! a new one, which is decided by its own first request.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::state::egress::normalise_host;

/// Longest request head held back.
pub const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 4096;

/// Why a request may not pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("a later request on this connection is for {found:?}, not {expected:?}")]
    OtherHost { expected: String, found: String },
    #[error("a later request on this connection names no host")]
    NoHost,
    #[error("a request head is longer than {MAX_HEAD} bytes")]
    HeadTooLong,
    #[error("malformed HTTP/1.1 framing: {0}")]
    Framing(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between requests, or inside a head (held back).
    Head,
    /// This many body bytes still to pass.
    Body(u64),
    /// A chunk-size line (held until complete).
    ChunkSize,
    /// This many chunk data bytes, then its CRLF.
    ChunkData(u64),
    /// This many bytes of the CRLF after chunk data.
    ChunkEnd(u8),
    /// Trailer lines after the last chunk, until an empty one.
    Trailers,
    /// No longer HTTP: everything passes.
    Opaque,
}

/// Follows request framing and checks each request's host against `host`.
#[derive(Debug)]
pub struct RequestFraming {
    host: String,
    state: State,
    held: Vec<u8>,
}

impl RequestFraming {
    /// Requests must all be for `host` (as in a `Host` header; compared normalised).
    pub fn new(host: &str) -> Self {
        Self {
            host: normalise_host(host).unwrap_or_else(|| host.to_ascii_lowercase()),
            state: State::Head,
            held: Vec::new(),
        }
    }

    /// Takes bytes the client sent; appends to `out` those that may be forwarded now (a head is
    /// held back until complete and checked).
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), RequestError> {
        while !input.is_empty() {
            match self.state {
                State::Opaque => {
                    out.extend_from_slice(input);
                    return Ok(());
                }
                State::Body(n) | State::ChunkData(n) => {
                    let k = input.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                    out.extend_from_slice(&input[..k]);
                    input = &input[k..];
                    let left = n - k as u64;
                    self.state = match (self.state, left) {
                        (State::Body(_), 0) => State::Head,
                        (State::Body(_), l) => State::Body(l),
                        (_, 0) => State::ChunkEnd(2),
                        (_, l) => State::ChunkData(l),
                    };
                }
                State::ChunkEnd(k) => {
                    let take = input.len().min(usize::from(k));
                    if input[..take]
                        .iter()
                        .zip(&b"\r\n"[2 - usize::from(k)..])
                        .any(|(a, b)| a != b)
                    {
                        return Err(RequestError::Framing("chunk data not followed by CRLF"));
                    }
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    self.state = match k - take as u8 {
                        0 => State::ChunkSize,
                        left => State::ChunkEnd(left),
                    };
                }
                State::Head | State::ChunkSize | State::Trailers => {
                    let (limit, end): (usize, &[u8]) = match self.state {
                        State::Head => (MAX_HEAD, b"\r\n\r\n"),
                        _ => (MAX_LINE, b"\r\n"),
                    };
                    let mut done = false;
                    let mut used = 0;
                    for b in input {
                        used += 1;
                        self.held.push(*b);
                        // Empty lines before a request are allowed (RFC 9112 2.2); dropped.
                        if self.state == State::Head && self.held == b"\r\n" {
                            self.held.clear();
                            continue;
                        }
                        if self.held.ends_with(end) {
                            done = true;
                            break;
                        }
                        if self.held.len() > limit {
                            return Err(match self.state {
                                State::Head => RequestError::HeadTooLong,
                                _ => RequestError::Framing("chunk or trailer line too long"),
                            });
                        }
                    }
                    input = &input[used..];
                    if !done {
                        continue;
                    }
                    let held = std::mem::take(&mut self.held);
                    self.state = match self.state {
                        State::Head => self.check(&held)?,
                        State::ChunkSize => match chunk_size(&held)? {
                            0 => State::Trailers,
                            n => State::ChunkData(n),
                        },
                        _ if held == b"\r\n" => State::Head,
                        _ => State::Trailers,
                    };
                    out.extend_from_slice(&held);
                }
            }
        }
        Ok(())
    }

    /// Checks a complete head; returns the state for what follows it.
    fn check(&self, head: &[u8]) -> Result<State, RequestError> {
        let text =
            std::str::from_utf8(head).map_err(|_| RequestError::Framing("head is not UTF-8"))?;
        let mut lines = text.split("\r\n");
        let request_line = lines.next().unwrap_or_default();
        let mut parts = request_line.split(' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(RequestError::Framing("bad request line"));
        };
        if !version.starts_with("HTTP/1.") {
            return Err(RequestError::Framing("not HTTP/1.x"));
        }
        let mut host = None;
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut upgrade = false;
        for line in lines.filter(|l| !l.is_empty()) {
            let Some((name, value)) = line.split_once(':') else {
                return Err(RequestError::Framing("header line without a colon"));
            };
            if name.ends_with(' ') || name.ends_with('\t') {
                return Err(RequestError::Framing("space before a header's colon"));
            }
            let value = value.trim();
            if name.eq_ignore_ascii_case("host") {
                if host.replace(value).is_some() {
                    return Err(RequestError::Framing("more than one Host"));
                }
            } else if name.eq_ignore_ascii_case("content-length") {
                let n = value
                    .parse()
                    .map_err(|_| RequestError::Framing("bad Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(RequestError::Framing("conflicting Content-Length"));
                }
                length = Some(n);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                let last = value.rsplit(',').next().unwrap_or_default().trim();
                if !last.eq_ignore_ascii_case("chunked") {
                    return Err(RequestError::Framing("a request body not chunked last"));
                }
                chunked = true;
            } else if name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if chunked && length.is_some() {
            return Err(RequestError::Framing(
                "both Transfer-Encoding and Content-Length",
            ));
        }
        // An absolute-form target names the host too (and wins over Host, RFC 9112 3.2.2).
        let authority = target
            .split_once("://")
            .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or_default());
        let mut any = false;
        for h in authority.into_iter().chain(host) {
            any = true;
            let found = normalise_host(h).unwrap_or_else(|| h.to_ascii_lowercase());
            if found != self.host {
                return Err(RequestError::OtherHost {
                    expected: self.host.clone(),
                    found,
                });
            }
        }
        if !any {
            return Err(RequestError::NoHost);
        }
        Ok(if method == "CONNECT" || upgrade {
            State::Opaque
        } else if chunked {
            State::ChunkSize
        } else {
            match length {
                Some(0) | None => State::Head,
                Some(n) => State::Body(n),
            }
        })
    }
}

/// The size on a chunk-size line (`HEX[;ext]\r\n`).
fn chunk_size(line: &[u8]) -> Result<u64, RequestError> {
    let text = std::str::from_utf8(line).map_err(|_| RequestError::Framing("bad chunk size"))?;
    let hex = text
        .trim_end_matches("\r\n")
        .split(';')
        .next()
        .unwrap_or_default()
        .trim();
    u64::from_str_radix(hex, 16).map_err(|_| RequestError::Framing("bad chunk size"))
}

/// A client stream whose requests are checked by a [`RequestFraming`] (if any) before they are
/// read through; writes pass straight to the client. A refused request ends the stream with a
/// `PermissionDenied` error carrying the reason.
#[derive(Debug)]
pub struct CheckedRequests<S> {
    inner: S,
    framing: Option<RequestFraming>,
    ready: Vec<u8>,
    pos: usize,
    refused: Option<RequestError>,
}

impl<S> CheckedRequests<S> {
    /// Checks the requests read from `inner` with `framing`; `None` reads straight through.
    pub fn new(inner: S, framing: Option<RequestFraming>) -> Self {
        Self {
            inner,
            framing,
            ready: Vec::new(),
            pos: 0,
            refused: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CheckedRequests<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(framing) = &mut this.framing else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        loop {
            if this.pos < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.pos);
                buf.put_slice(&this.ready[this.pos..this.pos + n]);
                this.pos += n;
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = &this.refused {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    e.to_string(),
                )));
            }
            let mut tmp = [0u8; 16 * 1024];
            let mut read = ReadBuf::new(&mut tmp);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.ready.clear();
            this.pos = 0;
            if let Err(e) = framing.feed(read.filled(), &mut this.ready) {
                this.refused = Some(e);
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CheckedRequests<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(host: &str, chunks: &[&[u8]]) -> (Vec<u8>, Result<(), RequestError>) {
        let mut f = RequestFraming::new(host);
        let mut out = Vec::new();
        for c in chunks {
            if let Err(e) = f.feed(c, &mut out) {
                return (out, Err(e));
            }
        }
        (out, Ok(()))
    }

    #[test]
    fn requests_for_the_same_host_pass_whole_however_split() {
        let stream = b"GET /a HTTP/1.1\r\nHost: web.example\r\n\r\nPOST /b HTTP/1.1\r\nHost: WEB.example:80\r\nContent-Length: 5\r\n\r\nhelloPUT /c HTTP/1.1\r\nhost: web.example\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n0\r\nT: 1\r\n\r\nGET /d HTTP/1.1\r\nHost: web.example\r\n\r\n";
        for split in [1, 2, 3, 7, 64, stream.len()] {
            let chunks: Vec<&[u8]> = stream.chunks(split).collect();
            let (out, r) = run("web.example", &chunks);
            assert_eq!(r, Ok(()), "split {split}");
            assert_eq!(out, stream.to_vec(), "split {split}");
        }
    }

    #[test]
    fn a_later_request_for_another_host_is_held_back_and_refused() {
        let first = b"GET / HTTP/1.1\r\nHost: web.example\r\n\r\n".as_slice();
        let second = b"GET /admin HTTP/1.1\r\nHost: evil.example\r\n\r\n".as_slice();
        let (out, r) = run("web.example", &[first, second]);
        assert_eq!(out, first.to_vec(), "nothing of the second request passed");
        assert!(matches!(r, Err(RequestError::OtherHost { found, .. }) if found == "evil.example"));
        // A body that looks like a request is a body; the request after it is checked.
        let body = b"POST / HTTP/1.1\r\nHost: web.example\r\nContent-Length: 38\r\n\r\nGET / HTTP/1.1\r\nHost: evil.example\r\n\r\n";
        assert_eq!(run("web.example", &[body]).1, Ok(()));
        // Absolute-form targets name the host too.
        let absolute = b"GET http://evil.example/ HTTP/1.1\r\nHost: web.example\r\n\r\n";
        assert!(matches!(
            run("web.example", &[absolute]).1,
            Err(RequestError::OtherHost { .. })
        ));
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for bad in [
            b"GET / HTTP/1.1\r\nHost: web.example\r\nHost: evil.example\r\n\r\n".as_slice(),
            b"POST / HTTP/1.1\r\nHost: web.example\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: web.example\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost : web.example\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
        ] {
            assert!(run("web.example", &[bad]).1.is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let long = vec![b'a'; MAX_HEAD + 10];
        assert_eq!(
            run("web.example", &[&long]).1,
            Err(RequestError::HeadTooLong)
        );
    }

    #[test]
    fn after_an_upgrade_the_stream_passes_untouched() {
        let s = b"GET /ws HTTP/1.1\r\nHost: web.example\r\nUpgrade: websocket\r\n\r\n\x81\x05hello GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(run("web.example", &[s]), (s.to_vec(), Ok(())));
    }
}

//! Learning a connection's host name from the client's first bytes without consuming them:
//! the HTTP/1 `Host` header, or the SNI of a TLS ClientHello.
//!
//! [`classify`] is pure: it looks at the bytes seen so far and says what they are, or that it
//! needs more. [`peek_host`] peeks a socket (`MSG_PEEK`, so the bytes stay for whoever reads the
//! connection next) until `classify` decides, the byte bound is reached or the time bound passes.
use std::{io, time::Duration};

use tokio::{io::AsyncReadExt, net::TcpStream, time::Instant};

pub use crate::config::{DEFAULT_PEEK_BYTES, DEFAULT_PEEK_TIMEOUT};

/// What the first bytes of a connection are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sniffed {
    /// An HTTP/1 request naming this `Host` (as sent, port included if any).
    Http(String),
    /// An HTTP/1 request without a `Host` header.
    HttpNoHost,
    /// A TLS ClientHello with this SNI.
    Tls(String),
    /// A TLS ClientHello without SNI.
    TlsNoSni,
    /// Something else (or a protocol where the server speaks first and the client said nothing).
    Other,
}

impl Sniffed {
    /// The host hint for the egress decision, if any.
    pub fn hint(&self) -> Option<crate::state::egress::HostHint<'_>> {
        use crate::state::egress::HostHint;
        match self {
            Self::Http(h) => Some(HostHint::Http(h)),
            Self::Tls(h) => Some(HostHint::Tls(h)),
            _ => None,
        }
    }
}

/// The verdict on a prefix of the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Classified {
    Done(Sniffed),
    /// Could still become HTTP or TLS with more bytes.
    NeedMore,
}

const HTTP_METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// Classifies the first bytes of a client's stream.
pub fn classify(buf: &[u8]) -> Classified {
    if buf.is_empty() {
        return Classified::NeedMore;
    }
    if buf[0] == 0x16 {
        return classify_tls(buf);
    }
    let could_be_method = HTTP_METHODS.iter().any(|m| {
        let n = m.len().min(buf.len());
        m[..n] == buf[..n]
    });
    if !could_be_method {
        return Classified::Done(Sniffed::Other);
    }
    if !HTTP_METHODS.iter().any(|m| buf.starts_with(m)) {
        return Classified::NeedMore;
    }
    classify_http(buf)
}

fn classify_http(buf: &[u8]) -> Classified {
    // Headers end at the first empty line; until then a Host line may still come.
    let end = find(buf, b"\r\n\r\n");
    let head = &buf[..end.unwrap_or(buf.len())];
    let mut lines: Vec<&[u8]> = head.split(|b| *b == b'\n').collect();
    if end.is_none() {
        lines.pop(); // cut short by the end of the buffer: may be incomplete
    }
    for line in lines.into_iter().skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = line.split_at(colon);
        if name.eq_ignore_ascii_case(b"host") {
            let value = String::from_utf8_lossy(&value[1..]).trim().to_owned();
            return Classified::Done(if value.is_empty() {
                Sniffed::HttpNoHost
            } else {
                Sniffed::Http(value)
            });
        }
    }
    match end {
        Some(_) => Classified::Done(Sniffed::HttpNoHost),
        None => Classified::NeedMore,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A cursor over a byte slice that fails (with `None`) instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
}

fn classify_tls(buf: &[u8]) -> Classified {
    // Record header: type 22 (handshake), version 3.x, length.
    if buf.get(1).is_some_and(|major| *major != 3) {
        return Classified::Done(Sniffed::Other);
    }
    if buf.len() < 5 {
        return Classified::NeedMore;
    }
    let record_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    let Some(record) = buf.get(5..5 + record_len) else {
        return Classified::NeedMore;
    };
    let mut r = Reader { buf: record };
    let parsed = (|| {
        if r.u8()? != 1 {
            return Some(Sniffed::Other); // not a ClientHello
        }
        let hello_len = r.u24()?;
        let mut h = Reader {
            buf: r.take(hello_len.min(r.buf.len()))?,
        };
        h.take(2 + 32)?; // client_version, random
        let sid = h.u8()?;
        h.take(sid)?;
        let suites = h.u16()?;
        h.take(suites)?;
        let comp = h.u8()?;
        h.take(comp)?;
        if h.buf.is_empty() {
            return Some(Sniffed::TlsNoSni);
        }
        let ext_len = h.u16()?;
        let mut e = Reader {
            buf: h.take(ext_len)?,
        };
        while !e.buf.is_empty() {
            let ty = e.u16()?;
            let len = e.u16()?;
            let body = e.take(len)?;
            if ty != 0 {
                continue;
            }
            let mut s = Reader { buf: body };
            let list_len = s.u16()?;
            let mut list = Reader {
                buf: s.take(list_len)?,
            };
            while !list.buf.is_empty() {
                let kind = list.u8()?;
                let n = list.u16()?;
                let name = list.take(n)?;
                if kind == 0 {
                    // A host name is never empty (RFC 6066 `HostName<1..2^16-1>`), as an empty
                    // `Host` is no host.
                    return Some(match std::str::from_utf8(name) {
                        Ok(name) if !name.is_empty() => Sniffed::Tls(name.to_owned()),
                        _ => Sniffed::TlsNoSni,
                    });
                }
            }
        }
        Some(Sniffed::TlsNoSni)
    })();
    // A ClientHello spread over several records is not followed; what we have is malformed.
    Classified::Done(parsed.unwrap_or(Sniffed::Other))
}

/// Why peeking did not reach a verdict.
#[derive(Debug, thiserror::Error)]
pub enum PeekError {
    #[error("the client closed before sending enough to classify")]
    Closed,
    #[error("reading the client's first bytes: {0}")]
    Io(#[from] io::Error),
}

/// Peeks `stream` until its first bytes classify, at most `max` bytes and `timeout`; what could
/// still have become HTTP or TLS when a bound is hit counts as [`Sniffed::Other`]. The bytes
/// stay in the socket.
pub async fn peek_host(
    stream: &TcpStream,
    max: usize,
    timeout: Duration,
) -> Result<Sniffed, PeekError> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; max.max(1)];
    let mut seen = 0;
    let mut backoff = Duration::from_millis(1);
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => return Ok(Sniffed::Other),
        };
        if n == 0 {
            return Err(PeekError::Closed);
        }
        if let Classified::Done(s) = classify(&buf[..n]) {
            return Ok(s);
        }
        if n >= buf.len() || Instant::now() >= deadline {
            return Ok(Sniffed::Other);
        }
        // The socket stays readable with the same bytes: wait a little for more.
        if n > seen {
            seen = n;
            backoff = Duration::from_millis(1);
        } else {
            backoff = (backoff * 2).min(Duration::from_millis(20));
        }
        tokio::time::sleep_until((Instant::now() + backoff).min(deadline)).await;
    }
}

/// Reads (consuming) from `io` until its first bytes classify or a bound is hit; returns the
/// verdict and every byte read, which the caller must send on first.
pub async fn read_host<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
    timeout: Duration,
) -> Result<(Sniffed, Vec<u8>), PeekError> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = vec![0u8; 4096];
    loop {
        let want = chunk.len().min(max.saturating_sub(buf.len()));
        if want == 0 {
            return Ok((Sniffed::Other, buf));
        }
        let n = match tokio::time::timeout_at(deadline, io.read(&mut chunk[..want])).await {
            Ok(r) => r?,
            Err(_) => return Ok((Sniffed::Other, buf)),
        };
        if n == 0 {
            return if buf.is_empty() {
                Err(PeekError::Closed)
            } else {
                Ok((Sniffed::Other, buf))
            };
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Classified::Done(s) = classify(&buf) {
            return Ok((s, buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::{io::AsyncWriteExt, net::TcpListener};

    use super::*;

    /// The ClientHello rustls really sends for `server_name`.
    fn client_hello(server_name: &str) -> Vec<u8> {
        let mut roots = rustls::RootCertStore::empty();
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).expect("cert");
        roots.add(ca.cert.der().clone()).expect("root");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(server_name.to_owned()).expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("hello");
        out
    }

    #[test]
    fn sni_is_read_from_a_real_client_hello() {
        let hello = client_hello("api.example.com");
        assert_eq!(
            classify(&hello),
            Classified::Done(Sniffed::Tls("api.example.com".into()))
        );
        // Every strict prefix needs more.
        for cut in [1, 4, 5, 40, hello.len() - 1] {
            assert_eq!(
                classify(&hello[..cut]),
                Classified::NeedMore,
                "cut at {cut}"
            );
        }
        // An IP address is never sent as SNI.
        let by_ip = client_hello("192.0.2.7");
        assert_eq!(classify(&by_ip), Classified::Done(Sniffed::TlsNoSni));
    }

    #[test]
    fn http_host_is_read_when_its_line_is_complete() {
        let req =
            b"GET /x HTTP/1.1\r\nUser-Agent: t\r\nHOST: Web.Example:8080\r\nAccept: */*\r\n\r\n";
        assert_eq!(
            classify(req),
            Classified::Done(Sniffed::Http("Web.Example:8080".into()))
        );
        assert_eq!(classify(b"GE"), Classified::NeedMore);
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: we"),
            Classified::NeedMore
        );
        assert_eq!(
            classify(b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\n"),
            Classified::Done(Sniffed::HttpNoHost)
        );
        assert_eq!(classify(b"SSH-2.0-x\r\n"), Classified::Done(Sniffed::Other));
        assert_eq!(classify(b"\x16\x01"), Classified::Done(Sniffed::Other));
    }

    #[test]
    fn truncated_or_lying_client_hellos_do_not_panic() {
        let hello = client_hello("a.example");
        // Corrupt every byte in turn, and lengths especially: never a panic, always a verdict.
        for i in 5..hello.len().min(200) {
            let mut bad = hello.clone();
            bad[i] = 0xff;
            let _ = classify(&bad);
        }
    }

    /// A minimal ClientHello whose server_name extension lists `names` (name type 0).
    fn hello_naming(names: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for name in names {
            list.push(0); // host_name
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut ext = (list.len() as u16).to_be_bytes().to_vec();
        ext.extend_from_slice(&list);
        let mut exts = vec![0, 0]; // server_name
        exts.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        exts.extend_from_slice(&ext);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut record = vec![0x16, 3, 1];
        record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        record.extend_from_slice(&hs);
        record
    }

    /// Found by the `peek` fuzz target: a ClientHello whose server_name is empty (RFC 6066
    /// allows none: `HostName<1..2^16-1>`) gave the egress decision an empty SNI as a host.
    #[test]
    fn an_empty_sni_is_no_sni() {
        assert_eq!(
            classify(&hello_naming(&[b"web.example"])),
            Classified::Done(Sniffed::Tls("web.example".into()))
        );
        assert_eq!(
            classify(&hello_naming(&[b""])),
            Classified::Done(Sniffed::TlsNoSni)
        );
    }

    #[tokio::test]
    async fn peeking_waits_for_split_writes_and_consumes_nothing() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            c.write_all(b"GET / HTTP/1.1\r\nHo").await.expect("write");
            tokio::time::sleep(Duration::from_millis(60)).await;
            c.write_all(b"st: late.example\r\n\r\n")
                .await
                .expect("write");
            c
        });
        let (server, _) = listener.accept().await.expect("accept");
        let got = peek_host(&server, DEFAULT_PEEK_BYTES, Duration::from_secs(5))
            .await
            .expect("peek");
        assert_eq!(got, Sniffed::Http("late.example".into()));
        let mut all = vec![0u8; 64];
        let mut server = server;
        let n = server.read(&mut all).await.expect("read");
        assert!(all[..n].starts_with(b"GET / HTTP/1.1\r\nHost: late.example"));
        drop(client.await);
    }

    #[tokio::test]
    async fn a_silent_client_times_out_as_other() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let start = std::time::Instant::now();
        let got = peek_host(&server, 64, Duration::from_millis(150))
            .await
            .expect("peek");
        assert_eq!(got, Sniffed::Other);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(140) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn read_host_returns_the_bytes_it_consumed() {
        let hello = client_hello("x.example");
        let (mut a, mut b) = tokio::io::duplex(64);
        let sent = hello.clone();
        let w = tokio::spawn(async move {
            for chunk in sent.chunks(7) {
                a.write_all(chunk).await.expect("write");
            }
            a
        });
        let (s, bytes) = read_host(&mut b, 16384, Duration::from_secs(5))
            .await
            .expect("read");
        assert_eq!(s, Sniffed::Tls("x.example".into()));
        assert_eq!(bytes, hello);
        drop(w.await);
    }
}

//! Client side of one HBONE connection: TLS + HTTP/2 handshake, and opening `CONNECT` streams.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::{
    Reason, RecvStream, SendStream,
    client::{Connection, SendRequest},
};
use http::{Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{ALPN_H2, headers::RequestBuildError};
use crate::config::H2Limits;

/// Why a connection to a peer's HBONE port could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The TCP connection to the peer's HBONE port failed.
    #[error("TCP connect to {dst}: {source}")]
    Tcp {
        dst: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (includes certificate verification).
    #[error("TLS handshake with {dst}: {source}")]
    Tls {
        dst: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The peer negotiated an ALPN protocol other than `h2`.
    #[error("{dst} negotiated ALPN {alpn:?} instead of h2")]
    Alpn { dst: SocketAddr, alpn: String },
    /// The HTTP/2 connection preface failed.
    #[error("HTTP/2 handshake with {dst}: {source}")]
    Handshake {
        dst: SocketAddr,
        #[source]
        source: h2::Error,
    },
    /// TCP connect + TLS + HTTP/2 preface took longer than the pool's connect timeout.
    #[error("connecting to {dst} timed out after {after:?}")]
    Timeout { dst: SocketAddr, after: Duration },
}

/// Why [`HbonePool::connect`](super::HbonePool::connect) gave no stream.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No connection to the peer could be set up. Shared by the callers that waited for the
    /// same attempt.
    #[error(transparent)]
    Dial(Arc<DialError>),
    /// The `CONNECT` stream failed before an answer arrived.
    #[error("CONNECT {authority} via {dst}: {source}")]
    Stream {
        dst: SocketAddr,
        authority: SocketAddr,
        #[source]
        source: h2::Error,
    },
    /// The peer answered the `CONNECT` with a status other than 200.
    #[error("CONNECT {authority} via {dst} answered {status}")]
    Status {
        dst: SocketAddr,
        authority: SocketAddr,
        status: StatusCode,
    },
    /// The request could not be built from the given metadata.
    #[error(transparent)]
    Request(#[from] RequestBuildError),
}

impl ConnectError {
    /// The HTTP status of a refused `CONNECT`, if that is what happened.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ConnectError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// TCP is connected; runs TLS (no SNI: the server name is the peer IP) and checks ALPN `h2`.
pub(crate) async fn tls_handshake(
    tcp: TcpStream,
    dst: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>, DialError> {
    let name = ServerName::IpAddress(dst.ip().into());
    let stream = TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|source| DialError::Tls { dst, source })?;
    match stream.get_ref().1.alpn_protocol() {
        Some(ALPN_H2) => Ok(stream),
        other => Err(DialError::Alpn {
            dst,
            alpn: String::from_utf8_lossy(other.unwrap_or_default()).into_owned(),
        }),
    }
}

/// The client end of an HTTP/2 connection.
pub(crate) type ClientConnection = Connection<TlsStream<TcpStream>, Bytes>;

/// Sends the HTTP/2 preface and settings.
pub(crate) async fn h2_handshake(
    io: TlsStream<TcpStream>,
    dst: SocketAddr,
    cfg: &H2Limits,
    max_streams: u32,
) -> Result<(SendRequest<Bytes>, ClientConnection), DialError> {
    h2::client::Builder::new()
        .initial_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.effective_connection_window())
        .max_frame_size(cfg.max_frame_size)
        .initial_max_send_streams(max_streams as usize)
        .max_header_list_size(cfg.max_header_list_size)
        .max_send_buffer_size(cfg.max_send_buffer)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|source| DialError::Handshake { dst, source })
}

/// Most bytes of a client's first flight sent with the `CONNECT` (see [`open_stream`]).
pub const EARLY_DATA_MAX: usize = 16 * 1024;

/// Why a `CONNECT` stream did not open.
pub(crate) enum OpenError {
    /// The connection was closing or refused the stream before processing it; another
    /// connection may succeed.
    Retryable(h2::Error),
    /// The stream failed.
    Failed(h2::Error),
    /// The peer answered with this status.
    Status(StatusCode),
}

/// Sends `req` on the connection, then `early` (the client's first bytes, possibly none) as
/// DATA without waiting, and waits for the answer.
///
/// Sending the first bytes with the `CONNECT` saves a round trip between the nodes for
/// protocols where the client speaks first: the peer holds them in the stream's receive
/// window and hands them to the application only once it has accepted the stream, so a
/// refused stream never delivers them. They are at most [`EARLY_DATA_MAX`] bytes, well
/// inside the initial stream window.
pub(crate) async fn open_stream(
    sender: SendRequest<Bytes>,
    req: Request<()>,
    early: &Bytes,
) -> Result<(SendStream<Bytes>, RecvStream), OpenError> {
    let not_processed = |e: h2::Error| {
        if e.reason() == Some(Reason::REFUSED_STREAM) || e.is_go_away() {
            OpenError::Retryable(e)
        } else {
            OpenError::Failed(e)
        }
    };
    let mut sender = sender.ready().await.map_err(OpenError::Retryable)?;
    let (response, mut send) = sender
        .send_request(req, false)
        .map_err(OpenError::Retryable)?;
    let early_sent = if early.is_empty() {
        Ok(())
    } else {
        send.send_data(early.clone(), false)
    };
    // The peer may answer (a refusal closes the stream) before the early bytes go out; then
    // its answer, not the failed send, is what happened.
    let response = response.await.map_err(not_processed)?;
    if response.status() != StatusCode::OK {
        return Err(OpenError::Status(response.status()));
    }
    early_sent.map_err(not_processed)?;
    Ok((send, response.into_body()))
}

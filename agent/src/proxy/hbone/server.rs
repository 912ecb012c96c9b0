//! Server side: answering the `CONNECT` requests of one accepted (m)TLS connection.
//!
//! The caller accepts TCP, runs the TLS handshake, works out the peer's identity from its
//! certificate, and hands the stream to [`HboneServer::serve_connection`]. Each request is
//! checked (method `CONNECT`, else 405; authority `ip:port`, else 400), then given to the
//! [`ConnectHandler`], which authorizes it and connects upstream or refuses with a status.
use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::{
    Baggage, HboneStream, SpliceCounters, SpliceIo, SpliceReport, TraceParent,
    headers::{TRACEPARENT, parse_authority, parse_forwarded_for},
    splice,
};
use crate::{
    config::H2Limits, identity::NegotiatedTls, proxy::window_budget::WindowBudget,
    state::workload::Identity,
};

/// Facts about one accepted HBONE connection, established by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The client's identity, from its verified certificate.
    pub peer_identity: Identity,
    /// The client's address.
    pub peer_addr: SocketAddr,
    /// The address the client dialled (ours).
    pub local_addr: SocketAddr,
    /// What the TLS handshake agreed on.
    pub tls: NegotiatedTls,
}

/// One `CONNECT` request, for the handler to authorize and serve.
#[derive(Debug)]
pub struct ConnectRequest {
    /// Where the client wants to go: the `:authority`, parsed.
    pub authority: SocketAddr,
    /// The request headers.
    pub headers: HeaderMap,
    /// The connection the request came on.
    pub connection: Arc<ConnectionInfo>,
}

impl ConnectRequest {
    /// The source workload's attributes from `baggage`.
    pub fn baggage(&self) -> Baggage {
        Baggage::from_headers(&self.headers)
    }

    /// The original client address from `forwarded: for=…`.
    pub fn forwarded_for(&self) -> Option<IpAddr> {
        let value = self.headers.get(header::FORWARDED)?.to_str().ok()?;
        parse_forwarded_for(value)
    }

    /// The trace context from `traceparent`.
    pub fn traceparent(&self) -> Option<TraceParent> {
        self.headers.get(TRACEPARENT)?.to_str().ok()?.parse().ok()
    }

    /// True when the authority's IP is the address the client dialled (what ztunnel requires
    /// of a request for a local workload).
    pub fn authority_is_dialled(&self) -> bool {
        canonical(self.authority.ip()) == canonical(self.connection.local_addr.ip())
    }
}

/// IPv4-mapped IPv6 addresses as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The statuses a handler may refuse with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalStatus {
    /// 400: the request names nothing we serve (e.g. the authority is not a local pod).
    BadRequest,
    /// 401: the peer is not authenticated for this (e.g. a policy needs mTLS it lacks).
    Unauthorized,
    /// 403: authorization policy denies it.
    Forbidden,
    /// 503: the destination could not be reached.
    ServiceUnavailable,
}

impl RefusalStatus {
    /// The HTTP status code.
    pub fn code(self) -> StatusCode {
        match self {
            RefusalStatus::BadRequest => StatusCode::BAD_REQUEST,
            RefusalStatus::Unauthorized => StatusCode::UNAUTHORIZED,
            RefusalStatus::Forbidden => StatusCode::FORBIDDEN,
            RefusalStatus::ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// A handler's "no", with the reason for logs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} {reason}", status.code())]
pub struct Refusal {
    /// What to answer.
    pub status: RefusalStatus,
    /// Why (logged, not sent).
    pub reason: String,
}

impl Refusal {
    /// A refusal with `status` and `reason`.
    pub fn new(status: RefusalStatus, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
        }
    }
}

/// A callback told how the splice of an accepted stream ended.
type OnClose = Box<dyn FnOnce(&SpliceReport) + Send>;

/// What a handler connected the request to.
pub struct Upstream<U> {
    io: U,
    on_close: Option<OnClose>,
    counters: Arc<SpliceCounters>,
}

impl<U: SpliceIo> Upstream<U> {
    /// Splice the stream to `io`.
    pub fn new(io: U) -> Self {
        Self {
            io,
            on_close: None,
            counters: Arc::default(),
        }
    }

    /// Calls `f` with the splice's report when it ends (for access logs and metrics).
    pub fn on_close(mut self, f: impl FnOnce(&SpliceReport) + Send + 'static) -> Self {
        self.on_close = Some(Box::new(f));
        self
    }
}

impl<U: SpliceIo> From<U> for Upstream<U> {
    fn from(io: U) -> Self {
        Self::new(io)
    }
}

/// Decides what to do with a `CONNECT` request. Implemented by async closures
/// `Fn(ConnectRequest) -> impl Future<Output = Result<Upstream<U>, Refusal>>`.
pub trait ConnectHandler: Send + Sync + 'static {
    /// The upstream connection type.
    type Io: SpliceIo;
    /// Authorizes `req` and connects upstream, or refuses.
    fn handle(
        &self,
        req: ConnectRequest,
    ) -> impl Future<Output = Result<Upstream<Self::Io>, Refusal>> + Send;
}

impl<F, Fut, U> ConnectHandler for F
where
    F: Fn(ConnectRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Upstream<U>, Refusal>> + Send,
    U: SpliceIo,
{
    type Io = U;

    fn handle(
        &self,
        req: ConnectRequest,
    ) -> impl Future<Output = Result<Upstream<U>, Refusal>> + Send {
        self(req)
    }
}

/// Why serving a connection ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The HTTP/2 preface or settings exchange failed.
    #[error("HTTP/2 handshake with {peer}: {source}")]
    Handshake {
        peer: SocketAddr,
        #[source]
        source: h2::Error,
    },
    /// The connection failed while serving.
    #[error("HTTP/2 connection with {peer}: {source}")]
    Connection {
        peer: SocketAddr,
        #[source]
        source: h2::Error,
    },
    /// The peer did not answer keepalive pings.
    #[error("HTTP/2 connection with {peer}: keepalive ping unanswered")]
    Keepalive { peer: SocketAddr },
    /// The peer sent no HTTP/2 preface and first request in time.
    #[error("HTTP/2 connection with {peer}: no first request within {after:?}")]
    FirstRequestTimeout { peer: SocketAddr, after: Duration },
}

/// Time limits of a served connection ([`HboneServer::with_timeouts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServeTimeouts {
    /// From the start of [`HboneServer::serve_connection`] to the first request.
    pub first_request: Option<Duration>,
    /// A connection without streams for this long is drained (GOAWAY) and closed.
    pub idle: Option<Duration>,
}

/// Streams open on one connection, and since when it has had none.
#[derive(Debug)]
struct Activity {
    start: tokio::time::Instant,
    active: AtomicUsize,
    /// Milliseconds after `start` when the last stream ended (or the connection began).
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            active: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// How long the connection has been without streams; `None` while one is open.
    fn idle_for(&self) -> Option<Duration> {
        (self.active.load(Ordering::Acquire) == 0).then(|| {
            let since = self.idle_since_ms.load(Ordering::Acquire);
            Duration::from_millis(self.now_ms().saturating_sub(since))
        })
    }
}

/// One open stream on an [`Activity`]; its end is recorded when dropped.
struct StreamGuard(Arc<Activity>);

impl StreamGuard {
    fn new(activity: Arc<Activity>) -> Self {
        activity.active.fetch_add(1, Ordering::AcqRel);
        Self(activity)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0
            .idle_since_ms
            .store(self.0.now_ms(), Ordering::Release);
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counters of a server, for metrics. Gauges go up and down; totals only up.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections being served (gauge).
    pub connections: AtomicU64,
    /// Streams accepted and splicing (gauge).
    pub active_streams: AtomicU64,
    /// Streams answered 200 (total).
    pub streams_accepted: AtomicU64,
    /// Streams refused by the handler (total).
    pub streams_refused: AtomicU64,
    /// Requests rejected before the handler: not CONNECT, bad authority (total).
    pub requests_rejected: AtomicU64,
}

/// A copy of [`ServerStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStatsSnapshot {
    pub connections: u64,
    pub active_streams: u64,
    pub streams_accepted: u64,
    pub streams_refused: u64,
    pub requests_rejected: u64,
}

impl ServerStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> ServerStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ServerStatsSnapshot {
            connections: get(&self.connections),
            active_streams: get(&self.active_streams),
            streams_accepted: get(&self.streams_accepted),
            streams_refused: get(&self.streams_refused),
            requests_rejected: get(&self.requests_rejected),
        }
    }
}

/// Decrements a gauge when dropped.
struct GaugeGuard<'a>(&'a AtomicU64);

impl<'a> GaugeGuard<'a> {
    fn new(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves HBONE connections with one handler. Cheap to clone; clones share stats.
pub struct HboneServer<H> {
    h2: Arc<H2Limits>,
    handler: Arc<H>,
    stats: Arc<ServerStats>,
    timeouts: ServeTimeouts,
    window_budget: Option<Arc<WindowBudget>>,
}

impl<H> Clone for HboneServer<H> {
    fn clone(&self) -> Self {
        Self {
            h2: self.h2.clone(),
            handler: self.handler.clone(),
            stats: self.stats.clone(),
            timeouts: self.timeouts,
            window_budget: self.window_budget.clone(),
        }
    }
}

impl<H: ConnectHandler> HboneServer<H> {
    /// A server answering with `handler`.
    pub fn new(h2: H2Limits, handler: H) -> Self {
        Self {
            h2: Arc::new(h2),
            handler: Arc::new(handler),
            stats: Arc::default(),
            timeouts: ServeTimeouts::default(),
            window_budget: None,
        }
    }

    /// The same server, taking each connection's receive window from `budget` (shared by
    /// every server of the node) instead of granting every connection its full window.
    pub fn with_window_budget(mut self, budget: Arc<WindowBudget>) -> Self {
        self.window_budget = Some(budget);
        self
    }

    /// The same server, bounding each connection's wait for its first request and its idle
    /// time.
    pub fn with_timeouts(mut self, timeouts: ServeTimeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// The server's counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Serves the requests of one connection until the peer closes it. When `drain` completes,
    /// takes no new streams (GOAWAY), lets the open ones finish, then returns; drop the future
    /// to cut the connection instead.
    pub async fn serve_connection<S>(
        &self,
        io: S,
        info: ConnectionInfo,
        drain: impl Future<Output = ()>,
    ) -> Result<(), ServeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let _connection = GaugeGuard::new(&self.stats.connections);
        let peer = info.peer_addr;
        let cfg = &self.h2;
        // Held for the connection's life: what the peer may make us buffer.
        let grant = self
            .window_budget
            .as_ref()
            .map(|budget| budget.grant(cfg.effective_connection_window(), peer));
        let connection_window = grant
            .as_ref()
            .map_or(cfg.effective_connection_window(), |g| g.window());
        // With a reduced connection window, a stream gets half of it, so one stream that stops
        // reading still leaves room for the others.
        let stream_window = if connection_window < cfg.stream_window {
            connection_window / 2
        } else {
            cfg.stream_window
        };
        // The preface and the first request share one deadline.
        let first_deadline = self
            .timeouts
            .first_request
            .map(|after| (tokio::time::Instant::now() + after, after));
        let handshake = h2::server::Builder::new()
            .initial_window_size(stream_window)
            .initial_connection_window_size(connection_window)
            .max_frame_size(cfg.max_frame_size)
            .max_concurrent_streams(cfg.max_concurrent_streams)
            .max_header_list_size(cfg.max_header_list_size)
            .max_send_buffer_size(cfg.max_send_buffer)
            .handshake::<_, Bytes>(io);
        let handshake = match first_deadline {
            Some((at, after)) => tokio::time::timeout_at(at, handshake)
                .await
                .map_err(|_| ServeError::FirstRequestTimeout { peer, after })?,
            None => handshake.await,
        };
        let mut conn = handshake.map_err(|source| ServeError::Handshake { peer, source })?;
        let mut first_request = pin!(async move {
            match first_deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        });
        let mut got_request = false;
        let activity = Arc::new(Activity::new());
        let idle_timeout = self.timeouts.idle;
        let mut idle = pin!(tokio::time::sleep(
            idle_timeout.unwrap_or(Duration::MAX / 4)
        ));

        let pings = cfg.keepalive.and_then(|k| conn.ping_pong().map(|p| (p, k)));
        let mut keepalive = pin!(async move {
            let Some((mut ping_pong, k)) = pings else {
                return std::future::pending::<()>().await;
            };
            loop {
                tokio::time::sleep(k.interval).await;
                match tokio::time::timeout(k.timeout, ping_pong.ping(h2::Ping::opaque())).await {
                    Ok(Ok(_)) => {}
                    _ => return,
                }
            }
        });
        let mut drain = pin!(drain);
        let mut draining = false;
        let info = Arc::new(info);
        loop {
            tokio::select! {
                accepted = conn.accept() => match accepted {
                    None => return Ok(()),
                    Some(Err(source)) => {
                        // A peer that just closes its socket is not an error worth reporting.
                        if source.is_io() || source.reason() == Some(h2::Reason::NO_ERROR) {
                            debug!(%peer, error = %source, "HBONE connection closed");
                            return Ok(());
                        }
                        return Err(ServeError::Connection { peer, source });
                    }
                    Some(Ok((request, respond))) => {
                        got_request = true;
                        let server = self.clone();
                        let info = info.clone();
                        let stream = StreamGuard::new(activity.clone());
                        tokio::spawn(async move {
                            server.serve_stream(request, respond, info).await;
                            drop(stream);
                        });
                    }
                },
                () = &mut first_request, if !got_request => {
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                    let after = first_deadline.map(|(_, after)| after).unwrap_or_default();
                    return Err(ServeError::FirstRequestTimeout { peer, after });
                }
                () = &mut idle, if idle_timeout.is_some() && !draining => {
                    let limit = idle_timeout.unwrap_or(Duration::MAX);
                    match activity.idle_for() {
                        Some(quiet) if quiet >= limit => {
                            debug!(%peer, ?quiet, "idle HBONE connection; draining");
                            draining = true;
                            conn.graceful_shutdown();
                        }
                        Some(quiet) => idle.as_mut().reset(tokio::time::Instant::now() + (limit - quiet)),
                        None => idle.as_mut().reset(tokio::time::Instant::now() + limit),
                    }
                }
                () = &mut drain, if !draining => {
                    debug!(%peer, "draining HBONE connection");
                    draining = true;
                    conn.graceful_shutdown();
                }
                () = &mut keepalive => {
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                    return Err(ServeError::Keepalive { peer });
                }
            }
        }
    }

    async fn serve_stream(
        &self,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        connection: Arc<ConnectionInfo>,
    ) {
        let stats = &self.stats;
        let (parts, body) = request.into_parts();
        let reject = |respond: &mut SendResponse<Bytes>, status: StatusCode, why: &str| {
            debug!(peer = %connection.peer_addr, %status, why, "HBONE request rejected");
            stats.requests_rejected.fetch_add(1, Ordering::Relaxed);
            answer(respond, status, true);
        };
        if parts.method != Method::CONNECT {
            return reject(&mut respond, StatusCode::METHOD_NOT_ALLOWED, "not CONNECT");
        }
        let authority = parse_authority(&parts.uri);
        let Some(authority) = authority else {
            return reject(
                &mut respond,
                StatusCode::BAD_REQUEST,
                "authority is not ip:port",
            );
        };
        let request = ConnectRequest {
            authority,
            headers: parts.headers,
            connection,
        };
        let peer = request.connection.peer_addr;
        let upstream = match self.handler.handle(request).await {
            Ok(upstream) => upstream,
            Err(refusal) => {
                debug!(%peer, %authority, %refusal, "HBONE request refused");
                stats.streams_refused.fetch_add(1, Ordering::Relaxed);
                answer(&mut respond, refusal.status.code(), true);
                return;
            }
        };
        let Some(send) = answer(&mut respond, StatusCode::OK, false) else {
            // The client gave up (reset) while we connected upstream.
            return;
        };
        stats.streams_accepted.fetch_add(1, Ordering::Relaxed);
        let _active = GaugeGuard::new(&stats.active_streams);
        let Upstream {
            io,
            on_close,
            counters,
        } = upstream;
        let report = splice(io, HboneStream::new(send, body, None), &counters).await;
        debug!(%peer, %authority, ?report, "HBONE stream done");
        if let Some(on_close) = on_close {
            on_close(&report);
        }
    }
}

/// Sends a response head; returns the body stream unless `end` or the stream is gone.
fn answer(
    respond: &mut SendResponse<Bytes>,
    status: StatusCode,
    end: bool,
) -> Option<h2::SendStream<Bytes>> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    match respond.send_response(response, end) {
        Ok(send) => (!end).then_some(send),
        Err(e) => {
            debug!(error = %e, %status, "HBONE response not sent");
            None
        }
    }
}

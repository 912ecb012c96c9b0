//! The agent's three small HTTP/1.1 endpoints: Prometheus `/metrics` (15020), readiness
//! `/healthz/ready` (15021) and the localhost admin `/config_dump` (15000).
//!
//! Each `serve_*` binds at once (so a taken port fails startup with the address named), then
//! answers on a spawned task until [`Server::abort`] or the runtime ends. Unknown paths get 404,
//! methods other than GET and HEAD get 405.
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::metrics::Metrics;

/// Path of the Prometheus endpoint.
pub const METRICS_PATH: &str = "/metrics";
/// Path of the readiness probe.
pub const READY_PATH: &str = "/healthz/ready";
/// Path of the configuration dump.
pub const CONFIG_DUMP_PATH: &str = "/config_dump";
/// Path of the agent's status (`sluice status`).
pub const STATUS_PATH: &str = "/status";

/// Content type of the OpenMetrics text that [`Metrics::encode`] writes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// A client that has not sent its request head by then is dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Why an endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listening socket could not be bound.
    #[error("cannot listen for {endpoint} on {addr}: {source}")]
    Bind {
        endpoint: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// A running endpoint. Dropping it leaves the endpoint running; [`Server::abort`] stops it.
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    /// The address actually bound (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting; connections already being answered finish on their own tasks.
    pub fn abort(&self) {
        self.task.abort();
    }

    /// The accept loop's task, to await or select on. It only ends when aborted.
    pub fn into_task(self) -> JoinHandle<()> {
        self.task
    }
}

/// Whether the agent is ready to take traffic: a cheap, clonable flag. It is ready once
/// [`Ready::set_ready`] has been called and no [`BlockReady`] guard is held.
#[derive(Clone, Debug, Default)]
pub struct Ready(Arc<ReadyState>);

#[derive(Debug, Default)]
struct ReadyState {
    set: AtomicBool,
    next_block: AtomicU64,
    /// Startup tasks still running, by guard id.
    blocked: Mutex<BTreeMap<u64, String>>,
}

impl ReadyState {
    fn blocked(&self) -> MutexGuard<'_, BTreeMap<u64, String>> {
        // A poisoned lock only means a holder panicked between two map operations.
        self.blocked.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Ready {
    /// A flag that starts not ready.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the agent ready: `/healthz/ready` answers 200 from now on, once no
    /// [`BlockReady`] is held.
    pub fn set_ready(&self) {
        self.0.set.store(true, Ordering::Release);
    }

    /// Marks the agent not ready again (e.g. while draining): `/healthz/ready` answers 503.
    pub fn set_not_ready(&self) {
        self.0.set.store(false, Ordering::Release);
    }

    /// Holds readiness back until the returned guard is dropped; `task` names it in the 503
    /// body. For startup work (first certificate, first MeshState, eBPF attached).
    pub fn block(&self, task: impl Into<String>) -> BlockReady {
        let id = self.0.next_block.fetch_add(1, Ordering::Relaxed);
        self.0.blocked().insert(id, task.into());
        BlockReady {
            ready: self.clone(),
            id,
        }
    }

    /// Names of the tasks still holding readiness back, in the order they started.
    pub fn pending(&self) -> Vec<String> {
        self.0.blocked().values().cloned().collect()
    }

    /// The current state.
    pub fn is_ready(&self) -> bool {
        self.0.set.load(Ordering::Acquire) && self.0.blocked().is_empty()
    }
}

/// Keeps [`Ready`] at not ready while held.
#[derive(Debug)]
#[must_use = "readiness is only held back while the guard lives"]
pub struct BlockReady {
    ready: Ready,
    id: u64,
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        self.ready.0.blocked().remove(&self.id);
    }
}

/// Writes the `/config_dump` document on each request, section by section through a
/// [`DumpWriter`] (which applies the request's filters). It must never include private keys.
pub type ConfigDump = Arc<dyn Fn(&mut DumpWriter<'_>) -> io::Result<()> + Send + Sync>;

/// Answers `/status` on each request (it may ask other tasks, such as the pod manager).
pub type StatusReport =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, super::status::AgentStatus> + Send + Sync>;

/// What a `/config_dump` request asks for: `?kind=` a section (`workloads`, `services`,
/// `policy`, `certificates`, …), `namespace=` and `name=` the entries of that namespace and name,
/// `format=` the document's shape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DumpFilter {
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub format: DumpFormat,
}

/// The shape of `/config_dump`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DumpFormat {
    /// Sluice's own: `meshState` (MeshState as it is), `certificates`, `tls`, `upgrade`.
    #[default]
    Sluice,
    /// ztunnel's: top-level `workloads`, `services`, `policies`, `certificates`, with its field
    /// names (`?format=ztunnel`).
    Ztunnel,
}

impl DumpFilter {
    /// Reads a query string; an unknown parameter is an error naming it.
    pub fn parse(query: Option<&str>) -> Result<Self, String> {
        let mut filter = DumpFilter::default();
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if key == "format" {
                filter.format = match value {
                    "sluice" => DumpFormat::Sluice,
                    "ztunnel" => DumpFormat::Ztunnel,
                    other => return Err(format!("format {other:?}: sluice or ztunnel")),
                };
                continue;
            }
            let slot = match key {
                "kind" => &mut filter.kind,
                "namespace" => &mut filter.namespace,
                "name" => &mut filter.name,
                other => {
                    return Err(format!(
                        "unknown parameter {other:?}: kind, namespace, name, format"
                    ));
                }
            };
            *slot = Some(value.to_owned());
        }
        Ok(filter)
    }

    /// Keeps, in a section, the entries of the requested namespace and name: an object with a
    /// `namespace` or `name` field is an entry, others are searched one level down.
    fn prune(&self, value: &mut serde_json::Value) {
        use serde_json::Value;
        let is_entry = |v: &Value| v.get("namespace").is_some() || v.get("name").is_some();
        let keep = |v: &Value| {
            let field = |f: &str| v.get(f).and_then(Value::as_str);
            self.namespace
                .as_deref()
                .is_none_or(|ns| field("namespace").unwrap_or(field("name").unwrap_or("")) == ns)
                && self
                    .name
                    .as_deref()
                    .is_none_or(|n| field("name") == Some(n))
        };
        match value {
            Value::Array(items) => {
                items.retain(|v| !is_entry(v) || keep(v));
                items
                    .iter_mut()
                    .filter(|v| !is_entry(v))
                    .for_each(|v| self.prune(v));
            }
            Value::Object(map) => {
                map.retain(|_, v| !is_entry(v) || keep(v));
                map.values_mut()
                    .filter(|v| !is_entry(v))
                    .for_each(|v| self.prune(v));
            }
            _ => {}
        }
    }
}

/// Writes the dump as one JSON object of groups (`meshState`, …) of sections, leaving out what
/// the filter does not ask for. Sections go out one at a time, so the document is never held
/// whole.
pub struct DumpWriter<'a> {
    out: &'a mut dyn io::Write,
    filter: &'a DumpFilter,
    /// The group open now, and whether a section was written in it.
    group: Option<(&'static str, bool)>,
    /// Whether anything was written at the top level.
    started: bool,
}

impl<'a> DumpWriter<'a> {
    /// The shape the request asked for.
    pub fn format(&self) -> DumpFormat {
        self.filter.format
    }

    pub fn new(out: &'a mut dyn io::Write, filter: &'a DumpFilter) -> Self {
        Self {
            out,
            filter,
            group: None,
            started: false,
        }
    }

    /// Writes section `name` (inside `group`, or at the top level) if the filter asks for it.
    /// Sections of one group are written one after another.
    pub fn section<T: serde::Serialize + ?Sized>(
        &mut self,
        group: Option<&'static str>,
        name: &str,
        value: &T,
    ) -> io::Result<()> {
        if self.filter.kind.as_deref().is_some_and(|k| k != name) {
            return Ok(());
        }
        if self.group.map(|(g, _)| g) != group {
            self.close_group()?;
            if let Some(g) = group {
                self.key(g)?;
                self.out.write_all(b"{")?;
                self.group = Some((g, false));
            }
        }
        match &mut self.group {
            Some((_, written)) => {
                if *written {
                    self.out.write_all(b",")?;
                }
                *written = true;
                write!(self.out, "\n{}:", serde_json::Value::from(name))?;
            }
            None => self.key(name)?,
        }
        if self.filter.namespace.is_none() && self.filter.name.is_none() {
            serde_json::to_writer(&mut self.out, value)?;
        } else {
            let mut v = serde_json::to_value(value)?;
            self.filter.prune(&mut v);
            serde_json::to_writer(&mut self.out, &v)?;
        }
        Ok(())
    }

    fn key(&mut self, name: &str) -> io::Result<()> {
        self.out
            .write_all(if self.started { b",\n" } else { b"{\n" })?;
        self.started = true;
        write!(self.out, "{}:", serde_json::Value::from(name))
    }

    fn close_group(&mut self) -> io::Result<()> {
        if self.group.take().is_some() {
            self.out.write_all(b"}")?;
        }
        Ok(())
    }

    /// Ends the document.
    pub fn finish(mut self) -> io::Result<()> {
        self.close_group()?;
        self.out
            .write_all(if self.started { b"\n}\n" } else { b"{}\n" })
    }
}

/// Sends what is written to it as body chunks of about [`DUMP_CHUNK`] bytes; fails once the
/// client has gone (which stops the dump).
struct ChunkSender {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    buf: Vec<u8>,
}

/// Size of one streamed chunk of `/config_dump`.
const DUMP_CHUNK: usize = 64 * 1024;

impl io::Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= DUMP_CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "client gone"))
    }
}

/// A body streaming what `dump` writes, produced on a blocking thread.
fn stream_dump(dump: ConfigDump, filter: DumpFilter) -> Body {
    use http_body_util::BodyExt;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::task::spawn_blocking(move || {
        let mut sender = ChunkSender {
            tx,
            buf: Vec::with_capacity(DUMP_CHUNK),
        };
        let mut writer = DumpWriter::new(&mut sender, &filter);
        let written = dump(&mut writer)
            .and_then(|()| writer.finish())
            .and_then(|()| io::Write::flush(&mut sender));
        if let Err(e) = written {
            // The status is sent already: the body ends short, which the client sees.
            tracing::debug!(error = %e, "config dump ended early");
        }
    });
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, Infallible>(hyper::body::Frame::data(chunk)), rx))
    });
    http_body_util::StreamBody::new(frames).boxed_unsync()
}

/// Serves `metrics` as OpenMetrics text on `addr` at `/metrics`.
pub async fn serve_metrics(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<Server, ServeError> {
    serve("metrics", addr, move |path| match path {
        METRICS_PATH => match metrics.encode() {
            Ok(text) => respond(StatusCode::OK, OPENMETRICS, text),
            Err(e) => {
                tracing::warn!(error = %e, "encoding metrics failed");
                respond(StatusCode::INTERNAL_SERVER_ERROR, TEXT, "encoding failed\n")
            }
        },
        _ => not_found(),
    })
    .await
}

/// Serves `/healthz/ready` on `addr`: 200 once `ready` is set, 503 before.
pub async fn serve_readiness(addr: SocketAddr, ready: Ready) -> Result<Server, ServeError> {
    serve("readiness", addr, move |path| match path {
        READY_PATH if ready.is_ready() => respond(StatusCode::OK, TEXT, "ready\n"),
        READY_PATH => {
            let pending = ready.pending();
            let body = if pending.is_empty() {
                "not ready\n".to_owned()
            } else {
                format!("not ready: waiting for {}\n", pending.join(", "))
            };
            respond(StatusCode::SERVICE_UNAVAILABLE, TEXT, body)
        }
        _ => not_found(),
    })
    .await
}

/// Serves `/config_dump` on `addr` (meant for localhost) as JSON from `dump`, streamed, with
/// the filters of [`DumpFilter`] (an unknown parameter gets 400), and `/status` from `status`.
pub async fn serve_admin(
    addr: SocketAddr,
    dump: ConfigDump,
    status: StatusReport,
) -> Result<Server, ServeError> {
    serve_with_query("admin", addr, move |path, query| match path {
        STATUS_PATH => {
            use http_body_util::BodyExt;
            let status = status();
            let body = futures::stream::once(async move {
                let mut json = serde_json::to_vec_pretty(&status.await)
                    .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}").into_bytes());
                json.push(b'\n');
                Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(json)))
            });
            let mut response = Response::new(http_body_util::StreamBody::new(body).boxed_unsync());
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(JSON));
            response
        }
        CONFIG_DUMP_PATH => match DumpFilter::parse(query) {
            Ok(filter) => {
                let mut response = Response::new(stream_dump(dump.clone(), filter));
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(JSON));
                response
            }
            Err(message) => respond(StatusCode::BAD_REQUEST, TEXT, format!("{message}\n")),
        },
        _ => not_found(),
    })
    .await
}

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    use http_body_util::BodyExt;
    let mut response = Response::new(Full::new(body.into()).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

fn not_found() -> Response<Body> {
    respond(StatusCode::NOT_FOUND, TEXT, "not found\n")
}

/// A listener on `addr` with `SO_REUSEPORT`, so that during an upgrade the next agent binds the
/// same admin port while this one still runs.
fn bind_shared(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.nonblocking().cloexec(),
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Binds `addr`, then answers every request on a spawned task with `route(path)`.
async fn serve<F>(endpoint: &'static str, addr: SocketAddr, route: F) -> Result<Server, ServeError>
where
    F: Fn(&str) -> Response<Body> + Send + Sync + 'static,
{
    serve_with_query(endpoint, addr, move |path, _| route(path)).await
}

/// As [`serve`], with `route(path, query)`.
async fn serve_with_query<F>(
    endpoint: &'static str,
    addr: SocketAddr,
    route: F,
) -> Result<Server, ServeError>
where
    F: Fn(&str, Option<&str>) -> Response<Body> + Send + Sync + 'static,
{
    let bind_error = |source| ServeError::Bind {
        endpoint,
        addr,
        source,
    };
    let listener = bind_shared(addr).map_err(bind_error)?;
    let local_addr = listener.local_addr().map_err(bind_error)?;
    tracing::info!(%local_addr, endpoint, "listening");
    let route = Arc::new(route);
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(endpoint, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let route = route.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let response = answer(&request, route.as_ref());
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = connection.await {
                    tracing::debug!(endpoint, %peer, error = %e, "connection ended with an error");
                }
            });
        }
    });
    Ok(Server { local_addr, task })
}

fn answer(
    request: &Request<Incoming>,
    route: &dyn Fn(&str, Option<&str>) -> Response<Body>,
) -> Response<Body> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    route(request.uri().path(), request.uri().query())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::ConnectionLabels;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const LOOPBACK: &str = "127.0.0.1:0";

    fn loopback() -> SocketAddr {
        LOOPBACK.parse().unwrap()
    }

    /// Sends one HTTP/1.1 request over a real socket; returns status, headers and body.
    async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
            .await
            .expect("response within 10 s")
            .unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .expect("a complete response head");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        let head = head.to_ascii_lowercase();
        let body = if head.contains("transfer-encoding: chunked") {
            dechunk(body)
        } else {
            body.to_owned()
        };
        (status, head, body)
    }

    /// The data of a chunked body.
    fn dechunk(mut raw: &str) -> String {
        let mut out = String::new();
        loop {
            let (size, rest) = raw.split_once("\r\n").expect("a chunk size line");
            let size = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
            if size == 0 {
                return out;
            }
            out.push_str(&rest[..size]);
            raw = &rest[size + 2..];
        }
    }

    #[tokio::test]
    async fn metrics_endpoint_serves_the_registry() {
        let metrics = Arc::new(Metrics::new());
        let server = serve_metrics(loopback(), metrics.clone()).await.unwrap();
        let labels = ConnectionLabels {
            reporter: ConnectionLabels::DESTINATION.into(),
            source_workload: "web".into(),
            ..ConnectionLabels::default()
        };
        metrics.opened(&labels);
        metrics.opened(&labels);
        metrics.opened(&labels);

        let (status, head, body) = request(server.local_addr(), "GET", METRICS_PATH).await;
        assert_eq!(status, 200);
        assert!(
            head.contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        let line = body
            .lines()
            .find(|l| l.starts_with("istio_tcp_connections_opened_total{reporter=\"destination\""))
            .unwrap_or_else(|| panic!("no opened sample in\n{body}"));
        assert!(line.ends_with(" 3"), "{line}");
        assert!(line.contains("source_workload=\"web\""), "{line}");

        let (status, _, _) = request(server.local_addr(), "GET", "/metricsx").await;
        assert_eq!(status, 404);
        let (status, head, _) = request(server.local_addr(), "POST", METRICS_PATH).await;
        assert_eq!(status, 405);
        assert!(head.contains("allow: get, head"), "{head}");
    }

    #[tokio::test]
    async fn readiness_follows_the_flag() {
        let ready = Ready::new();
        let server = serve_readiness(loopback(), ready.clone()).await.unwrap();
        let addr = server.local_addr();

        assert_eq!(request(addr, "GET", READY_PATH).await.0, 503);
        ready.set_ready();
        assert_eq!(request(addr, "GET", READY_PATH).await.0, 200);
        ready.set_not_ready();
        assert_eq!(request(addr, "GET", READY_PATH).await.0, 503);
        assert_eq!(request(addr, "GET", "/healthz").await.0, 404);
    }

    #[tokio::test]
    async fn readiness_waits_for_every_blocker_and_names_them() {
        let ready = Ready::new();
        let certs = ready.block("first certificate");
        let state = ready.block("first MeshState");
        ready.set_ready();
        let server = serve_readiness(loopback(), ready.clone()).await.unwrap();
        let addr = server.local_addr();

        let (status, _, body) = request(addr, "GET", READY_PATH).await;
        assert_eq!(status, 503);
        assert_eq!(
            body,
            "not ready: waiting for first certificate, first MeshState\n"
        );
        drop(certs);
        let (status, _, body) = request(addr, "GET", READY_PATH).await;
        assert_eq!(status, 503);
        assert_eq!(body, "not ready: waiting for first MeshState\n");
        drop(state);
        assert_eq!(request(addr, "GET", READY_PATH).await.0, 200);
        assert!(ready.pending().is_empty());
    }

    /// A dump of two groups: `mesh` with `workloads` and `policies`, and `certificates`.
    fn sample_dump(calls: Arc<std::sync::atomic::AtomicUsize>) -> ConfigDump {
        Arc::new(move |w: &mut DumpWriter<'_>| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let workloads: BTreeMap<String, serde_json::Value> = (0..2000)
                .map(|i| {
                    let ns = if i % 2 == 0 { "shop" } else { "bank" };
                    (
                        format!("uid-{i}"),
                        serde_json::json!({"namespace": ns, "name": format!("web-{i}"), "call": n}),
                    )
                })
                .collect();
            w.section(Some("mesh"), "workloads", &workloads)?;
            let policies = serde_json::json!({
                "authorizations": [
                    {"namespace": "shop", "name": "allow-web", "rules": [{"namespace": "bank"}]},
                    {"namespace": "bank", "name": "deny-all"},
                ],
            });
            w.section(Some("mesh"), "policies", &policies)?;
            w.section(
                None,
                "certificates",
                &[serde_json::json!({"identity": "shop/web"})],
            )
        })
    }

    /// A status that counts how often it was asked.
    fn sample_status() -> StatusReport {
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        Arc::new(move || {
            let n = asked.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move {
                super::super::status::AgentStatus {
                    node: format!("node-{n}"),
                    version: "test".into(),
                    ready: false,
                    waiting_for: vec!["first MeshState".into()],
                    config: super::super::status::ConfigStatus::new(
                        &crate::state::MeshState::default(),
                        Default::default(),
                    ),
                    pods: vec![],
                    certificates: vec![],
                    hbone_pool: Default::default(),
                    limits: super::super::status::Limits {
                        max_connections_per_pod: 1,
                        max_connections_per_node: 2,
                        open_files: 3,
                    },
                    warnings: vec![],
                }
            })
        })
    }

    #[tokio::test]
    async fn admin_answers_status_from_the_closure_each_time() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let server = serve_admin(loopback(), sample_dump(calls), sample_status())
            .await
            .unwrap();
        for n in 1..=2 {
            let (status, head, body) = request(server.local_addr(), "GET", STATUS_PATH).await;
            assert_eq!(status, 200);
            assert!(head.contains("content-type: application/json"), "{head}");
            let got: super::super::status::AgentStatus = serde_json::from_str(&body).unwrap();
            assert_eq!(got.node, format!("node-{n}"));
            assert_eq!(got.waiting_for, ["first MeshState"]);
            assert_eq!(got.limits.open_files, 3);
        }
    }

    #[test]
    fn dump_format_is_parsed_and_checked() {
        assert_eq!(DumpFilter::parse(None).unwrap().format, DumpFormat::Sluice);
        let z = DumpFilter::parse(Some("format=ztunnel&kind=workloads")).unwrap();
        assert_eq!(z.format, DumpFormat::Ztunnel);
        assert_eq!(z.kind.as_deref(), Some("workloads"));
        let e = DumpFilter::parse(Some("format=envoy")).unwrap_err();
        assert!(e.contains("envoy") && e.contains("ztunnel"), "{e}");
    }

    #[tokio::test]
    async fn admin_streams_the_dump_from_the_closure() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let server = serve_admin(loopback(), sample_dump(calls), sample_status())
            .await
            .unwrap();

        let (status, head, body) = request(server.local_addr(), "GET", CONFIG_DUMP_PATH).await;
        assert_eq!(status, 200);
        assert!(head.contains("content-type: application/json"), "{head}");
        // More than one chunk's worth, streamed rather than sent with a length.
        assert!(body.len() > DUMP_CHUNK, "{}", body.len());
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["mesh"]["workloads"].as_object().unwrap().len(), 2000);
        assert_eq!(value["mesh"]["workloads"]["uid-7"]["name"], "web-7");
        assert_eq!(value["certificates"][0]["identity"], "shop/web");
        // Each request asks the closure afresh.
        let (_, _, body) = request(server.local_addr(), "GET", CONFIG_DUMP_PATH).await;
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["mesh"]["workloads"]["uid-0"]["call"], 2);
        assert_eq!(request(server.local_addr(), "GET", "/").await.0, 404);
    }

    #[tokio::test]
    async fn admin_dump_filters_by_kind_namespace_and_name() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let server = serve_admin(loopback(), sample_dump(calls), sample_status())
            .await
            .unwrap();
        let addr = server.local_addr();
        let get = |query: &'static str| async move {
            let path = format!("{CONFIG_DUMP_PATH}?{query}");
            let (status, _, body) = request(addr, "GET", &path).await;
            assert_eq!(status, 200, "{query}: {body}");
            serde_json::from_str::<serde_json::Value>(&body)
                .unwrap_or_else(|e| panic!("{query}: {e}: {body}"))
        };

        let only = get("kind=certificates").await;
        assert_eq!(
            only,
            serde_json::json!({"certificates": [{"identity": "shop/web"}]})
        );

        let bank = get("kind=workloads&namespace=bank").await;
        let workloads = bank["mesh"]["workloads"].as_object().unwrap();
        assert_eq!(workloads.len(), 1000);
        assert!(workloads.values().all(|w| w["namespace"] == "bank"));
        assert!(bank.get("certificates").is_none(), "{bank}");

        let one = get("namespace=shop&name=web-42").await;
        assert_eq!(
            one["mesh"]["workloads"],
            serde_json::json!({"uid-42": {"namespace": "shop", "name": "web-42", "call": 3}})
        );
        // Entries one level down are filtered; what is inside an entry is not.
        assert_eq!(
            one["mesh"]["policies"]["authorizations"],
            serde_json::json!([])
        );
        let policy = get("kind=policies&name=allow-web").await;
        assert_eq!(
            policy["mesh"]["policies"]["authorizations"][0]["rules"][0]["namespace"],
            "bank"
        );

        assert_eq!(get("kind=nothing").await, serde_json::json!({}));
        let (status, _, body) =
            request(server.local_addr(), "GET", "/config_dump?nmespace=shop").await;
        assert_eq!(status, 400);
        assert!(body.contains("nmespace"), "{body}");
    }

    #[tokio::test]
    async fn a_taken_port_is_an_error_naming_the_address() {
        // Another program's listener (without SO_REUSEPORT) holds the port.
        let other = std::net::TcpListener::bind(loopback()).unwrap();
        let taken = other.local_addr().unwrap();
        let err = serve_readiness(taken, Ready::new()).await.unwrap_err();
        assert!(err.to_string().contains(&taken.to_string()), "{err}");
    }

    #[tokio::test]
    async fn a_successor_agent_shares_the_admin_port_during_an_upgrade() {
        let ready = Ready::new();
        ready.set_ready();
        let first = serve_readiness(loopback(), ready).await.unwrap();
        let second = serve_readiness(first.local_addr(), Ready::new())
            .await
            .expect("the next agent binds the same port");
        first.abort();
        tokio::task::yield_now().await;
        for _ in 0..8 {
            let (status, _, _) = request(second.local_addr(), "GET", READY_PATH).await;
            assert_eq!(
                status, 503,
                "the successor answers alone once the first is gone"
            );
        }
    }

    #[tokio::test]
    async fn abort_stops_accepting() {
        let server = serve_readiness(loopback(), Ready::new()).await.unwrap();
        let addr = server.local_addr();
        server.abort();
        let task = server.into_task();
        assert!(task.await.unwrap_err().is_cancelled());
        assert!(TcpStream::connect(addr).await.is_err());
    }
}

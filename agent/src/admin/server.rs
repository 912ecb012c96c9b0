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

/// Produces the `/config_dump` document on each request. It must never include private keys.
pub type ConfigDump = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

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

/// Serves `/config_dump` on `addr` (meant for localhost) as pretty JSON from `dump`.
pub async fn serve_admin(addr: SocketAddr, dump: ConfigDump) -> Result<Server, ServeError> {
    serve("admin", addr, move |path| match path {
        CONFIG_DUMP_PATH => match serde_json::to_vec_pretty(&dump()) {
            Ok(mut json) => {
                json.push(b'\n');
                respond(StatusCode::OK, JSON, json)
            }
            Err(e) => {
                tracing::warn!(error = %e, "encoding the config dump failed");
                respond(StatusCode::INTERNAL_SERVER_ERROR, TEXT, "encoding failed\n")
            }
        },
        _ => not_found(),
    })
    .await
}

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

type Body = Full<Bytes>;

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
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

/// Binds `addr`, then answers every request on a spawned task with `route(path)`.
async fn serve<F>(endpoint: &'static str, addr: SocketAddr, route: F) -> Result<Server, ServeError>
where
    F: Fn(&str) -> Response<Body> + Send + Sync + 'static,
{
    let bind_error = |source| ServeError::Bind {
        endpoint,
        addr,
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
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

fn answer(request: &Request<Incoming>, route: &dyn Fn(&str) -> Response<Body>) -> Response<Body> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    route(request.uri().path())
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
        (status, head.to_ascii_lowercase(), body.to_owned())
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

    #[tokio::test]
    async fn admin_serves_the_dump_from_the_closure() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let dump: ConfigDump = Arc::new(move || {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            serde_json::json!({ "workloads": ["shop/web"], "call": n })
        });
        let server = serve_admin(loopback(), dump).await.unwrap();

        let (status, head, body) = request(server.local_addr(), "GET", CONFIG_DUMP_PATH).await;
        assert_eq!(status, 200);
        assert!(head.contains("content-type: application/json"), "{head}");
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["workloads"][0], "shop/web");
        // Each request asks the closure afresh.
        let (_, _, body) = request(server.local_addr(), "GET", CONFIG_DUMP_PATH).await;
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["call"], 2);
        assert_eq!(request(server.local_addr(), "GET", "/").await.0, 404);
    }

    #[tokio::test]
    async fn a_taken_port_is_an_error_naming_the_address() {
        let first = serve_readiness(loopback(), Ready::new()).await.unwrap();
        let taken = first.local_addr();
        let err = serve_readiness(taken, Ready::new()).await.unwrap_err();
        assert!(err.to_string().contains(&taken.to_string()), "{err}");
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

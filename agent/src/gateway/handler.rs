//! One request through the gateway: route it, apply the rule's filters, pick a backend by
//! weight and an endpoint of its Service, forward it (HBONE to mesh endpoints), and report it
//! once (metrics and one access-log line) when its response has ended.
use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use tracing::info;

use super::{
    forwarding,
    routes::{MatchedPrefix, RequestView, RouteTable, Selected},
    upstream::MeshConnector,
};
use crate::{
    admin::{Metrics, http::RequestLabels, tcp::ConnectionLabels},
    config::IngressConfig,
    policy,
    proxy::balance::Balancer,
    state::{
        Identity, Membership, MeshState, StateHandle, Workload, WorkloadUid,
        http_filters::{HeaderModifier, HttpFilter, PathModifier},
        ingress::HttpBackend,
        load_balance::{self, Hop, ServiceRoute},
    },
};

/// A body either side of the gateway.
pub type GwBody = BoxBody<Bytes, hyper::Error>;

/// What every request handler shares.
pub struct Shared {
    /// The routing table, one for every worker.
    pub table: Arc<RwLock<Arc<RouteTable>>>,
    pub state: StateHandle,
    pub client: Client<MeshConnector, GwBody>,
    pub connector: MeshConnector,
    pub balance: Arc<Balancer>,
    pub metrics: Arc<Metrics>,
    pub num_trusted_proxies: usize,
    /// The gateway's own identity and workload (telemetry's source).
    pub me: Identity,
    pub workload: String,
    pub namespace: String,
    /// The gateway as AuthorizationPolicies select it (its namespace and labels).
    pub policy_target: Workload,
}

/// The gateway as a workload that AuthorizationPolicies select: its namespace, service account
/// and labels (`ingress.labels`, the labels of its pods).
pub fn policy_target(ingress: &IngressConfig, node: &str) -> Workload {
    Workload {
        uid: WorkloadUid(format!(
            "gateway/{}/{}",
            ingress.namespace, ingress.service_account
        )),
        name: ingress.service_account.clone(),
        namespace: ingress.namespace.clone(),
        service_account: ingress.service_account.clone(),
        node: Some(node.to_owned()),
        ips: Vec::new(),
        labels: ingress.labels.clone(),
        annotations: Default::default(),
        membership: Membership::Outside,
        ports: Default::default(),
        ready: true,
    }
}

/// The connection a request came on.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The gateway's address the client dialled.
    pub local: SocketAddr,
    pub port: u16,
    pub scheme: &'static str,
}

/// What the access log and the metrics say of one request.
struct Report {
    shared: Arc<Shared>,
    start: Instant,
    labels: RequestLabels,
    request_bytes: Arc<AtomicU64>,
    response_bytes: u64,
    line: AccessLine,
}

#[derive(Default)]
struct AccessLine {
    client: String,
    peer: String,
    method: String,
    host: String,
    path: String,
    protocol: String,
    route: String,
    backend: String,
    endpoint: String,
    upstream_identity: String,
    request_id: String,
    reason: String,
}

impl Drop for Report {
    fn drop(&mut self) {
        let ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        self.shared
            .metrics
            .http()
            .record(&self.labels, ms, request_bytes, self.response_bytes);
        let l = &self.line;
        info!(target: "sluice::access", direction = "ingress", client = %l.client, peer = %l.peer,
            method = %l.method, host = %l.host, path = %l.path, protocol = %l.protocol,
            route = %l.route, backend = %l.backend, endpoint = %l.endpoint,
            upstream_identity = %l.upstream_identity, response_code = self.labels.response_code,
            response_flags = %self.labels.conn.response_flags, request_bytes,
            response_bytes = self.response_bytes, duration_ms = format!("{ms:.2}"),
            request_id = %l.request_id, reason = %l.reason, "request");
    }
}

/// A body that counts what passes and reports the request when it is done (or dropped).
struct Metered<B> {
    inner: B,
    count: Arc<AtomicU64>,
    report: Option<Report>,
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.count.fetch_add(d.len() as u64, Ordering::Relaxed);
                    if let Some(r) = &mut this.report {
                        r.response_bytes += d.len() as u64;
                    }
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                // Ended: report now rather than when hyper drops the body.
                this.report.take();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn full(status: StatusCode, text: &str) -> Response<GwBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{text}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The request's host: the URI's authority (HTTP/2, absolute form) or `Host`, without port,
/// lower-case.
fn host_of(req: &Request<Incoming>) -> String {
    let raw = req
        .uri()
        .authority()
        .map(|a| a.host().to_owned())
        .or_else(|| {
            let h = req.headers().get(header::HOST)?.to_str().ok()?;
            Some(h.parse::<http::uri::Authority>().ok()?.host().to_owned())
        })
        .unwrap_or_default();
    raw.trim_end_matches('.').to_ascii_lowercase()
}

/// Handles one request; never fails (errors are answered with their status).
pub async fn handle(
    shared: Arc<Shared>,
    conn: ConnInfo,
    req: Request<Incoming>,
) -> Result<Response<GwBody>, Infallible> {
    let start = Instant::now();
    let request_bytes = Arc::new(AtomicU64::new(0));
    let host = host_of(&req);
    let client =
        forwarding::client_address(req.headers(), conn.peer.ip(), shared.num_trusted_proxies);
    let mut report = Report {
        shared: shared.clone(),
        start,
        labels: RequestLabels {
            conn: base_labels(&shared),
            response_code: 0,
        },
        request_bytes,
        response_bytes: 0,
        line: AccessLine {
            client: client.to_string(),
            peer: conn.peer.to_string(),
            method: req.method().to_string(),
            host: host.clone(),
            path: req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            protocol: format!("{:?}", req.version()),
            ..AccessLine::default()
        },
    };
    // One snapshot of the mesh for the whole request (policy, then the endpoint choice).
    let state = shared.state.current();
    let denied = authorize(&state, &shared, &conn, client);
    let (status_or_response, flags) = match denied {
        Some(policy) => (
            Err((
                StatusCode::FORBIDDEN,
                format!("RBAC: access denied by {policy}"),
            )),
            "RBAC",
        ),
        None => route_and_forward(&shared, &state, conn, client, req, &host, &mut report).await,
    };
    let mut response = match status_or_response {
        Ok(r) => r,
        Err((status, reason)) => {
            report.line.reason = reason.clone();
            full(status, &reason)
        }
    };
    report.labels.response_code = response.status().as_u16();
    report.labels.conn.response_flags = flags.to_owned();
    let count = Arc::new(AtomicU64::new(0));
    let body = std::mem::replace(
        response.body_mut(),
        BoxBody::new(Full::new(Bytes::new()).map_err(|never| match never {})),
    );
    *response.body_mut() = Metered {
        inner: body,
        count,
        report: Some(report),
    }
    .boxed();
    Ok(response)
}

/// The AuthorizationPolicies that select the gateway, with the client address as the remote
/// address (`remoteIpBlocks`); `Some(policy)` when one denies the request.
fn authorize(
    state: &MeshState,
    shared: &Shared,
    conn: &ConnInfo,
    client: IpAddr,
) -> Option<String> {
    let decision = state.policy.authorize(&policy::ConnectionInfo {
        source_identity: None,
        source_ip: conn.peer.ip(),
        destination: &shared.policy_target,
        destination_ip: conn.local.ip(),
        destination_port: conn.port,
        remote_ip: Some(client),
    });
    match decision {
        policy::Decision::Allow => None,
        policy::Decision::Deny { policy, .. } => Some(policy),
    }
}

fn base_labels(shared: &Shared) -> ConnectionLabels {
    ConnectionLabels {
        reporter: ConnectionLabels::SOURCE.into(),
        source_workload: shared.workload.clone(),
        source_workload_namespace: shared.namespace.clone(),
        source_principal: shared.me.to_string(),
        destination_workload: "unknown".into(),
        destination_workload_namespace: "unknown".into(),
        destination_principal: "unknown".into(),
        connection_security_policy: ConnectionLabels::NONE.into(),
        request_protocol: "http".into(),
        response_flags: ConnectionLabels::NO_FLAGS.into(),
        destination_service: "unknown".into(),
        destination_service_name: "unknown".into(),
        destination_service_namespace: "unknown".into(),
    }
}

type Answer = (Result<Response<GwBody>, (StatusCode, String)>, &'static str);

/// Routes one request that policy admitted, with the mesh `state` and `client` address the
/// request was judged by.
async fn route_and_forward(
    shared: &Arc<Shared>,
    state: &MeshState,
    conn: ConnInfo,
    client: IpAddr,
    req: Request<Incoming>,
    host: &str,
    report: &mut Report,
) -> Answer {
    let table = shared
        .table
        .read()
        .map(|t| t.clone())
        .unwrap_or_else(|e| e.into_inner().clone());
    let Some(listener) = table.listener(conn.port, host) else {
        return (
            Err((
                StatusCode::NOT_FOUND,
                format!("no listener for host {host:?}"),
            )),
            "NR",
        );
    };
    let selected = listener.select(&RequestView {
        host,
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
    });
    let Some(Selected {
        route,
        rule,
        matched_prefix,
    }) = selected
    else {
        return (
            Err((StatusCode::NOT_FOUND, "no route matches".into())),
            "NR",
        );
    };
    report.line.route = route.to_string();
    let (mut parts, body) = req.into_parts();
    let original_path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    let mut path = original_path.clone();
    let mut authority = host.to_owned();
    let mut response_mods: Vec<&HeaderModifier> = Vec::new();
    for f in &rule.filters {
        match f {
            HttpFilter::RequestHeaders(m) => modify(&mut parts.headers, m),
            HttpFilter::ResponseHeaders(m) => response_mods.push(m),
            HttpFilter::Redirect(r) => {
                let scheme = r.scheme.as_deref().unwrap_or(conn.scheme);
                let host = r.hostname.as_deref().unwrap_or(host);
                let port = r.port.or_else(|| {
                    // Without a port, the scheme's default (none shown) unless the scheme is
                    // kept, when the listener's port is kept too.
                    (r.scheme.is_none()
                        && !matches!((scheme, conn.port), ("http", 80) | ("https", 443)))
                    .then_some(conn.port)
                });
                let port = port
                    .filter(|p| !matches!((scheme, *p), ("http", 80) | ("https", 443)))
                    .map(|p| format!(":{p}"))
                    .unwrap_or_default();
                let new_path = r
                    .path
                    .as_ref()
                    .map(|m| apply_path(m, &original_path, matched_prefix.as_ref()))
                    .unwrap_or_else(|| original_path.clone());
                let q = query.as_ref().map(|q| format!("?{q}")).unwrap_or_default();
                let location = format!("{scheme}://{host}{port}{new_path}{q}");
                let mut resp = full(
                    StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND),
                    "redirect",
                );
                match HeaderValue::from_str(&location) {
                    Ok(v) => {
                        resp.headers_mut().insert(header::LOCATION, v);
                    }
                    Err(_) => {
                        return (
                            Err((
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "redirect target is not a valid header".into(),
                            )),
                            "-",
                        );
                    }
                }
                return (Ok(resp), "-");
            }
            HttpFilter::Rewrite(r) => {
                if let Some(h) = &r.hostname {
                    authority = h.clone();
                }
                if let Some(m) = &r.path {
                    path = apply_path(m, &original_path, matched_prefix.as_ref());
                }
            }
        }
    }
    let Some(backend) = pick_backend(&rule.backends) else {
        return (
            Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                "the rule has no backend".into(),
            )),
            "NR",
        );
    };
    report.line.backend = format!("{}:{}", backend.service, backend.port);
    if let Some(why) = &backend.invalid {
        return (Err((StatusCode::INTERNAL_SERVER_ERROR, why.clone())), "NR");
    }
    let route = load_balance::route_named(
        state,
        &backend.service,
        backend.port,
        Some(client),
        &*shared.balance,
    );
    let (service, attempts) = match route {
        Some(ServiceRoute::Endpoints { service, attempts }) => (service, attempts),
        Some(ServiceRoute::NoHealthyUpstream { .. }) | None => {
            return (
                Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("no healthy endpoint of Service {}", backend.service),
                )),
                "UH",
            );
        }
    };
    {
        let l = &mut report.labels.conn;
        l.destination_service = service.hostname.clone();
        l.destination_service_name = service.name.clone();
        l.destination_service_namespace = service.namespace.clone();
    }
    // The request as the backend gets it.
    forwarding::strip_hop_by_hop(&mut parts.headers);
    report.line.request_id = forwarding::set_forwarding_headers(
        &mut parts.headers,
        conn.peer.ip(),
        conn.scheme,
        shared.num_trusted_proxies,
    );
    if let Ok(v) = HeaderValue::from_str(&authority) {
        parts.headers.insert(header::HOST, v);
    }
    parts.version = Version::HTTP_11;
    let path_and_query = match &query {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    // A request without a body can go to the next endpoint when one cannot be reached.
    let replayable = body.is_end_stream();
    let mut body = Some(
        Metered {
            inner: body,
            count: report.request_bytes.clone(),
            report: None,
        }
        .boxed(),
    );
    let request_timeout = rule.timeouts.request;
    let backend_timeout = rule.timeouts.backend_request.or(request_timeout);
    let deadline = request_timeout.map(|t| Instant::now() + t);
    let mut last_error = String::new();
    for attempt in &attempts {
        let dst = attempt.hop.dst();
        let identity = match &attempt.hop {
            Hop::Hbone { identity, .. } => Some(identity.clone()),
            Hop::Direct { .. } => None,
        };
        let uri: Uri = match format!("http://{dst}{path_and_query}").parse() {
            Ok(u) => u,
            Err(e) => {
                return (
                    Err((
                        StatusCode::BAD_REQUEST,
                        format!("path {path_and_query:?}: {e}"),
                    )),
                    "-",
                );
            }
        };
        let b = match body.take() {
            Some(b) => b,
            None if replayable => Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed(),
            None => break,
        };
        let mut upstream = Request::from_parts(parts.clone(), b);
        *upstream.uri_mut() = uri;
        let _in_flight = shared.balance.open(dst.ip());
        let timeout = match (backend_timeout, deadline) {
            (Some(t), Some(d)) => Some(t.min(d.saturating_duration_since(Instant::now()))),
            (t, _) => t,
        };
        let sent = shared.client.request(upstream);
        let result = match timeout {
            Some(t) => match tokio::time::timeout(t, sent).await {
                Ok(r) => r,
                Err(_) => {
                    report.line.endpoint = dst.to_string();
                    return (
                        Err((
                            StatusCode::GATEWAY_TIMEOUT,
                            format!("backend {dst} did not answer within {t:?}"),
                        )),
                        "UT",
                    );
                }
            },
            None => sent.await,
        };
        match result {
            Ok(mut resp) => {
                report.line.endpoint = dst.to_string();
                let l = &mut report.labels.conn;
                if let Some(uid) = &attempt.workload
                    && let Some(w) = state.workloads.get(uid)
                {
                    l.destination_workload = crate::proxy::telemetry::workload_name(w).to_owned();
                    l.destination_workload_namespace = w.namespace.clone();
                }
                if let Some(id) = &identity {
                    l.destination_principal = id.to_string();
                    l.connection_security_policy = ConnectionLabels::MUTUAL_TLS.into();
                    report.line.upstream_identity = id.to_string();
                }
                forwarding::strip_hop_by_hop(resp.headers_mut());
                for m in &response_mods {
                    modify(resp.headers_mut(), m);
                }
                return (Ok(resp.map(|b| b.boxed())), "-");
            }
            Err(e) => {
                last_error = format!("{dst}: {e}: {}", error_chain(&e));
                if !(e.is_connect() && replayable) {
                    break;
                }
            }
        }
    }
    (
        Err((
            StatusCode::BAD_GATEWAY,
            format!("upstream failed: {last_error}"),
        )),
        "UF",
    )
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out.join(": ")
}

/// Applies a header modifier: set, then add, then remove.
fn modify(headers: &mut http::HeaderMap, m: &HeaderModifier) {
    for (k, v) in &m.set {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            headers.insert(k, v);
        }
    }
    for (k, v) in &m.add {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            headers.append(k, v);
        }
    }
    for k in &m.remove {
        headers.remove(k.as_str());
    }
}

/// The path after a redirect's or rewrite's path modifier.
pub fn apply_path(m: &PathModifier, path: &str, matched: Option<&MatchedPrefix>) -> String {
    match (m, matched) {
        (PathModifier::ReplaceFullPath(p), _) => p.clone(),
        // Istio's rewrite: the matched characters are replaced, the rest kept as it is.
        (PathModifier::ReplacePrefixMatch(replacement), Some(MatchedPrefix::Chars(prefix))) => {
            format!(
                "{replacement}{}",
                path.strip_prefix(prefix.as_str()).unwrap_or(path)
            )
        }
        (PathModifier::ReplacePrefixMatch(replacement), matched) => {
            let prefix = match matched {
                Some(MatchedPrefix::Elements(p)) => p.as_str(),
                _ => "/",
            };
            let rest = if prefix == "/" {
                path.strip_prefix('/').unwrap_or(path)
            } else {
                path.strip_prefix(prefix)
                    .unwrap_or(path)
                    .trim_start_matches('/')
            };
            let base = replacement.trim_end_matches('/');
            if rest.is_empty() {
                if base.is_empty() {
                    "/".to_owned()
                } else {
                    base.to_owned()
                }
            } else {
                format!("{base}/{rest}")
            }
        }
    }
}

/// A backend by weight (a zero weight takes nothing); `None` when no backend takes traffic.
fn pick_backend(backends: &[HttpBackend]) -> Option<&HttpBackend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut n = fastrand::u64(..total);
    for b in backends {
        let w = u64::from(b.weight);
        if n < w {
            return Some(b);
        }
        n -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_replacement_follows_the_spec_examples() {
        let r = |rep: &str, prefix: &str, path: &str| {
            apply_path(
                &PathModifier::ReplacePrefixMatch(rep.into()),
                path,
                Some(&MatchedPrefix::Elements(prefix.into())),
            )
        };
        assert_eq!(r("/xyz", "/foo", "/foo/bar"), "/xyz/bar");
        assert_eq!(r("/xyz", "/foo", "/foo"), "/xyz");
        assert_eq!(r("/xyz/", "/foo", "/foo/bar"), "/xyz/bar");
        assert_eq!(r("/", "/foo", "/foo/bar"), "/bar");
        assert_eq!(r("/", "/foo", "/foo"), "/");
        assert_eq!(r("/v2", "/", "/a/b"), "/v2/a/b");
        assert_eq!(
            apply_path(&PathModifier::ReplaceFullPath("/x".into()), "/a/b", None),
            "/x"
        );
        // Istio: characters, not path elements.
        assert_eq!(
            apply_path(
                &PathModifier::ReplacePrefixMatch("/v2".into()),
                "/apix/y",
                Some(&MatchedPrefix::Chars("/api".into()))
            ),
            "/v2x/y"
        );
    }

    #[test]
    fn weights_split_and_zero_takes_nothing() {
        let b = |service: &str, weight| HttpBackend {
            service: service.into(),
            port: 80,
            weight,
            invalid: None,
        };
        let backends = [b("a", 80), b("b", 20), b("c", 0)];
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..10_000 {
            let picked = pick_backend(&backends).expect("some");
            *counts.entry(picked.service.clone()).or_insert(0) += 1;
        }
        assert!(!counts.contains_key("c"));
        let a = counts["a"];
        assert!((7_600..=8_400).contains(&a), "{counts:?}");
        assert!(pick_backend(&[b("z", 0)]).is_none());
    }
}

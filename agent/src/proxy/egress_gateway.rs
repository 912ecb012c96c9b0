//! Egress gateway role: HBONE from pods on the node's address (`spec.egress.gateway.listen`), served
//! with the egress gateway identity, forwarded out as the egress decision says.
//!
//! For each `CONNECT` (authority = the destination the pod dialled): the source workload is
//! the pod the `forwarded` header names, and its identity must be the one its client
//! certificate proved. The gateway answers 200, reads the tunnel's first bytes (HTTP `Host` or
//! TLS SNI; the client's TLS is never terminated), asks the egress decision itself — the pod's
//! proxy is not trusted to have asked — and then, for a route to an Istio egress Gateway this
//! node carries, forwards per [`Egress::gateway_decision`]: HTTP by Host, TLS passthrough by
//! SNI, TLS origination (plain HTTP in, TLS with SNI and certificate verification out), TCP;
//! in the HTTP modes every later request on the tunnel must name the first one's host
//! ([`http_requests`](super::http_requests)), or the tunnel ends before it is sent;
//! for a StaticGatewayConfiguration this node carries, TCP to the original destination.
//! Anything else is refused: the tunnel is reset, logged and counted.
//!
//! Connections out bind to an address of the source's egress prefix (the Gateway's
//! StaticGatewayConfiguration, else the pod's own, when this node carries it), chosen per
//! workload by [`crate::egress::source_address`].
//!
//! [`Egress::gateway_decision`]: crate::state::egress::Egress::gateway_decision
use std::{
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWriteExt, DuplexStream, ReadBuf, ReadHalf, WriteHalf},
    net::{TcpListener, TcpSocket, TcpStream},
};
use tracing::{info, warn};

use super::{
    ProxyInputs,
    egress::EgressRuntime,
    hbone::{ConnectRequest, HboneServer, Refusal, RefusalStatus, SpliceIo, Upstream},
    http_requests::{CheckedRequests, RequestFraming},
    peek::{self, Sniffed},
};
use crate::state::{
    MeshState, Workload,
    egress::{
        DestinationScope, EgressDecision, GatewayMode, GatewayTarget, HostHint,
        Upstream as EgressUpstream, UpstreamTls,
    },
};

/// How long the gateway waits for the tunnel's first bytes.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many first bytes are read before deciding.
const FIRST_BYTES_MAX: usize = 16 * 1024;
/// Bytes buffered between the tunnel and the upstream connection.
const PIPE_BYTES: usize = 64 * 1024;

/// Accepts HBONE from pods on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, inputs: ProxyInputs) {
    let server = Arc::new(
        HboneServer::new(inputs.hbone.h2.clone(), {
            let inputs = inputs.clone();
            move |req: ConnectRequest| {
                let inputs = inputs.clone();
                async move { accept(req, &inputs) }
            }
        })
        .with_timeouts(super::hbone_inbound::serve_timeouts(&inputs))
        .with_window_budget(inputs.window_budget.clone()),
    );
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "egress gateway accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(unauthenticated) = inputs.unauthenticated.admit(peer) else {
            super::socket::reset_on_close(&tcp);
            continue;
        };
        let server = server.clone();
        let inputs = inputs.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(tcp, peer, unauthenticated, &server, &inputs).await {
                info!(target: "sluice::access", direction = "egress_gateway", src.addr = %peer, outcome = "handshake", error = %e, "connection refused");
                inputs.egress.refused("gateway_handshake");
            }
        });
    }
}

async fn serve_one<H: super::hbone::ConnectHandler>(
    tcp: TcpStream,
    peer: SocketAddr,
    unauthenticated: super::limits::Unauthenticated,
    server: &HboneServer<H>,
    inputs: &ProxyInputs,
) -> anyhow::Result<()> {
    let me = inputs
        .egress
        .gateway
        .identity(&inputs.state.current().trust_domain);
    super::hbone_inbound::serve_as(tcp, peer, unauthenticated, server, &me, inputs).await
}

/// Checks who asks, answers 200 and leaves the rest to a task reading the tunnel.
fn accept(req: ConnectRequest, inputs: &ProxyInputs) -> Result<Upstream<Pipe>, Refusal> {
    let state = inputs.state.current();
    let peer = req.connection.peer_identity.clone();
    let src_ip = req.forwarded_for().unwrap_or(req.connection.peer_addr.ip());
    let dst = req.authority;
    let refuse = |status: RefusalStatus, label: &str, reason: String| {
        info!(target: "sluice::access", direction = "egress_gateway", src.addr = %src_ip, src.identity = %peer, dst.addr = %dst, outcome = "refused", reason_label = label, reason = %reason, "connection refused");
        inputs.egress.refused(label);
        Refusal::new(status, reason)
    };
    let Some(workload) = state.workload_by_ip(src_ip) else {
        return Err(refuse(
            RefusalStatus::Forbidden,
            "gateway_unknown_source",
            format!("{src_ip} is not a known workload"),
        ));
    };
    if workload.identity(&state.trust_domain) != peer {
        return Err(refuse(
            RefusalStatus::Forbidden,
            "gateway_identity_mismatch",
            format!(
                "{src_ip} is {}, but the client proved {peer}",
                workload.identity(&state.trust_domain)
            ),
        ));
    }
    let (near, far) = tokio::io::duplex(PIPE_BYTES);
    let abort = Arc::new(AtomicBool::new(false));
    let ctx = Forward {
        inputs: inputs.clone(),
        workload: workload.clone(),
        src_ip,
        peer: peer.to_string(),
        dst,
        abort: abort.clone(),
    };
    tokio::spawn(ctx.run(far));
    Ok(Upstream::new(Pipe { io: near, abort }))
}

/// The gateway end of one tunnel, once accepted.
struct Forward {
    inputs: ProxyInputs,
    workload: Workload,
    src_ip: IpAddr,
    peer: String,
    dst: SocketAddr,
    abort: Arc<AtomicBool>,
}

/// What was decided for one tunnel.
struct Out {
    mode: &'static str,
    host: String,
    port: u16,
    tls: Option<UpstreamTls>,
    bind: Option<IpAddr>,
}

impl Forward {
    async fn run(self, mut tunnel: DuplexStream) {
        let start = Instant::now();
        // Read the first bytes only when the decision may depend on a host (a server-first
        // protocol would otherwise wait out the timeout).
        let needs_host = self
            .inputs
            .state
            .current()
            .egress
            .needs_host_hint(&self.workload, self.dst.port());
        let (sniffed, first) = if needs_host {
            match peek::read_host(&mut tunnel, FIRST_BYTES_MAX, FIRST_BYTES_TIMEOUT).await {
                Ok(r) => r,
                Err(_) => (Sniffed::Other, Vec::new()),
            }
        } else {
            (Sniffed::Other, Vec::new())
        };
        let state = self.inputs.state.current();
        let out = match self.decide(&state, &sniffed) {
            Ok(out) => out,
            Err((label, reason)) => {
                self.log_refusal(&sniffed, label, &reason);
                self.abort.store(true, Ordering::SeqCst);
                return;
            }
        };
        let host = match &sniffed {
            Sniffed::Http(h) => Some(h.as_str()),
            _ => None,
        };
        let result = self.forward(&out, host, &first, tunnel).await;
        let (sent, received, outcome, error) = match result {
            Ok((s, r)) => (s, r, "ok", String::new()),
            Err((stage, e)) => {
                self.abort.store(true, Ordering::SeqCst);
                if stage == "connect" || stage == "tls" {
                    self.inputs.egress.refused("gateway_upstream");
                }
                if stage == "refused" {
                    self.inputs.egress.refused("gateway_request_host");
                }
                (0, 0, stage, e)
            }
        };
        info!(
            target: "sluice::access",
            direction = "egress_gateway",
            src.addr = %self.src_ip,
            src.workload = %self.workload.name,
            src.namespace = %self.workload.namespace,
            src.identity = %self.peer,
            dst.addr = %self.dst,
            host = %host_of(&sniffed),
            mode = out.mode,
            upstream = %format!("{}:{}", out.host, out.port),
            bind = %out.bind.map(|b| b.to_string()).unwrap_or_default(),
            bytes_sent = sent,
            bytes_recv = received,
            duration = super::telemetry::log_duration(start),
            outcome,
            error,
            "connection complete"
        );
    }

    fn log_refusal(&self, sniffed: &Sniffed, label: &str, reason: &str) {
        info!(target: "sluice::access", direction = "egress_gateway", src.addr = %self.src_ip, src.workload = %self.workload.name, src.namespace = %self.workload.namespace, src.identity = %self.peer, dst.addr = %self.dst, host = %host_of(sniffed), outcome = "refused", reason_label = label, reason, "connection refused");
        self.inputs.egress.refused(label);
    }

    /// The egress decision again, from this gateway's side.
    fn decide(&self, state: &MeshState, sniffed: &Sniffed) -> Result<Out, (&'static str, String)> {
        let node = state.nodes.get(&self.inputs.node_name).ok_or((
            "gateway_not_here",
            format!("node {} is not in the mesh state", self.inputs.node_name),
        ))?;
        let hint = sniffed.hint();
        // As at the source: without a name on the wire, a name the resolver gave this address.
        let resolved_host = self.inputs.egress.resolved_host(self.dst.ip());
        let decision = state.egress.outbound_decision(
            &self.workload,
            self.dst,
            hint.or(resolved_host.as_deref().map(HostHint::Dns)),
            DestinationScope::OutsideMesh,
            self.inputs.egress.resolved(),
        );
        let hop = match decision {
            EgressDecision::ViaGateway(hop) => hop,
            EgressDecision::Refuse(r) => return Err((r.label(), r.to_string())),
            EgressDecision::Passthrough { .. } => {
                return Err((
                    "gateway_not_routed",
                    "the egress decision does not route this connection through a gateway".into(),
                ));
            }
        };
        if !state.egress.hosts_target(node, &hop.target) {
            return Err((
                "gateway_not_here",
                format!("node {} does not carry {:?}", node.name, hop.target),
            ));
        }
        // Leave from the prefix of the Gateway's SGC, else the pod's own, if pinned here.
        let bind = hop
            .source_prefix
            .as_ref()
            .or(state
                .egress
                .static_gateways
                .bindings
                .get(&self.workload.uid))
            .and_then(|k| state.egress.static_gateways.configs.get(k))
            .filter(|g| g.hosted_on(node))
            .and_then(|g| g.prefix)
            .map(|p| crate::egress::source_address(p, &self.workload.uid));
        match &hop.target {
            // Where the decision sends it: the dialled address only if a ServiceEntry lists it.
            GatewayTarget::Static { .. } => {
                let to = match &hop.upstream {
                    EgressUpstream::Addr(a) => *a,
                    EgressUpstream::Host { .. } => self.dst,
                };
                Ok(Out {
                    mode: "tcp",
                    host: to.ip().to_string(),
                    port: to.port(),
                    tls: None,
                    bind,
                })
            }
            GatewayTarget::Istio {
                gateway,
                service_port,
                ..
            } => {
                let fwd = state
                    .egress
                    .gateway_decision(gateway, *service_port, hint)
                    .map_err(|r| {
                        let r = crate::state::egress::RefuseReason::Gateway(r);
                        (r.label(), r.to_string())
                    })?;
                let (mode, tls) = match fwd.mode {
                    GatewayMode::Http => ("http", None),
                    GatewayMode::TlsPassthrough => ("tls_passthrough", None),
                    GatewayMode::Tcp => ("tcp", None),
                    GatewayMode::TlsOrigination(t) => ("tls_origination", Some(t)),
                };
                Ok(Out {
                    mode,
                    host: fwd.upstream_host,
                    port: fwd.upstream_port,
                    tls,
                    bind,
                })
            }
        }
    }

    /// Connects out and copies. In the HTTP modes (`host`: the first request's), every later
    /// request on the tunnel must name the same host, or the tunnel ends before it is sent.
    async fn forward(
        &self,
        out: &Out,
        host: Option<&str>,
        first: &[u8],
        tunnel: DuplexStream,
    ) -> Result<(u64, u64), (&'static str, String)> {
        let mut framing = match (out.mode, host) {
            ("http" | "tls_origination", Some(h)) => Some(RequestFraming::new(h)),
            _ => None,
        };
        let first = match &mut framing {
            Some(f) => {
                let mut approved = Vec::with_capacity(first.len());
                f.feed(first, &mut approved)
                    .map_err(|e| ("refused", e.to_string()))?;
                approved
            }
            None => first.to_vec(),
        };
        let first = first.as_slice();
        let mut tunnel = CheckedRequests::new(tunnel, framing);
        let copy_error = |e: io::Error| match e.kind() {
            io::ErrorKind::PermissionDenied => ("refused", e.to_string()),
            _ => ("copy", e.to_string()),
        };
        let addr = resolve(&self.inputs.egress, &out.host, out.port, out.bind)
            .await
            .map_err(|e| ("resolve", e))?;
        let tcp = connect_from(addr, out.bind)
            .await
            .map_err(|e| ("connect", format!("{addr}: {e}")))?;
        let first_len = first.len() as u64;
        match &out.tls {
            None => {
                let mut tcp = tcp;
                tcp.write_all(first)
                    .await
                    .map_err(|e| ("copy", e.to_string()))?;
                let (s, r) = tokio::io::copy_bidirectional(&mut tunnel, &mut tcp)
                    .await
                    .map_err(copy_error)?;
                Ok((s + first_len, r))
            }
            Some(tls) => {
                let config = upstream_tls(tls, self.inputs.egress.upstream_ca_file.as_deref())
                    .map_err(|e| ("tls", e))?;
                let sni = tls.sni.clone().unwrap_or_else(|| out.host.clone());
                let name = rustls_pki_types::ServerName::try_from(sni.clone())
                    .map_err(|e| ("tls", format!("SNI {sni:?}: {e}")))?;
                let mut stream = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ("tls", format!("{sni}: {e}")))?;
                stream
                    .write_all(first)
                    .await
                    .map_err(|e| ("copy", e.to_string()))?;
                let (s, r) = tokio::io::copy_bidirectional(&mut tunnel, &mut stream)
                    .await
                    .map_err(copy_error)?;
                Ok((s + first_len, r))
            }
        }
    }
}

fn host_of(s: &Sniffed) -> &str {
    match s {
        Sniffed::Http(h) | Sniffed::Tls(h) => h,
        _ => "",
    }
}

/// The address to connect to for `host:port`, of the bind address's family when there is one.
async fn resolve(
    rt: &EgressRuntime,
    host: &str,
    port: u16,
    bind: Option<IpAddr>,
) -> Result<SocketAddr, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let dns = rt
        .dns
        .as_ref()
        .ok_or_else(|| format!("no resolver for {host}"))?;
    let cached = dns.addrs_of(host);
    let addrs = if cached.is_empty() {
        dns.resolver()
            .lookup(host)
            .await
            .map_err(|e| e.to_string())?
            .addrs
    } else {
        cached
    };
    addrs
        .iter()
        .find(|a| bind.is_none_or(|b| b.is_ipv4() == a.is_ipv4()))
        .map(|ip| SocketAddr::new(*ip, port))
        .ok_or_else(|| format!("{host} has no usable address ({addrs:?})"))
}

/// TCP to `addr`, from `bind` when given.
async fn connect_from(addr: SocketAddr, bind: Option<IpAddr>) -> io::Result<TcpStream> {
    // The agent's own listeners (admin, metrics, readiness) are on the node's loopback.
    if let Some(why) = super::own_listeners::dial_refusal(addr, false) {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
    }
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = bind {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A client config for TLS origination: CA certificates from the DestinationRule's file, the
/// gateway's configured file, or the system roots.
pub fn upstream_tls(
    tls: &UpstreamTls,
    fallback_ca: Option<&std::path::Path>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let file = tls
        .ca_certificates
        .as_deref()
        .map(std::path::Path::new)
        .or(fallback_ca);
    match file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            for block in ::pem::parse_many(&pem).map_err(|e| format!("{}: {e}", path.display()))? {
                if block.tag() == "CERTIFICATE" {
                    roots
                        .add(rustls_pki_types::CertificateDer::from(
                            block.contents().to_vec(),
                        ))
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err("no CA certificates to verify the upstream with".into());
    }
    if tls.insecure_skip_verify {
        warn!("DestinationRule asks insecureSkipVerify; Sluice verifies the upstream anyway");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The tunnel's end handed to the HBONE splice: an in-memory pipe to the forwarding task.
/// When the task gives up (refusal, upstream failure) the splice reads an error instead of an
/// end of stream, so the pod's side sees a reset rather than a clean close.
pub struct Pipe {
    io: DuplexStream,
    abort: Arc<AtomicBool>,
}

/// Read half of a [`Pipe`].
pub struct PipeRead {
    inner: ReadHalf<DuplexStream>,
    abort: Arc<AtomicBool>,
}

impl AsyncRead for PipeRead {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(()))
                if buf.filled().len() == before && self.abort.load(Ordering::SeqCst) =>
            {
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "egress gateway refused or lost the upstream",
                )))
            }
            other => other,
        }
    }
}

impl SpliceIo for Pipe {
    type Read = PipeRead;
    type Write = WriteHalf<DuplexStream>;

    fn into_halves(self) -> (Self::Read, Self::Write) {
        let (r, w) = tokio::io::split(self.io);
        (
            PipeRead {
                inner: r,
                abort: self.abort,
            },
            w,
        )
    }

    fn abort(read: Self::Read, write: Self::Write) {
        drop(read);
        drop(write);
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn a_refused_pipe_reads_as_a_reset_not_an_end() {
        let (near, far) = tokio::io::duplex(64);
        let abort = Arc::new(AtomicBool::new(false));
        let (mut r, _w) = Pipe {
            io: near,
            abort: abort.clone(),
        }
        .into_halves();
        abort.store(true, Ordering::SeqCst);
        drop(far);
        let mut buf = [0u8; 8];
        let err = r.read(&mut buf).await.expect_err("reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);

        let (near, far) = tokio::io::duplex(64);
        let (mut r, _w) = Pipe {
            io: near,
            abort: Arc::new(AtomicBool::new(false)),
        }
        .into_halves();
        drop(far);
        assert_eq!(r.read(&mut buf).await.expect("clean end"), 0);
    }

    #[test]
    fn upstream_tls_reads_the_named_ca_file() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).expect("cert");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.cert.pem()).expect("write");
        let tls = UpstreamTls {
            mode: crate::state::egress::TlsMode::Simple,
            sni: None,
            ca_certificates: Some(path.display().to_string()),
            credential_name: None,
            client_certificate: None,
            private_key: None,
            subject_alt_names: vec![],
            insecure_skip_verify: false,
        };
        assert!(upstream_tls(&tls, None).is_ok());
        let missing = UpstreamTls {
            ca_certificates: Some(dir.path().join("nope.pem").display().to_string()),
            ..tls
        };
        assert!(upstream_tls(&missing, None).is_err());
    }
}

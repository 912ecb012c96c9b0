//! Inbound HBONE: mutual-TLS HTTP/2 CONNECT on `<pod-ip>:15008`, inside the destination pod.
//!
//! For each request: the authority must be the address dialled (a local pod address), the
//! source identity comes from the verified client certificate, policy decides, and the proxy
//! connects to the application from the source pod's address.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use super::{
    ProxyInputs,
    context::PodContext,
    hbone::{
        ConnectRequest, ConnectionInfo, HboneServer, Refusal, RefusalStatus, ServeError,
        ServeTimeouts, SpliceEnd, Upstream,
    },
    inbound::connect_transparent,
    limits::Unauthenticated,
    telemetry::{self, LogWorkload, Peer, Reporter, service_label},
};
use crate::{
    identity::{NegotiatedTls, handshake_hint, peer_identity},
    policy,
    state::Identity,
};

/// Accepts HBONE connections on one pod address until the task is aborted.
pub async fn serve(listener: TcpListener, pod: Arc<PodContext>, inputs: ProxyInputs) {
    let server = Arc::new(
        HboneServer::new(inputs.hbone.h2.clone(), {
            let pod = pod.clone();
            let inputs = inputs.clone();
            move |req: ConnectRequest| {
                let pod = pod.clone();
                let inputs = inputs.clone();
                async move { authorize_and_connect(req, &pod, &inputs).await }
            }
        })
        .with_timeouts(serve_timeouts(&inputs))
        .with_window_budget(inputs.window_budget.clone()),
    );
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(pod = %pod.uid, error = %e, "HBONE accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(unauthenticated) = inputs.unauthenticated.admit(peer) else {
            super::socket::reset_on_close(&tcp);
            continue;
        };
        let server = server.clone();
        let pod = pod.clone();
        let inputs = inputs.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(tcp, peer, unauthenticated, &server, &pod, &inputs).await {
                info!(target: "sluice::access", direction = "inbound", route = "hbone", src.addr = %peer, dst.workload = %pod.name, dst.namespace = %pod.namespace, outcome = "handshake", error = %e, "connection refused");
            }
        });
    }
}

/// The first-request and idle timeouts of served HBONE connections (`spec.hbone`).
pub(crate) fn serve_timeouts(inputs: &ProxyInputs) -> ServeTimeouts {
    ServeTimeouts {
        first_request: Some(inputs.hbone.server.first_request_timeout),
        idle: Some(inputs.hbone.server.idle_timeout),
    }
}

async fn serve_one<H: super::hbone::ConnectHandler>(
    tcp: TcpStream,
    peer: SocketAddr,
    unauthenticated: Unauthenticated,
    server: &HboneServer<H>,
    pod: &PodContext,
    inputs: &ProxyInputs,
) -> anyhow::Result<()> {
    let identity = {
        let state = inputs.state.current();
        pod.workload(&state)
            .map(|w| w.identity(&state.trust_domain))
            .ok_or_else(|| anyhow::anyhow!("pod {} is not in the mesh state", pod.display_name()))?
    };
    serve_as(tcp, peer, unauthenticated, server, &identity, inputs).await
}

/// Terminates mutual TLS on `tcp` as `identity` (the client must prove a mesh identity) and
/// serves HBONE on it until the connection ends. Shared by the pod listeners and the egress
/// gateway. The handshake is bounded by `spec.hbone.handshakeTimeoutSeconds`, and
/// `unauthenticated` (the connection's place under the node's cap) is given back once the
/// client has proven its identity.
pub(crate) async fn serve_as<H: super::hbone::ConnectHandler>(
    tcp: TcpStream,
    peer: SocketAddr,
    unauthenticated: Unauthenticated,
    server: &HboneServer<H>,
    identity: &Identity,
    inputs: &ProxyInputs,
) -> anyhow::Result<()> {
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr()?;
    let tls = inputs.identity.server_config(identity).await?;
    let limit = inputs.hbone.server.handshake_timeout;
    let accept = tokio_rustls::TlsAcceptor::from(tls).accept(tcp);
    let stream = match tokio::time::timeout(limit, accept).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            return Err(match handshake_hint(&e, inputs.identity.key_exchange()) {
                Some(hint) => anyhow::anyhow!("{e}: {hint}"),
                None => e.into(),
            });
        }
        Err(_) => {
            inputs.metrics.hbone_handshake_timeout("tls");
            anyhow::bail!("no TLS handshake within {limit:?}");
        }
    };
    let peer_identity = peer_identity(stream.get_ref().1)
        .ok_or_else(|| anyhow::anyhow!("client presented no SPIFFE identity"))?;
    drop(unauthenticated);
    let info = ConnectionInfo {
        peer_identity,
        peer_addr: peer,
        local_addr: local,
        tls: NegotiatedTls::of(stream.get_ref().1),
    };
    let _served = inputs.drain.serve();
    match server
        .serve_connection(stream, info, inputs.drain.clone().started())
        .await
    {
        Err(e @ ServeError::FirstRequestTimeout { .. }) => {
            inputs.metrics.hbone_handshake_timeout("first_request");
            Err(e.into())
        }
        other => Ok(other?),
    }
}

async fn authorize_and_connect(
    req: ConnectRequest,
    pod: &Arc<PodContext>,
    inputs: &ProxyInputs,
) -> Result<Upstream<TcpStream>, Refusal> {
    let start = Instant::now();
    let dst = req.authority;
    let src = req.connection.peer_addr;
    let source = req.connection.peer_identity.clone();
    // What the source says about its workload: telemetry only, and only when its certificate
    // backs the claim (`telemetry::baggage_trust`); the certificate alone is the identity.
    let claimed = req.baggage();
    let src_baggage = claimed.header_value();
    let tls = req.connection.tls.clone();
    let refuse = |status: RefusalStatus, reason: String| {
        info!(target: "sluice::access", direction = "inbound", route = "hbone", src.addr = %src, src.identity = %source, dst.addr = %dst, dst.workload = %pod.name, dst.namespace = %pod.namespace, tls.group = %tls.group, outcome = "refused", status = status.code().as_u16(), reason = %reason, "connection refused");
        Refusal::new(status, reason)
    };
    if !req.authority_is_dialled() || !pod.ips.contains(&dst.ip()) {
        return Err(refuse(
            RefusalStatus::BadRequest,
            format!(
                "authority {dst} is not the address dialled ({})",
                req.connection.local_addr
            ),
        ));
    }
    let state = inputs.state.current();
    let baggage_trust = telemetry::baggage_trust(&claimed, &source, &state);
    let Some(workload) = state.workload_by_ip(dst.ip()) else {
        return Err(refuse(
            RefusalStatus::BadRequest,
            format!("{} is not a known workload", dst.ip()),
        ));
    };
    let decision = state.policy.authorize(&policy::ConnectionInfo {
        source_identity: Some(&source),
        source_ip: src.ip(),
        destination: workload,
        destination_ip: dst.ip(),
        destination_port: dst.port(),
        remote_ip: None,
    });
    if !decision.is_allowed() {
        inputs.metrics.policy_denied("authorization");
        return Err(refuse(RefusalStatus::Forbidden, decision.to_string()));
    }
    let slot = match inputs.caps.admit(pod) {
        Ok(slot) => slot,
        Err(scope) => {
            return Err(refuse(
                RefusalStatus::ServiceUnavailable,
                format!("connection cap ({scope}) reached"),
            ));
        }
    };
    let app = match connect_transparent(pod, inputs, SocketAddr::new(src.ip(), 0), dst).await {
        Ok(app) => app,
        Err(e) => {
            return Err(refuse(
                RefusalStatus::ServiceUnavailable,
                format!("application at {dst}: {e}"),
            ));
        }
    };
    let dst_identity = workload.identity(&state.trust_domain);
    let mut labels = telemetry::labels(
        Reporter::Destination,
        Peer {
            workload: state.workload_by_ip(src.ip()),
            principal: Some(&source),
        },
        Peer {
            workload: Some(workload),
            principal: Some(&dst_identity),
        },
        true,
    );
    telemetry::set_service_of(&mut labels, &state, workload, dst.port());
    telemetry::set_source_from_baggage(&mut labels, &claimed, baggage_trust);
    // The source pod: MeshState's, else (a source it does not know) the trusted baggage's.
    let src_workload = state
        .workload_by_ip(src.ip())
        .map(LogWorkload::of)
        .or_else(|| {
            let name = claimed.workload_name.clone()?;
            let namespace = claimed.namespace.clone()?;
            baggage_trust
                .is_trusted()
                .then_some(LogWorkload { namespace, name })
        })
        .unwrap_or_default();
    let dst_service = service_label(&labels.destination_service).to_owned();
    let (dst_name, dst_namespace) = (pod.name.clone(), pod.namespace.clone());
    let metrics = inputs.metrics.connection(&labels);
    Ok(Upstream::new(app).on_close(move |report| {
        drop(slot);
        // Istio's names: "received" are request bytes, "sent" response bytes.
        metrics.received(report.hbone_to_tcp);
        metrics.sent(report.tcp_to_hbone);
        drop(metrics);
        // The same words as the outbound log: "ok" for a clean close, else what failed.
        let (outcome, error) = match &report.end {
            SpliceEnd::Closed => ("ok", None),
            SpliceEnd::Tcp(e) => ("app_reset", Some(e.to_string())),
            SpliceEnd::Hbone(e) => ("stream_reset", Some(e.to_string())),
        };
        info!(
            target: "sluice::access",
            direction = "inbound",
            route = "hbone",
            src.addr = %src,
            src.workload = %src_workload.name,
            src.namespace = %src_workload.namespace,
            src.identity = %source,
            dst.addr = %dst,
            dst.service = %dst_service,
            dst.workload = %dst_name,
            dst.namespace = %dst_namespace,
            dst.identity = %dst_identity,
            src_baggage = %src_baggage,
            src_baggage_trust = baggage_trust.as_str(),
            tls.group = %tls.group,
            tls.cipher_suite = %tls.cipher_suite,
            bytes_sent = report.hbone_to_tcp,
            bytes_recv = report.tcp_to_hbone,
            duration = telemetry::log_duration(start),
            outcome,
            error,
            "connection complete"
        );
    }))
}

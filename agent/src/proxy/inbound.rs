//! Inbound: plaintext connections to a pod, steered here by `sluice_sk_lookup`.
//!
//! The accepted socket's local address is the address the client dialled. The proxy connects
//! on to the application from the client's own address (a transparent socket), so the
//! application sees the real client; see `redirect::pod_net` for how replies find their way
//! back.
use std::{net::SocketAddr, os::fd::AsRawFd, sync::Arc, time::Instant};

use sluice_common::TRANSPARENT_MARK;
use socket2::Domain;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{info, warn};

use super::{
    ProxyInputs,
    context::PodContext,
    copy, own_listeners,
    telemetry::{self, LogWorkload, Peer, Reporter, service_label},
};

/// Accepts steered connections on a pod's inbound listener until the task is aborted.
pub async fn serve(listener: TcpListener, pod: Arc<PodContext>, inputs: ProxyInputs) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                tokio::spawn(handle(client, peer, pod.clone(), inputs.clone()));
            }
            Err(e) => {
                warn!(pod = %pod.uid, error = %e, "inbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    inputs: ProxyInputs,
) {
    let start = Instant::now();
    let dst = match client.local_addr() {
        Ok(a) => a,
        Err(e) => {
            warn!(pod = %pod.uid, error = %e, "inbound connection has no local address");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    // Only what sk_lookup steered here is for the application: a pod that connects to the
    // listener itself (its loopback 15006) must not make the agent dial itself.
    if let Some(reason) = own_listeners::inbound_refusal(&pod.ips, dst) {
        inputs.metrics.own_listener_refused();
        info!(target: "sluice::access", direction = "inbound", route = "plaintext", src.addr = %peer, dst.addr = %dst, dst.workload = %pod.name, dst.namespace = %pod.namespace, outcome = "refused", reason_label = "own_listener", reason = %reason, "connection refused");
        super::socket::reset_on_close(&client);
        return;
    }
    // Held until the connection ends: one place under the pod's and the node's caps.
    let _slot = match inputs.caps.admit(&pod) {
        Ok(slot) => slot,
        Err(scope) => {
            info!(target: "sluice::access", direction = "inbound", route = "plaintext", src.addr = %peer, dst.addr = %dst, dst.workload = %pod.name, dst.namespace = %pod.namespace, outcome = "refused", reason_label = "connection_cap", reason = %format!("connection cap ({scope}) reached"), "connection refused");
            super::socket::reset_on_close(&client);
            return;
        }
    };
    // The node itself (kubelet probes) is not held to the pod's policies; what it only
    // forwards (DNAT + MASQUERADE) is.
    let from_node = inputs.host.exempts(peer, dst);
    // A pod the state does not know yet: wait a little for it, never let it through undecided
    // (`plaintext_allowed` refuses it when it is still unknown).
    if !from_node {
        super::unknown::wait_until(&inputs.state, inputs.unknown_hold, |s| {
            s.workload_by_ip(dst.ip()).is_some()
        })
        .await;
    }
    if !from_node && let Err((kind, reason)) = plaintext_allowed(&inputs, peer, dst) {
        inputs.metrics.policy_denied(kind);
        info!(target: "sluice::access", direction = "inbound", route = "plaintext", src.addr = %peer, dst.addr = %dst, dst.workload = %pod.name, dst.namespace = %pod.namespace, outcome = "denied", reason = %reason, "connection refused");
        // Reset rather than close, so the client sees a refusal and not an empty answer.
        super::socket::reset_on_close(&client);
        return;
    }
    let (labels, src_workload) = {
        let state = inputs.state.current();
        let mut labels = telemetry::labels(
            Reporter::Destination,
            Peer {
                workload: state.workload_by_ip(peer.ip()),
                principal: None,
            },
            Peer {
                workload: state.workload_by_ip(dst.ip()),
                principal: None,
            },
            false,
        );
        if let Some(w) = state.workload_by_ip(dst.ip()) {
            telemetry::set_service_of(&mut labels, &state, w, dst.port());
        }
        let src_workload = state.workload_by_ip(peer.ip()).map(LogWorkload::of);
        (labels, src_workload)
    };
    let dst_service = service_label(&labels.destination_service).to_owned();
    let metrics = inputs.metrics.connection(&labels);
    let result = match connect_transparent(&pod, &inputs, peer, dst).await {
        Ok(mut app) => copy::bidirectional(&mut client, &mut app)
            .await
            .map_err(|e| ("copy", e)),
        Err(e) => Err(("connect", e)),
    };
    if let Ok(t) = &result {
        // Istio's names: "received" are request bytes, "sent" response bytes.
        metrics.received(t.sent);
        metrics.sent(t.received);
    }
    drop(metrics);
    let duration = telemetry::log_duration(start);
    let src = src_workload.unwrap_or_default();
    match result {
        Ok(t) => info!(
            target: "sluice::access",
            direction = "inbound",
            route = "plaintext",
            src.addr = %peer,
            src.workload = %src.name,
            src.namespace = %src.namespace,
            dst.addr = %dst,
            dst.service = %dst_service,
            dst.workload = %pod.name,
            dst.namespace = %pod.namespace,
            from_node,
            bytes_sent = t.sent,
            bytes_recv = t.received,
            duration,
            outcome = "ok",
            "connection complete"
        ),
        Err((stage, e)) => info!(
            target: "sluice::access",
            direction = "inbound",
            route = "plaintext",
            src.addr = %peer,
            src.workload = %src.name,
            src.namespace = %src.namespace,
            dst.addr = %dst,
            dst.service = %dst_service,
            dst.workload = %pod.name,
            dst.namespace = %pod.namespace,
            from_node,
            duration,
            outcome = stage,
            error = %e,
            "connection failed"
        ),
    }
}

/// Policy for plaintext arriving at a pod: PeerAuthentication must allow it (not STRICT) and
/// AuthorizationPolicy must allow an unauthenticated source. A refusal names the kind of policy
/// (the metric's reason) and why.
fn plaintext_allowed(
    inputs: &ProxyInputs,
    peer: SocketAddr,
    dst: SocketAddr,
) -> Result<(), (&'static str, String)> {
    let state = inputs.state.current();
    let Some(workload) = state.workload_by_ip(dst.ip()) else {
        return Err((
            "unknown_workload",
            format!(
                "{} is not in the mesh state (waited {:?}); its policies are unknown",
                dst.ip(),
                inputs.unknown_hold
            ),
        ));
    };
    let mode = state.policy.mtls_mode(workload, dst.port());
    if !mode.allows_plaintext() {
        return Err((
            "peer_authentication",
            format!("PeerAuthentication {mode:?} refuses plaintext"),
        ));
    }
    let decision = state.policy.authorize(&crate::policy::ConnectionInfo {
        source_identity: None,
        source_ip: peer.ip(),
        destination: workload,
        destination_ip: dst.ip(),
        destination_port: dst.port(),
        remote_ip: None,
    });
    if decision.is_allowed() {
        Ok(())
    } else {
        Err(("authorization", decision.to_string()))
    }
}

const IPV6_TRANSPARENT: libc::c_int = 75;

/// How long the proxy waits for a pod's application to accept a connection.
const APP_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Connects to the application at `dst` from `client`'s address, inside the pod; never to one
/// of the agent's own listeners.
pub(crate) async fn connect_transparent(
    pod: &PodContext,
    inputs: &ProxyInputs,
    client: SocketAddr,
    dst: SocketAddr,
) -> std::io::Result<TcpStream> {
    if let Some(why) = own_listeners::dial_refusal(dst, true) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            why,
        ));
    }
    let domain = if dst.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = pod
        .netns
        .tcp_socket(&inputs.home, domain, TRANSPARENT_MARK)?;
    if dst.is_ipv4() {
        socket.set_ip_transparent(true)?;
    } else {
        let one: libc::c_int = 1;
        // SAFETY: valid socket fd and an int-sized option value.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_IPV6,
                IPV6_TRANSPARENT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // Keep the client's address, let the kernel pick a port.
    socket.bind(&SocketAddr::new(client.ip(), 0).into())?;
    let source = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("transparent socket has no address"))?;
    if let Err(e) = inputs.capture.allow_transparent_source(source) {
        if e.raw_os_error() == Some(libc::E2BIG) {
            inputs.caps.transparent_sources_full(pod, dst);
        }
        return Err(e);
    }
    let socket = TcpSocket::from_std_stream(socket.into());
    // Bounded, so that an application that drops SYNs cannot hold the proxy's source entry.
    let connected = match tokio::time::timeout(APP_CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the application at {dst} did not answer within {APP_CONNECT_TIMEOUT:?}"),
        )),
    };
    // Only the handshake's SYNs needed the exemption.
    inputs.capture.forget_transparent_source(source);
    let stream = connected?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

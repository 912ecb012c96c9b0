//! Outbound: connections a pod's application made, captured by `sluice_connect4/6`.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use bytes::{Bytes, BytesMut};
use sluice_common::PROXY_MARK;
use socket2::Domain;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, info, warn};

use super::{
    ProxyInputs, copy,
    hbone::{Baggage, EARLY_DATA_MAX, PoolKey, RequestMeta, SpliceCounters, SpliceEnd, splice},
    pod::PodContext,
    route,
    telemetry::{self, Peer, Reporter},
};
use crate::state::WorkloadUid;

/// Accepts captured connections on a pod's outbound listener until the task is aborted.
pub async fn serve(listener: TcpListener, pod: Arc<PodContext>, inputs: ProxyInputs) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                tokio::spawn(handle(client, peer, pod.clone(), inputs.clone()));
            }
            Err(e) => {
                warn!(pod = %pod.uid, error = %e, "outbound accept failed");
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
    // Captured by our eBPF programs, or (for migrations and comparisons) redirected here by
    // an iptables REDIRECT rule, whose original destination conntrack remembers.
    let orig = inputs
        .capture
        .take_orig_dst(pod.netns.cookie(), peer)
        .or_else(|| nat_original_dst(&client));
    let Some(orig) = orig else {
        // Someone connected to the listener directly: there is nowhere to send it.
        debug!(pod = %pod.uid, %peer, "outbound connection without a captured destination, closing");
        return;
    };
    let _ = client.set_nodelay(true);
    let state = inputs.state.current();
    let route = route::choose(&state, orig);
    let pod_name = format!("{}/{}", pod.namespace, pod.name);
    let src = pod
        .ips
        .iter()
        .find(|ip| ip.is_ipv4() == orig.is_ipv4())
        .or(pod.ips.first())
        .copied();
    let src = src.map(|ip| ip.to_string()).unwrap_or_default();
    let source_workload = state
        .workloads
        .get(&WorkloadUid(pod.uid.clone()))
        .or_else(|| state.workload_by_name(&pod.namespace, &pod.name));
    let destination_workload = state.workload_by_ip(orig.ip());
    let source_identity = source_workload.map(|w| w.identity(&state.trust_domain));
    let dst_identity = match &route {
        route::Route::Hbone { identity, .. } => Some(identity.clone()),
        route::Route::Direct { .. } => None,
    };
    let mtls = dst_identity.is_some();
    let labels = telemetry::labels(
        Reporter::Source,
        Peer {
            workload: source_workload,
            principal: source_identity.as_ref().filter(|_| mtls),
        },
        Peer {
            workload: destination_workload,
            principal: dst_identity.as_ref(),
        },
        mtls,
    );
    drop(state);
    let metrics = inputs.metrics.connection(&labels);
    let (result, route_name) = match route {
        route::Route::Direct { dst } => {
            let (peer, identity) = match super::egress::plan(&client, &pod, &inputs, dst).await {
                super::egress::Plan::Direct => (None, None),
                super::egress::Plan::Refused => return,
                super::egress::Plan::Gateway { peer, identity, .. } => (Some(peer), Some(identity)),
            };
            if let (Some(peer), Some(identity)) = (peer, identity) {
                // To an egress gateway: HBONE, asking for the original destination.
                let result = hbone(client, &pod, &inputs, dst, peer, &identity).await;
                log(
                    &pod_name,
                    &src,
                    orig,
                    "egress_gateway",
                    Some(&identity),
                    start,
                    result,
                );
                return;
            }
            let result = match connect_direct(&pod, &inputs, dst).await {
                Ok(mut upstream) => copy::bidirectional(&mut client, &mut upstream)
                    .await
                    .map_err(|e| ("copy", e.to_string())),
                Err(e) => Err(("connect", e.to_string())),
            };
            (result, "direct")
        }
        route::Route::Hbone {
            dst,
            peer,
            identity,
        } => {
            let result = hbone(client, &pod, &inputs, dst, peer, &identity).await;
            (result, "hbone")
        }
    };
    if let Ok(t) = &result {
        // Istio's names: "received" are request bytes, "sent" response bytes.
        metrics.received(t.sent);
        metrics.sent(t.received);
    }
    drop(metrics);
    log(
        &pod_name,
        &src,
        orig,
        route_name,
        dst_identity.as_ref(),
        start,
        result,
    );
}

fn log(
    pod: &str,
    src: &str,
    orig: SocketAddr,
    route: &str,
    dst_identity: Option<&crate::state::Identity>,
    start: Instant,
    result: Result<copy::Transferred, (&'static str, String)>,
) {
    let duration_ms = start.elapsed().as_millis() as u64;
    let dst_identity = dst_identity.map(ToString::to_string).unwrap_or_default();
    match result {
        Ok(t) => info!(
            target: "sluice::access",
            direction = "outbound",
            pod,
            src,
            orig_dst = %orig,
            route,
            dst_identity,
            sent = t.sent,
            received = t.received,
            duration_ms,
            outcome = "ok",
            "connection complete"
        ),
        Err((stage, error)) => info!(
            target: "sluice::access",
            direction = "outbound",
            pod,
            src,
            orig_dst = %orig,
            route,
            dst_identity,
            duration_ms,
            outcome = stage,
            error,
            "connection failed"
        ),
    }
}

/// Through the destination's HBONE listener, as this pod's identity.
async fn hbone(
    client: TcpStream,
    pod: &PodContext,
    inputs: &ProxyInputs,
    dst: SocketAddr,
    peer: SocketAddr,
    dst_identity: &crate::state::Identity,
) -> Result<copy::Transferred, (&'static str, String)> {
    let source = super::hbone_inbound::identity_of_pod(pod, inputs)
        .map_err(|e| ("identity", e.to_string()))?;
    let tls = inputs
        .identity
        .client_config(&source, vec![dst_identity.clone()])
        .await
        .map_err(|e| ("identity", e.to_string()))?;
    let key = PoolKey {
        source,
        destination: peer,
        destination_identity: dst_identity.clone(),
    };
    let src_addr = client
        .local_addr()
        .map_err(|e| ("connect", e.to_string()))?;
    let src_ip = pod
        .ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv4() == dst.is_ipv4())
        .unwrap_or(src_addr.ip());
    let meta = RequestMeta::new(SocketAddr::new(src_ip, 0), Baggage::default());
    let early = first_flight(&client);
    let counters = SpliceCounters::default();
    counters
        .tcp_to_hbone
        .store(early.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let stream = pod
        .pool
        .connect_with_data(&key, tls, dst, &meta, early)
        .await
        .map_err(|e| ("connect", e.to_string()))?;
    let report = splice(client, stream, &counters).await;
    let t = copy::Transferred {
        sent: report.tcp_to_hbone,
        received: report.hbone_to_tcp,
    };
    match report.end {
        SpliceEnd::Closed => Ok(t),
        other => Err(("copy", format!("{other:?}"))),
    }
}

/// What the client has already sent (up to [`EARLY_DATA_MAX`] bytes), read without waiting,
/// to go out with the `CONNECT`. Empty when nothing is there yet (a server-speaks-first
/// protocol), at end of stream (the splice reads the end again) and on errors (the splice
/// meets them again).
fn first_flight(client: &TcpStream) -> Bytes {
    let mut buf = BytesMut::with_capacity(EARLY_DATA_MAX);
    // Straight to the socket: tokio's `try_read` would not even try before the reactor has
    // reported the new socket readable.
    match socket2::SockRef::from(client).recv_with_flags(
        &mut buf.spare_capacity_mut()[..EARLY_DATA_MAX],
        libc::MSG_DONTWAIT,
    ) {
        Ok(n) => {
            // SAFETY: recv initialised the first `n` bytes of the spare capacity.
            unsafe { buf.set_len(n) };
            buf.freeze()
        }
        Err(_) => Bytes::new(),
    }
}

/// Plain TCP from inside the pod (so the pod's own address is the source), marked so that the
/// capture programs leave it alone.
async fn connect_direct(
    pod: &PodContext,
    inputs: &ProxyInputs,
    dst: SocketAddr,
) -> std::io::Result<TcpStream> {
    let domain = if dst.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = pod.netns.tcp_socket(&inputs.home, domain, PROXY_MARK)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    let stream = socket.connect(dst).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// `SO_ORIGINAL_DST` of a connection that netfilter NAT redirected to us, if any.
fn nat_original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    use std::os::fd::AsRawFd;
    const SO_ORIGINAL_DST: libc::c_int = 80; // also IP6T_SO_ORIGINAL_DST
    let local = stream.local_addr().ok()?;
    // SAFETY: sockaddr_storage is plain data; zeroed is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let level = if local.is_ipv4() {
        libc::SOL_IP
    } else {
        libc::SOL_IPV6
    };
    // SAFETY: valid fd, buffer and length describe `storage`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            level,
            SO_ORIGINAL_DST,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: the kernel filled a sockaddr of the socket's family, within `len`.
    let addr = unsafe { socket2::SockAddr::new(storage, len) }.as_socket()?;
    // Without NAT, conntrack's original destination is the listener itself.
    (addr != local).then_some(addr)
}

//! Outbound: connections a pod's application made, captured by `sluice_connect4/6`.
//!
//! Decide, then do, then report once: [`crate::state::outbound::decide`] picks the plan
//! (peeking the HTTP `Host` / TLS SNI first when it asks), the plan is carried out (direct,
//! HBONE to the destination pod, HBONE to an egress gateway, or a reset), and one
//! [`ConnectionResult`] writes the bytes, the metrics and the access-log line.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use bytes::{Bytes, BytesMut};
use sluice_common::PROXY_MARK;
use socket2::Domain;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpSocket, TcpStream},
};
use tracing::{debug, info, warn};

use super::{
    ProxyInputs,
    context::PodContext,
    copy,
    hbone::{
        Baggage, ConnectError, EARLY_DATA_MAX, HboneStream, PoolKey, RequestMeta, SpliceCounters,
        SpliceEnd, splice,
    },
    own_listeners, peek, socket,
    telemetry::{self, ConnectionResult, LogWorkload, OutboundLog, Outcome, Peer, Reporter},
};
use crate::identity::handshake_hint;
use crate::state::{
    Identity,
    load_balance::{Attempt, Hop, ServiceRef},
    outbound::{self, Connection, Decision, Plan, Refusal},
};

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

/// Who the source is, for the tunnel: its identity and the baggage naming it.
struct Source {
    identity: Option<Identity>,
    baggage: Baggage,
    /// The pod's address of the destination's family (Service affinity is keyed by it).
    client_ip: Option<std::net::IpAddr>,
}

async fn handle(client: TcpStream, peer: SocketAddr, pod: Arc<PodContext>, inputs: ProxyInputs) {
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
        socket::reset_on_close(&client);
        return;
    };
    // Held until the connection ends: one place under the pod's and the node's caps.
    let _slot = match inputs.caps.admit(&pod) {
        Ok(slot) => slot,
        Err(scope) => {
            socket::reset_on_close(&client);
            info!(target: "sluice::access", direction = "outbound", src.addr = %peer, src.workload = %pod.name, src.namespace = %pod.namespace, dst.addr = %orig, orig_dst = %orig, outcome = "refused", reason_label = "connection_cap", reason = %format!("connection cap ({scope}) reached"), "connection refused");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    // The application's socket as the access log names it: the pod's address of the
    // destination's family (its socket sees the loopback address the capture sent it to) and
    // its port.
    let src = pod
        .ips
        .iter()
        .find(|ip| ip.is_ipv4() == orig.is_ipv4())
        .or(pod.ips.first())
        .map_or(peer, |ip| SocketAddr::new(*ip, peer.port()));

    // A source the state does not know yet: wait a little for it, then refuse (its egress
    // policy and identity are unknown, so nothing may be decided for it).
    let known = super::unknown::wait_until(&inputs.state, inputs.unknown_hold, |s| {
        pod.workload(s).is_some()
    })
    .await;
    if known.is_none() {
        socket::reset_on_close(&client);
        inputs.metrics.policy_denied("unknown_workload");
        info!(target: "sluice::access", direction = "outbound", src.addr = %src, src.workload = %pod.name, src.namespace = %pod.namespace, dst.addr = %orig, orig_dst = %orig, outcome = "refused", reason_label = "unknown_workload", reason = %format!("pod {} is not in the mesh state (waited {:?})", pod.display_name(), inputs.unknown_hold), "connection refused");
        return;
    }
    // Decide.
    let state = inputs.state.current();
    let source = pod.workload(&state);
    let resolved = inputs.egress.resolved_host(orig.ip());
    let conn = Connection {
        source,
        dst: orig,
        resolved_host: resolved.as_deref(),
        resolved: inputs.egress.resolved(),
        balance: Some(&*inputs.balance),
    };
    let gateway = &inputs.egress.gateway;
    let plan = match outbound::decide(&state, gateway, &conn) {
        Decision::Plan(plan) => Ok(plan),
        Decision::PeekFirst(next) => {
            let rt = &inputs.egress;
            match peek::peek_host(&client, rt.peek_bytes, rt.peek_timeout).await {
                Ok(sniffed) => Ok(next.plan(&state, gateway, &conn, sniffed.hint())),
                // The client left without a byte: nothing to forward.
                Err(peek::PeekError::Closed) => Err(Outcome::failed("peek", "client closed")),
                Err(_) => Ok(next.plan(&state, gateway, &conn, None)),
            }
        }
    };
    let (route, dst_identity, host) = match &plan {
        Ok(Plan::Direct { .. }) => ("direct", None, None),
        Ok(Plan::Hbone { identity, .. }) => ("hbone", Some(identity.clone()), None),
        Ok(Plan::EgressGateway { identity, .. }) => {
            ("egress_gateway", Some(identity.clone()), None)
        }
        Ok(Plan::Service { .. }) => ("service", None, None),
        Ok(Plan::Refuse {
            reason: Refusal::NoHealthyUpstream(_),
            ..
        }) => ("service", None, None),
        Ok(Plan::Refuse { host, .. }) => ("egress", None, host.clone()),
        Err(_) => ("egress", None, None),
    };
    let mutual_tls = dst_identity.is_some();
    let source_identity = source.map(|w| w.identity(&state.trust_domain));
    let mut labels = telemetry::labels(
        Reporter::Source,
        Peer {
            workload: source,
            principal: source_identity.as_ref().filter(|_| mutual_tls),
        },
        Peer {
            workload: state.workload_by_ip(orig.ip()),
            principal: dst_identity.as_ref(),
        },
        mutual_tls,
    );
    let from = Source {
        identity: source_identity,
        baggage: source
            .map(|w| {
                let node = w.node.as_ref().and_then(|n| state.nodes.get(n));
                telemetry::baggage(w, node)
            })
            .unwrap_or_default(),
        client_ip: pod
            .ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == orig.is_ipv4()),
    };
    let log = OutboundLog {
        src_workload: LogWorkload {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
        },
        src,
        orig_dst: orig,
        dst_workload: state.workload_by_ip(orig.ip()).map(LogWorkload::of),
        route,
        dst_identity,
        host,
        service: None,
    };
    if let Ok(Plan::Service { service, attempts }) = plan {
        // Labelled and reported once an endpoint answered (or none did).
        drop(state);
        return to_service(client, &pod, &inputs, from, log, (service, attempts), start).await;
    }
    let mut log = log;
    if let Ok(Plan::Refuse {
        reason: Refusal::NoHealthyUpstream(service),
        ..
    }) = &plan
    {
        telemetry::set_service(&mut labels, service);
        labels.response_flags = telemetry::NO_HEALTHY_UPSTREAM.to_owned();
        log.service = Some(telemetry::ServiceLog::new(service));
    }
    drop(state);
    let result = ConnectionResult::new(&inputs.metrics, &labels, log, start);

    // Do.
    let outcome = match plan {
        Err(outcome) => outcome,
        Ok(Plan::Direct { dst }) => direct(client, &pod, &inputs, dst).await,
        Ok(
            Plan::Hbone {
                dst,
                peer,
                identity,
            }
            | Plan::EgressGateway {
                dst,
                gateway: peer,
                identity,
            },
        ) => hbone(client, &pod, &inputs, from, dst, peer, identity).await,
        Ok(Plan::Service { .. }) => Outcome::failed("plan", "a Service plan is carried out above"),
        Ok(Plan::Refuse { reason, .. }) => {
            // RST, not FIN: a refusal must not look like an empty answer.
            socket::reset_on_close(&client);
            drop(client);
            Outcome::Refused {
                label: reason.label(),
                reason: reason.to_string(),
            }
        }
    };

    // Report.
    result.finish(outcome);
}

/// Plain TCP to `dst` from the pod's own address.
async fn direct(
    mut client: TcpStream,
    pod: &PodContext,
    inputs: &ProxyInputs,
    dst: SocketAddr,
) -> Outcome {
    if let Some(reason) = own_listeners::dial_refusal(dst, false) {
        inputs.metrics.own_listener_refused();
        socket::reset_on_close(&client);
        return Outcome::Refused {
            label: "own_listener",
            reason,
        };
    }
    let mut upstream = match connect_direct(pod, inputs, dst).await {
        Ok(u) => u,
        Err(e) => return Outcome::failed("connect", e),
    };
    match copy::bidirectional(&mut client, &mut upstream).await {
        Ok(t) => Outcome::Done(t),
        Err(e) => Outcome::failed("copy", e),
    }
}

/// Through `peer`'s HBONE listener (a destination pod or an egress gateway), as this pod's
/// identity, asking for `dst`; `peer` must prove `dst_identity`.
async fn hbone(
    client: TcpStream,
    pod: &PodContext,
    inputs: &ProxyInputs,
    from: Source,
    dst: SocketAddr,
    peer: SocketAddr,
    dst_identity: Identity,
) -> Outcome {
    let Some(source) = from.identity else {
        return Outcome::failed(
            "identity",
            format!("pod {} is not in the mesh state", pod.display_name()),
        );
    };
    let tls = match inputs
        .identity
        .client_config(&source, vec![dst_identity.clone()])
        .await
    {
        Ok(tls) => tls,
        Err(e) => return Outcome::failed("identity", e),
    };
    let key = PoolKey {
        source,
        destination: peer,
        destination_identity: dst_identity,
    };
    let src_addr = match client.local_addr() {
        Ok(a) => a,
        Err(e) => return Outcome::failed("connect", e),
    };
    let src_ip = pod
        .ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv4() == dst.is_ipv4())
        .unwrap_or(src_addr.ip());
    // `forwarded: for=` names the application's own socket: the pod's address and its port.
    let src_port = client.peer_addr().map_or(0, |a| a.port());
    let meta = RequestMeta::new(SocketAddr::new(src_ip, src_port), from.baggage);
    let early = first_flight(&client);
    let counters = SpliceCounters::default();
    counters
        .tcp_to_hbone
        .store(early.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let stream = match pod
        .pool
        .connect_with_data(&key, tls, dst, &meta, early)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            return match handshake_hint(&e, inputs.identity.key_exchange()) {
                Some(hint) => Outcome::failed("connect", format!("{e}: {hint}")),
                None => Outcome::failed("connect", e),
            };
        }
    };
    spliced(splice(client, stream, &counters).await)
}

/// An endpoint that answered.
enum Upstream {
    Hbone(HboneStream),
    Direct(TcpStream),
}

/// To a Service address: the endpoints in the plan's order until one answers (a dial, TLS or
/// `CONNECT` failure, such as the peer's 503 when the application does not listen, moves on),
/// then the bytes; reported once, labelled with the endpoint that answered.
async fn to_service(
    client: TcpStream,
    pod: &PodContext,
    inputs: &ProxyInputs,
    from: Source,
    mut log: OutboundLog,
    (service, attempts): (ServiceRef, Vec<Attempt>),
    start: Instant,
) {
    // Read once, sent to whichever endpoint answers.
    let early = first_flight(&client);
    let mut failed: Vec<String> = Vec::new();
    let mut answered = None;
    for attempt in &attempts {
        let dst = attempt.hop.dst();
        let in_flight = inputs.balance.open(dst.ip());
        match open_endpoint(&client, pod, inputs, &from, &attempt.hop, &early).await {
            Ok(up) => {
                answered = Some((attempt, up, in_flight));
                break;
            }
            Err((e, retry)) => {
                debug!(pod = %pod.uid, endpoint = %dst, error = %e, retry, "service endpoint failed");
                failed.push(format!("{dst}: {e}"));
                if !retry {
                    break;
                }
            }
        }
    }
    let shown = answered.as_ref().map(|(a, ..)| *a).or(attempts.first());
    let state = inputs.state.current();
    let dst_workload = shown
        .and_then(|a| a.workload.as_ref())
        .and_then(|uid| state.workloads.get(uid));
    let dst_identity = shown.and_then(|a| match &a.hop {
        Hop::Hbone { identity, .. } => Some(identity.clone()),
        Hop::Direct { .. } => None,
    });
    let mutual_tls = dst_identity.is_some();
    let mut labels = telemetry::labels(
        Reporter::Source,
        Peer {
            workload: pod.workload(&state),
            principal: from.identity.as_ref().filter(|_| mutual_tls),
        },
        Peer {
            workload: dst_workload,
            principal: dst_identity.as_ref(),
        },
        mutual_tls,
    );
    let dst_log = dst_workload.map(LogWorkload::of);
    drop(state);
    telemetry::set_service(&mut labels, &service);
    log.route = if mutual_tls { "hbone" } else { "direct" };
    log.dst_identity = dst_identity;
    log.dst_workload = dst_log;
    let mut svc_log = telemetry::ServiceLog::new(&service);
    svc_log.endpoint = shown.map(|a| a.hop.dst());
    svc_log.attempts = failed.len() + usize::from(answered.is_some());
    svc_log.failed_endpoints = failed.join(", ");
    log.service = Some(svc_log);
    let Some((attempt, upstream, _in_flight)) = answered else {
        labels.response_flags = telemetry::UPSTREAM_FAILURE.to_owned();
        let result = ConnectionResult::new(&inputs.metrics, &labels, log, start);
        socket::reset_on_close(&client);
        drop(client);
        result.finish(Outcome::failed("connect", "every endpoint failed"));
        return;
    };
    if let (Some(timeout), Some(client_ip)) = (service.affinity, from.client_ip) {
        inputs
            .balance
            .remember(client_ip, &service.key, attempt.hop.dst().ip(), timeout);
    }
    let result = ConnectionResult::new(&inputs.metrics, &labels, log, start);
    let outcome = match upstream {
        Upstream::Hbone(stream) => {
            let counters = SpliceCounters::default();
            counters
                .tcp_to_hbone
                .store(early.len() as u64, std::sync::atomic::Ordering::Relaxed);
            spliced(splice(client, stream, &counters).await)
        }
        Upstream::Direct(upstream) => direct_copy(client, upstream, early.len() as u64).await,
    };
    result.finish(outcome);
}

/// Connects to one endpoint: HBONE (sending `early` with the `CONNECT`) or plain TCP (writing
/// `early` first). An error says whether another endpoint may be tried: after a dial, TLS or
/// stream failure or a 503 (the application does not listen), yes; after any other answer (a
/// policy's 403), no.
async fn open_endpoint(
    client: &TcpStream,
    pod: &PodContext,
    inputs: &ProxyInputs,
    from: &Source,
    hop: &Hop,
    early: &Bytes,
) -> Result<Upstream, (String, bool)> {
    let retry = |e: &dyn std::fmt::Display| (e.to_string(), true);
    match hop {
        Hop::Direct { dst } => {
            let mut up = connect_direct(pod, inputs, *dst)
                .await
                .map_err(|e| retry(&e))?;
            if !early.is_empty() {
                up.write_all(early).await.map_err(|e| retry(&e))?;
            }
            Ok(Upstream::Direct(up))
        }
        Hop::Hbone {
            dst,
            peer,
            identity,
        } => {
            let Some(source) = from.identity.clone() else {
                let e = format!("pod {} is not in the mesh state", pod.display_name());
                return Err((e, false));
            };
            let tls = inputs
                .identity
                .client_config(&source, vec![identity.clone()])
                .await
                .map_err(|e| (e.to_string(), false))?;
            let key = PoolKey {
                source,
                destination: *peer,
                destination_identity: identity.clone(),
            };
            let src_ip = match pod
                .ips
                .iter()
                .copied()
                .find(|ip| ip.is_ipv4() == dst.is_ipv4())
            {
                Some(ip) => ip,
                None => client
                    .local_addr()
                    .map_err(|e| (e.to_string(), false))?
                    .ip(),
            };
            let src_port = client.peer_addr().map_or(0, |a| a.port());
            let meta = RequestMeta::new(SocketAddr::new(src_ip, src_port), from.baggage.clone());
            pod.pool
                .connect_with_data(&key, tls, *dst, &meta, early.clone())
                .await
                .map(Upstream::Hbone)
                .map_err(|e| {
                    let again = match &e {
                        ConnectError::Status { status, .. } => {
                            *status == http::StatusCode::SERVICE_UNAVAILABLE
                        }
                        ConnectError::Dial(_) | ConnectError::Stream { .. } => true,
                        _ => false,
                    };
                    (e.to_string(), again)
                })
        }
    }
}

/// Copies between the client and a plain upstream that already got `early` bytes.
async fn direct_copy(mut client: TcpStream, mut upstream: TcpStream, early: u64) -> Outcome {
    match copy::bidirectional(&mut client, &mut upstream).await {
        Ok(mut t) => {
            t.sent += early;
            Outcome::Done(t)
        }
        Err(e) => Outcome::Failed {
            stage: "copy",
            error: e.to_string(),
            moved: copy::Transferred {
                sent: early,
                received: 0,
            },
        },
    }
}

/// The outcome of a finished splice.
fn spliced(report: super::hbone::SpliceReport) -> Outcome {
    let moved = copy::Transferred {
        sent: report.tcp_to_hbone,
        received: report.hbone_to_tcp,
    };
    match report.end {
        SpliceEnd::Closed => Outcome::Done(moved),
        other => Outcome::Failed {
            stage: "copy",
            error: format!("{other:?}"),
            moved,
        },
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
    if let Some(why) = own_listeners::dial_refusal(dst, false) {
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

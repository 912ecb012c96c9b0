//! Egress on the outbound path: for a destination outside the mesh, ask the egress decision
//! (peeking the HTTP `Host` or TLS SNI when the decision may depend on it, and using the names
//! the agent resolved for DNS ServiceEntries), then connect directly, tunnel to an egress
//! gateway, or refuse.
//!
//! A refused client's connection is reset (RST, not FIN, so it cannot be mistaken for an empty
//! answer), with an access-log line naming the reason and `sluice_egress_refusals_total{reason}`.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use tokio::net::TcpStream;
use tracing::info;

use super::{ProxyInputs, peek, pod::PodContext};
use crate::{
    admin::metrics::Metrics,
    config::AgentConfig,
    egress::dns::DnsCache,
    state::{
        Identity, MeshState, Node, Workload,
        egress::{DestinationScope, EgressDecision, GatewayHop, GatewayTarget, HostHint},
    },
};

/// Egress settings and shared parts every proxy task reads.
#[derive(Debug)]
pub struct EgressRuntime {
    /// Answers for DNS-resolution ServiceEntries (and the resolver gateways use).
    pub dns: Option<Arc<DnsCache>>,
    pub metrics: Option<Arc<Metrics>>,
    pub peek_bytes: usize,
    pub peek_timeout: Duration,
    /// Namespace and service account of egress gateways.
    pub gateway_namespace: String,
    pub gateway_service_account: String,
    /// Port gateways accept HBONE on.
    pub gateway_port: u16,
    /// CA file for TLS origination when a DestinationRule names none.
    pub upstream_ca_file: Option<PathBuf>,
}

impl Default for EgressRuntime {
    fn default() -> Self {
        Self::from_config(&AgentConfig::default(), None, None)
    }
}

impl EgressRuntime {
    /// Settings from the agent's config.
    pub fn from_config(
        agent: &AgentConfig,
        dns: Option<Arc<DnsCache>>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        let e = &agent.egress;
        Self {
            dns,
            metrics,
            peek_bytes: e.peek_bytes.max(64),
            peek_timeout: Duration::from_millis(e.peek_timeout_ms),
            gateway_namespace: e
                .gateway_namespace
                .clone()
                .unwrap_or_else(|| agent.root_namespace.clone()),
            gateway_service_account: e.gateway_service_account.clone(),
            gateway_port: e
                .gateway
                .as_ref()
                .map_or(super::hbone::HBONE_PORT, |g| g.listen.port()),
            upstream_ca_file: e.gateway.as_ref().and_then(|g| g.upstream_ca_file.clone()),
        }
    }

    /// The identity egress gateways serve with.
    pub fn gateway_identity(&self, trust_domain: &str) -> Identity {
        Identity::new(
            trust_domain,
            &self.gateway_namespace,
            &self.gateway_service_account,
        )
    }

    /// Counts a refusal.
    pub fn refused(&self, label: &str) {
        if let Some(m) = &self.metrics {
            m.egress_refused(label);
        }
    }
}

/// Where an egress connection goes.
#[derive(Debug)]
pub enum Plan {
    /// Straight to the destination.
    Direct,
    /// HBONE to a gateway node.
    Gateway {
        /// `<node-ip>:15008`.
        peer: SocketAddr,
        identity: Identity,
        hop: Box<GatewayHop>,
    },
    /// Refused; the client connection has been reset and the refusal logged and counted.
    Refused,
}

/// True if `ip` belongs to the mesh (a workload or a service address).
pub fn in_mesh(state: &MeshState, ip: IpAddr) -> bool {
    state.workload_by_ip(ip).is_some() || state.services.values().any(|s| s.vips.contains(&ip))
}

/// The workload behind `pod` in `state`.
pub fn workload_of<'a>(state: &'a MeshState, pod: &PodContext) -> Option<&'a Workload> {
    state
        .workloads
        .get(&crate::state::WorkloadUid(pod.uid.clone()))
        .or_else(|| state.workload_by_name(&pod.namespace, &pod.name))
}

/// The nodes that carry the gateway a hop targets.
pub fn gateway_nodes<'a>(state: &'a MeshState, target: &GatewayTarget) -> Vec<&'a Node> {
    state
        .nodes
        .values()
        .filter(|n| hosts_target(state, n, target))
        .collect()
}

/// True if `node` carries the gateway `target` names: an Istio Gateway whose (non-empty)
/// selector the node's labels satisfy, or the node pool of a StaticGatewayConfiguration.
pub fn hosts_target(state: &MeshState, node: &Node, target: &GatewayTarget) -> bool {
    match target {
        GatewayTarget::Istio { gateway, .. } => {
            state.egress.routing.gateways.get(gateway).is_some_and(|g| {
                !g.selector.is_empty()
                    && g.selector
                        .iter()
                        .all(|(k, v)| node.labels.get(k) == Some(v))
            })
        }
        GatewayTarget::Static { sgc } => state
            .egress
            .static_gateways
            .configs
            .get(sgc)
            .is_some_and(|g| g.hosted_on(node)),
    }
}

/// A stable pick among `n` for workload `uid`.
fn pick(uid: &str, n: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % n.max(1) as u64) as usize
}

/// Decides an outbound connection to `dst`, which route::choose found outside the mesh's
/// workloads. Peeks the client (without consuming) only when the decision may need a host.
pub async fn plan(
    client: &TcpStream,
    pod: &PodContext,
    inputs: &ProxyInputs,
    dst: SocketAddr,
) -> Plan {
    let state = inputs.state.current();
    let Some(workload) = workload_of(&state, pod) else {
        return Plan::Direct; // not in the state (yet): nothing to decide with
    };
    if in_mesh(&state, dst.ip()) {
        return Plan::Direct;
    }
    let rt = &inputs.egress;
    let sniffed = if state.egress.needs_host_hint(workload, dst.port()) {
        match peek::peek_host(client, rt.peek_bytes, rt.peek_timeout).await {
            Ok(s) => Some(s),
            Err(peek::PeekError::Closed) => return Plan::Refused, // nothing to forward
            Err(_) => None,
        }
    } else {
        None
    };
    let dns_host = rt.dns.as_ref().and_then(|d| d.host_for(dst.ip()));
    // A Host or SNI that is no name (an IP literal) says nothing; the resolved name may.
    let hint = sniffed
        .as_ref()
        .and_then(peek::Sniffed::hint)
        .filter(|h| match h {
            HostHint::Http(n) | HostHint::Tls(n) | HostHint::Dns(n) => {
                crate::state::egress::normalise_host(n).is_some()
            }
        })
        .or(dns_host.as_deref().map(HostHint::Dns));
    let host = hint.map(|h| match h {
        HostHint::Http(h) | HostHint::Tls(h) | HostHint::Dns(h) => h.to_owned(),
    });
    let decision =
        state
            .egress
            .outbound_decision(workload, dst, hint, DestinationScope::OutsideMesh);
    let pod_name = format!("{}/{}", pod.namespace, pod.name);
    match decision {
        EgressDecision::Passthrough { .. } => Plan::Direct,
        EgressDecision::Refuse(reason) => {
            refuse(
                client,
                rt,
                &pod_name,
                dst,
                host.as_deref(),
                reason.label(),
                &reason.to_string(),
            );
            Plan::Refused
        }
        EgressDecision::ViaGateway(hop) => {
            let nodes = gateway_nodes(&state, &hop.target);
            let node = (!nodes.is_empty()).then(|| nodes[pick(&workload.uid.0, nodes.len())]);
            let addr = node.and_then(|n| {
                n.addresses
                    .iter()
                    .find(|a| a.is_ipv4() == dst.is_ipv4())
                    .or(n.addresses.first())
                    .copied()
            });
            let Some(addr) = addr else {
                let why = format!(
                    "no node with an address carries egress gateway {:?}",
                    hop.target
                );
                refuse(
                    client,
                    rt,
                    &pod_name,
                    dst,
                    host.as_deref(),
                    "gateway_unavailable",
                    &why,
                );
                return Plan::Refused;
            };
            Plan::Gateway {
                peer: SocketAddr::new(addr, rt.gateway_port),
                identity: rt.gateway_identity(&state.trust_domain),
                hop,
            }
        }
    }
}

/// Resets `client`, logs why and counts it.
fn refuse(
    client: &TcpStream,
    rt: &EgressRuntime,
    pod: &str,
    dst: SocketAddr,
    host: Option<&str>,
    label: &str,
    reason: &str,
) {
    info!(
        target: "sluice::access",
        direction = "outbound",
        pod,
        orig_dst = %dst,
        host = host.unwrap_or(""),
        route = "egress",
        outcome = "refused",
        reason_label = label,
        reason,
        "connection refused"
    );
    rt.refused(label);
    reset(client);
}

/// Makes the eventual close of `stream` an RST.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_are_stable_and_in_range() {
        for n in 1..5 {
            let a = pick("uid-a", n);
            assert!(a < n);
            assert_eq!(a, pick("uid-a", n));
        }
        assert_eq!(pick("x", 0), 0);
    }

    #[test]
    fn defaults_name_the_gateway_identity() {
        let rt = EgressRuntime::default();
        assert_eq!(
            rt.gateway_identity("cluster.local").to_string(),
            "spiffe://cluster.local/ns/istio-system/sa/sluice-egress-gateway"
        );
        assert_eq!(rt.gateway_port, 15008);
        assert_eq!(rt.peek_bytes, peek::DEFAULT_PEEK_BYTES);
    }
}

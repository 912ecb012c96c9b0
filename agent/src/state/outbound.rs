//! The outbound decision: where a connection a pod's application made goes, decided from
//! MeshState alone, as ztunnel's `build_request` does. No I/O here: the proxy peeks, connects
//! and reports; this module only answers.
//!
//! Order, for a connection to the original destination `dst`:
//! 1. `dst` is a mesh workload (not its HBONE port): HBONE to `<pod-ip>:15008`, asking for
//!    `dst`, expecting the workload's identity.
//! 2. `dst` is any other workload: plain TCP to `dst`. `dst` is a Service address (a ClusterIP,
//!    an in-mesh ServiceEntry address): the endpoints to try, chosen by
//!    [`load_balance::route`](super::load_balance::route) (ztunnel's `load_balance`): HBONE to a mesh
//!    endpoint, plain TCP to others; none ready: refused (`UH`).
//! 3. Outside the mesh, from a source the state knows: the egress decision
//!    ([`Egress::outbound_decision`](super::egress::Egress::outbound_decision)), which may
//!    need the HTTP `Host` / TLS SNI first ([`Decision::PeekFirst`]); its answer is direct, an
//!    egress gateway node over HBONE, or a refusal.
//! 4. Outside the mesh from a source the state does not know (yet): direct.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use sluice_common::HBONE_PORT;

use super::{
    Identity, MeshState, Node, Workload,
    egress::{
        DestinationScope, EgressDecision, GatewayTarget, HostHint, RefuseReason, Resolved,
        normalise_host,
    },
    load_balance::{self, Attempt, Balance, ServiceRef, ServiceRoute},
};

/// Where this agent's egress gateways accept HBONE, and who they are (agent config).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayPeer {
    /// HBONE port on the gateway nodes.
    pub port: u16,
    /// Namespace of the gateways' service account.
    pub namespace: String,
    /// The gateways' service account.
    pub service_account: String,
}

impl GatewayPeer {
    /// The identity egress gateways serve with.
    pub fn identity(&self, trust_domain: &str) -> Identity {
        Identity::new(trust_domain, &self.namespace, &self.service_account)
    }
}

/// One outbound connection, as the decision sees it.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    /// The pod that connected; `None` while the state does not know it.
    pub source: Option<&'a Workload>,
    /// The original destination.
    pub dst: SocketAddr,
    /// A name the agent's resolver answered with `dst`'s address (DNS ServiceEntries).
    pub resolved_host: Option<&'a str>,
    /// The agent's resolver answers, for where a ServiceEntry's host may be reached.
    pub resolved: &'a dyn Resolved,
    /// Load and affinity for choosing a Service endpoint; `None`: at random.
    pub balance: Option<&'a dyn Balance>,
}

/// Where an outbound connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Plain TCP from the pod's own address to `dst`.
    Direct { dst: SocketAddr },
    /// HTTP/2 CONNECT over mutual TLS to `peer` (`<pod-ip>:15008`), asking for `dst`.
    Hbone {
        dst: SocketAddr,
        peer: SocketAddr,
        /// The identity the destination must prove.
        identity: Identity,
    },
    /// HBONE to an egress gateway node (`gateway`), asking for `dst`; the gateway connects out.
    EgressGateway {
        dst: SocketAddr,
        gateway: SocketAddr,
        /// The identity the gateway must prove.
        identity: Identity,
    },
    /// To a Service address: these endpoints, in the order to try (at most
    /// [`load_balance::MAX_ATTEMPTS`]), until one answers.
    Service {
        service: ServiceRef,
        attempts: Vec<Attempt>,
    },
    /// Not forwarded: the client's connection is reset.
    Refuse {
        reason: Refusal,
        /// The host name the decision went by, if any (for the access log).
        host: Option<String>,
    },
}

/// Why an outbound connection is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The egress decision refused it.
    Egress(RefuseReason),
    /// Routed to an egress gateway that no node with an address carries.
    GatewayUnavailable(GatewayTarget),
    /// A Service address with no endpoint that can take the connection (Istio's `UH`).
    NoHealthyUpstream(ServiceRef),
}

impl Refusal {
    /// A short, fixed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Egress(r) => r.label(),
            Self::GatewayUnavailable(_) => "gateway_unavailable",
            Self::NoHealthyUpstream(_) => "no_healthy_upstream",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Egress(r) => r.fmt(f),
            Self::GatewayUnavailable(t) => {
                write!(f, "no node with an address carries egress gateway {t:?}")
            }
            Self::NoHealthyUpstream(s) => {
                write!(f, "service {} has no endpoint that can take it", s.hostname)
            }
        }
    }
}

/// The answer to [`decide`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Decided.
    Plan(Plan),
    /// The answer may depend on the host the client names: peek its HTTP `Host` or TLS SNI,
    /// then ask [`PeekFirst::plan`].
    PeekFirst(PeekFirst),
}

/// Proof that [`decide`] asked for the host; only it makes one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeekFirst(());

impl PeekFirst {
    /// The plan, given what the peek found (`None`: nothing, or no name).
    pub fn plan(
        self,
        state: &MeshState,
        gateway: &GatewayPeer,
        conn: &Connection<'_>,
        peeked: Option<HostHint<'_>>,
    ) -> Plan {
        match in_mesh(state, conn) {
            Ok(plan) => plan,
            Err(source) => egress(state, gateway, conn, source, peeked),
        }
    }
}

/// Decides where `conn` goes; see the module docs for the order.
pub fn decide(state: &MeshState, gateway: &GatewayPeer, conn: &Connection<'_>) -> Decision {
    match in_mesh(state, conn) {
        Ok(plan) => Decision::Plan(plan),
        Err(source) if state.egress.needs_host_hint(source, conn.dst.port()) => {
            Decision::PeekFirst(PeekFirst(()))
        }
        Err(source) => Decision::Plan(egress(state, gateway, conn, source, None)),
    }
}

/// Steps 1, 2 and 4; `Err(source)` when the egress decision is to be asked.
fn in_mesh<'a>(state: &MeshState, conn: &Connection<'a>) -> Result<Plan, &'a Workload> {
    let dst = conn.dst;
    if let Some(w) = state.workload_by_ip(dst.ip()) {
        // HBONE to a mesh pod; a pod outside the mesh, or a mesh pod's own HBONE port
        // (already a tunnel), is reached as it is.
        return Ok(if w.membership.in_mesh() && dst.port() != HBONE_PORT {
            Plan::Hbone {
                dst,
                peer: SocketAddr::new(dst.ip(), HBONE_PORT),
                identity: w.identity(&state.trust_domain),
            }
        } else {
            Plan::Direct { dst }
        });
    }
    if let Some(plan) = service_plan(state, conn) {
        return Ok(plan);
    }
    // Without a known source there is nothing to decide egress with.
    match conn.source {
        Some(source) => Err(source),
        None => Ok(Plan::Direct { dst }),
    }
}

/// Step 3: the egress decision for a connection leaving the mesh.
fn egress(
    state: &MeshState,
    gateway: &GatewayPeer,
    conn: &Connection<'_>,
    source: &Workload,
    peeked: Option<HostHint<'_>>,
) -> Plan {
    let dst = conn.dst;
    // A Host or SNI that is no name (an IP literal) says nothing; the resolved name may.
    let hint = peeked
        .filter(|h| normalise_host(host_name(*h)).is_some())
        .or(conn.resolved_host.map(HostHint::Dns));
    let host = || hint.map(|h| host_name(h).to_owned());
    match state.egress.outbound_decision(
        source,
        dst,
        hint,
        DestinationScope::OutsideMesh,
        conn.resolved,
    ) {
        // Where the ServiceEntry naming the host sends it, which may not be where it was dialled.
        EgressDecision::Passthrough { dst: to, .. } => Plan::Direct { dst: to },
        EgressDecision::Refuse(reason) => Plan::Refuse {
            reason: Refusal::Egress(reason),
            host: host(),
        },
        EgressDecision::ViaGateway(hop) => match gateway_node_addr(state, &hop.target, source, dst)
        {
            Some(addr) => Plan::EgressGateway {
                dst,
                gateway: SocketAddr::new(addr, gateway.port),
                identity: gateway.identity(&state.trust_domain),
            },
            None => Plan::Refuse {
                reason: Refusal::GatewayUnavailable(hop.target),
                host: host(),
            },
        },
    }
}

/// The plan for a connection to a Service address, `None` when `dst` is none: the endpoints
/// to try, or a refusal when none can take it.
fn service_plan(state: &MeshState, conn: &Connection<'_>) -> Option<Plan> {
    let client = conn.source.and_then(|w| {
        w.ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == conn.dst.is_ipv4())
    });
    let balance = conn.balance.unwrap_or(&load_balance::AtRandom);
    Some(
        match load_balance::route(state, conn.source, client, conn.dst, balance)? {
            ServiceRoute::Endpoints { service, attempts } => Plan::Service { service, attempts },
            ServiceRoute::NoHealthyUpstream { service } => Plan::Refuse {
                reason: Refusal::NoHealthyUpstream(service),
                host: None,
            },
        },
    )
}

fn host_name(h: HostHint<'_>) -> &str {
    match h {
        HostHint::Http(n) | HostHint::Tls(n) | HostHint::Dns(n) => n,
    }
}

/// The address of the node that carries `target` for `source`: a stable pick among the nodes
/// that carry it, of `dst`'s family when the node has one.
fn gateway_node_addr(
    state: &MeshState,
    target: &GatewayTarget,
    source: &Workload,
    dst: SocketAddr,
) -> Option<IpAddr> {
    let nodes: Vec<&Node> = state
        .nodes
        .values()
        .filter(|n| state.egress.hosts_target(n, target))
        .collect();
    let node = nodes.get(pick(&source.uid.0, nodes.len()))?;
    node.addresses
        .iter()
        .find(|a| a.is_ipv4() == dst.is_ipv4())
        .or(node.addresses.first())
        .copied()
}

/// A stable pick among `n` for workload `uid` (FNV-1a).
fn pick(uid: &str, n: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % n.max(1) as u64) as usize
}

#[cfg(test)]
mod tests;

//! The choice of endpoint for a connection to a Service address (ztunnel's `load_balance`),
//! without I/O: the candidates of [`Service`], the client's sticky endpoint first, then power
//! of two choices on in-flight connections, at most [`MAX_ATTEMPTS`] of them.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use sluice_common::HBONE_PORT;

use super::{
    Identity, MeshState, Workload, WorkloadUid,
    service::{Endpoint, Service, ServicePort},
};

/// Endpoints tried per connection before the client is reset.
pub const MAX_ATTEMPTS: usize = 3;

/// What the endpoint choice needs from the running proxy: load, stickiness and chance.
pub trait Balance: fmt::Debug + Send + Sync {
    /// Connections open now through this agent to endpoint `ip`.
    fn in_flight(&self, ip: IpAddr) -> usize;
    /// The endpoint `client` last reached `service` (`namespace/name`) through, if that was
    /// less than `timeout` ago.
    fn sticky(&self, client: IpAddr, service: &str, timeout: Duration) -> Option<IpAddr>;
    /// A uniformly random number below `n` (`n > 0`).
    fn random_below(&self, n: usize) -> usize;
}

/// No load and no memory: the choice is at random.
#[derive(Debug)]
pub struct AtRandom;

impl Balance for AtRandom {
    fn in_flight(&self, _: IpAddr) -> usize {
        0
    }
    fn sticky(&self, _: IpAddr, _: &str, _: Duration) -> Option<IpAddr> {
        None
    }
    fn random_below(&self, n: usize) -> usize {
        fastrand::usize(..n.max(1))
    }
}

/// How the proxy reaches one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hop {
    /// HBONE to `peer` (`<endpoint-ip>:15008`), asking for `dst` (`<endpoint-ip>:<targetPort>`).
    Hbone {
        dst: SocketAddr,
        peer: SocketAddr,
        identity: Identity,
    },
    /// Plain TCP from the pod to `dst` (an endpoint outside the mesh).
    Direct { dst: SocketAddr },
}

impl Hop {
    /// `<endpoint-ip>:<targetPort>`.
    pub fn dst(&self) -> SocketAddr {
        match self {
            Self::Hbone { dst, .. } | Self::Direct { dst } => *dst,
        }
    }
}

/// One endpoint to try.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    pub hop: Hop,
    /// The endpoint's pod, when known (for telemetry).
    pub workload: Option<WorkloadUid>,
}

/// The Service a connection was addressed to, for telemetry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRef {
    /// `namespace/name`.
    pub key: String,
    pub name: String,
    pub namespace: String,
    /// Istio's `destination_service`.
    pub hostname: String,
    /// Whether a successful connection should make the client sticky to its endpoint.
    pub affinity: Option<Duration>,
}

impl ServiceRef {
    fn of(k: &str, s: &Service) -> Self {
        Self {
            key: k.to_owned(),
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: s.hostname.clone(),
            affinity: s.affinity,
        }
    }
}

/// Where a connection to a Service address goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceRoute {
    /// These endpoints, in the order to try (at least one, at most [`MAX_ATTEMPTS`]).
    Endpoints {
        service: ServiceRef,
        attempts: Vec<Attempt>,
    },
    /// No endpoint can take it: the client is reset (`UH`).
    NoHealthyUpstream { service: ServiceRef },
}

/// The route for a connection from `source` (`client` its address, which ClientIP affinity
/// goes by) to `dst`, or `None` when `dst` is no Service address.
pub fn route(
    state: &MeshState,
    source: Option<&Workload>,
    client: Option<IpAddr>,
    dst: SocketAddr,
    balance: &dyn Balance,
) -> Option<ServiceRoute> {
    let k = state.services_by_vip.get(&dst.ip())?;
    Some(choose(
        state,
        k,
        dst.port(),
        source,
        client,
        dst.is_ipv4(),
        balance,
    ))
}

/// The route for a request to Service `key` (`namespace/name`) on its `port`, from a client
/// that is no workload of the mesh (the ingress gateway); `None` when there is no such Service.
pub fn route_named(
    state: &MeshState,
    key: &str,
    port: u16,
    client: Option<IpAddr>,
    balance: &dyn Balance,
) -> Option<ServiceRoute> {
    state.services.get(key)?;
    Some(choose(state, key, port, None, client, true, balance))
}

/// Endpoints of Service `k` for `port`, in the order to try.
fn choose(
    state: &MeshState,
    k: &str,
    port: u16,
    source: Option<&Workload>,
    client: Option<IpAddr>,
    v4: bool,
    balance: &dyn Balance,
) -> ServiceRoute {
    let Some(svc) = state.services.get(k) else {
        return ServiceRoute::NoHealthyUpstream {
            service: ServiceRef {
                key: k.to_owned(),
                name: String::new(),
                namespace: String::new(),
                hostname: String::new(),
                affinity: None,
            },
        };
    };
    let service = ServiceRef::of(k, svc);
    let Some(port) = svc.ports.iter().find(|p| p.port == port) else {
        return ServiceRoute::NoHealthyUpstream { service };
    };
    let mut candidates = candidates(state, svc, port, source, v4);
    let mut attempts = Vec::new();
    if let Some(timeout) = svc.affinity
        && let Some(client) = client
        && let Some(ip) = balance.sticky(client, k, timeout)
        && let Some(i) = candidates.iter().position(|c| c.0 == ip)
    {
        attempts.push(candidates.swap_remove(i));
    }
    while attempts.len() < MAX_ATTEMPTS && !candidates.is_empty() {
        let i = two_choices(&candidates, balance);
        attempts.push(candidates.swap_remove(i));
    }
    if attempts.is_empty() {
        return ServiceRoute::NoHealthyUpstream { service };
    }
    let attempts = attempts
        .into_iter()
        .map(|(ip, target, workload)| {
            let dst = SocketAddr::new(ip, target);
            let hop = match workload {
                Some(w) if w.membership.in_mesh() && target != HBONE_PORT => Hop::Hbone {
                    dst,
                    peer: SocketAddr::new(ip, HBONE_PORT),
                    identity: w.identity(&state.trust_domain),
                },
                _ => Hop::Direct { dst },
            };
            Attempt {
                hop,
                workload: workload.map(|w| w.uid.clone()),
            }
        })
        .collect();
    ServiceRoute::Endpoints { service, attempts }
}

/// (endpoint address, target port, pod) of every endpoint that may take a connection to `port`.
fn candidates<'a>(
    state: &'a MeshState,
    svc: &'a Service,
    port: &ServicePort,
    source: Option<&Workload>,
    v4: bool,
) -> Vec<(IpAddr, u16, Option<&'a Workload>)> {
    let usable = |e: &&Endpoint| {
        !svc.node_local || (e.node.is_some() && e.node == source.and_then(|s| s.node.clone()))
    };
    let ready: Vec<&Endpoint> = svc
        .endpoints
        .iter()
        .filter(|e| e.ready)
        .filter(usable)
        .collect();
    // Without a ready endpoint, the serving ones that are shutting down still take new
    // connections (kube-proxy does the same).
    let chosen = if ready.is_empty() {
        svc.endpoints
            .iter()
            .filter(|e| e.serving && e.terminating)
            .filter(usable)
            .collect()
    } else {
        ready
    };
    chosen
        .into_iter()
        .filter_map(|e| {
            let ip = e.ips.iter().copied().find(|ip| ip.is_ipv4() == v4)?;
            let target = e.target_port(port)?;
            let workload = e.workload.as_ref().and_then(|uid| state.workloads.get(uid));
            Some((ip, target, workload))
        })
        .collect()
}

/// Power of two choices: two distinct random candidates, the one with fewer connections open.
fn two_choices<T>(candidates: &[(IpAddr, u16, T)], balance: &dyn Balance) -> usize {
    let n = candidates.len();
    if n == 1 {
        return 0;
    }
    let a = balance.random_below(n);
    let b = (a + 1 + balance.random_below(n - 1)) % n;
    if balance.in_flight(candidates[b].0) < balance.in_flight(candidates[a].0) {
        b
    } else {
        a
    }
}

//! Caps on what a hostile pod or peer can make the proxy hold: connections in flight per pod
//! and for the whole node ([`ConnectionCaps`]), and HBONE connections that have not yet
//! finished their TLS handshake ([`UnauthenticatedGate`]); the HTTP/2 receive window is
//! [`window_budget`](super::window_budget)'s. Each refusal is counted in a metric and logged
//! (at most once per [`LOG_EVERY`] per cap, so an attack cannot flood the log).
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

pub use super::throttle::LOG_EVERY;
use super::{context::PodContext, throttle::LogThrottle};
use crate::admin::Metrics;

/// Which cap refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapScope {
    /// `proxy.maxConnectionsPerPod`.
    Pod,
    /// `proxy.maxConnectionsPerNode`.
    Node,
}

impl CapScope {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            CapScope::Pod => "pod",
            CapScope::Node => "node",
        }
    }
}

impl std::fmt::Display for CapScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// The per-pod and per-node caps on connections in flight.
#[derive(Debug)]
pub struct ConnectionCaps {
    per_pod: usize,
    per_node: usize,
    node: AtomicUsize,
    metrics: Arc<Metrics>,
    log: LogThrottle,
    tproxy_log: LogThrottle,
}

impl ConnectionCaps {
    /// Caps of `per_pod` and `per_node` connections, refusals counted in `metrics`.
    pub fn new(per_pod: usize, per_node: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            per_pod,
            per_node,
            node: AtomicUsize::new(0),
            metrics,
            log: LogThrottle::new(),
            tproxy_log: LogThrottle::new(),
        }
    }

    /// Reports a connection to `pod`'s application at `dst` refused because `sluice_tproxy`
    /// (the proxy's transparent sources, held for the length of a connect) is full: counted,
    /// and logged at most once per [`LOG_EVERY`].
    pub fn transparent_sources_full(&self, pod: &PodContext, dst: std::net::SocketAddr) {
        self.metrics.transparent_sources_full();
        if self.tproxy_log.allow() {
            warn!(pod = %pod.display_name(), %dst, node_connections = self.current(),
                "the sluice_tproxy map is full; refusing connections to applications until entries free up (logged once per 10 s)");
        }
    }

    /// Connections in flight on the node.
    pub fn current(&self) -> usize {
        self.node.load(Ordering::Relaxed)
    }

    /// Takes a slot for one more connection of `pod`, or says which cap is full (counted and
    /// logged). The slot is given back when dropped.
    pub fn admit(self: &Arc<Self>, pod: &Arc<PodContext>) -> Result<ConnectionSlot, CapScope> {
        let mine = &pod.connections.0;
        if mine.fetch_add(1, Ordering::Relaxed) >= self.per_pod {
            mine.fetch_sub(1, Ordering::Relaxed);
            return Err(self.refused(CapScope::Pod, pod, self.per_pod));
        }
        if self.node.fetch_add(1, Ordering::Relaxed) >= self.per_node {
            self.node.fetch_sub(1, Ordering::Relaxed);
            mine.fetch_sub(1, Ordering::Relaxed);
            return Err(self.refused(CapScope::Node, pod, self.per_node));
        }
        Ok(ConnectionSlot {
            caps: self.clone(),
            pod: pod.clone(),
        })
    }

    fn refused(&self, scope: CapScope, pod: &PodContext, limit: usize) -> CapScope {
        self.metrics.connection_cap_hit(scope.label());
        if self.log.allow() {
            warn!(%scope, limit, pod = %pod.display_name(), node_connections = self.current(),
                "connection cap reached; refusing new connections (logged once per 10 s)");
        }
        scope
    }
}

/// One connection's place under the caps; dropping it frees the place.
#[derive(Debug)]
pub struct ConnectionSlot {
    caps: Arc<ConnectionCaps>,
    pod: Arc<PodContext>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.pod.connections.0.fetch_sub(1, Ordering::Relaxed);
        self.caps.node.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The caps on HBONE connections accepted but not yet authenticated (their TLS handshake
/// unfinished): one for the whole node, shared by every pod's 15008 listener and the egress
/// gateway's, and one per source address, so that a single source cannot keep the node's cap
/// full and delay everyone else's handshakes.
#[derive(Debug)]
pub struct UnauthenticatedGate {
    permits: Arc<Semaphore>,
    limit: usize,
    per_source: usize,
    sources: Mutex<HashMap<IpAddr, usize>>,
    metrics: Arc<Metrics>,
    log: LogThrottle,
}

/// A place under [`UnauthenticatedGate`], held until the peer has authenticated.
#[derive(Debug)]
pub struct Unauthenticated {
    _node: OwnedSemaphorePermit,
    source: IpAddr,
    gate: Arc<UnauthenticatedGate>,
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        self.gate.release_source(self.source);
    }
}

/// Which unauthenticated cap refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GateScope {
    Node,
    Source,
}

impl GateScope {
    fn label(self) -> &'static str {
        match self {
            GateScope::Node => "node",
            GateScope::Source => "source",
        }
    }
}

impl UnauthenticatedGate {
    /// At most `limit` unauthenticated connections at once, and `per_source` from one address.
    pub fn new(limit: usize, per_source: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            per_source,
            sources: Mutex::new(HashMap::new()),
            metrics,
            log: LogThrottle::new(),
        }
    }

    /// A place for the connection just accepted from `peer`, or `None` when its source's or
    /// the node's cap is full (counted and logged): the caller closes the connection at once.
    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Option<Unauthenticated> {
        let source = peer.ip();
        {
            let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
            let held = sources.entry(source).or_insert(0);
            if *held >= self.per_source {
                drop(sources);
                return self.refuse(GateScope::Source, peer);
            }
            *held += 1;
        }
        match self.permits.clone().try_acquire_owned() {
            Ok(node) => Some(Unauthenticated {
                _node: node,
                source,
                gate: self.clone(),
            }),
            Err(_) => {
                self.release_source(source);
                self.refuse(GateScope::Node, peer)
            }
        }
    }

    fn release_source(&self, source: IpAddr) {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = sources.get_mut(&source) {
            *held -= 1;
            if *held == 0 {
                sources.remove(&source);
            }
        }
    }

    fn refuse(&self, scope: GateScope, peer: SocketAddr) -> Option<Unauthenticated> {
        self.metrics.hbone_unauthenticated_refused(scope.label());
        if self.log.allow() {
            let limit = match scope {
                GateScope::Node => self.limit,
                GateScope::Source => self.per_source,
            };
            warn!(scope = scope.label(), limit, %peer,
                "too many unauthenticated HBONE connections; closing new ones until handshakes finish or time out (logged once per 10 s)");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_gate_refuses_over_its_limits_and_frees_places() {
        let metrics = Arc::new(Metrics::new());
        let gate = Arc::new(UnauthenticatedGate::new(3, 2, metrics.clone()));
        let one: SocketAddr = "192.0.2.1:1".parse().expect("address");
        let other: SocketAddr = "192.0.2.2:1".parse().expect("address");
        let a = gate.admit(one).expect("first");
        let b = gate.admit(one).expect("second");
        // The source's cap: a third from the same address is refused, another source is not.
        assert!(gate.admit(one).is_none());
        let c = gate.admit(other).expect("another source");
        // The node's cap: full now, whoever asks.
        assert!(gate.admit(other).is_none());
        drop(a);
        assert!(gate.admit(one).is_some());
        let text = metrics.encode().expect("encode");
        for line in [
            "sluice_hbone_unauthenticated_refused_total{scope=\"source\"} 1",
            "sluice_hbone_unauthenticated_refused_total{scope=\"node\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        // Every place given back: no source is left counted.
        drop((b, c));
        assert!(gate.sources.lock().expect("lock").is_empty());
    }
}

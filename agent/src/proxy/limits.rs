//! Caps on what a hostile pod or peer can make the proxy hold: connections in flight per pod
//! and for the whole node ([`ConnectionCaps`]), HBONE connections that have not yet finished
//! their TLS handshake ([`UnauthenticatedGate`]), and the HTTP/2 receive window that served
//! HBONE connections may fill ([`WindowBudget`]). Each refusal is counted in a metric and
//! logged (at most once per [`LOG_EVERY`] per cap, so an attack cannot flood the log).
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

use super::context::PodContext;
use crate::{admin::Metrics, config::MIN_CONNECTION_WINDOW};

/// Shortest time between two log lines about the same cap.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Lets one event through per [`LOG_EVERY`].
#[derive(Debug)]
struct LogThrottle {
    start: Instant,
    /// Milliseconds since `start` before which nothing more is logged (0: log now).
    next_ms: AtomicU64,
}

impl LogThrottle {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            next_ms: AtomicU64::new(0),
        }
    }

    /// True for the first call of each period.
    fn allow(&self) -> bool {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now.saturating_add(LOG_EVERY.as_millis() as u64),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

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

/// The node-wide budget of HTTP/2 receive window for the HBONE connections the agent serves.
///
/// A peer may send as much as the connection window it was granted, and the agent holds those
/// bytes until the application reads them; so peers feeding an application that never reads
/// can make the agent buffer, at most, the sum of the windows granted. A window once advertised
/// cannot be taken back, so each served connection takes its window from this budget for its
/// lifetime. Every connection gets at least HTTP/2's initial [`MIN_CONNECTION_WINDOW`], which
/// the protocol grants before any setting and which is therefore not the budget's to give; the
/// budget pays for what lies above it: the full window while there is room, less when the
/// budget runs low. What the agent can be made to buffer is thus at most the budget plus
/// 64 KiB per served connection.
#[derive(Debug)]
pub struct WindowBudget {
    bytes: Arc<Semaphore>,
    total: usize,
    metrics: Arc<Metrics>,
    log: LogThrottle,
}

/// A connection's share of the [`WindowBudget`], given back when dropped.
#[derive(Debug)]
pub struct WindowGrant {
    _bytes: OwnedSemaphorePermit,
    window: u32,
    budget: Arc<WindowBudget>,
}

impl WindowGrant {
    /// The connection window to advertise.
    pub fn window(&self) -> u32 {
        self.window
    }
}

impl Drop for WindowGrant {
    fn drop(&mut self) {
        // The permit is released after this body; count it as given back already.
        self.budget
            .publish((self.window - MIN_CONNECTION_WINDOW) as usize);
    }
}

impl WindowBudget {
    /// A budget of `total` bytes above each connection's initial window.
    pub fn new(total: usize, metrics: Arc<Metrics>) -> Self {
        let total = total.min(Semaphore::MAX_PERMITS);
        Self {
            bytes: Arc::new(Semaphore::new(total)),
            total,
            metrics,
            log: LogThrottle::new(),
        }
    }

    /// Bytes above the initial windows granted to connections now.
    pub fn granted(&self) -> usize {
        self.total - self.bytes.available_permits()
    }

    fn publish(&self, returning: usize) {
        self.metrics
            .set_window_budget_granted(self.granted().saturating_sub(returning));
    }

    /// A window of up to `want` bytes (at least [`MIN_CONNECTION_WINDOW`]) for a connection
    /// just authenticated from `peer`: all of it while the budget allows, else what is left.
    /// A reduced window is counted and logged.
    pub fn grant(self: &Arc<Self>, want: u32, peer: SocketAddr) -> WindowGrant {
        let want = want.max(MIN_CONNECTION_WINDOW);
        let mut above = want - MIN_CONNECTION_WINDOW;
        // Another connection may take bytes between the look and the take: look again, and in
        // the end settle for the initial window alone (zero permits always succeed).
        let permit = loop {
            if let Ok(permit) = self.bytes.clone().try_acquire_many_owned(above) {
                break permit;
            }
            above = u32::try_from(self.bytes.available_permits())
                .unwrap_or(u32::MAX)
                .min(above);
        };
        let window = MIN_CONNECTION_WINDOW + above;
        if window < want {
            self.short(peer, want, window);
        }
        let grant = WindowGrant {
            _bytes: permit,
            window,
            budget: self.clone(),
        };
        self.publish(0);
        grant
    }

    fn short(&self, peer: SocketAddr, want: u32, window: u32) {
        self.metrics.window_budget_short();
        if self.log.allow() {
            warn!(%peer, want, window, budget = self.total, granted = self.granted(),
                "HTTP/2 window budget for served HBONE connections is short; new connections get smaller windows (spec.hbone.windowBudgetBytes; logged once per 10 s)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_lets_one_line_through_per_period() {
        let t = LogThrottle::new();
        assert!(t.allow());
        assert!(!t.allow());
        assert!(!t.allow());
    }

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

    #[test]
    fn the_window_budget_shrinks_windows_and_takes_them_back() {
        let metrics = Arc::new(Metrics::new());
        let peer: SocketAddr = "192.0.2.1:1".parse().expect("address");
        let mib: u32 = 1 << 20;
        let floor = MIN_CONNECTION_WINDOW;
        let budget = Arc::new(WindowBudget::new(3 * mib as usize, metrics.clone()));
        // 2 MiB asked: the budget pays for what lies above the initial window.
        let full = budget.grant(2 * mib, peer);
        assert_eq!(full.window(), 2 * mib);
        assert_eq!(budget.granted(), (2 * mib - floor) as usize);
        // What is left (1 MiB + one initial window) goes to the next connection.
        let reduced = budget.grant(2 * mib, peer);
        assert_eq!(reduced.window(), floor + mib + floor);
        assert_eq!(budget.granted(), 3 * mib as usize);
        // Spent: the initial window alone, which the protocol grants anyway.
        let least = budget.grant(2 * mib, peer);
        assert_eq!(least.window(), floor);
        let text = metrics.encode().expect("encode");
        for line in [
            "sluice_hbone_window_budget_granted_bytes 3145728",
            "sluice_hbone_window_budget_reduced_total 2",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        drop(full);
        assert_eq!(budget.granted(), (mib + floor) as usize);
        let text = metrics.encode().expect("encode");
        let expect = format!("sluice_hbone_window_budget_granted_bytes {}", mib + floor);
        assert!(text.contains(&expect), "{expect} missing:\n{text}");
        // A request below HTTP/2's initial connection window is raised to it, at no cost.
        assert_eq!(budget.grant(1, peer).window(), floor);
        assert_eq!(budget.granted(), (mib + floor) as usize);
    }
}

//! Statistics the admin room exports and other rooms fill: they hold a shared handle
//! (from [`Metrics`](super::Metrics)) and count into it; the admin server reads it at scrape time.
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of a pool, for metrics. Gauges go up and down; totals only up.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Completed TLS handshakes (total).
    pub handshakes: AtomicU64,
    /// Failed connection attempts: TCP, TLS, HTTP/2 preface or timeout (total).
    pub dial_failures: AtomicU64,
    /// Open pooled connections (gauge).
    pub connections: AtomicU64,
    /// Streams in use or being opened (gauge).
    pub active_streams: AtomicU64,
    /// Streams answered with 200 (total).
    pub streams_opened: AtomicU64,
    /// Streams answered with another status or failed before an answer (total).
    pub streams_failed: AtomicU64,
}

/// A copy of [`PoolStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatsSnapshot {
    pub handshakes: u64,
    pub dial_failures: u64,
    pub connections: u64,
    pub active_streams: u64,
    pub streams_opened: u64,
    pub streams_failed: u64,
}

impl PoolStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> PoolStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PoolStatsSnapshot {
            handshakes: get(&self.handshakes),
            dial_failures: get(&self.dial_failures),
            connections: get(&self.connections),
            active_streams: get(&self.active_streams),
            streams_opened: get(&self.streams_opened),
            streams_failed: get(&self.streams_failed),
        }
    }
}

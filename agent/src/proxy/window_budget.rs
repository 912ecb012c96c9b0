//! The node-wide budget of HTTP/2 receive window for the HBONE connections the agent serves:
//! what authenticated peers feeding an application that does not read can make it hold.
use std::{net::SocketAddr, sync::Arc};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

use super::throttle::LogThrottle;
use crate::{admin::Metrics, config::MIN_CONNECTION_WINDOW};

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

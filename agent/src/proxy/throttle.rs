//! Log lines about refusals that an attacker can trigger at will: one per period, so an attack
//! cannot flood the log.
use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// Shortest time between two log lines about the same cap.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Lets one event through per [`LOG_EVERY`].
#[derive(Debug)]
pub(crate) struct LogThrottle {
    start: Instant,
    /// Milliseconds since `start` before which nothing more is logged (0: log now).
    next_ms: AtomicU64,
}

impl LogThrottle {
    pub(crate) fn new() -> Self {
        Self {
            start: Instant::now(),
            next_ms: AtomicU64::new(0),
        }
    }

    /// True for the first call of each period.
    pub(crate) fn allow(&self) -> bool {
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
}

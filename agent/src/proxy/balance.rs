//! The running side of choosing a Service endpoint: connections in flight per endpoint (for
//! power of two choices) and `sessionAffinity: ClientIP` memory, shared by every pod's outbound
//! proxy on this node. The choice itself is [`crate::state::load_balance::route`].
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::state::load_balance::Balance;

/// Affinity entries kept before expired ones are swept.
const STICKY_SWEEP_AT: usize = 4096;

/// Load and stickiness of Service endpoints, as this agent sees them.
#[derive(Debug, Default)]
pub struct Balancer {
    in_flight: Mutex<HashMap<IpAddr, usize>>,
    /// (client, service key) → (endpoint, until).
    sticky: Mutex<HashMap<(IpAddr, String), (IpAddr, Instant)>>,
}

impl Balancer {
    /// Counts a connection to `endpoint` until the guard drops.
    pub fn open(self: &Arc<Self>, endpoint: IpAddr) -> InFlight {
        if let Ok(mut m) = self.in_flight.lock() {
            *m.entry(endpoint).or_default() += 1;
        }
        InFlight {
            balancer: self.clone(),
            endpoint,
        }
    }

    /// Remembers that `client` reached `service` through `endpoint`, for `timeout`.
    pub fn remember(&self, client: IpAddr, service: &str, endpoint: IpAddr, timeout: Duration) {
        let Ok(mut m) = self.sticky.lock() else {
            return;
        };
        let now = Instant::now();
        if m.len() >= STICKY_SWEEP_AT {
            m.retain(|_, (_, until)| *until > now);
        }
        m.insert((client, service.to_owned()), (endpoint, now + timeout));
    }
}

impl Balance for Balancer {
    fn in_flight(&self, ip: IpAddr) -> usize {
        self.in_flight
            .lock()
            .map(|m| m.get(&ip).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn sticky(&self, client: IpAddr, service: &str, _timeout: Duration) -> Option<IpAddr> {
        let m = self.sticky.lock().ok()?;
        let (endpoint, until) = m.get(&(client, service.to_owned()))?;
        (*until > Instant::now()).then_some(*endpoint)
    }

    fn random_below(&self, n: usize) -> usize {
        fastrand::usize(..n.max(1))
    }
}

/// One connection counted against its endpoint.
#[derive(Debug)]
pub struct InFlight {
    balancer: Arc<Balancer>,
    endpoint: IpAddr,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut m) = self.balancer.in_flight.lock()
            && let Some(n) = m.get_mut(&self.endpoint)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.endpoint);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_counts_follow_the_guards() {
        let b = Arc::new(Balancer::default());
        let ip: IpAddr = "10.0.2.2".parse().unwrap();
        let one = b.open(ip);
        let two = b.open(ip);
        assert_eq!(b.in_flight(ip), 2);
        drop(one);
        assert_eq!(b.in_flight(ip), 1);
        drop(two);
        assert_eq!(b.in_flight(ip), 0);
    }

    #[test]
    fn affinity_expires() {
        let b = Balancer::default();
        let (c, e): (IpAddr, IpAddr) = ("10.0.1.2".parse().unwrap(), "10.0.2.2".parse().unwrap());
        b.remember(c, "mesh/web", e, Duration::from_secs(60));
        assert_eq!(b.sticky(c, "mesh/web", Duration::ZERO), Some(e));
        assert_eq!(b.sticky(c, "mesh/other", Duration::ZERO), None);
        b.remember(c, "mesh/web", e, Duration::ZERO);
        assert_eq!(b.sticky(c, "mesh/web", Duration::ZERO), None);
    }
}

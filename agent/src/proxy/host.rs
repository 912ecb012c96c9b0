//! The node's own addresses. Plaintext from them to a pod (the kubelet's health probes, and
//! anything else the host itself sends) is not held to PeerAuthentication or
//! AuthorizationPolicy: a STRICT pod must still pass its probes. Istio's ambient mode exempts
//! the same traffic (its CNI marks host-originated connections with a link-local source).
//! A pod cannot borrow these addresses for TCP: the replies would be routed to the host.
use std::{
    collections::HashSet,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use tracing::warn;

/// How long a read of the host's addresses is trusted.
const REFRESH: Duration = Duration::from_secs(5);

/// The addresses of the agent's own (host) network namespace, re-read every few seconds.
#[derive(Debug)]
pub struct HostAddresses {
    enabled: bool,
    cache: Mutex<Option<(Instant, HashSet<IpAddr>)>>,
}

impl HostAddresses {
    /// `enabled: false` makes [`HostAddresses::exempts`] always false (host traffic is then
    /// judged like any other plaintext).
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            cache: Mutex::new(None),
        }
    }

    /// Whether plaintext from `ip` is the host's own and skips the pod's policies. Call from
    /// the agent's own network namespace.
    pub fn exempts(&self, ip: IpAddr) -> bool {
        // Loopback is never the node: inside a pod it is the pod itself (and where the
        // agent's own listeners are).
        if !self.enabled || ip.is_loopback() {
            return false;
        }
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fresh = cache.as_ref().is_some_and(|(at, _)| at.elapsed() < REFRESH);
        if !fresh {
            match read() {
                Ok(set) => *cache = Some((Instant::now(), set)),
                Err(e) => warn!(error = %e, "reading the node's addresses"),
            }
        }
        cache.as_ref().is_some_and(|(_, set)| set.contains(&ip))
    }
}

fn read() -> nix::Result<HashSet<IpAddr>> {
    let mut set = HashSet::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        let Some(addr) = ifa.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            set.insert(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            set.insert(IpAddr::V6(v6.ip()));
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_never_the_node() {
        let on = HostAddresses::new(true);
        assert!(!on.exempts(IpAddr::from([127, 0, 0, 1])));
        assert!(!on.exempts(std::net::Ipv6Addr::LOCALHOST.into()));
        assert!(!on.exempts(IpAddr::from([192, 0, 2, 77])));
        assert!(!HostAddresses::new(false).exempts(IpAddr::from([127, 0, 0, 1])));
    }
}

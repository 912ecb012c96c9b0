//! The node's own connections. Plaintext that the node itself makes to a pod (the kubelet's
//! health probes, hostNetwork processes) is not held to PeerAuthentication or
//! AuthorizationPolicy: a STRICT pod must still pass its probes. Istio's ambient mode exempts
//! the same traffic (its CNI rewrites the source of connections made by the node's own sockets
//! to 169.254.7.127).
//!
//! A node address as the source is not enough: traffic the node only forwards and masquerades
//! (a NodePort with `externalTrafficPolicy: Cluster`, hairpin, `--masquerade-all`) carries one
//! too. So the exemption also asks the kernel ([`NodeSockets`]) whether a socket of the node's
//! network namespace holds the connection; a forwarded one has none and is held to policy.
use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use tracing::warn;

use super::node_socket::NodeSockets;

/// How long a read of the host's addresses is trusted.
const REFRESH: Duration = Duration::from_secs(5);

/// The addresses of the agent's own (host) network namespace, re-read every few seconds, and
/// its sockets.
#[derive(Debug)]
pub struct HostAddresses {
    enabled: bool,
    cache: Mutex<Option<(Instant, HashSet<IpAddr>)>>,
    /// `None` when the node's sockets cannot be asked about: nothing is exempt then.
    sockets: Option<NodeSockets>,
}

impl HostAddresses {
    /// `enabled: false` makes [`HostAddresses::exempts`] always false (host traffic is then
    /// judged like any other plaintext). Call from the agent's own network namespace.
    pub fn new(enabled: bool) -> Self {
        let sockets = if enabled {
            NodeSockets::open()
                .map_err(|e| {
                    warn!(error = %e, "sock_diag unavailable: the node's own traffic is held to pod policies like any other");
                })
                .ok()
        } else {
            None
        };
        Self {
            enabled,
            cache: Mutex::new(None),
            sockets,
        }
    }

    /// Whether plaintext from `peer` to a pod's `local` address is the node's own and skips the
    /// pod's policies: from a node address, and made by a socket of the node's namespace.
    pub fn exempts(&self, peer: SocketAddr, local: SocketAddr) -> bool {
        if !self.has_address(peer.ip()) {
            return false;
        }
        let Some(sockets) = &self.sockets else {
            return false;
        };
        match sockets.holds(peer, local) {
            Ok(held) => held,
            Err(e) => {
                warn!(%peer, %local, error = %e, "asking the kernel for the node's socket; not exempt");
                false
            }
        }
    }

    /// Whether `ip` is one of the node's own (non-loopback) addresses.
    fn has_address(&self, ip: IpAddr) -> bool {
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
        assert!(!on.has_address(IpAddr::from([127, 0, 0, 1])));
        assert!(!on.has_address(std::net::Ipv6Addr::LOCALHOST.into()));
        assert!(!on.has_address(IpAddr::from([192, 0, 2, 77])));
        assert!(!HostAddresses::new(false).has_address(IpAddr::from([127, 0, 0, 1])));
        // A loopback connection this process made is still not "the node".
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let server = listener.local_addr().expect("addr");
        let client = std::net::TcpStream::connect(server).expect("connect");
        let local = client.local_addr().expect("local");
        assert!(!on.exempts(local, server));
    }
}

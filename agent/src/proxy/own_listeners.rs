//! The agent's own listeners inside a pod (loopback 15001 and 15006, the pod's addresses on
//! 15008): the proxy never proxies to them and never dials them, so a pod cannot make the agent
//! connect to itself, level after level, until it runs out of file descriptors.
use std::net::SocketAddr;

use sluice_common::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};

/// Ports the agent listens on inside every enrolled pod.
pub const AGENT_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT];

/// Why a connection accepted on the inbound listener, addressed to `dst`, is not for the pod's
/// application: steered connections carry one of the pod's own addresses (`pod_ips`), never
/// loopback, and never one of the agent's ports.
pub fn inbound_refusal(pod_ips: &[std::net::IpAddr], dst: SocketAddr) -> Option<String> {
    if !pod_ips.contains(&dst.ip()) || AGENT_PORTS.contains(&dst.port()) {
        return Some(format!(
            "{dst} is the agent's own listener, not an application address of the pod"
        ));
    }
    None
}

/// Why the proxy must not dial `dst` from inside a pod: loopback (and the unspecified address,
/// which reaches it) is where the agent's own listeners are; `app` says the dial is towards the
/// pod's application, where the agent's ports are its own listeners on every address.
pub fn dial_refusal(dst: SocketAddr, app: bool) -> Option<String> {
    if dst.ip().is_loopback() || dst.ip().is_unspecified() {
        return Some(format!(
            "{dst} is loopback: the agent's own listeners live there, and it never dials them"
        ));
    }
    if app && AGENT_PORTS.contains(&dst.port()) {
        return Some(format!(
            "{dst} is the agent's own listener; the agent never dials it"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_agent_ports_are_refused() {
        let pod = ["10.0.1.2".parse().expect("ip")];
        let at = |s: &str| s.parse::<SocketAddr>().expect("address");
        assert!(inbound_refusal(&pod, at("127.0.0.1:15006")).is_some());
        assert!(inbound_refusal(&pod, at("[::1]:15006")).is_some());
        assert!(inbound_refusal(&pod, at("10.0.1.2:15001")).is_some());
        assert!(inbound_refusal(&pod, at("10.0.1.3:8080")).is_some());
        assert!(inbound_refusal(&pod, at("10.0.1.2:8080")).is_none());
        assert!(dial_refusal(at("127.0.0.1:8080"), false).is_some());
        assert!(dial_refusal(at("0.0.0.0:8080"), false).is_some());
        assert!(dial_refusal(at("10.0.1.2:15008"), true).is_some());
        assert!(dial_refusal(at("10.0.1.2:15008"), false).is_none());
        assert!(dial_refusal(at("10.0.1.2:8080"), true).is_none());
    }
}

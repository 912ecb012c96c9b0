//! `spec.proxy`: caps on the connections the node proxy holds at once, so that one pod cannot
//! take every file descriptor of the agent.
use std::num::NonZeroUsize;

use serde::{Deserialize, Serialize};

/// Default cap on connections in flight for one pod.
pub const DEFAULT_MAX_CONNECTIONS_PER_POD: usize = 4096;
/// Default cap on connections in flight on the node.
pub const DEFAULT_MAX_CONNECTIONS_PER_NODE: usize = 16384;
/// Default time a connection of a pod unknown to MeshState waits for it.
pub const DEFAULT_UNKNOWN_WORKLOAD_HOLD_MS: u64 = 3000;

/// Caps on connections in flight. A connection counts from accept to close: one captured
/// outbound connection for its source pod, one inbound plaintext connection or HBONE stream for
/// its destination pod. Beyond a cap, new connections are reset (metric
/// `sluice_proxy_connection_limit_refusals_total{scope}` and a log line).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// Connections in flight for one pod at most.
    #[serde(default = "default_per_pod")]
    pub max_connections_per_pod: NonZeroUsize,
    /// Connections in flight on the node at most (each takes two file descriptors; the agent
    /// lowers this at start when its descriptor limit could not hold them).
    #[serde(default = "default_per_node")]
    pub max_connections_per_node: NonZeroUsize,
    /// A connection from or to a pod that MeshState does not know (yet: between CNI ADD and the
    /// pod reaching the agent, or while the API server is away) waits this long for it, then is
    /// refused; it is never let through undecided.
    #[serde(default = "default_unknown_hold_ms")]
    pub unknown_workload_hold_ms: u64,
}

fn default_unknown_hold_ms() -> u64 {
    DEFAULT_UNKNOWN_WORKLOAD_HOLD_MS
}

fn default_per_pod() -> NonZeroUsize {
    NonZeroUsize::new(DEFAULT_MAX_CONNECTIONS_PER_POD).unwrap_or(NonZeroUsize::MIN)
}

fn default_per_node() -> NonZeroUsize {
    NonZeroUsize::new(DEFAULT_MAX_CONNECTIONS_PER_NODE).unwrap_or(NonZeroUsize::MIN)
}

impl ProxyConfig {
    /// [`ProxyConfig::unknown_workload_hold_ms`] as a duration.
    pub fn unknown_workload_hold(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.unknown_workload_hold_ms)
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            max_connections_per_pod: default_per_pod(),
            max_connections_per_node: default_per_node(),
            unknown_workload_hold_ms: default_unknown_hold_ms(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_zero_is_refused() {
        let c: ProxyConfig = serde_yaml::from_str("{}").expect("defaults");
        assert_eq!(c, ProxyConfig::default());
        assert_eq!(c.max_connections_per_pod.get(), 4096);
        let c: ProxyConfig = serde_yaml::from_str("{maxConnectionsPerPod: 100}").expect("set");
        assert_eq!(c.max_connections_per_pod.get(), 100);
        assert!(serde_yaml::from_str::<ProxyConfig>("{maxConnectionsPerPod: 0}").is_err());
    }
}

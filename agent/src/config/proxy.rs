//! `spec.proxy`: caps on the connections the node proxy holds at once, so that one pod cannot
//! take every file descriptor of the agent.
use std::num::NonZeroUsize;

use serde::{Deserialize, Serialize};

/// Default cap on connections in flight for one pod.
pub const DEFAULT_MAX_CONNECTIONS_PER_POD: usize = 4096;
/// Default cap on connections in flight on the node.
pub const DEFAULT_MAX_CONNECTIONS_PER_NODE: usize = 16384;

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
}

fn default_per_pod() -> NonZeroUsize {
    NonZeroUsize::new(DEFAULT_MAX_CONNECTIONS_PER_POD).unwrap_or(NonZeroUsize::MIN)
}

fn default_per_node() -> NonZeroUsize {
    NonZeroUsize::new(DEFAULT_MAX_CONNECTIONS_PER_NODE).unwrap_or(NonZeroUsize::MIN)
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            max_connections_per_pod: default_per_pod(),
            max_connections_per_node: default_per_node(),
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

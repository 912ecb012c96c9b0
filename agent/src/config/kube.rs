//! `spec.kube`: reading the mesh from a Kubernetes API server.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `spec.kube` of the AgentConfig.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeConfig {
    /// Read the mesh from the API server (the file's own resources are added to it).
    #[serde(default)]
    pub enabled: bool,
    /// A kubeconfig file; unset: `KUBECONFIG`, `~/.kube/config`, or the in-cluster service
    /// account, in kube's usual order.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// How long the rebuild waits after a change for more to arrive.
    #[serde(default = "defaults::debounce_ms")]
    pub debounce_ms: u64,
    /// Write status conditions back (by one elected agent).
    #[serde(default = "defaults::yes")]
    pub write_status: bool,
    /// Namespace of the status writer's Lease; unset: `POD_NAMESPACE`, else `sluice-system`.
    #[serde(default)]
    pub lease_namespace: Option<String>,
    /// GatewayClass whose Gateways (and their HTTPRoutes) Sluice reports status for.
    #[serde(default = "defaults::gateway_class_name")]
    pub gateway_class_name: String,
    /// Find the network namespaces of this node's mesh pods under /proc and enroll them
    /// (for clusters where the CNI plugin is not installed, or pods that predate it).
    #[serde(default = "defaults::yes")]
    pub discover_sandboxes: bool,
}

mod defaults {
    pub fn yes() -> bool {
        true
    }
    pub fn debounce_ms() -> u64 {
        10
    }
    pub fn gateway_class_name() -> String {
        "sluice".into()
    }
}

impl Default for KubeConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("defaults deserialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_names() {
        let c = KubeConfig::default();
        assert!(!c.enabled);
        assert!(c.write_status && c.discover_sandboxes);
        assert_eq!(c.debounce_ms, 10);
        let c: KubeConfig =
            serde_yaml::from_str("enabled: true\nkubeconfig: /k\ngatewayClassName: x").unwrap();
        assert_eq!(c.kubeconfig.as_deref(), Some(std::path::Path::new("/k")));
        assert_eq!(c.gateway_class_name, "x");
        assert!(serde_yaml::from_str::<KubeConfig>("enabld: true").is_err());
    }
}

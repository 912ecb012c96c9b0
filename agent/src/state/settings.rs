//! What shapes how resources become state, besides the resources themselves.
use std::collections::BTreeMap;

use serde::Serialize;

/// Settings that shape how resources become state (not resources themselves).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MeshSettings {
    /// SPIFFE trust domain of this mesh.
    pub trust_domain: String,
    /// Istio's root namespace: mesh-wide policies live there.
    pub root_namespace: String,
    /// Namespace and name of the mesh config ConfigMap (`outboundTrafficPolicy`); Istio's
    /// default (`istio` in the root namespace) when unset.
    pub mesh_config: Option<(String, String)>,
    /// Egress prefixes for StaticGatewayConfigurations (`namespace/name` → prefix), used when
    /// an SGC's `status.egressIpPrefix` is empty.
    pub static_gateway_prefixes: BTreeMap<String, ipnet::IpNet>,
}

impl Default for MeshSettings {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            mesh_config: None,
            static_gateway_prefixes: BTreeMap::new(),
        }
    }
}

//! Egress on gateway nodes: the addresses of a static egress prefix, and programming them
//! (addresses, policy rules, routes) over netlink.
//!
//! The decisions themselves (which connection goes where) are pure and live in
//! [`crate::state::egress`]; this module applies their node-local side effects.
pub mod dns;
pub mod netlink;
pub mod pinning;
pub mod prefix;

pub use netlink::{
    AddressHome, NetlinkError, PinnedPrefix, PinningConfig, PrefixError, PrefixPinner,
    ReconcileReport, Uplink, discover_uplink,
};
pub use prefix::{pool, source_address};

use crate::state::{Node, egress::Egress};

/// The prefixes `node` should pin: every StaticGatewayConfiguration placed on it whose prefix is
/// known.
pub fn pinned_prefixes_for(egress: &Egress, node: &Node) -> Vec<PinnedPrefix> {
    egress
        .static_gateways
        .configs
        .values()
        .filter(|g| g.hosted_on(node))
        .filter_map(PinnedPrefix::from_static_gateway)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        resources::ResourceSet,
        state::{MeshSettings, build},
    };

    #[test]
    fn a_node_pins_the_prefixes_of_its_pool_only() {
        let yaml = r#"
apiVersion: egressgateway.kubernetes.azure.com/v1alpha1
kind: StaticGatewayConfiguration
metadata: {name: here, namespace: a}
spec: {gatewayNodepoolName: gwpool, excludeCidrs: [10.0.0.0/8]}
status: {egressIpPrefix: 203.0.113.0/28}
---
apiVersion: egressgateway.kubernetes.azure.com/v1alpha1
kind: StaticGatewayConfiguration
metadata: {name: elsewhere, namespace: a}
spec: {gatewayNodepoolName: otherpool}
status: {egressIpPrefix: 203.0.113.16/28}
---
apiVersion: egressgateway.kubernetes.azure.com/v1alpha1
kind: StaticGatewayConfiguration
metadata: {name: no-prefix-yet, namespace: a}
spec: {gatewayNodepoolName: gwpool}
"#;
        let mut set = ResourceSet::default();
        for (i, doc) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
            let value = serde::Deserialize::deserialize(doc).expect("yaml");
            set.add_document(i, value).expect("known kind");
        }
        let state = build(&set, &MeshSettings::default()).state;
        let node = Node {
            name: "gw-0".into(),
            addresses: vec![],
            labels: [(
                crate::state::egress::static_gateway::AGENTPOOL_LABEL.to_owned(),
                "gwpool".to_owned(),
            )]
            .into(),
        };
        let pins = pinned_prefixes_for(&state.egress, &node);
        assert_eq!(pins.len(), 1, "{pins:?}");
        assert_eq!(pins[0].name, "a/here");
        assert_eq!(pins[0].prefix, "203.0.113.0/28".parse().expect("net"));
        assert_eq!(
            pins[0].exclude_cidrs,
            vec!["10.0.0.0/8".parse().expect("net")]
        );
    }
}

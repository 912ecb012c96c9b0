//! The kinds the kube source watches, and what it does with each: one table that the watchers,
//! the status writer and the RBAC check (`sluice manifests --check`) all read, so the ClusterRole
//! cannot drift from the code.

/// Whether a kind is namespaced or cluster-scoped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Cluster,
    Namespaced,
}

/// How far the watch reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Every object of the kind, in every namespace.
    All,
    /// One named object (the mesh config ConfigMap): a `metadata.name` field selector in one
    /// namespace.
    OneObject,
}

/// One watched kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchedKind {
    /// API group; empty for core.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// Resource name in URLs and RBAC rules.
    pub plural: &'static str,
    pub scope: Scope,
    pub reach: Reach,
    /// A custom resource: the cluster may lack its CRD, which must not stop the other watches.
    pub custom: bool,
    /// Sluice writes this kind's `status` subresource (server-side apply).
    pub writes_status: bool,
}

impl WatchedKind {
    /// `Kind.group` (or `Kind` for core), as [`Rejection::kind`](crate::state::Rejection) names it.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_owned()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    /// `group/version`, or `version` for core.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The RBAC verbs the source uses on the kind itself.
    pub fn verbs(&self) -> &'static [&'static str] {
        &["list", "watch"]
    }
}

const fn core(kind: &'static str, plural: &'static str, scope: Scope, reach: Reach) -> WatchedKind {
    WatchedKind {
        group: "",
        version: "v1",
        kind,
        plural,
        scope,
        reach,
        custom: false,
        writes_status: false,
    }
}

const fn custom(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    writes_status: bool,
) -> WatchedKind {
    WatchedKind {
        group,
        version,
        kind,
        plural,
        scope: Scope::Namespaced,
        reach: Reach::All,
        custom: true,
        writes_status,
    }
}

pub const NAMESPACES: usize = 0;
pub const PODS: usize = 1;
pub const SERVICES: usize = 2;
pub const NODES: usize = 3;
pub const MESH_CONFIG: usize = 4;
pub const SERVICE_ENTRIES: usize = 5;
pub const SIDECARS: usize = 6;
pub const ISTIO_GATEWAYS: usize = 7;
pub const VIRTUAL_SERVICES: usize = 8;
pub const DESTINATION_RULES: usize = 9;
pub const PEER_AUTHENTICATIONS: usize = 10;
pub const AUTHORIZATION_POLICIES: usize = 11;
pub const STATIC_GATEWAY_CONFIGURATIONS: usize = 12;
pub const GATEWAYS: usize = 13;
pub const HTTP_ROUTES: usize = 14;

/// Every kind the kube source watches, indexed by the constants above.
pub const WATCHED: [WatchedKind; 15] = [
    core("Namespace", "namespaces", Scope::Cluster, Reach::All),
    core("Pod", "pods", Scope::Namespaced, Reach::All),
    core("Service", "services", Scope::Namespaced, Reach::All),
    core("Node", "nodes", Scope::Cluster, Reach::All),
    core(
        "ConfigMap",
        "configmaps",
        Scope::Namespaced,
        Reach::OneObject,
    ),
    custom(
        "networking.istio.io",
        "v1",
        "ServiceEntry",
        "serviceentries",
        true,
    ),
    custom("networking.istio.io", "v1", "Sidecar", "sidecars", true),
    custom("networking.istio.io", "v1", "Gateway", "gateways", true),
    custom(
        "networking.istio.io",
        "v1",
        "VirtualService",
        "virtualservices",
        true,
    ),
    custom(
        "networking.istio.io",
        "v1",
        "DestinationRule",
        "destinationrules",
        true,
    ),
    custom(
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        "peerauthentications",
        true,
    ),
    custom(
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
        true,
    ),
    custom(
        "egressgateway.kubernetes.azure.com",
        "v1alpha1",
        "StaticGatewayConfiguration",
        "staticgatewayconfigurations",
        true,
    ),
    custom(
        "gateway.networking.k8s.io",
        "v1",
        "Gateway",
        "gateways",
        true,
    ),
    custom(
        "gateway.networking.k8s.io",
        "v1",
        "HTTPRoute",
        "httproutes",
        true,
    ),
];

/// The watched kind named `Kind.group` (or `Kind` for core).
pub fn by_qualified_name(name: &str) -> Option<(usize, &'static WatchedKind)> {
    WATCHED
        .iter()
        .enumerate()
        .find(|(_, k)| k.qualified() == name)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Service};
    use kube::Resource;

    use super::*;
    use crate::resources::{gateway_api, istio_networking, istio_security, static_egress};

    fn check<K: Resource<DynamicType = ()>>(index: usize) {
        let k = &WATCHED[index];
        assert_eq!(
            (k.group, k.version, k.kind, k.plural),
            (
                K::group(&()).as_ref(),
                K::version(&()).as_ref(),
                K::kind(&()).as_ref(),
                K::plural(&()).as_ref()
            ),
            "table entry {index}"
        );
    }

    #[test]
    fn table_matches_the_rust_types() {
        check::<Namespace>(NAMESPACES);
        check::<Pod>(PODS);
        check::<Service>(SERVICES);
        check::<Node>(NODES);
        check::<ConfigMap>(MESH_CONFIG);
        check::<istio_networking::ServiceEntry>(SERVICE_ENTRIES);
        check::<istio_networking::Sidecar>(SIDECARS);
        check::<istio_networking::Gateway>(ISTIO_GATEWAYS);
        check::<istio_networking::VirtualService>(VIRTUAL_SERVICES);
        check::<istio_networking::DestinationRule>(DESTINATION_RULES);
        check::<istio_security::PeerAuthentication>(PEER_AUTHENTICATIONS);
        check::<istio_security::AuthorizationPolicy>(AUTHORIZATION_POLICIES);
        check::<static_egress::StaticGatewayConfiguration>(STATIC_GATEWAY_CONFIGURATIONS);
        check::<gateway_api::Gateway>(GATEWAYS);
        check::<gateway_api::HTTPRoute>(HTTP_ROUTES);
    }

    #[test]
    fn qualified_names_are_unique_and_found() {
        for (i, k) in WATCHED.iter().enumerate() {
            assert_eq!(by_qualified_name(&k.qualified()).map(|(j, _)| j), Some(i));
        }
        assert_eq!(
            WATCHED[ISTIO_GATEWAYS].qualified(),
            "Gateway.networking.istio.io"
        );
        assert_eq!(WATCHED[PODS].qualified(), "Pod");
    }
}

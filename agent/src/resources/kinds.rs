//! The one registry of the kinds Sluice reads.
//!
//! Each kind is declared once, in the [`watched_kinds!`] list at the end of this file. From that
//! line come its [`ResourceSet`] field, its [`WatchedKind`] impl (index, reach, status, the API
//! versions a YAML file may use, what the watch trims) and its place in [`for_each_kind`]. The
//! kube watchers, merging, the YAML reader, LastGood and the status writer all walk the kinds
//! through [`for_each_kind`] or find one by name with [`by_qualified_name`], so none of them
//! names a kind again. Names come from [`kube::Resource`], never from literals.
use std::fmt::Debug;

use k8s_openapi::{
    ClusterResourceScope, NamespaceResourceScope,
    api::core::v1::{ConfigMap, Container, Namespace, Node, Pod, Service},
};
use kube::{Api, Client, Resource};
use serde::{Serialize, de::DeserializeOwned};

use super::{endpoint_slice, gateway_api, istio_networking, istio_security, static_egress};

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

/// What Sluice writes into a kind's `status` subresource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusWrite {
    /// Nothing.
    None,
    /// An Istio-style `SluiceAccepted` condition.
    IstioCondition,
    /// Gateway API conditions (Gateways of Sluice's class, the HTTPRoutes attached to them).
    GatewayApi,
    /// `status.egressIpPrefix` (StaticGatewayConfiguration, written by the egress manager).
    EgressPrefix,
}

/// The scope types of `kube::Resource`, as a value and as the API they are reached through.
pub trait KindScope {
    const SCOPE: Scope;

    /// The API of `K` in `namespace` (a namespaced kind), or across the cluster.
    fn api<K>(client: Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = Self, DynamicType = ()>;
}

impl KindScope for NamespaceResourceScope {
    const SCOPE: Scope = Scope::Namespaced;

    fn api<K>(client: Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = Self, DynamicType = ()>,
    {
        match namespace {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::all(client),
        }
    }
}

impl KindScope for ClusterResourceScope {
    const SCOPE: Scope = Scope::Cluster;

    fn api<K>(client: Client, _: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = Self, DynamicType = ()>,
    {
        Api::all(client)
    }
}

/// A kind in the registry. Implemented only by [`watched_kinds!`].
pub trait WatchedKind:
    Resource<DynamicType = (), Scope: KindScope>
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// Position in the registry (and in [`watched`]).
    const INDEX: usize;
    const REACH: Reach;
    const STATUS: StatusWrite;
    /// A custom resource: the cluster may lack its CRD, which must not stop the other watches.
    const CUSTOM: bool;
    /// Other `apiVersion`s a YAML document may use for this kind (Istio serves several).
    const OTHER_VERSIONS: Option<fn(&str) -> bool>;

    /// This kind's list in a resource set.
    fn list(set: &ResourceSet) -> &Vec<Self>;
    fn list_mut(set: &mut ResourceSet) -> &mut Vec<Self>;
    /// Drops what no consumer reads and what changes all the time, before a watch stores it.
    fn trim(&mut self);

    /// `Kind.group` (or `Kind` for core), as [`Rejection::kind`](crate::state::Rejection) names it.
    fn qualified() -> String {
        qualified(&Self::group(&()), &Self::kind(&()))
    }

    /// Whether a YAML document of `api_version` may be this kind.
    fn accepts_api_version(api_version: &str) -> bool {
        api_version == Self::api_version(&())
            || Self::OTHER_VERSIONS.is_some_and(|f| f(api_version))
    }
}

/// `Kind.group`, or `Kind` for core.
fn qualified(group: &str, kind: &str) -> String {
    if group.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}.{group}")
    }
}

/// Something done once per kind, in registry order.
pub trait KindVisitor {
    fn visit<K: WatchedKind>(&mut self);
}

/// One watched kind as plain data (for tables, RBAC and logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KindInfo {
    pub index: usize,
    /// API group; empty for core.
    pub group: String,
    pub version: String,
    pub kind: String,
    /// Resource name in URLs and RBAC rules.
    pub plural: String,
    pub scope: Scope,
    pub reach: Reach,
    pub custom: bool,
    pub status: StatusWrite,
}

impl KindInfo {
    fn of<K: WatchedKind>() -> Self {
        Self {
            index: K::INDEX,
            group: K::group(&()).into_owned(),
            version: K::version(&()).into_owned(),
            kind: K::kind(&()).into_owned(),
            plural: K::plural(&()).into_owned(),
            scope: <K::Scope as KindScope>::SCOPE,
            reach: K::REACH,
            custom: K::CUSTOM,
            status: K::STATUS,
        }
    }

    /// `Kind.group` (or `Kind` for core).
    pub fn qualified(&self) -> String {
        qualified(&self.group, &self.kind)
    }

    /// `group/version`, or `version` for core.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Sluice writes this kind's `status` subresource.
    pub fn writes_status(&self) -> bool {
        self.status != StatusWrite::None
    }

    /// The RBAC verbs the source uses on the kind itself.
    pub fn verbs(&self) -> &'static [&'static str] {
        &["list", "watch"]
    }
}

/// Every watched kind, indexed by [`WatchedKind::INDEX`].
pub fn watched() -> &'static [KindInfo] {
    static TABLE: std::sync::LazyLock<Vec<KindInfo>> = std::sync::LazyLock::new(|| {
        struct Collect(Vec<KindInfo>);
        impl KindVisitor for Collect {
            fn visit<K: WatchedKind>(&mut self) {
                self.0.push(KindInfo::of::<K>());
            }
        }
        let mut c = Collect(Vec::with_capacity(COUNT));
        for_each_kind(&mut c);
        c.0
    });
    &TABLE
}

/// The watched kind named `Kind.group` (or `Kind` for core).
pub fn by_qualified_name(name: &str) -> Option<&'static KindInfo> {
    watched().iter().find(|k| k.qualified() == name)
}

/// Runs `visitor` on the one kind named `qualified`; false if no kind has that name.
pub fn visit_named(qualified: &str, visitor: &mut impl KindVisitor) -> bool {
    struct One<'a, V> {
        index: usize,
        inner: &'a mut V,
    }
    impl<V: KindVisitor> KindVisitor for One<'_, V> {
        fn visit<K: WatchedKind>(&mut self) {
            if K::INDEX == self.index {
                self.inner.visit::<K>();
            }
        }
    }
    let Some(info) = by_qualified_name(qualified) else {
        return false;
    };
    for_each_kind(&mut One {
        index: info.index,
        inner: visitor,
    });
    true
}

/// The annotation `kubectl apply` leaves: a copy of the whole object, read by nothing here.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops managed fields and `kubectl apply`'s copy of the object (every kind).
fn trim_meta<K: Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
}

/// Also drops node conditions, images and other heartbeat-driven status.
fn trim_node(node: &mut Node) {
    trim_meta(node);
    if let Some(status) = node.status.as_mut() {
        status.conditions = None;
        status.images = None;
        status.daemon_endpoints = None;
        status.node_info = None;
        status.allocatable = None;
        status.capacity = None;
        status.volumes_attached = None;
        status.volumes_in_use = None;
    }
}

/// Keeps of a pod what MeshState reads: identity, node, host networking, container names and
/// ports (named target ports, sidecar detection), addresses, phase and the `Ready` condition.
fn trim_pod(pod: &mut Pod) {
    trim_meta(pod);
    if let Some(spec) = pod.spec.as_mut() {
        let slim = |containers: &mut Vec<Container>| {
            for c in containers.iter_mut() {
                *c = Container {
                    name: std::mem::take(&mut c.name),
                    ports: c.ports.take(),
                    ..Default::default()
                };
            }
        };
        slim(&mut spec.containers);
        if let Some(init) = spec.init_containers.as_mut() {
            slim(init);
        }
        spec.volumes = None;
        spec.affinity = None;
        spec.tolerations = None;
        spec.ephemeral_containers = None;
        spec.topology_spread_constraints = None;
    }
    if let Some(status) = pod.status.as_mut() {
        if let Some(conditions) = status.conditions.as_mut() {
            conditions.retain(|c| c.type_ == "Ready");
            for c in conditions.iter_mut() {
                c.message = None;
                c.reason = None;
                c.last_probe_time = None;
                c.last_transition_time = None;
            }
        }
        status.container_statuses = None;
        status.init_container_statuses = None;
        status.ephemeral_container_statuses = None;
    }
}

/// Declares the registry: [`ResourceSet`], a [`WatchedKind`] impl per kind, [`COUNT`] and
/// [`for_each_kind`].
macro_rules! watched_kinds {
    ($(
        $(#[$doc:meta])*
        $field:ident: $ty:ty {
            reach: $reach:ident,
            status: $status:ident,
            custom: $custom:literal,
            versions: $versions:expr,
            trim: $trim:path $(,)?
        }
    ),* $(,)?) => {
        /// Every resource the mesh reads, as last seen: one list per watched kind.
        #[derive(Clone, Debug, Default)]
        pub struct ResourceSet {
            $($(#[$doc])* pub $field: Vec<$ty>,)*
        }

        #[allow(non_camel_case_types)]
        enum Index { $($field,)* }

        /// How many kinds are watched.
        pub const COUNT: usize = [$(Index::$field),*].len();

        $(
            impl WatchedKind for $ty {
                const INDEX: usize = Index::$field as usize;
                const REACH: Reach = Reach::$reach;
                const STATUS: StatusWrite = StatusWrite::$status;
                const CUSTOM: bool = $custom;
                const OTHER_VERSIONS: Option<fn(&str) -> bool> = $versions;

                fn list(set: &ResourceSet) -> &Vec<Self> {
                    &set.$field
                }
                fn list_mut(set: &mut ResourceSet) -> &mut Vec<Self> {
                    &mut set.$field
                }
                fn trim(&mut self) {
                    $trim(self)
                }
            }
        )*

        /// Runs `visitor` on every watched kind, in registry order.
        pub fn for_each_kind(visitor: &mut impl KindVisitor) {
            $(visitor.visit::<$ty>();)*
        }
    };
}

watched_kinds! {
    namespaces: Namespace {
        reach: All, status: None, custom: false, versions: None, trim: trim_meta,
    },
    pods: Pod {
        reach: All, status: None, custom: false, versions: None, trim: trim_pod,
    },
    services: Service {
        reach: All, status: None, custom: false, versions: None, trim: trim_meta,
    },
    /// `discovery.k8s.io/v1` EndpointSlices (Service endpoints).
    endpoint_slices: endpoint_slice::EndpointSlice {
        reach: All, status: None, custom: false, versions: None, trim: trim_meta,
    },
    /// The same kind in `discovery.k8s.io/v1beta1`, all a 1.20 API server serves (a cluster
    /// serving both gives each slice twice: the `v1` copy wins).
    endpoint_slices_v1beta1: endpoint_slice::EndpointSliceV1beta1 {
        reach: All, status: None, custom: false, versions: None, trim: trim_meta,
    },
    nodes: Node {
        reach: All, status: None, custom: false, versions: None, trim: trim_node,
    },
    /// The mesh config ConfigMap (the kube source watches only that one).
    config_maps: ConfigMap {
        reach: OneObject, status: None, custom: false, versions: None, trim: trim_meta,
    },
    /// `networking.istio.io` ServiceEntries (the external-service registry).
    service_entries: istio_networking::ServiceEntry {
        reach: All, status: IstioCondition, custom: true,
        versions: Some(istio_networking::is_api_version), trim: trim_meta,
    },
    /// `networking.istio.io` Sidecars (per-namespace/workload outbound traffic policy).
    sidecars: istio_networking::Sidecar {
        reach: All, status: IstioCondition, custom: true,
        versions: Some(istio_networking::is_api_version), trim: trim_meta,
    },
    /// `networking.istio.io` Gateways (egress gateways).
    istio_gateways: istio_networking::Gateway {
        reach: All, status: IstioCondition, custom: true,
        versions: Some(istio_networking::is_api_version), trim: trim_meta,
    },
    virtual_services: istio_networking::VirtualService {
        reach: All, status: IstioCondition, custom: true,
        versions: Some(istio_networking::is_api_version), trim: trim_meta,
    },
    destination_rules: istio_networking::DestinationRule {
        reach: All, status: IstioCondition, custom: true,
        versions: Some(istio_networking::is_api_version), trim: trim_meta,
    },
    /// `security.istio.io` PeerAuthentications (mTLS modes).
    peer_authentications: istio_security::PeerAuthentication {
        reach: All, status: IstioCondition, custom: true,
        versions: Some(istio_security::is_api_version), trim: trim_meta,
    },
    /// `security.istio.io` AuthorizationPolicies.
    authorization_policies: istio_security::AuthorizationPolicy {
        reach: All, status: IstioCondition, custom: true,
        versions: Some(istio_security::is_api_version), trim: trim_meta,
    },
    static_gateway_configurations: static_egress::StaticGatewayConfiguration {
        reach: All, status: EgressPrefix, custom: true, versions: None, trim: trim_meta,
    },
    /// `gateway.networking.k8s.io` Gateways (ingress listeners).
    gateways: gateway_api::Gateway {
        reach: All, status: GatewayApi, custom: true, versions: None, trim: trim_meta,
    },
    /// `gateway.networking.k8s.io` HTTPRoutes.
    http_routes: gateway_api::HTTPRoute {
        reach: All, status: GatewayApi, custom: true, versions: None, trim: trim_meta,
    },
    /// `gateway.networking.k8s.io` ReferenceGrants (cross-namespace references).
    reference_grants: gateway_api::ReferenceGrant {
        reach: All, status: None, custom: true, versions: None, trim: trim_meta,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_follow_the_registry_and_names_are_unique() {
        let table = watched();
        assert_eq!(table.len(), COUNT);
        for (i, k) in table.iter().enumerate() {
            assert_eq!(k.index, i);
            // A kind read in two versions (EndpointSlice) shares its name: the first answers.
            let first = table
                .iter()
                .position(|o| o.qualified() == k.qualified())
                .expect("itself");
            assert_eq!(
                by_qualified_name(&k.qualified()).map(|k| k.index),
                Some(first)
            );
            assert!(
                first == i || table[first].version != k.version,
                "{}",
                k.qualified()
            );
        }
        assert_eq!(
            table[istio_networking::Gateway::INDEX].qualified(),
            "Gateway.networking.istio.io"
        );
        assert_eq!(table[Pod::INDEX].qualified(), "Pod");
        assert_eq!(table[Namespace::INDEX].scope, Scope::Cluster);
        assert_eq!(
            gateway_api::HTTPRoute::qualified(),
            "HTTPRoute.gateway.networking.k8s.io"
        );
    }

    #[test]
    fn every_kind_has_its_own_list_and_is_found_by_name() {
        struct Check {
            set: ResourceSet,
            lists: std::collections::BTreeSet<usize>,
        }
        impl KindVisitor for Check {
            fn visit<K: WatchedKind>(&mut self) {
                let list = K::list(&self.set) as *const Vec<K> as usize;
                assert!(self.lists.insert(list), "{} shares a list", K::qualified());
                assert!(K::accepts_api_version(&K::api_version(&())));
                struct Count(usize, usize);
                impl KindVisitor for Count {
                    fn visit<J: WatchedKind>(&mut self) {
                        assert_eq!(J::INDEX, self.0);
                        self.1 += 1;
                    }
                }
                // A kind read in two versions (EndpointSlice): the name finds the first.
                let first = by_qualified_name(&K::qualified()).map_or(K::INDEX, |k| k.index);
                let mut count = Count(first, 0);
                assert!(visit_named(&K::qualified(), &mut count));
                assert_eq!(count.1, 1, "{}", K::qualified());
            }
        }
        let mut check = Check {
            set: ResourceSet::default(),
            lists: Default::default(),
        };
        for_each_kind(&mut check);
        assert_eq!(check.lists.len(), COUNT);
        assert!(istio_networking::Sidecar::accepts_api_version(
            "networking.istio.io/v1alpha3"
        ));
        assert!(!gateway_api::Gateway::accepts_api_version(
            "networking.istio.io/v1"
        ));
        assert!(!visit_named("Nope", &mut check));
    }
}

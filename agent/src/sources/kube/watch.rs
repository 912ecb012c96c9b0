//! One watcher and reflector store per watched kind.
//!
//! Each kind runs `watcher` → `reflector` on its own task and reports to the rebuild loop over a
//! channel: the store changed, the first list completed, or the kind is absent from the cluster
//! (its CRD is not installed, or RBAC forbids it). Errors never end a watch: the watcher retries
//! with [`WatchBackoff`] and relists on return, and the store keeps its last contents meanwhile, so
//! the last good state stays served while the API server is away.
use std::{fmt::Debug, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Service};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        utils::Backoff,
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{debug, info, warn};

use super::kinds::{self, WATCHED, WatchedKind};
use crate::resources::{ResourceSet, gateway_api, istio_networking, istio_security, static_egress};

/// What a watch task tells the rebuild loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// The store of kind `usize` (an index into [`WATCHED`]) changed.
    Changed(usize),
    /// The kind's (re)list completed and its store was replaced.
    Listed(usize),
    /// The kind cannot be listed: no CRD, or forbidden. Its store keeps what it had.
    Absent(usize),
}

/// Retry delays of a failing watch: 0.5 s doubling to 8 s, each with ±25 % jitter so that the
/// agents of many nodes do not relist in step. kube's `default_backoff` grows to 30 s, which after
/// an API server outage would leave a node on a stale mesh for up to half a minute.
#[derive(Debug)]
pub struct WatchBackoff {
    next: Duration,
    seed: u64,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(8);

    /// A fresh backoff; `seed` spreads the jitter (any per-process value will do).
    pub fn new(seed: u64) -> Self {
        Self {
            next: Self::FIRST,
            seed: seed | 1,
        }
    }

    fn jitter(&mut self) -> f64 {
        // xorshift64: plenty for spreading retries.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        0.75 + (self.seed % 1000) as f64 / 2000.0
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Some(base.mul_f64(self.jitter()))
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Where the kube source's watches look.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchScope {
    /// Namespace and name of the mesh config ConfigMap.
    pub mesh_config: (String, String),
}

/// The reflector stores of every watched kind.
#[derive(Clone)]
pub struct Stores {
    pub namespaces: Store<Namespace>,
    pub pods: Store<Pod>,
    pub services: Store<Service>,
    pub nodes: Store<Node>,
    pub mesh_config: Store<ConfigMap>,
    pub service_entries: Store<istio_networking::ServiceEntry>,
    pub sidecars: Store<istio_networking::Sidecar>,
    pub istio_gateways: Store<istio_networking::Gateway>,
    pub virtual_services: Store<istio_networking::VirtualService>,
    pub destination_rules: Store<istio_networking::DestinationRule>,
    pub peer_authentications: Store<istio_security::PeerAuthentication>,
    pub authorization_policies: Store<istio_security::AuthorizationPolicy>,
    pub static_gateway_configurations: Store<static_egress::StaticGatewayConfiguration>,
    pub gateways: Store<gateway_api::Gateway>,
    pub http_routes: Store<gateway_api::HTTPRoute>,
}

/// Running watch tasks; dropping this stops them.
pub struct Watches {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Watches {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The objects of `store`, sorted by namespace and name (stores are hash maps; builds should
/// not depend on their order).
fn sorted<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> Vec<K> {
    let mut items: Vec<Arc<K>> = store.state();
    items.sort_by(|a, b| {
        (a.meta().namespace.as_deref(), a.meta().name.as_deref())
            .cmp(&(b.meta().namespace.as_deref(), b.meta().name.as_deref()))
    });
    items.into_iter().map(|k| (*k).clone()).collect()
}

impl Stores {
    /// Everything the stores hold now, as the resource set `state::build` reads.
    pub fn resource_set(&self) -> ResourceSet {
        ResourceSet {
            namespaces: sorted(&self.namespaces),
            pods: sorted(&self.pods),
            services: sorted(&self.services),
            nodes: sorted(&self.nodes),
            config_maps: sorted(&self.mesh_config),
            service_entries: sorted(&self.service_entries),
            sidecars: sorted(&self.sidecars),
            istio_gateways: sorted(&self.istio_gateways),
            virtual_services: sorted(&self.virtual_services),
            destination_rules: sorted(&self.destination_rules),
            peer_authentications: sorted(&self.peer_authentications),
            authorization_policies: sorted(&self.authorization_policies),
            static_gateway_configurations: sorted(&self.static_gateway_configurations),
            gateways: sorted(&self.gateways),
            http_routes: sorted(&self.http_routes),
        }
    }

    /// `metadata.generation` of a watched object, if the store has it (for logging rejections once
    /// per generation). `kind` is the qualified name a [`Rejection`](crate::state::Rejection)
    /// carries.
    pub fn generation(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<i64> {
        fn find<K: Resource<DynamicType = ()> + Clone>(
            store: &Store<K>,
            namespace: Option<&str>,
            name: &str,
        ) -> Option<i64> {
            let key = match namespace {
                Some(ns) => reflector::ObjectRef::new(name).within(ns),
                None => reflector::ObjectRef::new(name),
            };
            store.get(&key).and_then(|o| o.meta().generation)
        }
        let (index, _) = kinds::by_qualified_name(kind)?;
        match index {
            kinds::NAMESPACES => find(&self.namespaces, namespace, name),
            kinds::PODS => find(&self.pods, namespace, name),
            kinds::SERVICES => find(&self.services, namespace, name),
            kinds::NODES => find(&self.nodes, namespace, name),
            kinds::MESH_CONFIG => find(&self.mesh_config, namespace, name),
            kinds::SERVICE_ENTRIES => find(&self.service_entries, namespace, name),
            kinds::SIDECARS => find(&self.sidecars, namespace, name),
            kinds::ISTIO_GATEWAYS => find(&self.istio_gateways, namespace, name),
            kinds::VIRTUAL_SERVICES => find(&self.virtual_services, namespace, name),
            kinds::DESTINATION_RULES => find(&self.destination_rules, namespace, name),
            kinds::PEER_AUTHENTICATIONS => find(&self.peer_authentications, namespace, name),
            kinds::AUTHORIZATION_POLICIES => find(&self.authorization_policies, namespace, name),
            kinds::STATIC_GATEWAY_CONFIGURATIONS => {
                find(&self.static_gateway_configurations, namespace, name)
            }
            kinds::GATEWAYS => find(&self.gateways, namespace, name),
            kinds::HTTP_ROUTES => find(&self.http_routes, namespace, name),
            _ => None,
        }
    }
}

/// Drops what no consumer reads and what changes all the time, so that stores stay small and
/// heartbeats do not look like changes: managed fields everywhere, node conditions and images,
/// pod condition and container statuses.
fn trim_meta<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

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

fn trim_pod(pod: &mut Pod) {
    trim_meta(pod);
    if let Some(status) = pod.status.as_mut() {
        status.conditions = None;
        status.container_statuses = None;
        status.init_container_statuses = None;
        status.ephemeral_container_statuses = None;
    }
}

/// Starts one watch per kind in [`WATCHED`]; every store change is reported on `signals`.
pub fn start(
    client: &Client,
    scope: &WatchScope,
    signals: mpsc::UnboundedSender<Signal>,
) -> (Stores, Watches) {
    let mut tasks = Vec::new();
    let all = watcher::Config::default;
    let mut spawn = |handle: JoinHandle<()>| tasks.push(handle);

    macro_rules! watch_all {
        ($ty:ty, $index:expr, $trim:expr) => {{
            let (store, task) = watch::<$ty>(
                Api::all(client.clone()),
                all(),
                $index,
                signals.clone(),
                $trim,
            );
            spawn(task);
            store
        }};
    }

    let (cm_ns, cm_name) = &scope.mesh_config;
    let (mesh_config, task) = watch::<ConfigMap>(
        Api::namespaced(client.clone(), cm_ns),
        all().fields(&format!("metadata.name={cm_name}")),
        kinds::MESH_CONFIG,
        signals.clone(),
        trim_meta,
    );
    spawn(task);

    let stores = Stores {
        namespaces: watch_all!(Namespace, kinds::NAMESPACES, trim_meta),
        pods: watch_all!(Pod, kinds::PODS, trim_pod),
        services: watch_all!(Service, kinds::SERVICES, trim_meta),
        nodes: watch_all!(Node, kinds::NODES, trim_node),
        mesh_config,
        service_entries: watch_all!(
            istio_networking::ServiceEntry,
            kinds::SERVICE_ENTRIES,
            trim_meta
        ),
        sidecars: watch_all!(istio_networking::Sidecar, kinds::SIDECARS, trim_meta),
        istio_gateways: watch_all!(istio_networking::Gateway, kinds::ISTIO_GATEWAYS, trim_meta),
        virtual_services: watch_all!(
            istio_networking::VirtualService,
            kinds::VIRTUAL_SERVICES,
            trim_meta
        ),
        destination_rules: watch_all!(
            istio_networking::DestinationRule,
            kinds::DESTINATION_RULES,
            trim_meta
        ),
        peer_authentications: watch_all!(
            istio_security::PeerAuthentication,
            kinds::PEER_AUTHENTICATIONS,
            trim_meta
        ),
        authorization_policies: watch_all!(
            istio_security::AuthorizationPolicy,
            kinds::AUTHORIZATION_POLICIES,
            trim_meta
        ),
        static_gateway_configurations: watch_all!(
            static_egress::StaticGatewayConfiguration,
            kinds::STATIC_GATEWAY_CONFIGURATIONS,
            trim_meta
        ),
        gateways: watch_all!(gateway_api::Gateway, kinds::GATEWAYS, trim_meta),
        http_routes: watch_all!(gateway_api::HTTPRoute, kinds::HTTP_ROUTES, trim_meta),
    };
    (stores, Watches { tasks })
}

/// Why a list or watch failed, as far as the source cares.
enum Failure {
    /// 404: the kind is not served (no CRD).
    NotServed,
    /// 403: RBAC does not allow it.
    Forbidden,
    /// Anything else (connection refused, timeouts, 410 handled by the watcher, …).
    Transient,
}

fn classify(e: &watcher::Error) -> Failure {
    let api = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.as_ref()),
        watcher::Error::WatchError(s) => Some(s.as_ref()),
        _ => None,
    };
    // By code as well as reason: an unknown API group answers with a plain-text "404 page not
    // found", which kube turns into a Status without the NotFound reason.
    match api {
        Some(s) if s.code == 404 || s.is_not_found() => Failure::NotServed,
        Some(s) if s.code == 403 || s.is_forbidden() => Failure::Forbidden,
        _ => Failure::Transient,
    }
}

/// Spawns `watcher → reflector` for one kind.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    index: usize,
    signals: mpsc::UnboundedSender<Signal>,
    trim: fn(&mut K),
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let kind: &'static WatchedKind = &WATCHED[index];
    let seed =
        (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(std::process::id());
    let stream = reflector::reflector(
        writer,
        watcher(api, config.any_semantic())
            .modify(trim)
            .backoff(WatchBackoff::new(seed)),
    );
    let task = tokio::spawn(async move {
        let mut failing = false;
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let signal = match event {
                Ok(watcher::Event::InitDone) => {
                    if failing {
                        info!(kind = %kind.qualified(), "watch recovered; relisted");
                        failing = false;
                    }
                    Some(Signal::Listed(index))
                }
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    Some(Signal::Changed(index))
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => None,
                Err(e) => {
                    let first = !failing;
                    failing = true;
                    match classify(&e) {
                        Failure::NotServed => {
                            if first {
                                warn!(kind = %kind.qualified(), api_version = %kind.api_version(),
                                    "not served by the API server (CRD not installed?); the other kinds \
                                     carry on, and this one is retried");
                            }
                            Some(Signal::Absent(index))
                        }
                        Failure::Forbidden => {
                            if first {
                                warn!(kind = %kind.qualified(), error = %e,
                                    "listing is forbidden (check the ClusterRole); retrying");
                            }
                            Some(Signal::Absent(index))
                        }
                        Failure::Transient => {
                            if first {
                                warn!(kind = %kind.qualified(), error = %e,
                                    "watch failed; serving the last state and retrying");
                            } else {
                                debug!(kind = %kind.qualified(), error = %e, "watch still failing");
                            }
                            None
                        }
                    }
                }
            };
            if let Some(signal) = signal
                && signals.send(signal).is_err()
            {
                return;
            }
        }
    });
    (store, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_with_jitter_and_resets() {
        let mut b = WatchBackoff::new(42);
        let delays: Vec<Duration> = (0..8).map(|_| b.next().expect("endless")).collect();
        for (i, d) in delays.iter().enumerate() {
            let base = (WatchBackoff::FIRST * 2u32.pow(i as u32)).min(WatchBackoff::MAX);
            assert!(
                *d >= base.mul_f64(0.75) && *d <= base.mul_f64(1.25),
                "delay {i}: {d:?} vs base {base:?}"
            );
        }
        assert!(delays[7] > Duration::from_secs(5));
        b.reset();
        assert!(b.next().expect("endless") < Duration::from_secs(1));
    }
}

//! Pure conversion of a [`ResourceSet`] into [`MeshState`].
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Node as K8sNode, Pod};

use super::{
    MeshSettings,
    mesh::MeshState,
    rejections::Rejection,
    workload::{Membership, Namespace, Node, Workload, WorkloadUid},
};
use crate::resources::{
    NamespacedName, ResourceSet,
    endpoint_slice::Slice,
    istio_security::{AuthorizationPolicy, PeerAuthentication},
    kinds::WatchedKind,
    static_egress::STATIC_GATEWAY_ANNOTATION,
};

/// Label that puts a namespace or pod in the ambient mesh (`ambient`) or keeps a pod out (`none`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Sidecar-era namespace label that the seed documents use to put a namespace in the mesh.
pub const INJECTION_LABEL: &str = "istio-injection";

/// The result of [`build`]: the state, and what was left out of it.
#[derive(Debug, Default)]
pub struct BuildOutput {
    pub state: MeshState,
    pub rejections: Vec<Rejection>,
}

// Re-exported for the sub-builders that still import it from here (`state/egress*`); new code
// imports `state::rejections`.
use super::rejections::Rejections;

/// Builds the mesh model from everything the sources have seen.
///
/// The model is built in three parts that [`Incremental`](super::incremental::Incremental)
/// can reuse one by one: [`Core`] (namespaces, nodes, workloads), [`Rest`] (egress, Services,
/// ingress; it reads the core) and [`PolicyPart`].
pub fn build(resources: &ResourceSet, settings: &MeshSettings) -> BuildOutput {
    let core = Core::build(resources);
    let rest = Rest::build(resources, settings, &core);
    let policy = PolicyPart::build(resources, settings);
    assemble(settings, &core, &rest, &policy)
}

/// Namespaces, nodes and workloads: what Namespaces, Nodes and Pods give.
#[derive(Clone, Debug, Default)]
pub(super) struct Core {
    namespaces: Arc<BTreeMap<String, Namespace>>,
    nodes: Arc<BTreeMap<String, Node>>,
    workloads: Arc<BTreeMap<WorkloadUid, Workload>>,
    by_ip: Arc<BTreeMap<IpAddr, WorkloadUid>>,
    rejections: Vec<Rejection>,
}

impl Core {
    /// The kinds this part reads.
    pub(super) fn kinds() -> [usize; 3] {
        [K8sNamespace::INDEX, K8sNode::INDEX, Pod::INDEX]
    }

    pub(super) fn build(resources: &ResourceSet) -> Self {
        let mut rejected = Rejections::default();
        let namespaces: BTreeMap<String, Namespace> = resources
            .namespaces
            .iter()
            .map(|ns| {
                let ns = namespace(ns);
                (ns.name.clone(), ns)
            })
            .collect();
        let mut nodes = BTreeMap::new();
        for node in &resources.nodes {
            if let Some(node) = self::node(node, &mut rejected) {
                nodes.insert(node.name.clone(), node);
            }
        }
        let candidates: Vec<(Workload, bool)> = resources
            .pods
            .iter()
            .filter_map(|pod| {
                let w = workload(pod, &namespaces, &mut rejected)?;
                Some((w, phase(pod) == Some("Running")))
            })
            .collect();
        let mut workloads = BTreeMap::new();
        let mut by_ip = BTreeMap::new();
        for w in claim_addresses(candidates) {
            for ip in &w.ips {
                by_ip.insert(*ip, w.uid.clone());
            }
            workloads.insert(w.uid.clone(), w);
        }
        Self {
            namespaces: Arc::new(namespaces),
            nodes: Arc::new(nodes),
            workloads: Arc::new(workloads),
            by_ip: Arc::new(by_ip),
            rejections: rejected.0,
        }
    }
}

/// Egress, Services and ingress: every kind but the policies', and the [`Core`].
#[derive(Clone, Debug, Default)]
pub(super) struct Rest {
    egress: Arc<super::egress::Egress>,
    services: Arc<BTreeMap<String, super::Service>>,
    services_by_vip: Arc<BTreeMap<IpAddr, String>>,
    service_conflicts: Arc<Vec<super::service::VipConflict>>,
    ingress: Arc<super::ingress::Ingress>,
    /// Rejections of egress and Services (reported before the policies').
    early: Vec<Rejection>,
    /// Rejections of ingress (reported after the policies').
    late: Vec<Rejection>,
}

impl Rest {
    pub(super) fn build(resources: &ResourceSet, settings: &MeshSettings, core: &Core) -> Self {
        let mut rejected = Rejections::default();
        let egress = super::egress::build(resources, settings, &core.workloads, &mut rejected);
        let entry_created = resources
            .service_entries
            .iter()
            .filter_map(|se| {
                let created = se.metadata.creation_timestamp.as_ref()?;
                Some((
                    format!(
                        "{}/{}",
                        se.metadata.namespace.as_deref().unwrap_or("default"),
                        se.metadata.name.as_deref()?
                    ),
                    created.0.to_string(),
                ))
            })
            .collect();
        let services = super::service::build(
            &super::service::Inputs {
                services: &resources.services,
                slices: &slices(resources),
                workloads: &core.workloads,
                by_ip: &core.by_ip,
                registry: &egress.registry,
                entry_created: &entry_created,
            },
            &mut rejected,
        );
        let early = std::mem::take(&mut rejected.0);
        let mut ingress = super::ingress::build(
            resources,
            &core.namespaces,
            &services.services,
            &mut rejected,
        );
        super::ingress::find_instances(&mut ingress, &core.workloads, &services.services);
        // Istio's ingress form, into the same model.
        ingress.istio_gateways = super::istio_ingress::gateways(&resources.istio_gateways);
        ingress.istio_routes = super::istio_ingress::routes(
            &resources.virtual_services,
            &mut ingress.istio_gateways,
            &services.services,
            &mut rejected,
        );
        Self {
            egress: Arc::new(egress),
            services: Arc::new(services.services),
            services_by_vip: Arc::new(services.by_vip),
            service_conflicts: Arc::new(services.conflicts),
            ingress: Arc::new(ingress),
            early,
            late: rejected.0,
        }
    }
}

/// PeerAuthentications and AuthorizationPolicies, which read nothing else.
#[derive(Clone, Debug, Default)]
pub(super) struct PolicyPart {
    policy: Arc<super::policy::Policies>,
    rejections: Vec<Rejection>,
}

impl PolicyPart {
    /// The kinds this part reads (and only this part).
    pub(super) fn kinds() -> [usize; 2] {
        [PeerAuthentication::INDEX, AuthorizationPolicy::INDEX]
    }

    pub(super) fn build(resources: &ResourceSet, settings: &MeshSettings) -> Self {
        let mut rejected = Rejections::default();
        let policy = super::policy::normalise(resources, &settings.root_namespace, &mut rejected);
        Self {
            policy: Arc::new(policy),
            rejections: rejected.0,
        }
    }
}

/// The state and rejections of the three parts, in the order a whole build reports them.
pub(super) fn assemble(
    settings: &MeshSettings,
    core: &Core,
    rest: &Rest,
    policy: &PolicyPart,
) -> BuildOutput {
    let state = MeshState {
        trust_domain: settings.trust_domain.clone(),
        root_namespace: settings.root_namespace.clone(),
        namespaces: core.namespaces.clone(),
        workloads: core.workloads.clone(),
        services: rest.services.clone(),
        services_by_vip: rest.services_by_vip.clone(),
        service_conflicts: rest.service_conflicts.clone(),
        nodes: core.nodes.clone(),
        policy: policy.policy.clone(),
        egress: rest.egress.clone(),
        ingress: rest.ingress.clone(),
        by_ip: core.by_ip.clone(),
    };
    let rejections = [
        &core.rejections,
        &rest.early,
        &policy.rejections,
        &rest.late,
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect();
    BuildOutput { state, rejections }
}

/// Every EndpointSlice of either version, normalised; a slice listed in both versions counts
/// once, as its `v1` copy.
fn slices(resources: &ResourceSet) -> Vec<Slice> {
    let mut out: Vec<Slice> = resources
        .endpoint_slices
        .iter()
        .map(Slice::from_v1)
        .collect();
    let seen: std::collections::BTreeSet<(String, String)> = out
        .iter()
        .map(|s| (s.namespace.clone(), s.name.clone()))
        .collect();
    out.extend(
        resources
            .endpoint_slices_v1beta1
            .iter()
            .map(Slice::from_v1beta1)
            .filter(|s| !seen.contains(&(s.namespace.clone(), s.name.clone()))),
    );
    out
}

/// Settles addresses that several pods claim (Kubernetes reuses the address of a pod that
/// ended, and a pod's status can lag): a running pod wins over one that is not, else the first
/// listed keeps it. The losers lose that address; a pod left without addresses is no workload.
fn claim_addresses(candidates: Vec<(Workload, bool)>) -> Vec<Workload> {
    let mut owner: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for (i, (w, running)) in candidates.iter().enumerate() {
        for ip in &w.ips {
            let holder = owner.entry(*ip).or_insert(i);
            if *running && !candidates[*holder].1 {
                *holder = i;
            }
        }
    }
    candidates
        .into_iter()
        .enumerate()
        .filter_map(|(i, (mut w, _))| {
            w.ips.retain(|ip| owner.get(ip) == Some(&i));
            (!w.ips.is_empty()).then_some(w)
        })
        .collect()
}

/// `status.phase` of a pod.
fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

/// Annotations the data path reads; no other annotation reaches MeshState (and so
/// `/config_dump`), since annotations can carry anything, such as a whole manifest in
/// `kubectl.kubernetes.io/last-applied-configuration`.
const DATA_PATH_ANNOTATIONS: &[&str] = &[STATIC_GATEWAY_ANNOTATION];

fn data_path_annotations(map: &Option<BTreeMap<String, String>>) -> BTreeMap<String, String> {
    map.iter()
        .flatten()
        .filter(|(k, _)| DATA_PATH_ANNOTATIONS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn labels(map: &Option<BTreeMap<String, String>>) -> BTreeMap<String, String> {
    map.clone().unwrap_or_default()
}

fn namespace(ns: &K8sNamespace) -> Namespace {
    Namespace {
        name: ns.metadata.name.clone().unwrap_or_default(),
        labels: labels(&ns.metadata.labels),
    }
}

fn node(node: &K8sNode, out: &mut Rejections) -> Option<Node> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let mut addresses = Vec::new();
    let listed = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for (i, a) in listed.into_iter().flatten().enumerate() {
        if a.type_ != "InternalIP" && a.type_ != "ExternalIP" {
            continue;
        }
        match a.address.parse::<IpAddr>() {
            Ok(ip) => addresses.push(ip),
            Err(_) => {
                out.reject(
                    &K8sNode::qualified(),
                    None,
                    &name,
                    &format!("status.addresses[{i}].address"),
                    format!("{:?} is not an IP address", a.address),
                );
                return None;
            }
        }
    }
    Some(Node {
        name,
        addresses,
        labels: labels(&node.metadata.labels),
    })
}

/// The annotation through which a pod opts out of (`disabled`) and is marked as captured by
/// (`enabled`) ambient redirection, as Istio's CNI reads and writes it.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// The annotation Istio's injector puts on pods that carry a sidecar.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// The container name of Istio's sidecar.
pub const SIDECAR_CONTAINER: &str = "istio-proxy";

/// Why a pod stays out of the mesh whatever its labels say: it opted out with
/// `ambient.istio.io/redirection: disabled`, or it carries an Istio sidecar (the sidecar
/// captures its traffic; capturing it again would break both).
pub fn pod_opts_out(pod: &Pod) -> Option<&'static str> {
    let annotations = pod.metadata.annotations.as_ref();
    let annotation = |k: &str| annotations.and_then(|a| a.get(k)).map(String::as_str);
    if annotation(REDIRECTION_ANNOTATION) == Some("disabled") {
        return Some("ambient.istio.io/redirection: disabled");
    }
    if annotation(SIDECAR_STATUS_ANNOTATION).is_some() {
        return Some("it has an Istio sidecar (sidecar.istio.io/status)");
    }
    let spec = pod.spec.as_ref();
    let has_proxy = spec.is_some_and(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .any(|c| c.name == SIDECAR_CONTAINER)
    });
    has_proxy.then_some("it has an Istio sidecar (an istio-proxy container)")
}

/// A pod's membership: [`pod_opts_out`] first, then [`membership`] from its labels.
pub fn pod_membership(pod: &Pod, ns: Option<&Namespace>) -> Membership {
    if pod_opts_out(pod).is_some() {
        return Membership::Outside;
    }
    membership(&labels(&pod.metadata.labels), ns)
}

/// Decides mesh membership from pod and namespace labels, as Istio's ambient mode does: a pod
/// label wins over its namespace's, `none` opts out.
pub fn membership(pod_labels: &BTreeMap<String, String>, ns: Option<&Namespace>) -> Membership {
    match pod_labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) {
        Some("none") => return Membership::Outside,
        Some("ambient") => return Membership::Pod,
        _ => {}
    }
    let Some(ns) = ns else {
        return Membership::Outside;
    };
    let ambient = ns
        .labels
        .get(DATAPLANE_MODE_LABEL)
        .is_some_and(|v| v == "ambient");
    let injected = ns
        .labels
        .get(INJECTION_LABEL)
        .is_some_and(|v| v == "enabled");
    if ambient || injected {
        Membership::Namespace
    } else {
        Membership::Outside
    }
}

fn workload(
    pod: &Pod,
    namespaces: &BTreeMap<String, Namespace>,
    out: &mut Rejections,
) -> Option<Workload> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    if name.is_empty() {
        out.reject(
            &Pod::qualified(),
            Some(&namespace),
            "",
            "metadata.name",
            "missing",
        );
        return None;
    }
    let uid = pod
        .metadata
        .uid
        .clone()
        .unwrap_or_else(|| NamespacedName::new(&namespace, &name).key());
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    // A hostNetwork pod's addresses are the node's; a finished pod's address belongs to
    // whichever pod Kubernetes gives it next. Neither is a workload.
    if spec.and_then(|s| s.host_network) == Some(true)
        || matches!(phase(pod), Some("Succeeded" | "Failed"))
    {
        return None;
    }
    let mut ips = Vec::new();
    let listed: Vec<(String, String)> = match status.and_then(|s| s.pod_ips.as_ref()) {
        Some(list) if !list.is_empty() => list
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("status.podIPs[{i}].ip"), p.ip.clone()))
            .collect(),
        _ => status
            .and_then(|s| s.pod_ip.clone())
            .map(|ip| vec![("status.podIP".to_owned(), ip)])
            .unwrap_or_default(),
    };
    for (field, raw) in listed {
        match raw.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => {
                out.reject(
                    &Pod::qualified(),
                    Some(&namespace),
                    &name,
                    &field,
                    format!("{raw:?} is not an IP address"),
                );
                return None;
            }
        }
    }
    if ips.is_empty() {
        // Not yet given an address: nothing can reach it or come from it.
        return None;
    }
    let pod_labels = labels(&pod.metadata.labels);
    let membership = pod_membership(pod, namespaces.get(&namespace));
    let ports = spec
        .into_iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let number = u16::try_from(p.container_port).ok().filter(|n| *n != 0)?;
            Some((p.name.clone().filter(|n| !n.is_empty())?, number))
        })
        .collect();
    let not_ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "False"));
    let ready = !not_ready && pod.metadata.deletion_timestamp.is_none();
    Some(Workload {
        uid: WorkloadUid(uid),
        name,
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        node: spec.and_then(|s| s.node_name.clone()),
        ips,
        labels: pod_labels,
        annotations: data_path_annotations(&pod.metadata.annotations),
        membership,
        namespace,
        ports,
        ready,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> ResourceSet {
        ResourceSet::from_yaml(yaml).unwrap()
    }

    const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: outside}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: u1, labels: {app: web}}
spec: {nodeName: node1, serviceAccountName: web-sa, containers: []}
status: {podIPs: [{ip: 10.0.1.2}, {ip: "fd00:1::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: shop, labels: {istio.io/dataplane-mode: none}}
spec: {containers: []}
status: {podIP: 10.0.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy}
spec: {containers: []}
status: {podIP: 10.0.1.4}
---
apiVersion: v1
kind: Pod
metadata: {name: stray, namespace: outside, labels: {istio.io/dataplane-mode: ambient}}
spec: {containers: []}
status: {podIP: 10.0.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: broken, namespace: shop}
spec: {containers: []}
status: {podIP: 10.0.1.999}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
"#;

    #[test]
    fn membership_follows_namespace_and_pod_labels() {
        let out = build(&parse(WORLD), &MeshSettings::default());
        let m = |name: &str| {
            out.state
                .workloads
                .values()
                .find(|w| w.name == name)
                .unwrap()
                .membership
        };
        assert_eq!(m("web"), Membership::Namespace);
        assert_eq!(m("opted-out"), Membership::Outside);
        assert_eq!(m("old"), Membership::Namespace);
        assert_eq!(m("stray"), Membership::Pod);
    }

    #[test]
    fn sidecars_and_disabled_redirection_keep_a_pod_out() {
        let world = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: shop}
spec: {containers: [{name: app}]}
status: {podIP: 10.0.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: disabled, namespace: shop, annotations: {ambient.istio.io/redirection: disabled}}
spec: {containers: [{name: app}]}
status: {podIP: 10.0.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: captured-before, namespace: shop, annotations: {ambient.istio.io/redirection: enabled}}
spec: {containers: [{name: app}]}
status: {podIP: 10.0.2.3}
---
apiVersion: v1
kind: Pod
metadata: {name: injected, namespace: shop, annotations: {sidecar.istio.io/status: '{"containers":["istio-proxy"]}'}}
spec: {containers: [{name: app}]}
status: {podIP: 10.0.2.4}
---
apiVersion: v1
kind: Pod
metadata: {name: proxied, namespace: shop, labels: {istio.io/dataplane-mode: ambient}}
spec: {containers: [{name: app}, {name: istio-proxy}]}
status: {podIP: 10.0.2.5}
---
apiVersion: v1
kind: Pod
metadata: {name: native-sidecar, namespace: shop}
spec: {initContainers: [{name: istio-proxy}], containers: [{name: app}]}
status: {podIP: 10.0.2.6}
"#;
        let out = build(&parse(world), &MeshSettings::default());
        let m = |name: &str| out.state.workload_by_name("shop", name).unwrap().membership;
        assert_eq!(m("plain"), Membership::Namespace);
        assert_eq!(m("captured-before"), Membership::Namespace);
        for out_of_mesh in ["disabled", "injected", "proxied", "native-sidecar"] {
            assert_eq!(m(out_of_mesh), Membership::Outside, "{out_of_mesh}");
        }
    }

    #[test]
    fn pods_become_workloads_indexed_by_ip() {
        let out = build(&parse(WORLD), &MeshSettings::default());
        let web = out
            .state
            .workload_by_ip("fd00:1::2".parse().unwrap())
            .unwrap();
        assert_eq!(web.uid, WorkloadUid("u1".into()));
        assert_eq!(
            web.identity("cluster.local").to_string(),
            "spiffe://cluster.local/ns/shop/sa/web-sa"
        );
        assert_eq!(web.node.as_deref(), Some("node1"));
        let default_sa = out.state.workload_by_name("legacy", "old").unwrap();
        assert_eq!(default_sa.service_account, "default");
    }

    #[test]
    fn bad_pod_ip_is_rejected_naming_the_field() {
        let out = build(&parse(WORLD), &MeshSettings::default());
        assert!(out.state.workload_by_name("shop", "broken").is_none());
        let r = &out.rejections[0];
        assert_eq!(
            (r.kind.as_str(), r.name.as_str(), r.field.as_str()),
            ("Pod", "broken", "status.podIP")
        );
    }

    #[test]
    fn services_select_endpoints_from_pods() {
        let out = build(&parse(WORLD), &MeshSettings::default());
        let svc = &out.state.services["shop/web"];
        assert_eq!(svc.endpoints.len(), 1);
        assert_eq!(svc.endpoints[0].workload, Some(WorkloadUid("u1".into())));
        assert_eq!(
            svc.ports[0].target_port,
            super::super::service::TargetPort::Number(8080)
        );
    }

    #[test]
    fn finished_host_network_and_addressless_pods_are_no_workloads() {
        let out = build(
            &parse(
                r#"
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: shop, uid: done}
spec: {containers: []}
status: {phase: Succeeded, podIP: 10.0.1.7}
---
apiVersion: v1
kind: Pod
metadata: {name: crashed, namespace: shop, uid: crashed}
spec: {containers: []}
status: {phase: Failed, podIP: 10.0.1.8}
---
apiVersion: v1
kind: Pod
metadata: {name: host, namespace: shop, uid: host}
spec: {hostNetwork: true, containers: []}
status: {phase: Running, podIP: 172.30.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: shop, uid: pending}
spec: {containers: []}
status: {phase: Pending}
"#,
            ),
            &MeshSettings::default(),
        );
        assert!(out.state.workloads.is_empty(), "{:?}", out.state.workloads);
        assert!(out.state.by_ip.is_empty());
        assert!(out.rejections.is_empty(), "{:?}", out.rejections);
    }

    /// Kubernetes reuses a finished pod's address; a live pod elsewhere must not be judged as the
    /// dead one, whichever comes first in the list.
    #[test]
    fn on_an_address_collision_the_running_pod_wins() {
        let pods = |live_first: bool| {
            let doc = |name: &str, ns: &str, phase: &str, ips: &str| {
                format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, uid: {name}}}\nspec: {{containers: []}}\nstatus: {{phase: {phase}, podIPs: [{ips}]}}\n"
                )
            };
            let live = doc("live", "shop", "Running", "{ip: 10.0.1.9}");
            let stale = doc(
                "stale",
                "legacy",
                "Pending",
                "{ip: 10.0.1.9}, {ip: \"fd00::9\"}",
            );
            let (a, b) = if live_first {
                (live, stale)
            } else {
                (stale, live)
            };
            format!("{a}---\n{b}")
        };
        for live_first in [true, false] {
            let out = build(&parse(&pods(live_first)), &MeshSettings::default());
            let owner = out
                .state
                .workload_by_ip("10.0.1.9".parse().unwrap())
                .unwrap();
            assert_eq!(owner.name, "live", "live first: {live_first}");
            // The loser keeps only what nobody else claims.
            let stale = out.state.workload_by_name("legacy", "stale").unwrap();
            assert_eq!(stale.ips, vec!["fd00::9".parse::<IpAddr>().unwrap()]);
        }
    }

    #[test]
    fn only_annotations_the_data_path_reads_are_kept() {
        let out = build(
            &parse(
                r#"
apiVersion: v1
kind: Pod
metadata:
  name: p
  namespace: shop
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: '{"secret": "x"}'
    kubernetes.azure.com/static-gateway-configuration: sgc
spec: {containers: []}
status: {podIP: 10.0.1.10}
"#,
            ),
            &MeshSettings::default(),
        );
        let p = out.state.workload_by_name("shop", "p").unwrap();
        assert_eq!(
            p.annotations.keys().collect::<Vec<_>>(),
            vec!["kubernetes.azure.com/static-gateway-configuration"]
        );
    }
}

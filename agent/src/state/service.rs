//! Services as addresses, as ztunnel's `state/service.rs` has them: a Service's VIPs, its port
//! map and its endpoints, and the choice of the endpoint a connection to a VIP goes to.
//!
//! Built here, from plain data:
//! - Kubernetes Services: VIPs from `clusterIP`/`clusterIPs` (headless: none), ports with
//!   numeric or named `targetPort`, endpoints from EndpointSlices when the Service has any,
//!   otherwise from the ready Pods its selector matches; `internalTrafficPolicy` and
//!   `sessionAffinity: ClientIP`.
//! - Istio ServiceEntries with single-IP `addresses` and `endpoints` or a `workloadSelector`
//!   (in-mesh ServiceEntries), which then route exactly like a Service.
//!
//! A VIP claimed by two Services goes to the older (then by `namespace/name`); the younger
//! keeps its other VIPs, and the conflict is logged and listed in [`ServiceIndex::conflicts`].
//!
//! Chosen per connection by [`route`](super::load_balance::route), without I/O: the endpoints that are ready (or, when none
//! is, serving and terminating, as kube-proxy falls back), of the VIP's address family, on the
//! source's node for `internalTrafficPolicy: Local`, and with the target port resolved; then up
//! to [`MAX_ATTEMPTS`](super::load_balance::MAX_ATTEMPTS) of them in the order to try: the client's sticky endpoint first, then by
//! power of two choices on in-flight connections.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::IpAddr,
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::Service as K8sService, apimachinery::pkg::util::intstr::IntOrString,
};
use serde::Serialize;
use tracing::warn;

use super::{
    Workload, WorkloadUid,
    egress::{
        host::HostMatch,
        registry::{EndpointAddress, ExternalService, Location, Resolution},
    },
    rejections::Rejections,
};
use crate::resources::{endpoint_slice::Slice, kinds::WatchedKind};

/// The cluster's DNS domain, as Istio names services in `destination_service`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset (Kubernetes' default, 3 hours).
pub const DEFAULT_AFFINITY_SECONDS: u32 = 10_800;

/// A Service (or in-mesh ServiceEntry): virtual IPs, ports and endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// What Istio calls it in `destination_service`: `<name>.<namespace>.svc.cluster.local`,
    /// or a ServiceEntry's first host.
    pub hostname: String,
    pub origin: Origin,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub selector: BTreeMap<String, String>,
    pub endpoints: Vec<Endpoint>,
    /// `internalTrafficPolicy: Local`: only endpoints on the client's node.
    pub node_local: bool,
    /// `sessionAffinity: ClientIP`, with its timeout.
    pub affinity: Option<Duration>,
}

/// Where a [`Service`] comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Kubernetes,
    ServiceEntry,
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: TargetPort,
    pub protocol: String,
}

/// Where a Service port lands on an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetPort {
    Number(u16),
    /// A container port's name, resolved per endpoint pod.
    Named(String),
}

/// What an endpoint's `ports` are keyed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PortNames {
    /// A pod's container port names (endpoints from a selector).
    Container,
    /// The Service port names (EndpointSlices, ServiceEntry endpoints): the number is final.
    Service,
}

/// One endpoint of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub ips: Vec<IpAddr>,
    /// The pod behind it, when known: its mesh membership and identity decide the hop.
    pub workload: Option<WorkloadUid>,
    pub node: Option<String>,
    pub ports: BTreeMap<String, u16>,
    pub port_names: PortNames,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Endpoint {
    /// The port `port` lands on here; `None` when a name does not resolve on this endpoint.
    pub fn target_port(&self, port: &ServicePort) -> Option<u16> {
        match (self.port_names, &port.target_port) {
            (PortNames::Service, target) => self
                .ports
                .get(port.name.as_deref().unwrap_or(""))
                .copied()
                .or(match target {
                    TargetPort::Number(n) => Some(*n),
                    TargetPort::Named(_) => None,
                }),
            (PortNames::Container, TargetPort::Number(n)) => Some(*n),
            (PortNames::Container, TargetPort::Named(name)) => self.ports.get(name).copied(),
        }
    }
}

/// Two Services claiming one VIP: the younger loses it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VipConflict {
    pub vip: IpAddr,
    /// `namespace/name` of the Service that keeps it.
    pub kept_by: String,
    /// `namespace/name` of the Service that lost it.
    pub lost_by: String,
}

impl fmt::Display for VipConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "VIP {} of {} is already claimed by the older {}; ignored there",
            self.vip, self.lost_by, self.kept_by
        )
    }
}

/// Every Service, and the VIP index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServiceIndex {
    /// By `namespace/name` (ServiceEntries too).
    pub services: BTreeMap<String, Service>,
    /// VIP → `namespace/name`.
    #[serde(skip)]
    pub by_vip: BTreeMap<IpAddr, String>,
    pub conflicts: Vec<VipConflict>,
}

/// The inputs of [`build`] that the rest of MeshState already holds.
pub struct Inputs<'a> {
    pub services: &'a [K8sService],
    /// EndpointSlices of both versions, normalised.
    pub slices: &'a [Slice],
    pub workloads: &'a BTreeMap<WorkloadUid, Workload>,
    pub by_ip: &'a BTreeMap<IpAddr, WorkloadUid>,
    /// The normalised ServiceEntries.
    pub registry: &'a [ExternalService],
    /// `namespace/name` → creation time (RFC 3339) of every ServiceEntry, for VIP conflicts.
    pub entry_created: &'a BTreeMap<String, String>,
}

/// Builds every Service and in-mesh ServiceEntry, and the VIP index.
pub fn build(inputs: &Inputs<'_>, out: &mut Rejections) -> ServiceIndex {
    // (creation time, key): the order in which services claim VIPs.
    let mut claims: Vec<(String, String, Service)> = Vec::new();
    let index = Index::new(inputs);
    for svc in inputs.services {
        if let Some(s) = kubernetes(svc, inputs, &index, out) {
            let created = svc
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default();
            claims.push((created, key(&s.namespace, &s.name), s));
        }
    }
    for se in inputs.registry {
        if let Some(s) = service_entry(se, inputs, &index) {
            let k = key(&s.namespace, &s.name);
            let created = inputs.entry_created.get(&k).cloned().unwrap_or_default();
            claims.push((created, k, s));
        }
    }
    // An unset creation time sorts first: the file source has none, and its order is the key.
    claims.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let mut index = ServiceIndex::default();
    for (_, k, mut s) in claims {
        s.vips.retain(|vip| match index.by_vip.get(vip) {
            Some(owner) => {
                let c = VipConflict {
                    vip: *vip,
                    kept_by: owner.clone(),
                    lost_by: k.clone(),
                };
                warn!(service = %k, "{c}");
                // A ServiceEntry has a status to say so; a core Service's status is the
                // Service controller's, so there it is the log line and `/config_dump`.
                if s.origin == Origin::ServiceEntry {
                    out.reject(
                        "ServiceEntry.networking.istio.io",
                        Some(&s.namespace),
                        &s.name,
                        "spec.addresses",
                        c.to_string(),
                    );
                }
                index.conflicts.push(c);
                false
            }
            None => true,
        });
        for vip in &s.vips {
            index.by_vip.insert(*vip, k.clone());
        }
        if index.services.contains_key(&k) {
            // A ServiceEntry named like a Service of its namespace: the Service stays.
            continue;
        }
        index.services.insert(k, s);
    }
    index
}

fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// A Kubernetes Service; `None` (and a rejection) when a field is invalid.
/// The workloads and EndpointSlices of [`Inputs`] by namespace (and Service), so that each
/// Service reads its own namespace's rather than the cluster's (2,000 Services × 10,000 pods
/// otherwise); each list keeps the order of its input.
struct Index<'a> {
    workloads: HashMap<&'a str, Vec<&'a Workload>>,
    /// (namespace, Service name) → its slices.
    slices: HashMap<(&'a str, &'a str), Vec<&'a Slice>>,
}

impl<'a> Index<'a> {
    fn new(inputs: &Inputs<'a>) -> Self {
        let mut workloads: HashMap<&str, Vec<&Workload>> = HashMap::new();
        for w in inputs.workloads.values() {
            workloads.entry(w.namespace.as_str()).or_default().push(w);
        }
        let mut slices: HashMap<(&str, &str), Vec<&Slice>> = HashMap::new();
        for s in inputs.slices {
            if let Some(service) = s.service.as_deref() {
                slices
                    .entry((s.namespace.as_str(), service))
                    .or_default()
                    .push(s);
            }
        }
        Self { workloads, slices }
    }
}

fn kubernetes(
    svc: &K8sService,
    inputs: &Inputs<'_>,
    index: &Index<'_>,
    out: &mut Rejections,
) -> Option<Service> {
    let name = svc.metadata.name.clone().unwrap_or_default();
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let mut reject = |field: String, message: String| {
        out.reject(
            &K8sService::qualified(),
            Some(&namespace),
            &name,
            &field,
            message,
        );
        None
    };
    let spec = svc.spec.clone().unwrap_or_default();
    let listed: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(list), _) if !list.is_empty() => list.clone(),
        (_, Some(one)) => vec![one.clone()],
        _ => vec![],
    };
    let mut vips = Vec::new();
    for (i, raw) in listed.iter().enumerate() {
        if raw == "None" || raw.is_empty() {
            continue; // headless: its pods route as workloads
        }
        match raw.parse::<IpAddr>() {
            Ok(ip) if !vips.contains(&ip) => vips.push(ip),
            Ok(_) => {}
            Err(_) => {
                return reject(
                    format!("spec.clusterIPs[{i}]"),
                    format!("{raw:?} is not an IP address"),
                );
            }
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let Ok(port) = u16::try_from(p.port) else {
            return reject(
                format!("spec.ports[{i}].port"),
                format!("{} is out of range", p.port),
            );
        };
        let target_port = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => match u16::try_from(*n) {
                Ok(n) if n > 0 => TargetPort::Number(n),
                _ => {
                    return reject(
                        format!("spec.ports[{i}].targetPort"),
                        format!("{n} is out of range"),
                    );
                }
            },
            Some(IntOrString::String(s)) => match s.parse::<u16>() {
                Ok(n) if n > 0 => TargetPort::Number(n),
                _ if s.is_empty() => TargetPort::Number(port),
                _ => TargetPort::Named(s.clone()),
            },
        };
        ports.push(ServicePort {
            name: p.name.clone().filter(|n| !n.is_empty()),
            port,
            target_port,
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
        });
    }
    let selector = spec.selector.clone().unwrap_or_default();
    let own: &[&Slice] = index
        .slices
        .get(&(namespace.as_str(), name.as_str()))
        .map_or(&[], Vec::as_slice);
    let endpoints = if !own.is_empty() {
        from_slices(own, inputs)
    } else if selector.is_empty() {
        Vec::new()
    } else {
        selected(&namespace, &selector, index)
    };
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        let secs = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|s| u32::try_from(s).ok())
            .filter(|s| *s > 0)
            .unwrap_or(DEFAULT_AFFINITY_SECONDS);
        Duration::from_secs(secs.into())
    });
    let svc = Service {
        hostname: format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}"),
        origin: Origin::Kubernetes,
        vips,
        ports,
        selector,
        endpoints,
        node_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        affinity,
        name,
        namespace,
    };
    log_unresolved(&svc, inputs.workloads);
    Some(svc)
}

/// The pods of `namespace` that `selector` matches, as endpoints.
fn selected(
    namespace: &str,
    selector: &BTreeMap<String, String>,
    index: &Index<'_>,
) -> Vec<Endpoint> {
    index
        .workloads
        .get(namespace)
        .into_iter()
        .flatten()
        .copied()
        .filter(|w| !w.ips.is_empty())
        .filter(|w| selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
        .map(pod_endpoint)
        .collect()
}

fn pod_endpoint(w: &Workload) -> Endpoint {
    Endpoint {
        ips: w.ips.clone(),
        workload: Some(w.uid.clone()),
        node: w.node.clone(),
        ports: w.ports.clone(),
        port_names: PortNames::Container,
        ready: w.ready,
        serving: w.ready,
        terminating: false,
    }
}

/// Endpoints from a Service's slices; one endpoint per pod (its v4 and v6 slices merge), or
/// per address where the slice names no pod.
fn from_slices(slices: &[&Slice], inputs: &Inputs<'_>) -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = Vec::new();
    let mut seen: BTreeSet<IpAddr> = BTreeSet::new();
    for slice in slices {
        for e in &slice.endpoints {
            let ips: Vec<IpAddr> = e
                .ips
                .iter()
                .copied()
                .filter(|ip| seen.insert(*ip))
                .collect();
            if ips.is_empty() {
                continue;
            }
            let workload = e
                .pod
                .as_deref()
                .and_then(|p| p.split_once('/'))
                .and_then(|(ns, name)| {
                    inputs
                        .workloads
                        .values()
                        .find(|w| w.namespace == ns && w.name == name)
                        .map(|w| w.uid.clone())
                })
                .or_else(|| ips.iter().find_map(|ip| inputs.by_ip.get(ip).cloned()));
            if let Some(prev) = workload
                .as_ref()
                .and_then(|uid| out.iter_mut().find(|x| x.workload.as_ref() == Some(uid)))
            {
                prev.ips.extend(ips);
                continue;
            }
            out.push(Endpoint {
                ips,
                node: e.node.clone().or_else(|| {
                    workload
                        .as_ref()
                        .and_then(|uid| inputs.workloads.get(uid))
                        .and_then(|w| w.node.clone())
                }),
                workload,
                ports: slice.ports.clone(),
                port_names: PortNames::Service,
                ready: e.ready,
                serving: e.serving,
                terminating: e.terminating,
            });
        }
    }
    out
}

/// Logs each endpoint a named target port does not resolve on (it is skipped for that port).
fn log_unresolved(svc: &Service, workloads: &BTreeMap<WorkloadUid, Workload>) {
    for p in &svc.ports {
        let TargetPort::Named(name) = &p.target_port else {
            continue;
        };
        for e in svc.endpoints.iter().filter(|e| e.target_port(p).is_none()) {
            let pod = e
                .workload
                .as_ref()
                .and_then(|uid| workloads.get(uid))
                .map(|w| key(&w.namespace, &w.name))
                .unwrap_or_else(|| format!("{:?}", e.ips));
            warn!(
                service = %key(&svc.namespace, &svc.name),
                port = p.port,
                endpoint = %pod,
                "endpoint has no container port named {name:?}; skipped for this port"
            );
        }
    }
}

/// An in-mesh ServiceEntry: single-IP addresses with a workload selector, or `MESH_INTERNAL`
/// with static endpoints (a `MESH_EXTERNAL` entry stays with the egress decision).
fn service_entry(se: &ExternalService, inputs: &Inputs<'_>, index: &Index<'_>) -> Option<Service> {
    if se.workload_selector.is_none() && se.location != Location::MeshInternal {
        return None;
    }
    let vips: Vec<IpAddr> = se
        .addresses
        .iter()
        .filter(|n| n.prefix_len() == n.max_prefix_len())
        .map(|n| n.addr())
        .collect();
    if vips.is_empty() {
        return None;
    }
    let ports: Vec<ServicePort> = se
        .ports
        .iter()
        .map(|p| ServicePort {
            name: Some(p.name.clone()).filter(|n| !n.is_empty()),
            port: p.number,
            target_port: TargetPort::Number(p.target_port.unwrap_or(p.number)),
            protocol: format!("{:?}", p.protocol).to_ascii_uppercase(),
        })
        .collect();
    let (selector, endpoints) = match &se.workload_selector {
        Some(sel) => (sel.clone(), selected(&se.key.namespace, sel, index)),
        None if se.resolution == Resolution::Static && !se.endpoints.is_empty() => {
            let endpoints = se
                .endpoints
                .iter()
                .filter_map(|e| {
                    let EndpointAddress::Ip(ip) = e.address else {
                        return None;
                    };
                    let workload = inputs.by_ip.get(&ip).cloned();
                    let node = workload
                        .as_ref()
                        .and_then(|uid| inputs.workloads.get(uid))
                        .and_then(|w| w.node.clone());
                    Some(Endpoint {
                        ips: vec![ip],
                        workload,
                        node,
                        ports: e.ports.clone(),
                        port_names: PortNames::Service,
                        ready: true,
                        serving: true,
                        terminating: false,
                    })
                })
                .collect();
            (BTreeMap::new(), endpoints)
        }
        None => return None,
    };
    Some(Service {
        name: se.key.name.clone(),
        namespace: se.key.namespace.clone(),
        hostname: se.hosts.first().map(host_name).unwrap_or_default(),
        origin: Origin::ServiceEntry,
        vips,
        ports,
        selector,
        endpoints,
        node_local: false,
        affinity: None,
    })
}

fn host_name(h: &HostMatch) -> String {
    match h {
        HostMatch::Exact(n) => n.clone(),
        HostMatch::Suffix(s) => format!("*{s}"),
        HostMatch::Any => "*".into(),
    }
}

#[cfg(test)]
mod tests;

//! Ingress part of MeshState: Gateway API Gateways (listeners) and HTTPRoutes (weighted backends),
//! normalised from `gateway.networking.k8s.io/v1`.
//!
//! What makes a whole resource unusable is a [`Rejection`](super::Rejection) naming the field:
//! duplicate listener names, a malformed hostname, TLS settings on a plain-text listener, an
//! unknown path match type, a path that is not absolute, a Service backend without a port. What
//! the Gateway API treats as a partial failure is kept out without rejecting the resource, and the
//! status writer reports it: a listener with a protocol Sluice does not serve, a backend that is
//! not a Service.
//!
//! Attachment is decided here too, so that the status writer and a data plane read one answer:
//! each route parent carries whether the route attached to that Gateway (and to which listeners,
//! or why not), each listener the routes attached to it, each route whether its backends resolve,
//! and each Gateway the Gateway API conditions of every listener in its spec.
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{
    http_filters::{self, HttpFilter, RouteTimeouts, ValueMatches},
    reference_grants::{ObjectRef, ReferenceGrants},
    rejections::Rejections,
    service::Service,
    workload::Namespace,
};
use kube::Resource;

pub use super::http_filters::valid_hostname;

use crate::resources::{
    NamespacedName, ResourceSet,
    gateway_api::{self, HTTPRoute, HttpRouteMatch},
    kinds::WatchedKind,
};

/// Ingress configuration, normalised.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Ingress {
    /// Gateways by `namespace/name`.
    pub gateways: BTreeMap<String, IngressGateway>,
    /// HTTPRoutes by `namespace/name`.
    pub routes: BTreeMap<String, HttpRoute>,
    /// Istio Gateways with HTTP or HTTPS servers, by `namespace/name`.
    pub istio_gateways: BTreeMap<String, IngressGateway>,
    /// VirtualServices bound to them, by `namespace/name`.
    pub istio_routes: BTreeMap<String, HttpRoute>,
    /// The cross-namespace references ReferenceGrants permit.
    pub reference_grants: ReferenceGrants,
}

/// A Gateway and the listeners Sluice can serve.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IngressGateway {
    pub namespace: String,
    pub name: String,
    /// `spec.gatewayClassName` (empty for an Istio Gateway).
    pub class: String,
    /// An Istio Gateway's `selector`: the gateway instances whose labels include it serve it.
    pub selector: Option<BTreeMap<String, String>>,
    pub listeners: Vec<IngressListener>,
    /// The Gateway API conditions of every listener in the spec (those Sluice cannot serve too).
    pub listener_conditions: Vec<ListenerConditions>,
    /// Ready gateway instances serving it: pods of its namespace labelled
    /// [`GATEWAY_NAME_LABEL`]`=<name>` (a `sluice gateway` is ready only once it has bound every
    /// listener it serves), by pod name.
    pub instances: Vec<String>,
    /// Where clients reach it: the addresses of the Services selecting those pods, else the
    /// pods' own addresses.
    pub addresses: Vec<std::net::IpAddr>,
}

/// The label that ties a gateway pod to the Gateway it serves (the Gateway API's own, as on
/// Istio's and Cilium's gateway Deployments).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// What the Gateway API asks a condition to say (the status writer adds generation and time).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Cond {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// The conditions of one listener of a Gateway's spec, as far as the listener alone decides them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ListenerConditions {
    pub name: String,
    /// HTTPRoutes may attach (an HTTP or HTTPS listener).
    pub carries_http: bool,
    pub accepted: Cond,
    pub resolved_refs: Cond,
    pub conflicted: Cond,
}

impl ListenerConditions {
    /// Programmed when valid and a ready gateway instance serves it (`instances`), unless the
    /// Gateway as a whole is rejected.
    pub fn programmed(&self, gateway_rejected: bool, instances: &[String]) -> Cond {
        if !gateway_rejected
            && self.accepted.status
            && self.resolved_refs.status
            && !self.conflicted.status
        {
            match instances {
                [] => Cond::new("Programmed", false, "Pending", NOT_BOUND),
                some => Cond::new(
                    "Programmed",
                    true,
                    "Programmed",
                    format!("bound by ready gateway instance(s) {}", some.join(", ")),
                ),
            }
        } else {
            Cond::new("Programmed", false, "Invalid", "listener is not programmed")
        }
    }
}

/// Why a valid Gateway or listener is not `Programmed`: no ready gateway instance serves it.
pub const NOT_BOUND: &str = "no ready gateway instance serves this Gateway (a `sluice gateway` pod \
     in its namespace labelled gateway.networking.k8s.io/gateway-name=<its name>)";

/// Fills each Gateway's `instances` and `addresses` from the ready pods labelled for it and the
/// Services selecting them.
pub fn find_instances(
    ingress: &mut Ingress,
    workloads: &BTreeMap<super::WorkloadUid, super::Workload>,
    services: &BTreeMap<String, Service>,
) {
    for gw in ingress.gateways.values_mut() {
        let pods: Vec<&super::Workload> = workloads
            .values()
            .filter(|w| {
                w.namespace == gw.namespace
                    && w.ready
                    && !w.ips.is_empty()
                    && w.labels.get(GATEWAY_NAME_LABEL) == Some(&gw.name)
            })
            .collect();
        gw.instances = pods.iter().map(|w| w.name.clone()).collect();
        gw.instances.sort();
        let mut addresses: Vec<std::net::IpAddr> = services
            .values()
            .filter(|s| s.namespace == gw.namespace && !s.selector.is_empty())
            .filter(|s| {
                pods.iter()
                    .any(|w| s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            })
            .flat_map(|s| s.vips.iter().copied())
            .collect();
        if addresses.is_empty() {
            addresses = pods.iter().flat_map(|w| w.ips.iter().copied()).collect();
        }
        addresses.sort();
        addresses.dedup();
        gw.addresses = addresses;
    }
}

/// Protocols a listener may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ListenerProtocol {
    Http,
    Https,
    Tls,
    Tcp,
    Udp,
}

impl ListenerProtocol {
    /// The protocol named `s` (Gateway API spells them in capitals).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "HTTP" => Self::Http,
            "HTTPS" => Self::Https,
            "TLS" => Self::Tls,
            "TCP" => Self::Tcp,
            "UDP" => Self::Udp,
            _ => return None,
        })
    }

    /// Whether HTTPRoutes attach to listeners of this protocol.
    pub fn carries_http(self) -> bool {
        matches!(self, Self::Http | Self::Https)
    }
}

/// Which namespaces' routes may attach to a listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AllowedNamespaces {
    /// Only the Gateway's own namespace (the default).
    Same,
    All,
    /// Namespaces whose labels include all of these.
    Selector(BTreeMap<String, String>),
}

/// One listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IngressListener {
    pub name: String,
    pub port: u16,
    pub protocol: ListenerProtocol,
    /// Requests must match this host name (`*.`-prefixed for a wildcard); `None` = any.
    pub hostname: Option<String>,
    pub allowed_namespaces: AllowedNamespaces,
    /// `namespace/name` of every route attached here, once per parent reference that attached it.
    pub attached_routes: Vec<String>,
    /// HTTPS: the Secrets (`namespace/name`) holding the certificates the listener serves.
    pub certificates: Vec<String>,
}

/// An HTTPRoute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HttpRoute {
    pub namespace: String,
    pub name: String,
    pub parents: Vec<RouteParent>,
    pub hostnames: Vec<String>,
    pub rules: Vec<HttpRule>,
    /// Whether every backend is a Service of the route's namespace that exists.
    pub resolved_refs: Cond,
    /// `metadata.creationTimestamp` (RFC 3339): the older route wins a tie between matches.
    pub created: String,
}

/// A Gateway (or one of its listeners) a route attaches to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteParent {
    pub namespace: String,
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<u16>,
    /// Whether the route attached to this Gateway, and where.
    pub attachment: Attachment,
}

/// Outcome of attaching one route to one parent reference.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Attachment {
    /// Listener names the route attached to (empty: not accepted).
    pub listeners: Vec<String>,
    pub accepted: Cond,
}

/// One rule: any of `matches`, sent to `backends` by weight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HttpRule {
    pub matches: Vec<HttpMatch>,
    pub backends: Vec<HttpBackend>,
    pub filters: Vec<HttpFilter>,
    pub timeouts: RouteTimeouts,
}

/// Conditions on a request (all must hold).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HttpMatch {
    pub path: PathMatch,
    /// Header name (lower-case) → value.
    pub headers: ValueMatches,
    /// Query parameter name (exact) → value.
    pub query: ValueMatches,
    pub method: Option<String>,
}

/// How a request path is matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    Exact(String),
    /// Element-wise prefix (`/a` matches `/a` and `/a/b`, not `/ab`).
    Prefix(String),
    /// Character prefix, Istio's `uri.prefix` (`/a` matches `/ab` too).
    StringPrefix(String),
    RegularExpression(String),
}

/// A Service port with a relative weight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HttpBackend {
    /// `namespace/name` of the Service.
    pub service: String,
    pub port: u16,
    pub weight: u32,
    /// Why requests sent here get a 500 (a kind that is not a Service, another namespace
    /// without a ReferenceGrant, a Service that does not exist), or `None`.
    pub invalid: Option<String>,
}

/// Normalises every Gateway and HTTPRoute in `resources` and attaches the routes, against the
/// mesh's `namespaces` (for listener namespace selectors) and `services` (for backends).
pub fn build(
    resources: &ResourceSet,
    namespaces: &BTreeMap<String, Namespace>,
    services: &BTreeMap<String, Service>,
    out: &mut Rejections,
) -> Ingress {
    let mut ingress = Ingress {
        reference_grants: ReferenceGrants::build(&resources.reference_grants),
        ..Ingress::default()
    };
    for gw in &resources.gateways {
        if let Some(g) = gateway(gw, &ingress.reference_grants, out) {
            ingress
                .gateways
                .insert(NamespacedName::new(&g.namespace, &g.name).key(), g);
        }
    }
    for route in &resources.http_routes {
        if let Some(r) = http_route(route, services, &ingress.reference_grants, out) {
            ingress
                .routes
                .insert(NamespacedName::new(&r.namespace, &r.name).key(), r);
        }
    }
    attach_all(&mut ingress, namespaces);
    ingress
}

/// Decides every route parent's attachment and lists each listener's attached routes.
fn attach_all(ingress: &mut Ingress, namespaces: &BTreeMap<String, Namespace>) {
    let Ingress {
        gateways, routes, ..
    } = ingress;
    for (key, route) in routes.iter_mut() {
        let attachments: Vec<Attachment> = route
            .parents
            .iter()
            .map(|parent| {
                match gateways.get(&NamespacedName::new(&parent.namespace, &parent.name).key()) {
                    Some(gw) => attach(route, parent, gw, namespaces),
                    None => Attachment {
                        listeners: vec![],
                        accepted: Cond::new(
                            "Accepted",
                            false,
                            "NoMatchingParent",
                            format!(
                                "Gateway {} is not accepted",
                                NamespacedName::new(&parent.namespace, &parent.name)
                            ),
                        ),
                    },
                }
            })
            .collect();
        for (parent, attachment) in route.parents.iter_mut().zip(attachments) {
            if let Some(gw) =
                gateways.get_mut(&NamespacedName::new(&parent.namespace, &parent.name).key())
            {
                for l in gw
                    .listeners
                    .iter_mut()
                    .filter(|l| attachment.listeners.contains(&l.name))
                {
                    l.attached_routes.push(key.clone());
                }
            }
            parent.attachment = attachment;
        }
    }
}

/// Whether a listener hostname and a route hostname can match the same request.
pub fn hostnames_intersect(listener: &str, route: &str) -> bool {
    fn covers(wild: &str, name: &str) -> bool {
        // `*.example.com` covers `a.example.com` and `a.b.example.com`, not `example.com`.
        wild.strip_prefix('*')
            .is_some_and(|suffix| name.len() > suffix.len() && name.ends_with(suffix))
    }
    listener == route || covers(listener, route) || covers(route, listener)
}

/// Attaches `route` to `gateway` through `parent`, following the listener rules: section name
/// and port, protocol, allowed namespaces, then hostnames.
pub fn attach(
    route: &HttpRoute,
    parent: &RouteParent,
    gateway: &IngressGateway,
    namespaces: &BTreeMap<String, Namespace>,
) -> Attachment {
    let route_ns = route.namespace.as_str();
    let port = parent.port;
    let matching: Vec<_> = gateway
        .listeners
        .iter()
        .filter(|l| parent.section_name.as_deref().is_none_or(|s| s == l.name))
        .filter(|l| port.is_none_or(|p| p == l.port))
        .collect();
    let gw_name = NamespacedName::new(&gateway.namespace, &gateway.name);
    let fail = |reason: &'static str, message: String| Attachment {
        listeners: vec![],
        accepted: Cond::new("Accepted", false, reason, message),
    };
    if matching.is_empty() {
        return fail(
            "NoMatchingParent",
            format!(
                "Gateway {gw_name} has no listener{}{}",
                parent
                    .section_name
                    .as_ref()
                    .map(|s| format!(" named {s}"))
                    .unwrap_or_default(),
                port.map(|p| format!(" on port {p}")).unwrap_or_default()
            ),
        );
    }
    let ns_labels = namespaces.get(route_ns).map(|n| &n.labels);
    let allowed: Vec<_> = matching
        .iter()
        .filter(|l| l.protocol.carries_http())
        .filter(|l| match &l.allowed_namespaces {
            AllowedNamespaces::Same => route_ns == gateway.namespace,
            AllowedNamespaces::All => true,
            AllowedNamespaces::Selector(sel) => {
                ns_labels.is_some_and(|labels| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
            }
        })
        .collect();
    if allowed.is_empty() {
        return fail(
            "NotAllowedByListeners",
            format!("no listener of Gateway {gw_name} allows HTTPRoutes from namespace {route_ns}"),
        );
    }
    let hosts = &route.hostnames;
    let listeners: Vec<String> = allowed
        .iter()
        .filter(|l| match &l.hostname {
            None => true,
            Some(lh) => hosts.is_empty() || hosts.iter().any(|h| hostnames_intersect(lh, h)),
        })
        .map(|l| l.name.clone())
        .collect();
    if listeners.is_empty() {
        return fail(
            "NoMatchingListenerHostname",
            format!("no listener hostname of Gateway {gw_name} matches {hosts:?}"),
        );
    }
    Attachment {
        listeners,
        accepted: Cond::new("Accepted", true, "Accepted", "accepted by Sluice"),
    }
}

/// `ResolvedRefs` of a route: every backend must be a Service that exists in `services` (keyed
/// `namespace/name`), of the route's namespace or of one whose ReferenceGrant permits it.
pub fn resolved_refs(
    route: &HTTPRoute,
    services: &BTreeMap<String, Service>,
    grants: &ReferenceGrants,
) -> Cond {
    let route_ns = route.metadata.namespace.as_deref().unwrap_or("default");
    for (i, rule) in route.spec.rules.iter().enumerate() {
        for (j, b) in rule.backend_refs.iter().enumerate() {
            let field = format!("spec.rules[{i}].backendRefs[{j}]");
            let group = b.group.as_deref().unwrap_or("");
            let kind = b.kind.as_deref().unwrap_or("Service");
            if !group.is_empty() || kind != "Service" {
                return Cond::new(
                    "ResolvedRefs",
                    false,
                    "InvalidKind",
                    format!("{field}: {kind}.{group} is not a Service"),
                );
            }
            let ns = b.namespace.as_deref().unwrap_or(route_ns);
            let service = NamespacedName::new(ns, &b.name);
            if !grants.permits(route_ref(route_ns, route), service_ref(ns, &b.name)) {
                return Cond::new(
                    "ResolvedRefs",
                    false,
                    "RefNotPermitted",
                    format!(
                        "{field}: Service {service} is in another namespace and no ReferenceGrant there permits it"
                    ),
                );
            }
            if !services.contains_key(&service.key()) {
                return Cond::new(
                    "ResolvedRefs",
                    false,
                    "BackendNotFound",
                    format!("{field}: Service {service} not found"),
                );
            }
        }
    }
    Cond::new(
        "ResolvedRefs",
        true,
        "ResolvedRefs",
        "all backends resolved",
    )
}

/// Whether `gw` (in `gw_ns`) may use the Secret `cert` names.
fn certificate_permitted(
    gw: &gateway_api::Gateway,
    gw_ns: &str,
    cert: &gateway_api::SecretObjectReference,
    grants: &ReferenceGrants,
) -> bool {
    let from = ObjectRef {
        group: gateway_api::GROUP,
        kind: "Gateway",
        namespace: gw_ns,
        name: gw.metadata.name.as_deref().unwrap_or(""),
    };
    let ns = cert.namespace.as_deref().unwrap_or(gw_ns);
    grants.permits(from, core_ref("Secret", ns, &cert.name))
}

/// An HTTPRoute as the referrer of a ReferenceGrant.
fn route_ref<'a>(namespace: &'a str, route: &'a HTTPRoute) -> ObjectRef<'a> {
    ObjectRef {
        group: gateway_api::GROUP,
        kind: "HTTPRoute",
        namespace,
        name: route.metadata.name.as_deref().unwrap_or(""),
    }
}

/// A core Service or Secret as the referent of a ReferenceGrant.
fn core_ref<'a>(kind: &'a str, namespace: &'a str, name: &'a str) -> ObjectRef<'a> {
    ObjectRef {
        group: "",
        kind,
        namespace,
        name,
    }
}

fn service_ref<'a>(namespace: &'a str, name: &'a str) -> ObjectRef<'a> {
    core_ref("Service", namespace, name)
}

/// The conditions of every listener in `gw`'s spec: `Accepted` (a protocol Sluice knows),
/// `ResolvedRefs` (route kinds and certificate references) and `Conflicted` (port sharing).
pub fn listener_conditions(
    gw: &gateway_api::Gateway,
    grants: &ReferenceGrants,
) -> Vec<ListenerConditions> {
    let gw_ns = gw.metadata.namespace.as_deref().unwrap_or("default");
    let listeners = &gw.spec.listeners;
    listeners
        .iter()
        .map(|l| {
            let protocol = ListenerProtocol::parse(&l.protocol);
            let accepted = match protocol {
                Some(_) => Cond::new("Accepted", true, "Accepted", "listener accepted"),
                None => Cond::new(
                    "Accepted",
                    false,
                    "UnsupportedProtocol",
                    format!("protocol {} is not supported", l.protocol),
                ),
            };
            let bad_kind = l.allowed_routes.as_ref().and_then(|a| {
                a.kinds.iter().find(|k| {
                    k.kind != gateway_api::HTTPRoute::kind(&())
                        || k.group.as_deref().unwrap_or(gateway_api::GROUP) != gateway_api::GROUP
                })
            });
            let bad_cert = l.tls.as_ref().and_then(|t| {
                t.certificate_refs.iter().find(|c| {
                    !c.group.as_deref().unwrap_or("").is_empty()
                        || c.kind.as_deref().unwrap_or("Secret") != "Secret"
                })
            });
            let foreign_cert = l.tls.as_ref().and_then(|t| {
                t.certificate_refs
                    .iter()
                    .find(|c| !certificate_permitted(gw, gw_ns, c, grants))
            });
            let resolved_refs = match (bad_kind, bad_cert.or(foreign_cert)) {
                (Some(k), _) => Cond::new(
                    "ResolvedRefs",
                    false,
                    "InvalidRouteKinds",
                    format!("route kind {} is not supported", k.kind),
                ),
                (None, Some(c)) if bad_cert.is_some() => Cond::new(
                    "ResolvedRefs",
                    false,
                    "InvalidCertificateRef",
                    format!("certificate reference {} is not a Secret", c.name),
                ),
                (None, Some(c)) => Cond::new(
                    "ResolvedRefs",
                    false,
                    "RefNotPermitted",
                    format!(
                        "certificate reference {}/{} is in another namespace and no ReferenceGrant there permits it",
                        c.namespace.as_deref().unwrap_or(gw_ns),
                        c.name
                    ),
                ),
                (None, None) => {
                    Cond::new("ResolvedRefs", true, "ResolvedRefs", "references resolved")
                }
            };
            let same_port: Vec<_> = listeners
                .iter()
                .filter(|o| o.name != l.name && o.port == l.port)
                .collect();
            let conflicted = if same_port.iter().any(|o| o.protocol != l.protocol) {
                Cond::new(
                    "Conflicted",
                    true,
                    "ProtocolConflict",
                    format!(
                        "another listener uses port {} with another protocol",
                        l.port
                    ),
                )
            } else if same_port.iter().any(|o| o.hostname == l.hostname) {
                Cond::new(
                    "Conflicted",
                    true,
                    "HostnameConflict",
                    format!(
                        "another listener uses port {} with the same hostname",
                        l.port
                    ),
                )
            } else {
                Cond::new("Conflicted", false, "NoConflicts", "no conflicts")
            };
            ListenerConditions {
                name: l.name.clone(),
                carries_http: protocol.is_some_and(ListenerProtocol::carries_http),
                accepted,
                resolved_refs,
                conflicted,
            }
        })
        .collect()
}

fn object_name(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

fn gateway(
    gw: &gateway_api::Gateway,
    grants: &ReferenceGrants,
    out: &mut Rejections,
) -> Option<IngressGateway> {
    let (namespace, name) = object_name(&gw.metadata);
    let mut reject = |field: String, message: String| {
        out.reject(
            &gateway_api::Gateway::qualified(),
            Some(&namespace),
            &name,
            &field,
            message,
        );
    };
    let mut names = BTreeSet::new();
    let mut listeners = Vec::new();
    for (i, l) in gw.spec.listeners.iter().enumerate() {
        if !names.insert(l.name.as_str()) {
            reject(
                format!("spec.listeners[{i}].name"),
                format!("{:?} names another listener too", l.name),
            );
            return None;
        }
        if let Some(h) = &l.hostname
            && !valid_hostname(h)
        {
            reject(
                format!("spec.listeners[{i}].hostname"),
                format!("{h:?} is not a host name"),
            );
            return None;
        }
        let Some(port) = u16::try_from(l.port).ok().filter(|p| *p > 0) else {
            reject(
                format!("spec.listeners[{i}].port"),
                format!("{} is not a port", l.port),
            );
            return None;
        };
        let protocol = ListenerProtocol::parse(&l.protocol);
        if l.tls.is_some()
            && matches!(
                protocol,
                Some(ListenerProtocol::Http | ListenerProtocol::Tcp | ListenerProtocol::Udp)
            )
        {
            reject(
                format!("spec.listeners[{i}].tls"),
                format!("must not be set for protocol {}", l.protocol),
            );
            return None;
        }
        // A protocol Sluice does not know leaves this listener out; the status says why.
        let Some(protocol) = protocol else { continue };
        let namespaces = l
            .allowed_routes
            .as_ref()
            .and_then(|a| a.namespaces.as_ref());
        let allowed_namespaces = match namespaces.and_then(|n| n.from.as_deref()) {
            None | Some("Same") => AllowedNamespaces::Same,
            Some("All") => AllowedNamespaces::All,
            Some("Selector") => {
                let selector = namespaces.and_then(|n| n.selector.as_ref());
                if selector
                    .is_some_and(|s| s.match_expressions.as_ref().is_some_and(|e| !e.is_empty()))
                {
                    reject(
                        format!(
                            "spec.listeners[{i}].allowedRoutes.namespaces.selector.matchExpressions"
                        ),
                        "not supported; use matchLabels".into(),
                    );
                    return None;
                }
                AllowedNamespaces::Selector(
                    selector
                        .and_then(|s| s.match_labels.clone())
                        .unwrap_or_default(),
                )
            }
            Some(other) => {
                reject(
                    format!("spec.listeners[{i}].allowedRoutes.namespaces.from"),
                    format!("{other:?} is not All, Same or Selector"),
                );
                return None;
            }
        };
        listeners.push(IngressListener {
            name: l.name.clone(),
            port,
            protocol,
            hostname: l.hostname.clone(),
            allowed_namespaces,
            attached_routes: Vec::new(),
            certificates: l
                .tls
                .iter()
                .flat_map(|t| &t.certificate_refs)
                .filter(|c| certificate_permitted(gw, &namespace, c, grants))
                .map(|c| {
                    NamespacedName::new(c.namespace.as_deref().unwrap_or(&namespace), &c.name).key()
                })
                .collect(),
        });
    }
    Some(IngressGateway {
        class: gw.spec.gateway_class_name.clone(),
        selector: None,
        instances: Vec::new(),
        addresses: Vec::new(),
        listeners,
        listener_conditions: listener_conditions(gw, grants),
        namespace,
        name,
    })
}

fn http_match(m: &HttpRouteMatch, field: &str) -> Result<HttpMatch, (String, String)> {
    let path = m.path.clone().unwrap_or_default();
    let value = path.value.unwrap_or_else(|| "/".into());
    let path = match path.type_.as_deref().unwrap_or("PathPrefix") {
        "Exact" | "PathPrefix" if !value.starts_with('/') => {
            return Err((
                format!("{field}.path.value"),
                format!("{value:?} does not start with /"),
            ));
        }
        "Exact" => PathMatch::Exact(value),
        "PathPrefix" => PathMatch::Prefix(value),
        "RegularExpression" => PathMatch::RegularExpression(value),
        other => {
            return Err((
                format!("{field}.path.type"),
                format!("{other:?} is not Exact, PathPrefix or RegularExpression"),
            ));
        }
    };
    if let PathMatch::RegularExpression(re) = &path {
        http_filters::check_regex(re, &format!("{field}.path.value"))?;
    }
    let mut headers = BTreeMap::new();
    for (k, h) in m.headers.iter().enumerate() {
        let v = http_filters::value_match(
            h.type_.as_deref(),
            &h.value,
            &format!("{field}.headers[{k}]"),
        )?;
        headers.insert(h.name.to_ascii_lowercase(), v);
    }
    let mut query = BTreeMap::new();
    for (k, q) in m.query_params.iter().enumerate() {
        let v = http_filters::value_match(
            q.type_.as_deref(),
            &q.value,
            &format!("{field}.queryParams[{k}]"),
        )?;
        query.insert(q.name.clone(), v);
    }
    Ok(HttpMatch {
        path,
        headers,
        query,
        method: m.method.clone(),
    })
}

fn http_route(
    route: &HTTPRoute,
    services: &BTreeMap<String, Service>,
    grants: &ReferenceGrants,
    out: &mut Rejections,
) -> Option<HttpRoute> {
    let (namespace, name) = object_name(&route.metadata);
    let mut reject = |field: String, message: String| {
        out.reject(
            &gateway_api::HTTPRoute::qualified(),
            Some(&namespace),
            &name,
            &field,
            message,
        );
    };
    for (i, h) in route.spec.hostnames.iter().enumerate() {
        if !valid_hostname(h) {
            reject(
                format!("spec.hostnames[{i}]"),
                format!("{h:?} is not a host name"),
            );
            return None;
        }
    }
    let parents = route
        .spec
        .parent_refs
        .iter()
        .filter(|p| {
            p.group.as_deref().unwrap_or(gateway_api::GROUP) == gateway_api::GROUP
                && p.kind.as_deref().unwrap_or("Gateway") == "Gateway"
        })
        .map(|p| RouteParent {
            namespace: p.namespace.clone().unwrap_or_else(|| namespace.clone()),
            name: p.name.clone(),
            section_name: p.section_name.clone(),
            port: p.port.and_then(|p| u16::try_from(p).ok()),
            // Decided once every Gateway is known (`attach_all`).
            attachment: Attachment {
                listeners: vec![],
                accepted: Cond::new("Accepted", false, "Pending", ""),
            },
        })
        .collect();
    let mut rules = Vec::new();
    for (i, rule) in route.spec.rules.iter().enumerate() {
        let mut matches = Vec::new();
        for (j, m) in rule.matches.iter().enumerate() {
            match http_match(m, &format!("spec.rules[{i}].matches[{j}]")) {
                Ok(m) => matches.push(m),
                Err((field, message)) => {
                    reject(field, message);
                    return None;
                }
            }
        }
        if matches.is_empty() {
            matches.push(HttpMatch {
                path: PathMatch::Prefix("/".into()),
                headers: BTreeMap::new(),
                query: BTreeMap::new(),
                method: None,
            });
        }
        let mut backends = Vec::new();
        for (j, b) in rule.backend_refs.iter().enumerate() {
            let is_service = b.group.as_deref().unwrap_or("").is_empty()
                && b.kind.as_deref().unwrap_or("Service") == "Service";
            let ns = b.namespace.as_deref().unwrap_or(&namespace);
            let service = NamespacedName::new(ns, &b.name);
            let weight = b.weight.and_then(|w| u32::try_from(w).ok()).unwrap_or(1);
            let port = b
                .port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0);
            // What the spec answers with 500 for its share of requests.
            let invalid = if !is_service {
                Some(format!(
                    "backend {} {} is not a Service",
                    b.kind.as_deref().unwrap_or("Service"),
                    b.name
                ))
            } else if !grants.permits(route_ref(&namespace, route), service_ref(ns, &b.name)) {
                Some(format!(
                    "Service {service} is in another namespace and no ReferenceGrant there permits it"
                ))
            } else if !services.contains_key(&service.key()) {
                Some(format!("Service {service} not found"))
            } else {
                None
            };
            let port = match (port, is_service) {
                (Some(p), _) => p,
                (None, false) => 0,
                (None, true) => {
                    reject(
                        format!("spec.rules[{i}].backendRefs[{j}].port"),
                        "a Service backend needs a port".into(),
                    );
                    return None;
                }
            };
            backends.push(HttpBackend {
                service: service.key(),
                port,
                weight,
                invalid,
            });
        }
        let mut filters = Vec::new();
        for (j, f) in rule.filters.iter().enumerate() {
            match http_filters::filter(f, &format!("spec.rules[{i}].filters[{j}]")) {
                Ok(Some(f)) => filters.push(f),
                Ok(None) => {}
                Err((field, message)) => {
                    reject(field, message);
                    return None;
                }
            }
        }
        let timeouts = match http_filters::timeouts(
            rule.timeouts.as_ref(),
            &format!("spec.rules[{i}].timeouts"),
        ) {
            Ok(t) => t,
            Err((field, message)) => {
                reject(field, message);
                return None;
            }
        };
        rules.push(HttpRule {
            matches,
            backends,
            filters,
            timeouts,
        });
    }
    Some(HttpRoute {
        resolved_refs: resolved_refs(route, services, grants),
        hostnames: route.spec.hostnames.clone(),
        parents,
        rules,
        created: route
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        namespace,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::http_filters::ValueMatch;

    fn parse(yaml: &str) -> ResourceSet {
        ResourceSet::from_yaml(yaml).expect("known kinds")
    }

    const WORLD: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: web, namespace: ingress}
spec:
  gatewayClassName: sluice
  listeners:
  - {name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}
  - {name: quic, port: 443, protocol: example.com/QUIC}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop, namespace: shop}
spec:
  parentRefs: [{name: web, namespace: ingress}]
  hostnames: [shop.example.com]
  rules:
  - matches: [{path: {type: Exact, value: /cart}, headers: [{name: X-Canary, value: "1"}]}]
    backendRefs: [{name: cart, port: 8080, weight: 3}, {group: example.com, kind: Bucket, name: b}]
  - backendRefs: [{name: home, namespace: web, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: relative, namespace: shop}
spec:
  rules: [{matches: [{path: {type: PathPrefix, value: cart}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: twice, namespace: ingress}
spec:
  gatewayClassName: sluice
  listeners: [{name: a, port: 80, protocol: HTTP}, {name: a, port: 81, protocol: HTTP}]
"#;

    #[test]
    fn gateways_keep_the_listeners_they_can_serve() {
        let mut out = Rejections::default();
        let ingress = build(&parse(WORLD), &BTreeMap::new(), &BTreeMap::new(), &mut out);
        let web = &ingress.gateways["ingress/web"];
        assert_eq!(web.class, "sluice");
        assert_eq!(web.listeners.len(), 1, "the QUIC listener is left out");
        assert_eq!(web.listeners[0].protocol, ListenerProtocol::Http);
        assert_eq!(web.listeners[0].allowed_namespaces, AllowedNamespaces::All);
    }

    #[test]
    fn routes_default_their_matches_and_namespaces() {
        let mut out = Rejections::default();
        let ingress = build(&parse(WORLD), &BTreeMap::new(), &BTreeMap::new(), &mut out);
        let shop = &ingress.routes["shop/shop"];
        assert_eq!(shop.parents[0].namespace, "ingress");
        let first = &shop.rules[0];
        assert_eq!(first.matches[0].path, PathMatch::Exact("/cart".into()));
        assert_eq!(
            first.matches[0].headers["x-canary"],
            ValueMatch::Exact("1".into())
        );
        assert_eq!(first.backends.len(), 2, "{:?}", first.backends);
        assert_eq!(
            (
                first.backends[0].service.as_str(),
                first.backends[0].port,
                first.backends[0].weight
            ),
            ("shop/cart", 8080, 3)
        );
        // No Service exists in this build, and a Bucket is no Service: both answer 500.
        assert_eq!(
            first.backends[0].invalid.as_deref(),
            Some("Service shop/cart not found")
        );
        assert!(
            first.backends[1]
                .invalid
                .as_deref()
                .is_some_and(|w| w.contains("is not a Service")),
            "the Bucket backend is not a Service: {:?}",
            first.backends[1]
        );
        let second = &shop.rules[1];
        assert_eq!(second.matches[0].path, PathMatch::Prefix("/".into()));
        assert_eq!(second.backends[0].service, "web/home");
    }

    #[test]
    fn invalid_resources_are_rejected_naming_the_field() {
        let mut out = Rejections::default();
        let ingress = build(&parse(WORLD), &BTreeMap::new(), &BTreeMap::new(), &mut out);
        assert!(!ingress.routes.contains_key("shop/relative"));
        assert!(!ingress.gateways.contains_key("ingress/twice"));
        let fields: Vec<(&str, &str)> = out
            .0
            .iter()
            .map(|r| (r.name.as_str(), r.field.as_str()))
            .collect();
        assert!(
            fields.contains(&("relative", "spec.rules[0].matches[0].path.value")),
            "{fields:?}"
        );
        assert!(
            fields.contains(&("twice", "spec.listeners[1].name")),
            "{fields:?}"
        );
        assert_eq!(out.0.len(), 2);
    }

    #[test]
    fn hostnames_follow_the_gateway_api_rules() {
        for ok in ["example.com", "*.example.com", "a-b.c"] {
            assert!(valid_hostname(ok), "{ok}");
        }
        for bad in ["", "10.0.0.1", "Example.com", "a..b", "-a.b", "*", "a.b:80"] {
            assert!(!valid_hostname(bad), "{bad}");
        }
    }

    /// A mesh with two namespaces (one labelled for a listener's selector), a Service, and a
    /// Gateway whose HTTP listener admits `*.example.com` routes from labelled namespaces.
    const ATTACH_WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {expose: "yes"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: hidden}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIP: 10.96.0.5, ports: [{port: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: web, namespace: ingress, generation: 3}
spec:
  gatewayClassName: sluice
  listeners:
  - {name: http, port: 80, protocol: HTTP, hostname: "*.example.com", allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {expose: "yes"}}}}}
  - {name: udp, port: 53, protocol: UDP}
  - {name: quic, port: 443, protocol: example.com/QUIC}
"#;

    fn attach_world(routes: &str) -> crate::state::MeshState {
        let set = parse(&format!("{ATTACH_WORLD}---\n{routes}"));
        let out = crate::state::build(&set, &crate::state::MeshSettings::default());
        assert!(out.rejections.is_empty(), "{:?}", out.rejections);
        out.state
    }

    fn accepted<'a>(state: &'a crate::state::MeshState, route: &str) -> &'a Attachment {
        &state.ingress.routes[route].parents[0].attachment
    }

    #[test]
    fn routes_attach_by_namespace_selector_and_hostname() {
        let route = |ns: &str, name: &str, spec: &str| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                 metadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n---\n"
            )
        };
        let parent = "parentRefs: [{name: web, namespace: ingress";
        let state = attach_world(
            &[
                route(
                    "shop",
                    "ok",
                    &format!("{{{parent}}}], hostnames: [a.example.com]}}"),
                ),
                route("hidden", "wrong-ns", &format!("{{{parent}}}]}}")),
                route(
                    "shop",
                    "wrong-host",
                    &format!("{{{parent}}}], hostnames: [example.org]}}"),
                ),
                route(
                    "shop",
                    "wrong-section",
                    &format!("{{{parent}, sectionName: nope}}]}}"),
                ),
                route("shop", "wrong-port", &format!("{{{parent}, port: 81}}]}}")),
                route("shop", "no-gateway", "{parentRefs: [{name: gone}]}"),
            ]
            .concat(),
        );
        let ok = accepted(&state, "shop/ok");
        assert_eq!(ok.listeners, vec!["http"]);
        assert_eq!((ok.accepted.status, ok.accepted.reason), (true, "Accepted"));
        for (route, reason) in [
            ("hidden/wrong-ns", "NotAllowedByListeners"),
            ("shop/wrong-host", "NoMatchingListenerHostname"),
            ("shop/wrong-section", "NoMatchingParent"),
            ("shop/wrong-port", "NoMatchingParent"),
            ("shop/no-gateway", "NoMatchingParent"),
        ] {
            let a = accepted(&state, route);
            assert!(a.listeners.is_empty(), "{route}");
            assert_eq!(
                (a.accepted.status, a.accepted.reason),
                (false, reason),
                "{route}"
            );
        }
        assert_eq!(
            accepted(&state, "shop/no-gateway").accepted.message,
            "Gateway shop/gone is not accepted"
        );
        // The listener lists what attached to it; the UDP listener takes no HTTPRoutes.
        let gw = &state.ingress.gateways["ingress/web"];
        assert_eq!(gw.listeners[0].attached_routes, vec!["shop/ok"]);
        assert!(gw.listeners[1].attached_routes.is_empty());
    }

    #[test]
    fn hostnames_intersect_with_wildcards_on_either_side() {
        assert!(hostnames_intersect("*.example.com", "a.example.com"));
        assert!(hostnames_intersect("a.b.example.com", "*.example.com"));
        assert!(hostnames_intersect("a.example.com", "a.example.com"));
        assert!(!hostnames_intersect("*.example.com", "example.com"));
        assert!(!hostnames_intersect("a.example.com", "b.example.com"));
    }

    #[test]
    fn backends_resolve_to_services_of_the_route_namespace() {
        let state = attach_world("");
        let r = |b: &str| -> HTTPRoute {
            serde_yaml::from_str(&format!(
                "metadata: {{name: r, namespace: shop}}\nspec: {{rules: [{{backendRefs: [{b}]}}]}}"
            ))
            .expect("route")
        };
        let reason =
            |b: &str| resolved_refs(&r(b), &state.services, &state.ingress.reference_grants).reason;
        assert_eq!(reason("{name: cart, port: 8080}"), "ResolvedRefs");
        assert_eq!(reason("{name: gone, port: 8080}"), "BackendNotFound");
        assert_eq!(
            reason("{name: cart, namespace: web, port: 8080}"),
            "RefNotPermitted"
        );
        assert_eq!(
            reason("{group: example.com, kind: Bucket, name: b}"),
            "InvalidKind"
        );
        // The normalised route carries the same answer.
        let state = attach_world(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {name: r, namespace: shop}\nspec: {rules: [{backendRefs: [{name: gone, port: 80}]}]}",
        );
        assert_eq!(
            state.ingress.routes["shop/r"].resolved_refs.reason,
            "BackendNotFound"
        );
    }

    #[test]
    fn a_cross_namespace_backend_needs_a_reference_grant_in_its_namespace() {
        let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {name: r, namespace: web}\n\
             spec: {rules: [{backendRefs: [{name: cart, namespace: shop, port: 8080}]}]}\n---\n";
        let grant = |name: &str| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\n\
                 metadata: {{name: g, namespace: shop}}\n\
                 spec: {{from: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: web}}], \
                 to: [{{group: \"\", kind: Service, name: {name}}}]}}\n"
            )
        };
        let backend = |state: &crate::state::MeshState| {
            let r = &state.ingress.routes["web/r"];
            (
                r.resolved_refs.reason,
                r.rules[0].backends[0].invalid.clone(),
            )
        };
        let (reason, invalid) = backend(&attach_world(route));
        assert_eq!(reason, "RefNotPermitted");
        assert!(invalid.is_some_and(|m| m.contains("ReferenceGrant")));
        // A grant for another Service of that namespace does not count.
        let (reason, _) = backend(&attach_world(&format!("{route}{}", grant("other"))));
        assert_eq!(reason, "RefNotPermitted");
        let (reason, invalid) = backend(&attach_world(&format!("{route}{}", grant("cart"))));
        assert_eq!((reason, invalid), ("ResolvedRefs", None));
    }

    #[test]
    fn a_certificate_in_another_namespace_needs_a_reference_grant() {
        let gw = |grant: &str| {
            attach_world(&format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
                 metadata: {{name: tls, namespace: ingress}}\n\
                 spec: {{gatewayClassName: sluice, listeners: [{{name: https, port: 443, protocol: HTTPS, \
                 tls: {{certificateRefs: [{{name: web-cert, namespace: certs}}]}}}}]}}\n---\n{grant}"
            ))
        };
        let state = gw("");
        let g = &state.ingress.gateways["ingress/tls"];
        assert_eq!(
            g.listener_conditions[0].resolved_refs.reason,
            "RefNotPermitted"
        );
        assert!(g.listeners[0].certificates.is_empty());
        let state = gw(
            "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\n\
             metadata: {name: g, namespace: certs}\n\
             spec: {from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: ingress}], \
             to: [{group: \"\", kind: Secret}]}\n",
        );
        let g = &state.ingress.gateways["ingress/tls"];
        assert_eq!(
            g.listener_conditions[0].resolved_refs.reason,
            "ResolvedRefs"
        );
        assert_eq!(g.listeners[0].certificates, ["certs/web-cert"]);
    }

    #[test]
    fn listener_conditions_cover_every_listener_of_the_spec() {
        let state = attach_world("");
        let conds = &state.ingress.gateways["ingress/web"].listener_conditions;
        let names: Vec<&str> = conds.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["http", "udp", "quic"]);
        assert!(conds[0].carries_http && !conds[1].carries_http);
        assert_eq!(conds[1].accepted.reason, "Accepted");
        assert_eq!(
            (conds[2].accepted.status, conds[2].accepted.reason),
            (false, "UnsupportedProtocol")
        );
        let none: [String; 0] = [];
        let one = ["gw-7f9c".to_owned()];
        assert_eq!(conds[2].programmed(false, &one).reason, "Invalid");
        assert_eq!(conds[0].programmed(false, &none).reason, "Pending");
        let served = conds[0].programmed(false, &one);
        assert!(served.status && served.reason == "Programmed", "{served:?}");
        assert_eq!(conds[0].programmed(true, &one).reason, "Invalid");
        assert_eq!(conds[0].conflicted.reason, "NoConflicts");
    }
}

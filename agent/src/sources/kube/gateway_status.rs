//! Gateway API status as the spec describes it, computed by pure functions: the Gateway's
//! `Accepted` and `Programmed` conditions, per-listener `Accepted`, `Programmed`, `ResolvedRefs`
//! and `Conflicted` with attached-route counts, and for each HTTPRoute one `parents` entry per
//! Gateway of Sluice's class with `Accepted` and `ResolvedRefs` — each with the spec's reasons and
//! `observedGeneration`.
//!
//! Limits: cross-namespace backends are `RefNotPermitted` (ReferenceGrants are not read),
//! certificate Secrets are not looked up (only their kind is checked), and `Programmed` means
//! "in every agent's MeshState", which is what serves ingress.
use std::collections::BTreeMap;

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

use crate::{
    resources::gateway_api::{
        self, Gateway, GatewayStatus, HTTPRoute, ListenerStatus, ParentReference, RouteGroupKind,
        RouteParentStatus,
    },
    state::{
        MeshState, Rejection,
        ingress::{AllowedNamespaces, IngressGateway, ListenerProtocol},
    },
};

/// What a condition says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Cond {
    fn new(
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

/// Turns `conds` into API conditions, keeping `lastTransitionTime` from `previous` where the
/// status did not change.
pub fn conditions(
    conds: &[Cond],
    generation: Option<i64>,
    previous: &[Condition],
    now: Timestamp,
) -> Vec<Condition> {
    conds
        .iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let since = previous
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == status)
                .map(|p| p.last_transition_time.clone())
                .unwrap_or(Time(now));
            Condition {
                type_: c.type_.to_owned(),
                status: status.to_owned(),
                reason: c.reason.to_owned(),
                message: c.message.clone(),
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

/// Whether two condition lists say the same (ignoring transition times).
pub fn same_conditions(a: &[Condition], b: &[Condition]) -> bool {
    let key = |c: &Condition| {
        (
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            c.message.clone(),
            c.observed_generation,
        )
    };
    let mut a: Vec<_> = a.iter().map(key).collect();
    let mut b: Vec<_> = b.iter().map(key).collect();
    a.sort();
    b.sort();
    a == b
}

fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

fn http_route_kind() -> RouteGroupKind {
    RouteGroupKind {
        group: Some(gateway_api::GROUP.to_owned()),
        kind: "HTTPRoute".to_owned(),
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

/// Outcome of attaching one route to one parent reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// Listener names the route attached to (empty: not accepted).
    pub listeners: Vec<String>,
    pub accepted: Cond,
}

/// Attaches `route` to `gateway` through `parent`, following the listener rules.
pub fn attach(
    route: &HTTPRoute,
    parent: &ParentReference,
    gateway: &IngressGateway,
    state: &MeshState,
) -> Attachment {
    let route_ns = route.metadata.namespace.as_deref().unwrap_or("default");
    let port = parent.port.and_then(|p| u16::try_from(p).ok());
    let matching: Vec<_> = gateway
        .listeners
        .iter()
        .filter(|l| parent.section_name.as_deref().is_none_or(|s| s == l.name))
        .filter(|l| port.is_none_or(|p| p == l.port))
        .collect();
    let fail = |reason: &'static str, message: String| Attachment {
        listeners: vec![],
        accepted: Cond::new("Accepted", false, reason, message),
    };
    if matching.is_empty() {
        return fail(
            "NoMatchingParent",
            format!(
                "Gateway {}/{} has no listener{}{}",
                gateway.namespace,
                gateway.name,
                parent
                    .section_name
                    .as_ref()
                    .map(|s| format!(" named {s}"))
                    .unwrap_or_default(),
                port.map(|p| format!(" on port {p}")).unwrap_or_default()
            ),
        );
    }
    let ns_labels = state.namespaces.get(route_ns).map(|n| &n.labels);
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
            format!(
                "no listener of Gateway {}/{} allows HTTPRoutes from namespace {route_ns}",
                gateway.namespace, gateway.name
            ),
        );
    }
    let hosts = &route.spec.hostnames;
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
            format!(
                "no listener hostname of Gateway {}/{} matches {hosts:?}",
                gateway.namespace, gateway.name
            ),
        );
    }
    Attachment {
        listeners,
        accepted: Cond::new("Accepted", true, "Accepted", "accepted by Sluice"),
    }
}

/// `ResolvedRefs` of a route: every backend must be a Service of the route's namespace that exists.
pub fn resolved_refs(route: &HTTPRoute, state: &MeshState) -> Cond {
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
            if ns != route_ns {
                return Cond::new(
                    "ResolvedRefs",
                    false,
                    "RefNotPermitted",
                    format!(
                        "{field}: Service {ns}/{} is in another namespace (ReferenceGrants are not supported)",
                        b.name
                    ),
                );
            }
            if !state.services.contains_key(&key(ns, &b.name)) {
                return Cond::new(
                    "ResolvedRefs",
                    false,
                    "BackendNotFound",
                    format!("{field}: Service {ns}/{} not found", b.name),
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

/// The status Sluice wants on an HTTPRoute: the entries of other controllers as they are, and one
/// entry per parent reference to a Gateway of `class`.
pub fn route_status(
    route: &HTTPRoute,
    rejection: Option<&Rejection>,
    gateways: &BTreeMap<String, &Gateway>,
    class: &str,
    state: &MeshState,
    now: Timestamp,
) -> Vec<RouteParentStatus> {
    let route_ns = route.metadata.namespace.as_deref().unwrap_or("default");
    let generation = route.metadata.generation;
    let previous = route
        .status
        .as_ref()
        .map(|s| s.parents.as_slice())
        .unwrap_or(&[]);
    let mut out: Vec<RouteParentStatus> = previous
        .iter()
        .filter(|p| p.controller_name != super::CONTROLLER_NAME)
        .cloned()
        .collect();
    for parent in &route.spec.parent_refs {
        let is_gateway = parent.group.as_deref().unwrap_or(gateway_api::GROUP)
            == gateway_api::GROUP
            && parent.kind.as_deref().unwrap_or("Gateway") == "Gateway";
        let gw_ns = parent.namespace.as_deref().unwrap_or(route_ns);
        let Some(gw) = gateways.get(&key(gw_ns, &parent.name)) else {
            continue;
        };
        if !is_gateway || gw.spec.gateway_class_name != class {
            continue;
        }
        let accepted = match (
            rejection,
            state.ingress.gateways.get(&key(gw_ns, &parent.name)),
        ) {
            (Some(r), _) => Cond::new(
                "Accepted",
                false,
                "UnsupportedValue",
                format!("{}: {}", r.field, r.message),
            ),
            (None, None) => Cond::new(
                "Accepted",
                false,
                "NoMatchingParent",
                format!("Gateway {gw_ns}/{} is not accepted", parent.name),
            ),
            (None, Some(ig)) => attach(route, parent, ig, state).accepted,
        };
        let resolved = resolved_refs(route, state);
        let prev = previous
            .iter()
            .find(|p| p.controller_name == super::CONTROLLER_NAME && &p.parent_ref == parent)
            .map(|p| p.conditions.as_slice())
            .unwrap_or(&[]);
        out.push(RouteParentStatus {
            parent_ref: parent.clone(),
            controller_name: super::CONTROLLER_NAME.to_owned(),
            conditions: conditions(&[accepted, resolved], generation, prev, now),
        });
    }
    out
}

/// Routes attached to each listener of the Gateway `namespace/name`.
pub fn attached_routes(
    gateway: &IngressGateway,
    routes: &[HTTPRoute],
    rejected_routes: &[&Rejection],
    state: &MeshState,
) -> BTreeMap<String, i32> {
    let mut counts = BTreeMap::new();
    for route in routes {
        let route_ns = route.metadata.namespace.as_deref().unwrap_or("default");
        let route_name = route.metadata.name.as_deref().unwrap_or("");
        if rejected_routes
            .iter()
            .any(|r| r.namespace.as_deref() == Some(route_ns) && r.name == route_name)
        {
            continue;
        }
        for parent in &route.spec.parent_refs {
            if parent.namespace.as_deref().unwrap_or(route_ns) != gateway.namespace
                || parent.name != gateway.name
            {
                continue;
            }
            for l in attach(route, parent, gateway, state).listeners {
                *counts.entry(l).or_insert(0) += 1;
            }
        }
    }
    counts
}

/// The status Sluice wants on a Gateway of its class.
pub fn gateway_status(
    gw: &Gateway,
    rejection: Option<&Rejection>,
    normalised: Option<&IngressGateway>,
    attached: &BTreeMap<String, i32>,
    now: Timestamp,
) -> GatewayStatus {
    let generation = gw.metadata.generation;
    let previous = gw.status.clone().unwrap_or_default();
    let mut listeners = Vec::new();
    let mut invalid_listeners = 0;
    for l in &gw.spec.listeners {
        let protocol = ListenerProtocol::parse(&l.protocol);
        let accepted = match protocol {
            Some(_) => Cond::new("Accepted", true, "Accepted", "listener accepted"),
            None => {
                invalid_listeners += 1;
                Cond::new(
                    "Accepted",
                    false,
                    "UnsupportedProtocol",
                    format!("protocol {} is not supported", l.protocol),
                )
            }
        };
        let bad_kind = l.allowed_routes.as_ref().and_then(|a| {
            a.kinds.iter().find(|k| {
                k.kind != "HTTPRoute"
                    || k.group.as_deref().unwrap_or(gateway_api::GROUP) != gateway_api::GROUP
            })
        });
        let bad_cert = l.tls.as_ref().and_then(|t| {
            t.certificate_refs.iter().find(|c| {
                !c.group.as_deref().unwrap_or("").is_empty()
                    || c.kind.as_deref().unwrap_or("Secret") != "Secret"
            })
        });
        let resolved = match (bad_kind, bad_cert) {
            (Some(k), _) => Cond::new(
                "ResolvedRefs",
                false,
                "InvalidRouteKinds",
                format!("route kind {} is not supported", k.kind),
            ),
            (None, Some(c)) => Cond::new(
                "ResolvedRefs",
                false,
                "InvalidCertificateRef",
                format!("certificate reference {} is not a Secret", c.name),
            ),
            (None, None) => Cond::new("ResolvedRefs", true, "ResolvedRefs", "references resolved"),
        };
        let same_port: Vec<_> = gw
            .spec
            .listeners
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
        let programmed_ok =
            rejection.is_none() && accepted.status && resolved.status && !conflicted.status;
        let programmed = if programmed_ok {
            Cond::new("Programmed", true, "Programmed", "listener programmed")
        } else {
            Cond::new("Programmed", false, "Invalid", "listener is not programmed")
        };
        let prev = previous
            .listeners
            .iter()
            .find(|p| p.name == l.name)
            .map(|p| p.conditions.as_slice())
            .unwrap_or(&[]);
        listeners.push(ListenerStatus {
            name: l.name.clone(),
            supported_kinds: if protocol.is_some_and(ListenerProtocol::carries_http) {
                vec![http_route_kind()]
            } else {
                vec![]
            },
            attached_routes: attached.get(&l.name).copied().unwrap_or(0),
            conditions: conditions(
                &[accepted, programmed, resolved, conflicted],
                generation,
                prev,
                now,
            ),
        });
    }
    let usable = normalised.map_or(0, |g| g.listeners.len());
    let (accepted, programmed) = match rejection {
        Some(r) => (
            Cond::new(
                "Accepted",
                false,
                "Invalid",
                format!("{}: {}", r.field, r.message),
            ),
            Cond::new(
                "Programmed",
                false,
                "Invalid",
                "the Gateway is not accepted",
            ),
        ),
        None if usable == 0 => (
            Cond::new(
                "Accepted",
                false,
                "ListenersNotValid",
                "no listener is valid",
            ),
            Cond::new("Programmed", false, "Invalid", "no listener is valid"),
        ),
        None if invalid_listeners > 0 => (
            Cond::new(
                "Accepted",
                true,
                "ListenersNotValid",
                format!("{invalid_listeners} listener(s) are not valid; the others are served"),
            ),
            Cond::new(
                "Programmed",
                true,
                "Programmed",
                "programmed in every Sluice agent",
            ),
        ),
        None => (
            Cond::new("Accepted", true, "Accepted", "accepted by Sluice"),
            Cond::new(
                "Programmed",
                true,
                "Programmed",
                "programmed in every Sluice agent",
            ),
        ),
    };
    GatewayStatus {
        addresses: previous.addresses.clone(),
        conditions: conditions(
            &[accepted, programmed],
            generation,
            &previous.conditions,
            now,
        ),
        listeners,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{resources::ResourceSet, state};

    fn world(extra: &str) -> (ResourceSet, MeshState, Vec<Rejection>) {
        let yaml = format!(
            r#"
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{expose: "yes"}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: hidden}}
---
apiVersion: v1
kind: Service
metadata: {{name: cart, namespace: shop}}
spec: {{clusterIP: 10.96.0.5, ports: [{{port: 8080}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: web, namespace: ingress, generation: 3}}
spec:
  gatewayClassName: sluice
  listeners:
  - {{name: http, port: 80, protocol: HTTP, hostname: "*.example.com", allowedRoutes: {{namespaces: {{from: Selector, selector: {{matchLabels: {{expose: "yes"}}}}}}}}}}
  - {{name: udp, port: 53, protocol: UDP}}
  - {{name: quic, port: 443, protocol: example.com/QUIC}}
{extra}"#
        );
        let mut set = ResourceSet::default();
        for (i, doc) in serde_yaml::Deserializer::from_str(&yaml).enumerate() {
            let value: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("yaml");
            if !value.is_null() {
                set.add_document(i, value).expect("known kind");
            }
        }
        let out = state::build(&set, &state::MeshSettings::default());
        (set, out.state, out.rejections)
    }

    fn route(yaml: &str) -> HTTPRoute {
        serde_yaml::from_str(yaml).expect("route")
    }

    fn cond<'a>(conds: &'a [Condition], t: &str) -> (&'a str, &'a str) {
        let c = conds
            .iter()
            .find(|c| c.type_ == t)
            .unwrap_or_else(|| panic!("no {t}"));
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn routes_attach_by_namespace_selector_and_hostname() {
        let (set, state, _) = world("");
        let gw = &state.ingress.gateways["ingress/web"];
        let parent = ParentReference {
            name: "web".into(),
            namespace: Some("ingress".into()),
            ..Default::default()
        };
        let ok = route("metadata: {name: r, namespace: shop}\nspec: {hostnames: [a.example.com]}");
        assert_eq!(attach(&ok, &parent, gw, &state).listeners, vec!["http"]);
        let wrong_ns = route("metadata: {name: r, namespace: hidden}\nspec: {}");
        assert_eq!(
            attach(&wrong_ns, &parent, gw, &state).accepted.reason,
            "NotAllowedByListeners"
        );
        let wrong_host =
            route("metadata: {name: r, namespace: shop}\nspec: {hostnames: [example.org]}");
        assert_eq!(
            attach(&wrong_host, &parent, gw, &state).accepted.reason,
            "NoMatchingListenerHostname"
        );
        let wrong_section = ParentReference {
            section_name: Some("nope".into()),
            ..parent.clone()
        };
        assert_eq!(
            attach(&ok, &wrong_section, gw, &state).accepted.reason,
            "NoMatchingParent"
        );
        assert_eq!(set.gateways.len(), 1);
    }

    #[test]
    fn backends_resolve_to_services_of_the_route_namespace() {
        let (_, state, _) = world("");
        let r = |b: &str| {
            route(&format!(
                "metadata: {{name: r, namespace: shop}}\nspec: {{rules: [{{backendRefs: [{b}]}}]}}"
            ))
        };
        assert_eq!(
            resolved_refs(&r("{name: cart, port: 8080}"), &state).reason,
            "ResolvedRefs"
        );
        assert_eq!(
            resolved_refs(&r("{name: gone, port: 8080}"), &state).reason,
            "BackendNotFound"
        );
        assert_eq!(
            resolved_refs(&r("{name: cart, namespace: web, port: 8080}"), &state).reason,
            "RefNotPermitted"
        );
        assert_eq!(
            resolved_refs(&r("{group: example.com, kind: Bucket, name: b}"), &state).reason,
            "InvalidKind"
        );
    }

    #[test]
    fn gateway_conditions_follow_the_spec() {
        let (set, state, rejections) = world("");
        assert!(rejections.is_empty(), "{rejections:?}");
        let gw = &set.gateways[0];
        let attached = BTreeMap::from([("http".to_owned(), 2)]);
        let now = Timestamp::now();
        let s = gateway_status(
            gw,
            None,
            state.ingress.gateways.get("ingress/web"),
            &attached,
            now,
        );
        assert_eq!(
            cond(&s.conditions, "Accepted"),
            ("True", "ListenersNotValid")
        );
        assert_eq!(cond(&s.conditions, "Programmed"), ("True", "Programmed"));
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
        let http = &s.listeners[0];
        assert_eq!(http.attached_routes, 2);
        assert_eq!(http.supported_kinds, vec![http_route_kind()]);
        assert_eq!(
            cond(&http.conditions, "Conflicted"),
            ("False", "NoConflicts")
        );
        let udp = &s.listeners[1];
        assert!(udp.supported_kinds.is_empty());
        assert_eq!(cond(&udp.conditions, "Accepted"), ("True", "Accepted"));
        let quic = &s.listeners[2];
        assert_eq!(
            cond(&quic.conditions, "Accepted"),
            ("False", "UnsupportedProtocol")
        );
        assert_eq!(cond(&quic.conditions, "Programmed"), ("False", "Invalid"));

        let r = Rejection {
            kind: "Gateway.gateway.networking.k8s.io".into(),
            namespace: Some("ingress".into()),
            name: "web".into(),
            field: "spec.listeners[0].hostname".into(),
            message: "bad".into(),
        };
        let s2 = gateway_status(gw, Some(&r), None, &attached, now);
        assert_eq!(cond(&s2.conditions, "Accepted"), ("False", "Invalid"));
        let msg = &s2.conditions[0].message;
        assert!(msg.contains("spec.listeners[0].hostname"), "{msg}");
    }

    #[test]
    fn transition_times_survive_unchanged_status() {
        let then = Timestamp::from_second(1_000_000).expect("time");
        let first = conditions(
            &[Cond::new("Accepted", true, "Accepted", "x")],
            Some(1),
            &[],
            then,
        );
        let later = conditions(
            &[Cond::new("Accepted", true, "Accepted", "x")],
            Some(2),
            &first,
            Timestamp::now(),
        );
        assert_eq!(later[0].last_transition_time.0, then);
        let flipped = conditions(
            &[Cond::new("Accepted", false, "Invalid", "x")],
            Some(2),
            &first,
            Timestamp::now(),
        );
        assert_ne!(flipped[0].last_transition_time.0, then);
        assert!(!same_conditions(&first, &later), "generation differs");
    }

    #[test]
    fn route_status_keeps_other_controllers_entries() {
        let (set, state, _) = world("");
        let gateways: BTreeMap<String, &Gateway> = set
            .gateways
            .iter()
            .map(|g| ("ingress/web".to_owned(), g))
            .collect();
        let mut r = route(
            "metadata: {name: r, namespace: shop, generation: 7}\nspec: {parentRefs: [{name: web, namespace: ingress}, {name: other, namespace: ingress}], rules: [{backendRefs: [{name: cart, port: 8080}]}]}\nstatus: {parents: [{parentRef: {name: other, namespace: ingress}, controllerName: example.com/other, conditions: []}]}",
        );
        let s = route_status(&r, None, &gateways, "sluice", &state, Timestamp::now());
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].controller_name, "example.com/other");
        let ours = &s[1];
        assert_eq!(cond(&ours.conditions, "Accepted"), ("True", "Accepted"));
        assert_eq!(
            cond(&ours.conditions, "ResolvedRefs"),
            ("True", "ResolvedRefs")
        );
        assert_eq!(ours.conditions[0].observed_generation, Some(7));
        r.spec.parent_refs.truncate(1);
        let not_ours = route_status(&r, None, &gateways, "other-class", &state, Timestamp::now());
        assert_eq!(not_ours.len(), 1, "only the other controller's entry");
    }
}

//! Gateway API status as the spec describes it, written from what `state::build` decided
//! ([`state::ingress`](crate::state::ingress)): the Gateway's `Accepted` and `Programmed`
//! conditions, per-listener `Accepted`, `Programmed`, `ResolvedRefs` and `Conflicted` with
//! attached-route counts, and for each HTTPRoute one `parents` entry per Gateway of Sluice's class
//! with `Accepted` and `ResolvedRefs` — each with the spec's reasons and `observedGeneration`.
//! These functions only turn those answers (and rejections) into API conditions.
//!
//! `Programmed` is `True` only while a ready gateway instance serves the Gateway (see
//! [`IngressGateway::instances`](crate::state::ingress::IngressGateway)). Cross-namespace
//! references hold only with a ReferenceGrant. Limit: certificate Secrets are not looked up (only
//! their kind and namespace are checked), since gateways read their certificates from files.
use std::{borrow::Cow, collections::BTreeMap};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::Resource;

use crate::{
    resources::{
        NamespacedName,
        gateway_api::{
            self, Gateway, GatewayStatus, HTTPRoute, ListenerStatus, ParentReference,
            RouteGroupKind, RouteParentStatus,
        },
    },
    state::{
        MeshState, Rejection,
        ingress::{self, Cond, IngressGateway, RouteParent},
        reference_grants::ReferenceGrants,
    },
};

/// The controller name Sluice writes into Gateway API route status.
pub const CONTROLLER_NAME: &str = "sluice.dev/gateway-controller";

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

fn http_route_kind() -> RouteGroupKind {
    RouteGroupKind {
        group: Some(gateway_api::GROUP.to_owned()),
        kind: HTTPRoute::kind(&()).into_owned(),
    }
}

/// The parent of the normalised route `route_key` that `parent` names.
fn state_parent<'a>(
    state: &'a MeshState,
    route_key: &str,
    gw_ns: &str,
    parent: &ParentReference,
) -> Option<&'a RouteParent> {
    let port = parent.port.and_then(|p| u16::try_from(p).ok());
    state
        .ingress
        .routes
        .get(route_key)?
        .parents
        .iter()
        .find(|p| {
            p.namespace == gw_ns
                && p.name == parent.name
                && p.section_name == parent.section_name
                && p.port == port
        })
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
    let route_key = NamespacedName::new(route_ns, route.metadata.name.as_deref().unwrap_or(""));
    let route_key = route_key.key();
    let generation = route.metadata.generation;
    let previous = route
        .status
        .as_ref()
        .map(|s| s.parents.as_slice())
        .unwrap_or(&[]);
    let mut out: Vec<RouteParentStatus> = previous
        .iter()
        .filter(|p| p.controller_name != CONTROLLER_NAME)
        .cloned()
        .collect();
    for parent in &route.spec.parent_refs {
        let is_gateway = parent.group.as_deref().unwrap_or(gateway_api::GROUP)
            == gateway_api::GROUP
            && parent.kind.as_deref().unwrap_or("Gateway") == Gateway::kind(&());
        let gw_ns = parent.namespace.as_deref().unwrap_or(route_ns);
        let gw_name = NamespacedName::new(gw_ns, &parent.name);
        let Some(gw) = gateways.get(&gw_name.key()) else {
            continue;
        };
        if !is_gateway || gw.spec.gateway_class_name != class {
            continue;
        }
        let decided = state_parent(state, &route_key, gw_ns, parent);
        let accepted = match (rejection, decided) {
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
                format!("Gateway {gw_name} is not accepted"),
            ),
            (None, Some(p)) => p.attachment.accepted.clone(),
        };
        // A rejected route is not in MeshState (or only its last valid version): its own backends
        // are judged by the same rule.
        let resolved = match (rejection, state.ingress.routes.get(&route_key)) {
            (None, Some(r)) => r.resolved_refs.clone(),
            _ => ingress::resolved_refs(route, &state.services, &state.ingress.reference_grants),
        };
        // Programmed: attached, and a ready gateway instance serves the parent Gateway (what
        // seed 000's AGC output shows on a route; the spec leaves routes without it).
        let instances = state
            .ingress
            .gateways
            .get(&gw_name.key())
            .map(|g| g.instances.as_slice())
            .unwrap_or(&[]);
        let programmed = match (accepted.status, instances) {
            (false, _) => Cond::new("Programmed", false, "Invalid", "the route is not accepted"),
            (true, []) => Cond::new("Programmed", false, "Pending", ingress::NOT_BOUND),
            (true, some) => Cond::new(
                "Programmed",
                true,
                "Programmed",
                format!("served by ready gateway instance(s) {}", some.join(", ")),
            ),
        };
        let prev = previous
            .iter()
            .find(|p| p.controller_name == CONTROLLER_NAME && &p.parent_ref == parent)
            .map(|p| p.conditions.as_slice())
            .unwrap_or(&[]);
        out.push(RouteParentStatus {
            parent_ref: parent.clone(),
            controller_name: CONTROLLER_NAME.to_owned(),
            conditions: conditions(&[accepted, resolved, programmed], generation, prev, now),
        });
    }
    out
}

/// Routes attached to each listener of `gateway`, leaving out rejected routes (whose last valid
/// version may still be attached in MeshState).
pub fn attached_routes(
    gateway: &IngressGateway,
    rejected_routes: &[&Rejection],
) -> BTreeMap<String, i32> {
    gateway
        .listeners
        .iter()
        .map(|l| {
            let count = l
                .attached_routes
                .iter()
                .filter(|key| {
                    !rejected_routes.iter().any(|r| {
                        r.namespace
                            .as_deref()
                            .is_some_and(|ns| NamespacedName::new(ns, &r.name).key() == **key)
                    })
                })
                .count();
            (l.name.clone(), i32::try_from(count).unwrap_or(i32::MAX))
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// The status Sluice wants on a Gateway of its class.
pub fn gateway_status(
    gw: &Gateway,
    grants: &ReferenceGrants,
    rejection: Option<&Rejection>,
    normalised: Option<&IngressGateway>,
    attached: &BTreeMap<String, i32>,
    now: Timestamp,
) -> GatewayStatus {
    let generation = gw.metadata.generation;
    let previous = gw.status.clone().unwrap_or_default();
    // The listeners of this version of the Gateway: as MeshState has them when it was accepted,
    // else judged now by the same rule.
    let decided = match (rejection, normalised) {
        (None, Some(g)) => Cow::Borrowed(&g.listener_conditions),
        _ => Cow::Owned(ingress::listener_conditions(gw, grants)),
    };
    let invalid_listeners = decided.iter().filter(|l| !l.accepted.status).count();
    let no_instances = Vec::new();
    let instances = normalised.map_or(&no_instances, |g| &g.instances);
    let served = || match &instances[..] {
        [] => Cond::new("Programmed", false, "Pending", ingress::NOT_BOUND),
        some => Cond::new(
            "Programmed",
            true,
            "Programmed",
            format!("bound by ready gateway instance(s) {}", some.join(", ")),
        ),
    };
    let mut listeners = Vec::new();
    for l in decided.iter() {
        let prev = previous
            .listeners
            .iter()
            .find(|p| p.name == l.name)
            .map(|p| p.conditions.as_slice())
            .unwrap_or(&[]);
        listeners.push(ListenerStatus {
            name: l.name.clone(),
            supported_kinds: if l.carries_http {
                vec![http_route_kind()]
            } else {
                vec![]
            },
            attached_routes: attached.get(&l.name).copied().unwrap_or(0),
            conditions: conditions(
                &[
                    l.accepted.clone(),
                    l.programmed(rejection.is_some(), instances),
                    l.resolved_refs.clone(),
                    l.conflicted.clone(),
                ],
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
            served(),
        ),
        None => (
            Cond::new("Accepted", true, "Accepted", "accepted by Sluice"),
            served(),
        ),
    };
    // Where the Gateway is reached, while an instance serves it; nothing otherwise.
    let addresses = match normalised {
        Some(g) if !g.instances.is_empty() => g
            .addresses
            .iter()
            .map(|a| gateway_api::GatewayStatusAddress {
                type_: Some("IPAddress".into()),
                value: a.to_string(),
            })
            .collect(),
        _ => Vec::new(),
    };
    GatewayStatus {
        addresses,
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
    fn attached_routes_count_the_state_s_attachments_but_not_rejected_routes() {
        let (_, state, _) = world(
            r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a, namespace: shop}
spec: {parentRefs: [{name: web, namespace: ingress}], hostnames: [a.example.com]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b, namespace: shop}
spec: {parentRefs: [{name: web, namespace: ingress}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: c, namespace: hidden}
spec: {parentRefs: [{name: web, namespace: ingress}]}"#,
        );
        let gw = &state.ingress.gateways["ingress/web"];
        assert_eq!(
            attached_routes(gw, &[]),
            BTreeMap::from([("http".into(), 2)])
        );
        let r = Rejection {
            kind: "HTTPRoute.gateway.networking.k8s.io".into(),
            namespace: Some("shop".into()),
            name: "b".into(),
            field: "f".into(),
            message: "m".into(),
        };
        assert_eq!(
            attached_routes(gw, &[&r]),
            BTreeMap::from([("http".into(), 1)])
        );
    }

    #[test]
    fn gateway_conditions_follow_the_spec() {
        let (set, state, rejections) = world("");
        assert!(rejections.is_empty(), "{rejections:?}");
        let gw = &set.gateways[0];
        assert_eq!(
            gateway_status(
                gw,
                &ReferenceGrants::default(),
                None,
                None,
                &BTreeMap::new(),
                Timestamp::now()
            )
            .listeners
            .len(),
            3,
            "without MeshState's answer the listeners are judged from the spec"
        );
        let attached = BTreeMap::from([("http".to_owned(), 2)]);
        let now = Timestamp::now();
        let s = gateway_status(
            gw,
            &ReferenceGrants::default(),
            None,
            state.ingress.gateways.get("ingress/web"),
            &attached,
            now,
        );
        assert_eq!(
            cond(&s.conditions, "Accepted"),
            ("True", "ListenersNotValid")
        );
        // Valid, but nothing listens: Programmed tells the truth.
        assert_eq!(cond(&s.conditions, "Programmed"), ("False", "Pending"));
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
        let s2 = gateway_status(
            gw,
            &ReferenceGrants::default(),
            Some(&r),
            None,
            &attached,
            now,
        );
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
        // The route as the store has it, and in MeshState (which decided its attachment).
        let yaml = "metadata: {name: r, namespace: shop, generation: 7}\nspec: {parentRefs: [{name: web, namespace: ingress}, {name: other, namespace: ingress}], rules: [{backendRefs: [{name: cart, port: 8080}]}]}\nstatus: {parents: [{parentRef: {name: other, namespace: ingress}, controllerName: example.com/other, conditions: []}]}";
        let (set, state, _) = world(&format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n{yaml}"
        ));
        let gateways: BTreeMap<String, &Gateway> = set
            .gateways
            .iter()
            .map(|g| ("ingress/web".to_owned(), g))
            .collect();
        let mut r = route(yaml);
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
        // Rejected: the rejection is the answer, and its backends are judged all the same.
        let rejection = Rejection {
            kind: "HTTPRoute.gateway.networking.k8s.io".into(),
            namespace: Some("shop".into()),
            name: "r".into(),
            field: "spec.hostnames[0]".into(),
            message: "bad".into(),
        };
        let s = route_status(
            &r,
            Some(&rejection),
            &gateways,
            "sluice",
            &state,
            Timestamp::now(),
        );
        let ours = &s[1];
        assert_eq!(
            cond(&ours.conditions, "Accepted"),
            ("False", "UnsupportedValue")
        );
        assert_eq!(
            cond(&ours.conditions, "ResolvedRefs"),
            ("True", "ResolvedRefs")
        );
    }
}

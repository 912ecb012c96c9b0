//! Ingress part of MeshState: Gateway API Gateways (listeners) and HTTPRoutes (weighted backends),
//! normalised from `gateway.networking.k8s.io/v1`.
//!
//! What makes a whole resource unusable is a [`Rejection`](super::Rejection) naming the field:
//! duplicate listener names, a malformed hostname, TLS settings on a plain-text listener, an
//! unknown path match type, a path that is not absolute, a Service backend without a port. What
//! the Gateway API treats as a partial failure is kept out without rejecting the resource, and the
//! status writer reports it: a listener with a protocol Sluice does not serve, a backend that is
//! not a Service.
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::build::Rejections;
use crate::resources::{
    ResourceSet,
    gateway_api::{self, HTTPRoute, HttpRouteMatch},
};

const GATEWAY_KIND: &str = "Gateway.gateway.networking.k8s.io";
const ROUTE_KIND: &str = "HTTPRoute.gateway.networking.k8s.io";

/// Ingress configuration, normalised.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Ingress {
    /// Gateways by `namespace/name`.
    pub gateways: BTreeMap<String, IngressGateway>,
    /// HTTPRoutes by `namespace/name`.
    pub routes: BTreeMap<String, HttpRoute>,
}

/// A Gateway and the listeners Sluice can serve.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IngressGateway {
    pub namespace: String,
    pub name: String,
    /// `spec.gatewayClassName`.
    pub class: String,
    pub listeners: Vec<IngressListener>,
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
}

/// An HTTPRoute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HttpRoute {
    pub namespace: String,
    pub name: String,
    pub parents: Vec<RouteParent>,
    pub hostnames: Vec<String>,
    pub rules: Vec<HttpRule>,
}

/// A Gateway (or one of its listeners) a route attaches to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteParent {
    pub namespace: String,
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<u16>,
}

/// One rule: any of `matches`, sent to `backends` by weight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HttpRule {
    pub matches: Vec<HttpMatch>,
    pub backends: Vec<HttpBackend>,
}

/// Conditions on a request (all must hold).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HttpMatch {
    pub path: PathMatch,
    /// Header name (lower-case) → exact value.
    pub headers: BTreeMap<String, String>,
    pub method: Option<String>,
}

/// How a request path is matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    Exact(String),
    /// Element-wise prefix (`/a` matches `/a` and `/a/b`, not `/ab`).
    Prefix(String),
    RegularExpression(String),
}

/// A Service port with a relative weight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HttpBackend {
    /// `namespace/name` of the Service.
    pub service: String,
    pub port: u16,
    pub weight: u32,
}

/// Normalises every Gateway and HTTPRoute in `resources`.
pub fn build(resources: &ResourceSet, out: &mut Rejections) -> Ingress {
    let mut ingress = Ingress::default();
    for gw in &resources.gateways {
        if let Some(g) = gateway(gw, out) {
            ingress
                .gateways
                .insert(format!("{}/{}", g.namespace, g.name), g);
        }
    }
    for route in &resources.http_routes {
        if let Some(r) = http_route(route, out) {
            ingress
                .routes
                .insert(format!("{}/{}", r.namespace, r.name), r);
        }
    }
    ingress
}

/// True for a DNS-1123 subdomain, optionally with a leading `*.` label (a Gateway API
/// `Hostname`: no IP addresses, no port).
pub fn valid_hostname(h: &str) -> bool {
    let rest = h.strip_prefix("*.").unwrap_or(h);
    if rest.is_empty() || rest.len() > 253 || rest.parse::<std::net::IpAddr>().is_ok() {
        return false;
    }
    rest.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    })
}

fn object_name(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

fn gateway(gw: &gateway_api::Gateway, out: &mut Rejections) -> Option<IngressGateway> {
    let (namespace, name) = object_name(&gw.metadata);
    let mut reject = |field: String, message: String| {
        out.reject(GATEWAY_KIND, Some(&namespace), &name, &field, message);
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
        });
    }
    Some(IngressGateway {
        class: gw.spec.gateway_class_name.clone(),
        listeners,
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
    let mut headers = BTreeMap::new();
    for (k, h) in m.headers.iter().enumerate() {
        match h.type_.as_deref().unwrap_or("Exact") {
            "Exact" => {
                headers.insert(h.name.to_ascii_lowercase(), h.value.clone());
            }
            other => {
                return Err((
                    format!("{field}.headers[{k}].type"),
                    format!("{other:?} is not supported (Exact is)"),
                ));
            }
        }
    }
    Ok(HttpMatch {
        path,
        headers,
        method: m.method.clone(),
    })
}

fn http_route(route: &HTTPRoute, out: &mut Rejections) -> Option<HttpRoute> {
    let (namespace, name) = object_name(&route.metadata);
    let mut reject = |field: String, message: String| {
        out.reject(ROUTE_KIND, Some(&namespace), &name, &field, message);
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
                method: None,
            });
        }
        let mut backends = Vec::new();
        for (j, b) in rule.backend_refs.iter().enumerate() {
            let is_service = b.group.as_deref().unwrap_or("").is_empty()
                && b.kind.as_deref().unwrap_or("Service") == "Service";
            if !is_service {
                continue; // reported as ResolvedRefs=False/InvalidKind by the status writer
            }
            let Some(port) = b
                .port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0)
            else {
                reject(
                    format!("spec.rules[{i}].backendRefs[{j}].port"),
                    "a Service backend needs a port".into(),
                );
                return None;
            };
            backends.push(HttpBackend {
                service: format!(
                    "{}/{}",
                    b.namespace.as_deref().unwrap_or(&namespace),
                    b.name
                ),
                port,
                weight: b.weight.and_then(|w| u32::try_from(w).ok()).unwrap_or(1),
            });
        }
        rules.push(HttpRule { matches, backends });
    }
    Some(HttpRoute {
        hostnames: route.spec.hostnames.clone(),
        parents,
        rules,
        namespace,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let ingress = build(&parse(WORLD), &mut out);
        let web = &ingress.gateways["ingress/web"];
        assert_eq!(web.class, "sluice");
        assert_eq!(web.listeners.len(), 1, "the QUIC listener is left out");
        assert_eq!(web.listeners[0].protocol, ListenerProtocol::Http);
        assert_eq!(web.listeners[0].allowed_namespaces, AllowedNamespaces::All);
    }

    #[test]
    fn routes_default_their_matches_and_namespaces() {
        let mut out = Rejections::default();
        let ingress = build(&parse(WORLD), &mut out);
        let shop = &ingress.routes["shop/shop"];
        assert_eq!(shop.parents[0].namespace, "ingress");
        let first = &shop.rules[0];
        assert_eq!(first.matches[0].path, PathMatch::Exact("/cart".into()));
        assert_eq!(first.matches[0].headers["x-canary"], "1");
        assert_eq!(
            first.backends,
            vec![HttpBackend {
                service: "shop/cart".into(),
                port: 8080,
                weight: 3
            }],
            "the Bucket backend is not a Service"
        );
        let second = &shop.rules[1];
        assert_eq!(second.matches[0].path, PathMatch::Prefix("/".into()));
        assert_eq!(second.backends[0].service, "web/home");
    }

    #[test]
    fn invalid_resources_are_rejected_naming_the_field() {
        let mut out = Rejections::default();
        let ingress = build(&parse(WORLD), &mut out);
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
}

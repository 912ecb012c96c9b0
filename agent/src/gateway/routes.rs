//! The routing table of one gateway instance: which listener a request arrived on, which
//! HTTPRoute rule it matches (by the Gateway API's precedence), built once per MeshState
//! snapshot from [`state::ingress`](crate::state::ingress) and read without locks per request.
use std::{collections::BTreeMap, sync::Arc};

use http::{HeaderMap, Method};
use regex::Regex;

use crate::{
    config::IngressConfig,
    state::{
        MeshState,
        http_filters::{ValueMatch, ValueMatches},
        ingress::{HttpMatch, HttpRule, ListenerProtocol, PathMatch, hostnames_intersect},
    },
};

/// Every port this gateway serves, with what arrives on it.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub ports: BTreeMap<u16, PortRoutes>,
}

/// The listeners of the served Gateways on one port (one protocol per port).
#[derive(Debug)]
pub struct PortRoutes {
    pub protocol: ListenerProtocol,
    pub listeners: Vec<ListenerRoutes>,
}

/// One listener and the rules of the routes attached to it, in precedence order.
#[derive(Debug)]
pub struct ListenerRoutes {
    /// `namespace/name` of the Gateway.
    pub gateway: String,
    pub name: String,
    pub hostname: Option<String>,
    /// HTTPS: the Secrets (`namespace/name`) it serves certificates from.
    pub certificates: Vec<String>,
    candidates: Vec<Candidate>,
}

/// One match of one rule of one route.
#[derive(Debug)]
struct Candidate {
    route: Arc<str>,
    hostnames: Arc<[String]>,
    rule: Arc<HttpRule>,
    matcher: Matcher,
}

#[derive(Debug)]
enum PathMatcher {
    Exact(String),
    /// Without its trailing slash (`/` stays `/`).
    Prefix(String),
    /// Istio's character prefix.
    StringPrefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueMatcher {
    Exact(String),
    Regex(Regex),
}

impl ValueMatcher {
    fn matches(&self, v: &str) -> bool {
        match self {
            Self::Exact(e) => e == v,
            Self::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Debug)]
struct Matcher {
    path: PathMatcher,
    headers: Vec<(http::HeaderName, ValueMatcher)>,
    query: Vec<(String, ValueMatcher)>,
    method: Option<Method>,
}

/// What a request matched.
#[derive(Clone, Debug)]
pub struct Selected {
    /// `namespace/name` of the HTTPRoute.
    pub route: Arc<str>,
    pub rule: Arc<HttpRule>,
    /// The part of the path a prefix match covered (for `ReplacePrefixMatch`).
    pub matched_prefix: Option<MatchedPrefix>,
}

/// The prefix a request's path matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MatchedPrefix {
    /// A Gateway API `PathPrefix` (whole path elements).
    Elements(String),
    /// An Istio `uri.prefix` (characters).
    Chars(String),
}

/// The request, as routing reads it.
#[derive(Debug)]
pub struct RequestView<'a> {
    /// Host without port, lower-case.
    pub host: &'a str,
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// Why a table entry is left out (logged once per build).
#[derive(Debug, thiserror::Error)]
#[error("HTTPRoute {route}: {message}")]
pub struct Skipped {
    pub route: String,
    pub message: String,
}

impl RouteTable {
    /// The table for the Gateways `config` serves in `state`.
    pub fn build(state: &MeshState, config: &IngressConfig) -> (Self, Vec<Skipped>) {
        let mut table = RouteTable::default();
        let mut skipped = Vec::new();
        let ingress = &state.ingress;
        let gateway_api = ingress
            .gateways
            .iter()
            .filter(|(key, gw)| config.serves(&gw.class, key))
            .map(|g| (g, &ingress.routes));
        let istio = ingress
            .istio_gateways
            .iter()
            .filter(|(_, gw)| gw.selector.as_ref().is_some_and(|s| config.selected_by(s)))
            .map(|g| (g, &ingress.istio_routes));
        for ((key, gw), routes) in gateway_api.chain(istio) {
            for l in &gw.listeners {
                if !l.protocol.carries_http() {
                    continue;
                }
                let conditions = gw.listener_conditions.iter().find(|c| c.name == l.name);
                if conditions.is_some_and(|c| c.conflicted.status || !c.resolved_refs.status) {
                    continue;
                }
                let mut candidates = Vec::new();
                for route_key in &l.attached_routes {
                    let Some(route) = routes.get(route_key) else {
                        continue;
                    };
                    let hostnames: Arc<[String]> = route.hostnames.clone().into();
                    let name: Arc<str> = route_key.as_str().into();
                    for (ri, rule) in route.rules.iter().enumerate() {
                        let rule = Arc::new(rule.clone());
                        for (mi, m) in rule.matches.iter().enumerate() {
                            match Matcher::compile(m) {
                                Ok(matcher) => candidates.push((
                                    (route.created.clone(), route_key.clone(), ri, mi),
                                    Candidate {
                                        route: name.clone(),
                                        hostnames: hostnames.clone(),
                                        rule: rule.clone(),
                                        matcher,
                                    },
                                )),
                                Err(e) => skipped.push(Skipped {
                                    route: route_key.clone(),
                                    message: format!("rules[{ri}].matches[{mi}]: {e}"),
                                }),
                            }
                        }
                    }
                }
                // Precedence (Gateway API): exact path, a regular expression, then the longest
                // prefix, then method,
                // more headers, more query parameters; ties go to the older route, then by
                // name, then by rule and match order. Host specificity is decided per request.
                candidates.sort_by(|(ta, a), (tb, b)| {
                    b.matcher
                        .rank()
                        .cmp(&a.matcher.rank())
                        .then_with(|| ta.cmp(tb))
                });
                let port = table.ports.entry(l.port).or_insert_with(|| PortRoutes {
                    protocol: l.protocol,
                    listeners: Vec::new(),
                });
                if port.protocol != l.protocol {
                    skipped.push(Skipped {
                        route: format!("(listener {key}/{})", l.name),
                        message: format!("port {} is already served with another protocol", l.port),
                    });
                    continue;
                }
                port.listeners.push(ListenerRoutes {
                    gateway: key.clone(),
                    name: l.name.clone(),
                    hostname: l.hostname.clone(),
                    certificates: l.certificates.clone(),
                    candidates: candidates.into_iter().map(|(_, c)| c).collect(),
                });
            }
        }
        (table, skipped)
    }

    /// The listener on `port` that takes requests for `host`: an exact hostname first, then
    /// the longest wildcard, then one without a hostname.
    pub fn listener(&self, port: u16, host: &str) -> Option<&ListenerRoutes> {
        self.ports
            .get(&port)?
            .listeners
            .iter()
            .filter_map(|l| Some((host_rank(l.hostname.as_deref(), host)?, l)))
            .max_by_key(|(rank, _)| *rank)
            .map(|(_, l)| l)
    }
}

/// How specifically `pattern` (a hostname, `*.`-wildcard, or none) covers `host`; `None` when
/// it does not.
fn host_rank(pattern: Option<&str>, host: &str) -> Option<(u8, usize)> {
    match pattern {
        None => Some((0, 0)),
        Some(p) if p == host => Some((2, p.len())),
        Some(p)
            if p.starts_with("*.") && hostnames_intersect(p, host) && !host.starts_with('*') =>
        {
            Some((1, p.len()))
        }
        Some(_) => None,
    }
}

impl ListenerRoutes {
    /// The rule `req` matches, by precedence.
    pub fn select(&self, req: &RequestView<'_>) -> Option<Selected> {
        let mut best: Option<((u8, usize), &Candidate)> = None;
        for c in &self.candidates {
            let host = if c.hostnames.is_empty() {
                Some((0, 0))
            } else {
                c.hostnames
                    .iter()
                    .filter_map(|h| host_rank(Some(h), req.host))
                    .max()
            };
            let Some(host) = host else { continue };
            if best.as_ref().is_some_and(|(b, _)| *b >= host) {
                // Candidates are in precedence order: an earlier one with as specific a
                // host already won.
                continue;
            }
            if c.matcher.matches(req) {
                best = Some((host, c));
            }
        }
        best.map(|(_, c)| Selected {
            route: c.route.clone(),
            rule: c.rule.clone(),
            matched_prefix: match &c.matcher.path {
                PathMatcher::Prefix(p) => Some(MatchedPrefix::Elements(p.clone())),
                PathMatcher::StringPrefix(p) => Some(MatchedPrefix::Chars(p.clone())),
                _ => None,
            },
        })
    }
}

impl Matcher {
    fn compile(m: &HttpMatch) -> Result<Self, regex::Error> {
        let value = |v: &ValueMatch| -> Result<ValueMatcher, regex::Error> {
            Ok(match v {
                ValueMatch::Exact(s) => ValueMatcher::Exact(s.clone()),
                ValueMatch::RegularExpression(r) => ValueMatcher::Regex(anchored(r)?),
            })
        };
        let values = |m: &ValueMatches| -> Result<Vec<(String, ValueMatcher)>, regex::Error> {
            m.iter().map(|(k, v)| Ok((k.clone(), value(v)?))).collect()
        };
        Ok(Self {
            path: match &m.path {
                PathMatch::Exact(p) => PathMatcher::Exact(p.clone()),
                PathMatch::Prefix(p) => {
                    let trimmed = p.trim_end_matches('/');
                    PathMatcher::Prefix(if trimmed.is_empty() { "/" } else { trimmed }.to_owned())
                }
                PathMatch::StringPrefix(p) => PathMatcher::StringPrefix(p.clone()),
                PathMatch::RegularExpression(r) => PathMatcher::Regex(anchored(r)?),
            },
            headers: values(&m.headers)?
                .into_iter()
                .filter_map(|(k, v)| Some((http::HeaderName::from_bytes(k.as_bytes()).ok()?, v)))
                .collect(),
            query: values(&m.query)?,
            method: m
                .method
                .as_deref()
                .and_then(|s| Method::from_bytes(s.as_bytes()).ok()),
        })
    }

    /// Precedence among matches, higher first: path kind (exact, regular expression, prefix),
    /// path length, method, headers, query.
    fn rank(&self) -> (u8, usize, bool, usize, usize) {
        // Regular expressions between exact paths and prefixes (the spec leaves them to the
        // implementation; Istio and Envoy-based gateways order them so).
        let (kind, len) = match &self.path {
            PathMatcher::Exact(p) => (3, p.len()),
            PathMatcher::Regex(_) => (2, 0),
            PathMatcher::Prefix(p) | PathMatcher::StringPrefix(p) => (1, p.len()),
        };
        (
            kind,
            len,
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }

    fn matches(&self, req: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatcher::Exact(p) => req.path == p,
            PathMatcher::Prefix(p) => prefix_matches(p, req.path),
            PathMatcher::StringPrefix(p) => req.path.starts_with(p.as_str()),
            PathMatcher::Regex(r) => r.is_match(req.path),
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| m == req.method)
            && self.headers.iter().all(|(name, v)| {
                req.headers
                    .get(name)
                    .and_then(|h| h.to_str().ok())
                    .is_some_and(|h| v.matches(h))
            })
            && self
                .query
                .iter()
                .all(|(name, v)| query_value(req.query, name).is_some_and(|q| v.matches(&q)))
    }
}

/// Whole-string match, as the Gateway API means a regular expression match.
fn anchored(re: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{re})$"))
}

/// Element-wise prefix: `/a` matches `/a`, `/a/` and `/a/b`, not `/ab`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return path.starts_with('/');
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The first value of query parameter `name`, percent-decoded.
fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::MeshSettings, resources::ResourceSet, state};

    fn table(yaml: &str) -> RouteTable {
        let resources = ResourceSet::from_yaml(yaml).expect("resources");
        let out = state::build(&resources, &MeshSettings::default());
        assert!(out.rejections.is_empty(), "{:?}", out.rejections);
        let config: IngressConfig =
            serde_yaml::from_str("{classes: [sluice, azure-alb-external]}").expect("config");
        RouteTable::build(&out.state, &config).0
    }

    const BASE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: a, namespace: web}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80, protocol: TCP}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: web}
spec: {clusterIP: 10.96.0.2, ports: [{port: 80, protocol: TCP}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: web}
spec:
  gatewayClassName: azure-alb-external
  listeners:
  - {name: http, port: 80, protocol: HTTP}
  - {name: api, port: 80, protocol: HTTP, hostname: "*.api.example.com"}
"#;

    fn pick(
        t: &RouteTable,
        host: &str,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Option<String> {
        let uri: http::Uri = uri.parse().expect("uri");
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        let method = Method::from_bytes(method.as_bytes()).expect("method");
        let req = RequestView {
            host,
            method: &method,
            path: uri.path(),
            query: uri.query(),
            headers: &h,
        };
        let l = t.listener(80, host)?;
        let s = l.select(&req)?;
        Some(format!("{}:{}", l.name, s.rule.backends[0].service))
    }

    #[test]
    fn precedence_follows_the_gateway_api() {
        let t = table(&format!(
            r#"{BASE}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r1, namespace: web, creationTimestamp: "2026-01-01T00:00:00Z"}}
spec:
  parentRefs: [{{name: gw, sectionName: http}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /}}}}]
    backendRefs: [{{name: a, port: 80}}]
  - matches: [{{path: {{type: PathPrefix, value: /shop/}}}}]
    backendRefs: [{{name: b, port: 80}}]
  - matches: [{{path: {{type: Exact, value: /shop/cart}}}}]
    backendRefs: [{{name: a, port: 80}}]
  - matches: [{{path: {{type: PathPrefix, value: /shop}}, method: POST}}]
    backendRefs: [{{name: a, port: 80}}]
  - matches: [{{path: {{type: PathPrefix, value: /shop}}, headers: [{{name: X-Canary, value: "yes"}}], queryParams: [{{name: v, type: RegularExpression, value: "[0-9]+"}}]}}]
    backendRefs: [{{name: a, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r2, namespace: web, creationTimestamp: "2026-02-01T00:00:00Z"}}
spec:
  parentRefs: [{{name: gw, sectionName: http}}]
  hostnames: [shop.example.com]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /}}}}]
    backendRefs: [{{name: b, port: 80}}]
"#
        ));
        let p = |host, method, uri, h: &[(&str, &str)]| pick(&t, host, method, uri, h);
        assert_eq!(p("x.test", "GET", "/", &[]).as_deref(), Some("http:web/a"));
        // Element-wise prefix: /shopping is not under /shop.
        assert_eq!(
            p("x.test", "GET", "/shopping", &[]).as_deref(),
            Some("http:web/a")
        );
        assert_eq!(
            p("x.test", "GET", "/shop", &[]).as_deref(),
            Some("http:web/b")
        );
        assert_eq!(
            p("x.test", "GET", "/shop/x", &[]).as_deref(),
            Some("http:web/b")
        );
        assert_eq!(
            p("x.test", "GET", "/shop/cart", &[]).as_deref(),
            Some("http:web/a")
        );
        assert_eq!(
            p("x.test", "POST", "/shop/x", &[]).as_deref(),
            Some("http:web/a")
        );
        assert_eq!(
            p("x.test", "GET", "/shop/x?v=12", &[("x-canary", "yes")]).as_deref(),
            Some("http:web/a")
        );
        assert_eq!(
            p("x.test", "GET", "/shop/x?v=1a", &[("x-canary", "yes")]).as_deref(),
            Some("http:web/b")
        );
        // A route naming the host beats one without hostnames, even with a shorter path.
        assert_eq!(
            p("shop.example.com", "GET", "/shop/cart", &[]).as_deref(),
            Some("http:web/b")
        );
    }

    #[test]
    fn the_most_specific_listener_takes_the_host() {
        let t = table(&format!(
            r#"{BASE}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: web}}
spec:
  parentRefs: [{{name: gw}}]
  rules:
  - backendRefs: [{{name: a, port: 80}}]
"#
        ));
        assert_eq!(
            pick(&t, "v1.api.example.com", "GET", "/", &[]).as_deref(),
            Some("api:web/a")
        );
        assert_eq!(
            pick(&t, "api.example.com", "GET", "/", &[]).as_deref(),
            Some("http:web/a")
        );
        assert!(t.listener(81, "x").is_none());
    }

    #[test]
    fn query_values_are_decoded_and_prefixes_are_element_wise() {
        assert_eq!(
            query_value(Some("a=1&b=x%20y"), "b").as_deref(),
            Some("x y")
        );
        assert_eq!(query_value(Some("a"), "a").as_deref(), Some(""));
        assert_eq!(query_value(Some("a=%zz"), "a").as_deref(), Some("%zz"));
        assert_eq!(query_value(Some("a=%4"), "a").as_deref(), Some("%4"));
        assert!(prefix_matches("/", "/x"));
        assert!(prefix_matches("/a", "/a/"));
        assert!(!prefix_matches("/a", "/ab"));
    }
}

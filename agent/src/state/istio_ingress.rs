//! Istio's ingress form, normalised into the same model as the Gateway API's: an Istio
//! `Gateway` whose `selector` picks a gateway instance becomes an [`IngressGateway`] (one
//! listener per server and host), and each `VirtualService` bound to it becomes an
//! [`HttpRoute`] attached to the listeners whose hosts it shares. One data plane serves both.
//!
//! What would change where a request goes and is not translated (`delegate`,
//! `directResponse`, an `authority` or `scheme` match) rejects the VirtualService, naming the
//! field; what only observes or retries (`retries`, `mirror`, `corsPolicy`, `fault`) is left out.
use std::collections::BTreeMap;

use serde_json::Value;

use super::{
    http_filters::{
        self, HeaderModifier, HttpFilter, PathModifier, Redirect, Rewrite, RouteTimeouts,
        ValueMatch,
    },
    ingress::{
        AllowedNamespaces, Attachment, Cond, HttpBackend, HttpMatch, HttpRoute, HttpRule,
        IngressGateway, IngressListener, ListenerProtocol, PathMatch, RouteParent,
        hostnames_intersect, valid_hostname,
    },
    rejections::Rejections,
    service::Service,
};
use crate::resources::{
    NamespacedName,
    istio_networking::{self, HttpMatchRequest, StringMatch, VirtualService},
    kinds::WatchedKind,
};

/// Istio Gateways with at least one HTTP or HTTPS server, by `namespace/name`.
pub fn gateways(gws: &[istio_networking::Gateway]) -> BTreeMap<String, IngressGateway> {
    let mut all = BTreeMap::new();
    for gw in gws {
        let namespace = gw
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = gw.metadata.name.clone().unwrap_or_default();
        let mut listeners = Vec::new();
        for (i, server) in gw.spec.servers.iter().enumerate() {
            let protocol = match server
                .port
                .protocol
                .as_deref()
                .map(str::to_ascii_uppercase)
                .as_deref()
            {
                Some("HTTP" | "HTTP2") => ListenerProtocol::Http,
                Some("HTTPS") => ListenerProtocol::Https,
                _ => continue, // egress, TCP or TLS passthrough: not the ingress data plane's
            };
            let tls = server.tls.as_ref();
            let mode = tls.and_then(|t| t.mode.as_deref()).unwrap_or("SIMPLE");
            if protocol == ListenerProtocol::Https && mode != "SIMPLE" {
                continue; // MUTUAL, PASSTHROUGH and the ISTIO_ modes are not served here
            }
            let Some(port) = u16::try_from(server.port.number).ok().filter(|p| *p > 0) else {
                continue;
            };
            let certificates = tls
                .and_then(|t| t.credential_name.clone())
                .into_iter()
                .chain(tls.map(|t| t.credential_names.clone()).unwrap_or_default())
                .map(|c| NamespacedName::new(&namespace, &c).key())
                .collect::<Vec<_>>();
            let base = server.name.clone().unwrap_or_else(|| format!("server-{i}"));
            let hosts: Vec<Option<String>> = if server.hosts.is_empty() {
                vec![None]
            } else {
                server
                    .hosts
                    .iter()
                    .map(|h| h.rsplit_once('/').map_or(h.as_str(), |(_, h)| h))
                    .map(|h| (h != "*" && valid_hostname(h)).then(|| h.to_owned()))
                    .collect()
            };
            for (j, hostname) in hosts.into_iter().enumerate() {
                listeners.push(IngressListener {
                    name: format!("{base}-{j}"),
                    port,
                    protocol,
                    hostname,
                    allowed_namespaces: AllowedNamespaces::All,
                    attached_routes: Vec::new(),
                    certificates: certificates.clone(),
                });
            }
        }
        if listeners.is_empty() {
            continue;
        }
        all.insert(
            NamespacedName::new(&namespace, &name).key(),
            IngressGateway {
                namespace,
                name,
                class: String::new(),
                selector: Some(gw.spec.selector.clone()),
                instances: Vec::new(),
                addresses: Vec::new(),
                listeners,
                listener_conditions: Vec::new(),
            },
        );
    }
    all
}

/// The VirtualServices bound to one of `gateways`, attached to their listeners.
pub fn routes(
    vss: &[VirtualService],
    gateways: &mut BTreeMap<String, IngressGateway>,
    services: &BTreeMap<String, Service>,
    out: &mut Rejections,
) -> BTreeMap<String, HttpRoute> {
    let mut all = BTreeMap::new();
    for vs in vss {
        let namespace = vs
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = vs.metadata.name.clone().unwrap_or_default();
        let parents: Vec<String> = vs
            .spec
            .gateways
            .iter()
            .filter(|g| *g != "mesh")
            .map(|g| match g.split_once('/') {
                Some((ns, n)) => NamespacedName::new(ns, n).key(),
                None => NamespacedName::new(&namespace, g).key(),
            })
            .filter(|k| gateways.contains_key(k))
            .collect();
        if parents.is_empty() {
            continue;
        }
        let rules = match rules(vs, &namespace, services) {
            Ok(r) => r,
            Err((field, message)) => {
                out.reject(
                    &VirtualService::qualified(),
                    Some(&namespace),
                    &name,
                    &field,
                    message,
                );
                continue;
            }
        };
        let key = NamespacedName::new(&namespace, &name).key();
        let hostnames: Vec<String> = vs
            .spec
            .hosts
            .iter()
            .filter(|h| *h != "*" && valid_hostname(h))
            .cloned()
            .collect();
        let mut route_parents = Vec::new();
        for parent in &parents {
            let Some(gw) = gateways.get_mut(parent) else {
                continue;
            };
            let mut attached = Vec::new();
            for l in &mut gw.listeners {
                let fits = match &l.hostname {
                    None => true,
                    Some(lh) => {
                        hostnames.is_empty() || hostnames.iter().any(|h| hostnames_intersect(lh, h))
                    }
                };
                if fits {
                    l.attached_routes.push(key.clone());
                    attached.push(l.name.clone());
                }
            }
            route_parents.push(RouteParent {
                namespace: gw.namespace.clone(),
                name: gw.name.clone(),
                section_name: None,
                port: None,
                attachment: Attachment {
                    accepted: Cond::new("Accepted", !attached.is_empty(), "Accepted", ""),
                    listeners: attached,
                },
            });
        }
        all.insert(
            key,
            HttpRoute {
                namespace,
                name,
                parents: route_parents,
                hostnames,
                rules,
                resolved_refs: Cond::new("ResolvedRefs", true, "ResolvedRefs", ""),
                created: vs
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0.to_string())
                    .unwrap_or_default(),
            },
        );
    }
    all
}

type FieldError = http_filters::FieldError;

fn rules(
    vs: &VirtualService,
    namespace: &str,
    services: &BTreeMap<String, Service>,
) -> Result<Vec<HttpRule>, FieldError> {
    let mut rules = Vec::new();
    for (i, http) in vs.spec.http.iter().enumerate() {
        let field = format!("spec.http[{i}]");
        for (set, what) in [
            (http.delegate.is_some(), "delegate"),
            (http.direct_response.is_some(), "directResponse"),
        ] {
            if set {
                return Err((
                    format!("{field}.{what}"),
                    "not supported by the Sluice gateway".into(),
                ));
            }
        }
        let mut matches = Vec::new();
        for (j, m) in http.matches.iter().enumerate() {
            matches.push(http_match(m, &format!("{field}.match[{j}]"))?);
        }
        if matches.is_empty() {
            matches.push(HttpMatch {
                path: PathMatch::Prefix("/".into()),
                headers: BTreeMap::new(),
                query: BTreeMap::new(),
                method: None,
            });
        }
        let mut filters = Vec::new();
        if let Some(h) = &http.headers {
            for (key, ctor) in [
                (
                    "request",
                    HttpFilter::RequestHeaders as fn(HeaderModifier) -> HttpFilter,
                ),
                ("response", HttpFilter::ResponseHeaders),
            ] {
                if let Some(m) = h.0.get(key) {
                    filters.push(ctor(header_ops(m, &format!("{field}.headers.{key}"))?));
                }
            }
        }
        let prefix_match = matches
            .iter()
            .all(|m| matches!(m.path, PathMatch::StringPrefix(_) | PathMatch::Prefix(_)));
        if let Some(r) = &http.rewrite {
            let uri = r.0.get("uri").and_then(Value::as_str);
            filters.push(HttpFilter::Rewrite(Rewrite {
                hostname: r
                    .0
                    .get("authority")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                path: uri.map(|u| {
                    if prefix_match {
                        PathModifier::ReplacePrefixMatch(u.to_owned())
                    } else {
                        PathModifier::ReplaceFullPath(u.to_owned())
                    }
                }),
            }));
        }
        if let Some(r) = &http.redirect {
            let status =
                r.0.get("redirectCode")
                    .and_then(Value::as_u64)
                    .unwrap_or(301);
            let status = u16::try_from(status)
                .ok()
                .filter(|s| (300..400).contains(s))
                .ok_or_else(|| {
                    (
                        format!("{field}.redirect.redirectCode"),
                        format!("{status} is not a redirect"),
                    )
                })?;
            filters.push(HttpFilter::Redirect(Redirect {
                scheme: r.0.get("scheme").and_then(Value::as_str).map(str::to_owned),
                hostname: r
                    .0
                    .get("authority")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                path: r
                    .0
                    .get("uri")
                    .and_then(Value::as_str)
                    .map(|u| PathModifier::ReplaceFullPath(u.to_owned())),
                port: r
                    .0
                    .get("port")
                    .and_then(Value::as_u64)
                    .and_then(|p| u16::try_from(p).ok()),
                status,
            }));
        }
        let mut backends = Vec::new();
        for (j, d) in http.route.iter().enumerate() {
            let host = &d.destination.host;
            let service = service_key(host, namespace);
            let known = services.get(&service);
            let port = d
                .destination
                .port
                .as_ref()
                .and_then(|p| p.number)
                .and_then(|n| u16::try_from(n).ok())
                .or_else(|| match known.map(|s| &s.ports[..]) {
                    Some([only]) => Some(only.port),
                    _ => None,
                });
            let Some(port) = port else {
                return Err((
                    format!("{field}.route[{j}].destination.port"),
                    format!("required: Service {service} has no single port"),
                ));
            };
            backends.push(HttpBackend {
                invalid: known
                    .is_none()
                    .then(|| format!("Service {service} not found")),
                service,
                port,
                weight: d
                    .weight
                    .and_then(|w| u32::try_from(w).ok())
                    .unwrap_or(if http.route.len() == 1 { 100 } else { 0 }),
            });
        }
        let timeouts = RouteTimeouts {
            request: match &http.timeout {
                None => None,
                Some(t) => Some(istio_duration(t).ok_or_else(|| {
                    (
                        format!("{field}.timeout"),
                        format!("{t:?} is not a duration"),
                    )
                })?)
                .filter(|d| !d.is_zero()),
            },
            backend_request: None,
        };
        rules.push(HttpRule {
            matches,
            backends,
            filters,
            timeouts,
        });
    }
    Ok(rules)
}

/// `name`, `name.ns`, `name.ns.svc` or `name.ns.svc.<domain>` → `ns/name`.
fn service_key(host: &str, namespace: &str) -> String {
    let mut parts = host.split('.');
    let name = parts.next().unwrap_or_default();
    let ns = parts.next().unwrap_or(namespace);
    NamespacedName::new(ns, name).key()
}

/// Istio durations (protobuf `Duration` in text form): `10s`, `1.5s`, `250ms`, `1m`, `1h`.
fn istio_duration(s: &str) -> Option<std::time::Duration> {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse::<u64>().ok().map(std::time::Duration::from_millis);
    }
    if let Some(secs) = s.strip_suffix('s') {
        return secs
            .parse::<f64>()
            .ok()
            .filter(|x| *x >= 0.0 && x.is_finite())
            .map(std::time::Duration::from_secs_f64);
    }
    http_filters::duration(s)
}

fn string_match(m: &StringMatch, field: &str) -> Result<ValueMatch, FieldError> {
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(e), None, None) => Ok(ValueMatch::Exact(e.clone())),
        (None, Some(p), None) => Ok(ValueMatch::RegularExpression(format!(
            "{}.*",
            regex::escape(p)
        ))),
        (None, None, Some(r)) => {
            http_filters::check_regex(r, &format!("{field}.regex"))?;
            Ok(ValueMatch::RegularExpression(r.clone()))
        }
        _ => Err((
            field.to_owned(),
            "exactly one of exact, prefix, regex".into(),
        )),
    }
}

fn http_match(m: &HttpMatchRequest, field: &str) -> Result<HttpMatch, FieldError> {
    for (set, what) in [
        (m.authority.is_some(), "authority"),
        (m.scheme.is_some(), "scheme"),
    ] {
        if set {
            return Err((
                format!("{field}.{what}"),
                "not supported by the Sluice gateway; use hosts".into(),
            ));
        }
    }
    let path = match &m.uri {
        None => PathMatch::Prefix("/".into()),
        Some(u) => match (&u.exact, &u.prefix, &u.regex) {
            (Some(e), None, None) => PathMatch::Exact(e.clone()),
            (None, Some(p), None) => PathMatch::StringPrefix(p.clone()),
            (None, None, Some(r)) => {
                http_filters::check_regex(r, &format!("{field}.uri.regex"))?;
                PathMatch::RegularExpression(r.clone())
            }
            _ => {
                return Err((
                    format!("{field}.uri"),
                    "exactly one of exact, prefix, regex".into(),
                ));
            }
        },
    };
    let mut headers = BTreeMap::new();
    for (k, v) in &m.headers {
        headers.insert(
            k.to_ascii_lowercase(),
            string_match(v, &format!("{field}.headers.{k}"))?,
        );
    }
    let mut query = BTreeMap::new();
    for (k, v) in &m.query_params {
        query.insert(
            k.clone(),
            string_match(v, &format!("{field}.queryParams.{k}"))?,
        );
    }
    let method = match &m.method {
        None => None,
        Some(StringMatch {
            exact: Some(e),
            prefix: None,
            regex: None,
        }) => Some(e.clone()),
        Some(_) => return Err((format!("{field}.method"), "only exact is supported".into())),
    };
    Ok(HttpMatch {
        path,
        headers,
        query,
        method,
    })
}

/// Istio's `HeaderOperations` (`set` and `add` maps, `remove` list).
fn header_ops(v: &Value, field: &str) -> Result<HeaderModifier, FieldError> {
    let pairs = |key: &str| -> Result<Vec<(String, String)>, FieldError> {
        match v.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| {
                    v.as_str()
                        .map(|s| (k.to_ascii_lowercase(), s.to_owned()))
                        .ok_or_else(|| (format!("{field}.{key}.{k}"), "must be a string".into()))
                })
                .collect(),
            Some(_) => Err((format!("{field}.{key}"), "must be a map".into())),
        }
    };
    Ok(HeaderModifier {
        set: pairs("set")?,
        add: pairs("add")?,
        remove: http_filters::remove_list(v, field)?,
    })
}

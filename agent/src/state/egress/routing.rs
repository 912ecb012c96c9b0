//! Egress gateway routing from Istio's trio: Gateway (servers), VirtualService (routes bound to
//! `mesh` and to gateways) and DestinationRule (TLS towards the upstream).
//!
//! Decisions are per connection, so only connection-level route conditions are evaluated:
//! gateways, port, SNI hosts, authority (against the `Host` the proxy peeked), destination
//! subnets, source labels and namespace. Request-level conditions (URI, method, headers, query)
//! are not, and a route that has them matches as if they were absent. Of several weighted
//! destinations the heaviest (first on ties) is taken.
use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use serde::Serialize;

use super::{
    host::{Export, HostMatch, ObjectKey},
    registry::tcp_port,
};
use crate::{
    resources::istio_networking::{
        ClientTlsSettings, Destination, DestinationRule, Gateway, PortNumber, StringMatch,
        VirtualService,
    },
    state::rejections::Rejections,
};

const GATEWAY_KIND: &str = "Gateway.networking.istio.io";
const VS_KIND: &str = "VirtualService.networking.istio.io";
const DR_KIND: &str = "DestinationRule.networking.istio.io";

/// Longest egress gateway name AKS accepts.
pub const MAX_GATEWAY_NAME_LEN: usize = 53;

/// Cluster DNS suffix used to expand short service names in routes.
const CLUSTER_DOMAIN: &str = "cluster.local";

/// True if `name` is a valid egress gateway name: DNS-1123 subdomain syntax
/// (`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`), at most 53 characters.
pub fn valid_gateway_name(name: &str) -> bool {
    let label_ok = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    };
    name.len() <= MAX_GATEWAY_NAME_LEN && name.split('.').all(label_ok)
}

/// How a gateway server carries the traffic it receives (after the HBONE hop).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerMode {
    /// Plain HTTP, routed by `Host` (protocol HTTP, or HTTPS with `ISTIO_MUTUAL`: the mesh hop is
    /// already mTLS).
    Http,
    /// The client's own TLS, routed by SNI, never terminated (`PASSTHROUGH`, or TLS with
    /// `ISTIO_MUTUAL`).
    TlsPassthrough,
    /// Opaque TCP.
    Tcp,
}

/// Which namespaces' VirtualServices may bind to a server host (`ns/host` in Gateway servers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NamespaceFilter {
    Any,
    Only(String),
}

/// One `hosts` entry of a gateway server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServerHost {
    pub namespace: NamespaceFilter,
    pub host: HostMatch,
}

/// A Gateway server, normalised.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GatewayServer {
    pub port: u16,
    pub mode: ServerMode,
    pub hosts: Vec<ServerHost>,
}

impl GatewayServer {
    fn accepts(&self, host: Option<&str>, vs_namespace: &str) -> bool {
        self.hosts.iter().any(|h| {
            let ns_ok = match &h.namespace {
                NamespaceFilter::Any => true,
                NamespaceFilter::Only(ns) => ns == vs_namespace,
            };
            ns_ok
                && match host {
                    Some(host) => h.host.matches(host),
                    None => h.host == HostMatch::Any,
                }
        })
    }
}

/// An Istio Gateway used as an egress gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EgressGateway {
    pub key: ObjectKey,
    /// Labels of the gateway workloads.
    pub selector: BTreeMap<String, String>,
    pub servers: Vec<GatewayServer>,
    /// The StaticGatewayConfiguration its workloads are bound to, whose prefix it egresses from.
    pub static_gateway: Option<ObjectKey>,
}

/// What a VirtualService (or one route match) binds to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Binding {
    /// The reserved name `mesh`: sidecars, here the node proxies' outbound side.
    Mesh,
    Gateway(ObjectKey),
}

/// A destination of a route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteTarget {
    /// Host, short names expanded to `<name>.<namespace>.svc.cluster.local`.
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
    pub weight: u32,
}

/// Connection-level conditions of one `match` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RouteMatch {
    /// `None` inherits the VirtualService's gateways.
    pub gateways: Option<Vec<Binding>>,
    pub port: Option<u16>,
    pub sni_hosts: Vec<HostMatch>,
    pub authority: Option<AuthorityMatch>,
    pub destination_subnets: Vec<IpNet>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
}

/// `authority` match against the request's host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorityMatch {
    Exact(String),
    Prefix(String),
}

/// One route: any of its matches (or none = always) sends to the heaviest target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Route {
    pub matches: Vec<RouteMatch>,
    pub target: RouteTarget,
}

/// A VirtualService, normalised.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteTable {
    pub key: ObjectKey,
    pub hosts: Vec<HostMatch>,
    /// Effective bindings (`mesh` when none are listed).
    pub gateways: Vec<Binding>,
    pub export: Export,
    pub http: Vec<Route>,
    pub tls: Vec<Route>,
    pub tcp: Vec<Route>,
}

/// TLS that a DestinationRule asks for towards an upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

/// Client-side TLS settings from a DestinationRule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UpstreamTls {
    pub mode: TlsMode,
    /// SNI to send; the upstream host when unset.
    pub sni: Option<String>,
    /// File (or `credentialName` secret) with CA certificates; system roots when unset.
    pub ca_certificates: Option<String>,
    pub credential_name: Option<String>,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub subject_alt_names: Vec<String>,
    pub insecure_skip_verify: bool,
}

/// A DestinationRule subset's TLS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SubsetPolicy {
    pub labels: BTreeMap<String, String>,
    pub tls: Option<UpstreamTls>,
    pub port_tls: BTreeMap<u16, UpstreamTls>,
}

/// A DestinationRule, normalised (its TLS parts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DestinationPolicy {
    pub key: ObjectKey,
    pub host: HostMatch,
    pub export: Export,
    pub tls: Option<UpstreamTls>,
    pub port_tls: BTreeMap<u16, UpstreamTls>,
    pub subsets: BTreeMap<String, SubsetPolicy>,
}

impl DestinationPolicy {
    /// TLS for `port` of `subset`: subset port-level, subset, port-level, then top-level.
    pub fn tls_for(&self, port: u16, subset: Option<&str>) -> Option<&UpstreamTls> {
        let sub = subset.and_then(|s| self.subsets.get(s));
        sub.and_then(|s| s.port_tls.get(&port))
            .or_else(|| sub.and_then(|s| s.tls.as_ref()))
            .or_else(|| self.port_tls.get(&port))
            .or(self.tls.as_ref())
    }
}

/// How an egress gateway sends what it received.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayMode {
    /// HTTP, by `Host`, to the upstream in plain text.
    Http,
    /// HTTP in, TLS out: the gateway opens TLS to the upstream with these settings.
    TlsOrigination(UpstreamTls),
    /// Bytes as they came (the client's TLS), routed by SNI.
    TlsPassthrough,
    /// Bytes as they came, to the original destination or the routed host.
    Tcp,
}

/// What an egress gateway does with one connection it accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GatewayForward {
    pub gateway: ObjectKey,
    /// The server (listener) port that took the connection.
    pub server_port: u16,
    pub mode: GatewayMode,
    /// Where the gateway connects: host (resolved by the gateway) and port.
    pub upstream_host: String,
    pub upstream_port: u16,
    /// The VirtualService that routed it.
    pub route: ObjectKey,
}

/// Everything routing needs, normalised.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Routing {
    pub gateways: BTreeMap<ObjectKey, EgressGateway>,
    pub route_tables: Vec<RouteTable>,
    pub destination_policies: Vec<DestinationPolicy>,
}

/// Why an egress gateway refuses a connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum GatewayRefusal {
    #[error("no egress gateway {0}")]
    UnknownGateway(ObjectKey),
    #[error("egress gateway {gateway} has no server on port {port} for host {host:?}")]
    NoServer {
        gateway: ObjectKey,
        port: u16,
        host: Option<String>,
    },
    #[error("egress gateway {gateway}: no route for host {host:?} on port {port}")]
    NoRoute {
        gateway: ObjectKey,
        port: u16,
        host: Option<String>,
    },
}

/// A connection as a route sees it.
pub(super) struct Conn<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub ip: IpAddr,
    pub port: u16,
    /// Normalised host and whether it came from TLS (SNI) rather than HTTP.
    pub host: Option<(&'a str, HostKind)>,
}

/// Where a connection's host name came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum HostKind {
    Http,
    Tls,
    Other,
}

impl RouteMatch {
    fn applies(&self, conn: &Conn<'_>, binding: &Binding, table: &RouteTable) -> bool {
        let bound = match &self.gateways {
            Some(list) => list.contains(binding),
            None => table.gateways.contains(binding),
        };
        let host = conn.host.map(|(h, _)| h);
        bound
            && self.port.is_none_or(|p| p == conn.port)
            && (self.sni_hosts.is_empty()
                || host.is_some_and(|h| self.sni_hosts.iter().any(|s| s.matches(h))))
            && self.authority.as_ref().is_none_or(|a| {
                host.is_some_and(|h| match a {
                    AuthorityMatch::Exact(e) => e == h,
                    AuthorityMatch::Prefix(p) => h.starts_with(p.as_str()),
                })
            })
            && (self.destination_subnets.is_empty()
                || self
                    .destination_subnets
                    .iter()
                    .any(|n| n.contains(&conn.ip)))
            && self
                .source_labels
                .iter()
                .all(|(k, v)| conn.labels.get(k) == Some(v))
            && self
                .source_namespace
                .as_deref()
                .is_none_or(|ns| ns == conn.namespace)
    }
}

impl Route {
    fn applies(&self, conn: &Conn<'_>, binding: &Binding, table: &RouteTable) -> bool {
        if self.matches.is_empty() {
            table.gateways.contains(binding)
        } else {
            self.matches.iter().any(|m| m.applies(conn, binding, table))
        }
    }
}

impl RouteTable {
    fn routes_for(&self, mode: ServerMode) -> &[Route] {
        match mode {
            ServerMode::Http => &self.http,
            ServerMode::TlsPassthrough => &self.tls,
            ServerMode::Tcp => &self.tcp,
        }
    }

    fn host_matches(&self, host: Option<&str>) -> bool {
        match host {
            Some(h) => self.hosts.iter().any(|m| m.matches(h)),
            None => self.hosts.contains(&HostMatch::Any),
        }
    }
}

/// A route bound to `mesh` that sends a connection to an egress gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MeshHop {
    pub gateway: ObjectKey,
    /// The gateway Service the mesh route names, and its port.
    pub service_host: String,
    pub service_port: u16,
    pub route: ObjectKey,
    /// What the gateway will do with it (already checked to exist).
    pub forward: GatewayForward,
}

impl Routing {
    /// The first mesh-bound route that sends `conn` to an egress gateway, if any; `Err` when a
    /// route sends it to a gateway that would refuse it.
    pub(super) fn mesh_hop(&self, conn: &Conn<'_>) -> Result<Option<MeshHop>, GatewayRefusal> {
        let Some((host, kind)) = conn.host else {
            return Ok(None);
        };
        let sections: &[ServerMode] = match kind {
            HostKind::Http => &[ServerMode::Http],
            HostKind::Tls => &[ServerMode::TlsPassthrough, ServerMode::Tcp],
            HostKind::Other => &[ServerMode::Tcp],
        };
        for table in &self.route_tables {
            if !table.gateways.contains(&Binding::Mesh)
                || !table.export.visible_to(conn.namespace)
                || !table.host_matches(Some(host))
            {
                continue;
            }
            for section in sections {
                let Some(route) = table
                    .routes_for(*section)
                    .iter()
                    .find(|r| r.applies(conn, &Binding::Mesh, table))
                else {
                    continue;
                };
                let service_port = route.target.port.unwrap_or(conn.port);
                // The gateways this table also binds to, with a server taking the host there.
                let gateway = table.gateways.iter().find_map(|b| match b {
                    Binding::Gateway(key) => self.gateways.get(key).filter(|g| {
                        g.servers.iter().any(|s| {
                            s.port == service_port && s.accepts(Some(host), &table.key.namespace)
                        })
                    }),
                    Binding::Mesh => None,
                });
                let Some(gateway) = gateway else {
                    // Not an egress-gateway route (e.g. a rewrite to another host): ignore it.
                    continue;
                };
                let forward =
                    self.gateway_forward(&gateway.key, service_port, Some((host, kind)))?;
                return Ok(Some(MeshHop {
                    gateway: gateway.key.clone(),
                    service_host: route.target.host.clone(),
                    service_port,
                    route: table.key.clone(),
                    forward,
                }));
            }
        }
        Ok(None)
    }

    /// What egress gateway `gateway` does with a connection on its `port` naming `host`.
    pub(super) fn gateway_forward(
        &self,
        gateway: &ObjectKey,
        port: u16,
        host: Option<(&str, HostKind)>,
    ) -> Result<GatewayForward, GatewayRefusal> {
        let gw = self
            .gateways
            .get(gateway)
            .ok_or_else(|| GatewayRefusal::UnknownGateway(gateway.clone()))?;
        let name = host.map(|(h, _)| h);
        let servers: Vec<&GatewayServer> = gw
            .servers
            .iter()
            .filter(|s| {
                s.port == port
                    && s.hosts
                        .iter()
                        .any(|h| name.map_or(h.host == HostMatch::Any, |n| h.host.matches(n)))
            })
            .collect();
        if servers.is_empty() {
            return Err(GatewayRefusal::NoServer {
                gateway: gateway.clone(),
                port,
                host: name.map(str::to_owned),
            });
        }
        let binding = Binding::Gateway(gateway.clone());
        let labels = BTreeMap::new();
        let conn = Conn {
            namespace: &gateway.namespace,
            labels: &labels,
            ip: IpAddr::from([0, 0, 0, 0]),
            port,
            host,
        };
        for server in servers {
            for table in &self.route_tables {
                if !table.gateways.contains(&binding)
                    || !table.host_matches(name)
                    || !server.accepts(name, &table.key.namespace)
                {
                    continue;
                }
                // A TLS server also takes TCP routes (Istio's TLS + ISTIO_MUTUAL egress example).
                let sections: &[ServerMode] = match server.mode {
                    ServerMode::TlsPassthrough => &[ServerMode::TlsPassthrough, ServerMode::Tcp],
                    ref other => std::slice::from_ref(other),
                };
                let Some(route) = sections.iter().find_map(|section| {
                    table
                        .routes_for(*section)
                        .iter()
                        .find(|r| r.applies(&conn, &binding, table))
                }) else {
                    continue;
                };
                let upstream_port = route.target.port.unwrap_or(port);
                let tls = self
                    .destination_policy(&route.target.host, &gateway.namespace)
                    .and_then(|dr| dr.tls_for(upstream_port, route.target.subset.as_deref()));
                let mode = match (server.mode, tls) {
                    (ServerMode::Http, Some(t))
                        if matches!(t.mode, TlsMode::Simple | TlsMode::Mutual) =>
                    {
                        GatewayMode::TlsOrigination(t.clone())
                    }
                    (ServerMode::Http, _) => GatewayMode::Http,
                    (ServerMode::TlsPassthrough, _) => GatewayMode::TlsPassthrough,
                    (ServerMode::Tcp, _) => GatewayMode::Tcp,
                };
                return Ok(GatewayForward {
                    gateway: gateway.clone(),
                    server_port: port,
                    mode,
                    upstream_host: route.target.host.clone(),
                    upstream_port,
                    route: table.key.clone(),
                });
            }
        }
        Err(GatewayRefusal::NoRoute {
            gateway: gateway.clone(),
            port,
            host: name.map(str::to_owned),
        })
    }

    /// The DestinationRule for `host` visible from `namespace`: an exact host before wildcards,
    /// the caller's own namespace first.
    pub fn destination_policy(&self, host: &str, namespace: &str) -> Option<&DestinationPolicy> {
        let visible =
            |d: &&DestinationPolicy| d.export.visible_to(namespace) && d.host.matches(host);
        let rank = |d: &DestinationPolicy| {
            (
                !matches!(d.host, HostMatch::Exact(_)),
                d.key.namespace != namespace,
            )
        };
        self.destination_policies
            .iter()
            .filter(visible)
            .min_by_key(|d| rank(d))
    }
}

// ---------------------------------------------------------------------------------------------
// Normalisation

pub(super) fn build(
    gateways: &[Gateway],
    services: &[VirtualService],
    rules: &[DestinationRule],
    out: &mut Rejections,
) -> Routing {
    let mut routing = Routing::default();
    for gw in gateways {
        if let Some(g) = gateway(gw, out) {
            routing.gateways.insert(g.key.clone(), g);
        }
    }
    routing.route_tables = services
        .iter()
        .filter_map(|vs| route_table(vs, out))
        .collect();
    routing.route_tables.sort_by(|a, b| a.key.cmp(&b.key));
    routing.destination_policies = rules
        .iter()
        .filter_map(|dr| destination_policy(dr, out))
        .collect();
    routing
        .destination_policies
        .sort_by(|a, b| a.key.cmp(&b.key));
    routing
}

fn meta(m: &kube::api::ObjectMeta) -> (String, String) {
    (
        m.namespace.clone().unwrap_or_else(|| "default".into()),
        m.name.clone().unwrap_or_default(),
    )
}

fn port_of(n: PortNumber, field: &str) -> Result<u16, (String, String)> {
    tcp_port(n).ok_or_else(|| (field.to_owned(), format!("{n} is not a port (1-65535)")))
}

fn gateway(gw: &Gateway, out: &mut Rejections) -> Option<EgressGateway> {
    let (namespace, name) = meta(&gw.metadata);
    match gateway_inner(gw, &namespace, &name) {
        Ok(g) => Some(g),
        Err((field, message)) => {
            out.reject(GATEWAY_KIND, Some(&namespace), &name, &field, message);
            None
        }
    }
}

fn gateway_inner(
    gw: &Gateway,
    namespace: &str,
    name: &str,
) -> Result<EgressGateway, (String, String)> {
    if !valid_gateway_name(name) {
        return Err((
            "metadata.name".into(),
            format!(
                "{name:?} is not a valid egress gateway name (lower-case DNS name of at most {MAX_GATEWAY_NAME_LEN} characters)"
            ),
        ));
    }
    if gw.spec.servers.is_empty() {
        return Err((
            "spec.servers".into(),
            "at least one server is required".into(),
        ));
    }
    let mut servers = Vec::new();
    for (i, s) in gw.spec.servers.iter().enumerate() {
        let port = port_of(s.port.number, &format!("spec.servers[{i}].port.number"))?;
        let protocol = s
            .port
            .protocol
            .as_deref()
            .unwrap_or("")
            .to_ascii_uppercase();
        let tls_mode = s.tls.as_ref().and_then(|t| t.mode.as_deref());
        let mode = match (protocol.as_str(), tls_mode) {
            ("HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB", None) => ServerMode::Http,
            ("HTTPS", Some("ISTIO_MUTUAL")) => ServerMode::Http,
            ("HTTPS" | "TLS", Some("PASSTHROUGH")) | ("TLS", Some("ISTIO_MUTUAL")) => {
                ServerMode::TlsPassthrough
            }
            ("TCP" | "MONGO" | "REDIS" | "MYSQL", None) => ServerMode::Tcp,
            (
                "HTTPS" | "TLS",
                Some(m @ ("SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL" | "AUTO_PASSTHROUGH")),
            ) => {
                return Err((
                    format!("spec.servers[{i}].tls.mode"),
                    format!(
                        "{m} is not supported on a Sluice egress gateway (use PASSTHROUGH, or ISTIO_MUTUAL with TLS origination by DestinationRule)"
                    ),
                ));
            }
            ("HTTPS" | "TLS", Some(m)) => {
                return Err((
                    format!("spec.servers[{i}].tls.mode"),
                    format!("{m:?} is not a TLS mode"),
                ));
            }
            ("HTTPS" | "TLS", None) => {
                return Err((
                    format!("spec.servers[{i}].tls"),
                    "HTTPS and TLS servers need TLS settings".into(),
                ));
            }
            (p, Some(_))
                if matches!(
                    p,
                    "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB" | "TCP" | "MONGO" | "REDIS" | "MYSQL"
                ) =>
            {
                return Err((
                    format!("spec.servers[{i}].tls"),
                    format!("a {p} server takes no TLS settings"),
                ));
            }
            (p, _) => {
                return Err((
                    format!("spec.servers[{i}].port.protocol"),
                    format!("{p:?} is not a protocol Istio knows"),
                ));
            }
        };
        if s.hosts.is_empty() {
            return Err((
                format!("spec.servers[{i}].hosts"),
                "at least one host is required".into(),
            ));
        }
        let mut hosts = Vec::new();
        for (j, raw) in s.hosts.iter().enumerate() {
            let field = format!("spec.servers[{i}].hosts[{j}]");
            let (ns, host) = match raw.split_once('/') {
                None => (NamespaceFilter::Any, raw.as_str()),
                Some(("*", h)) => (NamespaceFilter::Any, h),
                Some((".", h)) => (NamespaceFilter::Only(namespace.to_owned()), h),
                Some((ns, h)) if !ns.is_empty() && !h.contains('/') => {
                    (NamespaceFilter::Only(ns.to_owned()), h)
                }
                Some(_) => return Err((field, format!("{raw:?} is not [namespace/]host"))),
            };
            let host = HostMatch::parse(host).map_err(|e| (field, e.to_string()))?;
            hosts.push(ServerHost {
                namespace: ns,
                host,
            });
        }
        servers.push(GatewayServer { port, mode, hosts });
    }
    Ok(EgressGateway {
        key: ObjectKey::new(namespace, name),
        selector: gw.spec.selector.clone(),
        servers,
        static_gateway: None,
    })
}

fn binding(raw: &str, namespace: &str) -> Option<Binding> {
    if raw == "mesh" {
        return Some(Binding::Mesh);
    }
    let (ns, name) = raw.split_once('/').unwrap_or((namespace, raw));
    if ns.is_empty() || name.is_empty() || name.contains('/') {
        return None;
    }
    Some(Binding::Gateway(ObjectKey::new(ns, name)))
}

fn bindings(
    list: &[String],
    namespace: &str,
    field: &str,
) -> Result<Vec<Binding>, (String, String)> {
    list.iter()
        .enumerate()
        .map(|(i, raw)| {
            binding(raw, namespace).ok_or_else(|| {
                (
                    format!("{field}[{i}]"),
                    format!("{raw:?} is not mesh, name or namespace/name"),
                )
            })
        })
        .collect()
}

fn expand_host(host: &str, namespace: &str) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.contains('.') {
        host
    } else {
        format!("{host}.{namespace}.svc.{CLUSTER_DOMAIN}")
    }
}

fn target(
    destinations: &[(Destination, Option<i32>)],
    namespace: &str,
    field: &str,
) -> Result<RouteTarget, (String, String)> {
    let mut best: Option<RouteTarget> = None;
    for (i, (d, weight)) in destinations.iter().enumerate() {
        let field = format!("{field}[{i}]");
        if HostMatch::parse(&d.host).is_err() {
            return Err((
                format!("{field}.destination.host"),
                format!("{:?} is not a host", d.host),
            ));
        }
        let port = match d.port.as_ref().and_then(|p| p.number) {
            None => None,
            Some(n) => Some(port_of(n, &format!("{field}.destination.port.number"))?),
        };
        let weight = match weight {
            None => 0,
            Some(w) => {
                u32::try_from(*w).map_err(|_| (format!("{field}.weight"), format!("{w} < 0")))?
            }
        };
        let t = RouteTarget {
            host: expand_host(&d.host, namespace),
            subset: d.subset.clone(),
            port,
            weight,
        };
        if best.as_ref().is_none_or(|b| t.weight > b.weight) {
            best = Some(t);
        }
    }
    best.ok_or_else(|| {
        (
            field.to_owned(),
            "at least one destination is required".into(),
        )
    })
}

#[allow(clippy::too_many_arguments)]
fn route_match(
    field: &str,
    namespace: &str,
    gateways: &[String],
    port: Option<PortNumber>,
    sni_hosts: &[String],
    authority: Option<&StringMatch>,
    destination_subnets: &[String],
    source_labels: &BTreeMap<String, String>,
    source_namespace: Option<&String>,
) -> Result<RouteMatch, (String, String)> {
    let gateways = if gateways.is_empty() {
        None
    } else {
        Some(bindings(gateways, namespace, &format!("{field}.gateways"))?)
    };
    let port = match port {
        None => None,
        Some(n) => Some(port_of(n, &format!("{field}.port"))?),
    };
    let sni_hosts = sni_hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            HostMatch::parse(h).map_err(|e| (format!("{field}.sniHosts[{i}]"), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let authority = match authority {
        None => None,
        Some(StringMatch { exact: Some(e), .. }) => {
            Some(AuthorityMatch::Exact(e.to_ascii_lowercase()))
        }
        Some(StringMatch {
            prefix: Some(p), ..
        }) => Some(AuthorityMatch::Prefix(p.to_ascii_lowercase())),
        // A regex authority cannot be decided here; treated as absent (see module docs).
        Some(_) => None,
    };
    let destination_subnets = destination_subnets
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    (
                        format!("{field}.destinationSubnets[{i}]"),
                        format!("{s:?} is not a CIDR"),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RouteMatch {
        gateways,
        port,
        sni_hosts,
        authority,
        destination_subnets,
        source_labels: source_labels.clone(),
        source_namespace: source_namespace.cloned(),
    })
}

fn route_table(vs: &VirtualService, out: &mut Rejections) -> Option<RouteTable> {
    let (namespace, name) = meta(&vs.metadata);
    match route_table_inner(vs, &namespace, &name) {
        Ok(t) => Some(t),
        Err((field, message)) => {
            out.reject(VS_KIND, Some(&namespace), &name, &field, message);
            None
        }
    }
}

fn route_table_inner(
    vs: &VirtualService,
    namespace: &str,
    name: &str,
) -> Result<RouteTable, (String, String)> {
    let spec = &vs.spec;
    let hosts = spec
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| HostMatch::parse(h).map_err(|e| (format!("spec.hosts[{i}]"), e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let mut gateways = bindings(&spec.gateways, namespace, "spec.gateways")?;
    if gateways.is_empty() {
        gateways.push(Binding::Mesh);
    }
    let export = Export::parse(namespace, &spec.export_to)
        .map_err(|(i, m)| (format!("spec.exportTo[{i}]"), m))?;

    let mut http = Vec::new();
    for (i, r) in spec.http.iter().enumerate() {
        let field = format!("spec.http[{i}]");
        if r.route.is_empty() {
            continue; // redirect, direct response or delegate: not an egress route
        }
        let matches = r
            .matches
            .iter()
            .enumerate()
            .map(|(j, m)| {
                route_match(
                    &format!("{field}.match[{j}]"),
                    namespace,
                    &m.gateways,
                    m.port,
                    &[],
                    m.authority.as_ref(),
                    &[],
                    &m.source_labels,
                    m.source_namespace.as_ref(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let dests: Vec<_> = r
            .route
            .iter()
            .map(|d| (d.destination.clone(), d.weight))
            .collect();
        let target = target(&dests, namespace, &format!("{field}.route"))?;
        http.push(Route { matches, target });
    }
    let mut tls = Vec::new();
    for (i, r) in spec.tls.iter().enumerate() {
        let field = format!("spec.tls[{i}]");
        if r.matches.is_empty() {
            return Err((
                format!("{field}.match"),
                "TLS routes need a match with sniHosts".into(),
            ));
        }
        let mut matches = Vec::new();
        for (j, m) in r.matches.iter().enumerate() {
            if m.sni_hosts.is_empty() {
                return Err((
                    format!("{field}.match[{j}].sniHosts"),
                    "at least one SNI host is required".into(),
                ));
            }
            matches.push(route_match(
                &format!("{field}.match[{j}]"),
                namespace,
                &m.gateways,
                m.port,
                &m.sni_hosts,
                None,
                &m.destination_subnets,
                &m.source_labels,
                m.source_namespace.as_ref(),
            )?);
        }
        let dests: Vec<_> = r
            .route
            .iter()
            .map(|d| (d.destination.clone(), d.weight))
            .collect();
        let target = target(&dests, namespace, &format!("{field}.route"))?;
        tls.push(Route { matches, target });
    }
    let mut tcp = Vec::new();
    for (i, r) in spec.tcp.iter().enumerate() {
        let field = format!("spec.tcp[{i}]");
        let matches = r
            .matches
            .iter()
            .enumerate()
            .map(|(j, m)| {
                route_match(
                    &format!("{field}.match[{j}]"),
                    namespace,
                    &m.gateways,
                    m.port,
                    &[],
                    None,
                    &m.destination_subnets,
                    &m.source_labels,
                    m.source_namespace.as_ref(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let dests: Vec<_> = r
            .route
            .iter()
            .map(|d| (d.destination.clone(), d.weight))
            .collect();
        let target = target(&dests, namespace, &format!("{field}.route"))?;
        tcp.push(Route { matches, target });
    }
    Ok(RouteTable {
        key: ObjectKey::new(namespace, name),
        hosts,
        gateways,
        export,
        http,
        tls,
        tcp,
    })
}

fn upstream_tls(t: &ClientTlsSettings, field: &str) -> Result<UpstreamTls, (String, String)> {
    let mode = match t.mode.as_deref() {
        None | Some("DISABLE") => TlsMode::Disable,
        Some("SIMPLE") => TlsMode::Simple,
        Some("MUTUAL") => TlsMode::Mutual,
        Some("ISTIO_MUTUAL") => TlsMode::IstioMutual,
        Some(other) => {
            return Err((
                format!("{field}.mode"),
                format!("{other:?} is not DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL"),
            ));
        }
    };
    if let Some(sni) = &t.sni
        && !matches!(HostMatch::parse(sni), Ok(HostMatch::Exact(_)))
    {
        return Err((
            format!("{field}.sni"),
            format!("{sni:?} is not a host name"),
        ));
    }
    Ok(UpstreamTls {
        mode,
        sni: t.sni.as_ref().map(|s| s.to_ascii_lowercase()),
        ca_certificates: t.ca_certificates.clone(),
        credential_name: t.credential_name.clone(),
        client_certificate: t.client_certificate.clone(),
        private_key: t.private_key.clone(),
        subject_alt_names: t.subject_alt_names.clone(),
        insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
    })
}

type PolicyTls = (Option<UpstreamTls>, BTreeMap<u16, UpstreamTls>);

fn policy_tls(
    p: Option<&crate::resources::istio_networking::TrafficPolicy>,
    field: &str,
) -> Result<PolicyTls, (String, String)> {
    let Some(p) = p else {
        return Ok((None, BTreeMap::new()));
    };
    let tls = match &p.tls {
        None => None,
        Some(t) => Some(upstream_tls(t, &format!("{field}.tls"))?),
    };
    let mut ports = BTreeMap::new();
    for (i, pl) in p.port_level_settings.iter().enumerate() {
        let f = format!("{field}.portLevelSettings[{i}]");
        let Some(t) = &pl.tls else { continue };
        let Some(n) = pl.port.as_ref().and_then(|p| p.number) else {
            return Err((format!("{f}.port"), "a port is required".into()));
        };
        let port = port_of(n, &format!("{f}.port.number"))?;
        ports.insert(port, upstream_tls(t, &format!("{f}.tls"))?);
    }
    Ok((tls, ports))
}

fn destination_policy(dr: &DestinationRule, out: &mut Rejections) -> Option<DestinationPolicy> {
    let (namespace, name) = meta(&dr.metadata);
    let result = (|| {
        let host = HostMatch::parse(&dr.spec.host)
            .map(|h| match h {
                HostMatch::Exact(e) => HostMatch::Exact(expand_host(&e, &namespace)),
                other => other,
            })
            .map_err(|e| ("spec.host".to_owned(), e.to_string()))?;
        let export = Export::parse(&namespace, &dr.spec.export_to)
            .map_err(|(i, m)| (format!("spec.exportTo[{i}]"), m))?;
        let (tls, port_tls) = policy_tls(dr.spec.traffic_policy.as_ref(), "spec.trafficPolicy")?;
        let mut subsets = BTreeMap::new();
        for (i, s) in dr.spec.subsets.iter().enumerate() {
            let field = format!("spec.subsets[{i}]");
            if s.name.is_empty() {
                return Err((format!("{field}.name"), "a name is required".into()));
            }
            let (tls, port_tls) =
                policy_tls(s.traffic_policy.as_ref(), &format!("{field}.trafficPolicy"))?;
            subsets.insert(
                s.name.clone(),
                SubsetPolicy {
                    labels: s.labels.clone(),
                    tls,
                    port_tls,
                },
            );
        }
        Ok::<_, (String, String)>(DestinationPolicy {
            key: ObjectKey::new(&namespace, &name),
            host,
            export,
            tls,
            port_tls,
            subsets,
        })
    })();
    match result {
        Ok(p) => Some(p),
        Err((field, message)) => {
            out.reject(DR_KIND, Some(&namespace), &name, &field, message);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_names_follow_the_aks_rule() {
        for good in [
            "a",
            "asm-egress-test",
            "egress.v1",
            "a1-b2.c3",
            &"a".repeat(53),
        ] {
            assert!(valid_gateway_name(good), "{good} refused");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a..b",
            ".a",
            "a.",
            &"a".repeat(54),
        ] {
            assert!(!valid_gateway_name(bad), "{bad} accepted");
        }
    }

    #[test]
    fn short_destination_hosts_expand_in_the_route_namespace() {
        assert_eq!(
            expand_host("istio-egressgateway", "istio-system"),
            "istio-egressgateway.istio-system.svc.cluster.local"
        );
        assert_eq!(expand_host("HTTPBIN.org.", "x"), "httpbin.org");
    }
}

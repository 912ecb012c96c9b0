//! Egress part of MeshState: the outbound traffic policy, the external-service registry, egress
//! gateway routing and static gateway configurations — and the decision the proxy asks for each
//! outbound connection ([`Egress::outbound_decision`]) or, in gateway role, for each connection
//! it accepts ([`Egress::gateway_decision`]).
//!
//! Decisions, in order, for a connection from a mesh workload:
//! 1. A mesh destination (the caller knows: a workload or service IP) always passes.
//! 2. The outbound policy for the source (mesh config, Sidecar) is `ALLOW_ANY` or
//!    `REGISTRY_ONLY`; under `REGISTRY_ONLY` the destination must be listed by a ServiceEntry
//!    visible to the source's namespace, on the destination port, by host (HTTP `Host`, TLS SNI,
//!    or a DNS name the agent resolved to this IP) or by address. Otherwise: refused.
//!    A name alone never sends a connection to the address the client dialled: what leaves
//!    directly goes where the entry says ([`ExternalService::upstream`]): the dialled address if
//!    the entry's `addresses` cover it, else a listed endpoint (`STATIC`) or an address the agent
//!    resolved for the host (DNS), else (`NONE`, nothing resolved) it is refused.
//! 3. A VirtualService bound to `mesh` that routes the host to an egress Gateway sends the
//!    connection there (HTTP by Host, TLS passthrough by SNI, TLS origination by
//!    DestinationRule); if the gateway would have no route for it, it is refused at the source.
//! 4. A source bound to a StaticGatewayConfiguration goes through that gateway's nodes (per
//!    `defaultRoute`/`excludeCidrs`), leaving from its prefix; with no prefix known yet it is
//!    refused rather than leaving from an address firewalls do not expect.
//! 5. Otherwise it passes straight out.
//!
//! Not modelled: Sidecar `egress.hosts` (narrowing the visible registry), Sidecar `egressProxy`,
//! request-level VirtualService conditions (see [`routing`]), and Istio's quirk that a TCP
//! ServiceEntry without addresses admits every IP on its port.
pub mod host;
pub mod outbound_policy;
pub mod registry;
pub mod routing;
pub mod static_gateway;

#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
};

use serde::Serialize;

pub use host::{Export, HostMatch, ObjectKey, normalise_host};
pub use outbound_policy::{OutboundMode, OutboundPolicy, PolicySource, SidecarPolicy};
pub use registry::{ExternalService, Location, Protocol, RegistryPort, Resolution};
pub use routing::{
    EgressGateway, GatewayForward, GatewayMode, GatewayRefusal, RouteTable, Routing, ServerMode,
    TlsMode, UpstreamTls, valid_gateway_name,
};
pub use static_gateway::{DefaultRoute, Placement, PrefixSource, StaticGateway, StaticGateways};

use super::{MeshSettings, Node, Workload, WorkloadUid, rejections::Rejections};
use crate::resources::ResourceSet;
use routing::{Conn, HostKind};

/// What the agent's resolver knows: the addresses of the names it resolves (the hosts and
/// endpoint names of DNS ServiceEntries).
pub trait Resolved: fmt::Debug + Send + Sync {
    /// The addresses last resolved for `host` (normalised); empty when unknown.
    fn addrs_of(&self, host: &str) -> Vec<IpAddr>;
}

/// No resolver: no name has addresses.
#[derive(Debug, Default)]
pub struct NothingResolved;

impl Resolved for NothingResolved {
    fn addrs_of(&self, _host: &str) -> Vec<IpAddr> {
        Vec::new()
    }
}

/// Fixed answers (tests, tools).
impl Resolved for BTreeMap<String, Vec<IpAddr>> {
    fn addrs_of(&self, host: &str) -> Vec<IpAddr> {
        self.get(host).cloned().unwrap_or_default()
    }
}

/// Egress configuration, normalised.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Egress {
    pub policy: OutboundPolicy,
    /// ServiceEntries, by namespace/name.
    pub registry: Vec<ExternalService>,
    pub routing: Routing,
    pub static_gateways: StaticGateways,
}

/// Whether the caller found the destination IP in the mesh (a workload or service address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestinationScope {
    Mesh,
    OutsideMesh,
}

/// A host name the proxy learnt for a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostHint<'a> {
    /// HTTP `Host` / `:authority` (a port suffix is fine).
    Http(&'a str),
    /// TLS ClientHello SNI.
    Tls(&'a str),
    /// A name the agent's resolver answered with the destination IP.
    Dns(&'a str),
}

impl<'a> HostHint<'a> {
    fn parts(self) -> (&'a str, HostKind) {
        match self {
            Self::Http(h) => (h, HostKind::Http),
            Self::Tls(h) => (h, HostKind::Tls),
            Self::Dns(h) => (h, HostKind::Other),
        }
    }
}

/// Why a connection may leave the mesh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Allowed {
    /// A mesh destination.
    Mesh,
    /// Listed by this ServiceEntry.
    Registered(ObjectKey),
    /// Not listed, but the policy is `ALLOW_ANY`.
    AllowAny,
}

/// Where the gateway hop goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayTarget {
    /// An Istio egress Gateway, reached through the Service its mesh route names.
    Istio {
        gateway: ObjectKey,
        /// e.g. `istio-egressgateway.istio-system.svc.cluster.local`.
        service_host: String,
        service_port: u16,
        /// The VirtualService that chose it.
        route: ObjectKey,
    },
    /// The gateway nodes of a StaticGatewayConfiguration.
    Static { sgc: ObjectKey },
}

/// Where the gateway finally connects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Upstream {
    /// A host (the gateway resolves it) and port.
    Host { host: String, port: u16 },
    /// The address the client dialled.
    Addr(SocketAddr),
}

/// A connection that goes through an egress gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GatewayHop {
    pub target: GatewayTarget,
    pub mode: GatewayMode,
    pub upstream: Upstream,
    /// The StaticGatewayConfiguration whose prefix the gateway connects from, if pinned.
    pub source_prefix: Option<ObjectKey>,
    pub allowed: Allowed,
}

/// Why a connection is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefuseReason {
    /// `REGISTRY_ONLY`, and no visible ServiceEntry lists the destination.
    NotRegistered {
        host: Option<String>,
        dest: SocketAddr,
        policy: PolicySource,
    },
    /// `REGISTRY_ONLY`: a ServiceEntry lists the host, but gives no address to connect to
    /// (`NONE` without `addresses` covering the dialled one, a DNS host not resolved).
    NoListedAddress {
        host: String,
        dest: SocketAddr,
        entry: ObjectKey,
    },
    /// Routed to an egress gateway that has no route for it.
    Gateway(GatewayRefusal),
    /// Bound to a StaticGatewayConfiguration whose prefix is not known yet.
    StaticPrefixUnknown { sgc: ObjectKey },
}

impl RefuseReason {
    /// A short, fixed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotRegistered { .. } => "registry_only",
            Self::NoListedAddress { .. } => "registry_only_address",
            Self::Gateway(GatewayRefusal::UnknownGateway(_)) => "gateway_unknown",
            Self::Gateway(GatewayRefusal::NoServer { .. }) => "gateway_no_server",
            Self::Gateway(GatewayRefusal::NoRoute { .. }) => "gateway_no_route",
            Self::StaticPrefixUnknown { .. } => "static_prefix_unknown",
        }
    }
}

impl fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotRegistered { host, dest, policy } => {
                write!(f, "REGISTRY_ONLY ")?;
                match policy {
                    PolicySource::MeshConfig => write!(f, "(mesh config)")?,
                    PolicySource::Sidecar(k) => write!(f, "(Sidecar {k})")?,
                }
                write!(f, ": no ServiceEntry lists {dest}")?;
                if let Some(h) = host {
                    write!(f, " or host {h}")?;
                }
                Ok(())
            }
            Self::NoListedAddress { host, dest, entry } => write!(
                f,
                "REGISTRY_ONLY: ServiceEntry {entry} lists host {host} but not {dest}, and gives no address of its own to connect to"
            ),
            Self::Gateway(g) => write!(f, "{g}"),
            Self::StaticPrefixUnknown { sgc } => write!(
                f,
                "StaticGatewayConfiguration {sgc} has no egress prefix yet (status.egressIpPrefix or agent config)"
            ),
        }
    }
}

/// What to do with an outbound connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EgressDecision {
    /// Connect straight out, to `dst`: the dialled address, or the one the ServiceEntry that
    /// names the host sends it to.
    Passthrough { allowed: Allowed, dst: SocketAddr },
    /// Tunnel to an egress gateway, which connects out.
    ViaGateway(Box<GatewayHop>),
    /// Close the connection.
    Refuse(RefuseReason),
}

impl Egress {
    /// Decides an outbound connection from `source` to `dest`; see the module docs for the order.
    /// `resolved` holds the agent's answers for DNS ServiceEntries.
    pub fn outbound_decision(
        &self,
        source: &Workload,
        dest: SocketAddr,
        host: Option<HostHint<'_>>,
        scope: DestinationScope,
        resolved: &dyn Resolved,
    ) -> EgressDecision {
        if scope == DestinationScope::Mesh {
            return EgressDecision::Passthrough {
                allowed: Allowed::Mesh,
                dst: dest,
            };
        }
        let named = host.and_then(|h| {
            let (raw, kind) = h.parts();
            normalise_host(raw).map(|n| (n, kind))
        });
        let host_name = named.as_ref().map(|(n, _)| n.as_str());
        let by_host =
            host_name.and_then(|h| self.registered_host(&source.namespace, dest.port(), h));
        let by_ip = self.registered_ip(&source.namespace, dest);
        let mode = self.policy.mode_for(&source.namespace, &source.labels);
        let allowed = match by_host.or(by_ip) {
            Some(se) => Allowed::Registered(se.key.clone()),
            None => match mode {
                (OutboundMode::AllowAny, _) => Allowed::AllowAny,
                (OutboundMode::RegistryOnly, policy) => {
                    return EgressDecision::Refuse(RefuseReason::NotRegistered {
                        host: host_name.map(str::to_owned),
                        dest,
                        policy,
                    });
                }
            },
        };
        let conn = Conn {
            namespace: &source.namespace,
            labels: &source.labels,
            ip: dest.ip(),
            port: dest.port(),
            host: named.as_ref().map(|(n, k)| (n.as_str(), *k)),
        };
        match self.routing.mesh_hop(&conn) {
            Err(refusal) => return EgressDecision::Refuse(RefuseReason::Gateway(refusal)),
            Ok(Some(hop)) => {
                let source_prefix = self
                    .routing
                    .gateways
                    .get(&hop.gateway)
                    .and_then(|g| g.static_gateway.clone());
                return EgressDecision::ViaGateway(Box::new(GatewayHop {
                    target: GatewayTarget::Istio {
                        gateway: hop.gateway,
                        service_host: hop.service_host,
                        service_port: hop.service_port,
                        route: hop.route,
                    },
                    mode: hop.forward.mode,
                    upstream: Upstream::Host {
                        host: hop.forward.upstream_host,
                        port: hop.forward.upstream_port,
                    },
                    source_prefix,
                    allowed,
                }));
            }
            Ok(None) => {}
        }
        // From here the connection goes to an address: never one that only the name vouches for.
        let (allowed, upstream) = match (by_host, host_name) {
            (Some(se), Some(h)) => match se.upstream(dest, h, resolved) {
                Some(to) => (allowed, to),
                None => match (by_ip, mode.0) {
                    (Some(ip_se), _) => (Allowed::Registered(ip_se.key.clone()), dest),
                    (None, OutboundMode::AllowAny) => (Allowed::AllowAny, dest),
                    (None, OutboundMode::RegistryOnly) => {
                        return EgressDecision::Refuse(RefuseReason::NoListedAddress {
                            host: h.to_owned(),
                            dest,
                            entry: se.key.clone(),
                        });
                    }
                },
            },
            _ => (allowed, dest),
        };
        if let Some(sgc) = self.static_gateway_of(&source.uid)
            && sgc.routes_via_gateway(upstream.ip())
        {
            if sgc.prefix.is_none() {
                return EgressDecision::Refuse(RefuseReason::StaticPrefixUnknown {
                    sgc: sgc.key.clone(),
                });
            }
            return EgressDecision::ViaGateway(Box::new(GatewayHop {
                target: GatewayTarget::Static {
                    sgc: sgc.key.clone(),
                },
                mode: GatewayMode::Tcp,
                upstream: Upstream::Addr(upstream),
                source_prefix: Some(sgc.key.clone()),
                allowed,
            }));
        }
        EgressDecision::Passthrough {
            allowed,
            dst: upstream,
        }
    }

    /// In gateway role: what Gateway `gateway` does with a connection on its `port` naming
    /// `host`. Unmatched hosts are refused, never forwarded.
    pub fn gateway_decision(
        &self,
        gateway: &ObjectKey,
        port: u16,
        host: Option<HostHint<'_>>,
    ) -> Result<GatewayForward, GatewayRefusal> {
        let named = host.and_then(|h| {
            let (raw, kind) = h.parts();
            normalise_host(raw).map(|n| (n, kind))
        });
        self.routing
            .gateway_forward(gateway, port, named.as_ref().map(|(n, k)| (n.as_str(), *k)))
    }

    /// The ServiceEntry visible to `namespace` that lists `dest` (by `host`, else by address).
    /// A host match says nothing about where the connection may go: see
    /// [`ExternalService::upstream`].
    pub fn registered(
        &self,
        namespace: &str,
        dest: SocketAddr,
        host: Option<&str>,
    ) -> Option<&ExternalService> {
        host.and_then(|h| self.registered_host(namespace, dest.port(), h))
            .or_else(|| self.registered_ip(namespace, dest))
    }

    /// The first ServiceEntry visible to `namespace` that lists `host` on `port`.
    fn registered_host(&self, namespace: &str, port: u16, host: &str) -> Option<&ExternalService> {
        self.registry.iter().find(|se| {
            se.export.visible_to(namespace) && se.port(port).is_some() && se.matches_host(host)
        })
    }

    /// The first ServiceEntry visible to `namespace` that lists `dest` by address.
    fn registered_ip(&self, namespace: &str, dest: SocketAddr) -> Option<&ExternalService> {
        self.registry.iter().find(|se| {
            se.export.visible_to(namespace)
                && se.port(dest.port()).is_some()
                && se.matches_ip(dest.ip())
        })
    }

    /// The StaticGatewayConfiguration `uid` is bound to, if any.
    pub fn static_gateway_of(&self, uid: &WorkloadUid) -> Option<&StaticGateway> {
        self.static_gateways
            .bindings
            .get(uid)
            .and_then(|k| self.static_gateways.configs.get(k))
    }

    /// True if `node` carries the gateway `target` names: an Istio Gateway whose (non-empty)
    /// selector the node's labels satisfy, or the node pool of a StaticGatewayConfiguration.
    pub fn hosts_target(&self, node: &Node, target: &GatewayTarget) -> bool {
        match target {
            GatewayTarget::Istio { gateway, .. } => {
                self.routing.gateways.get(gateway).is_some_and(|g| {
                    !g.selector.is_empty()
                        && g.selector
                            .iter()
                            .all(|(k, v)| node.labels.get(k) == Some(v))
                })
            }
            GatewayTarget::Static { sgc } => self
                .static_gateways
                .configs
                .get(sgc)
                .is_some_and(|g| g.hosted_on(node)),
        }
    }

    /// True if a decision for `source` on `port` may depend on the host name, so the proxy should
    /// peek the HTTP `Host` or TLS SNI before asking.
    pub fn needs_host_hint(&self, source: &Workload, port: u16) -> bool {
        let in_registry = self.registry.iter().any(|se| {
            se.export.visible_to(&source.namespace)
                && se.port(port).is_some_and(|p| p.protocol.names_host())
        });
        let in_routes = self.routing.route_tables.iter().any(|t| {
            t.export.visible_to(&source.namespace)
                && t.gateways.contains(&routing::Binding::Mesh)
                && t.http.iter().chain(&t.tls).any(|r| {
                    r.matches.is_empty()
                        || r.matches.iter().any(|m| m.port.is_none_or(|p| p == port))
                })
        });
        in_registry || in_routes
    }

    /// Host names the agent should resolve (DNS-resolution ServiceEntries): their exact hosts
    /// and endpoint names.
    pub fn dns_hosts(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for se in self.registry.iter().filter(|se| se.resolution.uses_dns()) {
            if se.endpoints.is_empty() {
                out.extend(se.hosts.iter().filter_map(|h| match h {
                    HostMatch::Exact(h) => Some(h.clone()),
                    _ => None,
                }));
            }
            out.extend(se.endpoints.iter().filter_map(|e| match &e.address {
                registry::EndpointAddress::Host(h) => Some(h.clone()),
                _ => None,
            }));
        }
        out
    }
}

/// Builds the egress model (called by [`super::build`]).
pub(crate) fn build(
    resources: &ResourceSet,
    settings: &MeshSettings,
    workloads: &BTreeMap<WorkloadUid, Workload>,
    out: &mut Rejections,
) -> Egress {
    let policy = outbound_policy::build(resources, settings, out);
    let registry = registry::build(&resources.service_entries, out);
    let mut routing = routing::build(
        &resources.istio_gateways,
        &resources.virtual_services,
        &resources.destination_rules,
        out,
    );
    let static_gateways = static_gateway::build(
        &resources.static_gateway_configurations,
        &settings.static_gateway_prefixes,
        workloads,
        out,
    );
    for gw in routing.gateways.values_mut() {
        if gw.selector.is_empty() {
            continue;
        }
        gw.static_gateway = workloads
            .values()
            .filter(|w| gw.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            .find_map(|w| static_gateways.bindings.get(&w.uid).cloned());
    }
    Egress {
        policy,
        registry,
        routing,
        static_gateways,
    }
}

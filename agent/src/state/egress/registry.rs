//! The external-service registry, from ServiceEntries.
//!
//! Checks follow Istio's own ServiceEntry validation where it matters for egress: at least one
//! host and no bare `*`; addresses are IPs or CIDRs, CIDRs only with `NONE`/`STATIC` resolution;
//! ports are TCP ports with unique names and numbers; `NONE` takes no endpoints; several hosts
//! with a non-HTTP, non-TLS port need `NONE` (nothing else tells the hosts apart).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;
use serde::Serialize;

use super::{
    Resolved,
    host::{Export, HostMatch, ObjectKey},
};
use crate::{
    resources::istio_networking::{PortNumber, ServiceEntry},
    state::rejections::Rejections,
};

const KIND: &str = "ServiceEntry.networking.istio.io";

/// Application protocol of a registry port, as far as egress cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Protocol {
    /// HTTP/1.1, HTTP/2, gRPC: routed by `Host`/`:authority`.
    Http,
    /// TLS carrying HTTP: routed by SNI.
    Https,
    /// Any TLS: routed by SNI.
    Tls,
    /// Opaque TCP (also MONGO, REDIS, MYSQL, or no protocol given).
    Tcp,
    /// UDP: listed, but Sluice proxies TCP only.
    Udp,
}

impl Protocol {
    /// Reads Istio's protocol names (case-insensitive); `None` if unknown.
    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw.to_ascii_uppercase().as_str() {
            "HTTP" | "HTTP2" | "HTTP_PROXY" | "GRPC" | "GRPC-WEB" => Self::Http,
            "HTTPS" => Self::Https,
            "TLS" => Self::Tls,
            "" | "TCP" | "MONGO" | "REDIS" | "MYSQL" => Self::Tcp,
            "UDP" => Self::Udp,
            _ => return None,
        })
    }

    /// True if connections on this port name their host (HTTP Host or TLS SNI).
    pub fn names_host(self) -> bool {
        matches!(self, Self::Http | Self::Https | Self::Tls)
    }
}

/// How the registry finds a service's endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// Connect to the address the client dialled.
    #[default]
    None,
    /// Connect to the listed endpoints.
    Static,
    /// Resolve the hosts (or endpoint names) with DNS; any answer may be used.
    Dns,
    /// Resolve with DNS, use one answer at a time.
    DnsRoundRobin,
    /// Resolve wildcard hosts on demand.
    DynamicDns,
}

impl Resolution {
    fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "NONE" => Self::None,
            "STATIC" => Self::Static,
            "DNS" => Self::Dns,
            "DNS_ROUND_ROBIN" => Self::DnsRoundRobin,
            "DYNAMIC_DNS" => Self::DynamicDns,
            _ => return None,
        })
    }

    /// True for the DNS-based resolutions, whose hosts the agent resolves.
    pub fn uses_dns(self) -> bool {
        matches!(self, Self::Dns | Self::DnsRoundRobin | Self::DynamicDns)
    }
}

/// Whether a service is part of the mesh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    #[default]
    MeshExternal,
    MeshInternal,
}

/// A port of a registry entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RegistryPort {
    pub number: u16,
    pub protocol: Protocol,
    pub name: String,
    pub target_port: Option<u16>,
}

/// Where an endpoint is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointAddress {
    Ip(IpAddr),
    /// A DNS name, resolved by the agent.
    Host(String),
    /// `unix://` path.
    Unix(String),
}

/// One endpoint of a registry entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RegistryEndpoint {
    pub address: EndpointAddress,
    /// Port name → port number on this endpoint.
    pub ports: BTreeMap<String, u16>,
    pub labels: BTreeMap<String, String>,
    pub weight: Option<u32>,
}

/// A ServiceEntry, normalised.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExternalService {
    pub key: ObjectKey,
    pub hosts: Vec<HostMatch>,
    /// Virtual IPs and CIDRs (a single IP is a host-length prefix).
    pub addresses: Vec<IpNet>,
    pub ports: Vec<RegistryPort>,
    pub resolution: Resolution,
    pub location: Location,
    pub endpoints: Vec<RegistryEndpoint>,
    pub workload_selector: Option<BTreeMap<String, String>>,
    pub export: Export,
    pub subject_alt_names: Vec<String>,
}

impl ExternalService {
    /// The port numbered `port`, if listed.
    pub fn port(&self, port: u16) -> Option<&RegistryPort> {
        self.ports.iter().find(|p| p.number == port)
    }

    /// True if `host` (normalised) is one of the entry's hosts.
    pub fn matches_host(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| h.matches(host))
    }

    /// Where a connection that names `host` (one of the entry's hosts) and dialled `dest` may
    /// go, as Istio's sidecar would route it: `dest` itself when the entry's `addresses` cover
    /// it; otherwise, by resolution, one of the listed endpoints (`STATIC`) or an address the
    /// agent resolved for the host or the endpoint names (the DNS resolutions), `dest` when it is
    /// one of them, else one of `dest`'s family. `None` when there is nowhere: `NONE` outside
    /// its addresses, nothing resolved (yet), a wildcard host the agent does not resolve.
    pub fn upstream(
        &self,
        dest: SocketAddr,
        host: &str,
        resolved: &dyn Resolved,
    ) -> Option<SocketAddr> {
        if self.addresses.iter().any(|net| net.contains(&dest.ip())) {
            return Some(dest);
        }
        let port = self.port(dest.port())?;
        let default_port = port.target_port.unwrap_or(port.number);
        let endpoint_port =
            |e: &RegistryEndpoint| e.ports.get(&port.name).copied().unwrap_or(default_port);
        let candidates: Vec<SocketAddr> = match self.resolution {
            Resolution::None => return None,
            Resolution::Static => self
                .endpoints
                .iter()
                .filter_map(|e| match e.address {
                    EndpointAddress::Ip(ip) => Some(SocketAddr::new(ip, endpoint_port(e))),
                    _ => None,
                })
                .collect(),
            Resolution::Dns | Resolution::DnsRoundRobin | Resolution::DynamicDns => {
                if self.endpoints.is_empty() {
                    resolved
                        .addrs_of(host)
                        .into_iter()
                        .map(|ip| SocketAddr::new(ip, default_port))
                        .collect()
                } else {
                    self.endpoints
                        .iter()
                        .flat_map(|e| {
                            let ips = match &e.address {
                                EndpointAddress::Ip(ip) => vec![*ip],
                                EndpointAddress::Host(h) => resolved.addrs_of(h),
                                EndpointAddress::Unix(_) => vec![],
                            };
                            let port = endpoint_port(e);
                            ips.into_iter().map(move |ip| SocketAddr::new(ip, port))
                        })
                        .collect()
                }
            }
        };
        candidates
            .iter()
            .find(|a| a.ip() == dest.ip())
            .or_else(|| candidates.iter().find(|a| a.is_ipv4() == dest.is_ipv4()))
            .or(candidates.first())
            .copied()
    }

    /// True if `ip` is one of the entry's addresses or static endpoint IPs.
    pub fn matches_ip(&self, ip: IpAddr) -> bool {
        self.addresses.iter().any(|net| net.contains(&ip))
            || (self.resolution == Resolution::Static
                && self
                    .endpoints
                    .iter()
                    .any(|e| e.address == EndpointAddress::Ip(ip)))
    }
}

/// Converts a port number as written to a TCP port, if it is one.
pub(super) fn tcp_port(n: PortNumber) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// Normalises every ServiceEntry, in namespace/name order.
pub(super) fn build(entries: &[ServiceEntry], out: &mut Rejections) -> Vec<ExternalService> {
    let mut list: Vec<ExternalService> = entries
        .iter()
        .filter_map(|se| external_service(se, out))
        .collect();
    list.sort_by(|a, b| a.key.cmp(&b.key));
    list
}

fn external_service(se: &ServiceEntry, out: &mut Rejections) -> Option<ExternalService> {
    let namespace = se
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = se.metadata.name.clone().unwrap_or_default();
    let mut reject = |field: &str, message: String| {
        out.reject(KIND, Some(&namespace), &name, field, message);
        None
    };
    let spec = &se.spec;

    if spec.hosts.is_empty() {
        return reject("spec.hosts", "at least one host is required".into());
    }
    let mut hosts = Vec::new();
    for (i, raw) in spec.hosts.iter().enumerate() {
        match HostMatch::parse(raw) {
            Ok(HostMatch::Any) => {
                return reject(
                    &format!("spec.hosts[{i}]"),
                    "\"*\" is not allowed in a ServiceEntry".into(),
                );
            }
            Ok(h) => hosts.push(h),
            Err(e) => return reject(&format!("spec.hosts[{i}]"), e.to_string()),
        }
    }

    let resolution = match spec.resolution.as_deref() {
        None => Resolution::None,
        Some(raw) => match Resolution::parse(raw) {
            Some(r) => r,
            None => {
                return reject(
                    "spec.resolution",
                    format!(
                        "{raw:?} is not one of NONE, STATIC, DNS, DNS_ROUND_ROBIN, DYNAMIC_DNS"
                    ),
                );
            }
        },
    };
    let location = match spec.location.as_deref() {
        None | Some("MESH_EXTERNAL") => Location::MeshExternal,
        Some("MESH_INTERNAL") => Location::MeshInternal,
        Some(raw) => {
            return reject(
                "spec.location",
                format!("{raw:?} is not MESH_EXTERNAL or MESH_INTERNAL"),
            );
        }
    };

    let mut addresses = Vec::new();
    for (i, raw) in spec.addresses.iter().enumerate() {
        let field = format!("spec.addresses[{i}]");
        let net = if raw.contains('/') {
            if !matches!(resolution, Resolution::None | Resolution::Static) {
                return reject(
                    &field,
                    "CIDR addresses are allowed only with NONE or STATIC resolution".into(),
                );
            }
            match raw.parse::<IpNet>() {
                Ok(net) => net.trunc(),
                Err(_) => return reject(&field, format!("{raw:?} is not a CIDR")),
            }
        } else {
            match raw.parse::<IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) => return reject(&field, format!("{raw:?} is not an IP address or CIDR")),
            }
        };
        addresses.push(net);
    }

    let mut ports = Vec::new();
    let mut names = BTreeSet::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let Some(number) = tcp_port(p.number) else {
            return reject(
                &format!("spec.ports[{i}].number"),
                format!("{} is not a port (1-65535)", p.number),
            );
        };
        let target_port = match p.target_port {
            None | Some(0) => None,
            Some(t) => match tcp_port(t) {
                Some(t) => Some(t),
                None => {
                    return reject(
                        &format!("spec.ports[{i}].targetPort"),
                        format!("{t} is not a port (1-65535)"),
                    );
                }
            },
        };
        let raw_protocol = p.protocol.as_deref().unwrap_or("");
        let Some(protocol) = Protocol::parse(raw_protocol) else {
            return reject(
                &format!("spec.ports[{i}].protocol"),
                format!("{raw_protocol:?} is not a protocol Istio knows"),
            );
        };
        let name = p.name.clone().unwrap_or_default();
        if ports.iter().any(|q: &RegistryPort| q.number == number) {
            return reject(
                &format!("spec.ports[{i}].number"),
                format!("port {number} listed twice"),
            );
        }
        if !names.insert(name.clone()) {
            return reject(
                &format!("spec.ports[{i}].name"),
                format!("port name {name:?} listed twice"),
            );
        }
        ports.push(RegistryPort {
            number,
            protocol,
            name,
            target_port,
        });
    }
    if resolution != Resolution::None
        && hosts.len() > 1
        && ports.iter().any(|p| !p.protocol.names_host())
    {
        return reject(
            "spec.ports",
            "several hosts with a non-HTTP, non-TLS port need resolution NONE".into(),
        );
    }

    if resolution == Resolution::None && !spec.endpoints.is_empty() {
        return reject(
            "spec.endpoints",
            "resolution NONE takes no endpoints".into(),
        );
    }
    if resolution == Resolution::DnsRoundRobin && spec.endpoints.len() > 1 {
        return reject(
            "spec.endpoints",
            "resolution DNS_ROUND_ROBIN takes at most one endpoint".into(),
        );
    }
    if spec.workload_selector.is_some() && !spec.endpoints.is_empty() {
        return reject(
            "spec.workloadSelector",
            "only one of workloadSelector or endpoints can be set".into(),
        );
    }
    let mut endpoints = Vec::new();
    for (i, e) in spec.endpoints.iter().enumerate() {
        let field = format!("spec.endpoints[{i}].address");
        let address = if let Some(path) = e.address.strip_prefix("unix://") {
            EndpointAddress::Unix(path.to_owned())
        } else if let Ok(ip) = e.address.parse::<IpAddr>() {
            EndpointAddress::Ip(ip)
        } else if resolution.uses_dns() {
            match HostMatch::parse(&e.address) {
                Ok(HostMatch::Exact(h)) => EndpointAddress::Host(h),
                _ => return reject(&field, format!("{:?} is not an IP or DNS name", e.address)),
            }
        } else {
            return reject(&field, format!("{:?} is not an IP address", e.address));
        };
        let mut endpoint_ports = BTreeMap::new();
        for (port_name, n) in &e.ports {
            let field = format!("spec.endpoints[{i}].ports.{port_name}");
            if !names.contains(port_name) {
                return reject(&field, "names no port of the ServiceEntry".into());
            }
            let Some(n) = tcp_port(*n) else {
                return reject(&field, format!("{n} is not a port (1-65535)"));
            };
            endpoint_ports.insert(port_name.clone(), n);
        }
        let weight = match e.weight {
            None => None,
            Some(w) => match u32::try_from(w) {
                Ok(w) => Some(w),
                Err(_) => {
                    return reject(
                        &format!("spec.endpoints[{i}].weight"),
                        format!("{w} is out of range"),
                    );
                }
            },
        };
        endpoints.push(RegistryEndpoint {
            address,
            ports: endpoint_ports,
            labels: e.labels.clone(),
            weight,
        });
    }

    let export = match Export::parse(&namespace, &spec.export_to) {
        Ok(e) => e,
        Err((i, message)) => return reject(&format!("spec.exportTo[{i}]"), message),
    };

    Some(ExternalService {
        key: ObjectKey::new(&namespace, &name),
        hosts,
        addresses,
        ports,
        resolution,
        location,
        endpoints,
        workload_selector: spec.workload_selector.as_ref().map(|s| s.labels.clone()),
        export,
        subject_alt_names: spec.subject_alt_names.clone(),
    })
}

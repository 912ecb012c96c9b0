//! Static gateway configurations (AKS StaticGatewayConfiguration): which prefix a gateway's
//! egress leaves from, and which pods are bound to it.
//!
//! AKS semantics: `defaultRoute: staticEgressGateway` (the default) sends a bound pod's traffic
//! through the gateway except to `excludeCidrs`; `azureNetworking` keeps it on the pod's own
//! network except to `excludeCidrs`, which go through the gateway. Pods bind with the annotation
//! `kubernetes.azure.com/static-gateway-configuration: <name>` to an SGC of their own namespace.
use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use serde::Serialize;

use super::host::ObjectKey;
use crate::{
    resources::static_egress::{STATIC_GATEWAY_ANNOTATION, StaticGatewayConfiguration},
    state::{Node, Workload, WorkloadUid, rejections::Rejections},
};

const KIND: &str = "StaticGatewayConfiguration.egressgateway.kubernetes.azure.com";

/// Node label AKS puts on every node with the name of its node pool.
pub const AGENTPOOL_LABEL: &str = "kubernetes.azure.com/agentpool";

/// Where a bound pod's traffic goes by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum DefaultRoute {
    /// Through the gateway, except to `excludeCidrs`.
    #[default]
    StaticEgressGateway,
    /// The pod's own network, except `excludeCidrs`, which go through the gateway.
    AzureNetworking,
}

/// Which nodes carry the gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Nodes labelled `kubernetes.azure.com/agentpool=<pool>`.
    NodePool(String),
    /// A named VMSS (nodes cannot be matched to it from what MeshState holds).
    Vmss {
        resource_group: Option<String>,
        name: Option<String>,
    },
}

/// Where the prefix came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefixSource {
    /// `status.egressIpPrefix`, set by a cloud controller (or by Sluice earlier).
    Status,
    /// The agent's own configuration.
    AgentConfig,
}

/// A static gateway configuration, normalised.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StaticGateway {
    pub key: ObjectKey,
    pub placement: Placement,
    /// The egress prefix; `None` until a controller or the agent's config provides it.
    pub prefix: Option<IpNet>,
    pub prefix_source: Option<PrefixSource>,
    pub default_route: DefaultRoute,
    pub exclude_cidrs: Vec<IpNet>,
    pub provision_public_ips: bool,
}

impl StaticGateway {
    /// True if a bound pod's connection to `dest` goes through the gateway.
    pub fn routes_via_gateway(&self, dest: IpAddr) -> bool {
        let excluded = self.exclude_cidrs.iter().any(|n| n.contains(&dest));
        match self.default_route {
            DefaultRoute::StaticEgressGateway => !excluded,
            DefaultRoute::AzureNetworking => excluded,
        }
    }

    /// True if `node` is one of this gateway's nodes.
    pub fn hosted_on(&self, node: &Node) -> bool {
        match &self.placement {
            Placement::NodePool(pool) => node.labels.get(AGENTPOOL_LABEL) == Some(pool),
            Placement::Vmss { .. } => false,
        }
    }
}

/// All static gateways and the pods bound to them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StaticGateways {
    pub configs: BTreeMap<ObjectKey, StaticGateway>,
    /// Pod → the SGC its annotation names (only SGCs that exist).
    pub bindings: BTreeMap<WorkloadUid, ObjectKey>,
}

/// Normalises the SGCs (prefixes from status, else `configured`: `namespace/name` → prefix) and
/// binds annotated workloads.
pub(super) fn build(
    sgcs: &[StaticGatewayConfiguration],
    configured: &BTreeMap<String, IpNet>,
    workloads: &BTreeMap<WorkloadUid, Workload>,
    out: &mut Rejections,
) -> StaticGateways {
    let mut sorted: Vec<&StaticGatewayConfiguration> = sgcs.iter().collect();
    sorted.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    let mut result = StaticGateways::default();
    for sgc in sorted {
        let namespace = sgc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = sgc.metadata.name.clone().unwrap_or_default();
        match static_gateway(sgc, &namespace, &name, configured, &result.configs) {
            Ok(g) => {
                result.configs.insert(g.key.clone(), g);
            }
            Err((field, message)) => out.reject(KIND, Some(&namespace), &name, &field, message),
        }
    }
    for w in workloads.values() {
        let Some(sgc_name) = w.annotations.get(STATIC_GATEWAY_ANNOTATION) else {
            continue;
        };
        let key = ObjectKey::new(&w.namespace, sgc_name);
        if result.configs.contains_key(&key) {
            result.bindings.insert(w.uid.clone(), key);
        } else {
            out.reject(
                "Pod",
                Some(&w.namespace),
                &w.name,
                &format!("metadata.annotations[{STATIC_GATEWAY_ANNOTATION}]"),
                format!("no valid StaticGatewayConfiguration {key}"),
            );
        }
    }
    result
}

fn static_gateway(
    sgc: &StaticGatewayConfiguration,
    namespace: &str,
    name: &str,
    configured: &BTreeMap<String, IpNet>,
    accepted: &BTreeMap<ObjectKey, StaticGateway>,
) -> Result<StaticGateway, (String, String)> {
    let spec = &sgc.spec;
    let placement = match (&spec.gateway_nodepool_name, &spec.gateway_vmss_profile) {
        (Some(pool), None) if !pool.is_empty() => Placement::NodePool(pool.clone()),
        (None, Some(vmss)) => Placement::Vmss {
            resource_group: vmss.vmss_resource_group.clone(),
            name: vmss.vmss_name.clone(),
        },
        (Some(_), Some(_)) => {
            return Err((
                "spec.gatewayNodepoolName".into(),
                "set either gatewayNodepoolName or gatewayVmssProfile, not both".into(),
            ));
        }
        _ => {
            return Err((
                "spec.gatewayNodepoolName".into(),
                "one of gatewayNodepoolName or gatewayVmssProfile is required".into(),
            ));
        }
    };
    if let Some(size) = spec
        .gateway_vmss_profile
        .as_ref()
        .and_then(|v| v.public_ip_prefix_size)
        && !(0..=31).contains(&size)
    {
        return Err((
            "spec.gatewayVmssProfile.publicIpPrefixSize".into(),
            format!("{size} is not a prefix size (0-31)"),
        ));
    }
    let default_route = match spec.default_route.as_deref() {
        None | Some("staticEgressGateway") => DefaultRoute::StaticEgressGateway,
        Some("azureNetworking") => DefaultRoute::AzureNetworking,
        Some(other) => {
            return Err((
                "spec.defaultRoute".into(),
                format!("{other:?} is not staticEgressGateway or azureNetworking"),
            ));
        }
    };
    let mut exclude_cidrs = Vec::new();
    for (i, raw) in spec.exclude_cidrs.iter().enumerate() {
        // As upstream (Go's ParseCIDR): host bits are allowed and dropped; a bare IP is not a CIDR.
        match raw.parse::<IpNet>() {
            Ok(net) => exclude_cidrs.push(net.trunc()),
            Err(_) => {
                return Err((
                    format!("spec.excludeCidrs[{i}]"),
                    format!("{raw:?} is not a CIDR"),
                ));
            }
        }
    }
    let key = ObjectKey::new(namespace, name);
    let from_status = sgc
        .status
        .as_ref()
        .and_then(|s| s.egress_ip_prefix.as_deref())
        .filter(|s| !s.is_empty());
    let (prefix, prefix_source, field) = match from_status {
        Some(raw) => {
            let field = "status.egressIpPrefix".to_owned();
            let net: IpNet = raw
                .parse()
                .map_err(|_| (field.clone(), format!("{raw:?} is not a CIDR")))?;
            (Some(net), Some(PrefixSource::Status), field)
        }
        None => match configured.get(&key.to_string()) {
            Some(net) => (
                Some(*net),
                Some(PrefixSource::AgentConfig),
                format!("(agent config) egress.staticGatewayPrefixes[{key}]"),
            ),
            None => (None, None, String::new()),
        },
    };
    if let Some(net) = prefix {
        if net.trunc() != net {
            return Err((
                field,
                format!(
                    "{net} is not a network (host bits set; did you mean {}?)",
                    net.trunc()
                ),
            ));
        }
        if let Some(other) = accepted.values().find(|g| {
            g.prefix
                .is_some_and(|p| p.contains(&net.network()) || net.contains(&p.network()))
        }) {
            return Err((field, format!("{net} overlaps the prefix of {}", other.key)));
        }
    }
    Ok(StaticGateway {
        key,
        placement,
        prefix,
        prefix_source,
        default_route,
        exclude_cidrs,
        provision_public_ips: spec.provision_public_ips,
    })
}

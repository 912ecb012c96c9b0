//! Typed Kubernetes resources, as both sources collect them.
//!
//! The local file and the kube watchers fill the same [`ResourceSet`], in the resources' own
//! API groups and shapes, so YAML written for a cluster works unchanged in a local file.
pub mod gateway_api;
pub mod istio_networking;
pub mod istio_security;
pub mod mesh_config;
pub mod static_egress;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Service};
use serde::Deserialize;

/// Every resource the mesh reads, as last seen.
#[derive(Clone, Debug, Default)]
pub struct ResourceSet {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    pub nodes: Vec<Node>,
    pub config_maps: Vec<ConfigMap>,
    /// `networking.istio.io` ServiceEntries (the external-service registry).
    pub service_entries: Vec<istio_networking::ServiceEntry>,
    /// `networking.istio.io` Sidecars (per-namespace/workload outbound traffic policy).
    pub sidecars: Vec<istio_networking::Sidecar>,
    /// `networking.istio.io` Gateways (egress gateways).
    pub istio_gateways: Vec<istio_networking::Gateway>,
    pub virtual_services: Vec<istio_networking::VirtualService>,
    pub destination_rules: Vec<istio_networking::DestinationRule>,
    pub static_gateway_configurations: Vec<static_egress::StaticGatewayConfiguration>,
    /// `security.istio.io` PeerAuthentications (mTLS modes).
    pub peer_authentications: Vec<istio_security::PeerAuthentication>,
    /// `security.istio.io` AuthorizationPolicies.
    pub authorization_policies: Vec<istio_security::AuthorizationPolicy>,
    /// `gateway.networking.k8s.io` Gateways (ingress listeners).
    pub gateways: Vec<gateway_api::Gateway>,
    /// `gateway.networking.k8s.io` HTTPRoutes.
    pub http_routes: Vec<gateway_api::HTTPRoute>,
}

/// Why a YAML document could not be read as a resource.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("document {index}: not YAML: {source}")]
    Yaml {
        index: usize,
        source: serde_yaml::Error,
    },
    #[error("document {index}: missing apiVersion or kind")]
    MissingType { index: usize },
    #[error("document {index}: {api_version} {kind} is not a kind Sluice reads")]
    UnknownKind {
        index: usize,
        api_version: String,
        kind: String,
    },
    #[error("document {index} ({kind} {name}): {source}")]
    Invalid {
        index: usize,
        kind: String,
        name: String,
        source: serde_yaml::Error,
    },
}

/// One YAML document's type header.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    metadata: Option<NameOnly>,
}

#[derive(Deserialize)]
struct NameOnly {
    #[serde(default)]
    name: Option<String>,
}

/// A document that is not a mesh resource but configures the agent itself.
pub const AGENT_CONFIG_API_VERSION: &str = "sluice.dev/v1alpha1";
/// Kind of the agent's own configuration document.
pub const AGENT_CONFIG_KIND: &str = "AgentConfig";

impl ResourceSet {
    /// Every document of a YAML stream (empty documents skipped; an AgentConfig document is
    /// left out, as [`ResourceSet::add_document`] does).
    pub fn from_yaml(text: &str) -> Result<Self, DocumentError> {
        let mut set = Self::default();
        for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = serde_yaml::Value::deserialize(doc)
                .map_err(|source| DocumentError::Yaml { index, source })?;
            if !value.is_null() {
                set.add_document(index, value)?;
            }
        }
        Ok(set)
    }

    /// Adds one parsed YAML document; `Ok(false)` if it is the agent's own config document
    /// (which the caller reads separately).
    pub fn add_document(
        &mut self,
        index: usize,
        doc: serde_yaml::Value,
    ) -> Result<bool, DocumentError> {
        let meta: TypeMeta = serde_yaml::from_value(doc.clone())
            .map_err(|source| DocumentError::Yaml { index, source })?;
        let (Some(api_version), Some(kind)) = (meta.api_version, meta.kind) else {
            return Err(DocumentError::MissingType { index });
        };
        let name = meta.metadata.and_then(|m| m.name).unwrap_or_default();
        let invalid = |source| DocumentError::Invalid {
            index,
            kind: kind.clone(),
            name: name.clone(),
            source,
        };
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Namespace") => self
                .namespaces
                .push(serde_yaml::from_value(doc).map_err(invalid)?),
            ("v1", "Pod") => self
                .pods
                .push(serde_yaml::from_value(doc).map_err(invalid)?),
            ("v1", "Service") => self
                .services
                .push(serde_yaml::from_value(doc).map_err(invalid)?),
            ("v1", "Node") => self
                .nodes
                .push(serde_yaml::from_value(doc).map_err(invalid)?),
            ("v1", "ConfigMap") => self
                .config_maps
                .push(serde_yaml::from_value(doc).map_err(invalid)?),
            (v, kind) if istio_networking::is_api_version(v) => match kind {
                "ServiceEntry" => self
                    .service_entries
                    .push(serde_yaml::from_value(doc).map_err(invalid)?),
                "Sidecar" => self
                    .sidecars
                    .push(serde_yaml::from_value(doc).map_err(invalid)?),
                "Gateway" => self
                    .istio_gateways
                    .push(serde_yaml::from_value(doc).map_err(invalid)?),
                "VirtualService" => self
                    .virtual_services
                    .push(serde_yaml::from_value(doc).map_err(invalid)?),
                "DestinationRule" => self
                    .destination_rules
                    .push(serde_yaml::from_value(doc).map_err(invalid)?),
                _ => {
                    return Err(DocumentError::UnknownKind {
                        index,
                        api_version,
                        kind: kind.to_owned(),
                    });
                }
            },
            (v, "PeerAuthentication") if istio_security::is_api_version(v) => self
                .peer_authentications
                .push(serde_yaml::from_value(doc).map_err(invalid)?),
            (v, "AuthorizationPolicy") if istio_security::is_api_version(v) => self
                .authorization_policies
                .push(serde_yaml::from_value(doc).map_err(invalid)?),
            (static_egress::API_VERSION, "StaticGatewayConfiguration") => self
                .static_gateway_configurations
                .push(serde_yaml::from_value(doc).map_err(invalid)?),
            (gateway_api::API_VERSION, "Gateway") => self
                .gateways
                .push(serde_yaml::from_value(doc).map_err(invalid)?),
            (gateway_api::API_VERSION, "HTTPRoute") => self
                .http_routes
                .push(serde_yaml::from_value(doc).map_err(invalid)?),
            (AGENT_CONFIG_API_VERSION, AGENT_CONFIG_KIND) => return Ok(false),
            _ => {
                return Err(DocumentError::UnknownKind {
                    index,
                    api_version,
                    kind,
                });
            }
        }
        Ok(true)
    }
}

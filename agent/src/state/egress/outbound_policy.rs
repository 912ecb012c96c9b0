//! Outbound traffic policy: the mesh default from the mesh config, overridden by Sidecars.
//!
//! Precedence follows Istio's Sidecar scoping: a Sidecar in the workload's namespace whose
//! `workloadSelector` matches the workload; else the namespace-wide Sidecar (no selector) of its
//! namespace; else the namespace-wide Sidecar of the root namespace. When several qualify at the
//! same level the oldest wins (then the name). The chosen Sidecar's `outboundTrafficPolicy.mode`
//! applies; a Sidecar without one falls back to the mesh config, as Istio does.
use std::collections::BTreeMap;

use serde::Serialize;

use super::host::ObjectKey;
use crate::{
    resources::{ResourceSet, mesh_config},
    state::{MeshSettings, rejections::Rejections},
};

/// Name of Istio's mesh config ConfigMap when none is configured (in the root namespace).
pub const DEFAULT_MESH_CONFIG_NAME: &str = "istio";

const SIDECAR_KIND: &str = "Sidecar.networking.istio.io";

/// What happens to connections for destinations outside the mesh and the registry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundMode {
    /// Unknown destinations pass straight out (Istio's default).
    #[default]
    AllowAny,
    /// Only mesh destinations and those a ServiceEntry lists are reachable.
    RegistryOnly,
}

impl OutboundMode {
    /// Reads Istio's spelling (`ALLOW_ANY`, `REGISTRY_ONLY`).
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "ALLOW_ANY" => Some(Self::AllowAny),
            "REGISTRY_ONLY" => Some(Self::RegistryOnly),
            _ => None,
        }
    }
}

/// Where the mode that applies to a workload came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicySource {
    /// The mesh config ConfigMap (or Istio's default when there is none).
    MeshConfig,
    /// A Sidecar resource.
    Sidecar(ObjectKey),
}

/// A Sidecar's part in the outbound policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SidecarPolicy {
    pub key: ObjectKey,
    /// `workloadSelector.labels`; `None` applies to the whole namespace.
    pub selector: Option<BTreeMap<String, String>>,
    /// `outboundTrafficPolicy.mode`; `None` falls back to the mesh config.
    pub mode: Option<OutboundMode>,
}

/// The outbound traffic policy of the mesh.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OutboundPolicy {
    /// From the mesh config's `outboundTrafficPolicy.mode`.
    pub mesh_mode: OutboundMode,
    /// The ConfigMap `mesh_mode` was read from, if one was found.
    pub mesh_config: Option<ObjectKey>,
    /// The ConfigMap the agent reads (`spec.meshConfig`, or `istio` in the root namespace).
    pub configured: ObjectKey,
    pub root_namespace: String,
    /// In precedence order within each level (oldest first).
    pub sidecars: Vec<SidecarPolicy>,
}

/// The namespace label that picks an Istio control-plane revision.
const REVISION_LABEL: &str = "istio.io/rev";
/// Where the AKS Istio add-on keeps the mesh config users edit, per revision (`asm-1-24`).
const AKS_ADDON_NAMESPACE: &str = "aks-istio-system";
const AKS_SHARED_PREFIX: &str = "istio-shared-configmap-";
/// Where upstream Istio keeps a revision's mesh config (`istio-<revision>`).
const ISTIO_NAMESPACE: &str = "istio-system";

/// A mesh config ConfigMap that applies in Istio's eyes but not in Sluice's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct MeshConfigNotice {
    /// The ConfigMap not in force, `namespace/name`.
    pub config_map: String,
    /// Why it matters, for the log and `sluice status`.
    pub message: String,
}

impl OutboundPolicy {
    /// Mesh config ConfigMaps not in force that an operator would expect to be: the one the
    /// agent reads when it does not exist, and the revisioned ones (the AKS add-on's
    /// `aks-istio-system/istio-shared-configmap-<rev>`, upstream's `istio-system/istio-<rev>`)
    /// of the revisions namespaces are labelled with (`istio.io/rev`).
    pub fn notices<'a>(
        &self,
        namespaces: impl IntoIterator<Item = (&'a str, &'a BTreeMap<String, String>)>,
    ) -> Vec<MeshConfigNotice> {
        let configured = format!("{}/{}", self.configured.namespace, self.configured.name);
        let mut out = Vec::new();
        if self.mesh_config.is_none() {
            out.push(MeshConfigNotice {
                config_map: configured.clone(),
                message: format!(
                    "mesh config ConfigMap {configured} (spec.meshConfig) does not exist: \
                     outboundTrafficPolicy is ALLOW_ANY, Istio's default"
                ),
            });
        }
        let mut revisions: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (namespace, labels) in namespaces {
            if let Some(rev) = labels.get(REVISION_LABEL).filter(|r| !r.is_empty()) {
                revisions.entry(rev).or_default().push(namespace);
            }
        }
        for (rev, mut users) in revisions {
            users.sort_unstable();
            let expected = if rev.starts_with("asm-") {
                format!("{AKS_ADDON_NAMESPACE}/{AKS_SHARED_PREFIX}{rev}")
            } else {
                format!("{ISTIO_NAMESPACE}/istio-{rev}")
            };
            if expected == configured {
                continue;
            }
            let shown: Vec<&str> = users.iter().copied().take(3).collect();
            out.push(MeshConfigNotice {
                message: format!(
                    "namespaces labelled {REVISION_LABEL}={rev} ({}{}) take their mesh config \
                     from {expected} under Istio's revisions, but Sluice reads {configured}: \
                     the outboundTrafficPolicy of {expected} is not in force; set \
                     spec.meshConfig to {{namespace: {}, name: {}}} to apply it",
                    shown.join(", "),
                    if users.len() > shown.len() {
                        ", …"
                    } else {
                        ""
                    },
                    expected.split('/').next().unwrap_or_default(),
                    expected.split('/').nth(1).unwrap_or_default(),
                ),
                config_map: expected,
            });
        }
        out
    }

    /// The mode for a workload in `namespace` with `labels`, and where it came from.
    pub fn mode_for(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> (OutboundMode, PolicySource) {
        let selected = self.sidecars.iter().find(|s| {
            s.key.namespace == namespace
                && s.selector
                    .as_ref()
                    .is_some_and(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
        });
        let namespace_wide = |ns: &str| {
            self.sidecars
                .iter()
                .find(|s| s.key.namespace == ns && s.selector.is_none())
        };
        let chosen = selected
            .or_else(|| namespace_wide(namespace))
            .or_else(|| namespace_wide(&self.root_namespace));
        match chosen {
            Some(SidecarPolicy {
                key,
                mode: Some(mode),
                ..
            }) => (*mode, PolicySource::Sidecar(key.clone())),
            _ => (self.mesh_mode, PolicySource::MeshConfig),
        }
    }
}

/// Reads the mesh config and the Sidecars.
pub(super) fn build(
    resources: &ResourceSet,
    settings: &MeshSettings,
    out: &mut Rejections,
) -> OutboundPolicy {
    let (cm_ns, cm_name) = settings.mesh_config.clone().unwrap_or_else(|| {
        (
            settings.root_namespace.clone(),
            DEFAULT_MESH_CONFIG_NAME.to_owned(),
        )
    });
    let mut policy = OutboundPolicy {
        root_namespace: settings.root_namespace.clone(),
        configured: ObjectKey::new(&cm_ns, &cm_name),
        ..OutboundPolicy::default()
    };
    let cm = resources.config_maps.iter().find(|cm| {
        cm.metadata.namespace.as_deref() == Some(cm_ns.as_str())
            && cm.metadata.name.as_deref() == Some(cm_name.as_str())
    });
    if let Some(cm) = cm {
        let field = format!("data.{}", mesh_config::MESH_KEY);
        match mesh_config::mesh_config(cm) {
            Err(e) => out.reject("ConfigMap", Some(&cm_ns), &cm_name, &field, e.to_string()),
            Ok(parsed) => {
                policy.mesh_config = Some(ObjectKey::new(&cm_ns, &cm_name));
                let mode = parsed
                    .and_then(|m| m.outbound_traffic_policy)
                    .and_then(|p| p.mode);
                match mode.as_deref().map(|m| (m, OutboundMode::parse(m))) {
                    None => {}
                    Some((_, Some(mode))) => policy.mesh_mode = mode,
                    Some((raw, None)) => out.reject(
                        "ConfigMap",
                        Some(&cm_ns),
                        &cm_name,
                        &format!("{field}: outboundTrafficPolicy.mode"),
                        format!("{raw:?} is not ALLOW_ANY or REGISTRY_ONLY"),
                    ),
                }
            }
        }
    }

    let mut sidecars: Vec<_> = resources.sidecars.iter().collect();
    sidecars.sort_by(|a, b| {
        let created = |s: &&crate::resources::istio_networking::Sidecar| {
            s.metadata.creation_timestamp.as_ref().map(|t| t.0)
        };
        (created(a), &a.metadata.name).cmp(&(created(b), &b.metadata.name))
    });
    for sc in sidecars {
        let namespace = sc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = sc.metadata.name.clone().unwrap_or_default();
        let raw_mode = sc
            .spec
            .outbound_traffic_policy
            .as_ref()
            .and_then(|p| p.mode.as_deref());
        let mode = match raw_mode {
            None => None,
            Some(raw) => match OutboundMode::parse(raw) {
                Some(m) => Some(m),
                None => {
                    out.reject(
                        SIDECAR_KIND,
                        Some(&namespace),
                        &name,
                        "spec.outboundTrafficPolicy.mode",
                        format!("{raw:?} is not ALLOW_ANY or REGISTRY_ONLY"),
                    );
                    continue;
                }
            },
        };
        policy.sidecars.push(SidecarPolicy {
            key: ObjectKey::new(&namespace, &name),
            selector: sc.spec.workload_selector.as_ref().map(|s| s.labels.clone()),
            mode,
        });
    }
    policy
}

//! Istio's mesh config, as a ConfigMap carries it under the `mesh` key (a YAML document).
//!
//! Upstream Istio names the ConfigMap `istio` (or `istio-<revision>`) in `istio-system`; the AKS
//! add-on uses `istio-shared-configmap-<revision>` in `aks-istio-system`. Sluice reads only the
//! fields it acts on and ignores the rest.
use k8s_openapi::api::core::v1::ConfigMap;
use serde::Deserialize;

/// The ConfigMap key holding the mesh config document.
pub const MESH_KEY: &str = "mesh";

/// The part of Istio's `MeshConfig` Sluice reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    #[serde(default)]
    pub outbound_traffic_policy: Option<MeshOutboundTrafficPolicy>,
}

/// `outboundTrafficPolicy` of the mesh config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshOutboundTrafficPolicy {
    /// `ALLOW_ANY` (Istio's default) or `REGISTRY_ONLY`; checked by normalisation.
    #[serde(default)]
    pub mode: Option<String>,
}

/// Why a ConfigMap's `mesh` key is not a mesh config.
#[derive(Debug, thiserror::Error)]
#[error("data.{MESH_KEY}: not a mesh config document: {0}")]
pub struct MeshConfigError(#[from] serde_yaml::Error);

/// The mesh config in `cm`, or `None` when it has no `mesh` key (or it is empty).
pub fn mesh_config(cm: &ConfigMap) -> Result<Option<MeshConfig>, MeshConfigError> {
    let Some(text) = cm.data.as_ref().and_then(|d| d.get(MESH_KEY)) else {
        return Ok(None);
    };
    if text.trim().is_empty() {
        return Ok(None);
    }
    Ok(Some(serde_yaml::from_str(text)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(mesh: &str) -> ConfigMap {
        ConfigMap {
            data: Some([(MESH_KEY.to_owned(), mesh.to_owned())].into()),
            ..ConfigMap::default()
        }
    }

    #[test]
    fn reads_outbound_policy_and_ignores_the_rest() {
        let parsed = mesh_config(&cm(
            "accessLogFile: /dev/stdout\noutboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n",
        ))
        .expect("valid")
        .expect("present");
        let policy = parsed.outbound_traffic_policy.expect("policy");
        assert_eq!(policy.mode.as_deref(), Some("REGISTRY_ONLY"));
    }

    #[test]
    fn missing_key_is_none_and_garbage_is_an_error() {
        assert!(mesh_config(&ConfigMap::default()).expect("ok").is_none());
        let err = mesh_config(&cm("outboundTrafficPolicy: [1, 2")).expect_err("bad yaml");
        assert!(err.to_string().starts_with("data.mesh"), "{err}");
    }
}

//! Install values, in the style of ztunnel's and istio-cni's Helm charts: a YAML file
//! (`-f values.yaml`) and `--set key=value` on top, checked field by field.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Why the values could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ValuesError {
    #[error("reading {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("values: {0}")]
    Invalid(String),
    #[error("--set {0:?}: expected key=value (e.g. tag=1.2.0, crds.install=true)")]
    BadSet(String),
}

/// Everything `sluice manifest generate` and `sluice install` take.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Values {
    /// Image registry and repository path, without the image name (`ghcr.io/sluice-mesh`).
    pub hub: String,
    /// Image name under `hub`.
    pub image: String,
    pub tag: String,
    /// `imagePullPolicy` of every Sluice container; unset leaves Kubernetes' default.
    pub image_pull_policy: Option<String>,
    /// The agent container's resources (Kubernetes `ResourceRequirements`).
    pub resources: Option<serde_json::Value>,
    /// `SLUICE_LOG` of every Sluice container (a tracing filter: `info`, `debug`, `sluice=debug`).
    pub log_level: String,
    /// JSON logs (`SLUICE_LOG_FORMAT=json`); false: text.
    pub log_as_json: bool,
    pub trust_domain: String,
    /// The CA the agents ask for certificates (`sluice ca`, or istiod's 15012).
    pub ca_address: String,
    /// The mesh config ConfigMap in the root namespace (Istio's default: `istio`).
    pub mesh_config_name: String,
    /// The node's CNI binary directory.
    pub cni_bin_dir: String,
    /// The node's CNI configuration directory.
    pub cni_conf_dir: String,
    /// Namespaces the CNI plugin passes through (Sluice's own is always added).
    pub exclude_namespaces: Vec<String>,
    pub node_selector: BTreeMap<String, String>,
    pub priority_class_name: String,
    /// Annotations on the agent pods (Prometheus scrape annotations by default).
    pub pod_annotations: BTreeMap<String, String>,
    /// Roll the DaemonSet with `maxSurge: 1` (listener handover; Kubernetes 1.22+), else
    /// `maxUnavailable: 1`. `sluice install` turns it off on older API servers.
    pub daemon_set_max_surge: bool,
    pub crds: Crds,
    pub gateway_class: GatewayClass,
}

/// `crds.install`: put deploy/crds on the cluster (only where a CRD does not exist yet).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Crds {
    pub install: bool,
}

/// `gatewayClass.enabled`: the `sluice` GatewayClass (needs the Gateway API CRDs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GatewayClass {
    pub enabled: bool,
}

impl Default for GatewayClass {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// The image `deploy/` names; rendering replaces it with [`Values::image_ref`].
pub const DEPLOY_IMAGE: &str = "ghcr.io/sluice-mesh/sluice:latest";

impl Default for Values {
    fn default() -> Self {
        Self {
            hub: "ghcr.io/sluice-mesh".into(),
            image: "sluice".into(),
            tag: "latest".into(),
            image_pull_policy: None,
            resources: None,
            log_level: "info".into(),
            log_as_json: true,
            trust_domain: "cluster.local".into(),
            ca_address: "https://sluice-ca.sluice-system.svc:15012".into(),
            mesh_config_name: "istio".into(),
            cni_bin_dir: "/opt/cni/bin".into(),
            cni_conf_dir: "/etc/cni/net.d".into(),
            exclude_namespaces: vec!["kube-system".into()],
            node_selector: [("kubernetes.io/os".to_owned(), "linux".to_owned())].into(),
            priority_class_name: "system-node-critical".into(),
            pod_annotations: [
                ("prometheus.io/scrape", "true"),
                ("prometheus.io/port", "15020"),
                ("prometheus.io/path", "/metrics"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            daemon_set_max_surge: true,
            crds: Crds::default(),
            gateway_class: GatewayClass::default(),
        }
    }
}

impl Values {
    /// `hub/image:tag`.
    pub fn image_ref(&self) -> String {
        format!("{}/{}:{}", self.hub, self.image, self.tag)
    }

    /// The defaults, then `file` (YAML), then each `key=value` of `sets` (the value read as
    /// YAML: `true`, `3`, `[a, b]`). Unknown keys are refused by name.
    pub fn load(file: Option<&str>, sets: &[String]) -> Result<Self, ValuesError> {
        let mut tree = serde_yaml::to_value(Values::default())
            .map_err(|e| ValuesError::Invalid(e.to_string()))?;
        if let Some(text) = file {
            let over: serde_yaml::Value =
                serde_yaml::from_str(text).map_err(|e| ValuesError::Invalid(e.to_string()))?;
            merge(&mut tree, over);
        }
        for set in sets {
            let (key, value) = set
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| ValuesError::BadSet(set.clone()))?;
            // Booleans, lists and maps are read as YAML; anything else stays a string, so that
            // `tag=1.20` is the tag "1.20", not a number (no value is numeric).
            let structured = matches!(value, "true" | "false" | "null")
                || value.starts_with('[')
                || value.starts_with('{');
            let value: serde_yaml::Value = if structured {
                serde_yaml::from_str(value)
                    .map_err(|e| ValuesError::Invalid(format!("--set {key}: {e}")))?
            } else {
                serde_yaml::Value::String(value.to_owned())
            };
            let mut over = value;
            for part in key.rsplit('.') {
                let mut m = serde_yaml::Mapping::new();
                m.insert(serde_yaml::Value::String(part.to_owned()), over);
                over = serde_yaml::Value::Mapping(m);
            }
            merge(&mut tree, over);
        }
        let values: Values =
            serde_yaml::from_value(tree).map_err(|e| ValuesError::Invalid(e.to_string()))?;
        values.check()?;
        Ok(values)
    }

    fn check(&self) -> Result<(), ValuesError> {
        let bad = |field: &str, why: &str| Err(ValuesError::Invalid(format!("{field}: {why}")));
        for (field, v) in [
            ("hub", &self.hub),
            ("image", &self.image),
            ("tag", &self.tag),
            ("trustDomain", &self.trust_domain),
            ("meshConfigName", &self.mesh_config_name),
            ("cniBinDir", &self.cni_bin_dir),
            ("cniConfDir", &self.cni_conf_dir),
        ] {
            if v.is_empty() || v.contains(char::is_whitespace) {
                return bad(field, "must be non-empty, without spaces");
            }
        }
        for (field, dir) in [
            ("cniBinDir", &self.cni_bin_dir),
            ("cniConfDir", &self.cni_conf_dir),
        ] {
            if !dir.starts_with('/') {
                return bad(field, "must be an absolute path");
            }
        }
        if !self.ca_address.starts_with("https://") {
            return bad("caAddress", "must be an https:// URL");
        }
        if let Some(r) = &self.resources
            && serde_json::from_value::<k8s_openapi::api::core::v1::ResourceRequirements>(r.clone())
                .is_err()
        {
            return bad("resources", "is not a Kubernetes ResourceRequirements");
        }
        Ok(())
    }
}

/// Deep-merges `over` into `base` (mappings merge; anything else replaces).
fn merge(base: &mut serde_yaml::Value, over: serde_yaml::Value) {
    match (base, over) {
        (serde_yaml::Value::Mapping(b), serde_yaml::Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_sets_override_the_defaults() {
        let v = Values::load(
            Some("tag: '1.2.0'\ncrds: {install: false}\nexcludeNamespaces: [kube-system, infra]\n"),
            &[
                "crds.install=true".into(),
                "hub=registry.local/mesh".into(),
                "image=sluice".into(),
                "logAsJson=false".into(),
                "nodeSelector.pool=mesh".into(),
            ],
        )
        .unwrap();
        assert_eq!(v.image_ref(), "registry.local/mesh/sluice:1.2.0");
        assert!(v.crds.install);
        assert!(!v.log_as_json);
        assert_eq!(v.exclude_namespaces, ["kube-system", "infra"]);
        assert_eq!(
            v.node_selector.get("kubernetes.io/os").map(String::as_str),
            Some("linux")
        );
        assert_eq!(
            v.node_selector.get("pool").map(String::as_str),
            Some("mesh")
        );
    }

    #[test]
    fn unknown_and_bad_values_are_named() {
        let e = Values::load(None, &["crds.instal=true".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("instal"), "{e}");
        let e = Values::load(None, &["cniConfDir=relative/dir".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cniConfDir"), "{e}");
        let e = Values::load(None, &["caAddress=http://x".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("caAddress"), "{e}");
        let e = Values::load(None, &["noequals".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("noequals"), "{e}");
        let e = Values::load(None, &["resources=7".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("resources"), "{e}");
        assert_eq!(Values::load(None, &[]).unwrap(), Values::default());
    }
}

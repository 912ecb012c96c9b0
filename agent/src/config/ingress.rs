//! `spec.ingress`: what a `sluice gateway` instance serves and who it is in the mesh.
use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// ```yaml
/// ingress:
///   classes: [sluice, azure-alb-external]   # GatewayClass names served
///   gateways: [web/ingress]                 # only these Gateways (all of the classes when empty)
///   namespace: web                          # the gateway's own identity:
///   serviceAccount: ingress                 #   spiffe://<td>/ns/web/sa/ingress
///   numTrustedProxies: 2                    # X-Forwarded-For hops to skip for the client
///   certificates:                           # file mode: Secret namespace/name → PEM files
///     web/store-cert: {certFile: /etc/sluice/store.crt, keyFile: /etc/sluice/store.key}
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressConfig {
    /// GatewayClass names this gateway serves (`sluice` always among them when unset).
    #[serde(default = "default_classes")]
    pub classes: Vec<String>,
    /// `namespace/name` of the Gateways served; every Gateway of `classes` when empty.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Namespace of the gateway's service account (`POD_NAMESPACE` overrides it).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The gateway's service account, whose SPIFFE identity it presents to backends.
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Istio's `numTrustedProxies`: how many proxies in front of the gateway append to
    /// X-Forwarded-For, so the client is the address that many hops from the right.
    #[serde(default)]
    pub num_trusted_proxies: usize,
    /// The gateway instance's own labels: an Istio Gateway whose `selector` they include is
    /// served too (e.g. `istio: aks-istio-ingressgateway-external`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Address the listeners bind (all addresses when unset).
    #[serde(default)]
    pub bind_address: Option<IpAddr>,
    /// Certificates of HTTPS listeners in file mode, by the Secret `namespace/name` a listener's
    /// `certificateRefs` names.
    #[serde(default)]
    pub certificates: BTreeMap<String, CertificateFiles>,
}

/// A certificate chain and its private key, both PEM.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

fn default_classes() -> Vec<String> {
    vec!["sluice".into()]
}

fn default_namespace() -> String {
    "sluice-system".into()
}

fn default_service_account() -> String {
    "sluice-gateway".into()
}

impl Default for IngressConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("defaults deserialize")
    }
}

impl IngressConfig {
    /// Whether this gateway serves the Gateway `namespace/name` of class `class`.
    pub fn serves(&self, class: &str, key: &str) -> bool {
        self.classes.iter().any(|c| c == class)
            && (self.gateways.is_empty() || self.gateways.iter().any(|g| g == key))
    }

    /// Whether this gateway serves an Istio Gateway with `selector` (never an empty one).
    pub fn selected_by(&self, selector: &BTreeMap<String, String>) -> bool {
        !selector.is_empty() && selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

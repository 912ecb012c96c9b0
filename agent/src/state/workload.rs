//! Workloads (pods), namespaces, services and nodes as the data path sees them.
use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use serde::Serialize;

/// A pod's UID, as the API server (or the local file) gives it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct WorkloadUid(pub String);

impl fmt::Display for WorkloadUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SPIFFE identity in the form Istio uses: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    /// The identity of `service_account` in `namespace` under `trust_domain`.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Why a string is not an Istio-style SPIFFE identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a SPIFFE identity of the form spiffe://<td>/ns/<ns>/sa/<sa>: {0:?}")]
pub struct IdentityParseError(pub String);

impl FromStr for Identity {
    type Err = IdentityParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || IdentityParseError(s.to_owned());
        let rest = s.strip_prefix("spiffe://").ok_or_else(err)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
                Ok(Self::new(td, ns, sa))
            }
            _ => Err(err()),
        }
    }
}

/// Why a workload is (or is not) captured by the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Membership {
    /// Its namespace is labelled for the mesh.
    Namespace,
    /// The pod itself is labelled for the mesh.
    Pod,
    /// Not labelled, or opted out with `istio.io/dataplane-mode=none`.
    Outside,
}

impl Membership {
    /// True when the workload's traffic is captured.
    pub fn in_mesh(self) -> bool {
        !matches!(self, Membership::Outside)
    }
}

/// A pod, reduced to what the mesh needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub uid: WorkloadUid,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Node the pod runs on (`spec.nodeName`), if scheduled.
    pub node: Option<String>,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub membership: Membership,
    /// Named TCP container ports (name → number), where Service `targetPort` names resolve.
    pub ports: BTreeMap<String, u16>,
    /// Ready to take Service traffic: no `Ready=False` condition and not being deleted.
    pub ready: bool,
}

impl Workload {
    /// The workload's SPIFFE identity in `trust_domain`.
    pub fn identity(&self, trust_domain: &str) -> Identity {
        Identity::new(trust_domain, &self.namespace, &self.service_account)
    }

    /// What runs the pod, as Istio names it: `("deployment", name)` when the pod's name is
    /// `<deployment>-<pod-template-hash>-<suffix>`, else `("pod", pod name)`.
    pub fn owner(&self) -> (&'static str, &str) {
        let deployment = self.labels.get("pod-template-hash").and_then(|hash| {
            let (prefix, _) = self.name.rsplit_once('-')?;
            prefix
                .strip_suffix(hash.as_str())?
                .strip_suffix('-')
                .filter(|d| !d.is_empty())
        });
        match deployment {
            Some(d) => ("deployment", d),
            None => ("pod", &self.name),
        }
    }

    /// Istio's canonical service: the `service.istio.io/canonical-name`, `app.kubernetes.io/name`
    /// or `app` label, else the owner's name.
    pub fn canonical_service(&self) -> &str {
        self.label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| self.owner().1)
    }

    /// Istio's canonical revision: the `service.istio.io/canonical-revision`,
    /// `app.kubernetes.io/version` or `version` label, else `latest`.
    pub fn canonical_revision(&self) -> &str {
        self.label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or("latest")
    }

    /// The first of `keys` the pod is labelled with.
    fn label(&self, keys: &[&str]) -> Option<&str> {
        keys.iter()
            .find_map(|k| self.labels.get(*k))
            .map(String::as_str)
    }
}

/// A namespace's labels, which decide mesh membership of its pods.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// A node and its addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Node {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id, Identity::new("cluster.local", "default", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
    }

    #[test]
    fn identity_rejects_other_shapes() {
        for bad in [
            "spiffe://cluster.local/ns/default",
            "https://cluster.local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/ns/a/sa/b/extra",
            "spiffe://td/ns//sa/b",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad} parsed");
        }
    }
}

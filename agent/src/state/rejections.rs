//! What [`build`](super::build) leaves out of MeshState, and why: shared by the builder and
//! every sub-builder, so it sits below them all.
use serde::{Deserialize, Serialize};

/// A resource left out of MeshState, and why. Logged, and written back as a status condition
/// where the kind has status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// `Kind.group`, e.g. `PeerAuthentication.security.istio.io`.
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    /// Path of the offending field, e.g. `spec.mtls.mode`.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name)?,
            None => write!(f, "{} {}", self.kind, self.name)?,
        }
        write!(f, ": {}: {}", self.field, self.message)
    }
}

/// Collects what [`build`](super::build) leaves out.
#[derive(Debug, Default)]
pub struct Rejections(pub Vec<Rejection>);

impl Rejections {
    /// Records that `kind namespace/name` was left out because of `field`.
    pub fn reject(
        &mut self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        field: &str,
        message: impl Into<String>,
    ) {
        self.0.push(Rejection {
            kind: kind.to_owned(),
            namespace: namespace.map(str::to_owned),
            name: name.to_owned(),
            field: field.to_owned(),
            message: message.into(),
        });
    }
}

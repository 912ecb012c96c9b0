//! Ingress part of MeshState.
use serde::Serialize;

/// Ingress configuration, normalised.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Ingress {}

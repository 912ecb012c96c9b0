//! Egress part of MeshState.
use serde::Serialize;

/// Egress configuration, normalised.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Egress {}

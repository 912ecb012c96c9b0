//! Policy part of MeshState.
use serde::Serialize;

/// Policies, normalised.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Policies {}

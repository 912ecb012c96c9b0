//! Where an outbound connection goes: the seam between capture and transport.
use std::net::SocketAddr;

use crate::state::MeshState;

/// How the outbound proxy reaches a destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Plain TCP from the pod's own address to the original destination.
    Direct { dst: SocketAddr },
}

/// Chooses the route for a connection to `dst` made by a pod.
pub fn choose(_state: &MeshState, dst: SocketAddr) -> Route {
    Route::Direct { dst }
}

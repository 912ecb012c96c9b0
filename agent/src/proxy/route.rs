//! Where an outbound connection goes: the seam between capture and transport.
use std::net::SocketAddr;

use sluice_common::HBONE_PORT;

use crate::state::{Identity, MeshState};

/// How the outbound proxy reaches a destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Plain TCP from the pod's own address to the original destination (not in the mesh).
    Direct { dst: SocketAddr },
    /// HTTP/2 CONNECT over mutual TLS to the destination pod's HBONE port, asking for `dst`.
    Hbone {
        dst: SocketAddr,
        /// `<dest-pod-ip>:15008`.
        peer: SocketAddr,
        /// The identity the destination must prove.
        identity: Identity,
    },
}

/// Chooses the route for a connection to `dst`: HBONE when `dst` is a workload in the mesh.
pub fn choose(state: &MeshState, dst: SocketAddr) -> Route {
    match state.workload_by_ip(dst.ip()) {
        Some(w) if w.membership.in_mesh() && dst.port() != HBONE_PORT => Route::Hbone {
            dst,
            peer: SocketAddr::new(dst.ip(), HBONE_PORT),
            identity: w.identity(&state.trust_domain),
        },
        _ => Route::Direct { dst },
    }
}

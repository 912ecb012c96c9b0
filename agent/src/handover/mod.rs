//! Upgrades without a gap: a running agent hands its listening sockets to its successor on the
//! same node over a unix seqpacket socket (`SCM_RIGHTS`), then drains.
//!
//! The successor connects to the running agent's handover socket, receives every listener it
//! registered in its [`Listeners`] (each named by a [`key`](pod_key)), starts serving them, and
//! answers [`Message::Adopted`]. Only then does the old agent stop accepting. Both processes
//! hold the same kernel sockets meanwhile, so the pinned sockhash, the accept queues and the
//! ports never change hands at the kernel's level: no SYN meets a closed port.
mod listeners;
mod serve;
mod take;
mod wire;

use std::net::SocketAddr;

pub use listeners::{Listeners, Taken};
pub use serve::{bind, spawn_server};
pub use take::{Handover, take_over};
pub use wire::Message;

/// The wire protocol's version. 2 carries certificates before the listeners; a successor
/// also takes over from an agent speaking 1 (listeners only), and refuses other versions (and
/// starts fresh).
pub const PROTOCOL_VERSION: u32 = 2;
/// Versions a successor takes over from.
const ACCEPTED_VERSIONS: [u32; 2] = [1, 2];

/// Why a handover failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("handover socket {path}: {source}")]
    Socket {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("handover: {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("handover: bad message: {0}")]
    BadMessage(String),
    #[error("handover refused by the running agent: {0}")]
    Refused(String),
    #[error("handover: protocol version {theirs}, this agent speaks {PROTOCOL_VERSION}")]
    Version { theirs: u32 },
}

impl HandoverError {
    fn io(what: &'static str) -> impl FnOnce(nix::errno::Errno) -> Self {
        move |e| Self::Io {
            what,
            source: e.into(),
        }
    }
}

/// The key of a pod's listener on `addr` (inside the pod's namespace).
pub fn pod_key(uid: &str, addr: SocketAddr) -> String {
    format!("pod/{uid}/{addr}")
}

/// The key of the egress gateway role's HBONE listener.
pub fn egress_gateway_key(addr: SocketAddr) -> String {
    format!("egress-gateway/{addr}")
}

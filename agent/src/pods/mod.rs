//! Pod lifecycle: sandboxes reported through the enrollment API (the CNI plugin, or
//! [`discover`]) and mesh membership from MeshState become capture state ([`crate::redirect`])
//! and per-pod proxy listeners ([`crate::proxy`]). This room sits above both; neither imports it.
pub mod discover;
pub mod manager;

use std::net::SocketAddr;

pub use manager::{EnrollError, PodManager};

use crate::{proxy::CaptureTables, redirect::ebpf::CaptureMaps};

/// The proxy reads and writes the capture maps through [`CaptureTables`], which does not know
/// about eBPF; this is where the two meet.
impl CaptureTables for CaptureMaps {
    fn take_orig_dst(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        CaptureMaps::take_orig_dst(self, netns_cookie, peer)
    }
    fn allow_transparent_source(&self, source: SocketAddr) -> std::io::Result<()> {
        CaptureMaps::allow_transparent_source(self, source).map_err(|e| match e {
            // Keep the errno (E2BIG: the map is full) for the proxy to report.
            crate::redirect::ebpf::EbpfError::Map {
                source: aya::maps::MapError::SyscallError(s),
                ..
            } => match s.io_error.raw_os_error() {
                Some(errno) => std::io::Error::from_raw_os_error(errno),
                None => s.io_error,
            },
            other => std::io::Error::other(other),
        })
    }
    fn forget_transparent_source(&self, source: SocketAddr) {
        if let Err(e) = CaptureMaps::forget_transparent_source(self, source) {
            tracing::warn!(%source, error = %e, "forgetting a transparent source");
        }
    }
}

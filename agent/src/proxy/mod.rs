//! The node proxy: per-pod listeners, outbound and inbound connection handling.
pub mod context;
pub mod copy;
pub mod egress;
pub mod egress_gateway;
pub mod hbone;
pub mod hbone_inbound;
pub mod host;
pub mod inbound;
pub mod outbound;
pub mod peek;
pub mod pod;
pub mod socket;
pub mod telemetry;

use std::{net::SocketAddr, sync::Arc};

use crate::{
    admin::Metrics, identity::SecretManager, redirect::netns::HomeNetns, state::StateHandle,
};

/// What the proxy asks of the kernel side of capture.
pub trait CaptureTables: Send + Sync {
    /// Takes (reads and forgets) the original destination of the connection accepted from
    /// `peer` on a pod's outbound listener, in the namespace with cookie `netns_cookie`.
    fn take_orig_dst(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr>;
    /// Exempts the proxy's transparent connection from `source` from inbound steering.
    fn allow_transparent_source(&self, source: SocketAddr) -> std::io::Result<()>;
    /// Ends the exemption.
    fn forget_transparent_source(&self, source: SocketAddr);
}

impl CaptureTables for crate::redirect::ebpf::CaptureMaps {
    fn take_orig_dst(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        crate::redirect::ebpf::CaptureMaps::take_orig_dst(self, netns_cookie, peer)
    }
    fn allow_transparent_source(&self, source: SocketAddr) -> std::io::Result<()> {
        crate::redirect::ebpf::CaptureMaps::allow_transparent_source(self, source)
            .map_err(std::io::Error::other)
    }
    fn forget_transparent_source(&self, source: SocketAddr) {
        if let Err(e) = crate::redirect::ebpf::CaptureMaps::forget_transparent_source(self, source)
        {
            tracing::warn!(%source, error = %e, "forgetting a transparent source");
        }
    }
}

/// What every proxy task needs, shared.
#[derive(Clone)]
pub struct ProxyInputs {
    pub state: StateHandle,
    pub capture: Arc<dyn CaptureTables>,
    pub home: HomeNetns,
    pub node_name: String,
    /// Workload certificates and HBONE TLS configurations.
    pub identity: Arc<SecretManager>,
    /// Egress settings, the DNS ServiceEntry cache and refusal metrics.
    pub egress: Arc<egress::EgressRuntime>,
    /// Connection, pool and policy metrics.
    pub metrics: Arc<Metrics>,
    /// HBONE pool and HTTP/2 limits (`spec.hbone`).
    pub hbone: Arc<HboneTuning>,
    /// The node's own addresses, whose plaintext to pods skips the pods' policies.
    pub host: Arc<host::HostAddresses>,
}

/// The HBONE limits every pod's pool and every HBONE listener uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HboneTuning {
    /// Client pool limits.
    pub pool: hbone::PoolConfig,
    /// HTTP/2 settings, client and server side.
    pub h2: hbone::H2Config,
}

impl From<&crate::config::HboneSettings> for HboneTuning {
    fn from(s: &crate::config::HboneSettings) -> Self {
        Self {
            pool: s.pool(),
            h2: s.h2(),
        }
    }
}

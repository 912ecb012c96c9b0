//! The node proxy: per-pod listeners, outbound and inbound connection handling.
pub mod balance;
pub mod context;
pub mod copy;
pub mod drain;
pub mod egress;
pub mod egress_gateway;
pub mod hbone;
pub mod hbone_inbound;
pub mod host;
pub mod http_requests;
pub mod inbound;
pub mod limits;
pub mod node_socket;
pub mod outbound;
pub mod own_listeners;
pub mod peek;
pub mod pod;
pub mod socket;
pub mod telemetry;
pub mod throttle;
pub mod unknown;
pub mod window_budget;

use std::{net::SocketAddr, sync::Arc};

use crate::{
    admin::Metrics, config::HboneLimits, identity::SecretManager, netns::HomeNetns,
    state::StateHandle,
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
    pub hbone: Arc<HboneLimits>,
    /// The node's own addresses, whose plaintext to pods skips the pods' policies.
    pub host: Arc<host::HostAddresses>,
    /// Connections in flight per Service endpoint and ClientIP affinity.
    pub balance: Arc<balance::Balancer>,
    /// Caps on connections in flight, per pod and for the node (`spec.proxy`).
    pub caps: Arc<limits::ConnectionCaps>,
    /// The cap on HBONE connections not yet authenticated (`spec.hbone`).
    pub unauthenticated: Arc<limits::UnauthenticatedGate>,
    /// The HTTP/2 receive window all served HBONE connections share (`spec.hbone`).
    pub window_budget: Arc<window_budget::WindowBudget>,
    /// How long a connection of a pod unknown to MeshState waits for it before it is refused
    /// (`spec.proxy.unknownWorkloadHoldMs`).
    pub unknown_hold: std::time::Duration,
    /// Whether the agent drains after a handover (served HBONE connections get GOAWAY).
    pub drain: drain::DrainWatcher,
}

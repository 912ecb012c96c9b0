//! The `/status` document: one node's agent at a glance, for `sluice status`.
//!
//! The agent assembles it from what each room already exposes (the published state's report,
//! the pod manager's sandboxes, the certificates, the HBONE pool's counters, its limits); the
//! CLI reads it back with the same types, so the two cannot drift apart.
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::stats::PoolStatsSnapshot;
use crate::identity::CertInfo;
use crate::state::{MeshState, PublishReport};

/// What `/status` answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub node: String,
    /// The agent's version (`CARGO_PKG_VERSION` and the git revision it was built from).
    pub version: String,
    /// What `/healthz/ready` answers.
    pub ready: bool,
    /// Startup work still holding readiness back.
    pub waiting_for: Vec<String>,
    pub config: ConfigStatus,
    /// Sandboxes this node's agent knows, and whether each is captured.
    pub pods: Vec<PodStatus>,
    pub certificates: Vec<CertStatus>,
    /// The node proxy's outbound HBONE pool.
    pub hbone_pool: PoolStatsSnapshot,
    pub limits: Limits,
    /// Things an operator should know that are not errors of one resource (a mesh config
    /// ConfigMap that is not in force, …).
    pub warnings: Vec<String>,
}

/// The mesh state in force.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigStatus {
    #[serde(flatten)]
    pub report: PublishReport,
    pub workloads: usize,
    pub services: usize,
    pub authorization_policies: usize,
    pub peer_authentications: usize,
}

impl ConfigStatus {
    /// The counts of `state`, with the report of the sources that published it.
    pub fn new(state: &MeshState, report: PublishReport) -> Self {
        Self {
            report,
            workloads: state.workloads.len(),
            services: state.services.len(),
            authorization_policies: state.policy.authorizations.len(),
            peer_authentications: state.policy.peer_authentications.len(),
        }
    }
}

/// One pod sandbox on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub ips: Vec<std::net::IpAddr>,
    pub captured: bool,
}

/// A workload certificate this agent holds (never key material).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertStatus {
    pub identity: String,
    pub serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// Seconds left when the status was taken (negative once expired).
    pub expires_in_seconds: i64,
}

impl CertStatus {
    /// `cert` as seen at `now`.
    pub fn new(cert: &CertInfo, now: std::time::SystemTime) -> Self {
        Self {
            identity: cert.identity.clone(),
            serial: cert.serial.clone(),
            not_after: cert.not_after,
            expires_in_seconds: cert.seconds_to_expiry(now),
        }
    }
}

/// The agent's limits in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    pub max_connections_per_pod: usize,
    /// `spec.proxy.maxConnectionsPerNode`, lowered to what the open-file limit fits.
    pub max_connections_per_node: usize,
    /// `RLIMIT_NOFILE` after the agent raised it.
    pub open_files: u64,
}

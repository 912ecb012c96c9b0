//! Observability: Prometheus metrics (Istio's TCP metrics plus Sluice's own), the readiness
//! probe and the localhost admin endpoint.
//!
//! [`metrics::Metrics`] is shared by the proxy, identity and redirect code through an `Arc`;
//! [`server`] exposes it, readiness and a configuration dump over HTTP/1.1.
pub mod http;
mod labels;
pub mod metrics;
pub mod server;
pub mod stats;
pub mod status;
pub mod tcp;
pub mod ztunnel_dump;

pub use metrics::Metrics;
pub use server::{
    BlockReady, ConfigDump, Ready, ServeError, Server, serve_admin, serve_metrics, serve_readiness,
};
pub use stats::{PoolStats, PoolStatsSnapshot};
pub use tcp::{ConnectionLabels, ConnectionMetrics};

//! Sluice: an eBPF-accelerated, ambient-style service-mesh node agent.
//!
//! Data flows one way: [`sources`] → [`state`] → consumers ([`redirect`], [`proxy`], …).
pub mod config;
pub mod resources;
pub mod sources;
pub mod state;

//! Sluice: an eBPF-accelerated, ambient-style service-mesh node agent.
//!
//! Data flows one way: [`sources`] → [`state`] → consumers ([`redirect`], [`proxy`], …).
pub mod admin;
pub mod app;
pub mod config;
pub mod egress;
pub mod identity;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod resources;
pub mod sources;
pub mod state;

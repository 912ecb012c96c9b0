//! `sluice manifest generate`, `sluice install` and `sluice uninstall`: `deploy/` rendered with
//! values ([`values`], [`render`]) and applied to, or deleted from, a cluster ([`apply`]).
pub mod apply;
pub mod render;
pub mod values;

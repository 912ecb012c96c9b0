//! Sluice: an eBPF-accelerated, ambient-style service-mesh node agent.
//!
//! Data flows one way: [`sources`] → [`state`] → consumers ([`pods`], [`proxy`], [`egress`], …),
//! and so do imports. Each room (top-level module) imports only rooms below it; the `layering`
//! tests read the source and fail on any cycle between rooms or between the modules of a room.
//!
//! | room | what it holds | imports |
//! |------|---------------|---------|
//! | [`app`] | `sluice run`: wires sources → state → consumers | every room |
//! | [`ca_service`] | `sluice ca`: signs workload certificates for node agents, over Istio's certificate API | identity, sources, state, config |
//! | [`cleanup`] | `sluice cleanup`: removes from a node everything Sluice put there (pins, pod routing, egress pinning, CNI entry) | egress, redirect, netns |
//! | [`gateway`] | `sluice gateway`: the ingress data plane (Gateway API listeners, HTTPRoutes, HBONE to backends) | proxy, identity, admin, sources, state, config |
//! | [`install`] | `sluice manifest generate`, `install`, `uninstall`: deploy/ rendered with values, applied by server-side apply | — |
//! | [`pods`] | pod lifecycle: enrollment and discovery → capture + per-pod proxy listeners | redirect, proxy, netns, state |
//! | [`proxy`] | outbound, inbound, HBONE, egress gateway, copy | policy, identity, egress, admin, netns, state, resources, config |
//! | [`egress`] | source-prefix pinning (netlink), DNS for ServiceEntries | state, resources, config |
//! | [`redirect`] | eBPF loading, pinning, maps, pod routing; the CNI plugin and its enrollment API | netns, config |
//! | [`operator`] | `sluice status` and `sluice dump`: read a running agent's admin endpoint | admin, state |
//! | [`admin`] | metrics (and the statistics types other rooms fill), health, status, config dump (Sluice's and ztunnel's shape) | identity, state |
//! | [`identity`] | CA client, built-in CA, certificates and rotation, TLS configurations | state, config |
//! | [`policy`] | PeerAuthentication and AuthorizationPolicy evaluation; notices of what is not enforced | state, resources (its tests: config) |
//! | [`sources`] | kube watchers, the local file, the status writer | state, resources, config |
//! | [`state`] | MeshState and its pure normalisation | resources, config |
//! | [`resources`] | typed Kubernetes resources, in their own API groups | — |
//! | [`handover`] | upgrades: listening sockets passed to a successor agent (`SCM_RIGHTS`) | — |
//! | [`netns`] | network namespaces: entering one, making sockets inside it | — |
//! | [`memory`] | the allocator's tunables: two arenas, freed pages returned after a rebuild | — |
//! | [`config`] | the `AgentConfig` file, read and checked once | — |
pub mod admin;
pub mod app;
pub mod ca_service;
pub mod cleanup;
pub mod config;
pub mod egress;
pub mod gateway;
pub mod handover;
pub mod identity;
pub mod install;
pub mod memory;
pub mod netns;
pub mod operator;
pub mod pods;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod resources;
pub mod sources;
pub mod state;

#[cfg(test)]
mod layering;

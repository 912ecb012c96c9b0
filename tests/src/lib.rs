//! Sluice's end-to-end test harness: worlds of network namespaces and cgroups with real agents
//! (`world`, `agent`), a simulated internet behind a gateway node (`internet`), and a real
//! kube-apiserver (`kube_server`).
pub mod agent;
pub mod bpf;
pub mod ca_service;
pub mod cluster;
pub mod egress_world;
pub mod hbone_client;
pub mod http_echo;
pub mod ingress_world;
pub mod internet;
pub mod interop;
pub mod kube_mesh;
pub mod kube_server;
pub mod load;
pub mod metrics;
pub mod netns;
pub mod scale;
pub mod upgrade_world;
pub mod wire;
pub mod world;

//! Capture: eBPF programs and maps, pod network namespaces, enrollment.
pub mod cni;
pub mod discover;
pub mod ebpf;
pub mod enroll;
pub mod manager;
pub mod netns;
pub mod pod_net;

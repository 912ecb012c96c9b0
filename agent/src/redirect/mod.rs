//! Capture: eBPF programs and maps, pod routing, and the enrollment API the CNI plugin speaks.
pub mod cni;
pub mod cni_install;
pub mod conflist;
pub mod ebpf;
pub mod enroll;
pub mod pod_net;

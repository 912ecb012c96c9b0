//! Sources of MeshState: the local file, and (later) the kube watchers.
pub mod file;

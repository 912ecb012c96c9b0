
pub mod kube_server;

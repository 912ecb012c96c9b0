//! MeshState: the one normalised model that every consumer reads.
//!
//! Sources (the local file, the kube watchers) collect typed resources into a
//! [`ResourceSet`](crate::resources::ResourceSet); [`build`] turns that into a `MeshState`
//! with pure code, reporting each resource it had to leave out as a [`Rejection`].
//! Consumers receive immutable snapshots through a [`StateHandle`] and never write back.
pub mod build;
pub mod egress;
pub mod ingress;
pub mod last_good;
pub mod policy;
pub mod workload;

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use serde::Serialize;
use tokio::sync::watch;

pub use build::{BuildOutput, build};
pub use last_good::LastGood;
pub use workload::{
    Identity, Membership, Namespace, Node, Service, ServicePort, Workload, WorkloadUid,
};

/// Settings that shape how resources become state; part of the agent's configuration.
pub use crate::config::MeshSettings;

/// Everything the data path knows about the mesh at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MeshState {
    pub trust_domain: String,
    pub root_namespace: String,
    pub namespaces: BTreeMap<String, Namespace>,
    pub workloads: BTreeMap<WorkloadUid, Workload>,
    /// Services by `namespace/name`.
    pub services: BTreeMap<String, Service>,
    pub nodes: BTreeMap<String, Node>,
    pub policy: policy::Policies,
    pub egress: egress::Egress,
    pub ingress: ingress::Ingress,
    /// Address → workload, for every workload IP.
    #[serde(skip)]
    pub by_ip: BTreeMap<IpAddr, WorkloadUid>,
}

impl MeshState {
    /// The workload that owns `ip`, if any.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip.get(&ip).and_then(|uid| self.workloads.get(uid))
    }

    /// The workload named `namespace/name`.
    pub fn workload_by_name(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.workloads
            .values()
            .find(|w| w.namespace == namespace && w.name == name)
    }
}

/// A resource left out of MeshState, and why. Logged, and written back as a status condition
/// where the kind has status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rejection {
    /// `Kind.group`, e.g. `PeerAuthentication.security.istio.io`.
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    /// Path of the offending field, e.g. `spec.mtls.mode`.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name)?,
            None => write!(f, "{} {}", self.kind, self.name)?,
        }
        write!(f, ": {}: {}", self.field, self.message)
    }
}

/// Shared, immutable snapshot.
pub type Snapshot = Arc<MeshState>;

/// Read side of the state channel, cloned into every consumer.
#[derive(Clone, Debug)]
pub struct StateHandle(watch::Receiver<Snapshot>);

/// Write side: only sources hold it.
#[derive(Debug)]
pub struct StatePublisher(watch::Sender<Snapshot>);

/// A state channel starting from an empty mesh.
pub fn channel() -> (StatePublisher, StateHandle) {
    let (tx, rx) = watch::channel(Arc::new(MeshState::default()));
    (StatePublisher(tx), StateHandle(rx))
}

impl StatePublisher {
    /// Publishes a new snapshot if it differs from the current one.
    pub fn publish(&self, state: MeshState) {
        self.0.send_if_modified(|current| {
            if **current == state {
                false
            } else {
                *current = Arc::new(state);
                true
            }
        });
    }

    /// Another reader of this channel.
    pub fn subscribe(&self) -> StateHandle {
        StateHandle(self.0.subscribe())
    }
}

impl StateHandle {
    /// The current snapshot.
    pub fn current(&self) -> Snapshot {
        self.0.borrow().clone()
    }

    /// Waits for the next change; `None` once every publisher is gone.
    pub async fn changed(&mut self) -> Option<Snapshot> {
        self.0.changed().await.ok()?;
        Some(self.0.borrow_and_update().clone())
    }
}

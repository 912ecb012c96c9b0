//! MeshState: the one normalised model that every consumer reads.
//!
//! Sources (the local file, the kube watchers) collect typed resources into a
//! [`ResourceSet`](crate::resources::ResourceSet); [`build`] turns that into a `MeshState`
//! with pure code, reporting each resource it had to leave out as a [`Rejection`].
//! Consumers receive immutable snapshots through a [`StateHandle`] and never write back.
pub mod build;
pub mod egress;
pub mod http_filters;
pub mod incremental;
pub mod ingress;
pub mod istio_ingress;
pub mod last_good;
pub mod load_balance;
pub mod mesh;
pub mod outbound;
pub mod policy;
pub mod reference_grants;
pub mod rejections;
pub mod service;
pub mod workload;

use std::sync::Arc;

use tokio::sync::watch;

/// Settings that shape how resources become state; part of the agent's configuration.
pub use crate::config::MeshSettings;
pub use build::{BuildOutput, build};
pub use incremental::{Incremental, KindPrints};
pub use last_good::LastGood;
pub use mesh::MeshState;
pub use rejections::{Rejection, Rejections};
pub use service::{Service, ServicePort};
pub use workload::{Identity, Membership, Namespace, Node, Workload, WorkloadUid};

/// Shared, immutable snapshot.
pub type Snapshot = Arc<MeshState>;

/// Read side of the state channel, cloned into every consumer.
#[derive(Clone, Debug)]
pub struct StateHandle(watch::Receiver<Snapshot>);

/// Write side: only sources hold it.
#[derive(Debug)]
pub struct StatePublisher {
    tx: watch::Sender<Snapshot>,
    /// Snapshots published so far (each logged with its number).
    generation: std::sync::atomic::AtomicU64,
}

/// A state channel starting from an empty mesh.
pub fn channel() -> (StatePublisher, StateHandle) {
    let (tx, rx) = watch::channel(Arc::new(MeshState::default()));
    let publisher = StatePublisher {
        tx,
        generation: Default::default(),
    };
    (publisher, StateHandle(rx))
}

impl StatePublisher {
    /// Publishes a new snapshot if it differs from the current one (logging its generation and
    /// size when it does).
    pub fn publish(&self, state: MeshState) {
        let (workloads, services) = (state.workloads.len(), state.services.len());
        let policies = state.policy.authorizations.len();
        let changed = self.tx.send_if_modified(|current| {
            if **current == state {
                false
            } else {
                *current = Arc::new(state);
                true
            }
        });
        if changed {
            let generation = self
                .generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            tracing::info!(
                generation,
                workloads,
                services,
                policies,
                "mesh state published"
            );
        }
    }

    /// Another reader of this channel.
    pub fn subscribe(&self) -> StateHandle {
        StateHandle(self.tx.subscribe())
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

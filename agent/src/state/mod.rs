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
pub struct StateHandle {
    rx: watch::Receiver<Snapshot>,
    report: Arc<std::sync::Mutex<PublishReport>>,
}

/// Write side: only sources hold it.
#[derive(Debug)]
pub struct StatePublisher {
    tx: watch::Sender<Snapshot>,
    report: Arc<std::sync::Mutex<PublishReport>>,
}

/// What the sources last did: the snapshot in force and what they left out of it (for
/// `sluice status`).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishReport {
    /// Snapshots published so far; 0 before the first.
    pub generation: u64,
    /// When the snapshot in force was published.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub published_at: Option<time::OffsetDateTime>,
    /// Resources the last build left out, and why.
    pub rejections: Vec<Rejection>,
}

/// A state channel starting from an empty mesh.
pub fn channel() -> (StatePublisher, StateHandle) {
    let (tx, rx) = watch::channel(Arc::new(MeshState::default()));
    let report = Arc::default();
    let publisher = StatePublisher {
        tx,
        report: Arc::clone(&report),
    };
    (publisher, StateHandle { rx, report })
}

/// Reads the report even if a holder panicked (it is replaced whole under the lock).
fn read(report: &std::sync::Mutex<PublishReport>) -> std::sync::MutexGuard<'_, PublishReport> {
    report.lock().unwrap_or_else(|e| e.into_inner())
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
            let generation = {
                let mut report = read(&self.report);
                report.generation += 1;
                report.published_at = Some(time::OffsetDateTime::now_utc());
                report.generation
            };
            tracing::info!(
                generation,
                workloads,
                services,
                policies,
                "mesh state published"
            );
        }
    }

    /// Publishes a build's state (as [`publish`](Self::publish)) and records what it left out.
    pub fn publish_built(&self, state: MeshState, rejections: &[Rejection]) {
        self.publish(state);
        read(&self.report).rejections = rejections.to_vec();
    }

    /// Another reader of this channel.
    pub fn subscribe(&self) -> StateHandle {
        StateHandle {
            rx: self.tx.subscribe(),
            report: Arc::clone(&self.report),
        }
    }
}

impl StateHandle {
    /// The current snapshot.
    pub fn current(&self) -> Snapshot {
        self.rx.borrow().clone()
    }

    /// What the sources last published, and left out.
    pub fn report(&self) -> PublishReport {
        read(&self.report).clone()
    }

    /// Waits for the next change; `None` once every publisher is gone.
    pub async fn changed(&mut self) -> Option<Snapshot> {
        self.rx.changed().await.ok()?;
        Some(self.rx.borrow_and_update().clone())
    }
}

//! The kube source: MeshState from a Kubernetes API server.
//!
//! Watchers and reflector stores ([`watch`]) keep a local copy of every kind in the registry
//! ([`kinds`](crate::resources::kinds)). Each change wakes the rebuild loop, which waits a short debounce for
//! whatever else arrives with it, turns all stores into a
//! [`ResourceSet`] and runs the same pure [`state::build`] as the file source, then publishes.
//! Until every kind has been listed once (or found absent) nothing is published, so consumers
//! never act on a half-read cluster. When the API server goes away the stores keep their
//! contents, so the last good state stays in force; the watchers relist on return.
//!
//! Rejections are logged once per resource generation and handed to the status writer
//! ([`status`]), which one agent at a time (elected through a Lease) writes back as conditions.
pub mod annotate;
pub mod gateway_status;
pub mod lease;
pub mod manifests;
pub mod status;
pub mod uninstall;
pub mod watch;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use kube::{
    Client,
    config::{KubeConfigOptions, Kubeconfig},
};
use tokio::{
    sync::{mpsc, watch as tokio_watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use crate::{
    resources::{
        ResourceSet,
        kinds::{self, KindVisitor, WatchedKind},
    },
    state::{self, MeshSettings, Rejection, StatePublisher},
};
use watch::{Signal, Stores, Watches};

pub use gateway_status::CONTROLLER_NAME;
pub use status::{FIELD_MANAGER, Rebuilt};

/// Why the kube source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("kube client configuration: {0}")]
    Config(String),
    #[error("building the kube client: {0}")]
    Client(#[source] kube::Error),
}

/// A client from `kubeconfig`, or kube's inferred configuration.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).map_err(|source| KubeError::Kubeconfig {
                path: path.into(),
                source,
            })?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.into(),
                    source,
                })?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::Config(e.to_string()))?,
    };
    Client::try_from(config).map_err(KubeError::Client)
}

/// What the kube source needs besides a client.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    pub settings: MeshSettings,
    /// Resources that are not in the cluster but belong to the mesh (the config file's).
    pub extra: ResourceSet,
    pub debounce: Duration,
}

impl SourceOptions {
    /// Namespace and name of the mesh config ConfigMap the source watches.
    pub fn mesh_config(&self) -> (String, String) {
        self.settings.mesh_config.clone().unwrap_or_else(|| {
            (
                self.settings.root_namespace.clone(),
                crate::state::egress::outbound_policy::DEFAULT_MESH_CONFIG_NAME.to_owned(),
            )
        })
    }
}

/// A running kube source. Dropping it stops the watches and the rebuild loop; the last
/// published state stays in the channel.
pub struct KubeSource {
    stores: Stores,
    rebuilt: tokio_watch::Receiver<Arc<Rebuilt>>,
    _watches: Watches,
    rebuild_task: JoinHandle<()>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        self.rebuild_task.abort();
    }
}

impl KubeSource {
    /// Starts watching and rebuilding; publishes on `publisher` once every kind was listed.
    pub fn start(client: &Client, options: SourceOptions, publisher: StatePublisher) -> Self {
        let (signals_tx, signals) = mpsc::unbounded_channel();
        let scope = watch::WatchScope {
            mesh_config: options.mesh_config(),
        };
        let (stores, watches) = watch::start(client, &scope, signals_tx);
        let (rebuilt_tx, rebuilt) = tokio_watch::channel(Arc::new(Rebuilt::default()));
        let rebuild_task = tokio::spawn(rebuild_loop(
            stores.clone(),
            options,
            signals,
            publisher,
            rebuilt_tx,
        ));
        Self {
            stores,
            rebuilt,
            _watches: watches,
            rebuild_task,
        }
    }

    /// Waits until the first state was published (every kind listed or found absent).
    pub async fn synced(&self) {
        let mut rx = self.rebuilt.clone();
        let _ = rx.wait_for(|r| r.generation > 0).await;
    }

    /// The reflector stores (the status writer reads objects from them).
    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    /// Each rebuild's rejections.
    pub fn rebuilt(&self) -> tokio_watch::Receiver<Arc<Rebuilt>> {
        self.rebuilt.clone()
    }
}

/// The kube source as `sluice run` runs it: the watches and rebuild loop, and (when enabled) the
/// elected status writer.
pub struct Running {
    pub client: Client,
    pub source: KubeSource,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Running {
    /// Starts the source (and the status writer when `agent.kube.writeStatus`).
    pub fn start(
        client: Client,
        agent: &crate::config::AgentConfig,
        options: SourceOptions,
        publisher: StatePublisher,
    ) -> Self {
        let state = publisher.subscribe();
        let source = KubeSource::start(&client, options, publisher);
        let mut tasks = Vec::new();
        if agent.kube.write_status {
            let namespace = agent
                .kube
                .lease_namespace
                .clone()
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| "sluice-system".into());
            let (leader_tx, leader) = tokio_watch::channel(false);
            let settings = lease::LeaseSettings::new(&namespace, &agent.node_name);
            tasks.push(tokio::spawn(lease::run(
                client.clone(),
                settings,
                leader_tx,
            )));
            let writer = status::StatusWriter::new(
                client.clone(),
                source.stores().clone(),
                state,
                source.rebuilt(),
                agent.kube.gateway_class_name.clone(),
            );
            tasks.push(tokio::spawn(writer.run(leader)));
        }
        Self {
            client,
            source,
            tasks,
        }
    }
}

/// Appends `extra`'s resources to `set`, kind by kind.
fn merge(set: &mut ResourceSet, extra: &ResourceSet) {
    struct Merge<'a>(&'a mut ResourceSet, &'a ResourceSet);
    impl KindVisitor for Merge<'_> {
        fn visit<K: WatchedKind>(&mut self) {
            K::list_mut(self.0).extend(K::list(self.1).iter().cloned());
        }
    }
    kinds::for_each_kind(&mut Merge(set, extra));
}

/// Per-kind progress towards the first publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KindState {
    Waiting,
    Listed,
    Absent,
    /// A security kind RBAC forbids listing ([`Signal::Forbidden`]).
    Forbidden,
}

/// Logs each rejection once per (resource generation, field, message).
#[derive(Default)]
struct RejectionLog {
    seen: BTreeSet<(Option<i64>, String)>,
}

impl RejectionLog {
    fn log(&mut self, stores: &Stores, rejections: &[Rejection]) {
        let mut now = BTreeSet::new();
        for r in rejections {
            let generation = stores.generation(&r.kind, r.namespace.as_deref(), &r.name);
            let key = (generation, r.to_string());
            if !self.seen.contains(&key) {
                warn!(
                    kind = %r.kind,
                    namespace = r.namespace.as_deref().unwrap_or(""),
                    name = %r.name,
                    field = %r.field,
                    generation = generation.unwrap_or(0),
                    "resource rejected: {}: {}",
                    r.field,
                    r.message
                );
            }
            now.insert(key);
        }
        self.seen = now;
    }
}

async fn rebuild_loop(
    stores: Stores,
    options: SourceOptions,
    mut signals: mpsc::UnboundedReceiver<Signal>,
    publisher: StatePublisher,
    rebuilt: tokio_watch::Sender<Arc<Rebuilt>>,
) {
    let mut progress = [KindState::Waiting; kinds::COUNT];
    // Store changes seen per kind: a kind whose count stayed has the same list as at the last
    // build (its signal arrives after its store changed), so the parts of the state that read
    // only such kinds are reused.
    let mut changes = [0u64; kinds::COUNT];
    let mut log = RejectionLog::default();
    let mut generation = 0u64;
    let mut last_good = state::LastGood::default();
    let started = Instant::now();
    let mut next_waiting_report = started + Duration::from_secs(10);
    loop {
        // Wait for a change (reporting, while the first list is outstanding, what it waits for).
        let first = if generation == 0 {
            match tokio::time::timeout_at(next_waiting_report.into(), signals.recv()).await {
                Ok(s) => s,
                Err(_) => {
                    let waiting: Vec<String> = kinds::watched()
                        .iter()
                        .zip(progress)
                        .filter(|(_, p)| *p == KindState::Waiting)
                        .map(|(k, _)| k.qualified())
                        .collect();
                    warn!(
                        ?waiting,
                        elapsed_s = started.elapsed().as_secs(),
                        "still waiting for the first list of these kinds"
                    );
                    next_waiting_report = Instant::now() + Duration::from_secs(30);
                    continue;
                }
            }
        } else {
            signals.recv().await
        };
        let Some(first) = first else {
            return;
        };
        // Whether anything but an absent kind's failing retry arrived in this batch.
        let mut meaningful = false;
        let mut apply = |s: Signal| match s {
            Signal::Changed(i) => {
                meaningful = true;
                bump(&mut changes, i);
            }
            Signal::Listed(i) => {
                bump(&mut changes, i);
                meaningful = true;
                progress[i] = KindState::Listed;
            }
            Signal::Absent(i) => {
                bump(&mut changes, i);
                if progress[i] == KindState::Waiting {
                    meaningful = true;
                    progress[i] = KindState::Absent;
                }
            }
            Signal::Forbidden(i) => {
                bump(&mut changes, i);
                if progress[i] != KindState::Forbidden {
                    meaningful = true;
                    progress[i] = KindState::Forbidden;
                }
            }
        };
        apply(first);
        // Debounce: take whatever else arrives shortly.
        let deadline = tokio::time::Instant::now() + options.debounce;
        loop {
            tokio::select! {
                s = signals.recv() => match s {
                    Some(s) => apply(s),
                    None => return,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if progress.contains(&KindState::Waiting) {
            continue;
        }
        if !meaningful && generation > 0 {
            // Only failing watches of absent kinds: nothing changed. (Judged on the whole batch:
            // a change that arrives in the same debounce window as such a retry must not be
            // dropped with it.)
            continue;
        }
        let t = Instant::now();
        let mut set = stores.resource_set();
        merge(&mut set, &options.extra);
        // Building a cluster's state takes long enough to stall proxying: off the runtime.
        let settings = options.settings.clone();
        let prints = state::KindPrints(changes.map(Some));
        let mut kept = std::mem::take(&mut last_good);
        let (out, kept) = match tokio::task::spawn_blocking(move || {
            let out = kept.build_changed(set, &prints, &settings);
            (out, kept)
        })
        .await
        {
            Ok(done) => done,
            Err(e) => {
                warn!(error = %e, "rebuilding the mesh state failed; retrying on the next change");
                continue;
            }
        };
        last_good = kept;
        log.log(&stores, &out.rejections);
        publisher.publish_built(out.state, &out.rejections);
        crate::memory::release_freed();
        generation += 1;
        if generation == 1 {
            let absent: Vec<String> = kinds::watched()
                .iter()
                .zip(progress)
                .filter(|(_, p)| *p == KindState::Absent)
                .map(|(k, _)| k.qualified())
                .collect();
            info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                ?absent,
                "kube source synced; first mesh state published"
            );
        }
        debug!(
            generation,
            build_us = t.elapsed().as_micros() as u64,
            "mesh state rebuilt"
        );
        let absent = kinds::watched()
            .iter()
            .zip(progress)
            .filter(|(_, p)| *p == KindState::Absent)
            .map(|(k, _)| k.qualified())
            .collect();
        let forbidden = kinds::watched()
            .iter()
            .zip(progress)
            .filter(|(_, p)| *p == KindState::Forbidden)
            .map(|(k, _)| k.qualified())
            .collect();
        rebuilt.send_replace(Arc::new(Rebuilt {
            generation,
            rejections: out.rejections,
            absent,
            forbidden,
        }));
    }
}

/// Counts one more change of kind `i`.
fn bump(changes: &mut [u64; kinds::COUNT], i: usize) {
    if let Some(c) = changes.get_mut(i) {
        *c = c.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_appends_every_kind() {
        let mut file = ResourceSet::default();
        for (i, doc) in [
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {}",
        ]
        .iter()
        .enumerate()
        {
            file.add_document(i, serde_yaml::from_str(doc).unwrap())
                .unwrap();
        }
        let mut set = file.clone();
        merge(&mut set, &file);
        assert_eq!(set.namespaces.len(), 2);
        assert_eq!(set.http_routes.len(), 2);
    }
}

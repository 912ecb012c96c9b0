//! Sources of MeshState: the local file, and the kube watchers.
pub mod file;
pub mod kube;

use std::time::Duration;

use anyhow::Context;
use tracing::info;

use crate::{
    config::AgentConfig,
    resources::ResourceSet,
    state::{self, StatePublisher},
};

/// The source `sluice run` started; dropping it stops the source (the last state stays).
pub enum Running {
    /// The config file's resources, republished when the file changes.
    File(file::Watch),
    /// The kube watchers (plus the file's resources), and the status writer.
    Kube(Box<kube::Running>),
}

/// Starts the source the config asks for and returns once the first state is published: the
/// file's resources at once, or — with `spec.kube.enabled` — the cluster's (and the file's) once
/// every watched kind has been listed.
pub async fn start(
    agent: &AgentConfig,
    resources: ResourceSet,
    publisher: StatePublisher,
    config_path: Option<&std::path::Path>,
) -> anyhow::Result<Running> {
    if !agent.kube.enabled {
        let mut last_good = state::LastGood::default();
        file::publish(
            resources,
            &state::KindPrints::unknown(),
            agent,
            &publisher,
            &mut last_good,
        );
        return Ok(Running::File(file::Watch::start(
            config_path.map(Into::into),
            agent.clone(),
            publisher,
            last_good,
        )));
    }
    let client = kube::client(agent.kube.kubeconfig.as_deref())
        .await
        .context("connecting to the Kubernetes API server")?;
    let options = kube::SourceOptions {
        settings: agent.mesh_settings(),
        extra: resources,
        debounce: Duration::from_millis(agent.kube.debounce_ms),
    };
    let running = kube::Running::start(client, agent, options, publisher);
    info!("waiting for the first list of every watched kind");
    running.source.synced().await;
    Ok(Running::Kube(Box::new(running)))
}

//! The local file source: one YAML stream holding an `AgentConfig` and Kubernetes-shaped
//! resources (Namespaces, Pods, Services, Nodes, and the mesh's own kinds).
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{
    config::AgentConfig,
    resources::{AGENT_CONFIG_KIND, DocumentError, ResourceSet},
    state::{LastGood, StatePublisher},
};

/// What a config file holds.
#[derive(Debug, Default)]
pub struct LocalFile {
    pub agent: AgentConfig,
    pub resources: ResourceSet,
}

/// Why the file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Document {
        path: PathBuf,
        source: DocumentError,
    },
    #[error("{path}: document {index} ({AGENT_CONFIG_KIND}): spec: {source}")]
    AgentConfig {
        path: PathBuf,
        index: usize,
        source: serde_yaml::Error,
    },
    #[error("{path}: more than one {AGENT_CONFIG_KIND} document")]
    TwoAgentConfigs { path: PathBuf },
}

#[derive(Deserialize)]
struct AgentConfigDocument {
    #[serde(default)]
    spec: Option<serde_yaml::Value>,
}

/// How often the config file's size and modification time are checked for changes.
pub const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);
/// Every this many checks the file is read and hashed even if its size and modification time
/// stayed (a rewrite can keep both).
const FULL_CHECK_EVERY: u32 = 5;

/// Republishes the file's resources whenever the file changes (its agent settings stay as they
/// were at start: changing those needs a restart). A file that no longer parses is reported and
/// changes nothing. Dropping it stops watching; the last state stays.
#[derive(Debug)]
pub struct Watch {
    task: Option<tokio::task::JoinHandle<()>>,
    _publisher: Option<std::sync::Arc<crate::state::StatePublisher>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

impl Watch {
    /// Watches `path` (when given), publishing through `publisher`.
    pub fn start(
        path: Option<PathBuf>,
        agent: AgentConfig,
        publisher: crate::state::StatePublisher,
        mut last_good: crate::state::LastGood,
    ) -> Self {
        let publisher = std::sync::Arc::new(publisher);
        let Some(path) = path else {
            return Self {
                task: None,
                _publisher: Some(publisher),
            };
        };
        let task = tokio::spawn({
            let publisher = publisher.clone();
            async move {
                // A fingerprint, not the bytes: a cluster's file is megabytes.
                let mut last = std::fs::read(&path).ok().map(|b| fingerprint(&b));
                let stat = |path: &Path| {
                    std::fs::metadata(path)
                        .ok()
                        .map(|m| (m.len(), m.modified().ok()))
                };
                let mut last_stat = stat(&path);
                let mut checks = 0u32;
                loop {
                    tokio::time::sleep(WATCH_INTERVAL).await;
                    // A stat is cheap; reading and hashing a cluster's file is not.
                    checks += 1;
                    let now_stat = stat(&path);
                    if now_stat == last_stat && checks < FULL_CHECK_EVERY {
                        continue;
                    }
                    (last_stat, checks) = (now_stat, 0);
                    let Ok(bytes) = std::fs::read(&path) else {
                        continue;
                    };
                    let now = fingerprint(&bytes);
                    if last == Some(now) {
                        continue;
                    }
                    last = Some(now);
                    // Parsing and building a cluster's worth of resources takes a second or
                    // more: off the runtime's threads, which keep proxying meanwhile.
                    let (agent, publisher, path) = (agent.clone(), publisher.clone(), path.clone());
                    let mut kept = std::mem::take(&mut last_good);
                    let rebuilt = tokio::task::spawn_blocking(move || {
                        let text = String::from_utf8_lossy(&bytes);
                        match parse(&text, &path) {
                            Ok(file) => {
                                tracing::info!(path = %path.display(), "config file changed; republishing its resources");
                                publish(file.resources, &agent, &publisher, &mut kept);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "config file changed but does not parse; keeping the last state")
                            }
                        }
                        kept
                    })
                    .await;
                    last_good = match rebuilt {
                        Ok(kept) => kept,
                        Err(e) => {
                            tracing::error!(error = %e, "rebuilding from the config file failed; the next change rebuilds from scratch");
                            crate::state::LastGood::default()
                        }
                    };
                }
            }
        });
        Self {
            task: Some(task),
            _publisher: Some(publisher),
        }
    }
}

/// Length and hash of a file's bytes, to notice a change without keeping them.
fn fingerprint(bytes: &[u8]) -> (usize, u64) {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    (bytes.len(), h.finish())
}

/// Reads and parses `path`.
pub fn load(path: &Path) -> Result<LocalFile, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.into(),
        source,
    })?;
    parse(&text, path)
}

/// Parses a YAML stream; `path` only labels errors.
pub fn parse(text: &str, path: &Path) -> Result<LocalFile, FileError> {
    let mut file = LocalFile::default();
    let mut agent_seen = false;
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc).map_err(|source| FileError::Document {
            path: path.into(),
            source: DocumentError::Yaml { index, source },
        })?;
        if value.is_null() {
            continue; // an empty document between separators
        }
        if !crate::resources::is_agent_config(&value) {
            file.resources
                .add_document(index, value)
                .map_err(|source| FileError::Document {
                    path: path.into(),
                    source,
                })?;
            continue;
        }
        if agent_seen {
            return Err(FileError::TwoAgentConfigs { path: path.into() });
        }
        agent_seen = true;
        let doc: AgentConfigDocument =
            serde_yaml::from_value(value).map_err(|source| FileError::AgentConfig {
                path: path.into(),
                index,
                source,
            })?;
        let spec = doc
            .spec
            .unwrap_or(serde_yaml::Value::Mapping(Default::default()));
        file.agent = serde_yaml::from_value(spec).map_err(|source| FileError::AgentConfig {
            path: path.into(),
            index,
            source,
        })?;
    }
    Ok(file)
}

/// Builds and publishes the file's resources (falling back to the last valid version of a
/// resource an edit made invalid), logging what was rejected.
pub(crate) fn publish(
    resources: ResourceSet,
    agent: &AgentConfig,
    publisher: &StatePublisher,
    last_good: &mut LastGood,
) {
    let built = last_good.build(resources, &agent.mesh_settings());
    for r in &built.rejections {
        tracing::warn!(rejection = %r, "resource rejected");
    }
    publisher.publish(built.state);
    crate::memory::release_freed();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_agent_config_and_resources() {
        let f = parse(
            "apiVersion: sluice.dev/v1alpha1\nkind: AgentConfig\nspec: {nodeName: n1, capture: {excludedPorts: [22]}}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n",
            Path::new("t.yaml"),
        )
        .unwrap();
        assert_eq!(f.agent.node_name, "n1");
        assert_eq!(f.agent.capture.excluded_ports, vec![22]);
        assert_eq!(f.resources.namespaces.len(), 1);
    }

    #[test]
    fn errors_name_the_document_and_field() {
        let err = parse(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: sluice.dev/v1alpha1\nkind: AgentConfig\nspec: {nodeName: n1, cgroupRot: /x}\n",
            Path::new("t.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("document 1") && err.contains("cgroupRot"),
            "{err}"
        );
        let err = parse("apiVersion: v9\nkind: Thing\n", Path::new("t.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("v9 Thing"), "{err}");
    }
}

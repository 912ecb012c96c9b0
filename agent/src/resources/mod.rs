//! Typed Kubernetes resources, as both sources collect them.
//!
//! The local file and the kube watchers fill the same [`ResourceSet`], in the resources' own
//! API groups and shapes, so YAML written for a cluster works unchanged in a local file.
pub mod endpoint_slice;
pub mod gateway_api;
pub mod istio_networking;
pub mod istio_security;
pub mod kinds;
pub mod mesh_config;
pub mod name;
pub mod static_egress;

use serde::Deserialize;

pub use kinds::ResourceSet;
use kinds::{KindVisitor, WatchedKind};
pub use name::NamespacedName;

/// Why a YAML document could not be read as a resource.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("document {index}: not YAML: {source}")]
    Yaml {
        index: usize,
        source: serde_yaml::Error,
    },
    #[error("document {index}: missing apiVersion or kind")]
    MissingType { index: usize },
    #[error("document {index}: {api_version} {kind} is not a kind Sluice reads")]
    UnknownKind {
        index: usize,
        api_version: String,
        kind: String,
    },
    #[error("document {index} ({kind} {name}): {source}")]
    Invalid {
        index: usize,
        kind: String,
        name: String,
        source: serde_yaml::Error,
    },
}

/// One YAML document's type header.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    metadata: Option<NameOnly>,
}

#[derive(Deserialize)]
struct NameOnly {
    #[serde(default)]
    name: Option<String>,
}

/// True if `doc` is the agent's own configuration document, which
/// [`ResourceSet::add_document`] leaves out.
pub fn is_agent_config(doc: &serde_yaml::Value) -> bool {
    TypeMeta::deserialize(doc).is_ok_and(|m| {
        m.api_version.as_deref() == Some(AGENT_CONFIG_API_VERSION)
            && m.kind.as_deref() == Some(AGENT_CONFIG_KIND)
    })
}

/// A document that is not a mesh resource but configures the agent itself.
pub const AGENT_CONFIG_API_VERSION: &str = "sluice.dev/v1alpha1";
/// Kind of the agent's own configuration document.
pub const AGENT_CONFIG_KIND: &str = "AgentConfig";

impl ResourceSet {
    /// Every document of a YAML stream (empty documents skipped; an AgentConfig document is
    /// left out, as [`ResourceSet::add_document`] does).
    pub fn from_yaml(text: &str) -> Result<Self, DocumentError> {
        let mut set = Self::default();
        for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = serde_yaml::Value::deserialize(doc)
                .map_err(|source| DocumentError::Yaml { index, source })?;
            if !value.is_null() {
                set.add_document(index, value)?;
            }
        }
        Ok(set)
    }

    /// Adds one parsed YAML document; `Ok(false)` if it is the agent's own config document
    /// (which the caller reads separately).
    pub fn add_document(
        &mut self,
        index: usize,
        doc: serde_yaml::Value,
    ) -> Result<bool, DocumentError> {
        // Read through a reference: a clone of the document would double the parse's work.
        let meta =
            TypeMeta::deserialize(&doc).map_err(|source| DocumentError::Yaml { index, source })?;
        let (Some(api_version), Some(kind)) = (meta.api_version, meta.kind) else {
            return Err(DocumentError::MissingType { index });
        };
        let name = meta.metadata.and_then(|m| m.name).unwrap_or_default();
        let invalid = |source| DocumentError::Invalid {
            index,
            kind: kind.clone(),
            name: name.clone(),
            source,
        };
        if (api_version.as_str(), kind.as_str()) == (AGENT_CONFIG_API_VERSION, AGENT_CONFIG_KIND) {
            return Ok(false);
        }
        /// Adds the document to the list of the kind it names.
        struct Add<'a> {
            set: &'a mut ResourceSet,
            api_version: &'a str,
            kind: &'a str,
            doc: Option<serde_yaml::Value>,
            result: Option<Result<(), serde_yaml::Error>>,
        }
        impl KindVisitor for Add<'_> {
            fn visit<K: WatchedKind>(&mut self) {
                if self.result.is_some()
                    || self.kind != K::kind(&())
                    || !K::accepts_api_version(self.api_version)
                {
                    return;
                }
                let Some(doc) = self.doc.take() else { return };
                // Trimmed as the kube watch trims, so both sources hold the same (small) objects.
                self.result = Some(serde_yaml::from_value::<K>(doc).map(|mut o| {
                    o.trim();
                    K::list_mut(self.set).push(o)
                }));
            }
        }
        let mut add = Add {
            set: self,
            api_version: &api_version,
            kind: &kind,
            doc: Some(doc),
            result: None,
        };
        kinds::for_each_kind(&mut add);
        match add.result {
            Some(Ok(())) => {}
            Some(Err(source)) => return Err(invalid(source)),
            None => {
                return Err(DocumentError::UnknownKind {
                    index,
                    api_version,
                    kind,
                });
            }
        }
        Ok(true)
    }
}

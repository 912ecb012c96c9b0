//! The operator's commands, `sluice status` and `sluice dump`: they read a running agent's admin
//! endpoint (localhost:15000 by default, as ztunnel's) and print tables, JSON or YAML.
//!
//! Nothing here touches the agent's state: the agent answers with the same types
//! ([`AgentStatus`](crate::admin::status::AgentStatus), the `?format=ztunnel` dump) that this
//! module reads back.
pub mod client;
pub mod render;

use std::net::SocketAddr;

use crate::admin::status::AgentStatus;

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error(
        "cannot reach the agent's admin endpoint at {addr}: {source} (is the agent running on this node, and --admin its spec.adminAddr?)"
    )]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin endpoint {addr}{path}: {message}")]
    Http {
        addr: SocketAddr,
        path: String,
        message: String,
    },
    #[error("admin endpoint {addr}{path} answered {status}: {body}")]
    Status {
        addr: SocketAddr,
        path: String,
        status: u16,
        body: String,
    },
    #[error("admin endpoint {addr}{path}: not the JSON expected: {source}")]
    Json {
        addr: SocketAddr,
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// What `sluice dump` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DumpKind {
    Workloads,
    Services,
    Policies,
    Certificates,
}

impl DumpKind {
    /// The section of the ztunnel-shaped dump that holds it.
    pub fn section(self) -> &'static str {
        match self {
            DumpKind::Workloads => "workloads",
            DumpKind::Services => "services",
            DumpKind::Policies => "policies",
            DumpKind::Certificates => "certificates",
        }
    }
}

/// How a command prints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
    Yaml,
}

/// The agent's status, read from `admin`.
pub async fn status(admin: SocketAddr) -> Result<AgentStatus, OperatorError> {
    let path = crate::admin::server::STATUS_PATH;
    let body = client::get(admin, path).await?;
    serde_json::from_slice(&body).map_err(|source| OperatorError::Json {
        addr: admin,
        path: path.to_owned(),
        source,
    })
}

/// One section of the agent's ztunnel-shaped config dump, optionally of one namespace.
pub async fn dump(
    admin: SocketAddr,
    kind: DumpKind,
    namespace: Option<&str>,
) -> Result<Vec<serde_json::Value>, OperatorError> {
    let mut path = format!(
        "{}?format=ztunnel&kind={}",
        crate::admin::server::CONFIG_DUMP_PATH,
        kind.section()
    );
    if let Some(ns) = namespace {
        path.push_str("&namespace=");
        path.push_str(ns);
    }
    let body = client::get(admin, &path).await?;
    let json = |source| OperatorError::Json {
        addr: admin,
        path: path.clone(),
        source,
    };
    let mut doc: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&body).map_err(json)?;
    match doc.remove(kind.section()) {
        Some(serde_json::Value::Array(items)) => Ok(items),
        Some(_) | None => Err(OperatorError::Http {
            addr: admin,
            path,
            message: format!("no {} list in the answer", kind.section()),
        }),
    }
}

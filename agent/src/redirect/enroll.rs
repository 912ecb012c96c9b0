//! The enrollment API: one JSON request and one JSON answer per connection, over a unix socket.
//! The CNI plugin (`sluice cni`) and the tests speak it; so can an operator with `sluice enroll`.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::warn;

/// A pod sandbox on this node, as the CNI plugin (or a test) reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Sandbox {
    /// The pod's UID.
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// Path of the pod's network namespace (`/proc/<pid>/ns/net`, `/run/netns/<name>`, …).
    pub netns: PathBuf,
    /// The pod's cgroup, if known. Informational: capture attaches once at the node's cgroup
    /// root and selects pods by network namespace, so no per-pod cgroup is needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    pub ips: Vec<IpAddr>,
}

/// A request to the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// A sandbox came up (or changed); the agent captures it if the mesh says so.
    Add { pod: Sandbox },
    /// A sandbox went away.
    Del { uid: String },
    /// Lists sandboxes and whether each is captured.
    List,
}

/// One sandbox in a `list` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxStatus {
    pub pod: Sandbox,
    pub captured: bool,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub ok: bool,
    /// For `add`: whether the pod is now captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captured: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sandboxes: Vec<SandboxStatus>,
}

impl Response {
    /// A failure answer.
    pub fn error(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            captured: None,
            error: Some(msg.into()),
            sandboxes: Vec::new(),
        }
    }
}

/// A request on its way to the pod manager, with the channel for its answer.
pub type Command = (Request, oneshot::Sender<Response>);

/// Largest request accepted (a sandbox is a few hundred bytes).
const MAX_REQUEST: u64 = 64 * 1024;

/// Serves the API on `path` (replacing a stale socket file) until the task is dropped.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts API connections and forwards requests to the manager.
pub async fn serve(listener: UnixListener, manager: mpsc::Sender<Command>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let manager = manager.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, manager).await {
                warn!(error = %e, "enrollment API connection failed");
            }
        });
    }
}

async fn answer(stream: UnixStream, manager: mpsc::Sender<Command>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST));
    reader.read_line(&mut line).await?;
    let response = match parse_request(&line) {
        Err(e) => Response::error(format!("bad request: {e}")),
        Ok(req) => {
            let (tx, rx) = oneshot::channel();
            if manager.send((req, tx)).await.is_err() {
                Response::error("agent is shutting down")
            } else {
                rx.await
                    .unwrap_or_else(|_| Response::error("agent dropped the request"))
            }
        }
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// Decodes one request line as the agent reads it from a client of the socket.
pub fn parse_request(line: &str) -> Result<Request, serde_json::Error> {
    serde_json::from_str(line)
}

/// Sends one request to the agent at `socket` and returns its answer (blocking; used by the
/// CNI plugin and the CLI, which have no runtime).
pub fn call(socket: &Path, request: &Request) -> anyhow::Result<Response> {
    use anyhow::Context;
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to the Sluice agent at {}", socket.display()))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let mut body = serde_json::to_vec(request)?;
    body.push(b'\n');
    stream.write_all(&body)?;
    let mut line = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut line)
        .context("reading the agent's answer")?;
    serde_json::from_str(&line).with_context(|| format!("agent answered {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r: Request = serde_json::from_str(
            r#"{"op":"add","pod":{"uid":"u1","namespace":"a","name":"p","netns":"/run/netns/x","ips":["10.0.0.2"]}}"#,
        )
        .unwrap();
        assert!(
            matches!(r, Request::Add { ref pod } if pod.ips == vec!["10.0.0.2".parse::<IpAddr>().unwrap()])
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"add","pod":{"uid":"u1"}}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"nuke"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Request::Del { uid: "u".into() }).unwrap(),
            r#"{"op":"del","uid":"u"}"#
        );
    }
}

//! `sluice cleanup`: takes off a node everything Sluice put on it, and nothing else.
//!
//! * the bpffs pin directory: the pinned maps, programs and links (unpinning a link detaches its
//!   program once no process holds it, so run this after the agent has stopped);
//! * in each pod namespace the agent recorded (`STATE_DIR/sandboxes/*.json`), the transparent-reply
//!   rule and route ([`crate::redirect::pod_net`]), then the records themselves;
//! * egress pinning: every address, rule and route carrying Sluice's protocol number, in Sluice's
//!   table, and Sluice's own interface (`sluice-egress`) when nothing else lives on it;
//! * the CNI plugin, its kubeconfig and Sluice's entry in the node's conflist.
//!
//! An agent that restarts or is upgraded does none of this (the state is adopted by the next
//! agent); only an uninstall does (see [`crate::sources::kube::uninstall`]).
use std::path::{Path, PathBuf};

use anyhow::Context;
use tracing::warn;

use crate::{
    egress::{PinningConfig, PrefixPinner, Uplink},
    netns::{HomeNetns, Netns},
    redirect::{cni_install, enroll::Sandbox, pod_net},
};

/// What to clean and where it lives.
#[derive(Clone, Debug)]
pub struct Cleanup {
    /// The agent's bpffs pin directory.
    pub pin_path: PathBuf,
    /// The agent's state directory (its sandbox records).
    pub state_dir: PathBuf,
    /// The node's CNI configuration directory; `None` leaves CNI alone.
    pub cni_conf_dir: Option<PathBuf>,
    /// The node's CNI binary directory.
    pub cni_bin_dir: Option<PathBuf>,
}

/// What was removed, in words, one line per step that removed something.
pub type Removed = Vec<String>;

impl Cleanup {
    /// Runs every step; a failing step does not stop the others, and the first error is
    /// returned after all have run.
    pub async fn run(&self) -> anyhow::Result<Removed> {
        let mut removed = Vec::new();
        let mut first_error: Option<anyhow::Error> = None;
        let mut note = |r: anyhow::Result<Option<String>>| match r {
            Ok(Some(line)) => removed.push(line),
            Ok(None) => {}
            Err(e) => {
                warn!(error = %format!("{e:#}"), "cleanup step failed");
                first_error.get_or_insert(e);
            }
        };
        note(self.pod_namespaces().await);
        note(self.pins());
        note(egress().await);
        note(self.cni());
        match first_error {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }

    fn pins(&self) -> anyhow::Result<Option<String>> {
        if !self.pin_path.exists() {
            return Ok(None);
        }
        std::fs::remove_dir_all(&self.pin_path)
            .with_context(|| format!("removing {}", self.pin_path.display()))?;
        Ok(Some(format!("pins under {}", self.pin_path.display())))
    }

    async fn pod_namespaces(&self) -> anyhow::Result<Option<String>> {
        let records = self.state_dir.join("sandboxes");
        let Ok(entries) = std::fs::read_dir(&records) else {
            return Ok(None);
        };
        let home = HomeNetns::capture().context("opening this network namespace")?;
        let mut cleaned = 0;
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let Ok(text) = std::fs::read(&path) else {
                continue;
            };
            let Ok(sandbox) = serde_json::from_slice::<Sandbox>(&text) else {
                warn!(record = %path.display(), "not a sandbox record; left alone");
                continue;
            };
            // A pod that is gone took its namespace, and Sluice's rule and route, with it.
            let Ok(netns) = Netns::open(&sandbox.netns) else {
                continue;
            };
            pod_net::remove(&netns, &home)
                .await
                .with_context(|| format!("pod {}/{}", sandbox.namespace, sandbox.name))?;
            cleaned += 1;
        }
        std::fs::remove_dir_all(&records)
            .with_context(|| format!("removing {}", records.display()))?;
        Ok(Some(format!(
            "transparent-reply routing in {cleaned} pod namespaces, and {}",
            records.display()
        )))
    }

    fn cni(&self) -> anyhow::Result<Option<String>> {
        let (Some(conf), Some(bin)) = (&self.cni_conf_dir, &self.cni_bin_dir) else {
            return Ok(None);
        };
        let changed = cni_install::uninstall(bin, conf)?;
        if changed.is_empty() {
            return Ok(None);
        }
        let files: Vec<String> = changed.iter().map(|p| p.display().to_string()).collect();
        Ok(Some(format!("CNI: {}", files.join(", "))))
    }
}

/// Egress pinning's addresses, rules, routes and interface, in this network namespace.
async fn egress() -> anyhow::Result<Option<String>> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    let task = tokio::spawn(conn);
    // Teardown only needs Sluice's numbers and interface name; no uplink is used.
    let config = PinningConfig::new(Uplink {
        interface: String::new(),
        gateway_v4: None,
        gateway_v6: None,
    });
    let report = PrefixPinner::new(handle, config).teardown().await;
    task.abort();
    let report = report.context("removing egress pinning")?;
    Ok((!report.removed.is_empty()).then(|| format!("egress pinning: {}", report.removed)))
}

/// `path` if it is a directory, for optional steps.
pub fn if_dir(path: &Path) -> Option<PathBuf> {
    path.is_dir().then(|| path.to_owned())
}

//! `sluice install-cni`: puts the CNI plugin on the node, the way istio-cni does.
//!
//! It copies this binary to `BIN_DIR/sluice` (write to a temporary name, then rename, so a
//! runtime never executes a half-written file), writes `CONF_DIR/sluice-kubeconfig`, the
//! credential the plugin uses to look a pod up when the agent cannot be reached, from the
//! ServiceAccount token and CA the pod has mounted, and chains Sluice's plugin entry onto the
//! node's primary network configuration ([`super::conflist`]). With `--watch` it stays running
//! (the DaemonSet's `install-cni` container) and repairs all three whenever they drift, e.g.
//! when the primary CNI rewrites its file. [`InstallCni::uninstall`] takes them away again.
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::conflist::{self, Inserted};

/// The name of the kubeconfig next to the node's conflist.
pub const KUBECONFIG_NAME: &str = "sluice-kubeconfig";

/// Where things come from and go to.
#[derive(Clone, Debug)]
pub struct InstallCni {
    /// The node's CNI binary directory (mounted; `/opt/cni/bin` on the host).
    pub bin_dir: PathBuf,
    /// The node's CNI configuration directory (mounted; `/etc/cni/net.d` on the host).
    pub conf_dir: PathBuf,
    /// The same directory as the host (and so the plugin) sees it: the kubeconfig's path in
    /// the plugin entry.
    pub host_conf_dir: PathBuf,
    /// The API server's URL; in a pod, from `KUBERNETES_SERVICE_HOST`/`_PORT`.
    pub server: String,
    /// The ServiceAccount token file.
    pub token_file: PathBuf,
    /// The API server's CA bundle.
    pub ca_file: PathBuf,
    /// The agent's enrollment socket, as the host sees it.
    pub enrollment_socket: PathBuf,
    /// Namespaces whose pods the plugin passes without asking the agent.
    pub exclude_namespaces: Vec<String>,
}

/// What one pass changed.
#[derive(Debug, Default)]
pub struct Installed {
    /// Files written (the plugin binary, the kubeconfig, the conflist).
    pub written: Vec<PathBuf>,
    /// The conflist holding Sluice's entry.
    pub conflist: Option<PathBuf>,
}

impl InstallCni {
    /// Sluice's entry in the node's conflist.
    pub fn plugin_entry(&self) -> Value {
        json!({
            "type": conflist::PLUGIN_TYPE,
            "enrollmentSocket": self.enrollment_socket,
            "kubeconfig": self.host_conf_dir.join(KUBECONFIG_NAME),
            "excludeNamespaces": self.exclude_namespaces,
        })
    }

    /// Copies the plugin, writes its kubeconfig and chains the entry, each only if it differs
    /// from what is there. Errors name the file.
    pub fn run(&self) -> anyhow::Result<Installed> {
        if !self.server.starts_with("https://") {
            bail!("--server {:?}: an https:// URL is needed", self.server);
        }
        let mut out = Installed::default();
        let exe = std::env::current_exe().context("finding this binary")?;
        let plugin = self.bin_dir.join(conflist::PLUGIN_TYPE);
        let binary = fs::read(&exe).with_context(|| format!("reading {}", exe.display()))?;
        if write_if_changed(&plugin, &binary, 0o755)? {
            out.written.push(plugin);
        }

        let token = fs::read_to_string(&self.token_file)
            .with_context(|| format!("reading the token {}", self.token_file.display()))?;
        let ca = fs::read(&self.ca_file)
            .with_context(|| format!("reading the CA {}", self.ca_file.display()))?;
        let kubeconfig = self.conf_dir.join(KUBECONFIG_NAME);
        let text = kubeconfig_text(&self.server, &ca, token.trim());
        if write_if_changed(&kubeconfig, text.as_bytes(), 0o600)? {
            out.written.push(kubeconfig);
        }

        let inserted = conflist::insert(&self.conf_dir, &self.plugin_entry())?;
        if !matches!(inserted, Inserted::Unchanged(_)) {
            out.written.push(inserted.path().to_owned());
        }
        out.conflist = Some(inserted.path().to_owned());
        Ok(out)
    }

    /// Runs [`Self::run`] every `interval` until `stop` resolves, logging what it repairs and
    /// each new error once (a malformed or missing conflist is retried: the primary CNI may
    /// still be writing it).
    pub async fn watch(&self, interval: Duration, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut last_error: Option<String> = None;
        let mut first = true;
        loop {
            match self.run() {
                Ok(done) => {
                    if first || !done.written.is_empty() {
                        let files: Vec<String> = done
                            .written
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect();
                        tracing::info!(
                            conflist = %done.conflist.as_deref().unwrap_or(Path::new("")).display(),
                            written = ?files,
                            "{}",
                            if first { "CNI plugin installed" } else { "CNI plugin repaired" }
                        );
                    }
                    if last_error.take().is_some() {
                        tracing::info!("CNI configuration is in order again");
                    }
                    first = false;
                }
                Err(e) => {
                    let text = format!("{e:#}");
                    if last_error.as_deref() != Some(text.as_str()) {
                        tracing::error!(error = %text, "installing the CNI plugin");
                        last_error = Some(text);
                    }
                }
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// Removes Sluice's entry from the conflist, the kubeconfig and the plugin binary; returns
    /// what it removed or changed.
    pub fn uninstall(&self) -> anyhow::Result<Vec<PathBuf>> {
        uninstall(&self.bin_dir, &self.conf_dir)
    }
}

/// Removes what the install step put into `bin_dir` and `conf_dir`; returns the files removed
/// or changed.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if conf_dir.is_dir() {
        out.extend(conflist::remove(conf_dir)?);
    }
    for path in [
        conf_dir.join(KUBECONFIG_NAME),
        bin_dir.join(conflist::PLUGIN_TYPE),
    ] {
        match fs::remove_file(&path) {
            Ok(()) => out.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(out)
}

/// A kubeconfig with one cluster, one token user and one context.
fn kubeconfig_text(server: &str, ca: &[u8], token: &str) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: sluice-cni\n  user:\n    token: {token}\ncontexts:\n- name: sluice-cni\n  context:\n    cluster: local\n    user: sluice-cni\ncurrent-context: sluice-cni\n"
    )
}

/// Writes `bytes` to `to` atomically unless it already holds them with `mode`; true if written.
fn write_if_changed(to: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<bool> {
    if let Ok(meta) = fs::metadata(to)
        && meta.permissions().mode() & 0o777 == mode
        && meta.len() == bytes.len() as u64
        && fs::read(to).is_ok_and(|have| have == bytes)
    {
        return Ok(false);
    }
    conflist::write_atomically(to, bytes, mode)
        .with_context(|| format!("writing {}", to.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIMARY: &str =
        r#"{"cniVersion": "1.0.0", "name": "podnet", "plugins": [{"type": "bridge"}]}"#;

    fn setup(dir: &Path) -> InstallCni {
        let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(&conf).unwrap();
        fs::write(conf.join("10-podnet.conflist"), PRIMARY).unwrap();
        fs::write(dir.join("token"), "abc.def\n").unwrap();
        fs::write(dir.join("ca.crt"), "not checked here").unwrap();
        InstallCni {
            bin_dir: bin,
            conf_dir: conf,
            host_conf_dir: "/etc/cni/net.d".into(),
            server: "https://10.96.0.1:443".into(),
            token_file: dir.join("token"),
            ca_file: dir.join("ca.crt"),
            enrollment_socket: "/var/run/sluice/enroll.sock".into(),
            exclude_namespaces: vec!["kube-system".into(), "sluice-system".into()],
        }
    }

    use crate::redirect::conflist::tests::plugins as types;

    #[test]
    fn installs_the_plugin_a_kubeconfig_kube_can_read_and_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let install = setup(dir.path());
        let (bin, conf) = (install.bin_dir.clone(), install.conf_dir.clone());
        let done = install.run().unwrap();
        let primary = conf.join("10-podnet.conflist");
        assert_eq!(
            done.written,
            vec![
                bin.join("sluice"),
                conf.join(KUBECONFIG_NAME),
                primary.clone()
            ]
        );
        assert_eq!(types(&primary), ["bridge", "sluice"]);
        let v: Value = serde_json::from_str(&fs::read_to_string(&primary).unwrap()).unwrap();
        assert_eq!(
            v["plugins"][1]["kubeconfig"],
            "/etc/cni/net.d/sluice-kubeconfig"
        );
        assert_eq!(
            v["plugins"][1]["excludeNamespaces"],
            json!(["kube-system", "sluice-system"])
        );
        let mode = fs::metadata(bin.join("sluice"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        let path = conf.join(KUBECONFIG_NAME);
        let parsed = kube::config::Kubeconfig::read_from(&path).unwrap();
        assert_eq!(
            parsed.clusters[0]
                .cluster
                .as_ref()
                .unwrap()
                .server
                .as_deref(),
            Some("https://10.96.0.1:443")
        );
        assert!(
            fs::read_to_string(&path)
                .unwrap()
                .contains("token: abc.def\n")
        );
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A second pass writes nothing; a rotated token rewrites the kubeconfig only.
        assert_eq!(install.run().unwrap().written, Vec::<PathBuf>::new());
        fs::write(dir.path().join("token"), "ghi.jkl\n").unwrap();
        assert_eq!(install.run().unwrap().written, vec![path.clone()]);

        let plain = InstallCni {
            server: "http://x".into(),
            ..install
        };
        assert!(plain.run().unwrap_err().to_string().contains("https://"));
    }

    #[tokio::test]
    async fn watch_repairs_a_rewritten_conflist_and_uninstall_removes_everything() {
        let dir = tempfile::tempdir().unwrap();
        let install = setup(dir.path());
        let primary = install.conf_dir.join("10-podnet.conflist");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let watcher = {
            let install = install.clone();
            tokio::spawn(async move {
                install
                    .watch(Duration::from_millis(20), async {
                        let _ = stop_rx.await;
                    })
                    .await
            })
        };
        let until = |want: &'static [&'static str]| {
            let primary = primary.clone();
            async move {
                for _ in 0..250 {
                    if types(&primary) == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                panic!("conflist never became {want:?}: {:?}", types(&primary));
            }
        };
        until(&["bridge", "sluice"]).await;
        // The primary CNI rewrites its file without Sluice's entry.
        fs::write(&primary, PRIMARY).unwrap();
        until(&["bridge", "sluice"]).await;
        stop_tx.send(()).unwrap();
        watcher.await.unwrap();

        let removed = install.uninstall().unwrap();
        assert_eq!(types(&primary), ["bridge"]);
        assert_eq!(
            serde_json::from_str::<Value>(&fs::read_to_string(&primary).unwrap()).unwrap(),
            serde_json::from_str::<Value>(PRIMARY).unwrap()
        );
        assert!(!install.bin_dir.join("sluice").exists());
        assert!(!install.conf_dir.join(KUBECONFIG_NAME).exists());
        assert_eq!(removed.len(), 3, "{removed:?}");
        assert_eq!(install.uninstall().unwrap(), Vec::<PathBuf>::new());
    }
}

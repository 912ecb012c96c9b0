//! `sluice install-cni`: puts the CNI plugin on the node (the DaemonSet's init container).
//!
//! It copies this binary to `BIN_DIR/sluice` (write to a temporary name, then rename, so a
//! runtime never executes a half-written file) and writes `CONF_DIR/sluice-kubeconfig`, the
//! credential the plugin uses to look a pod up when the agent cannot be reached, from the
//! ServiceAccount token and CA the pod has mounted.
use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};

/// The name of the kubeconfig next to the node's conflist.
pub const KUBECONFIG_NAME: &str = "sluice-kubeconfig";

/// Where things come from and go to.
#[derive(Clone, Debug)]
pub struct InstallCni {
    /// The node's CNI binary directory (mounted; `/opt/cni/bin` on the host).
    pub bin_dir: PathBuf,
    /// The node's CNI configuration directory (mounted; `/etc/cni/net.d` on the host).
    pub conf_dir: PathBuf,
    /// The API server's URL; in a pod, from `KUBERNETES_SERVICE_HOST`/`_PORT`.
    pub server: String,
    /// The ServiceAccount token file.
    pub token_file: PathBuf,
    /// The API server's CA bundle.
    pub ca_file: PathBuf,
}

impl InstallCni {
    /// Copies the plugin and writes its kubeconfig; returns the paths written.
    pub fn run(&self) -> anyhow::Result<Vec<PathBuf>> {
        if !self.server.starts_with("https://") {
            bail!("--server {:?}: an https:// URL is needed", self.server);
        }
        let exe = std::env::current_exe().context("finding this binary")?;
        let plugin = self.bin_dir.join("sluice");
        copy_atomically(&exe, &plugin, 0o755)?;

        let token = fs::read_to_string(&self.token_file)
            .with_context(|| format!("reading the token {}", self.token_file.display()))?;
        let ca = fs::read(&self.ca_file)
            .with_context(|| format!("reading the CA {}", self.ca_file.display()))?;
        let kubeconfig = self.conf_dir.join(KUBECONFIG_NAME);
        write_atomically(
            &kubeconfig,
            kubeconfig_text(&self.server, &ca, token.trim()).as_bytes(),
            0o600,
        )?;
        Ok(vec![plugin, kubeconfig])
    }
}

/// A kubeconfig with one cluster, one token user and one context.
fn kubeconfig_text(server: &str, ca: &[u8], token: &str) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: sluice-cni\n  user:\n    token: {token}\ncontexts:\n- name: sluice-cni\n  context:\n    cluster: local\n    user: sluice-cni\ncurrent-context: sluice-cni\n"
    )
}

fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.sluice-tmp"))
}

fn copy_atomically(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    let tmp = temp_beside(to);
    fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", tmp.display()))?;
    fs::rename(&tmp, to).with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))
}

fn write_atomically(to: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = temp_beside(to);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, to).with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_the_plugin_and_a_kubeconfig_kube_can_read() {
        let dir = tempfile::tempdir().unwrap();
        let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(&conf).unwrap();
        fs::write(dir.path().join("token"), "abc.def\n").unwrap();
        fs::write(dir.path().join("ca.crt"), "not checked here").unwrap();
        let install = InstallCni {
            bin_dir: bin.clone(),
            conf_dir: conf.clone(),
            server: "https://10.96.0.1:443".into(),
            token_file: dir.path().join("token"),
            ca_file: dir.path().join("ca.crt"),
        };
        let written = install.run().unwrap();
        assert_eq!(written[0], bin.join("sluice"));
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
            parsed.auth_infos[0]
                .auth_info
                .as_ref()
                .unwrap()
                .token
                .is_some()
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

        let plain = InstallCni {
            server: "http://x".into(),
            ..install
        };
        assert!(plain.run().unwrap_err().to_string().contains("https://"));
    }
}

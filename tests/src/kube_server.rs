//! A real Kubernetes API server for tests: etcd + kube-apiserver 1.20 + kube-controller-manager,
//! run on loopback by `tests/apiserver/apiserver.sh` from binaries that `apiserver.sh install`
//! (or `cargo xtask setup`) built from Debian's source package.
//!
//! ```ignore
//! let server = KubeServer::start();          // ~5 s; panics if not root or not installed
//! let client = server.client().await;
//! server.stop_apiserver();                   // etcd keeps the data
//! server.start_apiserver();
//! drop(server);                              // stops everything, removes the temp dir
//! ```
//!
//! The admin user is in `system:masters` under RBAC authorization, so server-side apply of any
//! object (including RBAC manifests) works. Version 1.20 limits: no CEL validation, no streaming
//! lists, EndpointSlice only in `v1beta1`, no scheduler or kubelet (Pods never run).
//!
//! `start`, `stop_apiserver` and `start_apiserver` block for a few seconds: in async tests use a
//! multi-threaded runtime (`#[tokio::test(flavor = "multi_thread")]`) so that other tasks, such
//! as a watcher, keep running meanwhile.

use std::fs::{self, DirBuilder};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use kube::config::{KubeConfigOptions, Kubeconfig};

/// Ports handed to live servers of this process, so parallel tests never pick the same ones.
static PORTS_IN_USE: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// The apiserver port `p` also takes `p + 1` (etcd client) and `p + 2` (etcd peer).
const PORTS_PER_SERVER: u16 = 3;

/// A running etcd + kube-apiserver + kube-controller-manager in a private temp dir. Dropping it
/// stops all three and removes the dir, also when the test panicked.
pub struct KubeServer {
    dir: PathBuf,
    port: u16,
}

impl KubeServer {
    /// Starts a fresh server in `/tmp/sluice-kube-*` on free loopback ports and waits until its
    /// `/readyz` answers. Panics with the reason (not root, binaries missing, start failed).
    pub fn start() -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "KubeServer needs root (it runs etcd and kube-apiserver); run the tests as root"
        );
        let status = script()
            .arg("status")
            .output()
            .expect("running apiserver.sh status");
        assert!(
            status.status.success(),
            "the test kube-apiserver is not installed:\n{}{}",
            String::from_utf8_lossy(&status.stdout),
            String::from_utf8_lossy(&status.stderr)
        );

        let dir = make_temp_dir();
        let port = reserve_ports();
        // From here on, Drop cleans up whatever the script managed to start.
        let server = KubeServer { dir, port };
        server.run_script(&["start", path_str(&server.dir), &port.to_string()]);
        server
    }

    /// The kubeconfig of the admin user (token auth, the server's CA embedded).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// The private directory holding the kubeconfig, certificates, etcd data and logs
    /// (`etcd.log`, `kube-apiserver.log`, `kube-controller-manager.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The API server's URL, `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A client authenticated as the admin user (group `system:masters`).
    pub async fn client(&self) -> kube::Client {
        let path = self.kubeconfig_path();
        let kubeconfig = Kubeconfig::read_from(&path)
            .unwrap_or_else(|e| panic!("reading kubeconfig {}: {e}", path.display()));
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .unwrap_or_else(|e| panic!("loading kubeconfig {}: {e}", path.display()));
        kube::Client::try_from(config)
            .unwrap_or_else(|e| panic!("building a kube client for {}: {e}", self.url()))
    }

    /// Stops only kube-apiserver and waits for it to exit; etcd and its data stay.
    pub fn stop_apiserver(&self) {
        self.run_script(&["stop-apiserver", path_str(&self.dir)]);
    }

    /// Starts kube-apiserver again with the same flags and waits until it is ready.
    pub fn start_apiserver(&self) {
        self.run_script(&["start-apiserver", path_str(&self.dir)]);
    }

    /// Runs `apiserver.sh ARGS`; panics with its output (which ends with the failing process's
    /// log tail) when it fails.
    fn run_script(&self, args: &[&str]) {
        let out = script()
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running apiserver.sh {}: {e}", args.join(" ")));
        if !out.status.success() {
            panic!(
                "apiserver.sh {} failed ({}):\n{}",
                args.join(" "),
                out.status,
                output_text(&out)
            );
        }
    }
}

impl Drop for KubeServer {
    fn drop(&mut self) {
        // Never panic here: a panic during a test's unwinding would abort the whole test binary.
        if std::thread::panicking() {
            let log = self.dir.join("kube-apiserver.log");
            if let Ok(text) = fs::read_to_string(&log) {
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                eprintln!("--- last lines of {} ---\n{tail}", log.display());
            }
        }
        match script().args(["stop", path_str(&self.dir)]).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "KubeServer: apiserver.sh stop failed:\n{}",
                output_text(&out)
            ),
            Err(e) => eprintln!("KubeServer: running apiserver.sh stop: {e}"),
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("KubeServer: removing {}: {e}", self.dir.display());
        }
        PORTS_IN_USE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&p| p != self.port);
    }
}

fn script() -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/apiserver/apiserver.sh"
    ));
    cmd
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp dir paths are UTF-8")
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Creates `/tmp/sluice-kube-PID-NANOS` with mode 0700 (it holds keys and the admin token).
fn make_temp_dir() -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    let dir = PathBuf::from(format!("/tmp/sluice-kube-{}-{nanos}", std::process::id()));
    DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Finds a port `p` such that `p..p + PORTS_PER_SERVER` are all free on 127.0.0.1 now and not
/// held by another server of this process, and records it as taken.
fn reserve_ports() -> u16 {
    let mut taken = PORTS_IN_USE.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..100 {
        let base = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("binding a free port on 127.0.0.1")
            .port();
        let Some(last) = base.checked_add(PORTS_PER_SERVER - 1) else {
            continue;
        };
        let clashes = taken.iter().any(|&p| p.abs_diff(base) < PORTS_PER_SERVER);
        let all_free = (base..=last).all(|p| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok());
        if !clashes && all_free {
            taken.push(base);
            return base;
        }
    }
    panic!("found no {PORTS_PER_SERVER} consecutive free ports on 127.0.0.1 in 100 tries");
}

//! A real `sluice ca` process against a [`KubeServer`], running as the `sluice-ca`
//! ServiceAccount of `deploy/05-ca.yaml` (so the install's RBAC, not the admin's, is what it
//! may use), and tokens made the way the kubelet makes projected ones (TokenRequest bound to a
//! pod).
use std::{
    fs::File,
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::ServiceAccount,
};
use kube::{Api, Client, api::PostParams};

use crate::{agent::agent_bin, kube_server::KubeServer};

/// A running `sluice ca`; killed when dropped.
pub struct CaService {
    child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
    /// The mesh root certificate (PEM file) agents verify the CA with.
    pub root_cert: PathBuf,
}

impl CaService {
    /// Writes a fresh mesh root into `dir` and starts `sluice ca` on 127.0.0.1 with serving
    /// name `localhost`, as `system:serviceaccount:sluice-system:sluice-ca`; waits until it
    /// accepts connections. Panics with its log if it does not.
    pub fn start(server: &KubeServer, dir: &Path, trust_domain: &str) -> CaService {
        let root_cert = dir.join("root-cert.pem");
        let root_key = dir.join("root-key.pem");
        sluice::identity::BuiltinCa::generate(trust_domain)
            .expect("a mesh root")
            .write_pem_files(&root_cert, &root_key)
            .expect("writing the mesh root");
        Self::start_with_root(server, dir, trust_domain, &root_cert, &root_key)
    }

    /// As [`CaService::start`], signing under an existing mesh root (PEM files), such as a
    /// [`crate::world::World`]'s, so that its agents and the CA's clients share one root.
    pub fn start_with_root(
        server: &KubeServer,
        dir: &Path,
        trust_domain: &str,
        root_cert: &Path,
        root_key: &Path,
    ) -> CaService {
        let root_cert = root_cert.to_path_buf();
        let kubeconfig = dir.join("ca-kubeconfig");
        write_impersonating_kubeconfig(
            &server.kubeconfig_path(),
            &kubeconfig,
            "sluice-system",
            "sluice-ca",
        );
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = dir.join("ca.log");
        let out = File::create(&log).expect("ca log");
        let child = Command::new(agent_bin())
            .arg("ca")
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg(format!("--root-cert-file={}", root_cert.display()))
            .arg(format!("--root-key-file={}", root_key.display()))
            .arg(format!("--trust-domain={trust_domain}"))
            .arg("--serving-name=localhost")
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .env("SLUICE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("starting sluice ca");
        let mut ca = CaService {
            child: Some(child),
            port,
            log,
            root_cert,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            if let Some(child) = ca.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("sluice ca exited ({status}):\n{}", ca.tail());
            }
            assert!(
                Instant::now() < deadline,
                "sluice ca did not listen on 127.0.0.1:{port} within 20 s:\n{}",
                ca.tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        ca
    }

    /// The last lines of its log.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for CaService {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- sluice ca log ---\n{}", self.tail());
        }
    }
}

/// A copy of the kubeconfig at `from` that impersonates ServiceAccount `namespace/name`.
fn write_impersonating_kubeconfig(from: &Path, to: &Path, namespace: &str, name: &str) {
    let text = std::fs::read_to_string(from).expect("admin kubeconfig");
    let mut config: serde_yaml::Value = serde_yaml::from_str(&text).expect("kubeconfig YAML");
    let users = config["users"].as_sequence_mut().expect("kubeconfig users");
    for user in users {
        let u = &mut user["user"];
        u["as"] = format!("system:serviceaccount:{namespace}:{name}").into();
        u["as-groups"] = serde_yaml::Value::Sequence(vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{namespace}").into(),
            "system:authenticated".into(),
        ]);
    }
    std::fs::write(to, serde_yaml::to_string(&config).expect("kubeconfig text"))
        .expect("writing kubeconfig");
}

/// A token for ServiceAccount `namespace/service_account`, bound to pod `pod` (name, uid) and
/// issued for `audience`: what the kubelet projects into the pod.
pub async fn pod_token(
    client: &Client,
    namespace: &str,
    service_account: &str,
    pod: (&str, &str),
    audience: &str,
) -> String {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.0.to_owned()),
                uid: Some(pod.1.to_owned()),
            }),
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(service_account, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {namespace}/{service_account}: {e}"))
        .status
        .map(|s| s.token)
        .unwrap_or_else(|| panic!("TokenRequest for {namespace}/{service_account}: no status"))
}

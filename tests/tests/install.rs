//! Installing Sluice the way README says: `kubectl apply -f deploy/` against a real API server.
use std::process::Command;

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::ConfigMap};
use kube::Api;
use sluice_tests::{kube_mesh::deploy_dir_for_1_20, kube_server::KubeServer};

/// One `kubectl apply -f deploy/` on a fresh cluster creates every object: kubectl applies a
/// directory's files in name order, so the namespace must sort first (it did not, and the
/// ConfigMap and DaemonSet were refused on the first apply).
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_apply_of_deploy_creates_everything_in_one_go() {
    let server = tokio::task::block_in_place(KubeServer::start);
    // The DaemonSet rolls without surge here: the 1.20 API server predates DaemonSet maxSurge.
    let deploy = deploy_dir_for_1_20();
    let out = Command::new("kubectl")
        .env("KUBECONFIG", server.kubeconfig_path())
        .arg("apply")
        .arg("-f")
        .arg(deploy.path())
        .output()
        .expect("kubectl (package kubernetes-client; `cargo xtask setup` installs it)");
    assert!(
        out.status.success(),
        "kubectl apply -f deploy/ failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let client = server.client().await;
    let ds = Api::<DaemonSet>::namespaced(client.clone(), "sluice-system")
        .get("sluice")
        .await
        .expect("the DaemonSet");
    let mounts: Vec<String> = ds
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.volumes)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| v.secret.and_then(|s| s.secret_name))
        .collect();
    assert_eq!(
        mounts,
        ["sluice-root-ca"],
        "the DaemonSet mounts the shared root"
    );
    Api::<ConfigMap>::namespaced(client, "sluice-system")
        .get("sluice-config")
        .await
        .expect("the agent's ConfigMap");
}

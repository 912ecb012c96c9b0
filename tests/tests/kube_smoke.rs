//! Smoke test of the test kube-apiserver: namespace and CRD by server-side apply, a watcher that
//! survives the API server going away and coming back, etcd data kept across that, namespace
//! deletion by the controller-manager, and a clean stop. Needs root and
//! `tests/apiserver/apiserver.sh install`.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::utils::Backoff;
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{CustomResource, CustomResourceExt, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sluice_tests::kube_server::KubeServer;
use tokio::sync::mpsc;
use tokio::time::timeout;

const NS: &str = "kube-smoke";
const MANAGER: &str = "sluice-kube-smoke";

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "smoke.sluice.dev",
    version = "v1",
    kind = "Widget",
    namespaced
)]
struct WidgetSpec {
    size: u32,
}

/// Watch retry delay: a fixed 0.5 s. The default backoff grows to ~13 s over the outage below,
/// which would only slow this test down.
struct EveryHalfSecond;

impl Iterator for EveryHalfSecond {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(Duration::from_millis(500))
    }
}

impl Backoff for EveryHalfSecond {
    fn reset(&mut self) {}
}

fn apply() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

/// Applies a Widget named `name` in NS.
async fn apply_widget(widgets: &Api<Widget>, name: &str, size: u32) {
    let widget = json!({
        "apiVersion": "smoke.sluice.dev/v1",
        "kind": "Widget",
        "metadata": { "name": name },
        "spec": { "size": size },
    });
    widgets
        .patch(name, &apply(), &Patch::Apply(&widget))
        .await
        .unwrap_or_else(|e| panic!("applying widget {name}: {e}"));
}

/// Receives watched Widget names until `name` shows up with `size`, or panics after 30 s.
async fn expect_widget(events: &mut mpsc::UnboundedReceiver<(String, u32)>, name: &str, size: u32) {
    let wanted = (name.to_string(), size);
    timeout(Duration::from_secs(30), async {
        while let Some(seen) = events.recv().await {
            if seen == wanted {
                return;
            }
        }
        panic!("watcher stream ended before widget {name} showed up");
    })
    .await
    .unwrap_or_else(|_| panic!("widget {name} (size {size}) not seen by the watcher within 30 s"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_apiserver_smoke() {
    let server = KubeServer::start();
    let client = server.client().await;

    let version = client.apiserver_version().await.expect("GET /version");
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "20"),
        "{version:?}"
    );

    // Namespace and CRD by server-side apply.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": NS } });
    let ns_uid = namespaces
        .patch(NS, &apply(), &Patch::Apply(&ns))
        .await
        .expect("applying the namespace")
        .uid()
        .expect("namespace uid");

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd_name = Widget::crd_name();
    crds.patch(crd_name, &apply(), &Patch::Apply(Widget::crd()))
        .await
        .expect("applying the Widget CRD");
    timeout(
        Duration::from_secs(30),
        await_condition(crds, crd_name, conditions::is_crd_established()),
    )
    .await
    .expect("CRD not Established within 30 s")
    .expect("waiting for the CRD to be Established");

    // A watcher that rides out the outage below, forwarding (name, size) of applied Widgets.
    let widgets: Api<Widget> = Api::namespaced(client.clone(), NS);
    let (tx, mut events) = mpsc::unbounded_channel();
    let watch = tokio::spawn(
        watcher(widgets.clone(), watcher::Config::default())
            .backoff(EveryHalfSecond)
            .applied_objects()
            .for_each(move |item| {
                if let Ok(widget) = item {
                    let _ = tx.send((widget.name_any(), widget.spec.size));
                }
                async {}
            }),
    );

    apply_widget(&widgets, "before", 1).await;
    expect_widget(&mut events, "before", 1).await;

    // Take the API server away, then bring it back: etcd keeps the data and the watcher resumes.
    // (A restarted apiserver's watch cache has no history, so the watcher's re-watch gets
    // 410 Expired and it relists; for custom resources that answer takes ~10 s to come.)
    tokio::task::block_in_place(|| server.stop_apiserver());
    assert!(
        namespaces.get(NS).await.is_err(),
        "API server still answering after stop_apiserver"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| server.start_apiserver());

    let before = widgets
        .get("before")
        .await
        .expect("widget 'before' after the restart");
    assert_eq!(before.spec.size, 1);
    apply_widget(&widgets, "after", 2).await;
    expect_widget(&mut events, "after", 2).await;
    watch.abort();

    // The controller-manager's namespace controller finishes the deletion (it empties the
    // namespace of Widgets first).
    namespaces
        .delete(NS, &Default::default())
        .await
        .expect("deleting the namespace");
    timeout(
        Duration::from_secs(60),
        await_condition(namespaces, NS, conditions::is_deleted(&ns_uid)),
    )
    .await
    .expect("namespace not deleted within 60 s (is kube-controller-manager running?)")
    .expect("waiting for the namespace deletion");

    // Dropping the server stops every process and removes its directory.
    let dir = server.dir().to_path_buf();
    let pids: Vec<String> = ["etcd", "kube-apiserver", "kube-controller-manager"]
        .iter()
        .map(|name| std::fs::read_to_string(dir.join(format!("{name}.pid"))).expect("pid file"))
        .map(|pid| pid.trim().to_string())
        .collect();
    drop(server);
    assert!(!dir.exists(), "{} left behind", dir.display());
    for pid in pids {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains(") Z "),
            "pid {pid} still running: {state}"
        );
    }
}

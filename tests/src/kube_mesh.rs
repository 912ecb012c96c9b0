//! Helpers for the kube source tests: server-side apply of arbitrary YAML, Sluice's CRDs from
//! `deploy/crds`, an in-process kube source and waiting on its MeshState.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Client,
    api::{Api, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams},
    discovery::{self, Scope},
    runtime::wait::{await_condition, conditions},
};
use serde::Deserialize;
use sluice::{
    resources::ResourceSet,
    sources::kube::{KubeSource, SourceOptions},
    state::{self, MeshSettings, MeshState, Snapshot, StateHandle},
};

/// Field manager of everything the tests apply.
pub const TEST_MANAGER: &str = "sluice-test";

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("deploy")
}

/// The DaemonSet's rollout as the tests' 1.20 API server can take it: DaemonSet `maxSurge`
/// came in 1.21 (alpha; GA in 1.25), and 1.20 refuses the field (kubectl's validation and
/// server-side apply alike). README's strategy for clusters without surge instead:
/// `{maxUnavailable: 1}`.
pub const ROLLOUT_WITH_SURGE: &str = "maxSurge: 1\n      maxUnavailable: 0";
/// See [`ROLLOUT_WITH_SURGE`].
pub const ROLLOUT_WITHOUT_SURGE: &str = "maxUnavailable: 1";

/// `deploy/` copied into a temporary directory with the DaemonSets' rollout as a 1.20 API server
/// takes it (see [`ROLLOUT_WITH_SURGE`]); panics unless that is the only change, once per
/// DaemonSet.
pub fn deploy_dir_for_1_20() -> tempfile::TempDir {
    fn copy(src: &Path, dst: &Path, replaced: &mut usize) {
        for e in std::fs::read_dir(src)
            .expect("read deploy/")
            .filter_map(Result::ok)
        {
            let to = dst.join(e.file_name());
            if e.path().is_dir() {
                std::fs::create_dir_all(&to).expect("mkdir");
                copy(&e.path(), &to, replaced);
            } else {
                let text = std::fs::read_to_string(e.path()).expect("read");
                *replaced += text.matches(ROLLOUT_WITH_SURGE).count();
                let text = text.replace(ROLLOUT_WITH_SURGE, ROLLOUT_WITHOUT_SURGE);
                std::fs::write(&to, text).expect("write");
            }
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut replaced = 0;
    copy(&deploy_dir(), dir.path(), &mut replaced);
    // One per DaemonSet (the node agent's, and the egress gateway role's).
    let daemonsets: usize = std::fs::read_dir(deploy_dir())
        .expect("read deploy/")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|t| {
            documents(&t)
                .iter()
                .filter(|d| d["kind"] == "DaemonSet")
                .count()
        })
        .sum();
    assert!(daemonsets >= 1, "deploy/ has no DaemonSet");
    assert_eq!(
        replaced, daemonsets,
        "deploy/ should roll each DaemonSet with {ROLLOUT_WITH_SURGE:?}"
    );
    dir
}

/// Splits a YAML stream into JSON documents (empty documents skipped).
pub fn documents(yaml: &str) -> Vec<serde_json::Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde_json::Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn gvk_of(doc: &serde_json::Value) -> GroupVersionKind {
    let api_version = doc["apiVersion"].as_str().expect("apiVersion");
    let kind = doc["kind"].as_str().expect("kind");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    GroupVersionKind::gvk(group, version, kind)
}

/// The API for `doc`'s kind (in `doc`'s namespace, or `default`, when namespaced).
pub async fn api_for(client: &Client, doc: &serde_json::Value) -> Api<DynamicObject> {
    let gvk = gvk_of(doc);
    let (ar, caps) = discovery::pinned_kind(client, &gvk)
        .await
        .unwrap_or_else(|e| panic!("discovering {gvk:?}: {e}"));
    match caps.scope {
        Scope::Cluster => Api::all_with(client.clone(), &ar),
        Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            doc["metadata"]["namespace"].as_str().unwrap_or("default"),
            &ar,
        ),
    }
}

fn name_of(doc: &serde_json::Value) -> String {
    doc["metadata"]["name"]
        .as_str()
        .expect("metadata.name")
        .to_owned()
}

/// Server-side applies one document (and, if it has a `status`, applies that to the status
/// subresource too, as a kubelet or controller would).
pub async fn apply(client: &Client, doc: &serde_json::Value) -> DynamicObject {
    try_apply(client, doc, false)
        .await
        .unwrap_or_else(|e| panic!("applying {} {}: {e}", doc["kind"], name_of(doc)))
}

/// Server-side applies one document, returning the API error; with `dry_run` nothing is stored.
pub async fn try_apply(
    client: &Client,
    doc: &serde_json::Value,
    dry_run: bool,
) -> Result<DynamicObject, kube::Error> {
    let api = api_for(client, doc).await;
    let name = name_of(doc);
    let mut params = PatchParams::apply(TEST_MANAGER).force();
    params.dry_run = dry_run;
    let obj = api.patch(&name, &params, &Patch::Apply(doc)).await?;
    if doc.get("status").is_some() && !dry_run {
        return api.patch_status(&name, &params, &Patch::Apply(doc)).await;
    }
    Ok(obj)
}

/// Applies every document of a YAML stream, in order.
pub async fn apply_yaml(client: &Client, yaml: &str) {
    for doc in documents(yaml) {
        apply(client, &doc).await;
    }
}

/// Deletes the object `doc` names, at once (grace period 0: there is no kubelet to finish a
/// pod's graceful deletion).
pub async fn delete(client: &Client, doc: &serde_json::Value) {
    let api = api_for(client, doc).await;
    api.delete(&name_of(doc), &DeleteParams::default().grace_period(0))
        .await
        .unwrap_or_else(|e| panic!("deleting {} {}: {e}", doc["kind"], name_of(doc)));
}

/// Applies every CRD in `deploy/crds` and waits until each is Established.
pub async fn install_crds(client: &Client) {
    let dir = deploy_dir().join("crds");
    let mut names = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        let text = std::fs::read_to_string(&path).expect("read CRD");
        for doc in documents(&text) {
            names.push(name_of(&doc));
            apply(client, &doc).await;
        }
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in names {
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .unwrap_or_else(|_| panic!("CRD {name} not Established within 30 s"))
        .expect("waiting for a CRD");
    }
}

/// An in-process kube source and the state it publishes.
pub struct Mesh {
    pub state: StateHandle,
    pub source: KubeSource,
}

impl Mesh {
    /// Starts a kube source with `settings` and waits (up to 60 s) for its first state.
    pub async fn start(client: &Client, settings: MeshSettings) -> Mesh {
        let (publisher, state) = state::channel();
        let source = KubeSource::start(
            client,
            SourceOptions {
                settings,
                extra: ResourceSet::default(),
                debounce: Duration::from_millis(10),
            },
            publisher,
        );
        tokio::time::timeout(Duration::from_secs(60), source.synced())
            .await
            .expect("kube source not synced within 60 s");
        Mesh { state, source }
    }

    /// Waits until `pred` holds for the published state; returns it and how long that took.
    /// Panics after `timeout` with `what` and the last state's JSON.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&MeshState) -> bool,
    ) -> (Snapshot, Duration) {
        wait_for(&mut self.state, timeout, what, pred).await
    }
}

/// See [`Mesh::wait_for`].
pub async fn wait_for(
    state: &mut StateHandle,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&MeshState) -> bool,
) -> (Snapshot, Duration) {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let snap = state.current();
        if pred(&snap) {
            return (snap, start.elapsed());
        }
        match tokio::time::timeout_at(deadline, state.changed()).await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("state channel closed while waiting for {what}"),
            Err(_) => panic!(
                "timed out after {timeout:?} waiting for {what}; last state:\n{}",
                serde_json::to_string_pretty(&*snap).unwrap_or_default()
            ),
        }
    }
}

/// Whether the state's JSON mentions the object `namespace/name`: as a `{namespace, name}` pair
/// anywhere, or as the string (or map key) `namespace/name`.
pub fn mentions(state: &MeshState, namespace: &str, name: &str) -> bool {
    fn walk(v: &serde_json::Value, ns: &str, name: &str, joined: &str) -> bool {
        match v {
            serde_json::Value::Object(m) => {
                if m.get("namespace").and_then(|x| x.as_str()) == Some(ns)
                    && m.get("name").and_then(|x| x.as_str()) == Some(name)
                {
                    return true;
                }
                m.iter()
                    .any(|(k, x)| k == joined || walk(x, ns, name, joined))
            }
            serde_json::Value::Array(a) => a.iter().any(|x| walk(x, ns, name, joined)),
            serde_json::Value::String(s) => s == joined,
            _ => false,
        }
    }
    let v = serde_json::to_value(state).expect("state serialises");
    let joined = sluice::resources::NamespacedName::new(namespace, name).key();
    walk(&v, namespace, name, &joined)
}

/// The part of the state's JSON under `path` (JSON pointer), for assertions on shapes.
pub fn json_at(state: &MeshState, pointer: &str) -> serde_json::Value {
    serde_json::to_value(state)
        .expect("state serialises")
        .pointer(pointer)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// Makes `127.0.0.1:port` inside the network namespace `/run/netns/NETNS` reach the API server
/// on the host's `127.0.0.1:port`, so that an agent running in a node namespace can use the same
/// kubeconfig. The listener lives as long as the returned task (abort it, or end the runtime).
pub async fn bridge_into_netns(netns: &str, port: u16) -> tokio::task::JoinHandle<()> {
    let path = Path::new("/run/netns").join(netns);
    let listener = std::thread::spawn(move || {
        use nix::sched::{CloneFlags, setns};
        let here = std::fs::File::open("/proc/thread-self/ns/net").expect("own netns");
        let there = std::fs::File::open(&path).expect("node netns");
        setns(&there, CloneFlags::CLONE_NEWNET).expect("entering the node netns");
        let l = std::net::TcpListener::bind(("127.0.0.1", port));
        setns(&here, CloneFlags::CLONE_NEWNET).expect("returning home");
        l
    })
    .join()
    .expect("bridge thread")
    .expect("binding the bridge listener in the node netns");
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    tokio::spawn(async move {
        while let Ok((mut inside, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outside) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inside, &mut outside).await;
                }
            });
        }
    })
}

/// Polls `GET` of the object `doc` names until `pred` holds for its JSON; panics after `timeout`
/// with the last JSON seen.
pub async fn wait_object(
    client: &Client,
    doc: &serde_json::Value,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let api = api_for(client, doc).await;
    let name = name_of(doc);
    let deadline = Instant::now() + timeout;
    loop {
        let last = match api.get(&name).await {
            Ok(obj) => serde_json::to_value(&obj).expect("object serialises"),
            Err(e) => serde_json::json!({"error": e.to_string()}),
        };
        if pred(&last) {
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last:\n{}",
            serde_json::to_string_pretty(&last).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The condition of `type_` in the list at `pointer` (e.g. `/status/conditions`), as
/// `(status, reason, message)`.
pub fn condition(
    obj: &serde_json::Value,
    pointer: &str,
    type_: &str,
) -> Option<(String, String, String)> {
    let c = obj
        .pointer(pointer)?
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)?;
    let s = |k: &str| c[k].as_str().unwrap_or("").to_owned();
    Some((s("status"), s("reason"), s("message")))
}

/// A client for the same server, impersonating the ServiceAccount `namespace/name` (so the RBAC
/// rules it is bound to, not the admin's, decide what it may do).
pub async fn client_as_service_account(
    server: &crate::kube_server::KubeServer,
    namespace: &str,
    name: &str,
) -> Client {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let kubeconfig = Kubeconfig::read_from(server.kubeconfig_path()).expect("kubeconfig");
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("kube config");
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{namespace}:{name}"));
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{namespace}"),
        "system:authenticated".into(),
    ]);
    Client::try_from(config).expect("impersonating client")
}

//! The cluster box: real Kubernetes parts around real agents, installed the way a user installs.
//!
//! - **Control plane**: etcd, kube-apiserver and kube-controller-manager ([`KubeServer`]); the
//!   controller-manager runs the endpoint, EndpointSlice, namespace, service-account, token and
//!   garbage-collector controllers (not node lifecycle: the box's nodes post no heartbeats).
//! - **Nodes**: the network namespaces of a [`World`], each with a real **kube-proxy** (iptables
//!   mode) and a Node object.
//! - **Kubelet**: [`Kubelet`], a thread of this harness. For every Pod bound to one of the box's
//!   nodes it makes a network namespace and a cgroup, runs the **real CNI plugins** (`ptp`,
//!   `host-local`, `loopback` from Debian's `containernetworking-plugins`) through the node's
//!   conflist with `sluice` chained after them, by the CNI exec protocol, then reports the
//!   pod `Running` and `Ready` with its address. A refused ADD is torn down and retried, as a
//!   kubelet does; a deleted Pod gets CNI DEL and its sandbox removed. Pods run no containers:
//!   a test starts processes in them ([`Cluster::serve`], [`Cluster::connect`]).
//! - **Agents**: one per node in kube mode, from the `deploy/` DaemonSet whose node selection
//!   takes the node (`04-daemonset.yaml`, or `06-egress-gateway.yaml` on nodes labelled
//!   `sluice.dev/egress-gateway=true`): the ConfigMap it mounts, its environment, its
//!   ServiceAccount's token, and the mesh root from the `sluice-root-ca` Secret made by
//!   `sluice root-secret`. Each runs in a mount namespace of its own with the `/etc/resolv.conf`
//!   the kubelet would write (the box's DNS: the simulated internet's server, once
//!   [`Cluster::add_internet`] adds one). Host paths differ per node (every node of the box
//!   shares one kernel and file system): see [`NODE_MOUNTS`]; and the agents sign with the
//!   built-in CA rather than ask the CA service (see `builtin_ca_instead_of_the_ca_service`).
//!
//! Everything is removed when the box drops, also after a panic.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Pod as KubePod, Secret, ServiceAccount};
use kube::{
    Client,
    api::{Api, DeleteParams, ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};

use crate::{
    agent::{Agent, agent_bin},
    kube_mesh::{apply, apply_yaml, bridge_into_netns, deploy_dir, documents, install_crds},
    kube_server::KubeServer,
    world::{self, Pod, World},
};

/// Where Debian's `containernetworking-plugins` puts the plugins.
pub const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";
/// Pod addresses of node `i` come from `10.0.i.0/24`, as in hand-made worlds.
fn pod_subnet(i: usize) -> String {
    format!("10.0.{i}.0/24")
}

/// The DaemonSet's host paths, and where each node of the box keeps its own copy (relative to
/// the node's directory, or a world path). Every other part of the agent's configuration is
/// `deploy/`'s, unchanged.
pub const NODE_MOUNTS: &[(&str, &str)] = &[
    ("/etc/sluice/ca", "<node>/ca"),
    ("/var/run/sluice", "<node>"),
    ("/sys/fs/bpf/sluice", "<pins>"),
    ("/sys/fs/cgroup", "<cgroup>"),
];

/// A running box. Dropping it stops the kubelet and kube-proxies, removes every pod sandbox,
/// then the nodes (agents, namespaces, cgroups, pins) and the control plane.
pub struct Cluster {
    kubelet: Option<Kubelet>,
    proxies: Vec<Child>,
    /// The API server's loopback port made reachable inside each node (a host-network pod
    /// reaches it through the node's own network).
    bridges: Vec<tokio::task::JoinHandle<()>>,
    pub world: World,
    pub server: KubeServer,
    /// The admin client.
    pub client: Client,
    /// The sluice ServiceAccount's token (the agents' and the CNI plugin's credential).
    sa_token: String,
    /// Tokens of the agents' ServiceAccounts (`sluice`, `sluice-egress-gateway`) by name.
    agent_tokens: BTreeMap<String, String>,
    /// Each node's labels, as its Node object has them (index `i - 1`).
    node_labels: Vec<BTreeMap<String, String>>,
    /// The box's DNS server (what the kubelet writes into a pod's `resolv.conf`), if any.
    dns: Option<std::net::Ipv4Addr>,
}

/// The `deploy/` files the box applies, in order (DaemonSets and Deployments left out: the box
/// runs their pods itself).
const DEPLOY_FILES: &[&str] = &[
    "00-namespace.yaml",
    "01-serviceaccount.yaml",
    "02-rbac.yaml",
    "03-configmap.yaml",
    "06-egress-gateway.yaml",
];

/// The agent DaemonSets of `deploy/`.
const AGENT_DAEMONSETS: &[&str] = &["04-daemonset.yaml", "06-egress-gateway.yaml"];

/// An agent DaemonSet of `deploy/`, as a node's agent is run from it.
#[derive(Clone, Debug)]
pub struct AgentDaemonSet {
    pub name: String,
    pub service_account: String,
    /// Its pod template's `spec` (node selection).
    pod_spec: Value,
    /// `config.yaml` of the ConfigMap it mounts.
    pub config: String,
}

/// Every agent DaemonSet of `deploy/` with its ConfigMap's agent config.
pub fn agent_daemonsets() -> Vec<AgentDaemonSet> {
    let docs: Vec<Value> = std::fs::read_dir(deploy_dir())
        .expect("deploy/")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .flat_map(|p| documents(&std::fs::read_to_string(&p).expect("deploy file")))
        .collect();
    let mut out = Vec::new();
    for file in AGENT_DAEMONSETS {
        let text = std::fs::read_to_string(deploy_dir().join(file)).expect("deploy file");
        for ds in documents(&text)
            .into_iter()
            .filter(|d| d["kind"] == "DaemonSet")
        {
            let spec = ds["spec"]["template"]["spec"].clone();
            let config_map = spec["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == "config")
                .and_then(|v| v["configMap"]["name"].as_str())
                .unwrap_or_else(|| panic!("{file}: DaemonSet mounts no `config` ConfigMap"))
                .to_owned();
            let config = docs
                .iter()
                .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == config_map.as_str())
                .and_then(|d| d["data"]["config.yaml"].as_str())
                .unwrap_or_else(|| panic!("no ConfigMap {config_map} with config.yaml in deploy/"))
                .to_owned();
            out.push(AgentDaemonSet {
                name: ds["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                service_account: spec["serviceAccountName"]
                    .as_str()
                    .unwrap_or("default")
                    .to_owned(),
                pod_spec: spec,
                config,
            });
        }
    }
    out
}

impl AgentDaemonSet {
    /// Whether the scheduler would place this DaemonSet's pod on a node with `labels`
    /// (`nodeSelector`, and `requiredDuringScheduling` node affinity's `matchExpressions`).
    pub fn runs_on(&self, labels: &BTreeMap<String, String>) -> bool {
        let selector_ok = self.pod_spec["nodeSelector"]
            .as_object()
            .into_iter()
            .flatten()
            .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str());
        let terms = self.pod_spec["affinity"]["nodeAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let term_ok = |term: &Value| {
            term["matchExpressions"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|e| {
                    let key = e["key"].as_str().unwrap_or_default();
                    let values: Vec<&str> = e["values"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    let have = labels.get(key).map(String::as_str);
                    match e["operator"].as_str() {
                        Some("In") => have.is_some_and(|h| values.contains(&h)),
                        Some("NotIn") => !have.is_some_and(|h| values.contains(&h)),
                        Some("Exists") => have.is_some(),
                        Some("DoesNotExist") => have.is_none(),
                        other => panic!("node affinity operator {other:?} not handled by the box"),
                    }
                })
        };
        selector_ok && (terms.is_empty() || terms.iter().any(term_ok))
    }
}

impl Cluster {
    /// Starts the control plane, installs `deploy/` (namespace, ServiceAccount, RBAC,
    /// ConfigMap, CRDs) and the mesh root Secret, and brings up `nodes` nodes with kube-proxy
    /// and the kubelet. Agents are started by [`Cluster::start_agents`].
    pub async fn up(nodes: usize) -> Cluster {
        require_box_tools();
        let world = tokio::task::block_in_place(|| World::build(nodes, &[]));
        let server = tokio::task::block_in_place(KubeServer::start);
        let client = server.client().await;

        install_crds(&client).await;
        for file in DEPLOY_FILES {
            let path = deploy_dir().join(file);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            for doc in documents(&text)
                .into_iter()
                .filter(|d| d["kind"] != "DaemonSet" && d["kind"] != "Deployment")
            {
                apply(&client, &doc).await;
            }
        }
        // The install step a user runs once: `sluice root-secret | kubectl apply -f -`.
        let out = Command::new(agent_bin())
            .arg("root-secret")
            .output()
            .expect("running sluice root-secret");
        assert!(
            out.status.success(),
            "sluice root-secret: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        apply_yaml(&client, &String::from_utf8_lossy(&out.stdout)).await;
        let sa_token = service_account_token(&client, "sluice-system", "sluice").await;
        let mut agent_tokens = BTreeMap::new();
        for ds in agent_daemonsets() {
            let token = service_account_token(&client, "sluice-system", &ds.service_account).await;
            agent_tokens.insert(ds.service_account, token);
        }
        let node_labels: Vec<BTreeMap<String, String>> = (1..=nodes)
            .map(|i| {
                [
                    ("kubernetes.io/hostname".to_owned(), node_name(i)),
                    ("kubernetes.io/os".to_owned(), "linux".to_owned()),
                ]
                .into_iter()
                .collect()
            })
            .collect();

        for i in 1..=nodes {
            let node = json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": node_name(i), "labels": node_labels[i - 1]},
                "status": {
                    "addresses": [{"type": "InternalIP", "address": node_ip(nodes, i).to_string()},
                                  {"type": "Hostname", "address": node_name(i)}],
                    "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "the box's kubelet"}],
                },
            });
            apply(&client, &node).await;
        }

        let port: u16 = server
            .url()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("API server port");
        let mut bridges = Vec::new();
        for i in 1..=nodes {
            bridges.push(bridge_into_netns(&world.node_netns(i), port).await);
        }
        let mut cluster = Cluster {
            kubelet: None,
            proxies: Vec::new(),
            bridges,
            world,
            server,
            client,
            sa_token,
            agent_tokens,
            node_labels,
            dns: None,
        };
        for i in 1..=nodes {
            cluster.write_node_files(i);
            let proxy = cluster.start_kube_proxy(i);
            cluster.proxies.push(proxy);
        }
        cluster.kubelet = Some(Kubelet::start(&cluster));
        cluster
    }

    /// Node `i`'s directory (its host paths, see [`NODE_MOUNTS`]).
    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.world.dir.path().join(format!("node{i}"))
    }

    /// Node `i`'s CNI configuration directory (`/etc/cni/net.d` on a real node).
    pub fn cni_conf_dir(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("net.d")
    }

    /// The box's kubeconfig for the admin user (for `kubectl`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.server.kubeconfig_path()
    }

    /// Writes node `i`'s CNI conflist and runs `sluice install-cni` for it, as the DaemonSet's
    /// init container does (with the sluice ServiceAccount's token).
    fn write_node_files(&self, i: usize) {
        let dir = self.node_dir(i);
        std::fs::create_dir_all(dir.join("ca")).expect("node dir");
        std::fs::create_dir_all(self.cni_conf_dir(i)).expect("net.d");
        // What the kubelet mounts into the DaemonSet's pods: the ServiceAccount token and CA.
        let sa = dir.join("serviceaccount");
        std::fs::create_dir_all(&sa).expect("serviceaccount dir");
        std::fs::write(sa.join("token"), &self.sa_token).expect("token");
        std::fs::copy(self.server.dir().join("certs/ca.crt"), sa.join("ca.crt")).expect("ca.crt");

        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": "box",
            "plugins": [
                {
                    "type": "ptp",
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": pod_subnet(i)}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": dir.join("ipam").to_string_lossy(),
                    },
                },
                self.sluice_cni_entry(i),
            ],
        });
        std::fs::write(
            self.cni_conf_dir(i).join("10-box.conflist"),
            serde_json::to_string_pretty(&conflist).expect("json"),
        )
        .expect("conflist");
        // The CNI binary directory: the primary network's plugins (Debian's), then what the
        // DaemonSet's install-cni step adds: `sluice` and its kubeconfig.
        let bin = dir.join("cni-bin");
        std::fs::create_dir_all(&bin).expect("cni bin");
        for plugin in ["ptp", "host-local", "loopback"] {
            let _ = std::fs::remove_file(bin.join(plugin));
            std::os::unix::fs::symlink(Path::new(CNI_PLUGIN_DIR).join(plugin), bin.join(plugin))
                .expect("plugin link");
        }
        let out = Command::new(agent_bin())
            .arg("install-cni")
            .arg("--bin-dir")
            .arg(&bin)
            .arg("--conf-dir")
            .arg(self.cni_conf_dir(i))
            .arg("--server")
            .arg(self.server.url())
            .arg("--enrollment-socket")
            .arg(self.node_dir(i).join("enroll.sock"))
            .arg("--token-file")
            .arg(sa.join("token"))
            .arg("--ca-file")
            .arg(sa.join("ca.crt"))
            .output()
            .expect("running sluice install-cni");
        assert!(
            out.status.success(),
            "sluice install-cni: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `deploy/cni/sluice-plugin.json` with node `i`'s paths.
    fn sluice_cni_entry(&self, i: usize) -> Value {
        let path = deploy_dir().join("cni/sluice-plugin.json");
        let text = std::fs::read_to_string(&path).expect("sluice-plugin.json");
        serde_json::from_str(&self.node_paths(i, &text)).expect("sluice-plugin.json is JSON")
    }

    /// `text` with the DaemonSet's host paths replaced by node `i`'s.
    fn node_paths(&self, i: usize, text: &str) -> String {
        let node = self.node_dir(i);
        let mut out = text.to_owned();
        for (from, to) in NODE_MOUNTS {
            let to = to
                .replace("<node>", &node.to_string_lossy())
                .replace("<pins>", &self.world.pin_dir(i).to_string_lossy())
                .replace("<cgroup>", &self.world.node_cgroup(i).to_string_lossy());
            out = out.replace(from, &to);
        }
        out.replace("/etc/cni/net.d", &self.cni_conf_dir(i).to_string_lossy())
    }

    /// Starts every node's agent.
    pub async fn start_agents(&mut self) {
        let root_secret: Api<Secret> = Api::namespaced(self.client.clone(), "sluice-system");
        let secret = root_secret
            .get("sluice-root-ca")
            .await
            .expect("the sluice-root-ca Secret");
        for i in 1..=self.world.nodes {
            // What the kubelet mounts at /etc/sluice/ca.
            for (key, value) in secret.data.clone().unwrap_or_default() {
                std::fs::write(self.node_dir(i).join("ca").join(key), value.0).expect("ca file");
            }
            self.start_agent(i);
        }
    }

    /// The `deploy/` DaemonSet that runs node `i`'s agent (exactly one takes each node).
    pub fn daemonset_of(&self, i: usize) -> AgentDaemonSet {
        let labels = &self.node_labels[i - 1];
        let mut taking: Vec<AgentDaemonSet> = agent_daemonsets()
            .into_iter()
            .filter(|d| d.runs_on(labels))
            .collect();
        assert_eq!(
            taking.len(),
            1,
            "node{i} ({labels:?}) is taken by {:?}",
            taking.iter().map(|d| &d.name).collect::<Vec<_>>()
        );
        taking.remove(0)
    }

    /// Starts (or restarts) node `i`'s agent from the `deploy/` DaemonSet that takes the node.
    pub fn start_agent(&mut self, i: usize) {
        self.stop_agent(i);
        let ds = self.daemonset_of(i);
        let path = self.node_dir(i).join("config.yaml");
        let config = builtin_ca_instead_of_the_ca_service(&ds.config);
        std::fs::write(&path, self.node_paths(i, &config)).expect("agent config");
        // In a pod the agent uses its mounted ServiceAccount token; here the same token, through
        // a kubeconfig.
        let token = self
            .agent_tokens
            .get(&ds.service_account)
            .unwrap_or_else(|| panic!("no token for ServiceAccount {}", ds.service_account));
        let kubeconfig = self.node_dir(i).join("agent-kubeconfig");
        let ca = self.node_dir(i).join("serviceaccount/ca.crt");
        let text = serde_json::to_string(&json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "box", "cluster": {"server": self.server.url(), "certificate-authority": ca}}],
            "users": [{"name": ds.service_account, "user": {"token": token}}],
            "contexts": [{"name": "box", "context": {"cluster": "box", "user": ds.service_account}}],
            "current-context": "box",
        }))
        .expect("kubeconfig");
        std::fs::write(&kubeconfig, text).expect("agent kubeconfig");
        // What the kubelet writes for a `ClusterFirstWithHostNet` pod: the cluster's DNS.
        let resolv = self.node_dir(i).join("resolv.conf");
        let text = match self.dns {
            Some(server) => format!("nameserver {server}\n"),
            None => "# the box runs no DNS server\n".to_owned(),
        };
        std::fs::write(&resolv, text).expect("resolv.conf");
        let node = node_name(i);
        let agent = tokio::task::block_in_place(|| {
            Agent::start_contained(
                &self.world.node_netns(i),
                &path,
                &self.node_dir(i),
                &[
                    ("NODE_NAME", node.as_str()),
                    ("POD_NAMESPACE", "sluice-system"),
                    ("KUBECONFIG", &kubeconfig.to_string_lossy()),
                ],
                &[(resolv, PathBuf::from("/etc/resolv.conf"))],
            )
        });
        self.world.agents.insert(i, agent);
    }

    /// Adds `labels` to node `i`'s Node object (before its agent starts: they choose the
    /// DaemonSet that runs it).
    pub async fn label_node(&mut self, i: usize, labels: &[(&str, &str)]) {
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.client.clone());
        let map: BTreeMap<&str, &str> = labels.iter().copied().collect();
        nodes
            .patch(
                &node_name(i),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": map}})),
            )
            .await
            .unwrap_or_else(|e| panic!("labelling node{i}: {e}"));
        for (k, v) in labels {
            self.node_labels[i - 1].insert((*k).to_owned(), (*v).to_owned());
        }
    }

    /// A simulated internet behind node `i` (see [`crate::internet`]): that node's default
    /// route goes out through it, as a real node's uplink, and its DNS server becomes the box's
    /// DNS (agents started afterwards resolve through it).
    pub fn add_internet(
        &mut self,
        i: usize,
        spec: crate::internet::InternetSpec,
    ) -> crate::internet::Internet {
        let net = self.world.add_internet_with(i, spec);
        world::ip(
            Some(&self.world.node_netns(i)),
            &format!(
                "route add default via {} dev uplink",
                crate::internet::INTERNET_ADDR
            ),
        );
        self.dns = Some(crate::internet::DNS_SERVER);
        net
    }

    /// Stops node `i`'s agent (SIGTERM), if it runs.
    pub fn stop_agent(&mut self, i: usize) {
        if let Some(mut agent) = self.world.agents.remove(&i) {
            agent.stop();
        }
    }

    /// Node `i`'s agent.
    pub fn agent(&self, i: usize) -> &Agent {
        self.world
            .agents
            .get(&i)
            .unwrap_or_else(|| panic!("no agent on node {i}"))
    }

    fn start_kube_proxy(&self, i: usize) -> Child {
        let log = File::create(self.node_dir(i).join("kube-proxy.log")).expect("kube-proxy log");
        let mut cmd = self.in_node(i, Path::new(&kube_bin("kube-proxy")));
        cmd.args([
            "--kubeconfig",
            &self.server.kubeconfig_path().to_string_lossy(),
            "--hostname-override",
            &node_name(i),
            "--proxy-mode",
            "iptables",
            "--cluster-cidr",
            "10.0.0.0/16",
            // Leave the kernel's conntrack settings alone: they are not per node here.
            "--conntrack-max-per-core",
            "0",
            "--conntrack-tcp-timeout-established",
            "0",
            "--conntrack-tcp-timeout-close-wait",
            "0",
            "--oom-score-adj",
            "0",
            "--metrics-bind-address",
            "127.0.0.1:10249",
            "--healthz-bind-address",
            "127.0.0.1:10256",
            "--v",
            "2",
        ])
        .stdout(Stdio::null())
        .stderr(log);
        cmd.spawn().expect("starting kube-proxy")
    }

    /// A command run inside node `i`'s network namespace.
    fn in_node(&self, i: usize, program: &Path) -> Command {
        crate::netns::command(&self.world.node_netns(i), program)
    }

    /// Creates (server-side applies) the objects of a YAML stream.
    pub async fn apply_yaml(&self, yaml: &str) {
        apply_yaml(&self.client, yaml).await;
    }

    /// Creates a Pod `namespace/name` bound to node `node` with `labels`, a container port
    /// `http: 8080` and the ServiceAccount `name`; the kubelet makes it real.
    pub async fn create_pod(
        &self,
        namespace: &str,
        name: &str,
        node: usize,
        labels: &[(&str, &str)],
    ) {
        self.create_pod_annotated(namespace, name, node, labels, &[])
            .await;
    }

    /// [`Cluster::create_pod`] with `annotations`.
    pub async fn create_pod_annotated(
        &self,
        namespace: &str,
        name: &str,
        node: usize,
        labels: &[(&str, &str)],
        annotations: &[(&str, &str)],
    ) {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let annotations: BTreeMap<&str, &str> = annotations.iter().copied().collect();
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
            "spec": {
                "nodeName": node_name(node),
                "serviceAccountName": name,
                "containers": [{"name": "app", "image": "sluice-testpod", "ports": [{"name": "http", "containerPort": 8080}]}],
            },
        });
        apply(&self.client, &pod).await;
    }

    /// Deletes a Pod (gracefully, as `kubectl delete` does: the kubelet finishes it).
    pub async fn delete_pod(&self, namespace: &str, name: &str) {
        let pods: Api<KubePod> = Api::namespaced(self.client.clone(), namespace);
        pods.delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("deleting pod {namespace}/{name}: {e}"));
    }

    /// Waits until the kubelet runs pod `namespace/name`; returns its sandbox.
    pub async fn running(&self, namespace: &str, name: &str, timeout: Duration) -> Pod {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pod) = self.sandbox(namespace, name) {
                let pods: Api<KubePod> = Api::namespaced(self.client.clone(), namespace);
                let reported =
                    pods.get_opt(name).await.ok().flatten().is_some_and(|p| {
                        p.status.and_then(|s| s.phase).as_deref() == Some("Running")
                    });
                if reported {
                    return pod;
                }
            }
            assert!(
                Instant::now() < deadline,
                "pod {namespace}/{name} not running after {timeout:?}; kubelet: {:?}",
                self.kubelet_events(namespace, name)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The sandbox of a pod the kubelet runs now.
    pub fn sandbox(&self, namespace: &str, name: &str) -> Option<Pod> {
        let kubelet = self.kubelet.as_ref()?;
        let pods = kubelet
            .shared
            .pods
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        pods.values()
            .find(|s| s.pod.namespace == namespace && s.pod.name == name)
            .map(|s| s.pod.clone())
    }

    /// How many sandboxes the kubelet runs.
    pub fn sandboxes(&self) -> usize {
        self.kubelet.as_ref().map_or(0, |k| {
            k.shared
                .pods
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .len()
        })
    }

    /// What the kubelet logged about a pod (CNI failures, retries).
    pub fn kubelet_events(&self, namespace: &str, name: &str) -> Vec<String> {
        let Some(kubelet) = &self.kubelet else {
            return Vec::new();
        };
        let prefix = format!("{namespace}/{name}: ");
        kubelet
            .shared
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|e| e.starts_with(&prefix))
            .cloned()
            .collect()
    }

    /// Starts `sluice-testpod serve ADDR` in a running pod.
    pub fn serve(&mut self, pod: &Pod, addr: &str) -> world::Server {
        self.adopt(pod);
        self.world.serve(&pod.name, addr)
    }

    /// `connect ADDR BYTES` from a running pod.
    pub fn try_connect(
        &mut self,
        pod: &Pod,
        addr: &str,
        bytes: u64,
    ) -> Result<world::Conn, String> {
        self.adopt(pod);
        self.world.try_connect(&pod.name, addr, bytes)
    }

    /// `sluice-testpod ARGS` in a running pod (`http-get`, `tls-get`, ...), its JSON answer.
    pub fn run_in(&mut self, pod: &Pod, args: &[&str]) -> Value {
        self.adopt(pod);
        self.world.run_in(&pod.name, args)
    }

    /// Lets the world's traffic helpers find a box pod by name.
    fn adopt(&mut self, pod: &Pod) {
        self.world.pods.retain(|p| p.name != pod.name);
        self.world.pods.push(pod.clone());
    }

    /// Waits until kube-proxy on node `i` has programmed `cluster_ip`.
    pub fn wait_kube_proxy(&self, i: usize, cluster_ip: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self
                .in_node(i, Path::new("iptables-save"))
                .args(["-t", "nat"])
                .output()
                .expect("iptables-save");
            let rules = String::from_utf8_lossy(&out.stdout);
            if rules.contains(&format!("-d {cluster_ip}/32")) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kube-proxy on node {i} did not program {cluster_ip} within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A Service's ClusterIP, once the API server has allocated it.
    pub async fn cluster_ip(&self, namespace: &str, name: &str) -> String {
        let services: Api<k8s_openapi::api::core::v1::Service> =
            Api::namespaced(self.client.clone(), namespace);
        let svc = services
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("service {namespace}/{name}: {e}"));
        svc.spec
            .and_then(|s| s.cluster_ip)
            .unwrap_or_else(|| panic!("service {namespace}/{name} has no clusterIP"))
    }

    /// Network links in node `i`'s namespace (names), for before/after comparisons.
    pub fn node_links(&self, i: usize) -> BTreeSet<String> {
        let out = Command::new("ip")
            .args(["-n", &self.world.node_netns(i), "-o", "link", "show"])
            .output()
            .expect("ip link");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .collect()
    }

    /// Addresses host-local has handed out on node `i` and not taken back.
    pub fn leased_addresses(&self, i: usize) -> Vec<String> {
        let dir = self.node_dir(i).join("ipam/box");
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<IpAddr>().is_ok())
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(kubelet) = self.kubelet.take() {
            kubelet.stop();
        }
        // The kubelet removed the sandboxes; the world need not try again.
        self.world.pods.clear();
        for proxy in &mut self.proxies {
            let _ = proxy.kill();
            let _ = proxy.wait();
        }
        for bridge in &self.bridges {
            bridge.abort();
        }
        if std::thread::panicking() {
            for i in 1..=self.world.nodes {
                let path = self.node_dir(i).join("kube-proxy.log");
                if let Ok(text) = std::fs::read_to_string(&path) {
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = lines[lines.len().saturating_sub(10)..].join("\n");
                    eprintln!("--- node{i} kube-proxy.log ---\n{tail}");
                }
                if let Some(agent) = self.world.agents.get(&i) {
                    eprintln!("--- node{i} agent ---\n{}", agent.tail());
                }
            }
        }
        // The world's drop stops the agents and removes nodes, cgroups and pins; the server's
        // drop stops the control plane.
    }
}

/// `node<i>`.
pub fn node_name(i: usize) -> String {
    format!("node{i}")
}

/// Node `i`'s address on the underlay (its link to a neighbour), or its pod gateway when alone.
fn node_ip(nodes: usize, i: usize) -> IpAddr {
    if nodes < 2 {
        return format!("10.0.{i}.1").parse().expect("ip");
    }
    let peer = if i == nodes { 1 } else { i + 1 };
    format!("172.30.{}.{i}", world::link_id(i, peer))
        .parse()
        .expect("ip")
}

/// A cached Kubernetes binary (built by `tests/apiserver/apiserver.sh install`).
pub fn kube_bin(name: &str) -> String {
    format!("/opt/sluice-kube/1.20.2/bin/{name}")
}

/// Panics with the reason unless the box's parts are installed.
fn require_box_tools() {
    for path in [
        kube_bin("kube-proxy"),
        format!("{CNI_PLUGIN_DIR}/ptp"),
        format!("{CNI_PLUGIN_DIR}/host-local"),
        format!("{CNI_PLUGIN_DIR}/loopback"),
    ] {
        assert!(
            Path::new(&path).exists(),
            "{path} is missing: run `cargo xtask setup` (it builds kube-proxy and installs \
             containernetworking-plugins)"
        );
    }
    for tool in ["iptables-save", "conntrack"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(found, "{tool} is missing: run `cargo xtask setup`");
    }
}

/// The token of ServiceAccount `namespace/name`, from the Secret the token controller makes.
/// The box's one departure from `deploy/`: its agents sign with the built-in CA from the root
/// files (the Secret's, written into each node's `ca` directory) instead of asking the CA
/// service, since the box runs no agent pods to bind CA tokens to. The CA service itself is
/// tested against the real API server in `tests/install.rs`.
fn builtin_ca_instead_of_the_ca_service(config: &str) -> String {
    const CA_SERVICE: &str = "caAddress: https://sluice-ca.sluice-system.svc:15012\n    \
                              caRootFile: /etc/sluice/ca/root-cert.pem";
    assert!(
        config.contains(CA_SERVICE),
        "deploy/03-configmap.yaml no longer has {CA_SERVICE:?}; update the cluster box"
    );
    config.replace(
        CA_SERVICE,
        "rootCertFile: /etc/sluice/ca/root-cert.pem\n    \
         rootKeyFile: /etc/sluice/ca/root-key.pem",
    )
}

async fn service_account_token(client: &Client, namespace: &str, name: &str) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let secret_name = accounts
            .get_opt(name)
            .await
            .ok()
            .flatten()
            .and_then(|sa| sa.secrets)
            .and_then(|s| s.into_iter().find_map(|r| r.name));
        if let Some(secret_name) = secret_name
            && let Ok(secret) = secrets.get(&secret_name).await
            && let Some(token) = secret.data.and_then(|mut d| d.remove("token"))
        {
            return String::from_utf8(token.0).expect("token is text");
        }
        assert!(
            Instant::now() < deadline,
            "no token for ServiceAccount {namespace}/{name} after 30 s (token controller)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// -------------------------------------------------------------------------------------------
// The kubelet
// -------------------------------------------------------------------------------------------

/// One pod sandbox the kubelet runs.
struct Sandbox {
    pod: Pod,
    /// The ptp plugin's result, handed to DEL as `prevResult`.
    result: Value,
    /// Whether the API server has the pod's `Running` status.
    reported: bool,
}

#[derive(Default)]
struct Shared {
    /// Running sandboxes by pod UID.
    pods: Mutex<BTreeMap<String, Sandbox>>,
    /// `ns/name: what happened`, in order.
    events: Mutex<Vec<String>>,
}

/// What the kubelet thread needs to know about the box.
#[derive(Clone)]
struct Layout {
    world_id: String,
    nodes: usize,
    node_netns: Vec<String>,
    node_cgroups: Vec<PathBuf>,
    conf_dirs: Vec<PathBuf>,
    bin_dirs: Vec<PathBuf>,
}

/// The box's kubelet: a thread polling the API server every 200 ms.
pub struct Kubelet {
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Kubelet {
    fn start(cluster: &Cluster) -> Kubelet {
        let nodes = cluster.world.nodes;
        let layout = Layout {
            world_id: cluster.world.id.clone(),
            nodes,
            node_netns: (1..=nodes).map(|i| cluster.world.node_netns(i)).collect(),
            node_cgroups: (1..=nodes).map(|i| cluster.world.node_cgroup(i)).collect(),
            conf_dirs: (1..=nodes).map(|i| cluster.cni_conf_dir(i)).collect(),
            bin_dirs: (1..=nodes)
                .map(|i| cluster.node_dir(i).join("cni-bin"))
                .collect(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared::default());
        let kubeconfig = cluster.server.kubeconfig_path();
        let thread = {
            let (stop, shared) = (stop.clone(), shared.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("kubelet runtime");
                rt.block_on(kubelet_loop(layout, kubeconfig, stop, shared));
            })
        };
        Kubelet {
            stop,
            shared,
            thread: Some(thread),
        }
    }

    /// Stops the thread and removes every sandbox (CNI DEL, namespace, cgroup).
    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn kubelet_loop(
    layout: Layout,
    kubeconfig: PathBuf,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
) {
    let client = {
        let file = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
            .await
            .expect("kube config");
        Client::try_from(config).expect("client")
    };
    let pods: Api<KubePod> = Api::all(client.clone());
    // Pods whose ADD failed, and when to try again (a kubelet backs off too).
    let mut retry_at: BTreeMap<String, Instant> = BTreeMap::new();
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(list) = pods.list(&ListParams::default()).await else {
            continue; // the API server is away: keep what runs
        };
        let mut seen = BTreeSet::new();
        for pod in list.items {
            let Some(node) = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .and_then(|n| n.strip_prefix("node"))
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| (1..=layout.nodes).contains(n))
            else {
                continue;
            };
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            let namespace = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            seen.insert(uid.clone());
            let running = shared
                .pods
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&uid);
            if pod.metadata.deletion_timestamp.is_some() {
                if running {
                    teardown(&layout, &shared, &uid);
                }
                let api: Api<KubePod> = Api::namespaced(client.clone(), &namespace);
                let _ = api
                    .delete(&name, &DeleteParams::default().grace_period(0))
                    .await;
                continue;
            }
            if !running {
                if retry_at.get(&uid).is_some_and(|t| Instant::now() < *t) {
                    continue;
                }
                let labels = pod.metadata.labels.clone().unwrap_or_default();
                let account = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".into());
                match setup(&layout, node, &uid, &namespace, &name, &labels, &account) {
                    Ok(sandbox) => {
                        retry_at.remove(&uid);
                        let ip = sandbox.pod.ipv4;
                        event(&shared, &namespace, &name, format!("started with {ip}"));
                        shared
                            .pods
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(uid.clone(), sandbox);
                    }
                    Err(e) => {
                        event(&shared, &namespace, &name, format!("sandbox failed: {e}"));
                        retry_at.insert(uid, Instant::now() + Duration::from_secs(1));
                        continue;
                    }
                }
            }
            // Report the pod Running until the API server has taken it (it may be away).
            let unreported = shared
                .pods
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&uid)
                .filter(|s| !s.reported)
                .map(|s| s.pod.ipv4);
            let Some(ip) = unreported else {
                continue;
            };
            let api: Api<KubePod> = Api::namespaced(client.clone(), &namespace);
            let status = json!({"status": {
                "phase": "Running",
                "podIP": ip.to_string(),
                "podIPs": [{"ip": ip.to_string()}],
                "startTime": k8s_openapi::jiff::Timestamp::now().to_string(),
                "conditions": [
                    {"type": "Initialized", "status": "True"},
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "ContainersReady", "status": "True"},
                    {"type": "Ready", "status": "True"},
                ],
            }});
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await
            {
                Ok(_) => {
                    if let Some(s) = shared
                        .pods
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_mut(&uid)
                    {
                        s.reported = true;
                    }
                }
                Err(e) => event(
                    &shared,
                    &namespace,
                    &name,
                    format!("status not written: {e}"),
                ),
            }
        }
        let gone: Vec<String> = shared
            .pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|uid| !seen.contains(*uid))
            .cloned()
            .collect();
        for uid in gone {
            teardown(&layout, &shared, &uid);
        }
    }
    let all: Vec<String> = shared
        .pods
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect();
    for uid in all {
        teardown(&layout, &shared, &uid);
    }
}

fn event(shared: &Shared, namespace: &str, name: &str, what: String) {
    shared
        .events
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(format!("{namespace}/{name}: {what}"));
}

fn sandbox_netns(layout: &Layout, namespace: &str, name: &str) -> String {
    format!("{}-{namespace}-{name}", layout.world_id)
}

/// Makes the sandbox and runs CNI ADD through the node's conflist; on failure undoes it all.
fn setup(
    layout: &Layout,
    node: usize,
    uid: &str,
    namespace: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    service_account: &str,
) -> Result<Sandbox, String> {
    let netns = sandbox_netns(layout, namespace, name);
    world::ip(None, &format!("netns add {netns}"));
    let cgroup = layout.node_cgroups[node - 1].join(format!("{namespace}_{name}"));
    std::fs::create_dir_all(&cgroup).map_err(|e| format!("cgroup: {e}"))?;
    let pod = Pod {
        name: name.into(),
        namespace: namespace.into(),
        uid: uid.into(),
        node,
        netns: netns.clone(),
        cgroup: cgroup.clone(),
        ipv4: IpAddr::from([0, 0, 0, 0]),
        ipv6: IpAddr::from([0u16; 8]),
        service_account: service_account.into(),
        labels: labels.clone(),
        annotations: BTreeMap::new(),
        container_ports: vec![("http".into(), 8080)],
        ready: true,
    };
    let mut sandbox = Sandbox {
        pod,
        result: Value::Null,
        reported: false,
    };
    match cni(layout, node, "ADD", &sandbox) {
        Ok(result) => {
            let ip = result["ips"][0]["address"]
                .as_str()
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| format!("CNI result without an address: {result}"))?;
            sandbox.pod.ipv4 = ip;
            sandbox.result = result;
            Ok(sandbox)
        }
        Err(e) => {
            // A kubelet tears a failed sandbox down (CNI DEL) before it tries again.
            let _ = cni(layout, node, "DEL", &sandbox);
            remove_sandbox(&sandbox.pod);
            Err(e)
        }
    }
}

fn teardown(layout: &Layout, shared: &Shared, uid: &str) {
    let Some(sandbox) = shared
        .pods
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(uid)
    else {
        return;
    };
    let pod = &sandbox.pod;
    if let Err(e) = cni(layout, pod.node, "DEL", &sandbox) {
        event(
            shared,
            &pod.namespace,
            &pod.name,
            format!("CNI DEL failed: {e}"),
        );
    }
    remove_sandbox(pod);
    event(shared, &pod.namespace, &pod.name, "removed".into());
}

fn remove_sandbox(pod: &Pod) {
    world::remove_cgroup_tree(&pod.cgroup);
    let _ = Command::new("ip")
        .args(["netns", "del", &pod.netns])
        .status();
}

/// Runs `command` (ADD or DEL) through node `node`'s conflist, as a runtime does: `loopback`
/// first on ADD, then each plugin in order (in reverse on DEL) with the previous result.
fn cni(layout: &Layout, node: usize, command: &str, sandbox: &Sandbox) -> Result<Value, String> {
    let conf_dir = &layout.conf_dirs[node - 1];
    let text = std::fs::read_to_string(conf_dir.join("10-box.conflist"))
        .map_err(|e| format!("conflist: {e}"))?;
    let list: Value = serde_json::from_str(&text).map_err(|e| format!("conflist: {e}"))?;
    let version = list["cniVersion"].clone();
    let net_name = list["name"].clone();
    let mut plugins: Vec<Value> = list["plugins"].as_array().cloned().unwrap_or_default();
    if command == "ADD" {
        let lo = json!({"cniVersion": version, "name": "lo", "type": "loopback"});
        exec_plugin(layout, node, command, sandbox, "lo", &lo)?;
    } else {
        plugins.reverse();
    }
    let mut prev = sandbox.result.clone();
    let mut errors = Vec::new();
    for mut conf in plugins {
        conf["cniVersion"] = version.clone();
        conf["name"] = net_name.clone();
        if !prev.is_null() {
            conf["prevResult"] = prev.clone();
        }
        match exec_plugin(layout, node, command, sandbox, "eth0", &conf) {
            Ok(out) if command == "ADD" => prev = out,
            Ok(_) => {}
            // DEL goes on through every plugin, as the spec asks, and reports what failed.
            Err(e) if command == "DEL" => errors.push(e),
            Err(e) => return Err(e),
        }
    }
    if errors.is_empty() {
        Ok(prev)
    } else {
        Err(errors.join("; "))
    }
}

fn exec_plugin(
    layout: &Layout,
    node: usize,
    command: &str,
    sandbox: &Sandbox,
    ifname: &str,
    conf: &Value,
) -> Result<Value, String> {
    let kind = conf["type"].as_str().unwrap_or_default();
    let bin_dir = &layout.bin_dirs[node - 1];
    let pod = &sandbox.pod;
    let mut cmd = crate::netns::command(&layout.node_netns[node - 1], bin_dir.join(kind));
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.uid)
        .env("CNI_NETNS", pod.netns_path())
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", bin_dir)
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                pod.namespace, pod.name, pod.uid, pod.uid
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("{kind}: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(conf.to_string().as_bytes())
        .map_err(|e| format!("{kind} stdin: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{kind}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{kind} {command}: {} {}",
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    if stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&stdout).map_err(|e| format!("{kind} {command} printed {stdout:?}: {e}"))
}

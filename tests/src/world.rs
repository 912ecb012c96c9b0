//! A small cluster on one machine: nodes and pods as network namespaces joined by veth pairs,
//! each pod with its own cgroup v2, and a real `sluice` agent per node.
//!
//! Addressing (fixed, so failures read easily): node *i* has `172.30.0.i` on the underlay
//! (`fd30::i`); its pods are `10.0.i.j` / `fd00:i::j` (j ≥ 2), each behind a point-to-point
//! veth whose node side carries the gateway `10.0.i.1` / `fd00:i::1`.
//!
//! Everything a world creates is named `sluice-<pid>-<n>-…` and removed when it drops, even
//! after a panic; a new world also sweeps what a killed test process (a dead pid) left behind.
use std::{
    collections::BTreeMap,
    fs::File,
    io::Write,
    net::IpAddr,
    os::fd::AsRawFd,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::agent::Agent;

/// cgroup v2 mount on the test machines (see ENVIRONMENT.md).
pub const CGROUP2: &str = "/sys/fs/cgroup/unified";
/// bpffs mount.
pub const BPFFS: &str = "/sys/fs/bpf";
const PREFIX: &str = "sluice-";

static WORLDS: AtomicU32 = AtomicU32::new(0);

/// Panics with a reason unless the prerequisites of an end-to-end test hold.
pub fn require_root_and_tools() {
    // SAFETY: no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "end-to-end tests need root (eBPF, netns, cgroups): run `cargo xtask test` as root"
    );
    for tool in ["ip", "bpftool"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(found, "{tool} is missing: run `cargo xtask setup`");
    }
    assert!(
        Path::new(CGROUP2).join("cgroup.procs").exists(),
        "no cgroup v2 hierarchy at {CGROUP2}"
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    assert!(
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(BPFFS) && l.contains(" bpf ")),
        "bpffs is not mounted at {BPFFS}: run `cargo xtask setup`"
    );
}

/// Runs `ip` with `args` (inside `netns` if given); panics with its stderr on failure.
pub fn ip(netns: Option<&str>, args: &str) {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(args.split_whitespace());
    let out = cmd.output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}{args}: {}",
        netns.map(|n| format!("-n {n} ")).unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// No duplicate address detection on the links made later in `netns`: their link-local
/// addresses are usable at once, so the first neighbour discovery of a fresh world does not
/// race DAD (seen as `No route to host` after 3 s on the first IPv6 connection).
fn no_dad(netns: &str) {
    for key in ["all", "default"] {
        sysctl_in(netns, &format!("net.ipv6.conf.{key}.accept_dad"), "0");
    }
}

fn sysctl_in(netns: &str, key: &str, value: &str) {
    let status = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "sysctl",
            "-q",
            "-w",
            &format!("{key}={value}"),
        ])
        .status()
        .expect("sysctl");
    assert!(status.success(), "sysctl {key} in {netns}");
}

/// Whether a process is alive.
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes leftovers of test processes that no longer run (names carry their pid).
fn sweep_dead() {
    let dead = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            return false;
        };
        let pid: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
        pid.is_some_and(|p| !alive(p))
    };
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if dead(name) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    for dir in [CGROUP2, BPFFS] {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if dead(&name) {
                if dir == CGROUP2 {
                    remove_cgroup_tree(&entry.path());
                } else {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }
}

/// Kills every process in a cgroup subtree and removes it, deepest first.
pub fn remove_cgroup_tree(path: &Path) {
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    let mut dirs = vec![path.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        for e in std::fs::read_dir(&dirs[i]).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(e.path());
            }
        }
        i += 1;
    }
    for dir in dirs.iter().rev() {
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One pod: its namespace, cgroup and addresses.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub node: usize,
    pub netns: String,
    pub cgroup: PathBuf,
    pub ipv4: IpAddr,
    pub ipv6: IpAddr,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Named container ports (`name`, number), written into the Pod's spec.
    pub container_ports: Vec<(String, u16)>,
    /// The Pod's `Ready` condition.
    pub ready: bool,
}

impl Pod {
    /// `/run/netns/<name>`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    /// A command that runs inside this pod: its network namespace and its cgroup.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let netns = File::open(self.netns_path()).expect("open pod netns");
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(self.cgroup.join("cgroup.procs"))
            .expect("open pod cgroup.procs");
        // SAFETY: only async-signal-safe calls (write, setns) on descriptors opened before fork.
        unsafe {
            cmd.pre_exec(move || {
                let zero = b"0";
                if libc::write(procs.as_raw_fd(), zero.as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }
}

/// What to build.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub node: usize,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub container_ports: Vec<(String, u16)>,
}

impl PodSpec {
    /// A pod `name` in `namespace` on node `node` (1-based), service account `name`.
    pub fn new(name: &str, namespace: &str, node: usize) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            node,
            service_account: name.into(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            container_ports: Vec::new(),
        }
    }

    /// Adds a named container port.
    pub fn port(mut self, name: &str, number: u16) -> Self {
        self.container_ports.push((name.into(), number));
        self
    }

    /// Sets the pod's service account.
    pub fn with_sa(mut self, service_account: &str) -> Self {
        self.service_account = service_account.into();
        self
    }

    /// Adds a pod label.
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }

    /// Adds a pod annotation.
    pub fn annotate(mut self, k: &str, v: &str) -> Self {
        self.annotations.insert(k.into(), v.into());
        self
    }
}

/// A test cluster. Dropping it tears everything down.
pub struct World {
    pub id: String,
    pub dir: tempfile::TempDir,
    pub nodes: usize,
    pub pods: Vec<Pod>,
    /// Namespaces and their labels, written into every agent's config.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// More YAML documents (policies, mesh resources) for the agents' config.
    pub extra_resources: String,
    /// YAML documents written after the pods (for tests where the order of the file matters).
    pub late_resources: String,
    /// Rewrite agent configs whole: into a temporary file renamed over the config, as
    /// configuration tools do (else in place, as an editor saving may).
    pub atomic_config_writes: bool,
    /// Pods left out of the agents' config (MeshState does not know them).
    pub hidden_pods: std::collections::BTreeSet<String>,
    /// More lines for the agents' `identity:` section (indented two spaces).
    pub identity_extra: String,
    pub(crate) cgroup_root: PathBuf,
    /// More network namespaces of this world (the internet), removed when it drops.
    pub(crate) extra_netns: Vec<String>,
    children: Vec<Child>,
    /// Start agents in a cgroup under their node's pod cgroup root (as a DaemonSet pod sits
    /// under `kubepods`), so that the capture hooks see the agent's own sockets too.
    pub agents_under_pod_cgroups: bool,
    pub agents: BTreeMap<usize, Agent>,
    /// The `extra_spec` each running agent was started with.
    agent_extra: BTreeMap<usize, String>,
}

impl World {
    /// Builds `nodes` nodes and the given pods (not yet enrolled, no agents started).
    pub fn build(nodes: usize, pods: &[PodSpec]) -> World {
        require_root_and_tools();
        sweep_dead();
        let n = WORLDS.fetch_add(1, Ordering::SeqCst);
        let id = format!("{PREFIX}{}-{n}", std::process::id());
        let cgroup_root = Path::new(CGROUP2).join(&id);
        let mut world = World {
            dir: tempfile::Builder::new()
                .prefix(&format!("{id}-"))
                .tempdir()
                .expect("tempdir"),
            id,
            nodes,
            pods: Vec::new(),
            namespaces: BTreeMap::new(),
            extra_resources: String::new(),
            late_resources: String::new(),
            atomic_config_writes: false,
            hidden_pods: Default::default(),
            identity_extra: String::new(),
            cgroup_root,
            extra_netns: Vec::new(),
            children: Vec::new(),
            agents_under_pod_cgroups: false,
            agents: BTreeMap::new(),
            agent_extra: BTreeMap::new(),
        };
        std::fs::create_dir_all(&world.cgroup_root).expect("create test cgroup");
        // One mesh root for every agent of this world, as a cluster shares one CA.
        let ca = sluice::identity::BuiltinCa::generate("cluster.local").expect("mesh root");
        ca.write_pem_files(&world.root_cert(), &world.dir.path().join("root-key.pem"))
            .expect("write mesh root");
        for i in 1..=nodes {
            world.build_node(i);
        }
        for spec in pods {
            world.add_pod(spec.clone());
        }
        world
    }

    /// The mesh root certificate (PEM) every agent of this world trusts.
    pub fn root_cert(&self) -> PathBuf {
        self.dir.path().join("root-cert.pem")
    }

    /// The name of node `i`'s network namespace.
    pub fn node_netns(&self, i: usize) -> String {
        format!("{}-node{i}", self.id)
    }

    /// Node `i`'s cgroup (the agent attaches its programs here; pods are below it).
    pub fn node_cgroup(&self, i: usize) -> PathBuf {
        self.cgroup_root.join(format!("node{i}"))
    }

    /// Node `i`'s bpffs pin directory.
    pub fn pin_dir(&self, i: usize) -> PathBuf {
        Path::new(BPFFS).join(format!("{}-node{i}", self.id))
    }

    fn build_node(&mut self, i: usize) {
        let ns = self.node_netns(i);
        ip(None, &format!("netns add {ns}"));
        ip(Some(&ns), "link set lo up");
        sysctl_in(&ns, "net.ipv4.ip_forward", "1");
        sysctl_in(&ns, "net.ipv6.conf.all.forwarding", "1");
        no_dad(&ns);
        std::fs::create_dir_all(self.node_cgroup(i)).expect("node cgroup");
        // Underlay: every earlier node gets a point-to-point link to this one.
        for j in 1..i {
            let other = self.node_netns(j);
            ip(
                None,
                &format!("link add n{j} netns {ns} type veth peer name n{i} netns {other}"),
            );
            for (me, peer, nsn, dev) in [
                (i, j, ns.clone(), format!("n{j}")),
                (j, i, other.clone(), format!("n{i}")),
            ] {
                ip(
                    Some(&nsn),
                    &format!("addr add 172.30.{}.{me}/24 dev {dev}", link_id(i, j)),
                );
                ip(
                    Some(&nsn),
                    &format!("addr add fd30:{}::{me}/64 dev {dev} nodad", link_id(i, j)),
                );
                ip(Some(&nsn), &format!("link set {dev} up"));
                ip(
                    Some(&nsn),
                    &format!(
                        "route add 10.0.{peer}.0/24 via 172.30.{}.{peer}",
                        link_id(i, j)
                    ),
                );
                ip(
                    Some(&nsn),
                    &format!(
                        "route add fd00:{peer}::/64 via fd30:{}::{peer}",
                        link_id(i, j)
                    ),
                );
            }
        }
    }

    /// Adds a pod (network namespace, veth, addresses, routes, cgroup).
    pub fn add_pod(&mut self, spec: PodSpec) -> Pod {
        assert!(
            spec.node >= 1 && spec.node <= self.nodes,
            "pod {} on node {} of {}",
            spec.name,
            spec.node,
            self.nodes
        );
        let j = 2 + self.pods.iter().filter(|p| p.node == spec.node).count();
        let i = spec.node;
        let node_ns = self.node_netns(i);
        let netns = format!("{}-{}", self.id, spec.name);
        ip(None, &format!("netns add {netns}"));
        no_dad(&netns);
        ip(
            Some(&node_ns),
            &format!("link add p{j} type veth peer name eth0 netns {netns}"),
        );
        ip(Some(&node_ns), &format!("addr add 10.0.{i}.1/32 dev p{j}"));
        ip(
            Some(&node_ns),
            &format!("addr add fd00:{i}::1/128 dev p{j} nodad"),
        );
        ip(Some(&node_ns), &format!("link set p{j} up"));
        ip(
            Some(&node_ns),
            &format!("route add 10.0.{i}.{j}/32 dev p{j}"),
        );
        ip(
            Some(&node_ns),
            &format!("route add fd00:{i}::{j}/128 dev p{j}"),
        );
        ip(Some(&netns), "link set lo up");
        ip(Some(&netns), &format!("addr add 10.0.{i}.{j}/32 dev eth0"));
        ip(
            Some(&netns),
            &format!("addr add fd00:{i}::{j}/128 dev eth0 nodad"),
        );
        ip(Some(&netns), "link set eth0 up");
        ip(
            Some(&netns),
            &format!("route add 10.0.{i}.1 dev eth0 scope link"),
        );
        ip(
            Some(&netns),
            &format!("route add default via 10.0.{i}.1 dev eth0"),
        );
        ip(Some(&netns), &format!("-6 route add fd00:{i}::1 dev eth0"));
        ip(
            Some(&netns),
            &format!("-6 route add default via fd00:{i}::1 dev eth0"),
        );
        let cgroup = self.node_cgroup(i).join(&spec.name);
        std::fs::create_dir_all(&cgroup).expect("pod cgroup");
        let pod = Pod {
            uid: format!("uid-{}-{}", spec.namespace, spec.name),
            name: spec.name,
            namespace: spec.namespace,
            node: i,
            netns,
            cgroup,
            ipv4: format!("10.0.{i}.{j}").parse().expect("ip"),
            ipv6: format!("fd00:{i}::{j}").parse().expect("ip"),
            service_account: spec.service_account,
            labels: spec.labels,
            annotations: spec.annotations,
            container_ports: spec.container_ports,
            ready: true,
        };
        self.pods.push(pod.clone());
        pod
    }

    /// Declares a namespace with labels (written into the agents' config).
    pub fn namespace(&mut self, name: &str, labels: &[(&str, &str)]) {
        self.namespaces.insert(
            name.into(),
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Kubernetes-shaped YAML for every namespace and pod, as the agents' local source reads it.
    pub fn resources_yaml(&self) -> String {
        let mut out = String::new();
        for (name, labels) in &self.namespaces {
            let doc = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}});
            out.push_str(&format!(
                "---\n{}\n",
                serde_json::to_string(&doc).expect("json")
            ));
        }
        if !self.extra_resources.is_empty() {
            out.push_str(&format!(
                "---\n{}\n",
                self.extra_resources.trim_start_matches("---\n")
            ));
        }
        for p in self
            .pods
            .iter()
            .filter(|p| !self.hidden_pods.contains(&p.name))
        {
            let ports: Vec<serde_json::Value> = p
                .container_ports
                .iter()
                .map(|(name, n)| serde_json::json!({"name": name, "containerPort": n}))
                .collect();
            let containers = if ports.is_empty() {
                serde_json::json!([])
            } else {
                serde_json::json!([{"name": "app", "ports": ports}])
            };
            let ready = if p.ready { "True" } else { "False" };
            let doc = serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": p.name, "namespace": p.namespace, "uid": p.uid, "labels": p.labels, "annotations": p.annotations},
                "spec": {"nodeName": format!("node{}", p.node), "serviceAccountName": p.service_account, "containers": containers},
                "status": {"podIPs": [{"ip": p.ipv4.to_string()}, {"ip": p.ipv6.to_string()}], "conditions": [{"type": "Ready", "status": ready}]},
            });
            out.push_str(&format!(
                "---\n{}\n",
                serde_json::to_string(&doc).expect("json")
            ));
        }
        if !self.late_resources.is_empty() {
            out.push_str(&format!(
                "---\n{}\n",
                self.late_resources.trim_start_matches("---\n")
            ));
        }
        out
    }

    /// Starts a long-running process in a pod; it is killed when the world drops.
    pub fn spawn_in(&mut self, pod: &str, args: &[&str]) -> usize {
        let mut cmd = self.pod(pod).command(testpod_bin());
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().expect("spawn in pod");
        self.children.push(child);
        self.children.len() - 1
    }

    /// Starts `sluice-testpod http-echo ADDR NAME` in a pod (an HTTP/1.1 server answering
    /// with what it received, see [`crate::http_echo`]) and waits until it listens.
    pub fn spawn_http_echo(&mut self, pod: &str, addr: &str, name: &str) {
        self.spawn_listening(pod, &["http-echo", addr, name]);
    }

    /// Starts `sluice-testpod serve ADDR` in a pod and waits until it listens.
    pub fn serve(&mut self, pod: &str, addr: &str) -> Server {
        self.spawn_listening(pod, &["serve", addr])
    }

    /// Starts `sluice-testpod ARGS` in a pod and waits for its `listening` event.
    fn spawn_listening(&mut self, pod: &str, args: &[&str]) -> Server {
        let idx = self.spawn_in(pod, args);
        let stdout = self.children[idx].stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        let first = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server did not start");
        assert_eq!(first["event"], "listening", "server in {pod}: {first}");
        Server { events: rx }
    }

    /// Runs `sluice-testpod` with `args` in a pod and returns its JSON result.
    pub fn run_in(&self, pod: &str, args: &[&str]) -> serde_json::Value {
        testpod_json(
            self.pod(pod).command(testpod_bin()),
            args,
            &format!("in {pod}"),
        )
    }

    /// `sluice-testpod ARGS` in node `i`'s own namespace (as the kubelet or another host
    /// process would run), parsed from its JSON line.
    pub fn run_on_node(&self, i: usize, args: &[&str]) -> serde_json::Value {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.node_netns(i)])
            .arg(testpod_bin());
        testpod_json(cmd, args, &format!("on node {i}"))
    }

    /// `connect ADDR BYTES` from a pod; `Err` with the client's error if it failed.
    pub fn try_connect(&self, pod: &str, addr: &str, bytes: u64) -> Result<Conn, String> {
        let v = self.run_in(pod, &["connect", addr, &bytes.to_string()]);
        match v.get("error") {
            Some(e) => Err(e.to_string()),
            None => Ok(Conn::from_json(&v)),
        }
    }

    /// `connect ADDR BYTES` from a pod; panics if it fails.
    pub fn connect(&self, pod: &str, addr: &str, bytes: u64) -> Conn {
        let v = self.run_in(pod, &["connect", addr, &bytes.to_string()]);
        assert!(
            v.get("error").is_none(),
            "connect from {pod} to {addr}: {v}"
        );
        Conn::from_json(&v)
    }

    /// `GET path` on `127.0.0.1:port` inside node `i`'s namespace (the agent's admin ports);
    /// returns the status line and body.
    pub fn node_http_get(&self, i: usize, port: u16, path: &str) -> (String, String) {
        use std::io::{Read, Write};
        let path = path.to_owned();
        crate::netns::on_thread(&self.node_netns(i), move || {
            let mut s =
                std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to agent");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            .expect("request");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
            let body = if head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked")
            {
                dechunk(body)
            } else {
                body.to_owned()
            };
            (head.lines().next().unwrap_or_default().to_owned(), body)
        })
    }

    /// Writes node `i`'s agent config and returns its path.
    pub fn agent_config(&self, i: usize, extra_spec: &str) -> PathBuf {
        let dir = self.dir.path().join(format!("node{i}"));
        std::fs::create_dir_all(&dir).expect("node dir");
        let path = dir.join("config.yaml");
        let written = if self.atomic_config_writes {
            dir.join("config.yaml.tmp")
        } else {
            path.clone()
        };
        let mut f = File::create(&written).expect("config");
        write!(
            f,
            "apiVersion: sluice.dev/v1alpha1\nkind: AgentConfig\nspec:\n  nodeName: node{i}\n  cgroupRoot: {}\n  bpfPinPath: {}\n  stateDir: {}\n  enrollmentSocket: {}\n  ebpfLogLevel: debug\n  identity:\n    rootCertFile: {}\n    rootKeyFile: {}\n{}\n{extra_spec}\n{}",
            self.node_cgroup(i).display(),
            self.pin_dir(i).display(),
            dir.join("state").display(),
            dir.join("enroll.sock").display(),
            self.root_cert().display(),
            self.dir.path().join("root-key.pem").display(),
            self.identity_extra
                .lines()
                .map(|l| format!("  {l}"))
                .collect::<Vec<_>>()
                .join("\n"),
            self.resources_yaml(),
        )
        .expect("write config");
        if written != path {
            std::fs::rename(&written, &path).expect("rename config");
        }
        path
    }

    /// Starts (or restarts) node `i`'s agent with `extra_spec` lines added to its AgentConfig.
    pub fn start_agent(&mut self, i: usize, extra_spec: &str) -> &Agent {
        if let Some(mut old) = self.agents.remove(&i) {
            old.stop();
        }
        let config = self.agent_config(i, extra_spec);
        self.agent_extra.insert(i, extra_spec.to_owned());
        let cgroup = self
            .agents_under_pod_cgroups
            .then(|| self.node_cgroup(i).join("sluice-agent"));
        let agent = Agent::start_in(
            &self.node_netns(i),
            &config,
            &self.dir.path().join(format!("node{i}")),
            cgroup.as_deref(),
            &[],
        );
        self.agents.insert(i, agent);
        &self.agents[&i]
    }

    /// Starts a second agent on node `i` next to the running one (as a DaemonSet rollout
    /// with `maxSurge` does) and waits until it is ready; returns the previous agent, which
    /// has handed its listeners over by then and drains.
    pub fn upgrade_agent(&mut self, i: usize) -> Agent {
        let extra = self.agent_extra.get(&i).cloned().unwrap_or_default();
        let config = self.agent_config(i, &extra);
        let cgroup = self
            .agents_under_pod_cgroups
            .then(|| self.node_cgroup(i).join("sluice-agent"));
        let old = self
            .agents
            .remove(&i)
            .unwrap_or_else(|| panic!("no agent running on node {i}"));
        let new = Agent::start_in(
            &self.node_netns(i),
            &config,
            &self.dir.path().join(format!("node{i}")),
            cgroup.as_deref(),
            &[],
        );
        self.agents.insert(i, new);
        old
    }

    /// Rewrites every running agent's config file from the world as it is now (the agents'
    /// file sources pick the change up within their watch interval).
    pub fn rewrite_configs(&self) {
        for (i, extra) in &self.agent_extra {
            if self.agents.contains_key(i) {
                self.agent_config(*i, extra);
            }
        }
    }

    /// Sets a pod's `Ready` condition and rewrites the agents' configs.
    pub fn set_ready(&mut self, pod: &str, ready: bool) {
        let p = self
            .pods
            .iter_mut()
            .find(|p| p.name == pod)
            .unwrap_or_else(|| panic!("no pod {pod}"));
        p.ready = ready;
        self.rewrite_configs();
    }

    /// Reports a pod's sandbox to its node's agent; returns whether it is captured.
    pub fn enroll(&self, pod: &str) -> bool {
        let p = self.pod(pod);
        let agent = self
            .agents
            .get(&p.node)
            .unwrap_or_else(|| panic!("no agent on node {}", p.node));
        let answer = agent.enroll(p);
        assert!(answer.ok, "enrolling {pod}: {:?}", answer.error);
        answer.captured.unwrap_or(false)
    }

    /// Removes a pod's sandbox from its node's agent.
    pub fn unenroll(&self, pod: &str) {
        let p = self.pod(pod);
        let answer = self.agents[&p.node]
            .call(&sluice::redirect::enroll::Request::Del { uid: p.uid.clone() });
        assert!(answer.ok, "removing {pod}: {:?}", answer.error);
    }
}

/// The third octet of the underlay link between nodes `a` and `b` (`172.30.<id>.<node>`).
pub fn link_id(a: usize, b: usize) -> usize {
    a.min(b) * 10 + a.max(b)
}

/// The test application binary.
pub fn testpod_bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_sluice-testpod") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    for candidate in [
        dir.join("sluice-testpod"),
        exe.parent().expect("dir").join("sluice-testpod"),
    ] {
        if candidate.exists() {
            return candidate;
        }
    }
    panic!(
        "sluice-testpod not found next to {}: build with `cargo xtask build`",
        exe.display()
    );
}

/// A running `serve`; its events are the connections it accepted.
pub struct Server {
    events: std::sync::mpsc::Receiver<serde_json::Value>,
}

impl Server {
    /// The next accepted connection's `(peer, local)`.
    pub fn accepted(&self) -> (std::net::SocketAddr, std::net::SocketAddr) {
        let v = self
            .events
            .recv_timeout(Duration::from_secs(10))
            .expect("no connection accepted");
        (
            v["peer"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("peer"),
            v["local"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("local"),
        )
    }

    /// The next accepted connection's `(peer, local)`, if one comes within `timeout`.
    pub fn try_accepted(
        &self,
        timeout: Duration,
    ) -> Option<(std::net::SocketAddr, std::net::SocketAddr)> {
        let v = self.events.recv_timeout(timeout).ok()?;
        Some((
            v["peer"].as_str()?.parse().ok()?,
            v["local"].as_str()?.parse().ok()?,
        ))
    }

    /// Drops any events not yet read.
    pub fn drain(&self) {
        while self.events.try_recv().is_ok() {}
    }
}

/// What a `connect` saw.
#[derive(Debug, Clone)]
pub struct Conn {
    /// The client socket's own address (`127.0.0.1`/`::1` when captured).
    pub local: std::net::SocketAddr,
    /// Where the client socket is connected (the proxy's listener when captured).
    pub peer: std::net::SocketAddr,
    /// The server's view: who connected, and to which address.
    pub server_peer: std::net::SocketAddr,
    pub server_local: std::net::SocketAddr,
    pub echoed: u64,
}

impl Conn {
    fn from_json(v: &serde_json::Value) -> Conn {
        let addr = |x: &serde_json::Value| {
            x.as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("address in {v}"))
        };
        Conn {
            local: addr(&v["local"]),
            peer: addr(&v["peer"]),
            server_peer: addr(&v["server"]["peer"]),
            server_local: addr(&v["server"]["local"]),
            echoed: v["echoed"].as_u64().unwrap_or(0),
        }
    }

    /// Whether Sluice's outbound capture took the connection (it was sent to loopback).
    pub fn captured(&self) -> bool {
        self.local.ip().is_loopback()
            || matches!(self.local.ip(), IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()))
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for (_, mut agent) in std::mem::take(&mut self.agents) {
            agent.stop();
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_cgroup_tree(&self.cgroup_root);
        let extra = self
            .extra_netns
            .iter()
            .filter(|ns| Path::new("/run/netns").join(ns).exists());
        for ns in self.pods.iter().map(|p| &p.netns).chain(extra) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for i in 1..=self.nodes {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.node_netns(i)])
                .status();
            let _ = std::fs::remove_dir_all(self.pin_dir(i));
        }
    }
}

/// Runs `cmd` (a `sluice-testpod` invocation) with `args` and parses the JSON line it prints;
/// `place` says where it ran, for the panic message.
fn testpod_json(mut cmd: Command, args: &[&str], place: &str) -> serde_json::Value {
    let out = cmd
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("sluice-testpod {args:?} {place}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("sluice-testpod {args:?} {place} printed {text:?}: {e}"))
}

/// The data of a chunked HTTP/1.1 body (what is there of it, if it ends early).
fn dechunk(mut raw: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = raw.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            out.push_str(rest.get(..size).unwrap_or(rest));
            break;
        }
        out.push_str(&rest[..size]);
        raw = rest.get(size + 2..).unwrap_or_default();
    }
    out
}

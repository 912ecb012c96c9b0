//! Sandbox discovery: on a cluster node, finds the network namespace of each mesh pod that
//! MeshState places on this node, and reports it to the pod manager with the same
//! [`Request::Add`]/[`Request::Del`] the CNI plugin sends. Pods that predate the agent, and nodes
//! without the chained CNI plugin, are enrolled this way.
//!
//! A pod's namespace is the one holding the pod's IP address on one of its interfaces. Candidates
//! are the bind mounts runtimes leave under `/var/run/netns` (containerd, CRI-O) and the
//! namespaces of processes under `/proc`; the agent's own namespace (host-network pods) never
//! counts. If several namespaces hold the address (nested or test setups), the one whose veth
//! peer lives in the agent's namespace wins; if that does not settle it, the pod is left alone
//! and a warning says why.
//!
//! Only pods in the mesh are reported; a pod that leaves the mesh (relabelled) or the node (deleted)
//! gets a `Del`, so un-labelling un-enrolls.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use futures::TryStreamExt;
use rtnetlink::packet_route::{address::AddressAttribute, link::LinkAttribute};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::{
    netns::{HomeNetns, Netns},
    redirect::enroll::{Command, Request, Response, Sandbox},
    state::{MeshState, StateHandle, Workload},
};

/// Where and how often to look.
#[derive(Clone, Debug)]
pub struct DiscoverSettings {
    /// This node's name (`spec.nodeName` of its pods).
    pub node: String,
    /// Directories of network namespace bind mounts.
    pub netns_dirs: Vec<PathBuf>,
    /// The proc filesystem whose processes' namespaces are candidates too.
    pub proc: PathBuf,
    /// How soon to look again for pods whose namespace was not found.
    pub rescan: Duration,
}

/// Where the DaemonSet mounts the host's `/proc` (the agent runs without `hostPID`).
pub const HOST_PROC: &str = "/host/proc";

impl DiscoverSettings {
    /// The usual places on a node: the host's `/proc` at [`HOST_PROC`] when it is mounted
    /// there, else this process's own `/proc`.
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            netns_dirs: vec!["/var/run/netns".into(), "/run/netns".into()],
            proc: pick_proc(Path::new(HOST_PROC)),
            rescan: Duration::from_secs(2),
        }
    }
}

/// `host` if it holds a proc filesystem (a `1/ns/net` entry), else `/proc`.
fn pick_proc(host: &Path) -> PathBuf {
    if host.join("1/ns/net").exists() {
        host.to_owned()
    } else {
        "/proc".into()
    }
}

/// A network namespace and what it holds.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub path: PathBuf,
    /// Address → interface index inside the namespace.
    pub addresses: BTreeMap<IpAddr, u32>,
    /// Interface index → its veth peer's index (in whichever namespace the peer lives).
    pub peers: BTreeMap<u32, u32>,
}

/// Why the namespaces could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("netlink in {path}: {source}")]
    Netlink {
        path: PathBuf,
        source: rtnetlink::Error,
    },
}

/// Namespace files to look at, one per namespace (by device and inode), bind mounts first.
fn namespace_files(settings: &DiscoverSettings) -> Vec<PathBuf> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut consider = |path: PathBuf| {
        if let Ok(meta) = std::fs::metadata(&path)
            && seen.insert((meta.dev(), meta.ino()))
        {
            out.push(path);
        }
    };
    for dir in &settings.netns_dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
        paths.sort();
        paths.into_iter().for_each(&mut consider);
    }
    if let Ok(entries) = std::fs::read_dir(&settings.proc) {
        let mut pids: Vec<u32> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        for pid in pids {
            consider(settings.proc.join(pid.to_string()).join("ns/net"));
        }
    }
    out
}

/// Links (index → veth peer index) and addresses of the namespace a netlink handle lives in.
async fn inspect(
    handle: &rtnetlink::Handle,
    path: &Path,
) -> Result<(BTreeMap<IpAddr, u32>, BTreeMap<u32, u32>), DiscoverError> {
    let err = |source| DiscoverError::Netlink {
        path: path.into(),
        source,
    };
    let mut addresses = BTreeMap::new();
    let mut stream = handle.address().get().execute();
    while let Some(msg) = stream.try_next().await.map_err(err)? {
        for attr in &msg.attributes {
            if let AddressAttribute::Address(ip) | AddressAttribute::Local(ip) = attr {
                addresses.insert(*ip, msg.header.index);
            }
        }
    }
    let mut peers = BTreeMap::new();
    let mut stream = handle.link().get().execute();
    while let Some(msg) = stream.try_next().await.map_err(err)? {
        for attr in &msg.attributes {
            if let LinkAttribute::Link(peer) = attr {
                peers.insert(msg.header.index, *peer);
            }
        }
    }
    Ok((addresses, peers))
}

/// A netlink handle whose socket lives in `netns`, and the task driving it.
fn handle_in(
    netns: &Netns,
    home: &HomeNetns,
) -> Result<(rtnetlink::Handle, tokio::task::JoinHandle<()>), DiscoverError> {
    let (conn, handle, _) = netns
        .run(home, rtnetlink::new_connection)
        .map_err(|e| DiscoverError::Read {
            path: netns.path().into(),
            source: std::io::Error::other(e),
        })?
        .map_err(|source| DiscoverError::Read {
            path: netns.path().into(),
            source,
        })?;
    Ok((handle, tokio::spawn(conn)))
}

/// Every namespace on the node except the agent's own, with its addresses; and the agent
/// namespace's own veth peers.
pub async fn scan(
    settings: &DiscoverSettings,
    home: &HomeNetns,
) -> (Vec<Candidate>, BTreeMap<u32, u32>) {
    let mut candidates = Vec::new();
    for path in namespace_files(settings) {
        let Ok(netns) = Netns::open(&path) else {
            continue; // the process exited, or not a namespace
        };
        if netns.cookie() == home.netns().cookie() {
            continue;
        }
        let inspected = match handle_in(&netns, home) {
            Ok((handle, conn)) => {
                let r = inspect(&handle, &path).await;
                conn.abort();
                r
            }
            Err(e) => Err(e),
        };
        match inspected {
            Ok((addresses, peers)) => candidates.push(Candidate {
                path,
                addresses,
                peers,
            }),
            Err(e) => debug!(error = %e, "skipping a namespace"),
        }
    }
    let home_peers = match handle_in(home.netns(), home) {
        Ok((handle, conn)) => {
            let r = inspect(&handle, home.netns().path()).await;
            conn.abort();
            r.map(|(_, peers)| peers).unwrap_or_default()
        }
        Err(_) => BTreeMap::new(),
    };
    (candidates, home_peers)
}

/// How a pod's namespace was (or was not) found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    One(PathBuf),
    None,
    /// Several namespaces hold the pod's addresses and veth pairing does not tell them apart.
    Ambiguous(Vec<PathBuf>),
}

/// Picks the namespace of a pod with `ips` among `candidates` (pure).
pub fn find(ips: &[IpAddr], candidates: &[Candidate], home_peers: &BTreeMap<u32, u32>) -> Found {
    let holding: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| ips.iter().any(|ip| c.addresses.contains_key(ip)))
        .collect();
    match holding.as_slice() {
        [] => Found::None,
        [one] => Found::One(one.path.clone()),
        many => {
            // The pod's interface and an interface of the agent's namespace name each other as
            // veth peers.
            let paired: Vec<&&Candidate> = many
                .iter()
                .filter(|c| {
                    ips.iter()
                        .filter_map(|ip| c.addresses.get(ip))
                        .any(|ifindex| {
                            c.peers
                                .get(ifindex)
                                .is_some_and(|peer| home_peers.get(peer) == Some(ifindex))
                        })
                })
                .collect();
            match paired.as_slice() {
                [one] => Found::One(one.path.clone()),
                _ => Found::Ambiguous(many.iter().map(|c| c.path.clone()).collect()),
            }
        }
    }
}

/// The mesh pods MeshState places on `node`, with addresses that are not the node's own.
pub fn local_mesh_pods<'a>(state: &'a MeshState, node: &str) -> Vec<&'a Workload> {
    let node_ips: BTreeSet<IpAddr> = state
        .nodes
        .get(node)
        .map(|n| n.addresses.iter().copied().collect())
        .unwrap_or_default();
    state
        .workloads
        .values()
        .filter(|w| w.node.as_deref() == Some(node))
        .filter(|w| w.membership.in_mesh())
        .filter(|w| !w.ips.is_empty() && !w.ips.iter().all(|ip| node_ips.contains(ip)))
        .collect()
}

fn sandbox(w: &Workload, netns: PathBuf) -> Sandbox {
    Sandbox {
        uid: w.uid.0.clone(),
        namespace: w.namespace.clone(),
        name: w.name.clone(),
        netns,
        cgroup: None,
        ips: w.ips.clone(),
    }
}

/// Sends `req` to the pod manager; `None` when the manager is gone.
async fn send(commands: &mpsc::Sender<Command>, req: Request) -> Option<Response> {
    let (tx, rx) = oneshot::channel();
    commands.send((req, tx)).await.ok()?;
    rx.await.ok()
}

/// Runs until the state channel or the manager closes.
pub async fn run(
    settings: DiscoverSettings,
    home: HomeNetns,
    mut state: StateHandle,
    commands: mpsc::Sender<Command>,
) {
    // What this discoverer reported, by pod uid (successes and refusals alike: a refused sandbox
    // is retried only when it changes).
    let mut reported: BTreeMap<String, Sandbox> = BTreeMap::new();
    let mut warned: BTreeSet<String> = BTreeSet::new();
    if settings.proc == Path::new(HOST_PROC) {
        info!(proc = HOST_PROC, "discovery reads the host's /proc");
    } else {
        warn!(
            proc = %settings.proc.display(),
            "the host's /proc is not mounted at {HOST_PROC}: discovery sees only the processes of \
             this PID namespace (pods are still found through /var/run/netns)"
        );
    }
    loop {
        let snap = state.current();
        let wanted: BTreeMap<String, &Workload> = local_mesh_pods(&snap, &settings.node)
            .into_iter()
            .map(|w| (w.uid.0.clone(), w))
            .collect();
        for uid in reported.keys().cloned().collect::<Vec<_>>() {
            let still = wanted
                .get(&uid)
                .is_some_and(|w| reported.get(&uid).is_some_and(|s| s.ips == w.ips));
            if !still {
                reported.remove(&uid);
                info!(pod = %uid, "pod left the mesh or the node; removing its sandbox");
                if send(&commands, Request::Del { uid }).await.is_none() {
                    return;
                }
            }
        }
        let missing: Vec<&&Workload> = wanted
            .values()
            .filter(|w| !reported.contains_key(&w.uid.0))
            .collect();
        let mut unresolved = false;
        if !missing.is_empty() {
            let (candidates, home_peers) = scan(&settings, &home).await;
            for w in missing {
                match find(&w.ips, &candidates, &home_peers) {
                    Found::One(path) => {
                        let sb = sandbox(w, path);
                        let Some(resp) = send(&commands, Request::Add { pod: sb.clone() }).await
                        else {
                            return;
                        };
                        if resp.ok {
                            info!(pod = %sb.uid, namespace = %sb.namespace, name = %sb.name,
                                netns = %sb.netns.display(), captured = resp.captured.unwrap_or(false),
                                "discovered the sandbox of a mesh pod");
                        } else {
                            warn!(pod = %sb.uid, netns = %sb.netns.display(),
                                error = resp.error.as_deref().unwrap_or(""), "the pod manager refused a discovered sandbox");
                        }
                        reported.insert(sb.uid.clone(), sb);
                    }
                    Found::None => {
                        unresolved = true;
                        debug!(pod = %w.uid, ips = ?w.ips, "no network namespace holds the pod's addresses yet");
                    }
                    Found::Ambiguous(paths) => {
                        unresolved = true;
                        if warned.insert(w.uid.0.clone()) {
                            warn!(pod = %w.uid, ips = ?w.ips, candidates = ?paths,
                                "several network namespaces hold the pod's addresses; not enrolling it");
                        }
                    }
                }
            }
        }
        let rescan = async {
            if unresolved {
                tokio::time::sleep(settings.rescan).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            next = state.changed() => if next.is_none() { return },
            _ = rescan => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_proc_is_used_when_mounted() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(pick_proc(dir.path()), Path::new("/proc"));
        std::fs::create_dir_all(dir.path().join("1/ns")).unwrap();
        std::fs::write(dir.path().join("1/ns/net"), "").unwrap();
        assert_eq!(pick_proc(dir.path()), dir.path());
    }

    fn cand(path: &str, ips: &[(&str, u32)], peers: &[(u32, u32)]) -> Candidate {
        Candidate {
            path: path.into(),
            addresses: ips
                .iter()
                .map(|(ip, i)| (ip.parse().expect("ip"), *i))
                .collect(),
            peers: peers.iter().copied().collect(),
        }
    }

    #[test]
    fn the_namespace_holding_the_address_is_found() {
        let ip: IpAddr = "10.0.1.2".parse().expect("ip");
        let cands = [
            cand("/run/netns/a", &[("10.0.1.3", 2)], &[]),
            cand("/run/netns/b", &[("10.0.1.2", 2)], &[]),
        ];
        assert_eq!(
            find(&[ip], &cands, &BTreeMap::new()),
            Found::One("/run/netns/b".into())
        );
        assert_eq!(
            find(&["10.9.9.9".parse().expect("ip")], &cands, &BTreeMap::new()),
            Found::None
        );
    }

    #[test]
    fn veth_pairing_settles_duplicates() {
        let ip: IpAddr = "10.0.1.2".parse().expect("ip");
        // Both hold the address on ifindex 2; only b's peer (7) is the home interface whose own
        // peer is 2.
        let cands = [
            cand("/run/netns/a", &[("10.0.1.2", 2)], &[(2, 9)]),
            cand("/run/netns/b", &[("10.0.1.2", 2)], &[(2, 7)]),
        ];
        let home = BTreeMap::from([(7, 2), (8, 5)]);
        assert_eq!(
            find(&[ip], &cands, &home),
            Found::One("/run/netns/b".into())
        );
        assert!(
            matches!(find(&[ip], &cands, &BTreeMap::new()), Found::Ambiguous(p) if p.len() == 2)
        );
    }

    /// Network namespaces made with `ip netns`, deleted on drop.
    struct Namespaces(Vec<String>);

    impl Drop for Namespaces {
        fn drop(&mut self) {
            for ns in &self.0 {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", ns])
                    .status();
            }
        }
    }

    fn ip(args: &str) {
        let status = std::process::Command::new("ip")
            .args(args.split_whitespace())
            .status()
            .expect("running ip");
        assert!(status.success(), "ip {args}");
    }

    /// A node namespace with a pod behind a veth, and a decoy namespace holding the same address
    /// on a veth whose peer stays inside it: the discoverer, running in the node namespace, must pick the pod's and
    /// report it, then withdraw it when the pod leaves the mesh.
    #[test]
    fn discovers_a_real_pod_namespace_and_withdraws_it() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (network namespaces)"
        );
        let id = format!("sdisc{}", std::process::id());
        let (node, pod, decoy) = (
            format!("{id}-node"),
            format!("{id}-pod"),
            format!("{id}-decoy"),
        );
        let _guard = Namespaces(vec![node.clone(), pod.clone(), decoy.clone()]);
        for ns in [&node, &pod, &decoy] {
            ip(&format!("netns add {ns}"));
        }
        ip(&format!(
            "link add p1 netns {node} type veth peer name eth0 netns {pod}"
        ));
        ip(&format!("-n {pod} addr add 10.77.0.2/32 dev eth0"));
        ip(&format!("-n {pod} link set eth0 up"));
        ip(&format!("-n {node} link set p1 up"));
        ip(&format!("-n {decoy} link add d0 type veth peer name d1"));
        ip(&format!("-n {decoy} addr add 10.77.0.2/32 dev d0"));

        let node_path = PathBuf::from("/run/netns").join(&node);
        let pod_path = PathBuf::from("/run/netns").join(&pod);
        let handle = std::thread::spawn(move || {
            let file = std::fs::File::open(&node_path).expect("node netns");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("enter node netns");
            let home = HomeNetns::capture().expect("home");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("rt");
            rt.block_on(async move {
                use crate::state::{Membership, Node, Workload, WorkloadUid};
                let mut mesh = MeshState::default();
                std::sync::Arc::make_mut(&mut mesh.nodes).insert(
                    "n1".into(),
                    Node {
                        name: "n1".into(),
                        addresses: vec!["192.0.2.1".parse().expect("ip")],
                        labels: Default::default(),
                    },
                );
                let mut w = Workload {
                    uid: WorkloadUid("u1".into()),
                    name: "web".into(),
                    namespace: "shop".into(),
                    service_account: "default".into(),
                    node: Some("n1".into()),
                    ips: vec!["10.77.0.2".parse().expect("ip")],
                    labels: Default::default(),
                    annotations: Default::default(),
                    membership: Membership::Namespace,
                    ports: Default::default(),
                    ready: true,
                };
                std::sync::Arc::make_mut(&mut mesh.workloads).insert(w.uid.clone(), w.clone());
                let (publisher, state) = crate::state::channel();
                publisher.publish(mesh.clone());
                let (tx, mut rx) = mpsc::channel(4);
                let settings = DiscoverSettings {
                    rescan: Duration::from_millis(100),
                    netns_dirs: vec!["/run/netns".into()],
                    ..DiscoverSettings::new("n1")
                };
                let task = tokio::spawn(run(settings, home, state, tx));
                async fn next(rx: &mut mpsc::Receiver<Command>) -> Command {
                    tokio::time::timeout(Duration::from_secs(10), rx.recv())
                        .await
                        .expect("a request within 10 s")
                        .expect("channel open")
                }
                let (req, reply) = next(&mut rx).await;
                let Request::Add { pod } = req else {
                    panic!("expected Add, got {req:?}")
                };
                assert_eq!(
                    pod.netns, pod_path,
                    "picked the veth-paired namespace, not the decoy"
                );
                assert_eq!((pod.uid.as_str(), pod.name.as_str()), ("u1", "web"));
                let _ = reply.send(Response {
                    ok: true,
                    captured: Some(true),
                    error: None,
                    sandboxes: vec![],
                });

                w.membership = Membership::Outside;
                std::sync::Arc::make_mut(&mut mesh.workloads).insert(w.uid.clone(), w);
                publisher.publish(mesh);
                let (req, reply) = next(&mut rx).await;
                assert_eq!(req, Request::Del { uid: "u1".into() });
                let _ = reply.send(Response {
                    ok: true,
                    captured: Some(false),
                    error: None,
                    sandboxes: vec![],
                });
                task.abort();
            });
        });
        handle.join().expect("discoverer thread");
    }
}

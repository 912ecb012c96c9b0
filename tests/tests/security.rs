//! End-to-end: hostile pods and hostile peers (issue 15). Each test carries out one attack, then
//! shows that nothing reached the target, that the agent is alive with bounded file descriptors
//! and memory (printed), and that legitimate traffic still flows.
use std::{
    fs::File,
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    time::{Duration, Instant},
};

use sluice_tests::{
    metrics,
    world::{PodSpec, World},
};

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");

fn to(w: &World, pod: &str, port: u16) -> SocketAddr {
    SocketAddr::new(w.pod(pod).ipv4, port)
}

/// Runs `f` on a thread inside the network namespace at `netns` (sockets made there stay there).
fn in_netns<T: Send + 'static>(netns: PathBuf, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = File::open(&netns).unwrap_or_else(|e| panic!("open {}: {e}", netns.display()));
    std::thread::spawn(move || {
        // SAFETY: setns on this short-lived thread only; its sockets are made after it.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns: {}",
            std::io::Error::last_os_error()
        );
        f()
    })
    .join()
    .expect("netns thread")
}

/// The agent's open file descriptors and resident memory (KiB), printed.
fn agent_health(w: &World, node: usize, when: &str) -> (usize, u64) {
    let pid = w.agents[&node]
        .pid()
        .unwrap_or_else(|| panic!("node {node}'s agent is not running ({when})"));
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("node {node}'s agent (pid {pid}) is gone ({when}): {e}"))
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    println!("node {node} agent (pid {pid}) {when}: {fds} fds, VmRSS {rss_kib} KiB");
    (fds, rss_kib)
}

/// Panics unless the agent is alive and its fds and RSS stayed near `base`.
fn assert_bounded(w: &World, node: usize, base: (usize, u64), fd_slack: usize, when: &str) {
    let (fds, rss) = agent_health(w, node, when);
    assert!(
        fds <= base.0 + fd_slack,
        "node {node}'s agent holds {fds} fds {when}, {} before the attack",
        base.0
    );
    assert!(
        rss <= base.1 + 64 * 1024,
        "node {node}'s agent RSS {rss} KiB {when}, {} KiB before the attack",
        base.1
    );
}

/// Whether the peer has closed (or reset) `s`, without waiting.
fn closed_by_peer(s: &TcpStream) -> bool {
    s.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 64];
    let mut reader = s;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// The first bytes of a TLS ClientHello whose record promises more than is ever sent.
const PARTIAL_CLIENT_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03];

/// Short server-side HBONE limits for the tests (the defaults are 10 s and 1024).
const HBONE_LIMITS: &str = "  hbone:\n    handshakeTimeoutSeconds: 2\n    firstRequestTimeoutSeconds: 2\n    maxUnauthenticatedConnections: 64\n";

/// Item 10: a hostile client opens many TCP connections to a pod's 15008 and never finishes a
/// TLS handshake (sends nothing, or half a ClientHello). They are closed after the handshake
/// timeout, beyond the cap they are closed at once, and mutual-TLS traffic goes on.
#[test]
fn security_hbone_port_held_open_without_authenticating_is_closed() {
    let mut w = World::build(
        2,
        &[
            PodSpec::new("a", "mesh", 1),
            PodSpec::new("c", "mesh", 1),
            PodSpec::new("b", "mesh", 2),
            PodSpec::new("hostile", "plain", 1),
        ],
    );
    w.namespace("mesh", &[AMBIENT]);
    w.namespace("plain", &[]);
    w.start_agent(1, HBONE_LIMITS);
    w.start_agent(2, HBONE_LIMITS);
    for pod in ["a", "b", "c", "hostile"] {
        w.enroll(pod);
    }
    let server = w.serve("b", "0.0.0.0:8080");
    let b_app = to(&w, "b", 8080).to_string();
    // a's pool now holds a mutual-TLS connection to b.
    w.connect("a", &b_app, 1000);
    server.drain();
    let base = agent_health(&w, 2, "before the attack");

    // The attack: 300 connections to b's HBONE port, half silent, half a partial ClientHello.
    let hbone = to(&w, "b", 15008);
    let attack_started = Instant::now();
    let hostile = in_netns(w.pod("hostile").netns_path(), move || {
        let mut socks = Vec::new();
        for i in 0..300 {
            if let Ok(mut s) = TcpStream::connect_timeout(&hbone, Duration::from_secs(2)) {
                if i % 2 == 1 {
                    let _ = s.write_all(PARTIAL_CLIENT_HELLO);
                }
                socks.push(s);
            }
        }
        socks
    });
    println!(
        "{} hostile connections to {hbone} opened in {:?}",
        hostile.len(),
        attack_started.elapsed()
    );
    std::thread::sleep(Duration::from_millis(500));
    // While the attack holds: the agent is bounded by the cap, and pooled traffic flows.
    assert_bounded(
        &w,
        2,
        base,
        64 + 32,
        "while 300 unauthenticated connections wait",
    );
    w.connect("a", &b_app, 1000);

    // After the handshake timeout (2 s) every hostile connection has been closed.
    std::thread::sleep(Duration::from_secs(4).saturating_sub(attack_started.elapsed()));
    let open = hostile.iter().filter(|s| !closed_by_peer(s)).count();
    assert_eq!(
        open,
        0,
        "{open} of {} hostile connections to 15008 still open {:?} after they were made, without a TLS handshake",
        hostile.len(),
        attack_started.elapsed()
    );
    drop(hostile);
    std::thread::sleep(Duration::from_millis(300));
    assert_bounded(&w, 2, base, 16, "after the attack");

    // The cap was hit: metric and log line.
    let (_, text) = w.node_http_get(2, 15020, "/metrics");
    let refused = metrics::sample(&text, "sluice_hbone_unauthenticated_refused_total", &[]);
    assert!(refused > 0.0, "no refusal counted over the cap:\n{text}");
    let timeouts = metrics::sample(&text, "sluice_hbone_handshake_timeouts_total", &[]);
    assert!(timeouts > 0.0, "no handshake timeout counted:\n{text}");
    let logged = w.agents[&2].log_lines().iter().any(|l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.contains("unauthenticated HBONE connections"))
    });
    assert!(logged, "no log line for the cap:\n{}", w.agents[&2].tail());

    // Nothing reached b's application, and a new mutual-TLS handshake (c's own) still works.
    assert!(
        server.try_accepted(Duration::from_millis(200)).is_some(),
        "the pooled connection during the attack did not reach b"
    );
    server.drain();
    w.connect("c", &b_app, 1000);
    let (peer, _) = server.accepted();
    assert_eq!(peer.ip(), w.pod("c").ipv4);
}

/// Item 2: a pod connects to the agent's own listeners (its 127.0.0.1/::1 15001 and 15006, and
/// its own address on 15001, 15006 and 15008). The agent refuses them without dialling itself.
#[test]
fn security_pod_cannot_make_the_agent_loop_into_itself() {
    let mut w = World::build(
        1,
        &[PodSpec::new("a", "mesh", 1), PodSpec::new("b", "mesh", 1)],
    );
    w.namespace("mesh", &[AMBIENT]);
    w.start_agent(1, "  proxy:\n    maxConnectionsPerPod: 100\n");
    w.enroll("a");
    w.enroll("b");
    let _server = w.serve("b", "0.0.0.0:8080");
    let b_app = to(&w, "b", 8080).to_string();
    w.connect("a", &b_app, 1000);
    let base = agent_health(&w, 1, "before the attack");
    let pid = w.agents[&1].pid().expect("agent runs");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default()
        .to_owned();
    println!("agent {nofile}");
    let mut parts = nofile.split_whitespace().skip(3);
    assert_eq!(
        parts.next(),
        parts.next(),
        "the agent did not raise RLIMIT_NOFILE to its hard limit: {nofile}"
    );

    let a = w.pod("a").clone();
    let targets: Vec<SocketAddr> = [
        "127.0.0.1:15006",
        "[::1]:15006",
        "127.0.0.1:15001",
        "[::1]:15001",
    ]
    .iter()
    .map(|s| s.parse().expect("address"))
    .chain([
        SocketAddr::new(a.ipv4, 15006),
        SocketAddr::new(a.ipv4, 15001),
        SocketAddr::new(a.ipv4, 15008),
        SocketAddr::new(a.ipv6, 15006),
    ])
    .collect();
    let outcomes = in_netns(a.netns_path(), move || {
        targets
            .into_iter()
            .map(|t| {
                let outcome = match TcpStream::connect_timeout(&t, Duration::from_secs(2)) {
                    Err(e) => format!("connect: {e}"),
                    Ok(mut s) => {
                        s.set_read_timeout(Some(Duration::from_secs(3))).ok();
                        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
                        let mut buf = Vec::new();
                        match s.read_to_end(&mut buf) {
                            Ok(n) => format!("closed after {n} bytes"),
                            Err(e) if e.kind() == ErrorKind::WouldBlock => "held open".into(),
                            Err(e) if e.kind() == ErrorKind::TimedOut => "held open".into(),
                            Err(e) => format!("reset: {e}"),
                        }
                    }
                };
                (t, outcome)
            })
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(500));
    println!("{outcomes:?}");
    assert_bounded(&w, 1, base, 32, "after connecting to its own listeners");
    for (t, outcome) in &outcomes {
        assert!(
            !outcome.contains("held open"),
            "{t}: the agent held the connection open: {outcome}"
        );
    }
    let refused = w.agents[&1].wait_access(1, |l| {
        l["outcome"] == "refused"
            && l["reason"]
                .as_str()
                .is_some_and(|r| r.contains("agent's own listener"))
    });
    assert!(
        refused >= 1,
        "no refusal of a connection to the agent's own listener in the access log: {:?}",
        w.agents[&1].access_log()
    );

    // The per-pod cap: 300 connections held at once from a, at most 100 through the proxy.
    let v = w.run_in("a", &["fanout", &b_app, "300", "16"]);
    println!("fanout over the cap: ok {} of 300", v["ok"]);
    assert!(
        v["ok"].as_u64().unwrap_or(0) < 300,
        "all 300 connections went through a per-pod cap of 100: {v}"
    );
    let (_, text) = w.node_http_get(1, 15020, "/metrics");
    let capped = metrics::sample(
        &text,
        "sluice_proxy_connection_limit_refusals_total",
        &[("scope", "pod")],
    );
    assert!(capped > 0.0, "no per-pod cap refusal counted:\n{text}");
    assert!(
        w.agents[&1].log_lines().iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("connection cap"))),
        "no log line for the cap"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_bounded(&w, 1, base, 32, "after the fan-out over the cap");
    // Legitimate traffic still flows.
    let conn = w.connect("a", &b_app, 10_000);
    assert!(conn.captured());
}

/// Item 4: a finished (Succeeded) pod keeps its address in its status, and a running pod in
/// another namespace now has it. The live pod must be judged by its own namespace's
/// PeerAuthentication (STRICT), not by the finished pod's (none). A hostNetwork pod is no
/// workload either.
#[test]
fn security_finished_pod_does_not_lend_its_policy_to_the_live_pod() {
    let mut w = World::build(
        2,
        &[
            PodSpec::new("a", "mesh", 1),
            PodSpec::new("b", "mesh", 2),
            PodSpec::new("outside", "plain", 1),
        ],
    );
    w.namespace("mesh", &[AMBIENT]);
    w.namespace("old", &[AMBIENT]);
    w.namespace("plain", &[]);
    w.extra_resources = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: mesh}
spec:
  mtls: {mode: STRICT}
"#
    .into();
    let b = w.pod("b").clone();
    // After b in the file, as a later list would have it.
    w.late_resources = format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: ghost, namespace: old, uid: ghost-uid}}
spec: {{nodeName: node2, serviceAccountName: ghost, containers: []}}
status: {{phase: Succeeded, podIPs: [{{ip: "{}"}}, {{ip: "{}"}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: hostnet, namespace: mesh, uid: hostnet-uid}}
spec: {{nodeName: node2, hostNetwork: true, serviceAccountName: hostnet, containers: []}}
status: {{phase: Running, podIPs: [{{ip: "172.30.1.2"}}]}}
"#,
        b.ipv4, b.ipv6
    );
    w.start_agent(1, "");
    w.start_agent(2, "");
    for pod in ["a", "b", "outside"] {
        w.enroll(pod);
    }
    let server = w.serve("b", "0.0.0.0:8080");
    let b_app = to(&w, "b", 8080).to_string();
    let base = agent_health(&w, 2, "before the attack");

    // The attack: plaintext from outside the mesh to b, which STRICT refuses.
    let attack = w.try_connect("outside", &b_app, 100);
    let reached = server.try_accepted(Duration::from_millis(500));
    assert!(
        attack.is_err() && reached.is_none(),
        "plaintext reached b under STRICT (judged by the finished pod's namespace): {attack:?}, server saw {reached:?}"
    );
    let (_, dump) = w.node_http_get(2, 15000, "/config_dump");
    assert!(
        !dump.contains("ghost-uid") && !dump.contains("hostnet-uid"),
        "a finished or hostNetwork pod is a workload in node 2's state:\n{dump}"
    );
    assert_bounded(&w, 2, base, 16, "after the attack");

    // b is still b: mutual TLS from a carries b's identity.
    w.connect("a", &b_app, 1000);
    let n = w.agents[&2].wait_access(1, |l| {
        l["route"] == "hbone" && l["dst_identity"] == "spiffe://cluster.local/ns/mesh/sa/b"
    });
    assert_eq!(n, 1, "{:?}", w.agents[&2].access_log());
}

/// Item 13: `/config_dump` printed every annotation of every pod, including
/// `kubectl.kubernetes.io/last-applied-configuration` (which may carry secrets an operator put
/// in a manifest). It prints only what the data path uses.
#[test]
fn security_config_dump_shows_only_what_the_data_path_uses() {
    let mut w = World::build(
        1,
        &[
            PodSpec::new("a", "mesh", 1),
            PodSpec::new("b", "mesh", 1)
                .annotate(
                    "kubectl.kubernetes.io/last-applied-configuration",
                    r#"{"env":[{"name":"DB_PASSWORD","value":"hunter2-secret"}]}"#,
                )
                .annotate("example.com/internal-note", "do-not-print"),
        ],
    );
    w.namespace("mesh", &[AMBIENT]);
    w.start_agent(1, "");
    w.enroll("a");
    w.enroll("b");
    let _server = w.serve("b", "0.0.0.0:8080");
    let base = agent_health(&w, 1, "before reading the dump");
    let (status, dump) = w.node_http_get(1, 15000, "/config_dump");
    assert!(status.contains("200"), "{status}");
    assert!(
        dump.contains("\"b\""),
        "b is missing from the dump:\n{dump}"
    );
    for secret in [
        "last-applied-configuration",
        "hunter2-secret",
        "do-not-print",
    ] {
        assert!(
            !dump.contains(secret),
            "/config_dump prints {secret:?}, which the data path never uses"
        );
    }
    assert_bounded(&w, 1, base, 16, "after reading the dump");
    w.connect("a", &to(&w, "b", 8080).to_string(), 1000);
}

/// Item 9: an AuthorizationPolicy that was never valid. An ALLOW policy that cannot be read
/// must deny everything it selects (not leave it allow-all); a DENY policy must still deny what
/// its readable parts name (here: port 8080), not leave it unprotected.
#[test]
fn security_never_valid_authorization_policies_fail_closed() {
    let mut w = World::build(
        2,
        &[
            PodSpec::new("a", "mesh", 1),
            PodSpec::new("b", "mesh", 2).label("app", "b"),
            PodSpec::new("c", "mesh", 2).label("app", "c"),
        ],
    );
    w.namespace("mesh", &[AMBIENT]);
    w.extra_resources = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-typo, namespace: mesh}
spec:
  selector: {matchLabels: {app: b}}
  action: ALLOW
  rules:
  - from:
    - source: {ipBlocks: [10.0.0.0/33]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-typo, namespace: mesh}
spec:
  selector: {matchLabels: {app: c}}
  action: DENY
  rules:
  - to:
    - operation: {ports: ["8080"]}
    when:
    - {key: source.ip, values: [not-an-ip]}
"#
    .into();
    w.start_agent(1, "");
    w.start_agent(2, "");
    for pod in ["a", "b", "c"] {
        w.enroll(pod);
    }
    let b = w.serve("b", "0.0.0.0:8080");
    let c8080 = w.serve("c", "0.0.0.0:8080");
    let c9090 = w.serve("c", "0.0.0.0:9090");
    let base = agent_health(&w, 2, "before the attack");

    // The attack: a connects where the broken policies were meant to stop it.
    let to_b = w.try_connect("a", &to(&w, "b", 8080).to_string(), 100);
    let reached_b = b.try_accepted(Duration::from_millis(500));
    assert!(
        to_b.is_err() && reached_b.is_none(),
        "a never-valid ALLOW policy left b open: {to_b:?}, b saw {reached_b:?}"
    );
    let to_c = w.try_connect("a", &to(&w, "c", 8080).to_string(), 100);
    let reached_c = c8080.try_accepted(Duration::from_millis(500));
    assert!(
        to_c.is_err() && reached_c.is_none(),
        "a never-valid DENY policy left c:8080 open: {to_c:?}, c saw {reached_c:?}"
    );
    // Logged, naming the field, and saying how it fails closed.
    let log = w.agents[&2].log_lines();
    let said = |name: &str, words: &str| {
        log.iter().any(|l| {
            let text = l.to_string();
            text.contains(name) && text.contains(words)
        })
    };
    assert!(
        said("allow-typo", "denies every connection"),
        "no log line for allow-typo:\n{}",
        w.agents[&2].tail()
    );
    assert!(
        said("deny-typo", "without the clauses"),
        "no log line for deny-typo:\n{}",
        w.agents[&2].tail()
    );
    assert_bounded(&w, 2, base, 16, "after the attack");

    // What the DENY policy does not name still flows.
    w.connect("a", &to(&w, "c", 9090).to_string(), 1000);
    let (peer, _) = c9090.accepted();
    assert_eq!(peer.ip(), w.pod("a").ipv4);
}

/// Item 9: RBAC drift. The agent may list PeerAuthentication but not AuthorizationPolicy. That
/// is not "the CRD is absent" (no policies): the source names the kind as forbidden, which
/// holds the agent's readiness back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_forbidden_policy_kind_is_named_not_taken_as_absent() {
    use sluice_tests::{kube_mesh, kube_server::KubeServer};
    let server = KubeServer::start();
    let client = server.client().await;
    kube_mesh::install_crds(&client).await;
    let deploy = kube_mesh::deploy_dir();
    for file in ["namespace.yaml", "serviceaccount.yaml", "rbac.yaml"].map(|f| deploy.join(f)) {
        let text = std::fs::read_to_string(&file).expect("read deploy file");
        // The drift: the ClusterRole loses AuthorizationPolicy.
        let text = text.replace(
            "resources: [peerauthentications, authorizationpolicies]",
            "resources: [peerauthentications]",
        );
        for doc in kube_mesh::documents(&text) {
            kube_mesh::apply(&client, &doc).await;
        }
    }
    let as_agent = kube_mesh::client_as_service_account(&server, "sluice-system", "sluice").await;
    let mesh = kube_mesh::Mesh::start(&as_agent, sluice::state::MeshSettings::default()).await;
    let rebuilt = mesh.source.rebuilt().borrow().clone();
    println!("absent {:?}", rebuilt.absent);
    let ap = "AuthorizationPolicy.security.istio.io".to_owned();
    assert!(
        !rebuilt.absent.contains(&ap),
        "a forbidden AuthorizationPolicy watch was taken as 'CRD absent' (no policies): {:?}",
        rebuilt.absent
    );
    assert_eq!(rebuilt.forbidden, vec![ap]);
}

/// Item 5: a pod MeshState does not know (yet). Plaintext to it under a namespace-wide STRICT
/// was let through, and so was its egress under REGISTRY_ONLY. Now a connection waits
/// `spec.proxy.unknownWorkloadHoldMs` for the pod to appear, then is refused; once the pod is
/// known, mutual TLS to it works.
#[test]
fn security_pod_unknown_to_the_mesh_state_fails_closed() {
    let mut w = World::build(
        2,
        &[
            PodSpec::new("a", "mesh", 1),
            PodSpec::new("h", "mesh", 2),
            PodSpec::new("outside", "plain", 1),
        ],
    );
    w.namespace("mesh", &[AMBIENT]);
    w.namespace("plain", &[]);
    w.extra_resources = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: mesh}
spec:
  mtls: {mode: STRICT}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |-
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
"#
    .into();
    w.hidden_pods.insert("h".into());
    let hold = "  proxy:\n    unknownWorkloadHoldMs: 1000\n";
    w.start_agent(1, hold);
    w.start_agent(2, hold);
    for pod in ["a", "h", "outside"] {
        w.enroll(pod);
    }
    let server = w.serve("h", "0.0.0.0:8080");
    let h_app = to(&w, "h", 8080).to_string();
    // Somewhere outside the mesh that no ServiceEntry lists: node 1's underlay address.
    let node1 = format!("172.30.{}.1", sluice_tests::world::link_id(1, 2));
    let outside_listener = in_netns(
        PathBuf::from("/run/netns").join(w.node_netns(1)),
        move || std::net::TcpListener::bind((node1.as_str(), 7777)).expect("listen on node 1"),
    );
    outside_listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let base = agent_health(&w, 2, "before the attack");

    // Attack 1: plaintext to the unknown pod.
    let started = Instant::now();
    let plain = w.try_connect("outside", &h_app, 100);
    let reached = server.try_accepted(Duration::from_millis(300));
    assert!(
        plain.is_err() && reached.is_none(),
        "plaintext reached a pod unknown to the mesh state under STRICT: {plain:?}, h saw {reached:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "refused after {:?}, without waiting for the state",
        started.elapsed()
    );
    // Attack 2: egress from the unknown pod under REGISTRY_ONLY.
    let egress_addr = format!("172.30.{}.1:7777", sluice_tests::world::link_id(1, 2));
    let out = w.run_in("h", &["connect", &egress_addr, "10"]);
    std::thread::sleep(Duration::from_millis(300));
    let leaked = outside_listener.accept().is_ok();
    assert!(
        !leaked,
        "egress from a pod unknown to the mesh state skipped REGISTRY_ONLY: {out}"
    );
    let refusals = w.agents[&2].wait_access(2, |l| {
        l["outcome"] != "ok" && l.to_string().contains("not in the mesh state")
    });
    assert!(
        refusals >= 2,
        "no refusals naming the unknown pod: {:?}",
        w.agents[&2].access_log()
    );
    assert_bounded(&w, 2, base, 16, "after the attack");

    // Once the pod is known, mutual TLS to it works.
    w.hidden_pods.clear();
    w.rewrite_configs();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match w.try_connect("a", &h_app, 1000) {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "a → h once h is known: {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

//! End-to-end: pod-to-pod traffic over HBONE (mutual TLS, HTTP/2 CONNECT) between node proxies,
//! with PeerAuthentication and AuthorizationPolicy enforced at the receiving side.
use std::net::SocketAddr;

use sluice_tests::{
    metrics,
    world::{PodSpec, World},
};

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");

fn world(policies: &str) -> World {
    let mut w = World::build(
        2,
        &[
            PodSpec::new("a", "mesh", 1),
            PodSpec::new("b", "mesh", 2),
            PodSpec::new("c", "mesh", 2),
            PodSpec::new("outside", "plain", 1),
        ],
    );
    w.namespace("mesh", &[AMBIENT]);
    w.namespace("plain", &[]);
    w.extra_resources = policies.into();
    w.start_agent(1, "");
    w.start_agent(2, "");
    for pod in ["a", "b", "c", "outside"] {
        w.enroll(pod);
    }
    w
}

fn to(w: &World, pod: &str, port: u16) -> String {
    SocketAddr::new(w.pod(pod).ipv4, port).to_string()
}

#[test]
fn mtls_pod_to_pod_across_nodes_carries_identities() {
    let mut w = world("");
    let _b = w.serve("b", "0.0.0.0:8080");
    let conn = w.connect("a", &to(&w, "b", 8080), 200_000);
    assert!(conn.captured());
    assert_eq!(
        conn.server_peer.ip(),
        w.pod("a").ipv4,
        "source address lost through HBONE"
    );
    // The sending side chose HBONE and expected b's identity…
    let sent =
        w.agents[&1].wait_access(1, |l| l["direction"] == "outbound" && l["route"] == "hbone");
    assert_eq!(
        sent,
        1,
        "a → b did not go over HBONE: {:?}",
        w.agents[&1].access_log()
    );
    // …and the receiving side verified a's certificate, and read a's baggage.
    let received = w.agents[&2].wait_access(1, |l| {
        let baggage = l["src_baggage"].as_str().unwrap_or("");
        l["route"] == "hbone"
            && l["src.identity"] == "spiffe://cluster.local/ns/mesh/sa/a"
            && l["dst.identity"] == "spiffe://cluster.local/ns/mesh/sa/b"
            && baggage.contains("k8s.namespace.name=mesh")
            && baggage.contains("k8s.pod.name=a")
            && baggage.contains("service.name=a")
    });
    assert_eq!(
        received,
        1,
        "identities or baggage not seen at the receiver: {:?}",
        w.agents[&2].access_log()
    );
}

#[test]
fn mtls_thousand_concurrent_connections_share_the_pool_and_are_counted() {
    let mut w = world("");
    let _b = w.serve("b", "0.0.0.0:8080");
    let addr = to(&w, "b", 8080);
    // 1,000 connections open at once from one pod, 4 KiB each way, through one HBONE pool.
    let v = w.run_in("a", &["fanout", &addr, "1000", "4096"]);
    assert_eq!(v["ok"], 1000, "some connections lost bytes or failed: {v}");
    let n = w.agents[&2].wait_access(1000, |l| l["route"] == "hbone" && l["outcome"] != "refused");
    assert_eq!(n, 1000);
    let n = w.agents[&1].wait_access(1000, |l| l["route"] == "hbone" && l["outcome"] == "ok");
    assert_eq!(
        n,
        1000,
        "outbound side: {:?}",
        w.agents[&1].access_log().last()
    );

    // Both sides count them, with Istio's labels.
    let a = "spiffe://cluster.local/ns/mesh/sa/a";
    let b = "spiffe://cluster.local/ns/mesh/sa/b";
    let (status, source) = w.node_http_get(1, 15020, "/metrics");
    assert!(status.contains("200"), "{status}");
    let source_labels = [
        ("reporter", "source"),
        ("source_workload", "a"),
        ("source_workload_namespace", "mesh"),
        ("source_principal", a),
        ("destination_workload", "b"),
        ("destination_principal", b),
        ("connection_security_policy", "mutual_tls"),
    ];
    let (_, destination) = w.node_http_get(2, 15020, "/metrics");
    let destination_labels = [
        ("reporter", "destination"),
        ("source_workload", "a"),
        ("source_principal", a),
        ("destination_workload", "b"),
        ("destination_workload_namespace", "mesh"),
        ("destination_principal", b),
        ("connection_security_policy", "mutual_tls"),
    ];
    for (text, labels) in [
        (&source, &source_labels),
        (&destination, &destination_labels),
    ] {
        let get = |name| metrics::sample(text, name, labels);
        assert_eq!(get("istio_tcp_connections_opened_total"), 1000.0, "{text}");
        assert_eq!(get("istio_tcp_connections_closed_total"), 1000.0);
        // Request bytes are "received", response bytes (the server's greeting and the echo) "sent".
        assert_eq!(get("istio_tcp_received_bytes_total"), 1000.0 * 4096.0);
        assert!(get("istio_tcp_sent_bytes_total") > 1000.0 * 4096.0);
    }
    // Pooled: far fewer handshakes than connections, every stream accepted.
    let handshakes = metrics::sample(&source, "sluice_hbone_handshakes_total", &[]);
    assert!(
        (1.0..=50.0).contains(&handshakes),
        "{handshakes} TLS handshakes for 1,000 connections"
    );
    assert_eq!(
        metrics::sample(&source, "sluice_hbone_streams_opened_total", &[]),
        1000.0
    );
}

/// `spec.hbone` reaches the pods' pools: with at most 5 streams per HBONE connection, 20
/// connections held open at once from one pod need at least 4 TLS connections (with the
/// default of 100 they share one).
#[test]
fn mtls_pool_limits_come_from_the_agent_config() {
    let mut w = world("");
    w.start_agent(1, "  hbone:\n    maxStreamsPerConnection: 5\n");
    w.enroll("a");
    let _b = w.serve("b", "0.0.0.0:8080");
    let v = w.run_in("a", &["fanout", &to(&w, "b", 8080), "20", "1024"]);
    assert_eq!(v["ok"], 20, "{v}");
    let (_, text) = w.node_http_get(1, 15020, "/metrics");
    let handshakes = metrics::sample(&text, "sluice_hbone_handshakes_total", &[]);
    let pooled = metrics::sample(&text, "sluice_hbone_pool_connections", &[]);
    // Concurrent callers share a dial, so 4 is what the pool should make; a race may add one.
    assert!(
        (4.0..=6.0).contains(&handshakes),
        "{handshakes} TLS handshakes for 20 concurrent connections at 5 streams each"
    );
    assert_eq!(pooled, handshakes, "idle connections stay pooled");
}

const STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: mesh}
spec:
  mtls: {mode: STRICT}
"#;

#[test]
fn mtls_strict_refuses_plaintext_and_permissive_accepts_it() {
    let mut w = world(STRICT);
    let _b = w.serve("b", "0.0.0.0:8080");
    let refused = w.try_connect("outside", &to(&w, "b", 8080), 1000);
    assert!(
        refused.is_err(),
        "STRICT let plaintext through: {refused:?}"
    );
    let denied =
        w.agents[&2].wait_access(1, |l| l["route"] == "plaintext" && l["outcome"] == "denied");
    assert_eq!(denied, 1, "no denial logged");
    // Mesh traffic still flows under STRICT.
    w.connect("a", &to(&w, "b", 8080), 1000);
    // So do the node's own connections (kubelet probes), through the proxy to the app.
    let probe = w.run_on_node(2, &["connect", &to(&w, "b", 8080), "100"]);
    assert!(
        probe.get("error").is_none(),
        "probe from the node refused: {probe}"
    );
    let from_node = w.agents[&2].wait_access(1, |l| {
        l["route"] == "plaintext" && l["from_node"] == true && l["outcome"] == "ok"
    });
    assert_eq!(
        from_node,
        1,
        "the node's probe did not pass the inbound proxy: {:?}",
        w.agents[&2].access_log()
    );
    // With the exemption switched off the node is a plaintext client like any other: refused.
    w.start_agent(2, "  capture:\n    nodeTrafficBypassesPolicy: false\n");
    w.enroll("b");
    let probe = w.run_on_node(2, &["connect", &to(&w, "b", 8080), "100"]);
    assert!(
        probe.get("error").is_some(),
        "STRICT let the node's plaintext through with the exemption off: {probe}"
    );
    let denied = w.agents[&2].wait_access(1, |l| {
        l["route"] == "plaintext" && l["outcome"] == "denied" && l["src.addr"].as_str().is_some()
    });
    assert_eq!(denied, 1, "{:?}", w.agents[&2].access_log());
    // Delete the policy: the namespace default (PERMISSIVE) lets the same client in.
    w.extra_resources.clear();
    w.start_agent(2, "");
    w.enroll("b");
    let conn = w.connect("outside", &to(&w, "b", 8080), 1000);
    assert_eq!(conn.server_peer.ip(), w.pod("outside").ipv4);
}

const DENY_A_ON_8080: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-a, namespace: mesh}
spec:
  selector: {matchLabels: {app: b}}
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/mesh/sa/a"]}}]
    to: [{operation: {ports: ["8080"]}}]
"#;

#[test]
fn mtls_deny_by_principal_and_port() {
    let mut w = World::build(
        2,
        &[
            PodSpec::new("a", "mesh", 1),
            PodSpec::new("b", "mesh", 2).label("app", "b"),
            PodSpec::new("c", "mesh", 2),
        ],
    );
    w.namespace("mesh", &[AMBIENT]);
    w.extra_resources = DENY_A_ON_8080.into();
    w.start_agent(1, "");
    w.start_agent(2, "");
    for pod in ["a", "b", "c"] {
        assert!(w.enroll(pod));
    }
    let _b1 = w.serve("b", "0.0.0.0:8080");
    let _b2 = w.serve("b", "0.0.0.0:8081");
    assert!(
        w.try_connect("a", &to(&w, "b", 8080), 100).is_err(),
        "DENY by principal and port not enforced"
    );
    let refused = w.agents[&2].wait_access(1, |l| l["status"] == 403);
    assert_eq!(refused, 1, "no 403 logged: {:?}", w.agents[&2].access_log());
    // Another principal, or another port, passes.
    w.connect("c", &to(&w, "b", 8080), 100);
    w.connect("a", &to(&w, "b", 8081), 100);
}

#[test]
fn mtls_refuses_peers_from_another_root_trust_domain_or_time() {
    use sluice_tests::hbone_client::{certificate, probe};
    use std::time::{Duration, SystemTime};
    let mut w = world("");
    let b_server = w.serve("b", "0.0.0.0:8080");
    let hbone = SocketAddr::new(w.pod("b").ipv4, 15008);
    let authority = SocketAddr::new(w.pod("b").ipv4, 8080);
    let mesh = sluice::identity::BuiltinCa::load(
        &w.root_cert(),
        &w.dir.path().join("root-key.pem"),
        "cluster.local",
    )
    .expect("the world's mesh root");
    let other_root = sluice::identity::BuiltinCa::generate("cluster.local").expect("root");
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let a = "spiffe://cluster.local/ns/mesh/sa/a";
    // From a pod outside the mesh (its connections are not captured), straight to b's 15008.
    let from = w.pod("outside").netns_path();

    // The same client with a good certificate gets through: the probe can succeed.
    let good = certificate(&mesh, a, now - hour, now + hour);
    let line = probe(&from, good, hbone, authority).expect("a valid mesh certificate is accepted");
    assert!(line.contains("accepted"), "{line}");
    let (peer, _) = b_server.accepted();
    assert_eq!(
        peer.ip(),
        w.pod("outside").ipv4,
        "client address not preserved"
    );

    let bad = [
        (
            "another root",
            certificate(&other_root, a, now - hour, now + hour),
        ),
        (
            "another trust domain",
            certificate(
                &mesh,
                "spiffe://evil.example/ns/mesh/sa/a",
                now - hour,
                now + hour,
            ),
        ),
        ("expired", certificate(&mesh, a, now - 2 * hour, now - hour)),
        (
            "not yet valid",
            certificate(&mesh, a, now + hour, now + 2 * hour),
        ),
    ];
    for (what, cert) in bad {
        let result = probe(&from, cert, hbone, authority);
        assert!(
            result.is_err(),
            "a certificate from {what} was accepted: {result:?}"
        );
    }
    let refused = w.agents[&2].wait_access(4, |l| l["outcome"] == "handshake");
    assert_eq!(
        refused,
        4,
        "refusals not logged: {:?}",
        w.agents[&2].access_log()
    );
    // None of them reached the application.
    assert!(
        b_server.try_accepted(Duration::from_millis(500)).is_none(),
        "a refused peer reached the application"
    );
}

#[test]
fn mtls_refuses_a_server_with_the_wrong_identity() {
    let mut w = world("");
    let _b = w.serve("b", "0.0.0.0:8080");
    let _c = w.serve("c", "0.0.0.0:8080");
    // Node 1 is told b runs as service account `payments`; b's node issues it `b`.
    let b = w.pods.iter_mut().find(|p| p.name == "b").expect("pod b");
    b.service_account = "payments".into();
    w.start_agent(1, "");
    for pod in ["a", "outside"] {
        w.enroll(pod);
    }
    let refused = w.try_connect("a", &to(&w, "b", 8080), 100);
    assert!(refused.is_err(), "a server with the wrong SAN was trusted");
    let failed = w.agents[&1].wait_access(1, |l| {
        l["route"] == "hbone"
            && l["outcome"] == "connect"
            && l["dst.identity"] == "spiffe://cluster.local/ns/mesh/sa/payments"
    });
    assert_eq!(failed, 1, "{:?}", w.agents[&1].access_log());
    // The same client reaches c, whose identity matches: the refusal was about the SAN.
    w.connect("a", &to(&w, "c", 8080), 100);
}

#[test]
fn mtls_on_the_wire_between_nodes_is_tls_to_15008() {
    use sluice_tests::wire::{Capture, longest_counting_run};
    let mut w = world("");
    let _b = w.serve("b", "0.0.0.0:8080");
    let (a, b, outside) = (w.pod("a").ipv4, w.pod("b").ipv4, w.pod("outside").ipv4);
    // Node 1's underlay link to node 2 is `n2`.
    let capture = Capture::start(&w.node_netns(1), "n2");
    w.connect("a", &to(&w, "b", 8080), 256 * 1024); // a counting pattern, echoed
    w.connect("outside", &to(&w, "b", 8080), 64 * 1024); // plaintext, as a control
    let segments = capture.stop();

    let mesh: Vec<_> = segments
        .iter()
        .filter(|s| (s.src.ip() == a || s.dst.ip() == a) && (s.src.ip() == b || s.dst.ip() == b))
        .filter(|s| !s.payload.is_empty())
        .collect();
    let bytes: usize = mesh.iter().map(|s| s.payload.len()).sum();
    assert!(
        bytes > 2 * 256 * 1024,
        "only {bytes} bytes of a ↔ b crossed the wire"
    );
    assert!(
        mesh.iter()
            .all(|s| s.dst.port() == 15008 || s.src.port() == 15008),
        "a ↔ b traffic outside the HBONE port: {:?}",
        mesh.iter()
            .map(|s| (s.src, s.dst))
            .find(|(x, y)| x.port() != 15008 && y.port() != 15008)
    );
    let first = mesh
        .iter()
        .find(|s| s.dst.port() == 15008)
        .expect("a client flight");
    assert_eq!(
        &first.payload[..2],
        &[0x16, 0x03],
        "the first bytes to 15008 are not a TLS handshake record"
    );
    let longest = mesh
        .iter()
        .map(|s| longest_counting_run(&s.payload))
        .max()
        .unwrap_or(0);
    assert!(
        longest < 32,
        "a {longest}-byte run of the test pattern: plaintext on the wire"
    );

    // The detector sees plaintext when there is some: the non-mesh client's bytes.
    let plain = segments
        .iter()
        .filter(|s| s.src.ip() == outside && s.dst == SocketAddr::new(b, 8080))
        .map(|s| longest_counting_run(&s.payload))
        .max()
        .unwrap_or(0);
    assert!(
        plain >= 1024,
        "the control flow's plaintext was not seen ({plain})"
    );
}

#[test]
fn mtls_certificate_rotation_during_a_long_transfer_loses_nothing() {
    // Certificates live 60 s (the shortest allowed) and are renewed at half-life.
    const TTL: &str = "  workloadCertTtl: 60s";
    let mut w = World::build(
        2,
        &[PodSpec::new("a", "mesh", 1), PodSpec::new("b", "mesh", 2)],
    );
    w.namespace("mesh", &[AMBIENT]);
    w.identity_extra = TTL.into();
    w.start_agent(1, "");
    w.start_agent(2, "");
    assert!(w.enroll("a"));
    assert!(w.enroll("b"));
    let _b = w.serve("b", "0.0.0.0:8080");
    let serial = |node: usize, identity: &str| -> String {
        let (_, body) = w.node_http_get(node, 15000, "/config_dump");
        let dump: serde_json::Value = serde_json::from_str(&body).expect("config dump");
        dump["certificates"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["identity"] == identity)
            .map(|c| c["serial"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    let a_id = "spiffe://cluster.local/ns/mesh/sa/a";
    let b_id = "spiffe://cluster.local/ns/mesh/sa/b";
    // One connection held for 40 s, sending all along: it spans the renewal at ~30 s.
    let held = {
        let addr = to(&w, "b", 8080);
        let pod = w.pod("a").clone();
        std::thread::spawn(move || {
            let out = pod
                .command(sluice_tests::world::testpod_bin())
                .args(["hold", &addr, "40"])
                .output()
                .expect("hold");
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
        })
    };
    // The dump's certificate list is refreshed every few seconds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let (a_before, b_before) = loop {
        let (a, b) = (serial(1, a_id), serial(2, b_id));
        if (!a.is_empty() && !b.is_empty()) || std::time::Instant::now() > deadline {
            break (a, b);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert!(
        !a_before.is_empty() && !b_before.is_empty(),
        "certificates not issued (or not in /config_dump)"
    );
    let result = held.join().expect("hold thread");
    assert!(
        result.get("error").is_none(),
        "the long transfer broke: {result}"
    );
    // `hold` checks every echoed byte against what it sent and fails on any difference.
    let echoed = result["echoed"].as_u64().unwrap_or(0);
    assert!(echoed > 1_000_000, "too little came back: {result}");
    let (a_after, b_after) = (serial(1, a_id), serial(2, b_id));
    assert_ne!(
        a_before, a_after,
        "a's certificate was not rotated during the transfer"
    );
    assert_ne!(
        b_before, b_after,
        "b's certificate was not rotated during the transfer"
    );
    // New connections after the rotation handshake with the new certificates.
    w.connect("a", &to(&w, "b", 8080), 1000);
}

//! End-to-end: pod-to-pod traffic over HBONE (mutual TLS, HTTP/2 CONNECT) between node proxies,
//! with PeerAuthentication and AuthorizationPolicy enforced at the receiving side.
use std::net::SocketAddr;

use sluice_tests::world::{PodSpec, World};

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
    // …and the receiving side verified a's certificate.
    let received = w.agents[&2].wait_access(1, |l| {
        l["route"] == "hbone"
            && l["src_identity"] == "spiffe://cluster.local/ns/mesh/sa/a"
            && l["dst_identity"] == "spiffe://cluster.local/ns/mesh/sa/b"
    });
    assert_eq!(
        received,
        1,
        "identities not asserted at the receiver: {:?}",
        w.agents[&2].access_log()
    );
}

#[test]
fn mtls_many_concurrent_connections_share_the_pool() {
    let mut w = world("");
    let _b = w.serve("b", "0.0.0.0:8080");
    let addr = to(&w, "b", 8080);
    // 200 client processes at once, 4 KiB each, all through one HBONE pool.
    let children: Vec<_> = (0..200)
        .map(|_| {
            w.pod("a")
                .command(sluice_tests::world::testpod_bin())
                .args(["connect", &addr, "4096"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn client")
        })
        .collect();
    let mut ok = 0;
    for c in children {
        let out = c.wait_with_output().expect("client");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if v["echoed"] == 4096 {
            ok += 1;
        }
    }
    assert_eq!(ok, 200, "some connections lost bytes or failed");
    let n = w.agents[&2].wait_access(200, |l| l["route"] == "hbone" && l["outcome"] != "refused");
    assert_eq!(n, 200);
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

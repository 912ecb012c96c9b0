//! End-to-end: a real agent against HBONE peers that are not Sluice, written in the harness with
//! rustls and their own key exchange policy (`sluice_tests::interop`): the negotiated group both
//! ways under each policy, the `baggage` and `forwarded` an agent sends, and what it makes of a
//! peer's forged baggage.
//!
//! The world: node 1 runs an agent serving `web-5d8f-x1` (a Deployment's pod) and `b`; node 2
//! runs none, so its pod `peer` is in the mesh state (an ambient namespace) while its port
//! 15008 is the harness's, as if a ztunnel served it. The harness client runs in `peer` too.
use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use sluice::{identity::BuiltinCa, proxy::hbone::Baggage};
use sluice_tests::{
    hbone_client::certificate,
    interop::{self, Groups, PeerServer, ServerEvent},
    metrics,
    world::{PodSpec, World},
};

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
const WEB: &str = "web-5d8f-x1";

fn world(agent_spec: &str) -> World {
    let mut web = PodSpec::new(WEB, "mesh", 1)
        .label("app", "web")
        .label("version", "v7")
        .label("pod-template-hash", "5d8f");
    web.service_account = "web".into();
    let mut w = World::build(
        2,
        &[
            web,
            PodSpec::new("b", "mesh", 1),
            PodSpec::new("c", "mesh", 1),
            PodSpec::new("peer", "mesh", 2),
        ],
    );
    w.namespace("mesh", &[AMBIENT]);
    w.start_agent(1, agent_spec);
    for pod in [WEB, "b", "c"] {
        assert!(w.enroll(pod), "{pod} not captured");
    }
    w
}

fn mesh_ca(w: &World) -> BuiltinCa {
    BuiltinCa::load(
        &w.root_cert(),
        &w.dir.path().join("root-key.pem"),
        "cluster.local",
    )
    .expect("the world's mesh root")
}

fn cert(ca: &BuiltinCa, sa: &str) -> sluice::identity::WorkloadCert {
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    certificate(
        ca,
        &format!("spiffe://cluster.local/ns/mesh/sa/{sa}"),
        now - hour,
        now + hour,
    )
}

fn addr(w: &World, pod: &str, port: u16) -> SocketAddr {
    SocketAddr::new(w.pod(pod).ipv4, port)
}

/// The harness's HBONE server on `peer`'s 15008, speaking `groups`.
fn peer_server(w: &World, ca: &BuiltinCa, groups: Groups) -> PeerServer {
    PeerServer::start(
        &w.pod("peer").netns_path(),
        addr(w, "peer", 15008),
        cert(ca, "peer"),
        groups,
    )
}

/// The group of the first completed handshake the server saw.
fn server_group(server: &PeerServer) -> String {
    match server.wait_for("a handshake", |e| matches!(e, ServerEvent::Handshake(_))) {
        ServerEvent::Handshake(Ok(g)) => g,
        other => panic!("the harness server's handshake failed: {other:?}"),
    }
}

/// The harness client, from `peer`, to `pod`'s 15008 (asking for its port 8080).
fn client(
    w: &World,
    ca: &BuiltinCa,
    groups: Groups,
    pod: &str,
) -> Result<interop::ClientReport, String> {
    interop::connect(
        &w.pod("peer").netns_path(),
        cert(ca, "peer"),
        groups,
        addr(w, pod, 15008),
        addr(w, pod, 8080),
        &[],
    )
}

#[test]
fn interop_default_agent_negotiates_the_hybrid_and_falls_back_to_x25519() {
    let mut w = world("");
    let ca = mesh_ca(&w);
    let _web = w.serve(WEB, "0.0.0.0:8080");
    let _b = w.serve("b", "0.0.0.0:8080");
    let _app = w.serve("peer", "0.0.0.0:8080");

    // Harness client → agent (server side).
    let r = client(&w, &ca, Groups::Default, WEB).expect("default client to the agent");
    assert_eq!(r.group, "X25519MLKEM768", "default ↔ default");
    assert!(r.line.contains("accepted"), "{r:?}");
    let r = client(&w, &ca, Groups::Classic, "b").expect("classic client to the agent");
    assert_eq!(r.group, "X25519", "classic client ↔ default agent");
    assert!(r.line.contains("accepted"), "{r:?}");
    // The agent's access log says what each handshake agreed on.
    for (pod, group) in [(WEB, "X25519MLKEM768"), ("b", "X25519")] {
        let seen = w.agents[&1].wait_access(1, |l| {
            l["direction"] == "inbound"
                && l["route"] == "hbone"
                && l["dst.workload"] == pod
                && l["tls.group"] == group
                && l["tls.cipher_suite"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("TLS13_AES_"))
        });
        assert_eq!(seen, 1, "{pod}: {:?}", w.agents[&1].access_log());
    }

    // Agent (client side) → harness server; one source pod per server, as pools are per pod.
    {
        let server = peer_server(&w, &ca, Groups::Default);
        let conn = w.connect(WEB, &addr(&w, "peer", 8080).to_string(), 10_000);
        assert!(conn.captured());
        assert_eq!(
            server_group(&server),
            "X25519MLKEM768",
            "default agent ↔ default"
        );
    }
    {
        let server = peer_server(&w, &ca, Groups::Classic);
        let conn = w.connect("b", &addr(&w, "peer", 8080).to_string(), 10_000);
        assert!(conn.captured());
        assert_eq!(
            server_group(&server),
            "X25519",
            "default agent ↔ classic server"
        );
    }
}

#[test]
fn interop_pqc_agent_refuses_classic_peers_with_a_clear_log_line() {
    let mut w = world("  tls:\n    keyExchange: pqc");
    let ca = mesh_ca(&w);
    let _web = w.serve(WEB, "0.0.0.0:8080");
    let _app = w.serve("peer", "0.0.0.0:8080");

    // `/config_dump` shows the setting.
    let (status, dump) = w.node_http_get(1, 15000, "/config_dump");
    assert!(status.contains("200"), "{status}");
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("config dump is JSON");
    assert_eq!(dump["tls"]["keyExchange"], "pqc", "{}", dump["tls"]);

    // A pqc peer still gets through, on the hybrid.
    let r = client(&w, &ca, Groups::Pqc, WEB).expect("pqc client to a pqc agent");
    assert_eq!(r.group, "X25519MLKEM768");

    // Classic client → pqc agent: refused on both sides, each saying why.
    let err = client(&w, &ca, Groups::Classic, WEB).expect_err("a classic client got through");
    eprintln!("harness client: {err}");
    assert!(err.contains("HandshakeFailure"), "client side: {err}");
    let refused = w.agents[&1].wait_access(1, |l| {
        let e = l["error"].as_str().unwrap_or("");
        l["outcome"] == "handshake"
            && e.contains("no group in common")
            && e.contains("X25519MLKEM768")
            && e.contains("keyExchange: pqc")
    });
    assert_eq!(
        refused,
        1,
        "the agent's refusal does not say why: {:?}",
        w.agents[&1].access_log()
    );

    // pqc agent → classic server: refused on both sides, each saying why.
    let server = peer_server(&w, &ca, Groups::Classic);
    let result = w.try_connect("b", &addr(&w, "peer", 8080).to_string(), 1_000);
    assert!(result.is_err(), "a classic server was reached: {result:?}");
    match server.wait_for("a handshake", |e| matches!(e, ServerEvent::Handshake(_))) {
        ServerEvent::Handshake(Err(e)) => {
            assert!(e.contains("NoKxGroupsInCommon"), "server side: {e}")
        }
        other => panic!("the classic server completed a handshake: {other:?}"),
    }
    let failed = w.agents[&1].wait_access(1, |l| {
        let e = l["error"].as_str().unwrap_or("");
        l["direction"] == "outbound"
            && l["outcome"] == "connect"
            && e.contains("peer refused the handshake")
            && e.contains("X25519MLKEM768")
    });
    assert_eq!(
        failed,
        1,
        "the agent's failure does not say why: {:?}",
        w.agents[&1].access_log()
    );
    for l in w.agents[&1].access_log() {
        if matches!(l["outcome"].as_str(), Some("handshake" | "connect")) {
            eprintln!("agent: {} {}: {}", l["direction"], l["outcome"], l["error"]);
        }
    }
}

#[test]
fn interop_receiver_decodes_the_source_pods_baggage_and_port() {
    let mut w = world("");
    let ca = mesh_ca(&w);
    let _app = w.serve("peer", "0.0.0.0:8080");
    let server = peer_server(&w, &ca, Groups::Default);
    let conn = w.connect(WEB, &addr(&w, "peer", 8080).to_string(), 10_000);
    assert!(conn.captured());
    let ServerEvent::Connect { client, headers } =
        server.wait_for("a CONNECT", |e| matches!(e, ServerEvent::Connect { .. }))
    else {
        unreachable!("wait_for returns a match");
    };
    assert_eq!(client, "spiffe://cluster.local/ns/mesh/sa/web");
    let raw = headers
        .get_all("baggage")
        .iter()
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .collect::<Vec<_>>();
    eprintln!("baggage received: {raw:?}");
    let baggage = Baggage::from_headers(&headers);
    let pod = w.pod(WEB);
    // The source pod's own facts: its namespace, its Deployment (pod name less the template hash
    // and suffix), its app and version labels, and Istio's default cluster name.
    assert_eq!(baggage.namespace.as_deref(), Some(pod.namespace.as_str()));
    assert_eq!(baggage.workload_kind.as_deref(), Some("deployment"));
    let hash = &pod.labels["pod-template-hash"];
    let deployment = pod
        .name
        .split(&format!("-{hash}-"))
        .next()
        .expect("pod name");
    assert_eq!(baggage.workload_name.as_deref(), Some(deployment));
    assert_eq!(baggage.service.as_deref(), Some(pod.labels["app"].as_str()));
    assert_eq!(
        baggage.revision.as_deref(),
        Some(pod.labels["version"].as_str())
    );
    assert_eq!(baggage.cluster.as_deref(), Some("Kubernetes"));
    // `forwarded` names the application's own socket: the pod's address (its socket sees the
    // in-pod listener's loopback address, where the capture sent it) and its port.
    let forwarded = headers
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert_ne!(conn.local.port(), 0);
    assert_eq!(
        forwarded,
        format!("for=\"{}\"", SocketAddr::new(pod.ipv4, conn.local.port())),
        "forwarded is not the client's address and port"
    );
}

#[test]
fn interop_forged_baggage_never_changes_src_identity() {
    let mut w = world("");
    let ca = mesh_ca(&w);
    let _b = w.serve("b", "0.0.0.0:8080");
    let forged = "k8s.cluster.name=Kubernetes,k8s.namespace.name=kube-system,\
                  k8s.deployment.name=coredns,service.name=coredns,service.version=v1";
    let honest = "k8s.cluster.name=Kubernetes,k8s.namespace.name=mesh,k8s.pod.name=peer,\
                  service.name=peer,service.version=latest";
    for (baggage, sa) in [(forged, "peer"), (honest, "peer"), (honest, "c")] {
        let r = interop::connect(
            &w.pod("peer").netns_path(),
            cert(&ca, sa),
            Groups::Default,
            addr(&w, "b", 15008),
            addr(&w, "b", 8080),
            &[("baggage", baggage.to_owned())],
        )
        .expect("CONNECT to b");
        assert!(r.line.contains("accepted"), "{r:?}");
    }
    let log = |trust: &str, sa: &str, ns: &str| {
        w.agents[&1].wait_access(1, |l| {
            l["direction"] == "inbound"
                && l["route"] == "hbone"
                && l["src.identity"] == format!("spiffe://cluster.local/ns/mesh/sa/{sa}")
                && l["src_baggage"]
                    .as_str()
                    .is_some_and(|b| b.contains(&format!("k8s.namespace.name={ns}")))
                && l["src_baggage_trust"] == trust
        })
    };
    // The forged claim is logged as sent, marked untrusted; the identity is the certificate's.
    assert_eq!(
        log("untrusted", "peer", "kube-system"),
        1,
        "{:?}",
        w.agents[&1].access_log()
    );
    // The workload's own claim is believed; another account's claim to it is not.
    assert_eq!(log("same_workload", "peer", "mesh"), 1);
    assert_eq!(log("untrusted", "c", "mesh"), 1);
    assert!(
        w.agents[&1]
            .access_log()
            .iter()
            .filter(|l| l["direction"] == "inbound" && l["route"] == "hbone")
            .all(|l| l["src.identity"] != "spiffe://cluster.local/ns/kube-system/sa/coredns"),
        "baggage leaked into src_identity"
    );
    // Nor into the access log's source workload (MeshState knows `peer`), nor into the metrics.
    for l in w.agents[&1]
        .access_log()
        .iter()
        .filter(|l| l["direction"] == "inbound" && l["route"] == "hbone")
    {
        assert_eq!(l["src.workload"], "peer", "{l}");
        assert_eq!(l["src.namespace"], "mesh", "{l}");
    }
    let (_, text) = w.node_http_get(1, 15020, "/metrics");
    let opened = |labels: &[(&str, &str)]| {
        let mut all = vec![("reporter", "destination")];
        all.extend_from_slice(labels);
        metrics::sample(&text, "istio_tcp_connections_opened_total", &all)
    };
    assert_eq!(
        opened(&[("source_workload_namespace", "mesh")]),
        3.0,
        "{text}"
    );
    assert_eq!(opened(&[("source_workload_namespace", "kube-system")]), 0.0);
    assert_eq!(opened(&[("source_workload", "coredns")]), 0.0);
}

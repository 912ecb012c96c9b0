//! End-to-end: connections to a Service address (ClusterIP, ServiceEntry address) are resolved
//! by the sending node's proxy to one ready endpoint and tunnelled there over HBONE (or, for an
//! endpoint outside the mesh, sent in plaintext), with retries, telemetry and the Service's
//! options. The worlds have no kube-proxy: a VIP that the proxy does not resolve goes nowhere.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use sluice_tests::{
    metrics,
    world::{PodSpec, Server, World, testpod_bin},
};

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
const VIP: &str = "10.96.77.7:80";
const HOSTNAME: &str = "web.mesh.svc.cluster.local";
const A: &str = "spiffe://cluster.local/ns/mesh/sa/a";

const STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: mesh}
spec:
  mtls: {mode: STRICT}
"#;

/// Service `mesh/web` on 10.96.77.7 (and fd96::77:7), port 80 → `target`, selecting
/// `app=web`, with `extra` lines added to its spec.
fn web_service(target: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: mesh}}
spec:
  clusterIP: 10.96.77.7
  clusterIPs: [10.96.77.7, "fd96::77:7"]
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: {target}}}]
{extra}"#
    )
}

/// Two nodes, client `a` on node 1, the given pods, namespaces `mesh` (ambient) and `plain`,
/// `resources` in every agent's config; every pod enrolled.
fn world(pods: &[PodSpec], resources: &str) -> World {
    let mut all = vec![PodSpec::new("a", "mesh", 1)];
    all.extend_from_slice(pods);
    let mut w = World::build(2, &all);
    w.namespace("mesh", &[AMBIENT]);
    w.namespace("plain", &[]);
    w.extra_resources = resources.into();
    w.start_agent(1, "");
    w.start_agent(2, "");
    for p in &all {
        w.enroll(&p.name);
    }
    w
}

fn web(name: &str, node: usize) -> PodSpec {
    PodSpec::new(name, "mesh", node).label("app", "web")
}

/// How many connections each server accepted (waiting up to 2 s for stragglers).
fn accepted(servers: &[(&str, &Server)]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (name, s) in servers {
        let mut n = 0;
        while n < 10_000 && s.try_accepted(Duration::from_millis(300)).is_some() {
            n += 1;
        }
        counts.insert(name.to_string(), n);
    }
    counts
}

/// The `/config_dump` MeshState of node `i`.
fn mesh_state(w: &World, i: usize) -> serde_json::Value {
    let (status, body) = w.node_http_get(i, 15000, "/config_dump");
    assert!(status.contains("200"), "{status}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("config_dump is JSON");
    v["meshState"].clone()
}

/// Waits (up to 10 s) until node `i`'s `/config_dump` satisfies `pred`.
fn wait_state(w: &World, i: usize, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = mesh_state(w, i);
        if pred(&state) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {i} never showed {what}: {}",
            state["services"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A process in a pod that is killed if the test ends before it does.
struct Running(Option<Child>);

impl Running {
    fn output(mut self) -> serde_json::Value {
        let child = self.0.take().expect("running");
        let out = child.wait_with_output().expect("wait");
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_in(w: &World, pod: &str, args: &[&str]) -> Running {
    let child = w
        .pod(pod)
        .command(testpod_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn in pod");
    Running(Some(child))
}

fn reason_is(l: &serde_json::Value, reason: &str) -> bool {
    l["reason"] == reason || l["reason_label"] == reason
}

/// Issue 14, test 1: in a STRICT namespace, a → ClusterIP:80 reaches b's 8080 over HBONE with
/// the bytes intact; each side's access log says so.
#[test]
fn services_strict_clusterip_reaches_the_endpoint_over_hbone() {
    let mut w = world(
        &[web("b", 2)],
        &format!("{STRICT}---\n{}", web_service("8080", "")),
    );
    let _b = w.serve("b", "0.0.0.0:8080");
    let conn = w.connect("a", VIP, 200_000);
    assert!(conn.captured());
    assert_eq!(conn.echoed, 200_000, "bytes lost");
    assert_eq!(conn.server_local, SocketAddr::new(w.pod("b").ipv4, 8080));
    assert_eq!(
        conn.server_peer.ip(),
        w.pod("a").ipv4,
        "source address lost"
    );
    let endpoint = SocketAddr::new(w.pod("b").ipv4, 8080).to_string();
    let sent = w.agents[&1].wait_access(1, |l| {
        l["direction"] == "outbound"
            && l["route"] == "hbone"
            && l["dst.service"] == HOSTNAME
            && l["dst.addr"] == endpoint.as_str()
            && l["outcome"] == "ok"
    });
    assert_eq!(sent, 1, "sender: {:?}", w.agents[&1].access_log());
    let received = w.agents[&2].wait_access(1, |l| {
        l["route"] == "hbone" && l["src.identity"] == A && l["outcome"] == "ok"
    });
    assert_eq!(received, 1, "receiver: {:?}", w.agents[&2].access_log());
}

/// Issue 14, test 5: a Service without endpoints: the client is refused within 1 s, the access
/// log says `no_healthy_upstream` and the metrics carry `response_flags="UH"`.
#[test]
fn services_without_endpoints_refuse_promptly_with_uh() {
    let w = world(&[], &web_service("8080", ""));
    let start = Instant::now();
    let refused = w.try_connect("a", VIP, 100);
    let took = start.elapsed();
    assert!(refused.is_err(), "connected to nothing: {refused:?}");
    assert!(took < Duration::from_secs(1), "refusal took {took:?}");
    let logged = w.agents[&1].wait_access(1, |l| {
        l["direction"] == "outbound"
            && reason_is(l, "no_healthy_upstream")
            && l["dst.service"] == HOSTNAME
    });
    assert_eq!(logged, 1, "{:?}", w.agents[&1].access_log());
    let (_, text) = w.node_http_get(1, 15020, "/metrics");
    let uh = metrics::sample(
        &text,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("response_flags", "UH"),
            ("destination_service", HOSTNAME),
        ],
    );
    assert_eq!(uh, 1.0, "{text}");
}

/// Issue 14, test 2: three endpoints on two nodes share 300 connections, each at least 20 %.
#[test]
fn services_spread_connections_over_endpoints_on_both_nodes() {
    let mut w = world(
        &[web("b1", 2), web("b2", 2), web("b3", 1)],
        &web_service("8080", ""),
    );
    let s1 = w.serve("b1", "0.0.0.0:8080");
    let s2 = w.serve("b2", "0.0.0.0:8080");
    let s3 = w.serve("b3", "0.0.0.0:8080");
    let v = w.run_in("a", &["fanout", VIP, "300", "64"]);
    assert_eq!(v["ok"], 300, "{v}");
    let counts = accepted(&[("b1", &s1), ("b2", &s2), ("b3", &s3)]);
    println!("services spread over 3 endpoints: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 300, "{counts:?}");
    assert!(counts.values().all(|n| *n >= 60), "{counts:?}");
}

/// Issue 14, test 4: one endpoint's app does not listen; every connection still succeeds
/// through another, and the access log records the retry.
#[test]
fn services_retry_past_an_endpoint_whose_app_is_not_listening() {
    let mut w = world(&[web("b1", 2), web("b2", 2)], &web_service("8080", ""));
    let s1 = w.serve("b1", "0.0.0.0:8080"); // b2 serves nothing
    let v = w.run_in("a", &["fanout", VIP, "40", "64"]);
    assert_eq!(
        v["ok"],
        40,
        "{v}\nsender: {:?}\nreceiver: {:?}",
        w.agents[&1].access_log(),
        w.agents[&2].access_log()
    );
    assert_eq!(accepted(&[("b1", &s1)])["b1"], 40);
    let ok = w.agents[&1].wait_access(40, |l| {
        l["direction"] == "outbound" && l["dst.service"] == HOSTNAME && l["outcome"] == "ok"
    });
    assert_eq!(ok, 40);
    // With two endpoints chosen at random, 40 connections all avoiding b2 first is 2^-40.
    let b2 = SocketAddr::new(w.pod("b2").ipv4, 8080).to_string();
    let retried = w.agents[&1]
        .access_log()
        .iter()
        .filter(|l| l["outcome"] == "ok" && l["attempts"].as_u64().is_some_and(|n| n >= 2))
        .filter(|l| {
            l["failed_endpoints"]
                .as_str()
                .is_some_and(|f| f.contains(&b2))
        })
        .count();
    assert!(
        retried >= 1,
        "no retry logged: {:?}",
        w.agents[&1].access_log()
    );
}

/// Issue 14, test 7: an endpoint outside the mesh is reached in plaintext, and a dual-stack
/// Service over its IPv6 VIP.
#[test]
fn services_reach_a_plain_endpoint_and_an_ipv6_vip() {
    let plain_service = r#"
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: plain}
spec: {clusterIP: 10.96.8.8, selector: {app: legacy}, ports: [{port: 80, targetPort: 8080}]}
"#;
    let mut w = world(
        &[
            web("b", 2),
            PodSpec::new("p", "plain", 2).label("app", "legacy"),
        ],
        &format!("{}---\n{plain_service}", web_service("8080", "")),
    );
    let _p = w.serve("p", "0.0.0.0:8080");
    let _b = w.serve("b", "[::]:8080");
    let conn = w.connect("a", "10.96.8.8:80", 10_000);
    assert_eq!(conn.server_local, SocketAddr::new(w.pod("p").ipv4, 8080));
    assert_eq!(conn.echoed, 10_000);
    let endpoint = SocketAddr::new(w.pod("p").ipv4, 8080).to_string();
    let direct = w.agents[&1].wait_access(1, |l| {
        l["route"] == "direct"
            && l["dst.service"] == "legacy.plain.svc.cluster.local"
            && l["dst.addr"] == endpoint.as_str()
            && l["outcome"] == "ok"
    });
    assert_eq!(direct, 1, "{:?}", w.agents[&1].access_log());
    let conn = w
        .try_connect("a", "[fd96::77:7]:80", 10_000)
        .unwrap_or_else(|e| {
            panic!(
                "over the IPv6 VIP: {e}\nsender: {:?}\nreceiver: {:?}\n{}",
                w.agents[&1].access_log(),
                w.agents[&2].access_log(),
                w.agents[&2].tail()
            )
        });
    assert_eq!(conn.server_local, SocketAddr::new(w.pod("b").ipv6, 8080));
    assert_eq!(conn.server_peer.ip(), w.pod("a").ipv6);
    let hbone = w.agents[&1].wait_access(1, |l| {
        l["route"] == "hbone" && l["dst.service"] == HOSTNAME && l["outcome"] == "ok"
    });
    assert_eq!(hbone, 1, "{:?}", w.agents[&1].access_log());
}

/// Issue 14, test 6a: a named `targetPort` resolves per endpoint pod's container port.
#[test]
fn services_named_target_port_resolves_per_pod() {
    let mut w = world(
        &[web("b", 2).port("web", 8080), web("c", 1).port("web", 9090)],
        &web_service("web", ""),
    );
    let sb = w.serve("b", "0.0.0.0:8080");
    let sc = w.serve("c", "0.0.0.0:9090");
    let v = w.run_in("a", &["fanout", VIP, "40", "64"]);
    assert_eq!(
        v["ok"],
        40,
        "{v}\nsender: {:?}\nreceiver: {:?}",
        w.agents[&1].access_log(),
        w.agents[&2].access_log()
    );
    let counts = accepted(&[("b", &sb), ("c", &sc)]);
    assert_eq!(counts.values().sum::<usize>(), 40, "{counts:?}");
    assert!(counts.values().all(|n| *n > 0), "{counts:?}");
}

/// Issue 14, test 6b: `internalTrafficPolicy: Local` keeps to endpoints on the client's node.
#[test]
fn services_internal_traffic_policy_local_stays_on_the_node() {
    let mut w = world(
        &[web("b", 2), web("c", 1)],
        &web_service("8080", "  internalTrafficPolicy: Local\n"),
    );
    let sb = w.serve("b", "0.0.0.0:8080");
    let sc = w.serve("c", "0.0.0.0:8080");
    let v = w.run_in("a", &["fanout", VIP, "30", "64"]);
    assert_eq!(v["ok"], 30, "{v}");
    let counts = accepted(&[("b", &sb), ("c", &sc)]);
    assert_eq!(counts["c"], 30, "{counts:?}");
    assert_eq!(counts["b"], 0, "{counts:?}");
}

/// Issue 14, test 6c: `sessionAffinity: ClientIP` sends one client to one endpoint.
#[test]
fn services_client_ip_affinity_sticks_to_one_endpoint() {
    let mut w = world(
        &[web("b1", 2), web("b2", 2), web("b3", 1)],
        &web_service(
            "8080",
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
        ),
    );
    let s1 = w.serve("b1", "0.0.0.0:8080");
    let s2 = w.serve("b2", "0.0.0.0:8080");
    let s3 = w.serve("b3", "0.0.0.0:8080");
    for _ in 0..15 {
        w.connect("a", VIP, 100);
    }
    let counts = accepted(&[("b1", &s1), ("b2", &s2), ("b3", &s3)]);
    assert_eq!(counts.values().sum::<usize>(), 15, "{counts:?}");
    assert!(counts.values().any(|n| *n == 15), "not sticky: {counts:?}");
}

/// Issue 14, test 3: an endpoint that turns not ready gets no new connections once the change
/// has propagated, and a connection already open to it finishes.
#[test]
fn services_not_ready_endpoint_gets_no_new_connections_and_open_ones_finish() {
    let mut w = world(&[web("b1", 2), web("b2", 1)], &web_service("8080", ""));
    let s1 = w.serve("b1", "0.0.0.0:8080");
    let s2 = w.serve("b2", "0.0.0.0:8080");
    let hold = start_in(&w, "a", &["hold", VIP, "6"]);
    let (busy, idle, busy_server, idle_server) = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if s1.try_accepted(Duration::from_millis(100)).is_some() {
                break ("b1", "b2", &s1, &s2);
            }
            if s2.try_accepted(Duration::from_millis(100)).is_some() {
                break ("b2", "b1", &s2, &s1);
            }
            assert!(
                Instant::now() < deadline,
                "the long connection reached no endpoint"
            );
        }
    };
    w.set_ready(busy, false);
    let busy_ip: IpAddr = w.pod(busy).ipv4;
    wait_state(&w, 1, "the endpoint not ready", |s| {
        s["services"]["mesh/web"]["endpoints"]
            .as_array()
            .is_some_and(|eps| {
                eps.iter().any(|e| {
                    e["ready"] == false
                        && e["ips"]
                            .as_array()
                            .is_some_and(|ips| ips.iter().any(|ip| ip == &busy_ip.to_string()))
                })
            })
    });
    let v = w.run_in("a", &["fanout", VIP, "30", "64"]);
    assert_eq!(v["ok"], 30, "{v}");
    let counts = accepted(&[(busy, busy_server), (idle, idle_server)]);
    assert_eq!(counts[busy], 0, "{counts:?}");
    assert_eq!(counts[idle], 30, "{counts:?}");
    let held = hold.output();
    assert!(
        held.get("error").is_none(),
        "the open connection broke: {held}"
    );
}

/// Issue 14, test 9: both nodes count Service traffic with the `destination_service*` labels.
#[test]
fn services_metrics_carry_destination_service_labels_on_both_nodes() {
    let mut w = world(&[web("b", 2)], &web_service("8080", ""));
    let _b = w.serve("b", "0.0.0.0:8080");
    let v = w.run_in("a", &["fanout", VIP, "25", "1000"]);
    assert_eq!(v["ok"], 25, "{v}");
    assert_eq!(
        w.agents[&2].wait_access(25, |l| l["route"] == "hbone" && l["outcome"] == "ok"),
        25
    );
    assert_eq!(
        w.agents[&1].wait_access(25, |l| l["dst.service"] == HOSTNAME && l["outcome"] == "ok"),
        25
    );
    for (node, reporter) in [(1, "source"), (2, "destination")] {
        let (_, text) = w.node_http_get(node, 15020, "/metrics");
        let labels = [
            ("reporter", reporter),
            ("destination_service", HOSTNAME),
            ("destination_service_name", "web"),
            ("destination_service_namespace", "mesh"),
            ("destination_workload", "web"),
            ("source_principal", A),
            ("connection_security_policy", "mutual_tls"),
        ];
        let get = |name| metrics::sample(&text, name, &labels);
        assert_eq!(
            get("istio_tcp_connections_opened_total"),
            25.0,
            "node {node}: {text}"
        );
        assert_eq!(get("istio_tcp_connections_closed_total"), 25.0);
        assert_eq!(get("istio_tcp_received_bytes_total"), 25.0 * 1000.0);
    }
}

/// Issue 14, test 8: on the real API server (1.20, which serves EndpointSlices only as
/// `discovery.k8s.io/v1beta1`), a Service with a selector and one without, whose endpoints are
/// hand-made EndpointSlices, drive the same choice as in the file worlds; slice conditions are
/// honoured as they change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_kube_selector_and_hand_made_endpoint_slices_drive_the_choice() {
    use serde_json::json;
    use sluice::state::{
        MeshSettings, MeshState,
        load_balance::{Hop, ServiceRoute, route},
    };
    use sluice_tests::{
        kube_mesh::{Mesh, apply},
        kube_server::KubeServer,
    };

    let server = KubeServer::start();
    let client = server.client().await;
    let ns = "svc-kube";
    apply(
        &client,
        &json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": {"istio.io/dataplane-mode": "ambient"}}}),
    )
    .await;
    for (name, ip, labels) in [
        ("a", "10.0.1.2", json!({})),
        ("b", "10.0.2.2", json!({"app": "web"})),
    ] {
        apply(
            &client,
            &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": {"nodeName": "node1", "serviceAccountName": name,
                         "containers": [{"name": "app", "image": "example.com/app:1"}]},
                "status": {"podIP": ip, "podIPs": [{"ip": ip}]}}),
        )
        .await;
    }
    apply(
        &client,
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": ns},
            "spec": {"clusterIP": "10.96.77.7", "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}),
    )
    .await;
    apply(
        &client,
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext", "namespace": ns},
            "spec": {"clusterIP": "10.96.77.8",
                     "ports": [{"name": "web", "port": 80, "targetPort": 9000, "protocol": "TCP"}]}}),
    )
    .await;
    let slice = |b_ready: bool| {
        json!({"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {"name": "ext-1", "namespace": ns,
                     "labels": {"kubernetes.io/service-name": "ext"}},
        "addressType": "IPv4",
        "ports": [{"name": "web", "port": 9090, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.0.2.2"], "conditions": {"ready": b_ready},
             "targetRef": {"kind": "Pod", "namespace": ns, "name": "b"}},
            {"addresses": ["192.0.2.50"], "conditions": {"ready": true}},
        ]})
    };
    apply(&client, &slice(false)).await;

    let mut mesh = Mesh::start(&client, MeshSettings::default()).await;
    let ext_has = |want: usize| {
        move |s: &MeshState| {
            s.services.get("svc-kube/ext").is_some_and(|svc| {
                svc.endpoints.len() == 2 && svc.endpoints.iter().filter(|e| e.ready).count() == want
            })
        }
    };
    let (state, _) = mesh
        .wait_for(Duration::from_secs(30), "the slice of ext", ext_has(1))
        .await;
    let a = state.workload_by_name(ns, "a").expect("pod a");
    let b_identity = state
        .workload_by_name(ns, "b")
        .expect("pod b")
        .identity("cluster.local");
    let first = |state: &MeshState, vip: &str| -> Vec<Hop> {
        match route(
            state,
            Some(a),
            Some(a.ips[0]),
            vip.parse().expect("vip"),
            &sluice::state::load_balance::AtRandom,
        ) {
            Some(ServiceRoute::Endpoints { attempts, .. }) => {
                attempts.into_iter().map(|a| a.hop).collect()
            }
            other => panic!("{vip}: {other:?}"),
        }
    };
    // The selector: b over HBONE at the target port.
    assert_eq!(
        first(&state, "10.96.77.7:80"),
        [Hop::Hbone {
            dst: "10.0.2.2:8080".parse().expect("addr"),
            peer: "10.0.2.2:15008".parse().expect("addr"),
            identity: b_identity.clone(),
        }]
    );
    // No selector: the slice's ready endpoint (outside the mesh: plain TCP) at the slice's port.
    assert_eq!(
        first(&state, "10.96.77.8:80"),
        [Hop::Direct {
            dst: "192.0.2.50:9090".parse().expect("addr")
        }]
    );
    // b turns ready in the slice: both endpoints take connections, b over HBONE.
    apply(&client, &slice(true)).await;
    let (state, _) = mesh
        .wait_for(Duration::from_secs(30), "b ready in the slice", ext_has(2))
        .await;
    let hops = first(&state, "10.96.77.8:80");
    assert_eq!(hops.len(), 2, "{hops:?}");
    assert!(
        hops.contains(&Hop::Hbone {
            dst: "10.0.2.2:9090".parse().expect("addr"),
            peer: "10.0.2.2:15008".parse().expect("addr"),
            identity: b_identity,
        }),
        "{hops:?}"
    );
}

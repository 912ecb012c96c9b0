//! The seeds' scenarios in the cluster box (`sluice_tests::cluster`): a real API server,
//! controller-manager and kube-proxy, real CNI plugins with `sluice` chained, and agents
//! installed from `deploy/`.
use std::time::Duration;

use sluice_tests::cluster::Cluster;

/// Seed 000's mesh side: a namespace labelled `istio-injection: enabled`, STRICT mTLS, and the
/// `backend-v1`/`backend-v2` Services on 8080.
/// (`protocol: TCP` is spelled out: 1.20's server-side apply needs the list key.)
const SEED_000: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: test-infra
  labels:
    istio-injection: enabled
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: test-infra
spec:
  mtls:
    mode: STRICT
---
apiVersion: v1
kind: Service
metadata:
  name: backend-v1
  namespace: test-infra
spec:
  selector:
    app: backend-v1
  ports:
  - name: http
    protocol: TCP
    port: 8080
    targetPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: backend-v2
  namespace: test-infra
spec:
  selector:
    app: backend-v2
  ports:
  - name: http
    protocol: TCP
    port: 8080
    targetPort: 8080
---
apiVersion: v1
kind: Namespace
metadata:
  name: outside
---
apiVersion: v1
kind: Service
metadata:
  name: plain
  namespace: outside
spec:
  selector:
    app: plain
  ports:
  - protocol: TCP
    port: 8080
"#;

const WAIT: Duration = Duration::from_secs(30);

/// Seed 000 as written, across two nodes configured exactly as `deploy/` configures them: a
/// client calling `backend-v1`'s ClusterIP goes over HBONE to the backend on the other node,
/// with both identities logged; an uncaptured pod's call goes through kube-proxy and is refused
/// by STRICT, while kube-proxy carries the same call to a backend outside the mesh.
#[tokio::test(flavor = "multi_thread")]
async fn seed_000_service_call_goes_over_hbone_across_nodes() {
    let mut c = Cluster::up(2).await;
    c.start_agents().await;
    c.apply_yaml(SEED_000).await;
    c.create_pod("test-infra", "backend-v1", 2, &[("app", "backend-v1")])
        .await;
    c.create_pod("test-infra", "backend-v2", 2, &[("app", "backend-v2")])
        .await;
    c.create_pod("test-infra", "client", 1, &[("app", "client")])
        .await;
    c.create_pod("outside", "stranger", 1, &[("app", "stranger")])
        .await;
    c.create_pod("outside", "plain", 2, &[("app", "plain")])
        .await;
    let backend = c.running("test-infra", "backend-v1", WAIT).await;
    let client = c.running("test-infra", "client", WAIT).await;
    let stranger = c.running("outside", "stranger", WAIT).await;
    let plain = c.running("outside", "plain", WAIT).await;
    let server = c.serve(&backend, "0.0.0.0:8080");
    let plain_server = c.serve(&plain, "0.0.0.0:8080");

    let vip = c.cluster_ip("test-infra", "backend-v1").await;
    let plain_vip = c.cluster_ip("outside", "plain").await;
    tokio::task::block_in_place(|| {
        c.wait_kube_proxy(1, &vip, WAIT);
        c.wait_kube_proxy(1, &plain_vip, WAIT);
    });

    // The agent learns the Service and its endpoint from the API server's EndpointSlice.
    let target = format!("{vip}:8080");
    let conn = wait_connect(&mut c, &client, &target).await;
    assert!(
        conn.captured(),
        "the client's call was not captured: {conn:?}"
    );
    assert_eq!(conn.echoed, 1000);
    let (peer, local) = server.accepted();
    assert_eq!(
        peer.ip(),
        client.ipv4,
        "the backend sees the client's own address"
    );
    assert_eq!(local.ip(), backend.ipv4);

    let src = "spiffe://cluster.local/ns/test-infra/sa/client";
    let dst = "spiffe://cluster.local/ns/test-infra/sa/backend-v1";
    let sent = c.agent(1).wait_access(1, |l| {
        l["direction"] == "outbound"
            && l["route"] == "hbone"
            && l["dst.identity"] == dst
            && l["dst.service"] == "backend-v1.test-infra.svc.cluster.local"
            && l["outcome"] == "ok"
    });
    assert_eq!(sent, 1, "client's node: {:?}", c.agent(1).access_log());
    let received = c.agent(2).wait_access(1, |l| {
        l["direction"] == "inbound"
            && l["route"] == "hbone"
            && l["src.identity"] == src
            && l["dst.identity"] == dst
    });
    assert_eq!(received, 1, "backend's node: {:?}", c.agent(2).access_log());

    // Outside the mesh: kube-proxy's rules carry the call (shown by the plaintext Service)...
    let plain_conn =
        tokio::task::block_in_place(|| c.try_connect(&stranger, &format!("{plain_vip}:8080"), 100))
            .expect("kube-proxy carries a plaintext Service call");
    assert!(!plain_conn.captured());
    assert_eq!(plain_conn.echoed, 100);
    plain_server.accepted();
    // ...and STRICT refuses the same kind of call to backend-v1.
    server.drain();
    let refused = tokio::task::block_in_place(|| c.try_connect(&stranger, &target, 100));
    if let Ok(conn) = &refused {
        assert_eq!(
            conn.echoed, 0,
            "plaintext reached a STRICT backend: {conn:?}"
        );
    }
    assert!(
        server.try_accepted(Duration::from_secs(2)).is_none(),
        "the STRICT backend's app accepted a plaintext connection"
    );
    let stranger_ip = stranger.ipv4.to_string();
    let refusals = c.agent(2).wait_access(1, |l| {
        l["direction"] == "inbound"
            && l["route"] == "plaintext"
            && l["outcome"] == "denied"
            && l["src.addr"]
                .as_str()
                .is_some_and(|a| a.starts_with(&stranger_ip))
    });
    assert_eq!(refusals, 1, "backend's node: {:?}", c.agent(2).access_log());
}

/// Retries a Service call until the agent has the Service (EndpointSlice propagation).
async fn wait_connect(
    c: &mut Cluster,
    pod: &sluice_tests::world::Pod,
    target: &str,
) -> sluice_tests::world::Conn {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let attempt = tokio::task::block_in_place(|| c.try_connect(pod, target, 1000));
        match attempt {
            Ok(conn) if conn.echoed > 0 => return conn,
            other if std::time::Instant::now() > deadline => {
                panic!("{} -> {target} never worked: {other:?}", pod.name)
            }
            _ => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// While a node's agent is down, a pod outside the mesh still starts; a mesh pod's CNI ADD is
/// refused (the kubelet retries) until the agent is back, and the pod then starts captured.
#[tokio::test(flavor = "multi_thread")]
async fn cni_add_while_the_agent_is_down_refuses_only_mesh_pods() {
    let mut c = Cluster::up(1).await;
    c.start_agents().await;
    c.apply_yaml(SEED_000).await;
    c.stop_agent(1);

    c.create_pod("outside", "early", 1, &[("app", "plain")])
        .await;
    let early = c.running("outside", "early", WAIT).await;
    let _server = c.serve(&early, "0.0.0.0:8080");

    c.create_pod("test-infra", "waiting", 1, &[("app", "backend-v1")])
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        c.sandbox("test-infra", "waiting").is_none(),
        "a mesh pod started while its node's agent was down"
    );
    let refusals = c.kubelet_events("test-infra", "waiting");
    assert!(
        refusals
            .iter()
            .any(|e| e.contains("in the mesh") && e.contains("kubelet retries")),
        "no refusal naming the reason: {refusals:?}"
    );

    tokio::task::block_in_place(|| c.start_agent(1));
    let pod = c.running("test-infra", "waiting", WAIT).await;
    let sandboxes = c.agent(1).call(&sluice::redirect::enroll::Request::List);
    let listed = serde_json::to_value(&sandboxes).expect("json");
    assert!(
        listed.to_string().contains(&pod.uid),
        "the agent does not hold the pod's sandbox: {listed}"
    );
    // Captured: its call to a pod outside the mesh goes through the agent.
    let conn =
        tokio::task::block_in_place(|| c.try_connect(&pod, &format!("{}:8080", early.ipv4), 10))
            .expect("the captured pod's call");
    assert!(conn.captured() && conn.echoed == 10, "{conn:?}");
}

/// 100 pods created and deleted across 2 nodes, through CNI ADD and DEL: every live pod is
/// captured, and nothing is left behind (links, leases, sandboxes, map entries).
#[tokio::test(flavor = "multi_thread")]
async fn pod_churn_leaves_nothing_behind() {
    let mut c = Cluster::up(2).await;
    c.start_agents().await;
    c.apply_yaml(SEED_000).await;
    let links_before = [c.node_links(1), c.node_links(2)];

    let names: Vec<String> = (0..100).map(|n| format!("churn-{n}")).collect();
    for (n, name) in names.iter().enumerate() {
        c.create_pod("test-infra", name, 1 + n % 2, &[("app", "churn")])
            .await;
    }
    let mut pods = Vec::new();
    for name in &names {
        pods.push(
            c.running("test-infra", name, Duration::from_secs(120))
                .await,
        );
    }
    for i in 1..=2 {
        let listed =
            serde_json::to_value(c.agent(i).call(&sluice::redirect::enroll::Request::List))
                .expect("json")
                .to_string();
        for pod in pods.iter().filter(|p| p.node == i) {
            assert!(
                listed.contains(&pod.uid),
                "node{i}'s agent lacks {}: {listed}",
                pod.name
            );
        }
    }
    // Every live pod is captured (the agent's answer per sandbox).
    for i in 1..=2 {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let listed = c.agent(i).call(&sluice::redirect::enroll::Request::List);
            let uncaptured: Vec<&str> = listed
                .sandboxes
                .iter()
                .filter(|s| !s.captured)
                .map(|s| s.pod.name.as_str())
                .collect();
            if uncaptured.is_empty() && listed.sandboxes.len() == 50 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node{i}: {} sandboxes, uncaptured: {uncaptured:?}",
                listed.sandboxes.len()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let enrolled =
            sluice_tests::bpf::map_entries(&c.world.pin_dir(i).join("maps/sluice_enrolled"));
        assert_eq!(enrolled.len(), 50, "node{i}'s sluice_enrolled map");
    }
    for name in &names {
        c.delete_pod("test-infra", name).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while c.sandboxes() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} sandboxes left",
            c.sandboxes()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in 1..=2 {
        assert_eq!(
            c.node_links(i),
            links_before[i - 1],
            "links left on node{i}"
        );
        assert!(
            c.leased_addresses(i).is_empty(),
            "addresses leased on node{i}: {:?}",
            c.leased_addresses(i)
        );
        let listed =
            serde_json::to_value(c.agent(i).call(&sluice::redirect::enroll::Request::List))
                .expect("json")
                .to_string();
        for pod in &pods {
            assert!(
                !listed.contains(&pod.uid),
                "node{i}'s agent still holds {}: {listed}",
                pod.name
            );
        }
        let maps = c.world.pin_dir(i).join("maps");
        for map in ["sluice_enrolled", "sluice_pod_ips"] {
            let left = sluice_tests::bpf::map_entries(&maps.join(map));
            assert!(
                left.is_empty(),
                "node{i}'s {map} keeps {} entries",
                left.len()
            );
        }
    }
}

/// An API-server outage of 30 s in the middle of pod churn: the agents keep serving what they
/// knew, and once the server is back every change made before it went away is carried out:
/// new pods start captured, deleted pods are released, and no sandbox is lost or left over.
#[tokio::test(flavor = "multi_thread")]
async fn an_api_server_outage_during_pod_churn_loses_nothing() {
    let mut c = Cluster::up(2).await;
    c.start_agents().await;
    c.apply_yaml(SEED_000).await;
    c.create_pod("test-infra", "backend-v1", 2, &[("app", "backend-v1")])
        .await;
    for n in 0..4 {
        c.create_pod(
            "test-infra",
            &format!("old-{n}"),
            1 + n % 2,
            &[("app", "churn")],
        )
        .await;
    }
    let backend = c.running("test-infra", "backend-v1", WAIT).await;
    let _server = c.serve(&backend, "0.0.0.0:8080");
    let mut old = Vec::new();
    for n in 0..4 {
        old.push(c.running("test-infra", &format!("old-{n}"), WAIT).await);
    }
    let vip = c.cluster_ip("test-infra", "backend-v1").await;
    let target = format!("{vip}:8080");
    wait_connect(&mut c, &old[2], &target).await;

    // Churn, then the API server goes away before the kubelet and agents have caught up.
    for n in 0..2 {
        c.delete_pod("test-infra", &format!("old-{n}")).await;
        c.create_pod(
            "test-infra",
            &format!("new-{n}"),
            1 + n % 2,
            &[("app", "churn")],
        )
        .await;
    }
    tokio::task::block_in_place(|| c.server.stop_apiserver());
    let outage = std::time::Instant::now();
    // The mesh keeps working from the last state it had.
    while outage.elapsed() < Duration::from_secs(30) {
        let conn = tokio::task::block_in_place(|| c.try_connect(&old[3], &target, 100))
            .expect("a Service call during the outage");
        assert!(conn.captured() && conn.echoed == 100, "{conn:?}");
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    tokio::task::block_in_place(|| c.server.start_apiserver());

    let mut new = Vec::new();
    for n in 0..2 {
        new.push(
            c.running("test-infra", &format!("new-{n}"), Duration::from_secs(60))
                .await,
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while c.sandbox("test-infra", "old-0").is_some() || c.sandbox("test-infra", "old-1").is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "deleted pods still run"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for pod in &new {
        let conn = wait_connect(&mut c, pod, &target).await;
        assert!(conn.captured(), "{} started uncaptured: {conn:?}", pod.name);
    }
    // Each agent holds exactly the sandboxes of the pods running on its node.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for i in 1..=2 {
        loop {
            let listed =
                serde_json::to_value(c.agent(i).call(&sluice::redirect::enroll::Request::List))
                    .expect("json");
            let held: std::collections::BTreeSet<String> = listed["sandboxes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["pod"]["uid"].as_str().map(str::to_owned))
                .collect();
            let expected: std::collections::BTreeSet<String> = old[2..]
                .iter()
                .chain(&new)
                .chain(std::iter::once(&backend))
                .filter(|p| p.node == i)
                .map(|p| p.uid.clone())
                .collect();
            if held == expected {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node{i}'s agent holds {held:?}, expected {expected:?}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// Seed 002 as the repository keeps it.
const SEED_002: &str = include_str!("../seeds/002-egress.yaml");

/// The seed's documents of `kind`.
fn seed_002(kind: &str) -> Vec<serde_json::Value> {
    sluice_tests::kube_mesh::documents(SEED_002)
        .into_iter()
        .filter(|d| d["kind"] == kind)
        .collect()
}

/// The mesh pods of scenario 5: a namespace in the mesh, as seed 000 labels it.
const SHOP: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    istio-injection: enabled
"#;

/// The gateway node pool of scenario 5 (node 2): the label that gives it deploy/06's agent,
/// the seed's Gateway selector, and its AKS pool name.
const GATEWAY_NODE_LABELS: &[(&str, &str)] = &[
    ("sluice.dev/egress-gateway", "true"),
    ("istio", "asm-egress-test"),
    ("kubernetes.azure.com/agentpool", "egresspool"),
];

/// The seed's walkthrough, step 6: a StaticGatewayConfiguration for the gateway pool.
const SGC: &str = r#"
apiVersion: egressgateway.kubernetes.azure.com/v1alpha1
kind: StaticGatewayConfiguration
metadata:
  name: asm-egress-test-sgc
  namespace: shop
spec:
  gatewayNodepoolName: egresspool
"#;
const SGC_PREFIX: &str = "198.51.100.16/28";

/// Retries `f` (a pod's request) every 300 ms until `done` holds for its answer; panics with the
/// last answer after `WAIT`.
fn until(
    what: &str,
    mut f: impl FnMut() -> serde_json::Value,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let v = f();
        if done(&v) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: still {v} after {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn status_ok(v: &serde_json::Value) -> bool {
    v["status"] == 200
}

fn refused(v: &serde_json::Value) -> bool {
    v.get("error").is_some()
}

/// Seed 002's steps on the box, against a simulated internet behind node 2, the egress
/// gateway node (labelled for deploy/06-egress-gateway.yaml, whose agent it runs): REGISTRY_ONLY
/// in the mesh config refuses an unlisted host; the seed's ServiceEntry admits `httpbin.org`
/// straight from the pod; the seed's Gateway, VirtualService and DestinationRule send it through
/// the gateway node over mutual TLS; a StaticGatewayConfiguration with its prefix makes a bound
/// pod leave from its one address inside the prefix; deleting it removes the prefix.
#[tokio::test(flavor = "multi_thread")]
async fn seed_002_egress_steps_through_the_gateway_node() {
    use sluice_tests::{
        egress_world::{SGC_ANNOTATION, prefix_addresses},
        internet::{InternetSpec, SERVERS, UPLINK_NODE},
    };
    let mut c = Cluster::up(2).await;
    c.label_node(2, GATEWAY_NODE_LABELS).await;
    assert_eq!(c.daemonset_of(1).name, "sluice");
    assert_eq!(c.daemonset_of(2).name, "sluice-egress-gateway");
    let httpbin = SERVERS[0];
    let net = c.add_internet(
        2,
        InternetSpec {
            tls_hosts: vec!["httpbin.org".into()],
            dns: [("httpbin.org".to_owned(), vec![httpbin])].into(),
            ..InternetSpec::default()
        },
    );
    c.start_agents().await;
    let role = |c: &Cluster, i| {
        c.agent(i)
            .log_lines()
            .iter()
            .any(|l| l["message"] == "egress gateway role")
    };
    assert!(
        role(&c, 2) && !role(&c, 1),
        "only node2 runs the gateway role"
    );

    c.apply_yaml(SHOP).await;
    c.create_pod("shop", "client", 1, &[("app", "client")])
        .await;
    c.create_pod_annotated(
        "shop",
        "pinned",
        1,
        &[("app", "pinned")],
        &[(SGC_ANNOTATION, "asm-egress-test-sgc")],
    )
    .await;
    let client = c.running("shop", "client", WAIT).await;
    let pinned = c.running("shop", "pinned", WAIT).await;
    let http = |c: &mut Cluster, pod: &sluice_tests::world::Pod, host: &str| {
        tokio::task::block_in_place(|| c.run_in(pod, &["http-get", &format!("{httpbin}:80"), host]))
    };
    let ca = net.ca_cert().display().to_string();

    // Before anything: ALLOW_ANY, straight out from the pod's own address.
    let v = http(&mut c, &client, "example.org");
    assert!(status_ok(&v), "ALLOW_ANY: {v}");

    // Step 1: REGISTRY_ONLY, the seed's mesh config, in the mesh ConfigMap deploy/ reads
    // (`istio` in the root namespace; the seed's AKS name needs `spec.meshConfig`).
    let mesh = seed_002("ConfigMap")[0]["data"]["mesh"].clone();
    c.apply_yaml(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: istio-system}}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\n\
         data:\n  mesh: {mesh}\n"
    ))
    .await;
    until(
        "REGISTRY_ONLY refuses an unlisted host",
        || http(&mut c, &client, "example.org"),
        refused,
    );
    let refusals = c.agent(1).wait_access(1, |l| {
        l["outcome"] == "refused" && l["reason_label"] == "registry_only"
    });
    assert!(refusals >= 1, "{:?}", c.agent(1).access_log());

    // Step 2: the seed's ServiceEntry lists httpbin.org; it goes straight out from the pod.
    for doc in seed_002("Namespace")
        .iter()
        .chain(&seed_002("ServiceEntry"))
    {
        sluice_tests::kube_mesh::apply(&c.client, doc).await;
    }
    until(
        "the ServiceEntry admits httpbin.org",
        || http(&mut c, &client, "httpbin.org"),
        status_ok,
    );
    let direct = net
        .wait_for(Duration::from_secs(5), |r| {
            r.host.as_deref() == Some("httpbin.org")
        })
        .expect("httpbin.org reached");
    assert_eq!(direct.peer.ip(), client.ipv4, "not straight from the pod");
    assert!(refused(&http(&mut c, &client, "example.org")));

    // Steps 3 and 4: the seed's Gateway, DestinationRule and VirtualService; node2 carries the
    // Gateway (its selector's label). httpbin.org now leaves from the gateway node.
    for kind in ["Gateway", "DestinationRule", "VirtualService"] {
        for doc in seed_002(kind) {
            sluice_tests::kube_mesh::apply(&c.client, &doc).await;
        }
    }
    let before = net.records().len();
    until(
        "httpbin.org through the gateway node",
        || {
            let v = http(&mut c, &client, "httpbin.org");
            let last = net.records().into_iter().skip(before).last();
            if last.is_some_and(|r| r.peer.ip() == std::net::IpAddr::V4(UPLINK_NODE)) {
                v
            } else {
                serde_json::json!({"not yet": v})
            }
        },
        status_ok,
    );
    let client_id = "spiffe://cluster.local/ns/shop/sa/client";
    let through = c.agent(2).wait_access(1, |l| {
        l["direction"] == "egress_gateway"
            && l["mode"] == "http"
            && l["outcome"] == "ok"
            && l["src.identity"] == client_id
    });
    assert!(through >= 1, "gateway node: {:?}", c.agent(2).access_log());
    let gateway_id = "spiffe://cluster.local/ns/sluice-system/sa/sluice-egress-gateway";
    let sent = c.agent(1).wait_access(1, |l| {
        l["route"] == "egress_gateway" && l["dst.identity"] == gateway_id
    });
    assert!(sent >= 1, "client's node: {:?}", c.agent(1).access_log());
    assert!(refused(&http(&mut c, &client, "example.org")));

    // Step 6: the StaticGatewayConfiguration, its prefix in status.egressIpPrefix as
    // kube-egress-gateway's controller writes it. The bound pod's TLS to httpbin.org (listed on
    // 443, no route) goes through the pool's node and leaves from its address in the prefix.
    c.apply_yaml(SGC).await;
    let sgcs: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        c.client.clone(),
        "shop",
        &kube::api::ApiResource {
            group: "egressgateway.kubernetes.azure.com".into(),
            version: "v1alpha1".into(),
            api_version: "egressgateway.kubernetes.azure.com/v1alpha1".into(),
            kind: "StaticGatewayConfiguration".into(),
            plural: "staticgatewayconfigurations".into(),
        },
    );
    sgcs.patch_status(
        "asm-egress-test-sgc",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"status": {"egressIpPrefix": SGC_PREFIX}})),
    )
    .await
    .expect("writing the SGC's status");
    let prefix: ipnet::IpNet = SGC_PREFIX.parse().expect("prefix");
    let gw_ns = c.world.node_netns(2);
    let deadline = std::time::Instant::now() + WAIT;
    while prefix_addresses(&gw_ns, prefix).len() != 14 {
        assert!(
            std::time::Instant::now() < deadline,
            "the prefix on the gateway node: {:?}",
            prefix_addresses(&gw_ns, prefix)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(prefix_addresses(&c.world.node_netns(1), prefix).is_empty());
    let expected =
        sluice::egress::source_address(prefix, &sluice::state::WorkloadUid(pinned.uid.clone()));
    let v = until(
        "the pinned pod's TLS to httpbin.org",
        || {
            tokio::task::block_in_place(|| {
                c.run_in(
                    &pinned,
                    &["tls-get", &format!("{httpbin}:443"), "httpbin.org", &ca],
                )
            })
        },
        status_ok,
    );
    let pinned_rec = net
        .wait_for(Duration::from_secs(5), |r| {
            r.proto == "tls" && r.sni.as_deref() == Some("httpbin.org")
        })
        .expect("httpbin.org reached over TLS");
    assert_eq!(
        pinned_rec.peer.ip(),
        expected,
        "not the pinned pod's address in {prefix}: {v}"
    );

    // Deleting the SGC takes the prefix off the gateway node.
    sgcs.delete("asm-egress-test-sgc", &Default::default())
        .await
        .expect("deleting the SGC");
    let deadline = std::time::Instant::now() + WAIT;
    while !prefix_addresses(&gw_ns, prefix).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the prefix stayed on the gateway node"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(net);
}

//! Installing Sluice the way README says: `kubectl apply -f deploy/` against a real API server,
//! and the CA service the install runs (`sluice ca`), against the same real API server.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::ConfigMap,
};
use kube::{Api, Client};
use sluice::{
    identity::{
        CaError, RemoteCa, SecretManager, SignRequest,
        ca_client::read_roots,
        ca_wire::{CertificateRequest, GrpcCode, IMPERSONATED_IDENTITY},
        certificate_request, generate_key,
    },
    state::Identity,
};
use sluice_tests::{
    ca_service::{CaService, pod_token},
    kube_mesh::{self, deploy_dir, deploy_dir_for_1_20},
    kube_server::KubeServer,
};

/// One `kubectl apply -f deploy/` on a fresh cluster creates every object: kubectl applies a
/// directory's files in name order, so the namespace must sort first (it did not, and the
/// ConfigMap and DaemonSet were refused on the first apply).
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_apply_of_deploy_creates_everything_in_one_go() {
    let server = tokio::task::block_in_place(KubeServer::start);
    // The DaemonSet rolls without surge here: the 1.20 API server predates DaemonSet maxSurge.
    let deploy = deploy_dir_for_1_20();
    let out = Command::new("kubectl")
        .env("KUBECONFIG", server.kubeconfig_path())
        .arg("apply")
        .arg("-f")
        .arg(deploy.path())
        .output()
        .expect("kubectl (package kubernetes-client; `cargo xtask setup` installs it)");
    assert!(
        out.status.success(),
        "kubectl apply -f deploy/ failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let client = server.client().await;
    let ds = Api::<DaemonSet>::namespaced(client.clone(), "sluice-system")
        .get("sluice")
        .await
        .expect("the DaemonSet");
    let pod = ds
        .spec
        .and_then(|s| s.template.spec)
        .expect("the DaemonSet's pod spec");
    let volumes = pod.volumes.unwrap_or_default();
    // The root key stays off the nodes: the DaemonSet mounts no Secret at all (a kubelet may
    // read every Secret its pods mount), only the root certificate and a projected token.
    let secrets: Vec<String> = volumes
        .iter()
        .filter_map(|v| v.secret.as_ref().and_then(|s| s.secret_name.clone()))
        .collect();
    assert_eq!(
        secrets,
        Vec::<String>::new(),
        "the DaemonSet mounts no Secret"
    );
    let config_maps: Vec<String> = volumes
        .iter()
        .filter_map(|v| v.config_map.as_ref().map(|c| c.name.clone()))
        .collect();
    assert!(
        config_maps.contains(&"sluice-ca-root-cert".to_owned()),
        "the DaemonSet mounts the root certificate: {config_maps:?}"
    );
    let audiences: Vec<String> = volumes
        .iter()
        .filter_map(|v| v.projected.as_ref())
        .flat_map(|p| p.sources.iter().flatten())
        .filter_map(|s| s.service_account_token.as_ref())
        .filter_map(|t| t.audience.clone())
        .collect();
    assert_eq!(audiences, ["istio-ca"], "a projected token for the CA");
    let ca = Api::<Deployment>::namespaced(client.clone(), "sluice-system")
        .get("sluice-ca")
        .await
        .expect("the CA Deployment");
    let ca_spec = ca.spec.expect("the CA Deployment's spec");
    assert_eq!(ca_spec.replicas, Some(2));
    let ca_secrets: Vec<String> = ca_spec
        .template
        .spec
        .and_then(|s| s.volumes)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| v.secret.and_then(|s| s.secret_name))
        .collect();
    assert_eq!(
        ca_secrets,
        ["sluice-root-ca"],
        "only the CA mounts the root"
    );
    Api::<ConfigMap>::namespaced(client, "sluice-system")
        .get("sluice-config")
        .await
        .expect("the agent's ConfigMap");
}

const TD: &str = "cluster.local";
const AUDIENCE: &str = "istio-ca";

/// Item 1 of issue 17: the CA service signs an identity only for the node agent of a node where
/// a pod of that identity is scheduled. Against the real API server: TokenReview of tokens the
/// API server issued (TokenRequest bound to pods, as the kubelet projects them), pods read and
/// listed with the RBAC of `deploy/05-ca.yaml`. Prints the issuing latency.
#[tokio::test(flavor = "multi_thread")]
async fn install_ca_signs_only_for_pods_on_the_callers_node() {
    let server = tokio::task::block_in_place(KubeServer::start);
    let client = server.client().await;
    for file in ["00-namespace.yaml", "01-serviceaccount.yaml", "05-ca.yaml"] {
        let path = deploy_dir().join(file);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        kube_mesh::apply_yaml(&client, &text).await;
    }
    for ns in ["shop", "other"] {
        apply(
            &client,
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        )
        .await;
    }
    for (ns, sa) in [("shop", "web"), ("shop", "api"), ("other", "web")] {
        apply(&client, serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns}})).await;
    }
    // Node A runs agent-a and shop/web; node B runs agent-b, shop/api and other/web.
    let mut uids = BTreeMap::new();
    for (ns, name, sa, node) in [
        ("sluice-system", "agent-a", "sluice", "node-a"),
        ("sluice-system", "agent-b", "sluice", "node-b"),
        ("shop", "web-a", "web", "node-a"),
        ("shop", "api-b", "api", "node-b"),
        ("other", "web-b", "web", "node-b"),
    ] {
        let pod = apply(
            &client,
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"serviceAccountName": sa, "nodeName": node,
                         "containers": [{"name": "c", "image": "example.invalid/none"}]},
            }),
        )
        .await;
        uids.insert(name, pod.metadata.uid.expect("pod uid"));
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let ca = tokio::task::block_in_place(|| CaService::start(&server, dir.path(), TD));
    let token_a = pod_token(
        &client,
        "sluice-system",
        "sluice",
        ("agent-a", &uids["agent-a"]),
        AUDIENCE,
    )
    .await;
    let token_b = pod_token(
        &client,
        "sluice-system",
        "sluice",
        ("agent-b", &uids["agent-b"]),
        AUDIENCE,
    )
    .await;
    let agent_a = Arc::new(remote_ca(&ca, dir.path(), "token-a", &token_a));
    let agent_b = Arc::new(remote_ca(&ca, dir.path(), "token-b", &token_b));
    let web = Identity::new(TD, "shop", "web");
    let api = Identity::new(TD, "shop", "api");
    let other_web = Identity::new(TD, "other", "web");

    // Granted: agent A, for the pod on its node, through the agent's own SecretManager.
    let manager = SecretManager::new(agent_a.clone(), Duration::from_secs(3600));
    let cert = manager
        .fetch(&web)
        .await
        .unwrap_or_else(|e| panic!("agent A for {web}: {e}\n{}", ca.tail()))
        .current();
    assert_eq!(cert.identity(), &web);
    let roots = read_roots(&ca.root_cert).expect("root");
    let leaf = x509(cert.leaf());
    leaf.verify_signature(Some(x509(&roots[0]).public_key()))
        .expect("the leaf is signed by the mesh root");
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!(
        lifetime <= 3600 + 300,
        "the requested lifetime is kept: {lifetime} s"
    );
    // Granted: agent B for its own node's pod (the control for the refusal below).
    sign(&agent_b, &api)
        .await
        .expect("agent B for shop/api on node B");

    // Refused: a pod on another node.
    let err = sign(&agent_a, &api)
        .await
        .expect_err("agent A for shop/api on node B");
    assert_refused(&err, GrpcCode::PermissionDenied, "node-a");
    // Refused: the same ServiceAccount name in another namespace (its pod is on node B).
    let err = sign(&agent_a, &other_web)
        .await
        .expect_err("agent A for other/web");
    assert_refused(&err, GrpcCode::PermissionDenied, "other/sa/web");

    // Refused: a forged token (agent A's, re-written to claim agent B's pod; the signature no
    // longer matches), a made-up one, and a real one for another audience.
    let forged = forge(
        &token_a,
        &[("agent-a", "agent-b"), (&uids["agent-a"], &uids["agent-b"])],
    );
    let forger = remote_ca(&ca, dir.path(), "token-forged", &forged);
    let err = sign(&forger, &api).await.expect_err("a forged token");
    assert_refused(&err, GrpcCode::Unauthenticated, "");
    let err = agent_a
        .call("not-a-token", &request_for(&web))
        .await
        .expect_err("a made-up token");
    assert_refused(&err, GrpcCode::Unauthenticated, "");
    let wrong_audience = pod_token(
        &client,
        "sluice-system",
        "sluice",
        ("agent-a", &uids["agent-a"]),
        "https://kubernetes.default.svc",
    )
    .await;
    let err = agent_a
        .call(&wrong_audience, &request_for(&web))
        .await
        .expect_err("another audience");
    assert_refused(&err, GrpcCode::Unauthenticated, "");
    // The client checks the audience itself before sending.
    let local = remote_ca(&ca, dir.path(), "token-wrong-aud", &wrong_audience);
    assert!(matches!(
        sign(&local, &web).await,
        Err(CaError::Token { .. })
    ));

    // Refused: a workload's token asking for another identity on its node (only the node
    // agent's ServiceAccount may); granted: its own identity, as Istio grants.
    let token_web = pod_token(&client, "shop", "web", ("web-a", &uids["web-a"]), AUDIENCE).await;
    let workload = remote_ca(&ca, dir.path(), "token-web", &token_web);
    let err = sign(&workload, &other_web)
        .await
        .expect_err("a workload for another identity");
    assert_refused(&err, GrpcCode::PermissionDenied, "own identity");
    sign(&workload, &web)
        .await
        .expect("a workload for its own identity");
    // Refused: a CSR that disagrees with the ImpersonatedIdentity it is sent with.
    let mut mismatched = request_for(&api);
    mismatched
        .metadata
        .insert(IMPERSONATED_IDENTITY.into(), web.to_string());
    let err = agent_a
        .call(&token_a, &mismatched)
        .await
        .expect_err("a mismatched CSR");
    assert_refused(&err, GrpcCode::InvalidArgument, "ImpersonatedIdentity");

    // Issuing latency: 50 sequential requests by agent A (TokenReview, pod read, pod list and
    // signing each; one HTTP/2 connection).
    let mut times = Vec::new();
    for _ in 0..50 {
        let start = Instant::now();
        sign(&agent_a, &web).await.expect("agent A for shop/web");
        times.push(start.elapsed());
    }
    times.sort();
    println!(
        "CA issuing latency over {} requests: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        times.len(),
        ms(times[times.len() / 2]),
        ms(times[times.len() * 99 / 100]),
        ms(times[times.len() - 1]),
    );

    // Refused: the token of a pod that is gone.
    kube_mesh::delete(&client, &serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "agent-b", "namespace": "sluice-system"}})).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match sign(&agent_b, &api).await {
            Err(CaError::Refused { code, .. }) if code != GrpcCode::Unavailable => break,
            other => assert!(
                Instant::now() < deadline,
                "the token of a deleted pod still works: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn apply(client: &Client, doc: serde_json::Value) -> kube::api::DynamicObject {
    kube_mesh::apply(client, &doc).await
}

fn remote_ca(ca: &CaService, dir: &Path, file: &str, token: &str) -> RemoteCa {
    let path = dir.join(file);
    std::fs::write(&path, token).expect("writing a token");
    RemoteCa::new(
        "localhost".into(),
        ca.port,
        read_roots(&ca.root_cert).expect("the mesh root"),
        path,
        AUDIENCE.into(),
        "Kubernetes".into(),
    )
    .expect("a CA client")
}

/// What the agent sends for `identity` (fresh key, CSR, one hour).
async fn sign(ca: &RemoteCa, identity: &Identity) -> Result<sluice::identity::CertChain, CaError> {
    use sluice::identity::CaSource;
    let key = generate_key(identity).expect("key");
    let csr = certificate_request(identity, &key).expect("csr");
    ca.sign(SignRequest {
        identity,
        csr,
        ttl: Duration::from_secs(3600),
    })
    .await
}

fn request_for(identity: &Identity) -> CertificateRequest {
    let key = generate_key(identity).expect("key");
    let der = certificate_request(identity, &key).expect("csr");
    CertificateRequest {
        csr: pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der.to_vec())),
        validity_duration: 3600,
        metadata: BTreeMap::from([(IMPERSONATED_IDENTITY.to_owned(), identity.to_string())]),
    }
}

fn assert_refused(err: &CaError, want: GrpcCode, mentions: &str) {
    match err {
        CaError::Refused { code, message } => {
            assert_eq!(*code, want, "refused with {code:?}: {message}");
            assert!(
                message.contains(mentions),
                "{message:?} should mention {mentions:?}"
            );
        }
        other => panic!("expected a refusal ({want:?}), got: {other}"),
    }
}

/// `token` with its claims rewritten (each `from` → `to`), header and signature kept.
fn forge(token: &str, replace: &[(&str, &str)]) -> String {
    use base64::Engine;
    let enc = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT");
    let mut claims =
        String::from_utf8(enc.decode(parts[1]).expect("base64 claims")).expect("UTF-8");
    for (from, to) in replace {
        assert!(claims.contains(from), "{from} in {claims}");
        claims = claims.replace(from, to);
    }
    format!("{}.{}.{}", parts[0], enc.encode(claims), parts[2])
}

fn x509(der: &[u8]) -> x509_parser::certificate::X509Certificate<'_> {
    x509_parser::parse_x509_certificate(der).expect("X.509").1
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `sluice status` and `sluice dump`, run as an operator would on the node, show a world the
/// test built: which pods are captured, the certificate a connection needed, the config in force
/// with the resource it rejected, the mesh config that is not in force, and the workloads,
/// Services and policies in ztunnel's shape.
#[test]
fn install_status_and_dump_show_a_known_world() {
    use sluice_tests::world::{PodSpec, World};
    let mut w = World::build(
        1,
        &[
            PodSpec::new("web", "shop", 1)
                .label("app", "web")
                .port("http", 8080),
            PodSpec::new("db", "shop", 1).with_sa("db"),
            PodSpec::new("outside", "plain", 1),
        ],
    );
    w.namespace("shop", &[("istio.io/dataplane-mode", "ambient")]);
    w.namespace("plain", &[]);
    w.extra_resources = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.7.7, selector: {app: web}, ports: [{port: 80, targetPort: http}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-shop, namespace: shop}
spec: {action: ALLOW, rules: [{from: [{source: {namespaces: [shop]}}]}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: broken, namespace: shop}
spec: {mtls: {mode: STRICTEST}}
"#
    .into();
    w.start_agent(1, "");
    for pod in ["web", "db", "outside"] {
        w.enroll(pod);
    }
    let _web = w.serve("web", "0.0.0.0:8080");
    let web_addr = std::net::SocketAddr::new(w.pod("web").ipv4, 8080).to_string();
    assert!(w.connect("db", &web_addr, 1000).captured());

    let node = w.node_netns(1);
    let sluice = |args: &[&str]| -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &node])
            .arg(sluice_tests::agent::agent_bin())
            .args(args)
            .output()
            .expect("run sluice");
        assert!(
            out.status.success(),
            "sluice {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8")
    };
    let json = |args: &[&str]| -> serde_json::Value {
        serde_json::from_str(&sluice(args)).unwrap_or_else(|e| panic!("sluice {args:?}: {e}"))
    };

    // Certificates are listed as the agent refreshes its view (every 5 s).
    let db_identity = "spiffe://cluster.local/ns/shop/sa/db";
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        let s = json(&["status", "-o", "json"]);
        let has_cert = s["certificates"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["identity"] == db_identity));
        if has_cert || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(status["node"], "node1", "{status:#}");
    assert_eq!(status["ready"], true, "{status:#}");
    let captured: BTreeMap<String, bool> = status["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .map(|p| {
            (
                format!(
                    "{}/{}",
                    p["namespace"].as_str().unwrap_or("?"),
                    p["name"].as_str().unwrap_or("?")
                ),
                p["captured"] == true,
            )
        })
        .collect();
    assert_eq!(
        captured,
        BTreeMap::from([
            ("plain/outside".to_owned(), false),
            ("shop/db".to_owned(), true),
            ("shop/web".to_owned(), true),
        ])
    );
    let cert = status["certificates"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["identity"] == db_identity))
        .unwrap_or_else(|| panic!("no certificate for {db_identity}: {status:#}"));
    let left = cert["expiresInSeconds"].as_i64().expect("seconds");
    assert!(left > 3600 && left <= 24 * 3600, "{cert}");
    let config = &status["config"];
    assert!(
        config["generation"].as_u64().is_some_and(|g| g >= 1),
        "{config}"
    );
    assert_eq!(
        (config["workloads"].as_u64(), config["services"].as_u64()),
        (Some(3), Some(1)),
        "{config}"
    );
    assert_eq!(config["authorizationPolicies"], 1, "{config}");
    let rejections = config["rejections"].as_array().expect("rejections");
    assert_eq!(rejections.len(), 1, "{config}");
    assert_eq!(rejections[0]["name"], "broken");
    assert_eq!(rejections[0]["field"], "spec.mtls.mode");
    assert!(
        status["warnings"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| {
                w.as_str().is_some_and(|w| {
                    w.contains("istio-system/istio") && w.contains("does not exist")
                })
            })),
        "{status:#}"
    );
    assert!(
        status["limits"]["openFiles"]
            .as_u64()
            .is_some_and(|n| n > 0)
    );
    // The same as a table.
    let table = sluice(&["status"]);
    assert!(
        table.contains("3 known on this node, 2 captured"),
        "{table}"
    );
    assert!(
        table.contains("PeerAuthentication.security.istio.io shop/broken: spec.mtls.mode"),
        "{table}"
    );
    // And as a metric.
    let (_, metrics) = w.node_http_get(1, 15020, "/metrics");
    assert!(
        metrics.contains(r#"sluice_mesh_config_not_in_force{configmap="istio-system/istio"} 1"#),
        "{metrics}"
    );

    // `dump`, in ztunnel's shape.
    let workloads = json(&["dump", "workloads", "-n", "shop", "-o", "json"]);
    let mut names: Vec<(String, String, String)> = workloads
        .as_array()
        .expect("a list")
        .iter()
        .map(|w| {
            (
                w["name"].as_str().unwrap_or("?").to_owned(),
                w["protocol"].as_str().unwrap_or("?").to_owned(),
                w["workloadIps"][0].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            (
                "db".to_owned(),
                "HBONE".to_owned(),
                w.pod("db").ipv4.to_string()
            ),
            (
                "web".to_owned(),
                "HBONE".to_owned(),
                w.pod("web").ipv4.to_string()
            ),
        ]
    );
    let services = json(&["dump", "services", "-o", "json"]);
    assert_eq!(
        services[0]["vips"],
        serde_json::json!(["/10.96.7.7"]),
        "{services:#}"
    );
    let endpoint = &services[0]["endpoints"][&w.pod("web").uid];
    assert_eq!(
        endpoint["port"],
        serde_json::json!({"80": 8080}),
        "{services:#}"
    );
    let policies = sluice(&["dump", "policies"]);
    let row = policies
        .lines()
        .find(|l| l.contains("allow-shop"))
        .unwrap_or_else(|| panic!("{policies}"));
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        ["shop", "allow-shop", "Allow", "Namespace", "1"]
    );
    let certificates = sluice(&["dump", "certificates", "-o", "yaml"]);
    assert!(certificates.contains(db_identity), "{certificates}");
}

/// Links, addresses, rules and routes of network namespace `ns` (every table, both families),
/// leaving out only IPv6 link-local addresses and routes (the kernel adds those on its own when
/// duplicate address detection ends, at a time of its choosing).
fn netlink_snapshot(ns: &str) -> BTreeSet<String> {
    use sluice_tests::egress_world::ip_json;
    let mut out = BTreeSet::new();
    for link in ip_json(ns, &["-d", "link"])
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        out.insert(format!(
            "link {} {} {}",
            link["ifname"], link["linkinfo"]["info_kind"], link["flags"]
        ));
    }
    for link in ip_json(ns, &["addr"])
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        for a in link["addr_info"].as_array().cloned().unwrap_or_default() {
            if a["local"].as_str().is_some_and(|l| l.starts_with("fe80:")) {
                continue;
            }
            out.insert(format!(
                "addr {} {}/{}",
                link["ifname"], a["local"], a["prefixlen"]
            ));
        }
    }
    for fam in ["-4", "-6"] {
        for r in ip_json(ns, &[fam, "rule"])
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            out.insert(format!("rule {fam} {r}"));
        }
        for r in ip_json(ns, &[fam, "route", "show", "table", "all"])
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            if r["dst"].as_str().is_some_and(|d| d.starts_with("fe80:"))
                || r["dst"].as_str().is_some_and(|d| d.starts_with("ff00:"))
            {
                continue;
            }
            out.insert(format!("route {fam} {r}"));
        }
    }
    out
}

/// Every file under `dir` with its contents (or `(absent)`); a `.conflist` as its JSON value
/// (Sluice writes the network configuration back re-serialised: the same JSON, not the same
/// bytes).
fn files_snapshot(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        out.insert(dir.display().to_string(), "(absent)".into());
        return out;
    };
    for e in entries.filter_map(Result::ok) {
        let path = e.path();
        let text = if path.is_dir() {
            "(dir)".to_owned()
        } else if path.extension().is_some_and(|e| e == "conflist") {
            let text = std::fs::read_to_string(&path).expect("conflist");
            serde_json::from_str::<serde_json::Value>(&text)
                .map(|v| v.to_string())
                .unwrap_or_else(|e| format!("(not JSON: {e}) {text}"))
        } else {
            std::fs::read(&path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|e| format!("(unreadable: {e})"))
        };
        out.insert(path.display().to_string(), text);
    }
    out
}

fn assert_same_sets(before: &BTreeSet<String>, after: &BTreeSet<String>, what: &str) {
    let gone: Vec<_> = before.difference(after).collect();
    let left: Vec<_> = after.difference(before).collect();
    assert!(
        gone.is_empty() && left.is_empty(),
        "{what}:\n  left behind: {left:#?}\n  gone: {gone:#?}"
    );
}

/// `sluice cleanup` leaves a node exactly as it was before Sluice ran on it: an agent with
/// egress pinning programmed a prefix (addresses on `sluice-egress`, rules, table 1339), captured
/// a pod (pins, links, maps, routing inside the pod), and `install-cni` chained its entry into the
/// conflist. Netlink of the gateway node and of the pod, bpffs under both pin directories, and
/// the CNI directories are compared before and after.
#[test]
fn cleanup_leaves_the_node_exactly_as_it_was() {
    use sluice_tests::{
        agent::agent_bin,
        egress_world::{
            AMBIENT, PINNED_PREFIX, SGC_ANNOTATION, agent_spec, nodes_yaml, prefix_addresses, sgc,
            wait_until,
        },
        internet::InternetSpec,
        world::{PodSpec, World},
    };
    let pods = [PodSpec::new("pinned", "shop", 1).annotate(SGC_ANNOTATION, "pinned")];
    let mut w = World::build(2, &pods);
    w.namespace("shop", &[AMBIENT]);
    let _net = w.add_internet_with(2, InternetSpec::default());
    let node2 = w.node_netns(2);
    let pod_ns = w.pod("pinned").netns.clone();

    // The node's CNI directories, with the primary CNI's conflist.
    let cni = tempfile::tempdir().expect("tempdir");
    let (conf_dir, bin_dir) = (cni.path().join("net.d"), cni.path().join("bin"));
    std::fs::create_dir_all(&conf_dir).expect("mkdir");
    std::fs::create_dir_all(&bin_dir).expect("mkdir");
    std::fs::write(
        conf_dir.join("10-podnet.conflist"),
        r#"{"cniVersion": "1.0.0", "name": "podnet", "plugins": [{"type": "bridge"}]}"#,
    )
    .expect("conflist");
    std::fs::write(cni.path().join("token"), "t").expect("token");
    std::fs::write(cni.path().join("ca.crt"), "ca").expect("ca");

    let before = (
        netlink_snapshot(&node2),
        netlink_snapshot(&pod_ns),
        files_snapshot(&w.pin_dir(1)),
        files_snapshot(&w.pin_dir(2)),
        files_snapshot(&conf_dir),
        files_snapshot(&bin_dir),
    );

    let out = Command::new(agent_bin())
        .args(["install-cni", "--server", "https://127.0.0.1:6443"])
        .arg("--conf-dir")
        .arg(&conf_dir)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--token-file")
        .arg(cni.path().join("token"))
        .arg("--ca-file")
        .arg(cni.path().join("ca.crt"))
        .output()
        .expect("sluice install-cni");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read_to_string(conf_dir.join("10-podnet.conflist"))
            .expect("conflist")
            .contains("\"sluice\""),
        "install-cni chained no entry"
    );

    w.extra_resources = format!("{}{}", nodes_yaml(), sgc("pinned", None));
    let prefixes = format!("shop/pinned: {PINNED_PREFIX}");
    for i in [1, 2] {
        w.start_agent(i, &agent_spec(i, &prefixes));
    }
    assert!(w.enroll("pinned"), "pinned not captured");
    let prefix = PINNED_PREFIX.parse().expect("prefix");
    wait_until(
        Duration::from_secs(15),
        "the prefix on the gateway node",
        || prefix_addresses(&node2, prefix).len() == 14,
    );
    assert_ne!(
        netlink_snapshot(&node2),
        before.0,
        "pinning changed nothing"
    );
    assert_ne!(
        netlink_snapshot(&pod_ns),
        before.1,
        "capture changed nothing in the pod"
    );
    assert_ne!(files_snapshot(&w.pin_dir(2)), before.3, "nothing pinned");

    // Stop the agents (a restart keeps everything), then clean each node up.
    for i in [1, 2] {
        let state_dir = w
            .agent_config(i, &agent_spec(i, &prefixes))
            .parent()
            .expect("node dir")
            .join("state");
        w.agents.remove(&i).expect("agent").stop();
        let ns = w.node_netns(i);
        // nsenter, not `ip netns exec`: that one mounts a fresh /sys, without bpffs.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"))
            .arg(agent_bin())
            .arg("cleanup")
            .arg("--pin-path")
            .arg(w.pin_dir(i))
            .arg("--state-dir")
            .arg(&state_dir);
        if i == 2 {
            cmd.arg("--cni-conf-dir")
                .arg(&conf_dir)
                .arg("--cni-bin-dir")
                .arg(&bin_dir);
        } else {
            // Node 1 has no CNI set up here: point at empty directories.
            cmd.args([
                "--cni-conf-dir",
                "/nonexistent",
                "--cni-bin-dir",
                "/nonexistent",
            ]);
        }
        let started = Instant::now();
        let out = cmd.output().expect("sluice cleanup");
        eprintln!(
            "node{i}: sluice cleanup took {:.1} ms:\n{}",
            ms(started.elapsed()),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "cleanup on node{i} failed");
    }

    assert_same_sets(&before.0, &netlink_snapshot(&node2), "gateway node netlink");
    assert_same_sets(&before.1, &netlink_snapshot(&pod_ns), "pod netlink");
    assert_eq!(files_snapshot(&w.pin_dir(1)), before.2, "node1 bpffs");
    assert_eq!(files_snapshot(&w.pin_dir(2)), before.3, "node2 bpffs");
    assert_eq!(
        files_snapshot(&conf_dir),
        before.4,
        "CNI configuration directory"
    );
    assert_eq!(files_snapshot(&bin_dir), before.5, "CNI binary directory");
}

/// A minimal GatewayClass CRD, as a cluster with Gateway API has (the test API server has none).
fn gatewayclass_crd() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": "gatewayclasses.gateway.networking.k8s.io",
            "annotations": {"api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api/pull/2466"}
        },
        "spec": {
            "group": "gateway.networking.k8s.io",
            "scope": "Cluster",
            "names": {"plural": "gatewayclasses", "singular": "gatewayclass", "kind": "GatewayClass", "listKind": "GatewayClassList"},
            "versions": [{
                "name": "v1beta1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}
            }]
        }
    })
}

fn sluice(args: &[&str], kubeconfig: &Path) -> (bool, String, String) {
    let out = Command::new(sluice_tests::agent::agent_bin())
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .output()
        .expect("sluice");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn get_dynamic(
    client: &Client,
    o: &sluice::install::render::Object,
) -> Option<kube::api::DynamicObject> {
    let (group, version) = o
        .api_version()
        .split_once('/')
        .unwrap_or(("", o.api_version()));
    let gvk = kube::core::GroupVersionKind::gvk(group, version, o.kind());
    let (ar, caps) = kube::discovery::pinned_kind(client, &gvk).await.ok()?;
    let api: Api<kube::api::DynamicObject> = match (caps.scope, o.namespace()) {
        (kube::discovery::Scope::Namespaced, Some(ns)) => {
            Api::namespaced_with(client.clone(), ns, &ar)
        }
        _ => Api::all_with(client.clone(), &ar),
    };
    api.get_opt(o.name()).await.expect("get")
}

/// `sluice install` renders deploy/ and applies it by server-side apply: every object is
/// accepted (a dry run first persists nothing), the DaemonSet is complete, an existing CRD is
/// not replaced by Sluice's reduced copy, the GatewayClass is applied where Gateway API is
/// served; `sluice uninstall` deletes them all again and leaves the CRDs.
#[tokio::test(flavor = "multi_thread")]
async fn sluice_install_applies_every_object_and_uninstall_removes_them() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let server = tokio::task::block_in_place(KubeServer::start);
    let client = server.client().await;
    let kubeconfig = server.kubeconfig_path();
    let crds = Api::<CustomResourceDefinition>::all(client.clone());

    // The cluster already has Gateway API's GatewayClass and a "real" PeerAuthentication CRD.
    apply(&client, gatewayclass_crd()).await;
    let rendered_with_crds = sluice::install::render::render(
        &sluice::install::values::Values::load(
            None,
            &["crds.install=true".into(), "daemonSetMaxSurge=false".into()],
        )
        .expect("values"),
    )
    .expect("render");
    let mut existing = rendered_with_crds
        .crds
        .iter()
        .find(|o| o.name() == "peerauthentications.security.istio.io")
        .expect("the PeerAuthentication CRD")
        .value
        .clone();
    existing["metadata"]["labels"] = serde_json::json!({"owner": "istio"});
    apply(&client, existing).await;
    for _ in 0..100 {
        let established = |c: &CustomResourceDefinition| {
            c.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        };
        let gc = crds
            .get("gatewayclasses.gateway.networking.k8s.io")
            .await
            .expect("crd");
        if established(&gc) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (ok, out, err) = tokio::task::block_in_place(|| {
        sluice(
            &["install", "--dry-run", "--set", "crds.install=true"],
            &kubeconfig,
        )
    });
    assert!(ok, "sluice install --dry-run:\n{out}{err}");
    assert!(out.contains("Checked: Namespace sluice-system"), "{out}");
    assert!(out.contains("Checked: ClusterRole sluice"), "{out}");
    assert!(
        out.contains("KindServed: DaemonSet sluice-system/sluice"),
        "{out}"
    );
    for o in &rendered_with_crds.objects {
        assert!(
            get_dynamic(&client, o).await.is_none(),
            "dry run persisted {}",
            o.describe()
        );
    }

    let started = Instant::now();
    let (ok, out, err) = tokio::task::block_in_place(|| {
        sluice(&["install", "--set", "crds.install=true"], &kubeconfig)
    });
    eprintln!(
        "sluice install took {:.0} ms:\n{out}{err}",
        ms(started.elapsed())
    );
    assert!(ok, "sluice install:\n{out}{err}");
    assert!(
        err.contains("maxSurge"),
        "the 1.20 API server's missing surge is said: {err}"
    );
    assert!(
        out.contains(
            "KeptExisting: CustomResourceDefinition peerauthentications.security.istio.io"
        ),
        "{out}"
    );
    assert!(out.contains("Applied: GatewayClass sluice"), "{out}");
    for o in rendered_with_crds.all() {
        let live = get_dynamic(&client, o).await;
        assert!(live.is_some(), "{} was not created", o.describe());
    }
    let pa = crds
        .get("peerauthentications.security.istio.io")
        .await
        .expect("crd");
    assert_eq!(
        pa.metadata
            .labels
            .unwrap_or_default()
            .get("owner")
            .map(String::as_str),
        Some("istio"),
        "an existing CRD is left as the cluster had it"
    );
    let ds = Api::<DaemonSet>::namespaced(client.clone(), "sluice-system")
        .get("sluice")
        .await
        .expect("the DaemonSet");
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("pod spec");
    let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["install-cni", "agent"]);
    assert_eq!(
        pod.node_selector
            .unwrap_or_default()
            .get("kubernetes.io/os")
            .map(String::as_str),
        Some("linux")
    );
    let cni = &pod.containers[0];
    assert!(
        cni.args
            .clone()
            .unwrap_or_default()
            .contains(&"--watch".to_owned())
    );
    let rolling = ds
        .spec
        .and_then(|s| s.update_strategy)
        .and_then(|u| u.rolling_update)
        .expect("rolling");
    assert_eq!(
        rolling.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );

    // Applying again changes nothing and fails nothing.
    let (ok, out, err) = tokio::task::block_in_place(|| sluice(&["install"], &kubeconfig));
    assert!(ok, "second sluice install:\n{out}{err}");

    let started = Instant::now();
    let (ok, out, err) = tokio::task::block_in_place(|| sluice(&["uninstall"], &kubeconfig));
    eprintln!(
        "sluice uninstall took {:.0} ms:\n{out}{err}",
        ms(started.elapsed())
    );
    assert!(ok, "sluice uninstall:\n{out}{err}");
    for o in rendered_with_crds
        .objects
        .iter()
        .chain(&rendered_with_crds.gateway_api)
    {
        let gone = async {
            for _ in 0..300 {
                match get_dynamic(&client, o).await {
                    None => return true,
                    // A namespace finishes terminating once the controllers emptied it.
                    Some(d)
                        if o.kind() == "Namespace" && d.metadata.deletion_timestamp.is_some() =>
                    {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Some(_) => return false,
                }
            }
            o.kind() == "Namespace"
        };
        assert!(
            gone.await,
            "{} is still there after uninstall",
            o.describe()
        );
    }
    for o in &rendered_with_crds.crds {
        assert!(
            get_dynamic(&client, o).await.is_some(),
            "uninstall deleted {}",
            o.describe()
        );
    }
}

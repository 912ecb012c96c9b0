//! Installing Sluice the way README says: `kubectl apply -f deploy/` against a real API server,
//! and the CA service the install runs (`sluice ca`), against the same real API server.
use std::{
    collections::BTreeMap,
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

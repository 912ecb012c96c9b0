//! The kube source against a real kube-apiserver (1.20, from `tests/apiserver/apiserver.sh`):
//! every watched kind flows into MeshState, invalid resources are rejected with a status
//! condition, the source rides out an API server outage, the seed scenarios' documents apply
//! unchanged, and `deploy/` applies. Needs root and `apiserver.sh install` (or `cargo xtask setup`).
//!
//! Each test starts its own API server (~5 s, ~350 MB); `cargo xtask test` runs them one at a time.
use std::time::{Duration, Instant};

use serde_json::json;
use sluice::state::{MeshSettings, MeshState};
use sluice_tests::{
    kube_mesh::{Mesh, apply, condition, delete, install_crds, json_at, mentions, wait_object},
    kube_server::KubeServer,
};

const WAIT: Duration = Duration::from_secs(30);

fn ns(name: &str, labels: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(
    namespace: &str,
    name: &str,
    node: &str,
    ip: &str,
    labels: serde_json::Value,
) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": "web-sa",
                 "containers": [{"name": "app", "image": "example.com/app:1"}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

/// One custom kind: a valid object, an update that changes MeshState, and how to find it.
struct Case {
    name: &'static str,
    create: serde_json::Value,
    update: serde_json::Value,
}

fn custom_cases(ns: &str) -> Vec<Case> {
    let meta = |name: &str| json!({"name": name, "namespace": ns});
    vec![
        Case {
            name: "ServiceEntry",
            create: json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": meta("se"),
                "spec": {"hosts": ["one.example.com"], "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
                         "resolution": "DNS", "location": "MESH_EXTERNAL"}}),
            update: json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": meta("se"),
                "spec": {"hosts": ["two.example.com"], "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
                         "resolution": "DNS", "location": "MESH_EXTERNAL"}}),
        },
        Case {
            name: "Sidecar",
            create: json!({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": meta("sc"),
                "spec": {"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}}}),
            update: json!({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": meta("sc"),
                "spec": {"outboundTrafficPolicy": {"mode": "ALLOW_ANY"}}}),
        },
        Case {
            name: "Gateway.networking.istio.io",
            create: json!({"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": meta("egw"),
                "spec": {"selector": {"istio": "egress"}, "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["one.example.com"]}]}}),
            update: json!({"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": meta("egw"),
                "spec": {"selector": {"istio": "egress"}, "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["two.example.com"]}]}}),
        },
        Case {
            name: "VirtualService",
            create: json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": meta("vs"),
                "spec": {"hosts": ["one.example.com"], "gateways": ["mesh", "egw"],
                         "http": [{"match": [{"gateways": ["mesh"], "port": 80}], "route": [{"destination": {"host": "egw", "port": {"number": 80}}}]}]}}),
            update: json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": meta("vs"),
                "spec": {"hosts": ["two.example.com"], "gateways": ["mesh", "egw"],
                         "http": [{"match": [{"gateways": ["mesh"], "port": 80}], "route": [{"destination": {"host": "egw", "port": {"number": 80}}}]}]}}),
        },
        Case {
            name: "DestinationRule",
            create: json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": meta("dr"),
                "spec": {"host": "one.example.com", "trafficPolicy": {"tls": {"mode": "SIMPLE", "sni": "one.example.com"}}}}),
            update: json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": meta("dr"),
                "spec": {"host": "two.example.com", "trafficPolicy": {"tls": {"mode": "SIMPLE", "sni": "two.example.com"}}}}),
        },
        Case {
            name: "PeerAuthentication",
            create: json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": meta("pa"),
                "spec": {"mtls": {"mode": "STRICT"}}}),
            update: json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": meta("pa"),
                "spec": {"mtls": {"mode": "PERMISSIVE"}}}),
        },
        Case {
            name: "AuthorizationPolicy",
            create: json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": meta("ap"),
                "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]}}),
            update: json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": meta("ap"),
                "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9090"]}}]}]}}),
        },
        Case {
            name: "StaticGatewayConfiguration",
            create: json!({"apiVersion": "egressgateway.kubernetes.azure.com/v1alpha1", "kind": "StaticGatewayConfiguration", "metadata": meta("sgc"),
                "spec": {"gatewayNodepoolName": "gwpool", "excludeCidrs": ["10.0.0.0/8"]}}),
            update: json!({"apiVersion": "egressgateway.kubernetes.azure.com/v1alpha1", "kind": "StaticGatewayConfiguration", "metadata": meta("sgc"),
                "spec": {"gatewayNodepoolName": "gwpool", "excludeCidrs": ["10.0.0.0/8", "172.16.0.0/12"]}}),
        },
        Case {
            name: "Gateway.gateway.networking.k8s.io",
            create: json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": meta("ingress"),
                "spec": {"gatewayClassName": "sluice", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}}),
            update: json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": meta("ingress"),
                "spec": {"gatewayClassName": "sluice", "listeners": [{"name": "http", "port": 8080, "protocol": "HTTP"}]}}),
        },
        Case {
            name: "HTTPRoute",
            create: json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": meta("route"),
                "spec": {"parentRefs": [{"name": "ingress"}], "hostnames": ["one.example.com"],
                         "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}}),
            update: json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": meta("route"),
                "spec": {"parentRefs": [{"name": "ingress"}], "hostnames": ["two.example.com"],
                         "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}}),
        },
        Case {
            name: "ReferenceGrant",
            create: json!({"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant", "metadata": meta("grant"),
                "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "shop"}],
                         "to": [{"group": "", "kind": "Service"}]}}),
            update: json!({"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant", "metadata": meta("grant"),
                "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "shop"}],
                         "to": [{"group": "", "kind": "Service", "name": "web"}]}}),
        },
    ]
}

fn state_json(s: &MeshState) -> String {
    serde_json::to_string(s).expect("state serialises")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_every_watched_kind_flows_into_mesh_state() {
    let server = KubeServer::start();
    let client = server.client().await;
    install_crds(&client).await;
    let mut mesh = Mesh::start(&client, MeshSettings::default()).await;

    // Core kinds: create.
    apply(
        &client,
        &ns("kf", json!({"istio.io/dataplane-mode": "ambient"})),
    )
    .await;
    apply(&client, &ns("istio-system", json!({}))).await;
    apply(
        &client,
        &pod("kf", "web", "node-a", "10.1.0.5", json!({"app": "web"})),
    )
    .await;
    apply(&client, &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "kf"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}})).await;
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "labels": {"pool": "a"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]}});
    apply(&client, &node).await;
    let mesh_cm = |mode: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio", "namespace": "istio-system"},
        "data": {"mesh": format!("outboundTrafficPolicy:\n  mode: {mode}\n")}})
    };
    apply(&client, &mesh_cm("REGISTRY_ONLY")).await;
    let (s, _) = mesh
        .wait_for(WAIT, "core kinds", |s| {
            s.namespaces
                .get("kf")
                .is_some_and(|n| n.labels.contains_key("istio.io/dataplane-mode"))
                && s.workload_by_name("kf", "web").is_some_and(|w| {
                    w.ips == vec!["10.1.0.5".parse::<std::net::IpAddr>().expect("ip")]
                })
                && s.services
                    .get("kf/web")
                    .is_some_and(|svc| !svc.vips.is_empty() && svc.endpoints.len() == 1)
                && s.nodes.get("node-a").is_some_and(|n| {
                    n.addresses == vec!["192.0.2.10".parse::<std::net::IpAddr>().expect("ip")]
                })
                && json_at(s, "/egress/policy/mesh_mode") == "REGISTRY_ONLY"
        })
        .await;
    let web = s.workload_by_name("kf", "web").expect("web");
    assert_eq!(web.service_account, "web-sa");
    assert!(web.membership.in_mesh(), "{web:?}");

    // Core kinds: update.
    apply(&client, &ns("kf", json!({}))).await;
    apply(
        &client,
        &pod("kf", "web", "node-a", "10.1.0.6", json!({"app": "web"})),
    )
    .await;
    apply(&client, &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "labels": {"pool": "b"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.11"}]}})).await;
    apply(&client, &mesh_cm("ALLOW_ANY")).await;
    mesh.wait_for(WAIT, "core kinds updated", |s| {
        s.workload_by_name("kf", "web").is_some_and(|w| {
            !w.membership.in_mesh()
                && w.ips == vec!["10.1.0.6".parse::<std::net::IpAddr>().expect("ip")]
        }) && s
            .nodes
            .get("node-a")
            .is_some_and(|n| n.labels.get("pool").map(String::as_str) == Some("b"))
            && json_at(s, "/egress/policy/mesh_mode") == "ALLOW_ANY"
    })
    .await;

    // Custom kinds: create, update, delete each.
    for case in custom_cases("kf") {
        let name = case.create["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_owned();
        apply(&client, &case.create).await;
        let (before, took) = mesh
            .wait_for(WAIT, &format!("{} created", case.name), |s| {
                mentions(s, "kf", &name)
            })
            .await;
        let before = state_json(&before);
        apply(&client, &case.update).await;
        mesh.wait_for(WAIT, &format!("{} updated", case.name), |s| {
            mentions(s, "kf", &name) && state_json(s) != before
        })
        .await;
        eprintln!("{}: created → MeshState in {took:?}", case.name);
        if case.name == "Gateway.gateway.networking.k8s.io" {
            continue; // the HTTPRoute case refers to it; deleted below
        }
        delete(&client, &case.create).await;
        mesh.wait_for(WAIT, &format!("{} deleted", case.name), |s| {
            !mentions(s, "kf", &name)
        })
        .await;
    }
    let gw = &custom_cases("kf")[8].create;
    delete(&client, gw).await;
    mesh.wait_for(WAIT, "Gateway API Gateway deleted", |s| {
        !s.ingress.gateways.contains_key("kf/ingress")
    })
    .await;

    // Core kinds: delete.
    delete(&client, &pod("kf", "web", "node-a", "10.1.0.6", json!({}))).await;
    delete(&client, &node).await;
    delete(&client, &mesh_cm("ALLOW_ANY")).await;
    mesh.wait_for(WAIT, "core kinds deleted", |s| {
        s.workload_by_name("kf", "web").is_none()
            && !s.nodes.contains_key("node-a")
            && json_at(s, "/egress/policy/mesh_config").is_null()
    })
    .await;
}

/// Every one of a series of single changes (namespace relabels) reaches MeshState; prints the
/// propagation distribution (API call issued → MeshState published; run with `--nocapture`).
/// The figure is a measurement, not a pass/fail bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_single_changes_propagate_to_mesh_state() {
    let server = KubeServer::start();
    let client = server.client().await;
    install_crds(&client).await;
    apply(&client, &ns("lat", json!({}))).await;
    apply(&client, &pod("lat", "p", "node-a", "10.2.0.5", json!({}))).await;
    let mut mesh = Mesh::start(&client, MeshSettings::default()).await;
    mesh.wait_for(WAIT, "pod listed", |s| {
        s.workload_by_name("lat", "p").is_some()
    })
    .await;
    let mut samples = Vec::new();
    for i in 0..40 {
        let on = i % 2 == 0;
        let labels = if on {
            json!({"istio.io/dataplane-mode": "ambient"})
        } else {
            json!({})
        };
        let start = Instant::now();
        apply(&client, &ns("lat", labels)).await;
        mesh.wait_for(WAIT, "membership flip", |s| {
            s.workload_by_name("lat", "p")
                .is_some_and(|w| w.membership.in_mesh() == on)
        })
        .await;
        samples.push(start.elapsed());
    }
    samples.sort();
    let p50 = samples[samples.len() / 2];
    let p90 = samples[samples.len() * 9 / 10];
    let max = samples[samples.len() - 1];
    eprintln!(
        "propagation (apply issued → MeshState published), 40 changes: p50 {p50:?}, p90 {p90:?}, max {max:?}"
    );
    println!(
        "kube_propagation_ms p50={} p90={} max={}",
        p50.as_millis(),
        p90.as_millis(),
        max.as_millis()
    );
}

/// An AgentConfig for an in-process kube source with the status writer on.
fn agent_config(node: &str) -> sluice::config::AgentConfig {
    let mut agent = sluice::config::AgentConfig {
        node_name: node.into(),
        ..Default::default()
    };
    agent.kube.enabled = true;
    agent.kube.lease_namespace = Some("sluice-system".into());
    agent
}

/// Starts the kube source with the status writer (as `sluice run` does) and waits for its first
/// state.
async fn start_running(
    client: &kube::Client,
    node: &str,
    settings: MeshSettings,
) -> (sluice::sources::kube::Running, sluice::state::StateHandle) {
    let (publisher, state) = sluice::state::channel();
    let options = sluice::sources::kube::SourceOptions {
        settings,
        extra: Default::default(),
        debounce: Duration::from_millis(10),
    };
    let running = sluice::sources::kube::Running::start(
        client.clone(),
        &agent_config(node),
        options,
        publisher,
    );
    tokio::time::timeout(Duration::from_secs(60), running.source.synced())
        .await
        .expect("kube source not synced within 60 s");
    (running, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_invalid_resources_are_rejected_with_a_condition_while_valid_ones_apply() {
    let server = KubeServer::start();
    let client = server.client().await;
    install_crds(&client).await;
    apply(&client, &ns("sluice-system", json!({}))).await;
    apply(
        &client,
        &ns("rj", json!({"istio.io/dataplane-mode": "ambient"})),
    )
    .await;
    let (running, mut state) = start_running(&client, "node-1", MeshSettings::default()).await;

    let meta = |name: &str| json!({"name": name, "namespace": "rj"});
    let pa_good = json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": meta("strict"),
        "spec": {"mtls": {"mode": "STRICT"}}});
    let pa_bad = json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": meta("sometimes"),
        "spec": {"selector": {"matchLabels": {"app": "x"}}, "mtls": {"mode": "SOMETIMES"}}});
    let se_bad = json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": meta("bigport"),
        "spec": {"hosts": ["big.example.com"], "ports": [{"number": 70000, "name": "x", "protocol": "TCP"}], "resolution": "DNS"}});
    let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": meta("backend"),
        "spec": {"ports": [{"port": 8080, "protocol": "TCP"}]}});
    let gw_good = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": meta("web"),
        "spec": {"gatewayClassName": "sluice", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}});
    let gw_bad = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": meta("by-ip"),
        "spec": {"gatewayClassName": "sluice", "listeners": [{"name": "a", "port": 80, "protocol": "HTTP"}, {"name": "b", "port": 81, "protocol": "HTTP", "hostname": "10.0.0.1"}]}});
    let gw_other = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": meta("not-ours"),
        "spec": {"gatewayClassName": "someone-else", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}});
    let route_good = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": meta("good"),
        "spec": {"parentRefs": [{"name": "web"}], "rules": [{"backendRefs": [{"name": "backend", "port": 8080}]}]}});
    let route_bad = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": meta("relative"),
        "spec": {"parentRefs": [{"name": "web"}], "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "cart"}}],
                 "backendRefs": [{"name": "backend", "port": 8080}]}]}});
    let route_missing = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": meta("dangling"),
        "spec": {"parentRefs": [{"name": "web"}], "rules": [{"backendRefs": [{"name": "nothing", "port": 8080}]}]}});
    // A backend in another namespace: refused until a ReferenceGrant there permits it.
    let other_svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "shared", "namespace": "rj-other"},
        "spec": {"ports": [{"port": 8080, "protocol": "TCP"}]}});
    let route_cross = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": meta("cross"),
        "spec": {"parentRefs": [{"name": "web"}], "rules": [{"backendRefs": [{"name": "shared", "namespace": "rj-other", "port": 8080}]}]}});
    apply(&client, &ns("rj-other", json!({}))).await;
    for doc in [
        &pa_good,
        &pa_bad,
        &se_bad,
        &svc,
        &gw_good,
        &gw_bad,
        &gw_other,
        &route_good,
        &route_bad,
        &route_missing,
        &other_svc,
        &route_cross,
    ] {
        apply(&client, doc).await;
    }

    // Valid resources apply; invalid ones stay out of MeshState.
    let (s, _) =
        sluice_tests::kube_mesh::wait_for(&mut state, WAIT, "valid resources applied", |s| {
            mentions(s, "rj", "strict")
                && s.ingress.gateways.contains_key("rj/web")
                && s.ingress.routes.contains_key("rj/good")
                && s.ingress.routes.contains_key("rj/dangling")
        })
        .await;
    assert!(
        !mentions(&s, "rj", "sometimes"),
        "invalid PeerAuthentication in the state"
    );
    assert!(
        !mentions(&s, "rj", "bigport"),
        "invalid ServiceEntry in the state"
    );
    assert!(!s.ingress.gateways.contains_key("rj/by-ip"));
    assert!(!s.ingress.routes.contains_key("rj/relative"));

    // Conditions: Istio-style on Istio kinds, Gateway API conditions on Gateways and routes.
    let long = Duration::from_secs(45);
    let istio = |obj: &serde_json::Value| condition(obj, "/status/conditions", "SluiceAccepted");
    let bad = wait_object(&client, &pa_bad, long, "PeerAuthentication rejected", |o| {
        istio(o).is_some()
    })
    .await;
    let (status, reason, message) = istio(&bad).expect("condition");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "Invalid"),
        "{message}"
    );
    assert!(message.contains("spec.mtls.mode"), "{message}");
    let good = wait_object(
        &client,
        &pa_good,
        long,
        "PeerAuthentication accepted",
        |o| istio(o).is_some(),
    )
    .await;
    assert_eq!(istio(&good).map(|c| c.0), Some("True".to_owned()));
    let se = wait_object(&client, &se_bad, long, "ServiceEntry rejected", |o| {
        istio(o).is_some()
    })
    .await;
    let (status, _, message) = istio(&se).expect("condition");
    assert_eq!(status, "False");
    assert!(message.contains("spec.ports"), "{message}");

    let gw = |obj: &serde_json::Value, t: &str| condition(obj, "/status/conditions", t);
    let web = wait_object(
        &client,
        &gw_good,
        long,
        "Gateway accepted, and not Programmed while nothing listens",
        |o| {
            gw(o, "Accepted").is_some_and(|c| c.0 == "True")
                && gw(o, "Programmed").is_some_and(|c| c.0 == "False" && c.1 == "Pending")
                // good, dangling and cross (attachment does not depend on ResolvedRefs);
                // the rejected one is left out.
                && o.pointer("/status/listeners/0/attachedRoutes") == Some(&json!(3))
        },
    )
    .await;
    assert_eq!(
        gw(&web, "Accepted").map(|c| c.1),
        Some("Accepted".to_owned())
    );
    let generation = web.pointer("/metadata/generation").cloned();
    assert_eq!(
        web.pointer("/status/conditions/0/observedGeneration")
            .cloned(),
        generation
    );
    assert!(
        web.pointer("/status/addresses")
            .is_none_or(|a| a.as_array().is_some_and(|a| a.is_empty())),
        "no address while nothing serves: {web}"
    );
    // A ready gateway instance (a pod labelled with the Gateway's name, behind a Service):
    // Programmed, with the Service's address; gone again when the pod is not ready.
    let mut gw_pod = pod(
        "rj",
        "web-gateway-7f9c",
        "node-1",
        "10.244.9.9",
        json!({"gateway.networking.k8s.io/gateway-name": "web", "app": "web-gateway"}),
    );
    gw_pod["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
    apply(&client, &gw_pod).await;
    let gw_svc = apply(
        &client,
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": meta("web-gateway"),
            "spec": {"selector": {"app": "web-gateway"}, "ports": [{"port": 80, "protocol": "TCP"}]}}),
    )
    .await;
    let cluster_ip = gw_svc.data["spec"]["clusterIP"]
        .as_str()
        .expect("clusterIP allocated")
        .to_owned();
    let served = wait_object(
        &client,
        &gw_good,
        long,
        "Gateway Programmed once an instance is ready",
        |o| {
            gw(o, "Programmed").is_some_and(|c| c.0 == "True")
                && o.pointer("/status/listeners/0/conditions")
                    .and_then(|c| c.as_array())
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c["type"] == "Programmed" && c["status"] == "True")
                    })
        },
    )
    .await;
    assert_eq!(
        served.pointer("/status/addresses"),
        Some(&json!([{"type": "IPAddress", "value": cluster_ip}])),
        "{served}"
    );
    assert!(
        gw(&served, "Programmed").is_some_and(|c| c.2.contains("web-gateway-7f9c")),
        "{served}"
    );
    // The route attached to it is Programmed too (as seed 000's output shows on routes).
    let route_parent =
        |obj: &serde_json::Value, t: &str| condition(obj, "/status/parents/0/conditions", t);
    wait_object(
        &client,
        &route_good,
        long,
        "route Programmed while a gateway instance serves it",
        |o| route_parent(o, "Programmed").is_some_and(|c| c.0 == "True" && c.1 == "Programmed"),
    )
    .await;
    gw_pod["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
    apply(&client, &gw_pod).await;
    wait_object(
        &client,
        &route_good,
        long,
        "route not Programmed once the instance is not ready",
        |o| route_parent(o, "Programmed").is_some_and(|c| c.0 == "False" && c.1 == "Pending"),
    )
    .await;
    wait_object(
        &client,
        &gw_good,
        long,
        "not Programmed once the instance is not ready",
        |o| {
            gw(o, "Programmed").is_some_and(|c| c.0 == "False" && c.1 == "Pending")
                && o.pointer("/status/addresses")
                    .is_none_or(|a| a.as_array().is_some_and(|a| a.is_empty()))
        },
    )
    .await;
    let by_ip = wait_object(&client, &gw_bad, long, "Gateway rejected", |o| {
        gw(o, "Accepted").is_some()
    })
    .await;
    let (status, reason, message) = gw(&by_ip, "Accepted").expect("Accepted");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Invalid"));
    assert!(message.contains("spec.listeners[1].hostname"), "{message}");

    let parent =
        |obj: &serde_json::Value, t: &str| condition(obj, "/status/parents/0/conditions", t);
    let ok = wait_object(&client, &route_good, long, "route accepted", |o| {
        parent(o, "Accepted").is_some()
    })
    .await;
    assert_eq!(
        ok.pointer("/status/parents/0/controllerName"),
        Some(&json!("sluice.dev/gateway-controller"))
    );
    assert_eq!(
        parent(&ok, "Accepted").map(|c| c.0),
        Some("True".to_owned())
    );
    assert_eq!(
        parent(&ok, "ResolvedRefs").map(|c| c.1),
        Some("ResolvedRefs".to_owned())
    );
    let rel = wait_object(&client, &route_bad, long, "route rejected", |o| {
        parent(o, "Accepted").is_some()
    })
    .await;
    let (status, reason, message) = parent(&rel, "Accepted").expect("Accepted");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "UnsupportedValue")
    );
    assert!(message.contains("path.value"), "{message}");
    let dangling = wait_object(&client, &route_missing, long, "dangling route", |o| {
        parent(o, "ResolvedRefs").is_some()
    })
    .await;
    assert_eq!(
        parent(&dangling, "ResolvedRefs").map(|c| c.1),
        Some("BackendNotFound".to_owned())
    );
    let cross = wait_object(&client, &route_cross, long, "cross-namespace route", |o| {
        parent(o, "ResolvedRefs").is_some()
    })
    .await;
    let (status, reason, message) = parent(&cross, "ResolvedRefs").expect("ResolvedRefs");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "RefNotPermitted"),
        "{message}"
    );
    assert!(message.contains("rj-other/shared"), "{message}");
    let grant = json!({"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": {"name": "routes-from-rj", "namespace": "rj-other"},
        "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "rj"}],
                 "to": [{"group": "", "kind": "Service"}]}});
    apply(&client, &grant).await;
    wait_object(
        &client,
        &route_cross,
        long,
        "cross-namespace route resolved once granted",
        |o| parent(o, "ResolvedRefs").is_some_and(|c| c.0 == "True" && c.1 == "ResolvedRefs"),
    )
    .await;

    // Another controller's Gateway is left alone; the writer holds the Lease.
    let other = wait_object(&client, &gw_other, long, "other gateway", |o| {
        o.get("metadata").is_some()
    })
    .await;
    assert!(
        gw(&other, "Accepted").is_none(),
        "wrote status on another class's Gateway: {other}"
    );
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "sluice-status-writer", "namespace": "sluice-system"}});
    wait_object(&client, &lease, long, "lease held", |o| {
        o.pointer("/spec/holderIdentity") == Some(&json!("node-1"))
    })
    .await;

    // Fixing a resource flips its condition.
    let fixed = json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": meta("sometimes"),
        "spec": {"selector": {"matchLabels": {"app": "x"}}, "mtls": {"mode": "PERMISSIVE"}}});
    apply(&client, &fixed).await;
    wait_object(
        &client,
        &pa_bad,
        long,
        "fixed PeerAuthentication accepted",
        |o| istio(o).is_some_and(|c| c.0 == "True"),
    )
    .await;

    // Breaking a valid resource keeps its last valid version in force (a typo must not drop
    // STRICT), while the condition reports what is wrong with the new one.
    let pa_broken = json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": meta("strict"),
        "spec": {"mtls": {"mode": "STRCT"}}});
    apply(&client, &pa_broken).await;
    let broken = wait_object(
        &client,
        &pa_good,
        long,
        "broken PeerAuthentication rejected",
        |o| istio(o).is_some_and(|c| c.0 == "False"),
    )
    .await;
    let (_, _, message) = istio(&broken).expect("condition");
    assert!(
        message.contains("spec.mtls.mode") && message.contains("last valid version"),
        "{message}"
    );
    let (s, _) = sluice_tests::kube_mesh::wait_for(&mut state, WAIT, "STRICT kept", |s| {
        mentions(s, "rj", "strict")
    })
    .await;
    let kept = s
        .policy
        .peer_authentications
        .iter()
        .find(|p| p.namespace == "rj" && p.name == "strict")
        .expect("rj/strict in the state");
    assert_eq!(kept.mode, Some(sluice::policy::MtlsMode::Strict));
    drop(running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_status_writer_is_elected_once_and_fails_over() {
    let server = KubeServer::start();
    let client = server.client().await;
    install_crds(&client).await;
    apply(&client, &ns("sluice-system", json!({}))).await;
    apply(&client, &ns("el", json!({}))).await;
    let (first, _s1) = start_running(&client, "node-1", MeshSettings::default()).await;
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "sluice-status-writer", "namespace": "sluice-system"}});
    let held = wait_object(&client, &lease, WAIT, "node-1 holds the lease", |o| {
        o.pointer("/spec/holderIdentity") == Some(&json!("node-1"))
    })
    .await;
    let (second, _s2) = start_running(&client, "node-2", MeshSettings::default()).await;
    // While node-1 renews, node-2 does not take over.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let still = wait_object(&client, &lease, WAIT, "lease", |o| o.get("spec").is_some()).await;
    assert_eq!(
        still.pointer("/spec/holderIdentity"),
        Some(&json!("node-1"))
    );
    assert_eq!(
        still.pointer("/spec/leaseTransitions"),
        held.pointer("/spec/leaseTransitions")
    );
    // node-1 goes away: node-2 takes over after the lease duration and writes status.
    drop(first);
    let t = Instant::now();
    wait_object(
        &client,
        &lease,
        Duration::from_secs(40),
        "node-2 takes over",
        |o| o.pointer("/spec/holderIdentity") == Some(&json!("node-2")),
    )
    .await;
    eprintln!("status writer failover took {:?}", t.elapsed());
    let pa = json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "p", "namespace": "el"},
        "spec": {"mtls": {"mode": "STRICT"}}});
    apply(&client, &pa).await;
    wait_object(&client, &pa, WAIT, "status from the new writer", |o| {
        condition(o, "/status/conditions", "SluiceAccepted").is_some()
    })
    .await;
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_missing_crds_do_not_block_the_other_kinds() {
    let server = KubeServer::start();
    let client = server.client().await;
    apply(
        &client,
        &ns("nocrd", json!({"istio.io/dataplane-mode": "ambient"})),
    )
    .await;
    apply(&client, &pod("nocrd", "p", "node-a", "10.3.0.5", json!({}))).await;
    // No CRDs at all: the source still syncs, with the core kinds.
    let mut mesh = Mesh::start(&client, MeshSettings::default()).await;
    let absent = mesh.source.rebuilt().borrow().absent.clone();
    assert!(
        absent.contains(&"PeerAuthentication.security.istio.io".to_owned()),
        "{absent:?}"
    );
    assert!(!absent.contains(&"Pod".to_owned()), "{absent:?}");
    mesh.wait_for(WAIT, "core kinds without CRDs", |s| {
        s.workload_by_name("nocrd", "p")
            .is_some_and(|w| w.membership.in_mesh())
    })
    .await;
    // The CRDs arrive later: their kinds are picked up without a restart.
    install_crds(&client).await;
    let pa = json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "late", "namespace": "nocrd"},
        "spec": {"mtls": {"mode": "STRICT"}}});
    apply(&client, &pa).await;
    let (_, took) = mesh
        .wait_for(
            Duration::from_secs(60),
            "a custom resource after its CRD was installed",
            |s| mentions(s, "nocrd", "late"),
        )
        .await;
    eprintln!("custom resource seen {took:?} after its CRD was installed");
    // Core kinds kept flowing meanwhile.
    apply(&client, &ns("nocrd", json!({}))).await;
    mesh.wait_for(WAIT, "relabel", |s| {
        s.workload_by_name("nocrd", "p")
            .is_some_and(|w| !w.membership.in_mesh())
    })
    .await;
}

/// Records every snapshot published from now on.
fn record(
    mut state: sluice::state::StateHandle,
) -> tokio::task::JoinHandle<Vec<sluice::state::Snapshot>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(s) = state.changed().await {
            seen.push(s);
        }
        seen
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_apiserver_outage_serves_the_last_state_and_catches_up() {
    let server = KubeServer::start();
    let client = server.client().await;
    install_crds(&client).await;
    apply(
        &client,
        &ns("out", json!({"istio.io/dataplane-mode": "ambient"})),
    )
    .await;
    apply(&client, &pod("out", "p", "node-a", "10.4.0.5", json!({}))).await;
    let se = |name: &str| {
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": name, "namespace": "out"},
        "spec": {"hosts": [format!("{name}.example.com")], "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}], "resolution": "DNS"}})
    };
    apply(&client, &se("before")).await;
    let mut mesh = Mesh::start(&client, MeshSettings::default()).await;
    let (good, _) = mesh
        .wait_for(WAIT, "baseline", |s| {
            mentions(s, "out", "before") && s.workload_by_name("out", "p").is_some()
        })
        .await;
    let recorder = record(mesh.state.clone());

    // 30 s without an API server: the last good state stays, unchanged.
    tokio::task::block_in_place(|| server.stop_apiserver());
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(30) {
        assert_eq!(
            *mesh.state.current(),
            *good,
            "state changed while the API server was down"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::task::block_in_place(|| server.start_apiserver());
    let up = Instant::now();

    // Changes made right after the restart, before the watches have resumed.
    apply(&client, &se("after")).await;
    apply(&client, &ns("out", json!({}))).await;
    delete(&client, &se("before")).await;
    let (_, _) = mesh
        .wait_for(Duration::from_secs(90), "catch-up after the restart", |s| {
            mentions(s, "out", "after")
                && !mentions(s, "out", "before")
                && s.workload_by_name("out", "p")
                    .is_some_and(|w| !w.membership.in_mesh())
        })
        .await;
    eprintln!(
        "caught up {:?} after the API server was back (outage 30 s)",
        up.elapsed()
    );

    // Nothing published in between lost the workload (a relist never published a partial state).
    drop(mesh);
    let seen = recorder.await.expect("recorder");
    for s in &seen {
        assert!(
            s.workload_by_name("out", "p").is_some(),
            "a published state lost the pod"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_seed_documents_apply_unchanged_and_show_up_in_mesh_state() {
    let server = KubeServer::start();
    let client = server.client().await;
    install_crds(&client).await;
    let settings = MeshSettings {
        mesh_config: Some((
            "aks-istio-system".into(),
            "istio-shared-configmap-asm-1-24".into(),
        )),
        ..MeshSettings::default()
    };
    let mut mesh = Mesh::start(&client, settings).await;
    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let mut files: Vec<_> = std::fs::read_dir(&seeds)
        .expect("tests/seeds")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    files.sort();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("seed file");
        sluice_tests::kube_mesh::apply_yaml(&client, &text).await;
    }
    let (s, _) = mesh
        .wait_for(WAIT, "the seed scenarios in MeshState", |s| {
            json_at(s, "/egress/policy/mesh_mode") == "REGISTRY_ONLY"
                && mentions(s, "foo", "default")
                && mentions(s, "aks-istio-egress", "httpbin-ext")
                && mentions(s, "aks-istio-egress", "asm-egress-test")
                && mentions(
                    s,
                    "aks-istio-egress",
                    "direct-httpbin-through-egress-gateway",
                )
                && mentions(s, "aks-istio-egress", "egressgateway-for-httpbin")
                && s.ingress.routes.contains_key("web/store")
        })
        .await;
    let pa = s
        .policy
        .peer_authentications
        .iter()
        .find(|p| p.namespace == "foo")
        .expect("seed 001 PeerAuthentication");
    assert_eq!(pa.mode, Some(sluice::state::policy::MtlsMode::Strict));
    assert!(s.namespaces["foo"].labels.contains_key("istio-injection"));
    let route = &s.ingress.routes["web/store"];
    let weights: Vec<(String, u32)> = route.rules[0]
        .backends
        .iter()
        .map(|b| (b.service.clone(), b.weight))
        .collect();
    assert_eq!(
        weights,
        vec![("web/store-v1".into(), 90), ("web/store-v2".into(), 10)]
    );
    assert_eq!(s.ingress.gateways["web/ingress"].listeners[0].port, 80);
    assert_eq!(
        json_at(&s, "/egress/policy/mesh_config"),
        "aks-istio-system/istio-shared-configmap-asm-1-24"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_deploy_manifests_apply_and_their_rbac_suffices() {
    let server = KubeServer::start();
    let client = server.client().await;
    // The DaemonSet rolls without surge here: the 1.20 API server predates DaemonSet maxSurge.
    let deploy_copy = sluice_tests::kube_mesh::deploy_dir_for_1_20();
    let deploy = deploy_copy.path().to_path_buf();
    install_crds(&client).await;
    // Everything in deploy/ by server-side apply; the DaemonSet as a dry run.
    let mut files: Vec<_> = std::fs::read_dir(&deploy)
        .expect("deploy/")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort_by_key(|p| !p.ends_with("00-namespace.yaml"));
    let mut applied = 0;
    for file in &files {
        for doc in sluice_tests::kube_mesh::documents(&std::fs::read_to_string(file).expect("read"))
        {
            let dry = doc["kind"] == "DaemonSet";
            sluice_tests::kube_mesh::try_apply(&client, &doc, dry)
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "{}: {} {}: {e}",
                        file.display(),
                        doc["kind"],
                        doc["metadata"]["name"]
                    )
                });
            applied += 1;
        }
    }
    eprintln!("applied {applied} documents from deploy/ (DaemonSet as a dry run)");
    assert!(applied >= 8, "only {applied} documents");

    // The agent's own identity can do everything it needs: list and watch every kind (no kind is
    // reported absent), hold the Lease, and write status.
    apply(&client, &ns("rbac", json!({}))).await;
    let pa = json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "p", "namespace": "rbac"},
        "spec": {"mtls": {"mode": "NEITHER"}}});
    apply(&client, &pa).await;
    let as_agent =
        sluice_tests::kube_mesh::client_as_service_account(&server, "sluice-system", "sluice")
            .await;
    let (running, _state) = start_running(&as_agent, "node-1", MeshSettings::default()).await;
    let absent = running.source.rebuilt().borrow().absent.clone();
    // EndpointSlice v1 is absent for anyone on an API server that does not serve it (1.20
    // serves only v1beta1); RBAC is not versioned, so any other absence is the agent's RBAC.
    let v1_slices_served = client
        .list_api_group_resources("discovery.k8s.io/v1")
        .await
        .is_ok();
    assert!(
        absent
            .iter()
            .all(|k| !v1_slices_served && k == "EndpointSlice.discovery.k8s.io"),
        "the ServiceAccount could not list {absent:?}"
    );
    wait_object(
        &client,
        &pa,
        Duration::from_secs(45),
        "status written with the agent's RBAC",
        |o| condition(o, "/status/conditions", "SluiceAccepted").is_some_and(|c| c.0 == "False"),
    )
    .await;
    // And nothing more: it may not, for example, delete pods or read secrets.
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(as_agent.clone(), "rbac");
    assert!(
        pods.delete("x", &Default::default())
            .await
            .is_err_and(|e| matches!(e, kube::Error::Api(ref s) if s.code == 403))
    );
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::all(as_agent.clone());
    assert!(
        secrets
            .list(&Default::default())
            .await
            .is_err_and(|e| matches!(e, kube::Error::Api(ref s) if s.code == 403))
    );
    drop(running);
}

/// The real agent (`sluice run` with `spec.kube.enabled`) in a node namespace: it reads the
/// cluster through its kubeconfig, discovers the sandboxes of its node's pods, and enrolls exactly
/// those in the mesh as namespace and pod labels change. The cluster has none of the CRDs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_namespace_relabel_enrolls_and_unenrolls_pods_through_the_agent() {
    use sluice::redirect::enroll::Request;
    use sluice_tests::world::{PodSpec, World};

    let server = KubeServer::start();
    let client = server.client().await;
    let mut w = World::build(
        1,
        &[
            PodSpec::new("a", "enr", 1),
            PodSpec::new("b", "enr", 1),
            PodSpec::new("c", "other", 1),
        ],
    );
    let port: u16 = server
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let _bridge = sluice_tests::kube_mesh::bridge_into_netns(&w.node_netns(1), port).await;

    apply(&client, &ns("enr", json!({}))).await;
    apply(&client, &ns("other", json!({}))).await;
    for p in w.pods.clone() {
        let mut doc = pod(
            &p.namespace,
            &p.name,
            "node1",
            &p.ipv4.to_string(),
            json!({}),
        );
        doc["status"]["podIPs"] = json!([{"ip": p.ipv4.to_string()}, {"ip": p.ipv6.to_string()}]);
        apply(&client, &doc).await;
    }

    let dir = w.dir.path().join("node1");
    std::fs::create_dir_all(&dir).expect("node dir");
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: AgentConfig\nspec:\n  nodeName: node1\n  cgroupRoot: {}\n  bpfPinPath: {}\n  stateDir: {}\n  enrollmentSocket: {}\n  identity: {{rootCertFile: {}, rootKeyFile: {}}}\n  kube: {{enabled: true, kubeconfig: {}, writeStatus: false}}\n",
            w.node_cgroup(1).display(),
            w.pin_dir(1).display(),
            dir.join("state").display(),
            dir.join("enroll.sock").display(),
            w.root_cert().display(),
            w.dir.path().join("root-key.pem").display(),
            server.kubeconfig_path().display(),
        ),
    )
    .expect("agent config");
    let node_netns = w.node_netns(1);
    let agent = tokio::task::block_in_place(|| {
        sluice_tests::agent::Agent::start(&node_netns, &config, &dir)
    });
    w.agents.insert(1, agent);

    // The set of (pod name, captured) the agent reports.
    let listed = |w: &World| -> Vec<(String, bool)> {
        let resp = tokio::task::block_in_place(|| w.agents[&1].call(&Request::List));
        assert!(resp.ok, "{resp:?}");
        let mut v: Vec<(String, bool)> = resp
            .sandboxes
            .into_iter()
            .map(|s| (s.pod.name, s.captured))
            .collect();
        v.sort();
        v
    };
    let wait_listed = |w: &World, want: Vec<(&str, bool)>, what: &str| {
        let want: Vec<(String, bool)> = want.into_iter().map(|(n, c)| (n.to_owned(), c)).collect();
        let start = Instant::now();
        loop {
            let have = listed(w);
            if have == want {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{what}: agent lists {have:?}, want {want:?}\n{}",
                w.agents[&1].tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    assert_eq!(listed(&w), vec![], "nothing is in the mesh yet");
    apply(
        &client,
        &ns("enr", json!({"istio.io/dataplane-mode": "ambient"})),
    )
    .await;
    let took = wait_listed(&w, vec![("a", true), ("b", true)], "namespace labelled");
    eprintln!("namespace labelled → both pods captured in {took:?}");

    let mut b = pod(
        "enr",
        "b",
        "node1",
        &w.pod("b").ipv4.to_string(),
        json!({"istio.io/dataplane-mode": "none"}),
    );
    b["status"]["podIPs"] =
        json!([{"ip": w.pod("b").ipv4.to_string()}, {"ip": w.pod("b").ipv6.to_string()}]);
    apply(&client, &b).await;
    wait_listed(&w, vec![("a", true)], "pod b opted out");

    let mut c = pod(
        "other",
        "c",
        "node1",
        &w.pod("c").ipv4.to_string(),
        json!({"istio.io/dataplane-mode": "ambient"}),
    );
    c["status"]["podIPs"] =
        json!([{"ip": w.pod("c").ipv4.to_string()}, {"ip": w.pod("c").ipv6.to_string()}]);
    apply(&client, &c).await;
    wait_listed(&w, vec![("a", true), ("c", true)], "pod c opted in");

    apply(&client, &ns("enr", json!({}))).await;
    let took = wait_listed(&w, vec![("c", true)], "namespace unlabelled");
    eprintln!("namespace unlabelled → pod released in {took:?}");
    let log = w.agents[&1].log_lines();
    assert!(
        log.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("discovered the sandbox"))),
        "no discovery log line"
    );
}

/// A self-signed certificate for `host`, as PEM (chain, key).
fn tls_pem(host: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![host.to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    (cert.pem(), key.serialize_pem())
}

fn tls_secret(name: &str, pem: &(String, String)) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": "gw-certs"},
        "stringData": {"tls.crt": pem.0, "tls.key": pem.1}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_gateway_reads_listener_certificates_from_tls_secrets() {
    use sluice::gateway::certificates::{CertificateError, CertificateSource};
    let server = KubeServer::start();
    let client = server.client().await;
    apply(&client, &ns("gw-certs", json!({}))).await;
    let first = tls_pem("web.example.com");
    apply(&client, &tls_secret("web", &first)).await;
    let source = CertificateSource::new(Default::default(), Some(client.clone()));

    let loaded = source.load("gw-certs/web").await.expect("the Secret loads");
    assert_eq!(loaded.key.cert.len(), 1);
    assert_eq!(
        loaded.key.cert[0].as_ref(),
        <rustls_pki_types::CertificateDer as rustls_pki_types::pem::PemObject>::from_pem_slice(
            first.0.as_bytes()
        )
        .expect("pem")
        .as_ref(),
        "the certificate served is the Secret's"
    );

    // A rotation (cert-manager renewing the Secret) shows as another fingerprint.
    apply(&client, &tls_secret("web", &tls_pem("web.example.com"))).await;
    let rotated = source.load("gw-certs/web").await.expect("loads again");
    assert_ne!(rotated.fingerprint, loaded.fingerprint);

    // A missing Secret and one without a key are errors naming the Secret.
    let missing = source.load("gw-certs/absent").await.expect_err("missing");
    assert!(
        matches!(missing, CertificateError::Api { .. })
            && missing.to_string().contains("gw-certs/absent"),
        "{missing}"
    );
    apply(&client, &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "opaque", "namespace": "gw-certs"},
        "data": {"tls.crt": "AA=="}})).await;
    let keyless = source.load("gw-certs/opaque").await.expect_err("no key");
    assert_eq!(
        keyless.to_string(),
        "Secret gw-certs/opaque: has no data.tls.key (a kubernetes.io/tls Secret)"
    );
}

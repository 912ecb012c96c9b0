//! End-to-end: `sluice gateway` (the ingress data plane) in a pod of its own, serving the
//! Gateways of its classes. Clients outside the mesh send HTTP to the gateway's address; it
//! routes each request by HTTPRoute and hands it to the backend's endpoints over HBONE with its
//! own SPIFFE identity (the backends' namespace is STRICT, so nothing else gets in). The world
//! is `sluice_tests::ingress_world`.
use std::{
    collections::BTreeMap,
    process::Stdio,
    time::{Duration, Instant},
};

use sluice_tests::{
    ingress_world::{GATEWAY_ID, Ingress, count_backends, hbone_from_gateway},
    metrics,
};

/// Seed 000's Gateway and HTTPRoute (Application Gateway for Containers with Istio), as its
/// documentation writes them: class `azure-alb-external`, a 50/50 split.
const SEED_000: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: gateway-01
  namespace: test-infra
  annotations:
    alb.networking.azure.io/alb-namespace: alb-test-infra
    alb.networking.azure.io/alb-name: alb-test
spec:
  gatewayClassName: azure-alb-external
  listeners:
  - name: http
    port: 80
    protocol: HTTP
    allowedRoutes:
      namespaces:
        from: Same
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: traffic-split-route
  namespace: test-infra
spec:
  parentRefs:
  - name: gateway-01
  rules:
  - backendRefs:
    - name: backend-v1
      port: 8080
      weight: 50
    - name: backend-v2
      port: 8080
      weight: 50
"#;

#[test]
fn ingress_seed_000_reaches_the_strict_backend_over_hbone_with_the_gateway_identity() {
    let ing = Ingress::start(SEED_000, "");
    let mut seen = BTreeMap::new();
    for _ in 0..20 {
        let (status, body, _) = ing.get("/hello", &[]);
        assert_eq!(status, 200, "{body}");
        *seen
            .entry(body["backend"].as_str().unwrap_or("?").to_owned())
            .or_insert(0) += 1;
        // The backend got it from its own node's proxy (the HBONE hop ended there).
        assert_eq!(body["path"], "/hello");
        assert!(
            body["headers"]["x-forwarded-for"]
                .as_str()
                .is_some_and(|x| x.ends_with(&ing.w.pod("client").ipv4.to_string())),
            "{body}"
        );
        assert_eq!(body["headers"]["x-forwarded-proto"], "http");
        assert!(
            body["headers"]["x-request-id"]
                .as_str()
                .is_some_and(|i| i.len() == 36)
        );
        assert!(
            body["headers"]["traceparent"]
                .as_str()
                .is_some_and(|t| t.starts_with("00-"))
        );
    }
    assert!(
        seen.contains_key("backend-v1") && seen.contains_key("backend-v2"),
        "{seen:?}"
    );
    // The backends' node accepted HBONE from the gateway's identity (the gateway keeps its
    // connections pooled, so the node's metrics say it, not yet its access log).
    assert!(
        hbone_from_gateway(&ing) >= 1.0,
        "node 2 saw no HBONE from {GATEWAY_ID}"
    );
    // A client outside the mesh cannot skip the gateway: STRICT refuses its plaintext.
    let direct = ing.try_curl(&[
        "-sS",
        "--max-time",
        "5",
        &format!("http://{}:3000/direct", ing.w.pod("backend-v1").ipv4),
    ]);
    assert!(
        !direct.0,
        "plaintext reached a STRICT backend: {}",
        direct.1
    );
    // One access-log line per request, and Istio's request metrics.
    let lines = ing.gateway().access_log();
    let ok = lines
        .iter()
        .filter(|l| l["direction"] == "ingress" && l["response_code"] == 200)
        .count();
    assert_eq!(ok, 20, "{lines:?}");
    assert!(lines.iter().all(|l| {
        l["upstream_identity"]
            .as_str()
            .is_some_and(|i| i.contains("/ns/test-infra/sa/backend-v"))
    }));
    let text = ing.gateway_metrics();
    let v1 = metrics::sample(
        &text,
        "istio_requests_total",
        &[
            ("response_code", "200"),
            (
                "destination_service",
                "backend-v1.test-infra.svc.cluster.local",
            ),
            ("connection_security_policy", "mutual_tls"),
            ("source_principal", GATEWAY_ID),
        ],
    );
    let v2 = metrics::sample(
        &text,
        "istio_requests_total",
        &[
            ("response_code", "200"),
            (
                "destination_service",
                "backend-v2.test-infra.svc.cluster.local",
            ),
        ],
    );
    assert_eq!(v1 + v2, 20.0, "{text}");
    assert_eq!(v1 as usize, seen["backend-v1"]);
    assert_eq!(
        metrics::sample(
            &text,
            "istio_request_duration_milliseconds_count",
            &[("response_code", "200")]
        ),
        20.0
    );
}

#[test]
fn ingress_traffic_split_80_20_lands_within_5_percent() {
    let route = SEED_000.replace(
        "weight: 50\n    - name: backend-v2\n      port: 8080\n      weight: 50",
        "weight: 80\n    - name: backend-v2\n      port: 8080\n      weight: 20",
    );
    assert_ne!(route, SEED_000);
    let ing = Ingress::start(&route, "");
    let url = format!("http://{}/split", ing.gw_ip());
    // 1,000 requests on keep-alive connections, in 4 curl runs of 250.
    let mut counts = BTreeMap::new();
    for _ in 0..4 {
        let mut args = vec!["-sS", "--max-time", "60"];
        for _ in 0..250 {
            args.push(&url);
        }
        let (out, _) = ing.curl(&args);
        for (k, v) in count_backends(&out) {
            *counts.entry(k).or_insert(0) += v;
        }
    }
    assert_eq!(counts.values().sum::<usize>(), 1000, "{counts:?}");
    let v1 = counts.get("backend-v1").copied().unwrap_or(0);
    assert!(
        (750..=850).contains(&v1),
        "80/20 split off by more than 5 %: {counts:?}"
    );
}

/// Routes exercising every match and filter.
const MATCHES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: web, namespace: test-infra}
spec:
  gatewayClassName: sluice
  listeners:
  - {name: http, port: 80, protocol: HTTP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: matches, namespace: test-infra}
spec:
  parentRefs: [{name: web}]
  hostnames: [shop.example.com]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: backend-v1, port: 8080}]
  - matches: [{path: {type: Exact, value: /v2}}]
    backendRefs: [{name: backend-v2, port: 8080}]
  - matches: [{path: {type: RegularExpression, value: "/items/[0-9]+"}}]
    backendRefs: [{name: backend-v2, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: X-Canary, value: "true"}]}]
    backendRefs: [{name: backend-v2, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /api}, queryParams: [{name: version, value: "2"}]}]
    backendRefs: [{name: backend-v2, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /api}, method: DELETE}]
    backendRefs: [{name: backend-v2, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: new.example.com, statusCode: 301}
  - matches: [{path: {type: PathPrefix, value: /legacy}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: internal.example.com, path: {type: ReplacePrefixMatch, replacePrefixMatch: /modern}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: X-Env, value: prod}], add: [{name: X-Added, value: "1"}], remove: [X-Secret]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: X-Served-By, value: sluice}], remove: [X-Backend]}
    backendRefs: [{name: backend-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /empty}}]
    backendRefs: [{name: nobody, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /deaf}}]
    backendRefs: [{name: deaf, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /elsewhere}}]
    backendRefs: [{name: web, namespace: other, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /delay}}]
    timeouts: {request: 500ms}
    backendRefs: [{name: backend-v1, port: 8080}]
"#;

#[test]
fn ingress_matches_filters_and_errors_follow_the_gateway_api() {
    let ing = Ingress::start(MATCHES, "");
    let host = "Host: shop.example.com";
    let backend = |path: &str, headers: &[&str]| {
        let mut h = vec![host];
        h.extend_from_slice(headers);
        let (status, body, head) = ing.get(path, &h);
        assert_eq!(status, 200, "{path} {headers:?}: {head}");
        body["backend"].as_str().unwrap_or("?").to_owned()
    };
    assert_eq!(backend("/", &[]), "backend-v1");
    assert_eq!(backend("/v2", &[]), "backend-v2");
    assert_eq!(
        backend("/v2/x", &[]),
        "backend-v1",
        "Exact does not match below it"
    );
    assert_eq!(backend("/items/42", &[]), "backend-v2");
    assert_eq!(backend("/items/4x", &[]), "backend-v1");
    assert_eq!(backend("/api/a", &["X-Canary: true"]), "backend-v2");
    assert_eq!(backend("/api/a", &["X-Canary: false"]), "backend-v1");
    assert_eq!(backend("/api/a?version=2", &[]), "backend-v2");
    assert_eq!(backend("/api/a?version=3", &[]), "backend-v1");
    // Method.
    let (out, _) = ing.curl(&[
        "-sS",
        "-X",
        "DELETE",
        "-H",
        host,
        &format!("http://{}/api/a", ing.gw_ip()),
    ]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(out.trim()).expect("json")["backend"],
        "backend-v2"
    );
    // Another host has no route.
    let (status, _, _) = ing.get("/", &["Host: other.example.com"]);
    assert_eq!(status, 404);
    // Redirect.
    let (status, _, head) = ing.get("/old/page?q=1", &[host]);
    assert_eq!(status, 301, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("location: https://new.example.com/old/page?q=1"),
        "{head}"
    );
    // Rewrite and header modifiers.
    let (status, body, head) = ing.get("/legacy/x?y=1", &[host, "X-Secret: s3cret", "X-Env: dev"]);
    assert_eq!(status, 200, "{head}");
    assert_eq!(body["path"], "/modern/x?y=1", "{body}");
    assert_eq!(body["host"], "internal.example.com");
    assert_eq!(body["headers"]["x-env"], "prod");
    assert_eq!(body["headers"]["x-added"], "1");
    assert!(body["headers"].get("x-secret").is_none(), "{body}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("x-served-by: sluice"), "{head}");
    assert!(!lower.contains("x-backend:"), "{head}");
    // Errors, as the spec and the issue ask: no endpoint 503, upstream failure 502, invalid
    // backend 500, a request timeout 504.
    assert_eq!(ing.get("/empty", &[host]).0, 503);
    assert_eq!(ing.get("/deaf", &[host]).0, 502);
    assert_eq!(ing.get("/elsewhere", &[host]).0, 500);
    let started = Instant::now();
    assert_eq!(ing.get("/delay/3000", &[host]).0, 504);
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    // HTTP/2 from the client (prior knowledge, cleartext).
    let (out, _) = ing.curl(&[
        "-sS",
        "--http2-prior-knowledge",
        "-H",
        host,
        "-w",
        "\n%{http_version}",
        &format!("http://{}/v2", ing.gw_ip()),
    ]);
    let (body, version) = out.trim_end().rsplit_once('\n').expect("version line");
    assert_eq!(version, "2");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(body).expect("json")["backend"],
        "backend-v2"
    );
}

#[test]
fn ingress_https_listener_picks_the_certificate_by_sni() {
    // A CA and two server certificates, as a user's Secrets would hold them.
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ingress test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).expect("ca.pem");
    let mut files = String::new();
    for (secret, host) in [
        ("shop-cert", "shop.example.com"),
        ("api-cert", "api.example.com"),
    ] {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![host.to_owned()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("sign");
        let (c, k) = (
            dir.path().join(format!("{secret}.crt")),
            dir.path().join(format!("{secret}.key")),
        );
        std::fs::write(&c, cert.pem()).expect("crt");
        std::fs::write(&k, key.serialize_pem()).expect("key");
        files.push_str(&format!(
            "      test-infra/{secret}: {{certFile: {}, keyFile: {}}}\n",
            c.display(),
            k.display()
        ));
    }
    let gateway = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: tls, namespace: test-infra}
spec:
  gatewayClassName: sluice
  listeners:
  - {name: shop, port: 443, protocol: HTTPS, hostname: shop.example.com, tls: {certificateRefs: [{name: shop-cert}]}}
  - {name: api, port: 443, protocol: HTTPS, hostname: api.example.com, tls: {certificateRefs: [{name: api-cert}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop, namespace: test-infra}
spec:
  parentRefs: [{name: tls, sectionName: shop}]
  rules: [{backendRefs: [{name: backend-v1, port: 8080}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: test-infra}
spec:
  parentRefs: [{name: tls, sectionName: api}]
  rules: [{backendRefs: [{name: backend-v2, port: 8080}]}]
"#;
    let ing = Ingress::start(gateway, &format!("    certificates:\n{files}"));
    let ca = dir.path().join("ca.pem");
    for (host, backend, http) in [
        ("shop.example.com", "backend-v1", "--http1.1"),
        ("api.example.com", "backend-v2", "--http2"),
    ] {
        let resolve = format!("{host}:443:{}", ing.gw_ip());
        let url = format!("https://{host}/");
        // curl verifies the certificate against the CA and the host name: the wrong
        // certificate fails the request.
        let (out, _) = ing.curl(&[
            "-sS",
            "--max-time",
            "10",
            http,
            "--cacert",
            ca.to_str().expect("utf-8"),
            "--resolve",
            &resolve,
            "-w",
            "\n%{http_version}",
            &url,
        ]);
        let (body, version) = out.trim_end().rsplit_once('\n').expect("version line");
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["backend"], backend, "{host}");
        assert_eq!(v["headers"]["x-forwarded-proto"], "https");
        assert_eq!(
            version,
            if http == "--http2" { "2" } else { "1.1" },
            "{host}"
        );
    }
}

#[test]
fn ingress_client_address_behind_two_trusted_proxies() {
    let ing = Ingress::start(SEED_000, "    numTrustedProxies: 2");
    // client 192.0.2.7 → proxy 10.9.9.1 → proxy (the client pod) → gateway; the leftmost
    // entry is forged by the client and must not be taken.
    let (status, body, _) = ing.get(
        "/",
        &[
            "X-Forwarded-For: 198.51.100.1, 192.0.2.7, 10.9.9.1",
            "X-Forwarded-Proto: https",
        ],
    );
    assert_eq!(status, 200);
    let client_pod = ing.w.pod("client").ipv4.to_string();
    assert_eq!(
        body["headers"]["x-forwarded-for"],
        format!("198.51.100.1, 192.0.2.7, 10.9.9.1, {client_pod}")
    );
    assert_eq!(
        body["headers"]["x-forwarded-proto"], "https",
        "a trusted proxy's scheme stands"
    );
    let line = ing
        .gateway()
        .access_log()
        .into_iter()
        .find(|l| l["direction"] == "ingress")
        .expect("access line");
    assert_eq!(line["client"], "192.0.2.7", "{line}");
    assert!(
        line["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with(&client_pod)),
        "{line}"
    );
}

/// An AuthorizationPolicy on the gateway's namespace that admits only 192.0.2.0/24 as the
/// remote (client) address.
const ONLY_FROM_OFFICE: &str = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: office-only, namespace: alb-test-infra}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {remoteIpBlocks: [192.0.2.0/24]}
"#;

#[test]
fn ingress_remote_ip_blocks_see_the_client_behind_two_trusted_proxies() {
    let ing = Ingress::start(
        &format!("{SEED_000}{ONLY_FROM_OFFICE}"),
        "    numTrustedProxies: 2",
    );
    // The client behind the two proxies is 192.0.2.7: admitted.
    let (status, _, _) = ing.get("/", &["X-Forwarded-For: 198.51.100.1, 192.0.2.7, 10.9.9.1"]);
    assert_eq!(status, 200);
    // A forged leftmost entry in the block does not help: the client is 198.51.100.1.
    let (status, _, _) = ing.get("/", &["X-Forwarded-For: 192.0.2.7, 198.51.100.1, 10.9.9.1"]);
    assert_eq!(status, 403);
    // Without X-Forwarded-For the client is the peer (the client pod), outside the block.
    let (status, _, _) = ing.get("/", &[]);
    assert_eq!(status, 403);
    let denied: Vec<_> = ing
        .gateway()
        .access_log()
        .into_iter()
        .filter(|l| l["direction"] == "ingress" && l["response_code"] == 403)
        .collect();
    assert_eq!(denied.len(), 2, "{denied:?}");
    assert_eq!(denied[0]["client"], "198.51.100.1", "{}", denied[0]);
    assert!(
        denied[0].to_string().contains("alb-test-infra/office-only"),
        "{}",
        denied[0]
    );
}

#[test]
fn ingress_route_change_with_50_requests_in_flight_drops_none() {
    let mut ing = Ingress::start(SEED_000, "");
    let url = format!("http://{}/delay/1500", ing.gw_ip());
    let children: Vec<_> = (0..50)
        .map(|_| {
            ing.w
                .pod("client")
                .command("curl")
                .args([
                    "-sS",
                    "--max-time",
                    "20",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    &url,
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("curl")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // Every request goes to v2 from now on.
    ing.w.extra_resources = ing.w.extra_resources.replace(
        "weight: 50\n    - name: backend-v2\n      port: 8080\n      weight: 50",
        "weight: 0\n    - name: backend-v2\n      port: 8080\n      weight: 1",
    );
    ing.gateway_config();
    let mut codes = BTreeMap::new();
    for c in children {
        let out = c.wait_with_output().expect("curl output");
        *codes
            .entry(String::from_utf8_lossy(&out.stdout).into_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(codes.get("200"), Some(&50), "{codes:?}");
    // The change applied: only v2 from now on.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (out, _) = ing.curl(&[
            "-sS",
            &format!("http://{}/x", ing.gw_ip()),
            &format!("http://{}/x", ing.gw_ip()),
            &format!("http://{}/x", ing.gw_ip()),
        ]);
        if count_backends(&out).get("backend-v2") == Some(&3) {
            break;
        }
        assert!(Instant::now() < deadline, "the route change never applied");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Seed 001's form: an Istio ingress Gateway (selected by the gateway instance's labels, as the
/// AKS add-on's `istio: aks-istio-ingressgateway-external`) and a VirtualService bound to it.
const SEED_001: &str = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bookinfo-gateway, namespace: test-infra}
spec:
  selector:
    istio: aks-istio-ingressgateway-external
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo, namespace: test-infra}
spec:
  hosts: ["*"]
  gateways: [bookinfo-gateway]
  http:
  - match:
    - uri: {exact: /productpage}
    - uri: {prefix: /static}
    route:
    - destination: {host: backend-v1, port: {number: 8080}}
  - match:
    - uri: {prefix: /api/v1/products}
      headers: {x-tier: {exact: gold}}
    rewrite: {uri: /catalog}
    timeout: 5s
    route:
    - destination: {host: backend-v2.test-infra.svc.cluster.local, port: {number: 8080}}
  - match:
    - uri: {prefix: /api}
    route:
    - destination: {host: backend-v1}
      weight: 80
    - destination: {host: backend-v2}
      weight: 20
"#;

#[test]
fn ingress_istio_gateway_and_virtual_service_in_seed_001_form() {
    let ing = Ingress::start(
        SEED_001,
        "    labels: {istio: aks-istio-ingressgateway-external}",
    );
    let backend = |path: &str, headers: &[&str]| {
        let (status, body, head) = ing.get(path, headers);
        assert_eq!(status, 200, "{path}: {head}");
        (
            body["backend"].as_str().unwrap_or("?").to_owned(),
            body["path"].as_str().unwrap_or("?").to_owned(),
        )
    };
    assert_eq!(backend("/productpage", &[]).0, "backend-v1");
    // Istio's prefix is a character prefix.
    assert_eq!(backend("/staticfiles/a.css", &[]).0, "backend-v1");
    assert_eq!(
        backend("/api/v1/products/7", &["x-tier: gold"]),
        ("backend-v2".to_owned(), "/catalog/7".to_owned())
    );
    assert_eq!(ing.get("/other", &[]).0, 404);
    let url = format!("http://{}/api/x", ing.gw_ip());
    let mut args = vec!["-sS", "--max-time", "60"];
    for _ in 0..200 {
        args.push(&url);
    }
    let (out, _) = ing.curl(&args);
    let counts = count_backends(&out);
    let v1 = counts.get("backend-v1").copied().unwrap_or(0);
    assert_eq!(counts.values().sum::<usize>(), 200, "{counts:?}");
    assert!((140..=180).contains(&v1), "80/20 off: {counts:?}");
    // Over HBONE with the gateway's identity, as for the Gateway API.
    assert!(hbone_from_gateway(&ing) >= 1.0);
}

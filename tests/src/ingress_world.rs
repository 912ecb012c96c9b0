//! The ingress world, shared by `tests/tests/ingress.rs` and `cargo xtask bench ingress`: two
//! nodes, `sluice gateway` in a pod of its own, clients outside the mesh, and HTTP backends in a
//! STRICT mesh namespace.
use std::{collections::BTreeMap, path::PathBuf, process::Stdio};

use crate::{
    agent::Agent,
    metrics,
    world::{PodSpec, World},
};

/// The gateway's identity: namespace `alb-test-infra`, service account `alb-gateway`.
pub const GATEWAY_ID: &str = "spiffe://cluster.local/ns/alb-test-infra/sa/alb-gateway";

/// The backends' namespace is STRICT.
pub const STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: test-infra}
spec:
  mtls: {mode: STRICT}
"#;

/// The Services of seed 000's example deployment.
pub const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: backend-v1, namespace: test-infra}
spec:
  clusterIP: 10.96.50.1
  selector: {app: backend-v1}
  ports: [{port: 8080, targetPort: 3000, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: backend-v2, namespace: test-infra}
spec:
  clusterIP: 10.96.50.2
  selector: {app: backend-v2}
  ports: [{port: 8080, targetPort: 3000, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: nobody, namespace: test-infra}
spec:
  clusterIP: 10.96.50.3
  selector: {app: nobody}
  ports: [{port: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: deaf, namespace: test-infra}
spec:
  clusterIP: 10.96.50.4
  selector: {app: backend-v1}
  ports: [{port: 8080, targetPort: 3999, protocol: TCP}]
"#;

/// A running ingress world: two nodes, the gateway pod `gw` and a client `client` (both
/// outside the mesh) on node 1, `backend-v1` and `backend-v2` (in the STRICT mesh namespace
/// `test-infra`, answering HTTP on 3000) on node 2.
pub struct Ingress {
    pub w: World,
    gateway: Option<Agent>,
    gateway_extra: String,
}

impl Ingress {
    /// The world with `resources` (Gateways, routes) and `gateway_extra` lines added to the
    /// gateway's `spec.ingress`, the gateway started.
    pub fn start(resources: &str, gateway_extra: &str) -> Ingress {
        Self::start_with(resources, gateway_extra, false)
    }

    /// [`Ingress::start`], with `plain`: a pod outside the mesh on node 2 answering HTTP on 3000
    /// too (the benchmark's direct and nginx paths).
    pub fn start_with(resources: &str, gateway_extra: &str, plain: bool) -> Ingress {
        let mut pods = vec![
            PodSpec::new("gw", "alb-test-infra", 1).with_sa("alb-gateway"),
            PodSpec::new("client", "outside", 1),
            PodSpec::new("backend-v1", "test-infra", 2).label("app", "backend-v1"),
            PodSpec::new("backend-v2", "test-infra", 2).label("app", "backend-v2"),
        ];
        if plain {
            pods.push(PodSpec::new("plain", "outside", 2));
        }
        let mut w = World::build(2, &pods);
        w.namespace("test-infra", &[("istio-injection", "enabled")]);
        w.namespace("alb-test-infra", &[]);
        w.namespace("outside", &[]);
        w.extra_resources = format!("{STRICT}\n---\n{SERVICES}\n---\n{resources}");
        w.start_agent(1, "");
        w.start_agent(2, "");
        for p in ["backend-v1", "backend-v2"] {
            assert!(w.enroll(p), "{p} captured");
            w.spawn_http_echo(p, "0.0.0.0:3000", p);
        }
        if plain {
            w.spawn_http_echo("plain", "0.0.0.0:3000", "plain");
        }
        let mut this = Ingress {
            w,
            gateway: None,
            gateway_extra: gateway_extra.to_owned(),
        };
        let config = this.gateway_config();
        let dir = this.w.dir.path().join("gateway");
        this.gateway = Some(Agent::start_gateway(&this.w.pod("gw").netns, &config, &dir));
        this
    }

    /// Writes the gateway's config: an AgentConfig with `spec.ingress`, and the world's
    /// resources (file mode).
    pub fn gateway_config(&self) -> PathBuf {
        let dir = self.w.dir.path().join("gateway");
        std::fs::create_dir_all(&dir).expect("gateway dir");
        let path = dir.join("config.yaml");
        let body = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: AgentConfig\nspec:\n  nodeName: node1\n  identity:\n    rootCertFile: {}\n    rootKeyFile: {}\n  ingress:\n    classes: [sluice, azure-alb-external]\n    namespace: alb-test-infra\n    serviceAccount: alb-gateway\n{}\n{}",
            self.w.root_cert().display(),
            self.w.dir.path().join("root-key.pem").display(),
            self.gateway_extra,
            self.w.resources_yaml(),
        );
        // Written whole and renamed, so the file watch never reads half a file.
        let tmp = dir.join("config.yaml.tmp");
        std::fs::write(&tmp, body).expect("write gateway config");
        std::fs::rename(&tmp, &path).expect("rename gateway config");
        path
    }

    pub fn gateway(&self) -> &Agent {
        self.gateway.as_ref().expect("gateway running")
    }

    pub fn gw_ip(&self) -> String {
        self.w.pod("gw").ipv4.to_string()
    }

    /// `curl ARGS` in the client pod: (stdout, stderr), failing the test if curl fails.
    pub fn curl(&self, args: &[&str]) -> (String, String) {
        let (ok, out, err) = self.try_curl(args);
        assert!(ok, "curl {args:?} failed: {err}");
        (out, err)
    }

    pub fn try_curl(&self, args: &[&str]) -> (bool, String, String) {
        curl_in(&self.w, "client", args)
    }

    /// `GET http://<gateway>:80<path>` with `headers`: (status, JSON body or null).
    pub fn get(&self, path: &str, headers: &[&str]) -> (u16, serde_json::Value, String) {
        let url = format!("http://{}{path}", self.gw_ip());
        let mut args = vec![
            "-sS",
            "--max-time",
            "10",
            "-D",
            "/dev/stderr",
            "-w",
            "\n%{http_code}",
        ];
        for h in headers {
            args.push("-H");
            args.push(h);
        }
        args.push(&url);
        let (out, head) = self.curl(&args);
        let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
        let status = code.trim().parse().expect("status code");
        (
            status,
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
            head,
        )
    }

    /// The gateway's Prometheus text.
    pub fn gateway_metrics(&self) -> String {
        let (out, _) = curl_in(
            &self.w,
            "gw",
            &["-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"],
        )
        .pipe_ok();
        out
    }
}

pub trait PipeOk {
    fn pipe_ok(self) -> (String, String);
}

impl PipeOk for (bool, String, String) {
    fn pipe_ok(self) -> (String, String) {
        assert!(self.0, "curl failed: {}", self.2);
        (self.1, self.2)
    }
}

/// `curl ARGS` in pod `pod`: (succeeded, stdout, stderr).
pub fn curl_in(w: &World, pod: &str, args: &[&str]) -> (bool, String, String) {
    let out = w
        .pod(pod)
        .command("curl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run curl (Debian package curl, installed by cargo xtask setup)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// HBONE connections node 2's agent accepted from the gateway's identity (its metrics).
pub fn hbone_from_gateway(ing: &Ingress) -> f64 {
    let (status, text) = ing.w.node_http_get(2, 15020, "/metrics");
    assert!(status.contains("200"), "{status}");
    metrics::sample(
        &text,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", GATEWAY_ID),
            ("connection_security_policy", "mutual_tls"),
        ],
    )
}

/// Backend names of the JSON lines in `out`, counted.
pub fn count_backends(out: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in out.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).expect("echo JSON");
        *counts
            .entry(v["backend"].as_str().unwrap_or("?").to_owned())
            .or_insert(0) += 1;
    }
    counts
}

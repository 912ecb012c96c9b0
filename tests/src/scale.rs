//! A synthetic cluster of a real cluster's size, as YAML the file source and `state::build`
//! read: pods over many nodes, Services, AuthorizationPolicies, PeerAuthentications and
//! StaticGatewayConfigurations, shaped like what `kubectl get -o yaml` returns (annotations
//! included), for `cargo xtask bench scale`.
use std::fmt::Write;

/// How big the synthetic cluster is.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    pub pods: usize,
    pub namespaces: usize,
    pub nodes: usize,
    /// Pods on `node1`, the measured agent's node (the rest spread over the other nodes).
    pub pods_on_node1: usize,
    pub services: usize,
    pub authorization_policies: usize,
    /// Rules per AuthorizationPolicy.
    pub rules: usize,
    pub peer_authentications: usize,
    pub static_gateways: usize,
}

impl Size {
    /// The issue's size: 10,000 pods over 100 nodes (250 on this one), 100 namespaces, 2,000
    /// Services, 5,000 AuthorizationPolicies of 10 rules, 1,000 PeerAuthentications, 500
    /// StaticGatewayConfigurations.
    pub const CLUSTER: Size = Size {
        pods: 10_000,
        namespaces: 100,
        nodes: 100,
        pods_on_node1: 250,
        services: 2_000,
        authorization_policies: 5_000,
        rules: 10,
        peer_authentications: 1_000,
        static_gateways: 500,
    };
}

/// Pod `i`'s IPv4 address (10.128.0.0/9, never one the harness's own pods use).
pub fn pod_ip(i: usize) -> String {
    let n = 128 * 65_536 + i + 1;
    format!("10.{}.{}.{}", n >> 16, (n >> 8) & 0xff, n & 0xff)
}

/// Pod `i`'s namespace.
pub fn namespace_of(size: &Size, i: usize) -> String {
    format!("ns-{}", i % size.namespaces)
}

/// The app label Services and policies select: Service `s` selects the pods `i` with
/// `i % services == s` (five per Service at the cluster size).
fn app(size: &Size, i: usize) -> String {
    format!("app-{}", i % size.services)
}

/// Pod `i` with labels, a service account, a named container port, Ready, and a
/// `last-applied-configuration` annotation as `kubectl apply` leaves one (about 600 bytes).
pub fn pod(size: &Size, i: usize, generation: usize) -> String {
    let node = if i < size.pods_on_node1 {
        1
    } else {
        2 + i % (size.nodes - 1)
    };
    let ns = namespace_of(size, i);
    let app = app(size, i);
    let ip = pod_ip(i);
    format!(
        r#"---
apiVersion: v1
kind: Pod
metadata:
  name: pod-{i}
  namespace: {ns}
  uid: 00000000-0000-4000-8000-{i:012}
  labels: {{app: {app}, version: v1, pod-template-hash: 7f9c{generation}}}
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: '{{"apiVersion":"v1","kind":"Pod","metadata":{{"annotations":{{}},"labels":{{"app":"{app}","version":"v1"}},"name":"pod-{i}","namespace":"{ns}"}},"spec":{{"containers":[{{"image":"registry.example/{app}:1.2.3","name":"app","ports":[{{"containerPort":8080,"name":"http"}}],"resources":{{"limits":{{"cpu":"500m","memory":"256Mi"}},"requests":{{"cpu":"100m","memory":"128Mi"}}}}}}],"serviceAccountName":"sa-{sa}"}}}}'
spec:
  nodeName: node{node}
  serviceAccountName: sa-{sa}
  containers:
  - name: app
    image: registry.example/{app}:1.2.3
    ports: [{{name: http, containerPort: 8080}}]
    resources: {{limits: {{cpu: 500m, memory: 256Mi}}, requests: {{cpu: 100m, memory: 128Mi}}}}
status:
  phase: Running
  podIP: {ip}
  podIPs: [{{ip: {ip}}}]
  conditions: [{{type: Ready, status: "True"}}]
"#,
        sa = i % 50,
    )
}

/// The whole cluster as one YAML stream (no AgentConfig document). `generation` changes every
/// pod's `pod-template-hash` label, so two generations differ in every pod.
pub fn cluster(size: &Size, generation: usize) -> String {
    let mut out = String::with_capacity(size.pods * 1_400);
    for n in 0..size.namespaces {
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}, labels: {{istio.io/dataplane-mode: ambient}}}}\n"
        );
    }
    for i in 0..size.pods {
        out.push_str(&pod(size, i, generation));
    }
    for s in 0..size.services {
        let _ = write!(
            out,
            r#"---
apiVersion: v1
kind: Service
metadata: {{name: svc-{s}, namespace: ns-{ns}}}
spec:
  clusterIP: 10.96.{hi}.{lo}
  selector: {{app: app-{s}}}
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]
"#,
            ns = s % size.namespaces,
            hi = s / 250,
            lo = s % 250 + 1,
        );
    }
    for p in 0..size.authorization_policies {
        let ns = p % size.namespaces;
        let _ = write!(
            out,
            r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: authz-{p}, namespace: ns-{ns}}}
spec:
  selector: {{matchLabels: {{app: app-{app}}}}}
  action: ALLOW
  rules:
"#,
            app = p % size.services,
        );
        for r in 0..size.rules {
            let _ = write!(
                out,
                "  - from: [{{source: {{principals: [cluster.local/ns/ns-{src}/sa/sa-{sa}]}}}}]\n    to: [{{operation: {{ports: [\"{port}\"]}}}}]\n",
                src = (ns + r) % size.namespaces,
                sa = (p + r) % 50,
                port = 8000 + r,
            );
        }
    }
    for a in 0..size.peer_authentications {
        let mode = if a % 2 == 0 { "STRICT" } else { "PERMISSIVE" };
        let _ = write!(
            out,
            r#"---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: pa-{a}, namespace: ns-{ns}}}
spec:
  selector: {{matchLabels: {{app: app-{app}}}}}
  mtls: {{mode: {mode}}}
  portLevelMtls: {{"9090": {{mode: PERMISSIVE}}}}
"#,
            ns = a % size.namespaces,
            app = a % size.services,
        );
    }
    for g in 0..size.static_gateways {
        let _ = write!(
            out,
            r#"---
apiVersion: egressgateway.kubernetes.azure.com/v1alpha1
kind: StaticGatewayConfiguration
metadata: {{name: sgc-{g}, namespace: ns-{ns}}}
spec:
  gatewayNodepoolName: gwpool
  excludeCidrs: [10.0.0.0/8]
"#,
            ns = g % size.namespaces,
        );
    }
    out
}

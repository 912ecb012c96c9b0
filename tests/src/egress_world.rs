//! The egress world: two nodes, pods on node 1, node 2 the gateway node (gateway role,
//! static-prefix pinning) with a simulated internet behind it. Shared by the egress tests and
//! `cargo xtask bench egress`.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Command,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use serde_json::Value;

use crate::{
    internet::{DNS_SERVER, INTERNET_ADDR, Internet, InternetSpec},
    world::{PodSpec, World},
};

pub const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
pub const SGC_ANNOTATION: &str = "kubernetes.azure.com/static-gateway-configuration";
pub const GATEWAY_NODE_ADDR: &str = "172.30.12.2";
/// The prefix the agents' config gives StaticGatewayConfiguration `shop/pinned`.
pub const PINNED_PREFIX: &str = "198.51.100.16/28";

pub fn nodes_yaml() -> String {
    format!(
        r#"---
apiVersion: v1
kind: Node
metadata: {{name: node1}}
status: {{addresses: [{{type: InternalIP, address: 172.30.12.1}}]}}
---
apiVersion: v1
kind: Node
metadata:
  name: node2
  labels: {{kubernetes.azure.com/agentpool: gwpool, istio: egressgateway}}
status: {{addresses: [{{type: InternalIP, address: {GATEWAY_NODE_ADDR}}}]}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: istio-system}}
"#
    )
}

pub fn sgc(name: &str, status_prefix: Option<&str>) -> String {
    let status = status_prefix
        .map(|p| format!("status: {{egressIpPrefix: \"{p}\"}}\n"))
        .unwrap_or_default();
    format!(
        r#"---
apiVersion: egressgateway.kubernetes.azure.com/v1alpha1
kind: StaticGatewayConfiguration
metadata: {{name: {name}, namespace: shop}}
spec:
  gatewayNodepoolName: gwpool
  excludeCidrs: [10.0.0.0/8, 172.30.0.0/16]
{status}"#
    )
}

/// The AgentConfig lines of node `i` (gateway role and pinning on node 2).
pub fn agent_spec(i: usize, prefixes: &str) -> String {
    let mut s = format!(
        "  egress:\n    dnsServer: {DNS_SERVER}:53\n    staticGatewayPrefixes: {{{prefixes}}}\n"
    );
    if i == 2 {
        s.push_str(&format!(
            "    gateway: {{listen: \"0.0.0.0:15008\"}}\n    pinning: {{uplinkInterface: uplink, uplinkGatewayV4: {INTERNET_ADDR}}}\n"
        ));
    }
    s
}

pub struct Egress {
    pub w: World,
    pub net: Internet,
    pub prefixes: String,
}

impl Egress {
    /// Two nodes, the internet behind node 2, pods on node 1, agents started with `resources`.
    pub fn build(pods: &[PodSpec], resources: &str, dns: &[(&str, Ipv4Addr)]) -> Egress {
        let mut w = World::build(2, pods);
        w.namespace("shop", &[AMBIENT]);
        let spec = InternetSpec {
            tls_hosts: vec![
                "secure.example".into(),
                "orig.example".into(),
                "badca.example".into(),
            ],
            dns: dns.iter().map(|(n, a)| (n.to_string(), vec![*a])).collect(),
            dns_ttl: 2,
            ..InternetSpec::default()
        };
        let net = w.add_internet_with(2, spec);
        let mut e = Egress {
            w,
            net,
            prefixes: format!("shop/pinned: {PINNED_PREFIX}"),
        };
        e.w.extra_resources = format!("{}{resources}", nodes_yaml());
        for i in [1, 2] {
            let spec = agent_spec(i, &e.prefixes);
            e.w.start_agent(i, &spec);
        }
        for p in pods {
            assert!(e.w.enroll(&p.name), "{} not captured", p.name);
        }
        e
    }

    /// Rewrites both agents' config files with `resources` (they reload them).
    pub fn set_resources(&mut self, resources: &str) {
        self.w.extra_resources = format!("{}{resources}", nodes_yaml());
        for i in [1, 2] {
            self.w.agent_config(i, &agent_spec(i, &self.prefixes));
        }
    }

    pub fn http_get(&self, pod: &str, addr: Ipv4Addr, host: &str) -> Value {
        self.w.run_in(
            pod,
            &["http-get", &SocketAddr::from((addr, 80)).to_string(), host],
        )
    }

    pub fn tls_get(&self, pod: &str, addr: Ipv4Addr, sni: &str, ca: &str) -> Value {
        self.w.run_in(
            pod,
            &[
                "tls-get",
                &SocketAddr::from((addr, 443)).to_string(),
                sni,
                ca,
            ],
        )
    }

    pub fn metrics(&self, node: usize) -> String {
        self.w.node_http_get(node, 15020, "/metrics").1
    }

    pub fn node_ns(&self) -> String {
        self.w.node_netns(2)
    }
}

/// Polls `f` every 100 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ip -j ARGS` in namespace `ns`, parsed.
pub fn ip_json(ns: &str, args: &[&str]) -> Value {
    let out = Command::new("ip")
        .args(["-n", ns, "-j"])
        .args(args)
        .output()
        .expect("ip");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]))
}

/// Addresses inside `prefix` on any interface of namespace `ns`.
pub fn prefix_addresses(ns: &str, prefix: IpNet) -> Vec<IpAddr> {
    ip_json(ns, &["addr"])
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str()?.parse::<IpAddr>().ok())
        .filter(|ip| prefix.contains(ip))
        .collect()
}

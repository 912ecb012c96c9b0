//! End-to-end egress: REGISTRY_ONLY at the node proxy, egress gateways (HTTP, TLS passthrough,
//! TLS origination) over HBONE, and static source-prefix pinning on the gateway node, against
//! a simulated internet behind node 2 whose servers record the source of every connection.
//!
//! Layout: node 1 carries the client pods; node 2 is the gateway node (labels
//! `kubernetes.azure.com/agentpool=gwpool`, `istio=egressgateway`, agent in gateway role) with
//! the uplink to the internet (`203.0.113.0/24`, DNS at `203.0.113.53`).
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    process::Command,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use serde_json::Value;
use sluice_tests::{
    egress_world::{
        Egress, GATEWAY_NODE_ADDR, PINNED_PREFIX, SGC_ANNOTATION, ip_json, prefix_addresses, sgc,
        wait_until,
    },
    internet::{INTERNET_ADDR, SERVERS, UPLINK_NODE},
    metrics,
    world::PodSpec,
};

const REGISTRY_ONLY: &str = r#"---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |-
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
"#;

/// ServiceEntries: `web.example` (HTTP) and `api.example` (TCP, DNS-resolved, reached by IP).
const REGISTRY: &str = r#"---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.example]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
  location: MESH_EXTERNAL
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example]
  ports: [{number: 80, name: tcp, protocol: TCP}]
  resolution: DNS
  location: MESH_EXTERNAL
"#;

/// Seed 002's trio, for three hosts: `web.example` (HTTP through the gateway),
/// `secure.example` (TLS passthrough) and `orig.example` (the pod speaks HTTP to port 80, the
/// gateway originates TLS to 443), plus `badca.example` whose DestinationRule trusts the wrong
/// CA. `ca` is the internet's CA file, `wrong_ca` another one.
fn gateway_trio(ca: &str, wrong_ca: &str) -> String {
    format!(
        r#"---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: through-gateway, namespace: shop}}
spec:
  hosts: [web.example, orig.example, badca.example, secure.example]
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  - {{number: 443, name: tls, protocol: TLS}}
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: egress, namespace: istio-system}}
spec:
  selector: {{istio: egressgateway}}
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: [web.example, orig.example, badca.example]
  - port: {{number: 443, name: tls, protocol: TLS}}
    hosts: [secure.example]
    tls: {{mode: PASSTHROUGH}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web-via-egress, namespace: istio-system}}
spec:
  hosts: [web.example]
  gateways: [mesh, egress]
  http:
  - match: [{{gateways: [mesh], port: 80}}]
    route: [{{destination: {{host: istio-egressgateway.istio-system.svc.cluster.local, port: {{number: 80}}}}}}]
  - match: [{{gateways: [egress], port: 80}}]
    route: [{{destination: {{host: web.example, port: {{number: 80}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: secure-via-egress, namespace: istio-system}}
spec:
  hosts: [secure.example]
  gateways: [mesh, egress]
  tls:
  - match: [{{gateways: [mesh], port: 443, sniHosts: [secure.example]}}]
    route: [{{destination: {{host: istio-egressgateway.istio-system.svc.cluster.local, port: {{number: 443}}}}}}]
  - match: [{{gateways: [egress], port: 443, sniHosts: [secure.example]}}]
    route: [{{destination: {{host: secure.example, port: {{number: 443}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: originate-via-egress, namespace: istio-system}}
spec:
  hosts: [orig.example, badca.example]
  gateways: [mesh, egress]
  http:
  - match: [{{gateways: [mesh], port: 80}}]
    route: [{{destination: {{host: istio-egressgateway.istio-system.svc.cluster.local, port: {{number: 80}}}}}}]
  - match: [{{gateways: [egress], port: 80, authority: {{exact: orig.example}}}}]
    route: [{{destination: {{host: orig.example, port: {{number: 443}}}}}}]
  - match: [{{gateways: [egress], port: 80, authority: {{exact: badca.example}}}}]
    route: [{{destination: {{host: badca.example, port: {{number: 443}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: originate-tls, namespace: istio-system}}
spec:
  host: orig.example
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 443}}
      tls: {{mode: SIMPLE, sni: orig.example, caCertificates: {ca}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: originate-tls-wrong-ca, namespace: istio-system}}
spec:
  host: badca.example
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 443}}
      tls: {{mode: SIMPLE, caCertificates: {wrong_ca}}}
"#
    )
}

fn ok(v: &Value, what: &str) {
    assert_eq!(v["status"], 200, "{what}: {v}");
}

fn failed(v: &Value, what: &str) {
    assert!(v.get("error").is_some(), "{what} should have failed: {v}");
}

/// The metric sample `name{labels}`'s value, 0 when absent.
fn sample(metrics: &str, name_and_labels: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Fails with what differs between two snapshots.
fn assert_same(before: &BTreeSet<String>, after: &BTreeSet<String>, what: &str) {
    let gone: Vec<_> = before.difference(after).collect();
    let new: Vec<_> = after.difference(before).collect();
    assert!(
        gone.is_empty() && new.is_empty(),
        "{what}: removed {gone:?}, added {new:?}"
    );
}

#[test]
fn egress_registry_only_refuses_unlisted_hosts_and_ips_and_admits_listed() {
    let e = Egress::build(
        &[PodSpec::new("client", "shop", 1)],
        &format!("{REGISTRY_ONLY}{REGISTRY}"),
        &[("web.example", SERVERS[0]), ("api.example", SERVERS[2])],
    );
    let pod_ip = e.w.pod("client").ipv4;

    // Listed by host (HTTP Host peeked): passes straight out from the pod's own address.
    ok(
        &e.http_get("client", SERVERS[0], "web.example"),
        "listed host",
    );
    let rec = e
        .net
        .wait_for(Duration::from_secs(5), |r| {
            r.host.as_deref() == Some("web.example")
        })
        .expect("web.example reached the internet");
    assert_eq!(
        rec.peer.ip(),
        pod_ip,
        "a direct connection keeps the pod's address"
    );

    // Unlisted host on a listed address: refused, never reaches the internet.
    let start = Instant::now();
    failed(
        &e.http_get("client", SERVERS[0], "unlisted.example"),
        "unlisted host",
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "refusal was not prompt: {:?}",
        start.elapsed()
    );
    // Unlisted IP (no host to go by): refused.
    failed(
        &e.http_get("client", SERVERS[1], &SERVERS[1].to_string()),
        "unlisted IP",
    );
    // An address the agent resolved for the DNS ServiceEntry api.example: admitted by IP.
    ok(
        &e.http_get("client", SERVERS[2], &SERVERS[2].to_string()),
        "DNS-resolved ServiceEntry address",
    );
    std::thread::sleep(Duration::from_millis(300));
    let recs = e.net.records();
    assert!(
        !recs
            .iter()
            .any(|r| r.host.as_deref() == Some("unlisted.example")
                || r.local.ip() == IpAddr::V4(SERVERS[1])),
        "a refused connection reached the internet: {recs:?}"
    );

    let refused = e.w.agents[&1].wait_access(2, |l| l["outcome"] == "refused");
    assert_eq!(refused, 2, "{:?}", e.w.agents[&1].access_log());
    let lines = e.w.agents[&1].access_log();
    assert!(lines.iter().any(|l| l["outcome"] == "refused"
        && l["host"] == "unlisted.example"
        && l["reason_label"] == "registry_only"
        && l["reason"].as_str().unwrap_or("").contains("REGISTRY_ONLY")));
    let m = e.metrics(1);
    assert_eq!(
        sample(&m, "sluice_egress_refusals_total{reason=\"registry_only\"}"),
        2,
        "{m}"
    );

    // Re-resolution on TTL (2 s): api.example moves to SERVERS[1]; once the old answer expires
    // the new address is admitted and the old one refused.
    e.net.set_dns("api.example", &[SERVERS[1]]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = e.http_get("client", SERVERS[1], &SERVERS[1].to_string());
        if v["status"] == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new address was never admitted: {v}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    failed(
        &e.http_get("client", SERVERS[2], &SERVERS[2].to_string()),
        "the old address after re-resolution",
    );
}

#[test]
fn egress_allow_any_reaches_unlisted_destinations_directly() {
    let e = Egress::build(&[PodSpec::new("client", "shop", 1)], REGISTRY, &[]);
    let v = e.http_get("client", SERVERS[1], "unlisted.example");
    ok(&v, "ALLOW_ANY");
    let rec = e
        .net
        .wait_for(Duration::from_secs(5), |r| {
            r.host.as_deref() == Some("unlisted.example")
        })
        .expect("reached the internet");
    assert_eq!(rec.peer.ip(), e.w.pod("client").ipv4, "not direct");
    assert_eq!(
        e.w.agents[&1].wait_access(1, |l| l["route"] == "direct" && l["outcome"] == "ok"),
        1
    );
}

#[test]
fn egress_gateway_http_passthrough_and_origination_over_mtls() {
    let mut e = Egress::build(
        &[PodSpec::new("client", "shop", 1)],
        REGISTRY_ONLY,
        &[
            ("web.example", SERVERS[0]),
            ("secure.example", SERVERS[1]),
            ("orig.example", SERVERS[2]),
            ("badca.example", SERVERS[2]),
        ],
    );
    let ca = e.net.ca_cert().display().to_string();
    let wrong_ca = e.w.root_cert().display().to_string();
    e.set_resources(&format!("{REGISTRY_ONLY}{}", gateway_trio(&ca, &wrong_ca)));
    // Wait for both agents to take the new resources.
    for i in [1, 2] {
        e.w.agents.get_mut(&i).expect("agent").wait_for_log(
            |l| l["message"] == "config file changed; republishing its resources",
            Duration::from_secs(10),
            "config reload",
        );
    }
    let gw_src = IpAddr::V4(UPLINK_NODE);

    // HTTP, routed by Host through the gateway.
    let v = e.http_get("client", SERVERS[0], "web.example");
    ok(&v, "HTTP via gateway");
    let rec = e
        .net
        .wait_for(Duration::from_secs(5), |r| {
            r.host.as_deref() == Some("web.example")
        })
        .expect("web.example reached");
    assert_eq!(rec.proto, "http");
    assert_eq!(rec.peer.ip(), gw_src, "not from the gateway node");

    // TLS passthrough: the client verifies the real server's certificate for its SNI.
    let v = e.tls_get("client", SERVERS[1], "secure.example", &ca);
    ok(&v, "TLS passthrough");
    let rec = e
        .net
        .wait_for(Duration::from_secs(5), |r| {
            r.sni.as_deref() == Some("secure.example")
        })
        .expect("secure.example reached");
    assert_eq!(rec.peer.ip(), gw_src);
    // Never terminated: a client that trusts another CA (the mesh's) fails verification.
    let v = e.tls_get("client", SERVERS[1], "secure.example", &wrong_ca);
    assert!(
        v["error"].as_str().unwrap_or("").starts_with("tls:"),
        "passthrough must leave verification to the client: {v}"
    );

    // TLS origination: plain HTTP from the pod, TLS with SNI from the gateway, verified.
    let v = e.http_get("client", SERVERS[2], "orig.example");
    ok(&v, "TLS origination");
    let rec = e
        .net
        .wait_for(Duration::from_secs(5), |r| {
            r.proto == "tls" && r.sni.as_deref() == Some("orig.example") && r.error.is_none()
        })
        .expect("orig.example reached over TLS");
    assert_eq!(rec.peer.ip(), gw_src);
    assert_eq!(rec.host.as_deref(), Some("orig.example"));
    // The gateway verifies the upstream: with the wrong CA it refuses to send anything.
    failed(
        &e.http_get("client", SERVERS[2], "badca.example"),
        "origination with the wrong CA",
    );
    assert!(
        e.w.agents[&2].wait_access(1, |l| l["direction"] == "egress_gateway"
            && l["outcome"] == "tls")
            >= 1,
        "{:?}",
        e.w.agents[&2].access_log()
    );
    assert!(
        !e.net
            .records()
            .iter()
            .any(|r| r.host.as_deref() == Some("badca.example")),
        "a request went out over an unverified connection"
    );

    // The pod-to-gateway hop is mutual TLS: the gateway verified the pod's certificate, and
    // the pod's proxy verified the gateway's identity.
    let client_id = "spiffe://cluster.local/ns/shop/sa/client";
    let through = e.w.agents[&2].wait_access(3, |l| {
        l["direction"] == "egress_gateway" && l["outcome"] == "ok" && l["src.identity"] == client_id
    });
    assert!(through >= 3, "{:?}", e.w.agents[&2].access_log());
    for mode in ["http", "tls_passthrough", "tls_origination"] {
        assert!(
            e.w.agents[&2]
                .access_log()
                .iter()
                .any(|l| l["mode"] == mode && l["outcome"] == "ok"),
            "no {mode} line"
        );
    }
    assert!(e.w.agents[&1].access_log().iter().any(|l| {
        l["route"] == "egress_gateway"
            && l["dst.identity"]
                == "spiffe://cluster.local/ns/istio-system/sa/sluice-egress-gateway"
    }));
    // The source agent counts the tunnel's bytes as Istio does, as mutual TLS to the gateway.
    let to_gateway = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_principal", client_id),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/istio-system/sa/sluice-egress-gateway",
        ),
        ("connection_security_policy", "mutual_tls"),
    ];
    let mut m = String::new();
    let counted = (0..50).any(|_| {
        m = e.metrics(1);
        let bytes = |name| metrics::sample(&m, name, &to_gateway);
        let done = bytes("istio_tcp_received_bytes_total") > 0.0
            && bytes("istio_tcp_sent_bytes_total") > 0.0;
        if !done {
            std::thread::sleep(Duration::from_millis(100));
        }
        done
    });
    assert!(
        counted,
        "egress gateway bytes missing from istio_tcp_*_bytes_total (mutual_tls):\n{m}"
    );
    // And on the wire between the nodes, nothing of the HTTP request is readable.
    let v = capture_between_nodes(&e, || {
        let _ = e.http_get("client", SERVERS[0], "web.example");
    });
    assert!(v.contains_gateway_port, "no traffic to :15008 captured");
    assert!(
        !v.plaintext_seen,
        "the request crossed the nodes in clear text"
    );

    // An unlisted host is refused at the source (REGISTRY_ONLY), before any gateway.
    failed(
        &e.http_get("client", SERVERS[0], "other.example"),
        "unlisted host",
    );
}

struct Capture {
    contains_gateway_port: bool,
    plaintext_seen: bool,
}

/// Captures node 1's link to node 2 while `f` runs.
fn capture_between_nodes(e: &Egress, f: impl FnOnce()) -> Capture {
    let file = e.w.dir.path().join("hop.pcap");
    let mut tcpdump = Command::new("ip")
        .args([
            "netns",
            "exec",
            &e.w.node_netns(1),
            "tcpdump",
            "-i",
            "n2",
            "-U",
            "-s",
            "0",
            "-w",
        ])
        .arg(&file)
        .arg("tcp")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tcpdump");
    std::thread::sleep(Duration::from_millis(800));
    f();
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(tcpdump.id() as i32, libc::SIGINT) };
    let _ = tcpdump.wait();
    let text = Command::new("tcpdump")
        .args(["-nn", "-A", "-r"])
        .arg(&file)
        .output()
        .expect("tcpdump -r");
    let text = String::from_utf8_lossy(&text.stdout);
    Capture {
        contains_gateway_port: text.contains(&format!("{GATEWAY_NODE_ADDR}.15008")),
        plaintext_seen: text.contains("Host: web.example"),
    }
}

/// Addresses, rules and routes of the gateway node, leaving out Sluice's own interface and
/// IPv6 link-local ones (the kernel adds those by itself once duplicate address detection ends,
/// at a time of its choosing).
fn network_snapshot(ns: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for link in ip_json(ns, &["addr"])
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let name = link["ifname"].as_str().unwrap_or("").to_owned();
        if name == "sluice-egress" {
            continue;
        }
        for a in link["addr_info"].as_array().cloned().unwrap_or_default() {
            if a["local"].as_str().is_some_and(|l| l.starts_with("fe80:")) {
                continue;
            }
            out.insert(format!("addr {name} {}/{}", a["local"], a["prefixlen"]));
        }
    }
    for fam in ["-4", "-6"] {
        for r in ip_json(ns, &[fam, "rule"])
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            out.insert(format!("rule {r}"));
        }
        for r in ip_json(ns, &[fam, "route", "show", "table", "all"])
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let link_local = r["dst"].as_str().is_some_and(|d| d.starts_with("fe80:"));
            if r["dev"] != "sluice-egress" && !link_local {
                out.insert(format!("route {r}"));
            }
        }
    }
    out
}

/// Rules whose source is in `needle` (a textual prefix of the address), and how many of them
/// look up Sluice's table (the rest are `excludeCidrs` rules to `main`).
fn rules_mentioning(ns: &str, needle: &str) -> (usize, usize) {
    let rules: Vec<Value> = ip_json(ns, &["rule"])
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r["src"].as_str().is_some_and(|s| s.starts_with(needle)))
        .collect();
    let to_table = rules.iter().filter(|r| r["table"] == "1339").count();
    (rules.len(), to_table)
}

#[test]
fn egress_pinned_pod_leaves_from_its_prefix_and_the_sgc_lifecycle_is_clean() {
    let mut e = Egress::build(
        &[PodSpec::new("pinned", "shop", 1).annotate(SGC_ANNOTATION, "pinned")],
        "",
        &[],
    );
    let ns = e.node_ns();
    let prefix: IpNet = PINNED_PREFIX.parse().expect("prefix");
    let before = network_snapshot(&ns);

    // A malformed SGC (host bits in its status prefix) and one that overlaps the node's own
    // uplink: both reported, nothing programmed.
    e.set_resources(&format!(
        "{}{}",
        sgc("pinned", Some("198.51.100.17/28")),
        sgc("overlap", Some("203.0.113.0/28"))
    ));
    e.w.agents.get_mut(&2).expect("agent").wait_for_log(
        |l| {
            l["rejection"]
                .as_str()
                .is_some_and(|r| r.contains("shop/pinned") && r.contains("host bits"))
        },
        Duration::from_secs(10),
        "the malformed SGC reported",
    );
    e.w.agents.get_mut(&2).expect("agent").wait_for_log(
        |l| {
            l["sgc"] == "shop/overlap"
                && l["error"]
                    .as_str()
                    .is_some_and(|m| m.contains("address of this node"))
        },
        Duration::from_secs(10),
        "the overlapping prefix reported",
    );
    assert_same(
        &before,
        &network_snapshot(&ns),
        "a bad SGC changed the node",
    );
    assert!(prefix_addresses(&ns, "203.0.113.0/28".parse().expect("net")).len() <= 1);

    // The good SGC: its prefix comes from the agent's config.
    e.set_resources(&sgc("pinned", None));
    wait_until(
        Duration::from_secs(10),
        "the prefix on the gateway node",
        || prefix_addresses(&ns, prefix).len() == 14,
    );
    // `from P lookup 1339`, and `from P to C lookup main` for each of the two excludeCidrs.
    assert_eq!(
        rules_mentioning(&ns, "198.51.100.16"),
        (3, 1),
        "{}",
        ip_json(&ns, &["rule"])
    );
    let table = ip_json(&ns, &["route", "show", "table", "1339"]);
    assert!(
        table.to_string().contains(&INTERNET_ADDR.to_string()),
        "Sluice's table: {table}"
    );

    let expected = sluice::egress::source_address(
        prefix,
        &sluice::state::WorkloadUid(e.w.pod("pinned").uid.clone()),
    );
    let ca = e.net.ca_cert().display().to_string();
    for i in 0..5 {
        ok(
            &e.http_get("pinned", SERVERS[i % 3], "any.example"),
            "pinned HTTP",
        );
    }
    e.net.add_tls_host("pinned.example");
    ok(
        &e.tls_get("pinned", SERVERS[0], "pinned.example", &ca),
        "pinned TLS",
    );
    std::thread::sleep(Duration::from_millis(300));
    let seen: Vec<_> = e
        .net
        .records()
        .into_iter()
        .filter(|r| r.proto != "dns")
        .collect();
    assert_eq!(seen.len(), 6, "{seen:?}");
    for r in &seen {
        assert!(
            prefix.contains(&r.peer.ip()),
            "left from {} outside {prefix}",
            r.peer
        );
        assert_eq!(r.peer.ip(), expected, "not the workload's stable address");
    }

    // Deleting the SGC removes every address, rule and route it made, and nothing else.
    e.set_resources("");
    wait_until(Duration::from_secs(10), "the prefix removed", || {
        prefix_addresses(&ns, prefix).is_empty()
    });
    assert_eq!(rules_mentioning(&ns, "198.51.100.16"), (0, 0));
    assert_eq!(
        ip_json(&ns, &["route", "show", "table", "1339"]),
        Value::Array(vec![])
    );
    assert_same(
        &before,
        &network_snapshot(&ns),
        "deleting the SGC changed other state",
    );
}

#[test]
fn egress_500_static_gateway_configurations_reconcile() {
    let mut e = Egress::build(&[PodSpec::new("idle", "shop", 1)], "", &[]);
    let ns = e.node_ns();
    let before = network_snapshot(&ns);
    // 500 SGCs on the gateway pool, each a /32 of 100.64.0.0/16 (prefixes from status).
    let mut docs = String::new();
    for k in 0..500u32 {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + k);
        docs.push_str(&sgc(&format!("sgc-{k}"), Some(&format!("{ip}/32"))));
    }
    let start = Instant::now();
    e.set_resources(&docs);
    let line = e.w.agents.get_mut(&2).expect("agent").wait_for_log(
        |l| l["message"] == "egress prefixes reconciled" && l["pinned"] == 500,
        Duration::from_secs(120),
        "500 prefixes reconciled",
    );
    let wall = start.elapsed();
    let reconcile_ms = line["elapsed_ms"].as_u64().unwrap_or(0);
    let addrs = prefix_addresses(&ns, "100.64.0.0/16".parse().expect("net")).len();
    assert_eq!(addrs, 500);
    assert_eq!(rules_mentioning(&ns, "100.64."), (1500, 500));
    println!(
        "egress 500 SGCs: reconcile {reconcile_ms} ms (netlink), {} ms from config write to done",
        wall.as_millis()
    );
    let start = Instant::now();
    e.set_resources("");
    wait_until(Duration::from_secs(120), "500 prefixes removed", || {
        prefix_addresses(&ns, "100.64.0.0/16".parse().expect("net")).is_empty()
    });
    println!(
        "egress 500 SGCs: removal {} ms",
        start.elapsed().as_millis()
    );
    assert_same(&before, &network_snapshot(&ns), "removing 500 SGCs");
}

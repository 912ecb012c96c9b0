//! The simulated internet of the test harness (`sluice_tests::internet`), without agents: a
//! pod on a non-gateway node reaches its HTTP, TLS and DNS servers through its node and the
//! gateway node, the servers record the pod's own address, and nothing is left after drop.
use std::{net::IpAddr, process::Command, time::Duration};

use sluice_tests::{
    internet::{DNS_SERVER, SERVERS},
    world::{PodSpec, World},
};

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn egress_harness_reaches_internet_without_agent() {
    let mut world = World::build(2, &[PodSpec::new("client", "apps", 2)]);
    let id = world.id.clone();
    let internet = world.add_internet(1);
    internet.add_tls_host("api.example.com");
    internet.set_dns("api.example.com", &[SERVERS[1]]);
    internet.set_dns_ttl(7);
    let pod_ip: IpAddr = world.pod("client").ipv4;
    let ca = internet.ca_cert().display().to_string();

    // Plain HTTP to one server address.
    let http_addr = format!("{}:80", SERVERS[0]);
    let v = world.run_in(
        "client",
        &["http-get", &http_addr, "plain.example", "/hello"],
    );
    assert_eq!(v["status"], 200, "http-get: {v}");
    assert_eq!(v["body"]["host"], "plain.example", "{v}");
    assert_eq!(v["body"]["path"], "/hello", "{v}");
    let peer: std::net::SocketAddr = v["body"]["peer"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("peer in {v}"));
    assert_eq!(
        peer.ip(),
        pod_ip,
        "the internet saw {peer}, not the pod: {v}"
    );
    let r = internet
        .wait_for(Duration::from_secs(5), |r| {
            r.proto == "http" && r.host.as_deref() == Some("plain.example")
        })
        .unwrap_or_else(|| panic!("no http record: {:?}", internet.records()));
    assert_eq!(r.peer, peer);
    assert_eq!(r.local, http_addr.parse().expect("addr"));

    // TLS with a verified certificate for the SNI.
    let tls_addr = format!("{}:443", SERVERS[1]);
    let v = world.run_in(
        "client",
        &["tls-get", &tls_addr, "api.example.com", &ca, "/v1"],
    );
    assert_eq!(v["status"], 200, "tls-get: {v}");
    assert_eq!(v["body"]["sni"], "api.example.com", "{v}");
    assert_eq!(v["body"]["host"], "api.example.com", "{v}");
    let r = internet
        .wait_for(Duration::from_secs(5), |r| {
            r.proto == "tls" && r.sni.as_deref() == Some("api.example.com")
        })
        .unwrap_or_else(|| panic!("no tls record: {:?}", internet.records()));
    assert_eq!(r.peer.ip(), pod_ip, "{r:?}");
    assert_eq!(r.path.as_deref(), Some("/v1"));
    assert!(r.error.is_none(), "{r:?}");

    // A name the server has no certificate for fails the handshake, and is recorded.
    let v = world.run_in("client", &["tls-get", &tls_addr, "unknown.example", &ca]);
    let err = v["error"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert!(err.starts_with("tls: "), "{v}");
    let r = internet
        .wait_for(Duration::from_secs(5), |r| {
            r.proto == "tls" && r.sni.as_deref() == Some("unknown.example")
        })
        .unwrap_or_else(|| panic!("no failed-tls record: {:?}", internet.records()));
    assert!(r.error.is_some(), "{r:?}");
    // A client that trusts another CA refuses the server.
    let other_ca = world.root_cert().display().to_string();
    let v = world.run_in(
        "client",
        &["tls-get", &tls_addr, "api.example.com", &other_ca],
    );
    assert!(
        v["error"].as_str().is_some_and(|e| e.starts_with("tls: ")),
        "a foreign CA must not verify: {v}"
    );

    // DNS over UDP and TCP: the configured record and TTL, NXDOMAIN otherwise.
    let dns = DNS_SERVER.to_string();
    for transport in ["udp", "tcp"] {
        let v = world.run_in("client", &["dns", &dns, "API.example.com", transport]);
        assert_eq!(v["rcode"], "NoError", "dns {transport}: {v}");
        assert_eq!(v["answers"][0]["ip"], SERVERS[1].to_string(), "{v}");
        assert_eq!(v["answers"][0]["ttl"], 7, "{v}");
        assert_eq!(v["answers"].as_array().map(Vec::len), Some(1), "{v}");
        let v = world.run_in("client", &["dns", &dns, "missing.example", transport]);
        assert_eq!(v["rcode"], "NXDomain", "dns {transport}: {v}");
        let r = internet
            .wait_for(Duration::from_secs(5), |r| {
                r.proto == "dns"
                    && r.transport.as_deref() == Some(transport)
                    && r.qname.as_deref() == Some("api.example.com")
            })
            .unwrap_or_else(|| panic!("no dns record: {:?}", internet.records()));
        assert_eq!(r.peer.ip(), pod_ip, "{r:?}");
        assert_eq!(r.answers, vec![SERVERS[1].to_string()]);
    }
    internet.remove_dns("api.example.com");
    let v = world.run_in("client", &["dns", &dns, "api.example.com"]);
    assert_eq!(v["rcode"], "NXDomain", "after removal: {v}");

    // Only the test's namespaces: an address outside them is unreachable.
    let v = world.run_in("client", &["http-get", "192.0.2.1:80", "x"]);
    assert!(v["error"].is_string(), "192.0.2.1 must be unreachable: {v}");

    let netns = internet.netns.clone();
    assert!(netns_list().contains(&netns));
    drop(internet);
    drop(world);
    let left = netns_list();
    assert!(
        !left.lines().any(|l| l.starts_with(&id)),
        "namespaces left after drop: {left}"
    );
}

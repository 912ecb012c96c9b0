//! End-to-end: the capture loop through real eBPF programs, sockets and namespaces.
use std::net::{IpAddr, SocketAddr};

use sluice_tests::{
    bpf,
    world::{PodSpec, World},
};

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");

/// Two nodes; `a`, `b` (node 1) and `c` (node 2) in the mesh; `outside` (node 2) and `plain`
/// (node 1) not; `optout` in the mesh namespace but labelled out.
fn mesh_world(extra_spec: &str) -> World {
    let mut w = World::build(
        2,
        &[
            PodSpec::new("a", "mesh", 1),
            PodSpec::new("b", "mesh", 1),
            PodSpec::new("c", "mesh", 2),
            PodSpec::new("outside", "plain", 2),
            PodSpec::new("plain", "plain", 1),
            PodSpec::new("optout", "mesh", 1).label("istio.io/dataplane-mode", "none"),
        ],
    );
    w.namespace("mesh", &[AMBIENT]);
    w.namespace("plain", &[]);
    w.start_agent(1, extra_spec);
    w.start_agent(2, extra_spec);
    for pod in ["a", "b", "c"] {
        assert!(w.enroll(pod), "{pod} should be captured");
    }
    for pod in ["outside", "plain", "optout"] {
        assert!(!w.enroll(pod), "{pod} should not be captured");
    }
    w
}

fn addr(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

#[test]
fn capture_outbound_same_node_and_cross_node() {
    let mut w = mesh_world("");
    let b_srv = w.serve("b", "0.0.0.0:8080");
    let c_srv = w.serve("c", "0.0.0.0:8080");
    let (a, b, c) = (w.pod("a").clone(), w.pod("b").clone(), w.pod("c").clone());

    for (target, srv) in [(&b, &b_srv), (&c, &c_srv)] {
        let conn = w.connect("a", &addr(target.ipv4, 8080), 100_000);
        assert!(
            conn.captured(),
            "a → {}: not captured: {conn:?}",
            target.name
        );
        // The client still sees the address it dialled as its peer (sluice_getpeer4)…
        assert_eq!(
            conn.peer,
            SocketAddr::new(target.ipv4, 8080),
            "getpeername shows the proxy, not the dialled address"
        );
        // …the server got the connection at exactly that address…
        assert_eq!(
            conn.server_local,
            SocketAddr::new(target.ipv4, 8080),
            "original destination lost"
        );
        // …from the client pod's own address, through the destination's inbound proxy.
        assert_eq!(
            conn.server_peer.ip(),
            a.ipv4,
            "client address not preserved"
        );
        assert_eq!(conn.echoed, 100_000);
        srv.drain();
    }
    let node1 = &w.agents[&1];
    node1.wait_access(2, |l| l["direction"] == "outbound");
    w.agents[&2].wait_access(1, |l| l["direction"] == "inbound");
    let outbound: Vec<_> = node1
        .access_log()
        .into_iter()
        .filter(|l| l["direction"] == "outbound")
        .collect();
    assert!(
        outbound.iter().any(|l| l["orig_dst"] == addr(b.ipv4, 8080)),
        "no outbound log for a → b: {outbound:?}"
    );
    assert!(
        outbound.iter().any(|l| l["orig_dst"] == addr(c.ipv4, 8080)),
        "no outbound log for a → c: {outbound:?}"
    );
    let inbound_c = w.agents[&2]
        .access_log()
        .into_iter()
        .filter(|l| l["direction"] == "inbound")
        .count();
    assert_eq!(
        inbound_c, 1,
        "node 2 should have steered exactly one inbound connection to c"
    );
}

#[test]
fn capture_recovers_ipv6_and_v4_mapped_destinations() {
    let mut w = mesh_world("");
    let _b = w.serve("b", "[::]:8080");
    let _c = w.serve("c", "[::]:8080");
    let (a, b, c) = (w.pod("a").clone(), w.pod("b").clone(), w.pod("c").clone());
    for target in [&b, &c] {
        let conn = w.connect("a", &addr(target.ipv6, 8080), 50_000);
        assert!(
            conn.captured(),
            "IPv6 a → {}: not captured: {conn:?}",
            target.name
        );
        assert_eq!(conn.server_local, SocketAddr::new(target.ipv6, 8080));
        assert_eq!(conn.server_peer.ip(), a.ipv6);
        assert_eq!(
            conn.peer,
            SocketAddr::new(target.ipv6, 8080),
            "getpeername6 shows the proxy, not the dialled address"
        );
    }
    // A dual-stack socket dialling an IPv4 address travels as IPv4 and is captured as such.
    let mapped = format!("[::ffff:{}]:8080", b.ipv4);
    let conn = w.connect("a", &mapped, 10_000);
    assert!(conn.captured(), "v4-mapped connect not captured: {conn:?}");
    assert_eq!(
        conn.peer.to_string(),
        mapped,
        "getpeername6 of a v4-mapped connect shows the proxy"
    );
    let local = match conn.server_local.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    assert_eq!(local, b.ipv4);
}

#[test]
fn capture_inbound_preserves_client_address() {
    let mut w = mesh_world("");
    let srv = w.serve("b", "0.0.0.0:8080");
    let (outside, b) = (w.pod("outside").clone(), w.pod("b").clone());
    let conn = w.connect("outside", &addr(b.ipv4, 8080), 10_000);
    assert!(
        !conn.captured(),
        "a pod outside the mesh was captured: {conn:?}"
    );
    let (peer, local) = srv.accepted();
    assert_eq!(local, SocketAddr::new(b.ipv4, 8080));
    assert_eq!(
        peer.ip(),
        outside.ipv4,
        "the application must see the real client address"
    );
    // The source port differs: the connection the application accepted is the proxy's.
    assert_ne!(
        peer.port(),
        conn.local.port(),
        "inbound connection was not steered through the proxy"
    );
    w.agents[&1].wait_access(1, |l| l["direction"] == "inbound");
    let inbound: Vec<_> = w.agents[&1]
        .access_log()
        .into_iter()
        .filter(|l| l["direction"] == "inbound")
        .collect();
    assert!(
        inbound
            .iter()
            .any(|l| l["src.addr"] == conn.local.to_string() && l["dst.addr"] == addr(b.ipv4, 8080)),
        "no inbound access log naming the client: {inbound:?}"
    );
}

#[test]
fn capture_leaves_pods_outside_the_mesh_alone() {
    let mut w = mesh_world("");
    let srv = w.serve("plain", "0.0.0.0:8080");
    let _o = w.serve("optout", "0.0.0.0:8080");
    let (plain, optout) = (w.pod("plain").clone(), w.pod("optout").clone());
    // Between pods outside the mesh: untouched both ways (same source port end to end).
    let conn = w.connect("outside", &addr(plain.ipv4, 8080), 1000);
    assert!(!conn.captured());
    let (peer, _) = srv.accepted();
    assert_eq!(
        peer, conn.local,
        "traffic between non-mesh pods was proxied"
    );
    // A pod labelled out of a mesh namespace neither captures nor is steered.
    let conn = w.connect("optout", &addr(plain.ipv4, 8080), 1000);
    assert!(!conn.captured(), "opted-out pod captured");
    let conn = w.connect("outside", &addr(optout.ipv4, 8080), 1000);
    assert_eq!(
        conn.server_peer, conn.local,
        "opted-out pod's inbound was steered"
    );
}

#[test]
fn capture_skips_excluded_ports_and_cidrs() {
    let mut w =
        mesh_world("  capture:\n    excludedPorts: [9000]\n    excludedCidrs: [10.0.2.0/24]\n");
    let _b9 = w.serve("b", "0.0.0.0:9000");
    let _c = w.serve("c", "0.0.0.0:8080");
    let (b, c) = (w.pod("b").clone(), w.pod("c").clone());
    let conn = w.connect("a", &addr(b.ipv4, 9000), 1000);
    assert!(!conn.captured(), "excluded port captured outbound");
    assert_eq!(
        conn.server_peer, conn.local,
        "excluded port steered inbound"
    );
    // An excluded CIDR is left alone on the way out; the destination still steers its inbound.
    let conn = w.connect("a", &addr(c.ipv4, 8080), 1000);
    assert!(!conn.captured(), "excluded CIDR captured");
    assert_eq!(conn.server_peer.ip(), w.pod("a").ipv4);
    assert_ne!(
        conn.server_peer.port(),
        conn.local.port(),
        "inbound to c should still be steered"
    );
    // Loopback is never captured.
    let _l = w.serve("a", "127.0.0.1:7070");
    let conn = w.connect("a", "127.0.0.1:7070", 1000);
    assert_eq!(
        conn.server_peer, conn.local,
        "loopback connect was captured"
    );
}

#[test]
fn capture_has_no_loop() {
    let mut w = mesh_world("");
    let _b = w.serve("b", "0.0.0.0:8080");
    let _a = w.serve("a", "0.0.0.0:8081");
    let (a, b) = (w.pod("a").clone(), w.pod("b").clone());
    const N: usize = 5;
    for _ in 0..N {
        let conn = w.connect("a", &addr(b.ipv4, 8080), 20_000);
        assert!(conn.captured());
    }
    // A pod dialling its own address still reaches its own application.
    let own = w.connect("a", &addr(a.ipv4, 8081), 1000);
    assert_eq!(own.server_local, SocketAddr::new(a.ipv4, 8081));
    let dst_b = addr(b.ipv4, 8080);
    w.agents[&1].wait_access(N, |l| {
        l["direction"] == "outbound" && l["orig_dst"] == dst_b
    });
    w.agents[&1].wait_access(N, |l| l["direction"] == "inbound" && l["dst.addr"] == dst_b);
    let log = w.agents[&1].access_log();
    let count = |dir: &str, key: &str, want: String| {
        log.iter()
            .filter(|l| l["direction"] == dir && l[key] == want)
            .count()
    };
    // Each connection is proxied exactly once in each direction: no re-capture of the
    // proxy's own sockets.
    assert_eq!(count("outbound", "orig_dst", addr(b.ipv4, 8080)), N);
    assert_eq!(count("inbound", "dst.addr", addr(b.ipv4, 8080)), N);
}

#[test]
fn capture_survives_agent_restart_without_duplicates() {
    let mut w = mesh_world("");
    let _c = w.serve("c", "0.0.0.0:8080");
    let (a, c) = (w.pod("a").clone(), w.pod("c").clone());
    assert!(w.connect("a", &addr(c.ipv4, 8080), 1000).captured());
    let cgroup = w.node_cgroup(1);
    let attached = |w: &World| {
        let mut p = bpf::cgroup_programs(&w.node_cgroup(1));
        p.sort();
        p
    };
    let before = attached(&w);
    assert_eq!(
        before.len(),
        5,
        "expected connect4, connect6, getpeername4, getpeername6 and sock_ops on {}: {before:?}",
        cgroup.display()
    );
    assert_eq!(bpf::sk_lookup_links(&a.netns_path()), 1);

    // A clean restart, then a crash and restart: pinned state is adopted each time.
    w.start_agent(1, "");
    assert!(
        w.connect("a", &addr(c.ipv4, 8080), 1000).captured(),
        "capture lost after restart"
    );
    w.agents.get_mut(&1).expect("agent").kill();
    w.start_agent(1, "");
    let conn = w.connect("a", &addr(c.ipv4, 8080), 1000);
    assert!(conn.captured(), "capture lost after a crash");
    assert_eq!(conn.server_local, SocketAddr::new(c.ipv4, 8080));
    assert_eq!(
        attached(&w),
        before,
        "attachments duplicated or lost across restarts"
    );
    assert_eq!(
        bpf::sk_lookup_links(&a.netns_path()),
        1,
        "sk_lookup link duplicated or lost"
    );
}

#[test]
fn capture_removed_pod_leaves_no_map_entries() {
    let mut w = mesh_world("");
    let _b = w.serve("b", "0.0.0.0:8080");
    let (a, b) = (w.pod("a").clone(), w.pod("b").clone());
    assert!(w.connect("a", &addr(b.ipv4, 8080), 1000).captured());
    let cookie = sluice::netns::Netns::open(&a.netns_path())
        .expect("netns")
        .cookie();
    let maps = w.pin_dir(1).join("maps");
    let mentions_a = |w: &World| -> Vec<String> {
        let _ = w;
        let mut found = Vec::new();
        for (k, _) in bpf::map_entries(&maps.join("sluice_enrolled")) {
            if bpf::u64_at(&k, 0) == cookie {
                found.push("sluice_enrolled".into());
            }
        }
        for (_, v) in bpf::map_entries(&maps.join("sluice_pod_ips")) {
            if bpf::u64_at(&v, 0) == cookie {
                found.push("sluice_pod_ips".into());
            }
        }
        for (k, _) in bpf::map_entries(&maps.join("sluice_orig_peer")) {
            if bpf::u64_at(&k, 0) == cookie {
                found.push("sluice_orig_peer".into());
            }
        }
        // Both hold the original destination, whose netns cookie is at offset 32. A closed
        // socket's `sluice_peer_name` entry goes with its close.
        for name in ["sluice_orig_ck", "sluice_peer_name"] {
            for (_, v) in bpf::map_entries(&maps.join(name)) {
                if bpf::u64_at(&v, 32) == cookie {
                    found.push(name.into());
                }
            }
        }
        found
    };
    let before = mentions_a(&w);
    assert!(
        before.contains(&"sluice_enrolled".to_string()),
        "a should be enrolled before removal"
    );
    // The connection above is closed: getpeername's record of it went with the close.
    assert!(
        !before.contains(&"sluice_peer_name".to_string()),
        "a closed socket's sluice_peer_name entry remains: {before:?}"
    );
    w.unenroll("a");
    assert_eq!(
        mentions_a(&w),
        Vec::<String>::new(),
        "entries of a removed pod remain"
    );
    assert_eq!(
        bpf::sk_lookup_links(&a.netns_path()),
        0,
        "sk_lookup link of a removed pod remains"
    );
    assert!(
        !w.connect("a", &addr(b.ipv4, 8080), 1000).captured(),
        "a removed pod is still captured"
    );
    // Its neighbour is untouched.
    assert!(w.connect("b", &addr(b.ipv4, 8080), 1000).captured());
    // Removing twice is harmless.
    w.unenroll("a");
}

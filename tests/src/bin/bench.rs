//! `cargo xtask bench [capture|mesh]`: Sluice measured side by side with the direct path in one
//! run, on this machine, inside namespaces it creates and removes.
//!
//! Every figure is printed in a table and every ratio also as `ratio <name> <value>` (Sluice's
//! figure divided by the other), for scripts.
use std::net::SocketAddr;

use sluice_tests::world::{PodSpec, World, ip};

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn samples(w: &World, pod: &str, addr: &str, count: usize) -> Vec<u64> {
    let v = w.run_in(pod, &["latency", addr, &count.to_string()]);
    if v.get("error").is_some() {
        let logs: Vec<String> = w.agents.values().map(|a| a.tail()).collect();
        panic!(
            "latency from {pod} to {addr}: {v}\nagent log:\n{}",
            logs.join("\n")
        );
    }
    v["samples_us"]
        .as_array()
        .expect("samples")
        .iter()
        .filter_map(|x| x.as_u64())
        .collect()
}

fn main() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    match which.as_str() {
        "capture" => capture(),
        "mesh" => mesh(),
        "all" => {
            capture();
            mesh();
        }
        other => {
            eprintln!("unknown benchmark {other:?}: capture | mesh | all");
            std::process::exit(2);
        }
    }
}

/// Connect + first byte, three ways to the same server: direct (a pod outside the mesh),
/// captured by Sluice's eBPF programs, and captured by an iptables REDIRECT rule into the same
/// proxy listener. Rounds are interleaved so drift on a shared machine hits all three alike.
fn capture() {
    const ROUNDS: usize = 5;
    const PER_ROUND: usize = 400;
    let mut w = World::build(
        1,
        &[
            PodSpec::new("ebpf", "mesh", 1),
            PodSpec::new("ipt", "mesh", 1),
            PodSpec::new("direct", "plain", 1),
            PodSpec::new("srv", "plain", 1),
        ],
    );
    w.namespace("mesh", &[("istio.io/dataplane-mode", "ambient")]);
    w.namespace("plain", &[]);
    // Port 8081 is left to iptables: the eBPF programs skip it, a REDIRECT rule takes it (as a
    // sidecar mesh would, sparing the proxy's own marked sockets).
    w.start_agent(1, "  capture:\n    excludedOutboundPorts: [8081]\n");
    for pod in ["ebpf", "ipt", "direct", "srv"] {
        w.enroll(pod);
    }
    let srv = w.pod("srv").ipv4;
    let ipt_ns = w.pod("ipt").netns.clone();
    ip(
        None,
        &format!(
            "netns exec {ipt_ns} iptables -t nat -A OUTPUT -p tcp -d {srv} --dport 8081 -m mark ! --mark 0x539 -j REDIRECT --to-ports 15001"
        ),
    );
    let _s1 = w.serve("srv", "0.0.0.0:8080");
    let _s2 = w.serve("srv", "0.0.0.0:8081");
    let a8080 = SocketAddr::new(srv, 8080).to_string();
    let a8081 = SocketAddr::new(srv, 8081).to_string();
    let modes: [(&str, &str, &str); 3] = [
        ("direct", "direct", &a8080),
        ("sluice-ebpf", "ebpf", &a8080),
        ("iptables", "ipt", &a8081),
    ];
    // Warm up each path, and check the two captured ones really are captured.
    for (_, pod, addr) in modes {
        samples(&w, pod, addr, 100);
    }
    let log = w.agents[&1].access_log();
    let through_proxy = |port: &str| {
        log.iter()
            .filter(|l| l["orig_dst"].as_str().is_some_and(|d| d.ends_with(port)))
            .count()
    };
    assert!(
        through_proxy(":8080") >= 100 && through_proxy(":8081") >= 100,
        "capture paths did not go through the proxy"
    );

    let mut all: Vec<Vec<u64>> = vec![Vec::new(); 3];
    for _ in 0..ROUNDS {
        for (i, (_, pod, addr)) in modes.iter().enumerate() {
            all[i].extend(samples(&w, pod, addr, PER_ROUND));
        }
    }
    let mut stats = Vec::new();
    println!(
        "\ncapture: connect + first byte, {} connections per path ({ROUNDS} interleaved rounds)",
        ROUNDS * PER_ROUND
    );
    println!("{:<14} {:>10} {:>10}", "path", "p50 µs", "p99 µs");
    for (i, (name, _, _)) in modes.iter().enumerate() {
        let mut s = std::mem::take(&mut all[i]);
        s.sort_unstable();
        let (p50, p99) = (percentile(&s, 0.50), percentile(&s, 0.99));
        println!("{name:<14} {p50:>10} {p99:>10}");
        stats.push((p50 as f64, p99 as f64));
    }
    let (direct, ebpf, ipt) = (stats[0], stats[1], stats[2]);
    println!("ratio capture_vs_direct_p50 {:.2}", ebpf.0 / direct.0);
    println!("ratio capture_vs_iptables_p50 {:.2}", ebpf.0 / ipt.0);
    println!("ratio capture_vs_iptables_p99 {:.2}", ebpf.1 / ipt.1);
}

/// Through the mesh (HBONE between two node proxies) vs direct: lands with issue 3.
fn mesh() {
    eprintln!("bench mesh: not available yet — it needs the HBONE data path (issue 3)");
    std::process::exit(1);
}

//! `cargo xtask demo`: a two-node, three-pod world with real agents, some traffic, and an
//! explanation of what Sluice did with it. Everything it builds is removed when it ends.
use std::{net::SocketAddr, process::Command};

use sluice_tests::world::{PodSpec, World};

fn say(s: &str) {
    println!("{s}");
}

fn bpftool(args: &[&str]) -> String {
    Command::new("bpftool")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("(bpftool failed: {e})"))
}

fn main() {
    say("Sluice demo: two nodes, three pods, real eBPF capture.\n");
    let mut w = World::build(
        2,
        &[
            PodSpec::new("web", "shop", 1),
            PodSpec::new("legacy", "old", 1),
            PodSpec::new("api", "shop", 2),
        ],
    );
    w.namespace("shop", &[("istio.io/dataplane-mode", "ambient")]);
    w.namespace("old", &[]);
    let (web, legacy, api) = (
        w.pod("web").clone(),
        w.pod("legacy").clone(),
        w.pod("api").clone(),
    );
    say("The world:");
    for p in [&web, &legacy, &api] {
        let mesh = if p.namespace == "shop" {
            "in the mesh (namespace labelled istio.io/dataplane-mode=ambient)"
        } else {
            "outside the mesh"
        };
        say(&format!(
            "  pod {}/{} on node{} at {} and {}, {mesh}",
            p.namespace, p.name, p.node, p.ipv4, p.ipv6
        ));
    }
    w.start_agent(1, "");
    w.start_agent(2, "");
    say(
        "\nAgents started on node1 and node2 (`sluice run --config …`, one per node network namespace).",
    );
    for p in ["web", "legacy", "api"] {
        let captured = w.enroll(p);
        say(&format!(
            "  CNI ADD for {p}: {}",
            if captured {
                "captured"
            } else {
                "known, not captured (not in the mesh)"
            }
        ));
    }
    let _api = w.serve("api", "0.0.0.0:8080");
    let _legacy = w.serve("legacy", "[::]:8080");

    say("\n1. web → api (different nodes), http-like echo on port 8080:");
    explain(
        &w.connect(
            "web",
            &SocketAddr::new(api.ipv4, 8080).to_string(),
            64 * 1024,
        ),
        "web",
        "api",
        true,
    );
    say("\n2. legacy (outside the mesh) → api:");
    explain(
        &w.connect("legacy", &SocketAddr::new(api.ipv4, 8080).to_string(), 1024),
        "legacy",
        "api",
        true,
    );
    say("\n3. web → legacy (destination outside the mesh), over IPv6:");
    explain(
        &w.connect("web", &SocketAddr::new(legacy.ipv6, 8080).to_string(), 1024),
        "web",
        "legacy",
        false,
    );

    say("\nWhat the agents logged (access log, one line per proxied connection):");
    for (node, agent) in &w.agents {
        for l in agent.access_log() {
            say(&format!(
                "  node{node}: {:8} {}/{} {}→{} bytes_sent={} bytes_recv={} outcome={}",
                l["direction"].as_str().unwrap_or(""),
                l["src.namespace"].as_str().unwrap_or(""),
                l["src.workload"].as_str().unwrap_or(""),
                l["src.addr"].as_str().unwrap_or(""),
                l["dst.addr"].as_str().unwrap_or(""),
                l["bytes_sent"],
                l["bytes_recv"],
                l["outcome"].as_str().unwrap_or("")
            ));
        }
    }

    say("\nThe kernel side, as bpftool shows it:");
    say(&format!(
        "  programs attached to node1's pod cgroup {}:",
        w.node_cgroup(1).display()
    ));
    for line in bpftool(&["cgroup", "show", &w.node_cgroup(1).to_string_lossy()]).lines() {
        say(&format!("    {line}"));
    }
    let pins = w.pin_dir(1);
    say(&format!("  pinned objects under {}:", pins.display()));
    for sub in ["progs", "links", "maps"] {
        let names: Vec<String> = std::fs::read_dir(pins.join(sub))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        say(&format!("    {sub}/: {}", names.join(" ")));
    }
    say(
        "  `bpftool map dump pinned …/maps/sluice_enrolled` (network-namespace cookies of captured pods):",
    );
    for line in bpftool(&[
        "map",
        "dump",
        "pinned",
        &pins.join("maps/sluice_enrolled").to_string_lossy(),
    ])
    .lines()
    {
        say(&format!("    {line}"));
    }
    say("\nCleaning up (namespaces, cgroups, pins, processes).");
    drop(w);
    say("Done.");
}

fn explain(c: &sluice_tests::world::Conn, from: &str, to: &str, to_in_mesh: bool) {
    if c.captured() {
        say(&format!(
            "   {from}'s socket was rewritten by sluice_connect4/6 to the proxy's loopback listener (its own address became {}); sluice_getpeer4/6 still show it {} as its peer.",
            c.local, c.peer
        ));
        say(&format!(
            "   The proxy recovered the original destination {} and connected there.",
            c.server_local
        ));
    } else {
        say(&format!(
            "   {from}'s connect was not captured: it left from {} straight to {}.",
            c.local, c.peer
        ));
    }
    if to_in_mesh {
        say(&format!(
            "   At {to}, sluice_sk_lookup handed the connection to the proxy, which connected on to the app from the client's address: the app saw {} dial {}.",
            c.server_peer, c.server_local
        ));
    } else {
        say(&format!(
            "   {to} is not in the mesh: its app saw {} directly.",
            c.server_peer
        ));
    }
    say(&format!(
        "   {} bytes went out and came back intact.",
        c.echoed
    ));
}

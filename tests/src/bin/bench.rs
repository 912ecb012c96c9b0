//! `cargo xtask bench [capture|mesh|egress|scale|ingress|upgrade]`: Sluice measured side by side with the direct path in one
//! run, on this machine, inside namespaces it creates and removes.
//!
//! Every figure is printed in a table and every ratio also as `ratio <name> <value>` (Sluice's
//! figure divided by the other), for scripts.
use std::net::{IpAddr, SocketAddr};

use sluice_tests::world::{PodSpec, World, ip, testpod_bin};

#[path = "bench/haproxy.rs"]
mod haproxy;
#[path = "bench/ingress.rs"]
mod ingress;

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// `latency` samples: connect + the server's first byte, or with `request`, connect + a byte
/// sent by the client and echoed.
fn samples_mode(w: &World, pod: &str, addr: &str, count: usize, request: bool) -> Vec<u64> {
    let count = count.to_string();
    let mut args = vec!["latency", addr, &count];
    if request {
        args.push("request");
    }
    let v = w.run_in(pod, &args);
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

fn samples(w: &World, pod: &str, addr: &str, count: usize) -> Vec<u64> {
    samples_mode(w, pod, addr, count, false)
}

fn main() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    match which.as_str() {
        "capture" => capture(),
        "mesh" => mesh(),
        "egress" => egress(),
        "scale" => scale(),
        "ingress" => ingress::run(),
        "upgrade" => upgrade(),
        "scale-state" => {
            scale_in_process(&sluice_tests::scale::Size::CLUSTER);
        }
        "scale-memory" => scale_memory(),
        "all" => {
            capture();
            mesh();
            egress();
            scale();
            ingress::run();
            upgrade();
        }
        other => {
            eprintln!(
                "unknown benchmark {other:?}: capture | mesh | egress | scale | ingress | upgrade | all \
                 (and scale-state, scale-memory: the in-process parts of scale)"
            );
            std::process::exit(2);
        }
    }
}

/// Node 1's agent upgraded (a second process takes its listeners over, the first drains) in the
/// middle of the upgrade tests' load: 20 long transfers and 100 short connections a second,
/// every byte checked. Prints the failed connections and the connect-latency p99 while the new
/// agent takes over (to two seconds after it is ready) against steady state before.
fn upgrade() {
    use sluice_tests::upgrade_world::{Load, SECONDS, flows, serve, summarize, unix_ms, world};
    let mut w = world("");
    let _servers = serve(&mut w);
    let load = Load::start(&w, &flows(&w), SECONDS);
    std::thread::sleep(std::time::Duration::from_secs(4));
    let t0 = unix_ms();
    let mut old = w.upgrade_agent(1);
    let t1 = unix_ms();
    let reports = load.finish();
    let summary = summarize("upgrade under load", &reports, (t0, t1));
    let drained = old.wait_exit(std::time::Duration::from_secs(40));
    println!("old agent exited: {drained:?}");
    println!("upgrade_failed_connections {}", summary.failed);
    println!("ratio upgrade_p99_vs_steady {:.2}", summary.ratio());
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

/// Client processes' JSON result; panics with the agents' log tails on `{"error":..}`.
fn run_ok(w: &World, pod: &str, args: &[&str]) -> serde_json::Value {
    let v = w.run_in(pod, args);
    if v.get("error").is_some() {
        let logs: Vec<String> = w.agents.values().map(|a| a.tail()).collect();
        panic!("{args:?} in {pod}: {v}\nagent log:\n{}", logs.join("\n"));
    }
    v
}

/// `rr ADDR SIZE COUNT` samples (µs per round trip on one connection).
fn rr_samples(w: &World, pod: &str, addr: &str, size: usize, count: usize) -> Vec<u64> {
    run_ok(w, pod, &["rr", addr, &size.to_string(), &count.to_string()])["samples_us"]
        .as_array()
        .expect("samples")
        .iter()
        .filter_map(|x| x.as_u64())
        .collect()
}

/// Bulk throughput from a pod to a server on the simulated internet: straight out (ALLOW_ANY,
/// routed by the nodes' kernels) against pinned to a static egress prefix (HBONE to the gateway
/// node's agent, then TCP from an address of the prefix). Interleaved, best of three 3 s runs.
fn egress() {
    use sluice_tests::{
        egress_world::{Egress, PINNED_PREFIX, SGC_ANNOTATION, prefix_addresses, sgc, wait_until},
        internet::SERVERS,
    };
    use std::time::Duration;

    const RUNS: usize = 3;
    let e = Egress::build(
        &[
            PodSpec::new("direct", "shop", 1),
            PodSpec::new("pinned", "shop", 1).annotate(SGC_ANNOTATION, "pinned"),
        ],
        &sgc("pinned", None),
        &[],
    );
    let ns = e.node_ns();
    let prefix = PINNED_PREFIX.parse().expect("prefix");
    wait_until(Duration::from_secs(10), "the prefix pinned", || {
        !prefix_addresses(&ns, prefix).is_empty()
    });
    let sink_addr = SocketAddr::from((SERVERS[0], 9000)).to_string();
    let mut sink = std::process::Command::new("ip")
        .args(["netns", "exec", &e.net.netns])
        .arg(testpod_bin())
        .args(["sink", &sink_addr])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sink");
    std::thread::sleep(Duration::from_millis(500));
    let mut best = [0.0f64; 2];
    for _ in 0..RUNS {
        for (i, pod) in ["direct", "pinned"].iter().enumerate() {
            let v = run_ok(&e.w, pod, &["bulk", &sink_addr, "3", "1"]);
            best[i] = best[i].max(v["bytes_per_s"].as_f64().unwrap_or(0.0));
        }
    }
    let _ = sink.kill();
    let _ = sink.wait();
    // The pinned path must really have left through the gateway, from the prefix.
    let through = e.w.agents[&2].wait_access(1, |l| {
        l["direction"] == "egress_gateway"
            && l["outcome"] == "ok"
            && l["bind"]
                .as_str()
                .and_then(|b| b.parse().ok())
                .is_some_and(|ip: std::net::IpAddr| prefix.contains(&ip))
    });
    assert!(
        through >= 1,
        "no connection left through the gateway from {PINNED_PREFIX}: {:?}",
        e.w.agents[&2].access_log()
    );
    let mbps = |b: f64| b * 8.0 / 1e6;
    println!("\negress: pod on node 1 → server on the simulated internet behind node 2");
    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "figure", "direct", "pinned", "ratio"
    );
    let ratio = best[1] / best[0].max(1.0);
    println!(
        "{:<34} {:>12.1} {:>12.1} {:>8.2}",
        "bulk 1 stream (Mbit/s)",
        mbps(best[0]),
        mbps(best[1]),
        ratio
    );
    println!(
        "(best of {RUNS} interleaved 3 s runs; pinned = HBONE to the gateway agent, TCP from {PINNED_PREFIX})"
    );
    println!("ratio egress_pinned_vs_direct {ratio:.2}");
}

/// CPU cost of one full mutual TLS handshake with the agents' own configurations (ECDSA P-256
/// certificates both ways), both sides together, in µs: `rounds` handshakes between in-memory
/// rustls connections on this thread. The floor under the handshake-bound connection rate.
fn handshake_cpu_us(rounds: u32) -> f64 {
    use std::time::{Duration, SystemTime};

    use rustls::{ClientConnection, ServerConnection, pki_types::ServerName};
    use sluice::identity::{BuiltinCa, CertHandle, CustomCert, client_config, server_config};

    let ca = BuiltinCa::generate("cluster.local").expect("CA");
    let now = SystemTime::now();
    let cert = |id: &str| {
        CertHandle::fixed(
            ca.issue_custom(&CustomCert {
                identity: id.parse().expect("identity"),
                not_before: now - Duration::from_secs(3600),
                not_after: now + Duration::from_secs(3600),
            })
            .expect("certificate"),
        )
    };
    let server_id = "spiffe://cluster.local/ns/bench/sa/server";
    let server = std::sync::Arc::new(server_config(cert(server_id)).expect("server config"));
    let client = std::sync::Arc::new(
        client_config(
            cert("spiffe://cluster.local/ns/bench/sa/client"),
            vec![server_id.parse().expect("identity")],
        )
        .expect("client config"),
    );
    let name = ServerName::IpAddress(std::net::IpAddr::from([10, 0, 0, 1]).into());
    let started = std::time::Instant::now();
    for _ in 0..rounds {
        let mut c = ClientConnection::new(client.clone(), name.clone()).expect("client");
        let mut s = ServerConnection::new(server.clone()).expect("server");
        let mut wire = Vec::new();
        while c.is_handshaking() || s.is_handshaking() {
            wire.clear();
            while c.wants_write() {
                c.write_tls(&mut wire).expect("client writes");
            }
            let mut flight = wire.as_slice();
            while !flight.is_empty() {
                s.read_tls(&mut flight).expect("server reads");
                s.process_new_packets().expect("server handshake");
            }
            wire.clear();
            while s.wants_write() {
                s.write_tls(&mut wire).expect("server writes");
            }
            let mut flight = wire.as_slice();
            while !flight.is_empty() {
                c.read_tls(&mut flight).expect("client reads");
                c.process_new_packets().expect("client handshake");
            }
        }
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds)
}

/// `sluice-testpod sink ADDR` in a pod; killed when dropped.
struct Sink(std::process::Child);

impl Sink {
    fn start(w: &World, pod: &str, addr: &str) -> Sink {
        use std::io::BufRead;
        let mut child = w
            .pod(pod)
            .command(testpod_bin())
            .args(["sink", addr])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start sink");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        assert!(line.contains("listening"), "sink in {pod}: {line:?}");
        Sink(child)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// User + system CPU seconds of a process so far (`/proc/<pid>/stat`).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

/// Resident memory of a process in MiB (`VmRSS` in `/proc/<pid>/status`).
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn agents_cpu(w: &World) -> f64 {
    w.agents
        .values()
        .filter_map(|a| a.pid())
        .map(cpu_seconds)
        .sum()
}

/// `sluice_hbone_handshakes_total` on node `i`'s agent (its `/metrics` on 15020): TLS handshakes
/// its HBONE pools completed.
fn handshakes(w: &World, i: usize) -> u64 {
    let (status, body) = w.node_http_get(i, 15020, "/metrics");
    assert!(status.contains("200"), "node {i} /metrics: {status}");
    body.lines()
        .find_map(|l| l.strip_prefix("sluice_hbone_handshakes_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("node {i} /metrics has no sluice_hbone_handshakes_total"))
}

/// `bulk ADDR SECONDS 1` from each of `pods` at once (one connection per pod); total bytes and
/// bytes per second.
fn bulk_parallel(w: &World, pods: &[&str], addr: &str, secs: &str) -> (f64, f64) {
    let children: Vec<_> = pods
        .iter()
        .map(|pod| {
            w.pod(pod)
                .command(testpod_bin())
                .args(["bulk", addr, secs, "1"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("start bulk")
        })
        .collect();
    let (mut bytes, mut rate) = (0.0, 0.0);
    for (pod, child) in pods.iter().zip(children) {
        let out = child.wait_with_output().expect("bulk output");
        let text = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("bulk in {pod} printed {text:?}: {e}"));
        if v.get("error").is_some() {
            let logs: Vec<String> = w.agents.values().map(|a| a.tail()).collect();
            panic!("bulk in {pod}: {v}\nagent log:\n{}", logs.join("\n"));
        }
        bytes += v["bytes"].as_f64().unwrap_or(0.0);
        rate += v["bytes_per_s"].as_f64().unwrap_or(0.0);
    }
    (bytes, rate)
}

/// Through the mesh vs direct, across two nodes: a captured client pod talks to a server pod on
/// the other node (outbound proxy → HBONE mutual TLS → inbound proxy → server); the direct
/// pair uses the same veth path with no proxy. Rounds alternate the two paths.
/// The ClusterIP of the mesh benchmark's Service in front of m2.
const SERVICE_VIP: &str = "10.96.50.1";

fn mesh() {
    // For profiling one figure: `SLUICE_BENCH_HANDSHAKE_PODS=200` (default 24).
    let handshake_pods: usize = std::env::var("SLUICE_BENCH_HANDSHAKE_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    // For profiling: `SLUICE_BENCH_ONLY=bulk,rr,conn,handshake,fanout` runs only those parts (the
    // others print as 0).
    let only = std::env::var("SLUICE_BENCH_ONLY").unwrap_or_default();
    let part = |name: &str| only.is_empty() || only.split(',').any(|p| p.trim() == name);
    const BULK_SECONDS: &str = "3";
    const ROUNDS: usize = 3;
    let started = std::time::Instant::now();
    let load_start = loadavg();
    // The peers: HAProxy is required (the bench fails without it); ztunnel is not driven yet.
    let hap_version = haproxy::require_haproxy();
    let ztunnel_note = match std::env::var_os("SLUICE_BENCH_ZTUNNEL") {
        Some(bin) => panic!(
            "SLUICE_BENCH_ZTUNNEL={bin:?} is set, but this bench cannot drive ztunnel yet \
             (issue 22): unset it to run the other figures"
        ),
        None => "SLUICE_BENCH_ZTUNNEL is not set; the bench does not drive ztunnel yet",
    };
    // Four client pods per path for the 4-stream bulk: four independent connections, as four
    // workloads would make (one pod's streams to one peer share one pooled HBONE connection).
    let mesh_clients = ["m1", "m1b", "m1c", "m1d"];
    let direct_clients = ["d1", "d1b", "d1c", "d1d"];
    let mut pods = vec![
        PodSpec::new("m2", "mesh", 2).label("app", "m2"),
        PodSpec::new("w2", "mesh", 2),
        PodSpec::new("d2", "plain", 2),
    ];
    pods.extend(mesh_clients.iter().map(|p| PodSpec::new(p, "mesh", 1)));
    pods.extend(direct_clients.iter().map(|p| PodSpec::new(p, "plain", 1)));
    let hs: Vec<String> = (0..handshake_pods).map(|i| format!("h{i}")).collect();
    pods.extend(hs.iter().map(|h| PodSpec::new(h, "mesh", 1)));
    let mut w = World::build(2, &pods);
    w.namespace("mesh", &[("istio.io/dataplane-mode", "ambient")]);
    w.namespace("plain", &[]);
    // A ClusterIP whose one endpoint is m2: the pooled connection rate through it is measured
    // next to the one to m2's pod IP.
    w.extra_resources = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: m2, namespace: mesh}}\n\
         spec: {{clusterIP: {SERVICE_VIP}, selector: {{app: m2}}, ports: [{{port: 8080}}]}}\n"
    );
    w.start_agent(1, "");
    w.start_agent(2, "");
    for p in &pods {
        w.enroll(&p.name);
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    let rss: Vec<f64> = w
        .agents
        .values()
        .filter_map(|a| a.pid())
        .map(rss_mib)
        .collect();
    let rss_idle = rss.iter().copied().fold(0.0, f64::max);

    let (m2, d2, w2) = (w.pod("m2").ipv4, w.pod("d2").ipv4, w.pod("w2").ipv4);
    let _servers = [
        w.serve("m2", "0.0.0.0:8080"),
        w.serve("d2", "0.0.0.0:8080"),
        w.serve("w2", "0.0.0.0:8080"),
    ];
    let _sinks = [
        Sink::start(&w, "m2", "0.0.0.0:9000"),
        Sink::start(&w, "d2", "0.0.0.0:9000"),
    ];
    let echo = |ip| SocketAddr::new(ip, 8080).to_string();
    let sink = |ip| SocketAddr::new(ip, 9000).to_string();

    // The peer: HAProxy as a mutual-TLS tunnel between the same two nodes, to the same server
    // pod as the direct path (d2), from the same client pods.
    let hap = haproxy::HaproxyPeer::start(&w, d2);
    hap.check_mtls(&w);
    // (name, client pod, the 4-stream client pods, echo address, sink address)
    let paths: [(&str, &str, &[&str], String, String); 3] = [
        ("direct", "d1", &direct_clients, echo(d2), sink(d2)),
        ("sluice", "m1", &mesh_clients, echo(m2), sink(m2)),
        ("haproxy", "d1", &direct_clients, hap.echo(), hap.sink()),
    ];

    // Check the paths are what they claim: the mesh pair captured and carried over HBONE.
    let c = w.connect("m1", &echo(m2), 10_000);
    assert!(c.captured(), "m1 → m2 was not captured");
    let hbone =
        w.agents[&1].wait_access(1, |l| l["direction"] == "outbound" && l["route"] == "hbone");
    assert!(hbone >= 1, "m1 → m2 did not go over HBONE");
    let c = w.connect("d1", &echo(d2), 10_000);
    assert!(!c.captured(), "d1 → d2 was captured");
    let service = format!("{SERVICE_VIP}:8080");
    let c = w.connect("m1", &service, 10_000);
    assert_eq!(c.server_local.ip(), m2, "the ClusterIP did not reach m2");
    let via_service = w.agents[&1].wait_access(1, |l| {
        l["route"] == "hbone" && l["dst.service"] == "m2.mesh.svc.cluster.local"
    });
    assert!(
        via_service >= 1,
        "m1 → ClusterIP did not go over HBONE to m2"
    );
    // Through HAProxy, d2 sees node 2's haproxy as its client (node 2's address on its veth).
    let c = w.connect("d1", &hap.echo(), 10_000);
    assert_eq!(
        c.server_local.ip(),
        d2,
        "the HAProxy tunnel did not reach d2"
    );
    assert_eq!(
        c.server_peer.ip(),
        IpAddr::from([10, 0, 2, 1]),
        "d2's client is not node 2's haproxy"
    );

    // Bulk throughput: 1 stream; 4 streams from 4 pods; 4 streams from one pod (sharing one
    // HBONE connection, for information); the proxies' CPU while their path runs.
    let hap_pids = hap.pids();
    let hap_cpu_now = || hap_pids.iter().copied().map(cpu_seconds).sum::<f64>();
    let mut bulk = [[0.0f64; 3]; 3]; // [kind][path] bytes/s, averaged over rounds
    let (mut mesh_cpu, mut mesh_bytes) = (0.0, 0.0);
    let (mut hap_cpu, mut hap_bytes) = (0.0, 0.0);
    for _ in 0..if part("bulk") { 2 } else { 0 } {
        for (kind, figures) in bulk.iter_mut().enumerate() {
            for (pi, (_, pod, clients, _, sink_addr)) in paths.iter().enumerate() {
                let before = (agents_cpu(&w), hap_cpu_now());
                let (bytes, rate) = match kind {
                    0 => bulk_parallel(&w, &[pod], sink_addr, BULK_SECONDS),
                    1 => bulk_parallel(&w, clients, sink_addr, BULK_SECONDS),
                    _ => {
                        let v = run_ok(&w, pod, &["bulk", sink_addr, BULK_SECONDS, "4"]);
                        (
                            v["bytes"].as_f64().unwrap_or(0.0),
                            v["bytes_per_s"].as_f64().unwrap_or(0.0),
                        )
                    }
                };
                if pi == 1 {
                    mesh_cpu += agents_cpu(&w) - before.0;
                    mesh_bytes += bytes;
                }
                if pi == 2 {
                    hap_cpu += hap_cpu_now() - before.1;
                    hap_bytes += bytes;
                }
                figures[pi] += rate / 2.0;
            }
        }
    }

    // Request/response on one connection, and new connections (connect + first byte): pooled
    // for Sluice; for HAProxy, one TLS connection per connection, resuming its TLS session to
    // node 2 (its default), and with `no-ssl-reuse`, a full handshake each.
    let mut rr64: [Vec<u64>; 3] = Default::default();
    let mut rr16k: [Vec<u64>; 3] = Default::default();
    let mut conn: [Vec<u64>; 3] = Default::default();
    let mut conn_request: [Vec<u64>; 3] = Default::default();
    let mut conn_service = Vec::new();
    let mut hap_full = Vec::new();
    for (_, pod, _, echo_addr, _) in &paths {
        rr_samples(&w, pod, echo_addr, 64, 200);
        samples(&w, pod, echo_addr, 100);
    }
    samples(&w, "d1", &hap.echo_full(), 100);
    samples(&w, "m1", &service, 100);
    let pooled_handshakes = handshakes(&w, 1);
    for _ in 0..ROUNDS {
        for (pi, (_, pod, _, echo_addr, _)) in paths.iter().enumerate() {
            if part("rr") {
                rr64[pi].extend(rr_samples(&w, pod, echo_addr, 64, 2000));
                rr16k[pi].extend(rr_samples(&w, pod, echo_addr, 16 * 1024, 500));
            }
            if part("conn") || part("handshake") {
                conn[pi].extend(samples(&w, pod, echo_addr, 400));
            }
            if part("conn") {
                conn_request[pi].extend(samples_mode(&w, pod, echo_addr, 400, true));
            }
        }
        if part("handshake") {
            hap_full.extend(samples(&w, "d1", &hap.echo_full(), 400));
        }
        // Same pod, same endpoint, same pooled HBONE connection: only the Service lookup and
        // the endpoint choice differ from the pod-IP samples of this round.
        if part("conn") {
            conn_service.extend(samples(&w, "m1", &service, 400));
        }
    }

    // Handshake-bound: each hN pod is a new source identity. Its first connection to w2 gets its
    // certificate issued; its first connection to m2 then needs a new HBONE connection (the pool
    // is keyed by source and destination identity), so it pays a full TLS handshake.
    let pooled_handshakes = handshakes(&w, 1) - pooled_handshakes;
    assert_eq!(
        pooled_handshakes, 0,
        "the pooled rounds made {pooled_handshakes} TLS handshakes: they were not pooled"
    );
    let mut handshake = Vec::new();
    let mut measured_handshakes = 0;
    for h in hs.iter().filter(|_| part("handshake")) {
        run_ok(&w, h, &["connect", &echo(w2), "100"]);
        let before = handshakes(&w, 1);
        handshake.extend(samples(&w, h, &echo(m2), 1));
        let made = handshakes(&w, 1) - before;
        assert_eq!(
            made, 1,
            "{h}'s connection to m2 made {made} TLS handshakes, not one"
        );
        measured_handshakes += made;
    }

    for v in rr64
        .iter_mut()
        .chain(rr16k.iter_mut())
        .chain(conn.iter_mut())
        .chain(conn_request.iter_mut())
        .chain([&mut conn_service, &mut handshake, &mut hap_full])
    {
        v.sort_unstable();
    }
    let mbps = |b: f64| b * 8.0 / 1e6;
    // Connections per second from the median connect + first byte time (one connection at a
    // time): a mean would be dominated by the few slow outliers a shared machine produces.
    let conn_rate = |v: &[u64]| {
        if v.is_empty() {
            0.0
        } else {
            1e6 / (percentile(v, 0.5) as f64).max(1.0)
        }
    };
    println!(
        "\nmesh: node 1 → node 2, direct vs Sluice (captured, HBONE mTLS between node proxies) \
         vs HAProxy (mTLS TCP tunnel between the nodes)"
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "figure", "direct", "sluice", "haproxy", "s/direct", "s/haproxy"
    );
    // Parts left out by SLUICE_BENCH_ONLY measured nothing: say so instead of printing 0.
    // `latency`: the Sluice/HAProxy ratio is of the latency each adds over direct.
    let row = |name: &str, d: f64, s: f64, h: f64, latency: bool| {
        if d > 0.0 && s > 0.0 {
            let vs_hap = if h <= 0.0 {
                f64::NAN
            } else if latency {
                (s - d) / (h - d)
            } else {
                s / h
            };
            println!(
                "{name:<34} {d:>10.1} {s:>10.1} {h:>10.1} {:>9.2} {vs_hap:>9.2}",
                s / d
            );
            (s / d, vs_hap)
        } else {
            println!(
                "{name:<34} {:>10} {:>10} {:>10}",
                "not run", "not run", "not run"
            );
            (f64::NAN, f64::NAN)
        }
    };
    let bulk1 = row(
        "bulk 1 stream (Mbit/s)",
        mbps(bulk[0][0]),
        mbps(bulk[0][1]),
        mbps(bulk[0][2]),
        false,
    );
    let bulk4 = row(
        "bulk 4 streams, 4 pods (Mbit/s)",
        mbps(bulk[1][0]),
        mbps(bulk[1][1]),
        mbps(bulk[1][2]),
        false,
    );
    row(
        "bulk 4 streams, 1 pod (Mbit/s)",
        mbps(bulk[2][0]),
        mbps(bulk[2][1]),
        mbps(bulk[2][2]),
        false,
    );
    let p = |v: &[u64], q| percentile(v, q) as f64;
    let pq = |v: &[Vec<u64>; 3], q| (p(&v[0], q), p(&v[1], q), p(&v[2], q));
    let (d, s, h) = pq(&rr64, 0.5);
    let rr64_50 = row("rr 64 B p50 (µs)", d, s, h, true);
    let (d, s, h) = pq(&rr64, 0.99);
    let rr64_99 = row("rr 64 B p99 (µs)", d, s, h, true);
    let (d, s, h) = pq(&rr16k, 0.5);
    let rr16k_50 = row("rr 16 KiB p50 (µs)", d, s, h, true);
    let pooled = row(
        "new conns/s, pooled (hap: resumed)",
        conn_rate(&conn[0]),
        conn_rate(&conn[1]),
        conn_rate(&conn[2]),
        false,
    );
    let pooled_request = row(
        "new conns/s, pooled, client first",
        conn_rate(&conn_request[0]),
        conn_rate(&conn_request[1]),
        conn_rate(&conn_request[2]),
        false,
    );
    let service_ratio = {
        let (pod_ip, vip) = (conn_rate(&conn[1]), conn_rate(&conn_service));
        if pod_ip > 0.0 && vip > 0.0 {
            println!(
                "{:<34} {:>10.1} {:>10.1} {:>10} {:>9.2}",
                "new conns/s, pooled: pod IP | VIP",
                pod_ip,
                vip,
                "-",
                vip / pod_ip
            );
            vip / pod_ip
        } else {
            f64::NAN
        }
    };
    let hs_ratio = row(
        "new conns/s, handshake each",
        conn_rate(&conn[0]),
        conn_rate(&handshake),
        conn_rate(&hap_full),
        false,
    );
    println!(
        "{:<34} {:>10} {:>10.2} {:>10.2}",
        "proxies' CPU s per GB (both nodes)",
        "-",
        mesh_cpu / (mesh_bytes / 1e9).max(1e-9),
        hap_cpu / (hap_bytes / 1e9).max(1e-9)
    );
    println!(
        "{:<34} {:>10} {:>10.1}",
        "agent idle RSS (MiB, larger node)", "-", rss_idle
    );
    let handshake_cpu = handshake_cpu_us(300);
    println!(
        "{:<34} {:>10} {:>10.0}",
        "TLS handshake CPU, both sides (µs)", "-", handshake_cpu
    );
    println!(
        "(bulk: {BULK_SECONDS} s per run, 2 runs per path, 4 streams from 4 client pods or from one; \
         rr: {ROUNDS}×2000 × 64 B and {ROUNDS}×500 × 16 KiB; conns/s = 1 / median connect + first \
         byte time, one connection at a time: pooled {ROUNDS}×400 connections (0 TLS handshakes, \
         checked), as many where the client sends a byte first and times its echo, and as many from m1 to a ClusterIP whose one endpoint is m2 (compared with m1 → m2 pod IP); handshake {handshake_pods} new source identities, one connection each \
         ({measured_handshakes} TLS handshakes counted by sluice_hbone_handshakes_total), both \
         against the direct rate; HAProxy: {hap_version}, {}, its handshake row {ROUNDS}×400 \
         connections with no-ssl-reuse; latency ratios against HAProxy divide the latency each adds \
         over direct; {:.0} s in all; load average {} at the start, {} at the end)",
        haproxy::TUNING,
        started.elapsed().as_secs_f64(),
        load_start.trim(),
        loadavg().trim(),
    );
    println!("ztunnel: not run ({ztunnel_note})");
    for (name, value) in [
        ("bulk1_vs_direct", bulk1.0),
        ("bulk4_vs_direct", bulk4.0),
        ("rr64_p50_vs_direct", rr64_50.0),
        ("rr64_p99_vs_direct", rr64_99.0),
        ("rr16k_p50_vs_direct", rr16k_50.0),
        ("conn_pooled_vs_direct", pooled.0),
        ("conn_pooled_request_vs_direct", pooled_request.0),
        ("conn_handshake_vs_direct", hs_ratio.0),
        ("service_vs_podip_conn", service_ratio),
        ("sluice_vs_haproxy_bulk1", bulk1.1),
        ("sluice_vs_haproxy_bulk4", bulk4.1),
        ("sluice_vs_haproxy_rr64_p50", rr64_50.1),
        ("sluice_vs_haproxy_rr64_p99", rr64_99.1),
        ("sluice_vs_haproxy_rr16k_p50", rr16k_50.1),
        ("sluice_vs_haproxy_conn_pooled", pooled.1),
        ("sluice_vs_haproxy_conn_pooled_request", pooled_request.1),
        ("sluice_vs_haproxy_conn_handshake", hs_ratio.1),
    ] {
        if value.is_finite() {
            println!("ratio {name} {value:.2}");
        }
    }
    println!("rss_idle_mb {rss_idle:.1}");
    println!("handshake_cpu_us {handshake_cpu:.0}");
    // Last: the figures above are printed even if this part fails.
    if part("fanout") {
        fanout(&w, &echo(m2));
    }
}

/// Busy loops, one per CPU, beside a measurement; stopped when dropped.
struct CpuHog(Vec<std::process::Child>);

impl CpuHog {
    fn start() -> CpuHog {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        CpuHog(
            (0..cpus)
                .map(|_| {
                    std::process::Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .spawn()
                        .expect("start CPU hog")
                })
                .collect(),
        )
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Latency under contention: 1,000 concurrent connections from m1 through the mesh (connect +
/// the server's greeting, all opened at once), on a quiet CPU and beside one busy loop per CPU.
fn fanout(w: &World, addr: &str) {
    const CONNECTIONS: usize = 1000;
    let once = |label: &str| {
        let v = run_ok(w, "m1", &["fanout", addr, &CONNECTIONS.to_string(), "64"]);
        let mut open: Vec<u64> = v["open_us"]
            .as_array()
            .expect("open_us")
            .iter()
            .filter_map(|x| x.as_u64())
            .collect();
        open.sort_unstable();
        let ok = v["ok"].as_u64().unwrap_or(0);
        println!(
            "fanout {label}: {ok} of {CONNECTIONS} connections completed, errors {}",
            v["errors"]
        );
        let ms = |us: u64| us as f64 / 1000.0;
        println!(
            "fanout {label}: connect + greeting p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            ms(percentile(&open, 0.5)),
            ms(percentile(&open, 0.99)),
            ms(open.last().copied().unwrap_or(0))
        );
        (
            ms(percentile(&open, 0.99)),
            ms(open.last().copied().unwrap_or(0)),
            ok,
        )
    };
    // Warm-up: the pooled HBONE connections and the certificates exist before timing.
    once("warm-up");
    let (p99, max, ok) = once("quiet");
    let (p99_hog, max_hog, ok_hog) = {
        let _hog = CpuHog::start();
        std::thread::sleep(std::time::Duration::from_millis(200));
        once("beside a CPU hog")
    };
    println!(
        "fanout: {CONNECTIONS} concurrent connections m1 → m2 (connect + greeting): quiet p99 \
         {p99:.1} ms, max {max:.1} ms; beside one busy loop per CPU p99 {p99_hog:.1} ms, max \
         {max_hog:.1} ms"
    );
    println!("fanout_p99_ms {p99:.1}");
    println!("fanout_max_ms {max:.1}");
    println!("fanout_p99_ms_contended {p99_hog:.1}");
    println!("fanout_max_ms_contended {max_hog:.1}");
    println!("fanout_failed {}", 2 * CONNECTIONS as u64 - ok - ok_hog);
}

/// `/proc/loadavg`'s three load averages.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// When agent `i` last logged `mesh state published` with a generation above `after`: its
/// timestamp and generation; waits up to `timeout`.
fn published_after(
    w: &World,
    i: usize,
    after: u64,
    timeout: std::time::Duration,
) -> (k8s_openapi::jiff::Timestamp, u64) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let found = w.agents[&i].log_lines().into_iter().find_map(|l| {
            let generation = l["generation"].as_u64()?;
            (l["message"] == "mesh state published" && generation > after).then(|| {
                let at = l["timestamp"].as_str()?.parse().ok()?;
                Some((at, generation))
            })?
        });
        if let Some(found) = found {
            return found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node {i} published nothing after generation {after} within {timeout:?}:\n{}",
            w.agents[&i].tail()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The last published generation of agent `i` (0 before any).
fn last_generation(w: &World, i: usize) -> u64 {
    w.agents[&i]
        .log_lines()
        .iter()
        .filter(|l| l["message"] == "mesh state published")
        .filter_map(|l| l["generation"].as_u64())
        .max()
        .unwrap_or(0)
}

/// A cluster's worth of resources (`sluice_tests::scale::Size::CLUSTER`): what building the
/// state costs, how fast one change reaches the agent, its memory with that state and across
/// changes, the per-connection policy decision, and the pooled connection rate with that state
/// against an empty one. File mode (the kube figures are not measured yet).
fn scale() {
    use std::time::{Duration, Instant};

    use sluice_tests::scale::{Size, cluster, pod};

    let size = Size::CLUSTER;
    let started = Instant::now();
    let yaml = cluster(&size, 0);
    println!(
        "\nscale: {} pods ({} on this node) over {} nodes, {} namespaces, {} Services, {} \
         AuthorizationPolicies × {} rules, {} PeerAuthentications, {} StaticGatewayConfigurations \
         ({:.1} MB of YAML)",
        size.pods,
        size.pods_on_node1,
        size.nodes,
        size.namespaces,
        size.services,
        size.authorization_policies,
        size.rules,
        size.peer_authentications,
        size.static_gateways,
        yaml.len() as f64 / 1e6
    );

    let InProcess {
        parse_ms,
        build_ms,
        resources_mib,
        state_mib,
        decision_p50_us,
        decision_p99_us,
        allowed,
    } = scale_in_process(&size);

    // The agents: first with nothing but the two pods the rate is measured between.
    let pods = [PodSpec::new("m1", "mesh", 1), PodSpec::new("m2", "mesh", 2)];
    let mut w = World::build(2, &pods);
    // Each change replaces the file whole: a 17.6 MB file rewritten in place can be read
    // half-written when the writer is descheduled (`SLUICE_SCALE_IN_PLACE=1` measures that).
    w.atomic_config_writes = std::env::var_os("SLUICE_SCALE_IN_PLACE").is_none();
    w.namespace("mesh", &[("istio.io/dataplane-mode", "ambient")]);
    w.start_agent(1, "");
    w.start_agent(2, "");
    for p in &pods {
        w.enroll(&p.name);
    }
    let m2 = w.pod("m2").ipv4;
    let _server = w.serve("m2", "0.0.0.0:8080");
    let echo = SocketAddr::new(m2, 8080).to_string();
    samples(&w, "m1", &echo, 100);
    let mut empty = Vec::new();
    for _ in 0..3 {
        empty.extend(samples(&w, "m1", &echo, 300));
    }
    let pid = w.agents[&1].pid().expect("agent 1 runs");
    let rss_empty = rss_mib(pid);

    // The whole cluster arrives in one file change.
    let generation = last_generation(&w, 1);
    w.extra_resources = yaml.clone();
    w.rewrite_configs();
    let (_, mut generation) = published_after(&w, 1, generation, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(2));
    let rss_steady = rss_mib(pid);
    let mut at_scale = Vec::new();
    for _ in 0..3 {
        at_scale.extend(samples(&w, "m1", &echo, 300));
    }

    // Changes: one more pod each time; from the file's write to the agent's publication.
    let mut propagation = Vec::new();
    let mut rss_changes = Vec::new();
    let mut extra = String::new();
    // The issue's figures: propagation over 50 changes, RSS after 10 (and after all 50).
    const CHANGES: usize = 50;
    const RSS_AFTER: usize = 10;
    let mut rss_after = 0.0;
    for c in 0..CHANGES {
        extra.push_str(&pod(&size, size.pods + c, 0));
        w.extra_resources = format!("{yaml}{extra}");
        let written = k8s_openapi::jiff::Timestamp::now();
        w.rewrite_configs();
        let (at, g) = published_after(&w, 1, generation, Duration::from_secs(120));
        generation = g;
        propagation.push((at.as_millisecond() - written.as_millisecond()).max(0) as u64);
        rss_changes.push(rss_mib(pid));
        if c + 1 == RSS_AFTER {
            std::thread::sleep(Duration::from_secs(2));
            rss_after = rss_mib(pid);
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let rss_after_all = rss_mib(pid);
    propagation.sort_unstable();
    empty.sort_unstable();
    at_scale.sort_unstable();
    let rate = |v: &[u64]| 1e6 / (percentile(v, 0.5) as f64).max(1.0);
    let conn_ratio = rate(&at_scale) / rate(&empty);

    println!("{:<44} {:>12}", "figure", "value");
    println!(
        "{:<44} {:>12.0}",
        "parse the YAML, in process (ms)", parse_ms
    );
    println!("{:<44} {:>12.0}", "state::build, in process (ms)", build_ms);
    println!(
        "{:<44} {:>12.0}",
        "one change, file mode, p50 (ms)",
        percentile(&propagation, 0.5)
    );
    println!(
        "{:<44} {:>12.0}",
        "one change, file mode, p99 (ms)",
        percentile(&propagation, 0.99)
    );
    println!(
        "{:<44} {:>12.1}",
        "parsed resources, in process (MiB)", resources_mib
    );
    println!(
        "{:<44} {:>12.1}",
        "built MeshState, in process (MiB)", state_mib
    );
    println!("{:<44} {:>12.1}", "agent RSS, empty state (MiB)", rss_empty);
    println!(
        "{:<44} {:>12.1}",
        "agent RSS, cluster state (MiB)", rss_steady
    );
    println!(
        "{:<44} {:>12.1}",
        format!("agent RSS after {RSS_AFTER} changes (MiB)"),
        rss_after
    );
    println!(
        "{:<44} {:>12.1}",
        format!("agent RSS after {CHANGES} changes (MiB)"),
        rss_after_all
    );
    println!(
        "{:<44} {:>12.2}",
        "policy decision p50 (µs)", decision_p50_us
    );
    println!(
        "{:<44} {:>12.2}",
        "policy decision p99 (µs)", decision_p99_us
    );
    println!(
        "{:<44} {:>12.1}",
        "new conns/s, pooled, empty state",
        rate(&empty)
    );
    println!(
        "{:<44} {:>12.1}",
        "new conns/s, pooled, cluster state",
        rate(&at_scale)
    );
    println!(
        "(RSS of node 1's agent, which holds every resource; per change {:?} MiB; {} of 20,000 \
         decisions allowed; conns/s = 1 / median connect + first byte, 900 each; changes \
         add one pod, file source stat'ed every {} ms; {:.0} s in all)",
        rss_changes
            .iter()
            .map(|r| (r * 10.0).round() / 10.0)
            .collect::<Vec<_>>(),
        allowed,
        sluice::sources::file::WATCH_INTERVAL.as_millis(),
        started.elapsed().as_secs_f64()
    );
    println!("scale_build_ms {build_ms:.0}");
    println!("scale_propagation_p50_ms {}", percentile(&propagation, 0.5));
    println!(
        "scale_propagation_p99_ms {}",
        percentile(&propagation, 0.99)
    );
    println!("scale_rss_mb {rss_steady:.1}");
    println!("scale_rss_after_reloads_mb {rss_after:.1}");
    println!("scale_decision_p99_us {:.2}", decision_p99_us);
    println!("ratio conn_at_scale_vs_empty {conn_ratio:.2}");
}

/// The in-process part of `scale`: parse and build times, memory of the parsed resources and
/// of the built state, and decision times (`sluice-bench scale-state` runs only this, without
/// root or agents).
struct InProcess {
    parse_ms: f64,
    build_ms: f64,
    resources_mib: f64,
    state_mib: f64,
    decision_p50_us: f64,
    decision_p99_us: f64,
    allowed: usize,
}

fn scale_in_process(size: &sluice_tests::scale::Size) -> InProcess {
    use std::time::Instant;

    use sluice::{
        policy::ConnectionInfo,
        resources::ResourceSet,
        state::{MeshSettings, build},
    };
    use sluice_tests::scale::{cluster, pod_ip};

    let size = *size;
    let yaml = cluster(&size, 0);
    // In process, on this thread: what the parsed resources and the built state hold.
    let self_rss = || {
        sluice::memory::release_freed();
        rss_mib(std::process::id())
    };
    let (resources_mib, state_mib) = {
        let before = self_rss();
        let resources = ResourceSet::from_yaml(&yaml).expect("synthetic cluster parses");
        let parsed = self_rss();
        let out = build::build(&resources, &MeshSettings::default());
        let built = self_rss();
        drop((resources, out));
        (parsed - before, built - parsed)
    };

    // In process: parse and build, best of three; then decisions against the built state.
    let mut parse_ms = f64::MAX;
    let mut build_ms = f64::MAX;
    let mut built = None;
    for _ in 0..3 {
        let t = Instant::now();
        let resources = ResourceSet::from_yaml(&yaml).expect("synthetic cluster parses");
        parse_ms = parse_ms.min(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let out = build::build(&resources, &MeshSettings::default());
        build_ms = build_ms.min(t.elapsed().as_secs_f64() * 1e3);
        assert!(out.rejections.is_empty(), "{:?}", &out.rejections[..1]);
        built = Some(out.state);
    }
    let state = built.expect("built");
    assert_eq!(state.workloads.len(), size.pods, "workloads");
    let mut decisions = Vec::with_capacity(20_000);
    let mut allowed = 0usize;
    for k in 0..20_000usize {
        let dst = (k * 7_919) % size.pods;
        let ip: std::net::IpAddr = pod_ip(dst).parse().expect("ip");
        let workload = state.workload_by_ip(ip).expect("workload by ip");
        let src = state
            .workload_by_ip(pod_ip((k * 104_729) % size.pods).parse().expect("ip"))
            .expect("source");
        let identity = src.identity(&state.trust_domain);
        let conn = ConnectionInfo {
            source_identity: Some(&identity),
            source_ip: src.ips[0],
            destination: workload,
            destination_ip: ip,
            destination_port: 8000 + (k % 12) as u16,
            remote_ip: None,
        };
        let t = Instant::now();
        let d = std::hint::black_box(state.policy.authorize(&conn));
        decisions.push(t.elapsed().as_nanos() as u64);
        allowed += usize::from(d.is_allowed());
    }
    decisions.sort_unstable();

    let decision_us = |q| percentile(&decisions, q) as f64 / 1e3;
    let out = InProcess {
        parse_ms,
        build_ms,
        resources_mib,
        state_mib,
        decision_p50_us: decision_us(0.5),
        decision_p99_us: decision_us(0.99),
        allowed,
    };
    println!(
        "in process: parse {:.0} ms, build {:.0} ms, resources {:.1} MiB, state {:.1} MiB, \
         decision p50 {:.2} µs p99 {:.2} µs",
        out.parse_ms,
        out.build_ms,
        out.resources_mib,
        out.state_mib,
        out.decision_p50_us,
        out.decision_p99_us
    );
    out
}

/// The file source's rebuild cycle in process (parse through the document cache, build with
/// LastGood's incremental builder, publish, drop the old state, trim), each change on a fresh thread as the agent's
/// blocking pool would run it, with the agent's malloc settings; prints RSS after each trim.
/// `SLUICE_MMAP_THRESHOLD=<bytes>` also fixes glibc's mmap threshold, to compare.
fn scale_memory() {
    use sluice::{
        sources::file::{DocumentCache, parse_cached_kinds},
        state::{LastGood, MeshSettings},
    };
    use sluice_tests::scale::{Size, cluster, pod};

    sluice::memory::limit_arenas();
    if let Some(t) = std::env::var("SLUICE_MMAP_THRESHOLD")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        // SAFETY: mallopt only changes a malloc tunable.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, t);
        }
        println!("mmap threshold fixed at {t} bytes");
    }
    let size = Size::CLUSTER;
    let yaml = cluster(&size, 0);
    let rss = || rss_mib(std::process::id());
    println!("base {:.1} MiB (the YAML text included)", rss());
    let mut carried = Some((DocumentCache::default(), LastGood::default(), None));
    let mut extra = String::new();
    for c in 0..12usize {
        if c > 0 {
            extra.push_str(&pod(&size, size.pods + c, 0));
        }
        let text = format!("{yaml}{extra}");
        let (mut cache, mut last_good, previous) = carried.take().expect("carried");
        let t = std::time::Instant::now();
        let (cache, last_good, state, build_ms) = std::thread::spawn(move || {
            // As the file watcher does: only the kinds of the parts that change are read.
            let settings = MeshSettings::default();
            let file =
                parse_cached_kinds(&text, std::path::Path::new("scale.yaml"), &mut cache, |p| {
                    last_good.kinds_read(p, &settings)
                })
                .expect("parses");
            let parsed = std::time::Instant::now();
            let built = last_good.build_changed(file.resources, &file.prints, &settings);
            let build_ms = parsed.elapsed().as_millis();
            drop(previous);
            (
                cache,
                last_good,
                Some(std::sync::Arc::new(built.state)),
                build_ms,
            )
        })
        .join()
        .expect("rebuild thread");
        let ms = t.elapsed().as_millis();
        sluice::memory::release_freed();
        println!(
            "change {c}: {ms} ms (build {build_ms} ms), RSS after trim {:.1} MiB",
            rss()
        );
        carried = Some((cache, last_good, state));
    }
    let (cache, last_good, state) = carried.take().expect("carried");
    for (what, dropped) in [
        ("state", Box::new(state) as Box<dyn std::any::Any>),
        ("LastGood", Box::new(last_good)),
        ("document cache", Box::new(cache)),
    ] {
        drop(dropped);
        sluice::memory::release_freed();
        println!("without the {what}: RSS {:.1} MiB", rss());
    }
}

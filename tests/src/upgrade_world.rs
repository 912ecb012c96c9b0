//! The world, load and figures of the upgrade tests and benchmark (issue 19): two nodes, node
//! 1's agent the one upgraded, and four flows of load, each to a `serve` that echoes:
//! a → b (both on node 1), a → c (node 1 to node 2 over HBONE), c → a (node 2 to node 1 over
//! HBONE: the pooled connections the old agent's GOAWAY moves), and `out` → a (plaintext
//! inbound on node 1, where the policy lets it in).
use std::{
    net::SocketAddr,
    process::{Child, Stdio},
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{
    load::{LoadReport, quantile},
    world::{PodSpec, Server, World, testpod_bin},
};

pub const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
/// How long each load runs.
pub const SECONDS: u64 = 12;
/// Long transfers per flow (four flows: 20 in all).
pub const LONG: usize = 5;
/// Short connections per second per flow (four flows: 100 per second in all).
pub const RATE: u64 = 25;

pub const STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: mesh}
spec:
  mtls: {mode: STRICT}
"#;

/// Now, in ms since the epoch (the load reports' clock).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The two nodes and four pods, agents started and pods enrolled; `policies` are more resources.
pub fn world(policies: &str) -> World {
    let mut w = World::build(
        2,
        &[
            PodSpec::new("a", "mesh", 1),
            PodSpec::new("b", "mesh", 1),
            PodSpec::new("c", "mesh", 2),
            PodSpec::new("out", "plain", 2),
        ],
    );
    w.namespace("mesh", &[AMBIENT]);
    w.namespace("plain", &[]);
    w.extra_resources = policies.into();
    w.start_agent(1, "");
    w.start_agent(2, "");
    for pod in ["a", "b", "c"] {
        assert!(w.enroll(pod), "{pod} not captured");
    }
    assert!(!w.enroll("out"), "out is not in the mesh");
    w
}

/// The echo servers the load talks to.
pub fn serve(w: &mut World) -> Vec<Server> {
    ["a", "b", "c"]
        .into_iter()
        .map(|p| w.serve(p, "0.0.0.0:8080"))
        .collect()
}

/// One stream of load: `from` connects to `to`.
pub struct Flow {
    pub name: &'static str,
    pub from: &'static str,
    pub to: SocketAddr,
    pub long: usize,
    pub rate: u64,
}

/// The four flows at [`LONG`] and [`RATE`].
pub fn flows(w: &World) -> Vec<Flow> {
    let at = |pod: &str| SocketAddr::new(w.pod(pod).ipv4, 8080);
    vec![
        Flow {
            name: "outbound a -> b (node 1)",
            from: "a",
            to: at("b"),
            long: LONG,
            rate: RATE,
        },
        Flow {
            name: "outbound a -> c (node 1 -> 2, HBONE)",
            from: "a",
            to: at("c"),
            long: LONG,
            rate: RATE,
        },
        Flow {
            name: "inbound c -> a (node 2 -> 1, HBONE)",
            from: "c",
            to: at("a"),
            long: LONG,
            rate: RATE,
        },
        Flow {
            name: "inbound out -> a (plaintext)",
            from: "out",
            to: at("a"),
            long: LONG,
            rate: RATE,
        },
    ]
}

/// Load generators running in pods; killed if the test fails before they finish.
pub struct Load {
    running: Vec<(&'static str, Child)>,
}

impl Load {
    /// Starts one generator per flow, each running `seconds`.
    pub fn start(w: &World, flows: &[Flow], seconds: u64) -> Load {
        let running = flows
            .iter()
            .map(|f| {
                let child = w
                    .pod(f.from)
                    .command(testpod_bin())
                    .args([
                        "load",
                        &f.to.to_string(),
                        &seconds.to_string(),
                        &f.long.to_string(),
                        &f.rate.to_string(),
                    ])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .unwrap_or_else(|e| panic!("starting load {}: {e}", f.name));
                (f.name, child)
            })
            .collect();
        Load { running }
    }

    /// Waits for every generator; their reports by flow name.
    pub fn finish(mut self) -> Vec<(&'static str, LoadReport)> {
        std::mem::take(&mut self.running)
            .into_iter()
            .map(|(name, child)| {
                let out = child
                    .wait_with_output()
                    .unwrap_or_else(|e| panic!("load {name}: {e}"));
                let text = String::from_utf8_lossy(&out.stdout);
                let report: LoadReport = serde_json::from_str(text.trim())
                    .unwrap_or_else(|e| panic!("load {name} printed {text:?}: {e}"));
                (name, report)
            })
            .collect()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for (_, child) in &mut self.running {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Totals of one run of load.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    /// Connections that failed (long and short).
    pub failed: u64,
    /// Connect-latency p99 (µs) of short connections begun before the change.
    pub p99_steady: u64,
    /// The same, of those begun from the change's start to two seconds after its end.
    pub p99_during: u64,
}

impl Summary {
    /// `p99_during / p99_steady`.
    pub fn ratio(&self) -> f64 {
        self.p99_during as f64 / self.p99_steady.max(1) as f64
    }
}

/// Prints each flow's counts and the connect-latency p99 in steady state (before `change.0`)
/// and from `change.0` to two seconds after `change.1` (unix ms).
pub fn summarize(what: &str, reports: &[(&str, LoadReport)], change: (u64, u64)) -> Summary {
    let mut steady = Vec::new();
    let mut during = Vec::new();
    let mut failed = 0;
    println!("{what}:");
    for (name, r) in reports {
        println!(
            "  {name}: long {} ok / {} failed ({} bytes verified), short {} ok / {} failed",
            r.long_ok, r.long_failed, r.long_bytes, r.short_ok, r.short_failed
        );
        for (at, e) in &r.errors {
            println!("    error at {} ms: {e}", *at as i64 - change.0 as i64);
        }
        failed += r.long_failed + r.short_failed;
        for (at, us) in &r.connects {
            if *at < change.0 {
                steady.push(*us);
            } else if *at <= change.1 + 2000 {
                during.push(*us);
            }
        }
    }
    let (n_steady, n_during) = (steady.len(), during.len());
    let summary = Summary {
        failed,
        p99_steady: quantile(&mut steady, 0.99),
        p99_during: quantile(&mut during, 0.99),
    };
    println!(
        "  connect p99: steady {} us ({n_steady} connections), during {} us ({n_during} \
         connections), ratio {:.2}; the change took {} ms",
        summary.p99_steady,
        summary.p99_during,
        summary.ratio(),
        change.1.saturating_sub(change.0)
    );
    summary
}

//! `sluice-interop --ztunnel PATH`: Sluice next to a real ztunnel (the user's binary), both
//! directions, under STRICT, and with ztunnel's post-quantum compliance policy; prints a table.
//!
//! Not a test of the suite: run by `cargo xtask interop --ztunnel PATH` (as root, under
//! `flock /tmp/sluice-e2e.lock`). Nothing here fetches or builds ztunnel.
//!
//! The world: nodes 1 and 2 run Sluice agents serving pods `a` and `b` (namespace `mesh`,
//! ambient, STRICT PeerAuthentication); node 3 runs no agent, and its pod `zt` is served by
//! ztunnel in its dedicated mode, inside the pod's network namespace, with the workloads given
//! as local XDS. Certificates: `sluice ca` against a real kube-apiserver, signing under the
//! world's root (which the agents' built-in CA uses too); ztunnel authenticates with a token
//! bound to the `zt` Pod. ztunnel's outbound listener gets the pod's connections to port 8080
//! of other nodes' pods by an iptables REDIRECT in the pod namespace (part of this runner only).
use std::{
    fs::File,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use sluice_tests::{
    ca_service::{CaService, pod_token},
    kube_mesh::{self, apply, bridge_into_netns, deploy_dir},
    kube_server::KubeServer,
    netns,
    world::{PodSpec, World},
};

const TD: &str = "cluster.local";
const AUDIENCE: &str = "istio-ca";
const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
/// Bytes each row sends and expects echoed back.
const BYTES: u64 = 1 << 20;
const APP_PORT: u16 = 8080;
/// A port of b's app the ztunnel pod reaches without ztunnel (the STRICT control row).
const PLAIN_PORT: u16 = 8081;

const STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: mesh}
spec:
  mtls: {mode: STRICT}
"#;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ztunnel = match args.as_slice() {
        [flag, path] if flag == "--ztunnel" => PathBuf::from(path),
        _ => {
            eprintln!("usage: sluice-interop --ztunnel PATH");
            std::process::exit(2);
        }
    };
    if let Err(e) = check_executable(&ztunnel) {
        eprintln!("sluice-interop: {e:#}");
        std::process::exit(2);
    }
    if std::env::var_os("SLUICE_TEST_LOG").is_none() {
        // SAFETY: no other thread runs yet.
        unsafe { std::env::set_var("SLUICE_TEST_LOG", "info,sluice::proxy::hbone::pool=debug") };
    }
    match run(&ztunnel) {
        Ok(rows) => {
            print_table(&rows);
            if rows.iter().any(|r| r.result.is_err()) {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("sluice-interop: {e:#}");
            std::process::exit(1);
        }
    }
}

/// `path` is a regular file with an execute bit.
fn check_executable(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("--ztunnel {}: no such file", path.display()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        bail!("--ztunnel {}: not an executable file", path.display());
    }
    Ok(())
}

/// One row of the table.
struct Row {
    name: String,
    result: Result<Outcome, String>,
}

/// What a row that passed saw.
struct Outcome {
    bytes: u64,
    group: String,
    cipher_suite: String,
    /// What ztunnel's log says about the connection.
    ztunnel: String,
}

fn print_table(rows: &[Row]) {
    println!(
        "| row | result | bytes | cipher suite | group (Sluice log) | ztunnel log |\n|---|---|---|---|---|---|"
    );
    for r in rows {
        match &r.result {
            Ok(o) => println!(
                "| {} | ok | {} | {} | {} | {} |",
                r.name, o.bytes, o.cipher_suite, o.group, o.ztunnel
            ),
            Err(e) => println!(
                "| {} | failed: {} | 0 | - | - | - |",
                r.name,
                e.replace('|', "/").replace('\n', " ")
            ),
        }
    }
}

/// Which key exchange each side is configured with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kx {
    Default,
    Pqc,
}

impl Kx {
    fn name(self) -> &'static str {
        match self {
            Kx::Default => "default",
            Kx::Pqc => "pqc",
        }
    }
}

fn run(ztunnel: &Path) -> Result<Vec<Row>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let server = KubeServer::start();
    let client = rt.block_on(server.client());
    let zt_uid = rt.block_on(kube_objects(&client))?;

    let mut w = World::build(
        3,
        &[
            PodSpec::new("a", "mesh", 1),
            PodSpec::new("b", "mesh", 2),
            PodSpec::new("zt", "mesh", 3),
        ],
    );
    w.namespace("mesh", &[AMBIENT]);
    w.extra_resources.push_str(STRICT);

    // `sluice ca`, under the world's root, reachable from inside the ztunnel pod.
    let ca = CaService::start_with_root(
        &server,
        w.dir.path(),
        TD,
        &w.root_cert(),
        &w.dir.path().join("root-key.pem"),
    );
    let zt_netns = w.pod("zt").netns.clone();
    let _bridge = rt.block_on(bridge_into_netns(&zt_netns, ca.port));
    let token = rt.block_on(pod_token(&client, "mesh", "zt", ("zt", &zt_uid), AUDIENCE));
    let zt_dir = w.dir.path().join("ztunnel");
    let token_dir = zt_dir.join("var/run/secrets/tokens");
    std::fs::create_dir_all(&token_dir)?;
    std::fs::write(token_dir.join("istio-token"), token)?;
    std::fs::write(zt_dir.join("workloads.yaml"), local_xds(&w))?;
    redirect_outbound(&w)?;
    // b's app: echo servers (their replies prove the bytes went end to end); 8081 is not
    // redirected to ztunnel, so the control row reaches it in plaintext.
    let _b_app = w.serve("b", &format!("0.0.0.0:{APP_PORT}"));
    let _b_plain = w.serve("b", &format!("0.0.0.0:{PLAIN_PORT}"));

    let mut rows = Vec::new();
    for (sluice_kx, zt_kx) in [
        (Kx::Default, Kx::Default),
        (Kx::Default, Kx::Pqc),
        (Kx::Pqc, Kx::Pqc),
    ] {
        start_agents(&mut w, sluice_kx);
        let suffix = format!(
            "[Sluice {}, ztunnel {}]",
            sluice_kx.name(),
            if zt_kx == Kx::Pqc {
                "COMPLIANCE_POLICY=pqc"
            } else {
                "default"
            }
        );
        let mut zt = match Ztunnel::start(&w, ztunnel, &zt_dir, ca.port, zt_kx) {
            Ok(zt) => zt,
            Err(e) => {
                rows.push(Row {
                    name: format!("ztunnel start {suffix}"),
                    result: Err(format!("{e:#}")),
                });
                continue;
            }
        };
        rows.push(Row {
            name: format!("Sluice a → ztunnel zt {suffix}"),
            result: sluice_to_ztunnel(&w, &zt),
        });
        rows.push(Row {
            name: format!("ztunnel zt → Sluice b, STRICT {suffix}"),
            result: ztunnel_to_sluice(&w, &zt),
        });
        if (sluice_kx, zt_kx) == (Kx::Default, Kx::Default) {
            rows.push(Row {
                name: "control: zt → b plaintext, bypassing ztunnel, refused under STRICT".into(),
                result: strict_refuses_plaintext(&w),
            });
        }
        zt.stop();
        eprintln!("--- ztunnel log ({}) ---\n{}", zt_kx.name(), zt.tail(15));
    }
    drop(ca);
    Ok(rows)
}

/// The API objects `sluice ca` needs: its own RBAC (deploy/), namespace `mesh`, ServiceAccount
/// and Pod `zt` on node3; returns the Pod's uid (its token is bound to it).
async fn kube_objects(client: &kube::Client) -> Result<String> {
    for file in ["00-namespace.yaml", "01-serviceaccount.yaml", "05-ca.yaml"] {
        let path = deploy_dir().join(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        kube_mesh::apply_yaml(client, &text).await;
    }
    apply(
        client,
        &serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mesh"}}),
    )
    .await;
    apply(client, &serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "zt", "namespace": "mesh"}})).await;
    let pod = apply(
        client,
        &serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "zt", "namespace": "mesh"},
            "spec": {"serviceAccountName": "zt", "nodeName": "node3",
                     "containers": [{"name": "c", "image": "example.invalid/none"}]},
        }),
    )
    .await;
    pod.metadata.uid.context("the zt Pod has no uid")
}

/// ztunnel's local XDS: every pod of the world as an HBONE workload.
fn local_xds(w: &World) -> String {
    let mut out = String::from("workloads:\n");
    for p in &w.pods {
        out.push_str(&format!(
            "- uid: Kubernetes//Pod/{ns}/{name}\n  name: {name}\n  namespace: {ns}\n  serviceAccount: {sa}\n  workloadIps: [\"{v4}\", \"{v6}\"]\n  protocol: HBONE\n  node: node{node}\n  network: \"\"\n  trustDomain: {TD}\n  services: {{}}\n",
            ns = p.namespace,
            name = p.name,
            sa = p.service_account,
            v4 = p.ipv4,
            v6 = p.ipv6,
            node = p.node,
        ));
    }
    out
}

/// In `zt`'s namespace: its app's connections to port 8080 of other nodes' pods go to
/// ztunnel's outbound listener (15001), which reads the original destination.
fn redirect_outbound(w: &World) -> Result<()> {
    let zt = w.pod("zt");
    let own = match zt.ipv4 {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        IpAddr::V6(_) => bail!("zt has no IPv4 address"),
    };
    let port = APP_PORT.to_string();
    let rules: [&[&str]; 2] = [
        // ztunnel's inbound delivers to the pod's own address: not redirected.
        &["-d", &own, "-j", "RETURN"],
        &[
            "-d",
            "10.0.0.0/16",
            "--dport",
            &port,
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ],
    ];
    for rule in rules {
        let status = Command::new("ip")
            .args([
                "netns", "exec", &zt.netns, "iptables", "-t", "nat", "-A", "OUTPUT",
            ])
            .args(["-p", "tcp"])
            .args(rule)
            .status()
            .context("running iptables (`cargo xtask setup` installs it)")?;
        if !status.success() {
            bail!("iptables {rule:?} in {}: {status}", zt.netns);
        }
    }
    Ok(())
}

/// (Re)starts both agents with key exchange `kx`, enrolls their pods and starts their apps.
fn start_agents(w: &mut World, kx: Kx) {
    let spec = match kx {
        Kx::Default => String::new(),
        Kx::Pqc => "  tls:\n    keyExchange: pqc".to_owned(),
    };
    for node in [1, 2] {
        w.start_agent(node, &spec);
    }
    for pod in ["a", "b"] {
        assert!(w.enroll(pod), "{pod} is not captured");
    }
}

/// A ztunnel process in `zt`'s namespace and cgroup; killed when dropped.
struct Ztunnel {
    child: Option<Child>,
    log: PathBuf,
    app: Option<Child>,
}

impl Ztunnel {
    fn start(w: &World, bin: &Path, dir: &Path, ca_port: u16, kx: Kx) -> Result<Ztunnel> {
        let log = dir.join(format!("ztunnel-{}.log", kx.name()));
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let pod = w.pod("zt");
        let mut cmd = pod.command(bin);
        cmd.current_dir(dir)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("RUST_LOG", "info")
            .env("PROXY_MODE", "dedicated")
            .env("PROXY_WORKLOAD_INFO", "mesh/zt/zt")
            .env("XDS_ADDRESS", "")
            .env("LOCAL_XDS_PATH", dir.join("workloads.yaml"))
            .env("CA_ADDRESS", format!("https://localhost:{ca_port}"))
            .env("CA_ROOT_CA", w.root_cert())
            .env("CLUSTER_ID", "Kubernetes")
            .env("NODE_NAME", "node3")
            // Deliver to the app from the pod's own address: a spoofed source (the peer's)
            // would route its replies out of the pod.
            .env("ENABLE_ORIG_SRC", "false")
            .stdout(out)
            .stderr(err);
        if kx == Kx::Pqc {
            cmd.env("COMPLIANCE_POLICY", "pqc");
        }
        let child = cmd.spawn().context("starting ztunnel")?;
        let mut zt = Ztunnel {
            child: Some(child),
            log,
            app: None,
        };
        zt.wait_ready(&pod.netns)?;
        // The pod's app: an echo server on 8080 (ztunnel's inbound delivers to it).
        zt.app = Some(
            pod.command(sluice_tests::world::testpod_bin())
                .args(["serve", &format!("0.0.0.0:{APP_PORT}")])
                .stdout(Stdio::null())
                .spawn()
                .context("the zt pod's echo server")?,
        );
        std::thread::sleep(Duration::from_millis(300));
        Ok(zt)
    }

    /// Polls ztunnel's readiness endpoint (15021) inside the pod until it answers 200.
    fn wait_ready(&mut self, netns_name: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ns = netns_name.to_owned();
            let ready = netns::on_thread(&ns, || {
                let Ok(mut s) = TcpStream::connect_timeout(
                    &SocketAddr::from(([127, 0, 0, 1], 15021)),
                    Duration::from_secs(1),
                ) else {
                    return false;
                };
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(
                    b"GET /healthz/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                );
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                out.starts_with("HTTP/1.1 200")
            });
            if ready {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                bail!("ztunnel exited ({status}):\n{}", self.tail(30));
            }
            if Instant::now() > deadline {
                bail!("ztunnel not ready within 30 s:\n{}", self.tail(30));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn tail(&self, n: usize) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn stop(&mut self) {
        for child in [self.app.take(), self.child.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `key=value` or `key="value"` from a ztunnel log line.
fn field(line: &str, key: &str) -> Option<String> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[at..];
    let value = match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next().unwrap_or_default(),
        None => rest.split(' ').next().unwrap_or_default(),
    };
    Some(value.to_owned())
}

/// ztunnel's "connection complete" line of `direction` since the mark, summarised; or its
/// warnings and errors when there is none.
fn ztunnel_view(zt: &Marked, direction: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = zt.since_mark();
        if let Some(l) = lines.iter().find(|l| {
            l.contains("connection complete") && l.contains(&format!("direction=\"{direction}\""))
        }) {
            if let Some(error) = field(l, "error") {
                return Err(format!("ztunnel's {direction} connection failed: {error}"));
            }
            let get = |k: &str| field(l, k).unwrap_or_else(|| "?".into());
            return Ok(format!(
                "{direction}: src.identity={} dst.identity={} bytes_sent={} bytes_recv={}",
                get("src.identity"),
                get("dst.identity"),
                get("bytes_sent"),
                get("bytes_recv"),
            ));
        }
        if Instant::now() > deadline {
            let problems: Vec<&String> = lines
                .iter()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("error"))
                .collect();
            return Err(format!(
                "no {direction} `connection complete` in ztunnel's log; its warnings: {problems:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `a` (captured by Sluice on node 1) → `zt`:8080: Sluice's HBONE client to ztunnel's 15008.
fn sluice_to_ztunnel(w: &World, zt: &Ztunnel) -> Result<Outcome, String> {
    let zt_marked = zt_mark(zt);
    let before = w.agents[&1].log_lines().len();
    let zt_ip = w.pod("zt").ipv4.to_string();
    let to = SocketAddr::new(w.pod("zt").ipv4, APP_PORT).to_string();
    let conn = w.try_connect("a", &to, BYTES).map_err(|e| {
        format!(
            "connect: {e}; Sluice: {}; ztunnel: {:?}",
            agent_problems(w, 1, before),
            zt_marked.since_mark()
        )
    })?;
    if !conn.captured() {
        return Err("Sluice did not capture a's connection".into());
    }
    if conn.echoed != BYTES {
        return Err(format!("echoed {} of {BYTES} bytes", conn.echoed));
    }
    // The pool's handshake line (debug level) of this row's new HBONE connection.
    let established = w.agents[&1]
        .log_lines()
        .into_iter()
        .skip(before)
        .find(|l| {
            l["message"] == "HBONE connection established"
                && l["dst"].as_str().is_some_and(|d| d.starts_with(&zt_ip))
        })
        .ok_or("no new `HBONE connection established` line in Sluice's log (the runner sets SLUICE_TEST_LOG=info,sluice::proxy::hbone::pool=debug)")?;
    let f = |k: &str| established[k].as_str().unwrap_or("?").to_owned();
    let ztunnel = ztunnel_view(&zt_marked, "inbound")?;
    Ok(Outcome {
        bytes: conn.echoed,
        group: f("tls.group"),
        cipher_suite: f("tls.cipher_suite"),
        ztunnel,
    })
}

/// `zt`'s app → `b`:8080: through ztunnel's outbound (15001) to Sluice's HBONE on b's 15008,
/// which under STRICT accepts only mTLS.
fn ztunnel_to_sluice(w: &World, zt: &Ztunnel) -> Result<Outcome, String> {
    let zt_marked = zt_mark(zt);
    let agent = &w.agents[&2];
    let mine = |l: &serde_json::Value| {
        l["direction"] == "inbound" && l["route"] == "hbone" && l["dst.workload"] == "b"
    };
    let mine_before = agent.access_log().iter().filter(|l| mine(l)).count();
    let to = SocketAddr::new(w.pod("b").ipv4, APP_PORT).to_string();
    let conn = w.try_connect("zt", &to, BYTES).map_err(|e| {
        format!(
            "connect: {e}; Sluice: {}; ztunnel: {:?}",
            agent_problems(w, 2, 0),
            zt_marked
                .since_mark()
                .iter()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect::<Vec<_>>()
        )
    })?;
    if conn.echoed != BYTES {
        return Err(format!("echoed {} of {BYTES} bytes", conn.echoed));
    }
    let expected = format!("spiffe://{TD}/ns/mesh/sa/zt");
    let n = agent.wait_access(mine_before + 1, mine);
    let line = agent
        .access_log()
        .into_iter()
        .filter(|l| mine(l))
        .nth(mine_before)
        .ok_or_else(|| {
            format!("no inbound HBONE line for b in Sluice's access log ({n} lines in all)")
        })?;
    if line["src.identity"] != expected.as_str() {
        return Err(format!(
            "Sluice saw src.identity {} (expected {expected})",
            line["src.identity"]
        ));
    }
    if line["outcome"] != "ok" {
        return Err(format!("Sluice's access log: {line}"));
    }
    let s = |k: &str| line[k].as_str().unwrap_or("?").to_owned();
    let ztunnel = ztunnel_view(&zt_marked, "outbound")?;
    Ok(Outcome {
        bytes: conn.echoed,
        group: s("tls.group"),
        cipher_suite: s("tls.cipher_suite"),
        ztunnel,
    })
}

/// The control: from `zt` to b's port 8081, which ztunnel does not intercept, in plaintext.
/// STRICT must refuse it (so the rows above passed under STRICT); "ok" means it was refused.
fn strict_refuses_plaintext(w: &World) -> Result<Outcome, String> {
    let agent = &w.agents[&2];
    let denied = |l: &serde_json::Value| l["route"] == "plaintext" && l["outcome"] == "denied";
    let denied_before = agent.access_log().iter().filter(|l| denied(l)).count();
    let to = SocketAddr::new(w.pod("b").ipv4, PLAIN_PORT).to_string();
    if let Ok(conn) = w.try_connect("zt", &to, BYTES) {
        return Err(format!(
            "STRICT let plaintext through ({} bytes echoed)",
            conn.echoed
        ));
    }
    let n = agent.wait_access(denied_before + 1, denied);
    if n <= denied_before {
        return Err("the connection failed, but Sluice logged no plaintext denial".into());
    }
    Ok(Outcome {
        bytes: 0,
        group: "-".into(),
        cipher_suite: "- (refused: Sluice logged route=plaintext outcome=denied)".into(),
        ztunnel: "- (not involved)".into(),
    })
}

/// A view of ztunnel's log from now on.
struct Marked<'a> {
    zt: &'a Ztunnel,
    mark: usize,
}

impl Marked<'_> {
    /// ztunnel's log lines since the mark.
    fn since_mark(&self) -> Vec<String> {
        let text = self.zt.text();
        text.get(self.mark..)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

fn zt_mark(zt: &Ztunnel) -> Marked<'_> {
    Marked {
        zt,
        mark: zt.text().len(),
    }
}

/// Sluice's warnings and errors on node `node` after log line `from`.
fn agent_problems(w: &World, node: usize, from: usize) -> String {
    let lines = w.agents[&node].log_lines();
    let problems: Vec<String> = lines
        .iter()
        .skip(from)
        .filter(|l| l["level"] == "WARN" || l["level"] == "ERROR" || l["outcome"] == "refused")
        .map(|l| l.to_string())
        .collect();
    format!("{problems:?}")
}

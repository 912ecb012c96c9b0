//! `cargo xtask`: the one entry point for building, testing, demonstrating and measuring Sluice.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, test, demo and benchmark Sluice")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks (idempotent): nightly rust-src, bpf-linker, bpftool,
    /// iproute2, load tools, bpffs, and the test kube-apiserver.
    Setup,
    /// Build the eBPF object (nightly, bpfel-unknown-none).
    BuildEbpf,
    /// Build the eBPF object, then the agent, the test binaries and the tests (release).
    Build,
    /// Run the whole suite as root (unit and end-to-end); runs `setup` and `build` first.
    Test {
        /// Only tests whose names contain this.
        filter: Option<String>,
    },
    /// Build a two-node, three-pod world, send traffic through it and explain what happened.
    Demo,
    /// Measure Sluice against direct paths: `capture`, `mesh`, `egress`, `scale`, `ingress`,
    /// `upgrade`, or all when omitted.
    Bench {
        /// Which benchmark.
        which: Option<String>,
    },
    /// The cluster box for trying Sluice by hand: `up` starts a control plane, kube-proxy, CNI
    /// and an agent per node and leaves them running; `down` removes every trace.
    Cluster {
        #[command(subcommand)]
        op: ClusterOp,
    },
    /// Fuzz the parsers of untrusted bytes (nightly, cargo-fuzz, installed when missing): list
    /// the targets, or run TARGET (`all`: each, one after another) for SECONDS each, growing
    /// its corpus in tests/fuzz/corpus/TARGET, and print executions and coverage. Not part of
    /// `test`.
    Fuzz {
        /// A target name, or `all`; lists the targets when omitted.
        target: Option<String>,
        /// How long each target runs.
        #[arg(default_value_t = 600)]
        seconds: u64,
    },
    /// Build the container image from deploy/Containerfile (context: the repository, minus what
    /// .containerignore/.dockerignore leave out) with podman or docker, whichever answers.
    Image {
        /// Image reference to tag.
        #[arg(long, default_value = "ghcr.io/sluice-mesh/sluice:latest")]
        tag: String,
    },
    /// Run Sluice next to a ztunnel binary of yours (dedicated mode, local XDS, certificates
    /// from `sluice ca` under one root): Sluice → ztunnel, ztunnel → Sluice under STRICT, and
    /// ztunnel's `COMPLIANCE_POLICY=pqc`; prints a table. As root. Not part of `test`; nothing
    /// here fetches or builds ztunnel.
    Interop {
        /// The ztunnel executable.
        #[arg(long)]
        ztunnel: PathBuf,
    },
    /// Generate CRDs into deploy/ (or, with --check, validate deploy/).
    Manifests {
        #[arg(long)]
        check: bool,
    },
}

#[derive(Subcommand)]
enum ClusterOp {
    /// Build, start the box and return once it is ready (about a minute).
    Up {
        /// Number of nodes (1 to 9).
        #[arg(long, default_value_t = 2)]
        nodes: usize,
    },
    /// Stop the box and remove everything it made.
    Down,
    /// Whether the box runs, its nodes and pods.
    Status,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.cmd {
        Cmd::Setup => setup(&root),
        Cmd::BuildEbpf => build_ebpf(&root),
        Cmd::Build => build(&root),
        Cmd::Test { filter } => test(&root, filter.as_deref()),
        Cmd::Demo => {
            require_root("the demo")?;
            setup(&root)?;
            build(&root)?;
            run(Command::new(root.join("target/release/sluice-demo"))
                .env("SLUICE_BIN", agent_bin(&root)))
        }
        Cmd::Bench { which } => {
            require_root("the benchmarks")?;
            setup(&root)?;
            build(&root)?;
            let mut cmd = Command::new(root.join("target/release/sluice-bench"));
            cmd.env("SLUICE_BIN", agent_bin(&root));
            if let Some(which) = which {
                cmd.arg(which);
            }
            run(&mut cmd)
        }
        Cmd::Interop { ztunnel } => interop(&root, &ztunnel),
        Cmd::Manifests { check } => manifests(&root, check),
        Cmd::Image { tag } => image(&root, &tag),
        Cmd::Fuzz { target, seconds } => fuzz(&root, target.as_deref(), seconds),
        Cmd::Cluster { op } => cluster(&root, op),
    }
}

/// `cargo xtask interop --ztunnel PATH`: checks PATH first, then builds and runs
/// `sluice-interop` under the end-to-end lock.
fn interop(root: &Path, ztunnel: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(ztunnel)
        .with_context(|| format!("--ztunnel {}: no such file", ztunnel.display()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        bail!("--ztunnel {}: not an executable file", ztunnel.display());
    }
    let ztunnel = ztunnel
        .canonicalize()
        .with_context(|| format!("--ztunnel {}", ztunnel.display()))?;
    require_root("the interop runner")?;
    setup(root)?;
    build(root)?;
    let release = release_dir(root);
    say(&format!("interop with {}", ztunnel.display()));
    run(Command::new("flock")
        .arg("/tmp/sluice-e2e.lock")
        .arg(release.join("sluice-interop"))
        .arg("--ztunnel")
        .arg(&ztunnel)
        .env("SLUICE_BIN", release.join("sluice")))
}

/// Where `cargo build --release` puts binaries: `$CARGO_TARGET_DIR/release` or `target/release`.
fn release_dir(root: &Path) -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("release")
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn agent_bin(root: &Path) -> PathBuf {
    root.join("target/release/sluice")
}

fn say(what: &str) {
    eprintln!("xtask: {what}");
}

/// Runs `cmd`, failing with its command line if it fails.
/// `cargo xtask image`: the first container engine whose daemon (or, for podman, whose
/// storage) answers `info` builds deploy/Containerfile.
fn image(root: &Path, tag: &str) -> Result<()> {
    let mut tried = Vec::new();
    for engine in ["podman", "docker"] {
        match Command::new(engine).arg("info").output() {
            Ok(out) if out.status.success() => {
                return run(Command::new(engine).current_dir(root).args([
                    "build",
                    "-f",
                    "deploy/Containerfile",
                    "-t",
                    tag,
                    ".",
                ]));
            }
            Ok(out) => tried.push(format!(
                "{engine}: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .next()
                    .unwrap_or("info failed")
            )),
            Err(e) => tried.push(format!("{engine}: {e}")),
        }
    }
    bail!(
        "no container engine answers (start podman or a docker daemon): {}",
        tried.join("; ")
    )
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!(
            "{what} need root (eBPF, network namespaces, cgroups); run as root, e.g. `sudo -E cargo xtask ...`"
        );
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

const BPF_LINKER_VERSION: &str = "0.10.4";
const APT_TOOLS: &[(&str, &str)] = &[
    // The C compiler aws-lc-sys (rustls's aws-lc-rs provider, for X25519MLKEM768) builds with;
    // its cc builder needs neither cmake nor clang.
    ("cc", "gcc"),
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("iperf3", "iperf3"),
    ("wrk", "wrk"),
    ("iptables", "iptables"),
    ("tcpdump", "tcpdump"),
    ("openssl", "openssl"),
    // The ingress tests' HTTP/1.1, HTTP/2 and HTTPS client.
    ("curl", "curl"),
    // The ingress benchmark's reverse proxy beside Sluice's gateway (not started as a service:
    // setup installs with RUNLEVEL=1).
    ("nginx", "nginx-light"),
    // The mesh benchmark's mutual-TLS TCP tunnel beside Sluice (run by the bench inside the node
    // namespaces, never as a service).
    ("haproxy", "haproxy"),
];

fn setup(root: &Path) -> Result<()> {
    // Nightly's rust-src, for -Z build-std=core.
    let sysroot = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .context("running rustc +nightly (is the nightly toolchain installed?)")?;
    if !sysroot.status.success() {
        bail!(
            "no nightly toolchain: {}",
            String::from_utf8_lossy(&sysroot.stderr)
        );
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        say("nightly rust-src: present");
    } else {
        say("nightly rust-src: installing");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    let linker = Command::new("bpf-linker").arg("--version").output();
    match linker {
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION) => {
            say(&format!("bpf-linker {BPF_LINKER_VERSION}: present"))
        }
        _ => {
            say(&format!(
                "bpf-linker {BPF_LINKER_VERSION}: installing (about 3 minutes)"
            ));
            run(Command::new("cargo").args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
            ]))?;
        }
    }

    let missing: Vec<&str> = APT_TOOLS
        .iter()
        .filter(|(bin, _)| !succeeds(Command::new("sh").args(["-c", &format!("command -v {bin}")])))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        say(
            "system tools (gcc, bpftool, iproute2, iperf3, wrk, iptables, tcpdump, openssl, curl, nginx, haproxy): present",
        );
    } else {
        say(&format!("system tools: installing {}", missing.join(" ")));
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            // invoke-rc.d starts no service (nginx, haproxy) at install.
            .env("RUNLEVEL", "1"))?;
    }

    if succeeds(Command::new("sh").args(["-c", "mount | grep -q ' /sys/fs/bpf type bpf '"])) {
        say("bpffs: mounted at /sys/fs/bpf");
    } else {
        say("bpffs: mounting at /sys/fs/bpf");
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }

    let apiserver = root.join("tests/apiserver/apiserver.sh");
    if apiserver.is_file() {
        run(Command::new("bash").arg(&apiserver).arg("install"))?;
    }
    Ok(())
}

/// Where `build-ebpf` leaves the object that `agent/build.rs` embeds (it names the same path).
const EBPF_OBJECT: &str = "ebpf/programs/target/bpfel-unknown-none/release/sluice-ebpf";

fn build_ebpf(root: &Path) -> Result<()> {
    say("building the eBPF programs (nightly, bpfel-unknown-none)");
    run(Command::new("cargo")
        .current_dir(root.join("ebpf/programs"))
        // The outer (stable) cargo's environment must not leak into the nightly build.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("LD_LIBRARY_PATH")
        .args([
            "+nightly",
            "build",
            "--release",
            "-Z",
            "build-std=core",
            "--target",
            "bpfel-unknown-none",
        ]))?;
    // Without the object agent/build.rs embeds an empty stub (so that plain cargo and editors
    // work on a fresh clone); xtask never ships that.
    check_ebpf_object(&root.join(EBPF_OBJECT))
}

/// Fails unless `object` is a non-empty file: the real programs, not what a stub build embeds.
fn check_ebpf_object(object: &Path) -> Result<()> {
    let len = std::fs::metadata(object)
        .with_context(|| format!("the eBPF build left no object at {}", object.display()))?
        .len();
    if len == 0 {
        bail!(
            "the eBPF object {} is empty: a sluice built from it would have no kernel programs",
            object.display()
        );
    }
    Ok(())
}

/// `cargo` for a step of the build, with the same environment as a `cargo` typed in a shell.
///
/// `cargo xtask` runs inside `cargo run`, which sets `CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME` and
/// the like for xtask. Children inherit them, and cargo compares the build scripts'
/// `rerun-if-env-changed` variables against its own environment: ring's build script watches
/// exactly these, so a build under xtask and one outside it (`.ci/run`'s clippy, a hand-typed
/// `cargo build`) would each find ring dirty and rebuild it with rustls, kube and all above them.
fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root);
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || key.starts_with("CARGO_BIN_")
            || ["CARGO_CRATE_NAME", "CARGO_PRIMARY_PACKAGE", "OUT_DIR"].contains(&&*key)
        {
            cmd.env_remove(&*key);
        }
    }
    cmd
}

/// `cargo build` of every unit a later `test`, `demo` or `bench` uses: the binaries and all
/// test targets, with the same package selection (`--workspace`, hence the same unified
/// features) as every other step. A warm `test` right after `build` then compiles nothing.
fn build(root: &Path) -> Result<()> {
    build_ebpf(root)?;
    say("building the agent, the test binaries and the tests (release)");
    run(cargo(root).args(["build", "--release", "--workspace", "--bins", "--tests"]))
}

fn test(root: &Path, filter: Option<&str>) -> Result<()> {
    require_root("the tests")?;
    setup(root)?;
    build(root)?;
    let filter: Vec<&str> = filter.into_iter().collect();
    say("unit tests");
    run(cargo(root)
        .args(["test", "--release", "--workspace", "--lib", "--bins", "--"])
        .args(&filter))?;
    say("end-to-end tests (one at a time: they share the kernel)");
    run(cargo(root)
        .env("SLUICE_BIN", agent_bin(root))
        .args([
            "test",
            "--release",
            "--workspace",
            "--test",
            "*",
            "--",
            "--test-threads=1",
        ])
        .args(&filter))
}

/// The cargo-fuzz crate, its own workspace (the main one excludes it).
const FUZZ_DIR: &str = "tests/fuzz";
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The fuzz targets (`tests/fuzz/fuzz_targets/*.rs`) with the first line of each one's doc.
fn fuzz_targets(root: &Path) -> Result<Vec<(String, String)>> {
    let dir = root.join(FUZZ_DIR).join("fuzz_targets");
    let mut targets = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let (Some(name), Some("rs")) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|s| s.to_str()),
        ) else {
            continue;
        };
        let text = std::fs::read_to_string(&path)?;
        let about = text
            .lines()
            .find_map(|l| l.strip_prefix("//! "))
            .unwrap_or_default()
            .to_owned();
        targets.push((name.to_owned(), about));
    }
    targets.sort();
    Ok(targets)
}

/// What libFuzzer said about one run.
#[derive(Default)]
struct FuzzReport {
    executions: Option<String>,
    per_second: Option<String>,
    coverage: Option<String>,
    corpus: usize,
    seconds: u64,
    ok: bool,
}

fn fuzz(root: &Path, target: Option<&str>, seconds: u64) -> Result<()> {
    let targets = fuzz_targets(root)?;
    let Some(target) = target else {
        println!("fuzz targets (cargo xtask fuzz TARGET|all [SECONDS]):");
        for (name, about) in &targets {
            println!("  {name:<16} {about}");
        }
        return Ok(());
    };
    let chosen: Vec<&str> = match target {
        "all" => targets.iter().map(|(n, _)| n.as_str()).collect(),
        one if targets.iter().any(|(n, _)| n == one) => vec![one],
        other => bail!("no fuzz target {other:?}; `cargo xtask fuzz` lists them"),
    };
    install_cargo_fuzz()?;
    let mut reports = Vec::new();
    for name in chosen {
        say(&format!("fuzzing {name} for {seconds} s"));
        reports.push((name, fuzz_one(root, name, seconds)?));
    }
    say("fuzzing done:");
    for (name, r) in &reports {
        eprintln!(
            "  {name:<16} {} in {} s: {} executions ({}/s), {}, corpus {} inputs",
            if r.ok { "ok" } else { "FAILED" },
            r.seconds,
            r.executions.as_deref().unwrap_or("?"),
            r.per_second.as_deref().unwrap_or("?"),
            r.coverage.as_deref().unwrap_or("no coverage line"),
            r.corpus,
        );
    }
    let failed: Vec<&str> = reports
        .iter()
        .filter(|(_, r)| !r.ok)
        .map(|(n, _)| *n)
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} failed; the input that did it is in {FUZZ_DIR}/artifacts/<target>/",
            failed.join(", ")
        );
    }
    Ok(())
}

/// Installs the pinned cargo-fuzz when `cargo fuzz` is missing or another version.
fn install_cargo_fuzz() -> Result<()> {
    let out = Command::new("cargo").args(["fuzz", "--version"]).output();
    match out {
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains(CARGO_FUZZ_VERSION) => {
            say(&format!("cargo-fuzz {CARGO_FUZZ_VERSION}: present"));
            Ok(())
        }
        _ => {
            say(&format!(
                "cargo-fuzz {CARGO_FUZZ_VERSION}: installing (about 2 minutes)"
            ));
            run(Command::new("cargo").args([
                "install",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ_VERSION,
                "--locked",
                "--force",
            ]))
        }
    }
}

/// Runs one target for `seconds`, echoing libFuzzer's output and keeping its last numbers.
fn fuzz_one(root: &Path, name: &str, seconds: u64) -> Result<FuzzReport> {
    use std::io::{BufRead, BufReader};
    let corpus = root.join(FUZZ_DIR).join("corpus").join(name);
    std::fs::create_dir_all(&corpus)?;
    let started = std::time::Instant::now();
    let mut child = cargo(root)
        // The outer (stable) cargo's environment must not leak into the nightly build.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .args(["+nightly", "fuzz", "run", "--fuzz-dir", FUZZ_DIR])
        // Safe Rust needs no AddressSanitizer, and without it a shared two-core machine runs
        // several times the executions; debug assertions (overflow checks) stay on.
        .args(["--sanitizer", "none", "--debug-assertions", name])
        .arg(&corpus)
        .args([
            "--",
            &format!("-max_total_time={seconds}"),
            // An input that takes this long is a finding: parsing must be bounded work.
            "-timeout=10",
            "-print_final_stats=1",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo +nightly fuzz run")?;
    let mut report = FuzzReport::default();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let line = line?;
            eprintln!("{line}");
            let stat = |key: &str| {
                line.strip_prefix(key)
                    .map(|v| v.trim_start_matches(':').trim().to_owned())
            };
            if let Some(v) = stat("stat::number_of_executed_units") {
                report.executions = Some(v);
            } else if let Some(v) = stat("stat::average_exec_per_sec") {
                report.per_second = Some(v);
            } else if let Some(at) = line.find("cov: ") {
                // `#N ... cov: C ft: F corp: ...`: keep coverage and features.
                let tail = &line[at..];
                let end = tail.find(" corp:").unwrap_or(tail.len());
                report.coverage = Some(tail[..end].to_owned());
            }
        }
    }
    report.ok = child.wait()?.success();
    report.seconds = started.elapsed().as_secs();
    report.corpus = std::fs::read_dir(&corpus)?.count();
    Ok(report)
}

/// Where a running box keeps its pid, log, kubeconfig and `ready` file.
const BOX_DIR: &str = "/run/sluice-box";

fn box_pid() -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(Path::new(BOX_DIR).join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

fn cluster(root: &Path, op: ClusterOp) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let dir = Path::new(BOX_DIR);
    let kubectl = || {
        let mut cmd = Command::new("kubectl");
        cmd.env("KUBECONFIG", dir.join("kubeconfig"));
        cmd
    };
    match op {
        ClusterOp::Up { nodes } => {
            require_root("the cluster box")?;
            if let Some(pid) = box_pid() {
                bail!("a box already runs (pid {pid}); `cargo xtask cluster down` first");
            }
            setup(root)?;
            build(root)?;
            let _ = std::fs::remove_dir_all(dir);
            std::fs::create_dir_all(dir).with_context(|| format!("creating {BOX_DIR}"))?;
            let log = std::fs::File::create(dir.join("box.log"))?;
            let mut cmd = Command::new(root.join("target/release/sluice-box"));
            cmd.arg(dir)
                .arg(nodes.to_string())
                .env("SLUICE_BIN", agent_bin(root))
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            // Its own session: the box outlives this command and the terminal.
            // SAFETY: setsid is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    libc_setsid();
                    Ok(())
                });
            }
            let mut child = cmd.spawn().context("starting sluice-box")?;
            std::fs::write(dir.join("pid"), child.id().to_string())?;
            say("starting the box (control plane, kube-proxy, CNI, agents)");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
            while !dir.join("ready").exists() {
                if let Some(status) = child.try_wait()? {
                    let log = std::fs::read_to_string(dir.join("box.log")).unwrap_or_default();
                    bail!("the box exited ({status}) before it was ready:\n{log}");
                }
                if std::time::Instant::now() > deadline {
                    bail!("the box was not ready within 300 s; see {BOX_DIR}/box.log");
                }
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            print!("{}", std::fs::read_to_string(dir.join("ready"))?);
            println!("try: KUBECONFIG={BOX_DIR}/kubeconfig kubectl get nodes,pods -A");
            println!("stop: cargo xtask cluster down");
            Ok(())
        }
        ClusterOp::Down => {
            let Some(pid) = box_pid() else {
                say("no box runs");
                let _ = std::fs::remove_dir_all(dir);
                return Ok(());
            };
            run(Command::new("kill").args(["-TERM", &pid.to_string()]))?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while Path::new(&format!("/proc/{pid}")).exists() {
                if std::time::Instant::now() > deadline {
                    bail!("the box (pid {pid}) did not stop within 120 s");
                }
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            let _ = std::fs::remove_dir_all(dir);
            say("the box is down");
            Ok(())
        }
        ClusterOp::Status => {
            let Some(pid) = box_pid() else {
                println!("no box runs (`cargo xtask cluster up` starts one)");
                return Ok(());
            };
            println!("box running, pid {pid}");
            print!(
                "{}",
                std::fs::read_to_string(dir.join("ready")).unwrap_or_default()
            );
            run(kubectl().args(["get", "nodes,pods,services", "-A", "-o", "wide"]))
        }
    }
}

unsafe extern "C" {
    #[link_name = "setsid"]
    fn libc_setsid() -> i32;
}

fn manifests(root: &Path, check: bool) -> Result<()> {
    // The binary `build` made: a `cargo run -p sluice` would resolve features for the agent
    // alone (without tempfile, rustix leaves bitflags' `std` off) and rebuild half the tree.
    build(root)?;
    let mut cmd = Command::new(agent_bin(root));
    cmd.args(["manifests", "--dir"]).arg(root.join("deploy"));
    if check {
        cmd.arg("--check");
    }
    run(&mut cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_ebpf_object_is_refused() {
        let dir = env::temp_dir().join(format!("xtask-object-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let object = dir.join("sluice-ebpf");

        let missing = check_ebpf_object(&object).unwrap_err().to_string();
        assert!(missing.contains("left no object"), "{missing}");

        std::fs::write(&object, b"").unwrap();
        let empty = check_ebpf_object(&object).unwrap_err().to_string();
        assert!(empty.contains("no kernel programs"), "{empty}");

        std::fs::write(&object, b"\x7fELF").unwrap();
        check_ebpf_object(&object).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_object_path_matches_the_agent_build_script() {
        let build_rs = std::fs::read_to_string(workspace_root().join("agent/build.rs")).unwrap();
        assert!(
            build_rs.contains(&format!("\"{EBPF_OBJECT}\"")),
            "agent/build.rs"
        );
    }
}

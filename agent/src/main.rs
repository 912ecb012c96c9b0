//! The `sluice` binary.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use sluice::redirect::enroll::{self, Request, Sandbox};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Sluice node agent: eBPF capture and HBONE node proxy"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        global = true,
        env = "SLUICE_LOG_FORMAT"
    )]
    log_format: LogFormat,
    /// Runtime threads. For `run`: 1 runs everything on one thread (no cross-thread
    /// wake-ups), more uses a work-stealing pool. For `gateway`: the number of workers, each a
    /// single-threaded runtime with its own upstream pools. 0 means one per CPU.
    #[arg(
        long,
        default_value_t = 0,
        global = true,
        env = "SLUICE_WORKER_THREADS"
    )]
    worker_threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent.
    Run {
        /// Config file: an AgentConfig document and Kubernetes-shaped resources.
        #[arg(long)]
        config: PathBuf,
        /// Node name (overrides the file and NODE_NAME).
        #[arg(long)]
        node: Option<String>,
    },
    /// Run an ingress gateway: serve the listeners of the Gateways of `spec.ingress.classes`
    /// and hand requests to backends over HBONE.
    Gateway {
        /// Config file: an AgentConfig document (its `spec.ingress`) and, in file mode,
        /// Kubernetes-shaped resources.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the mesh CA service: Istio's certificate API (gRPC over TLS), signing a workload
    /// certificate only for a pod on the calling agent's node. Holds the root key; nodes never do.
    Ca {
        #[arg(long, default_value = "0.0.0.0:15012", env = "SLUICE_CA_LISTEN")]
        listen: std::net::SocketAddr,
        /// The mesh root certificate (PEM).
        #[arg(long, default_value = "/etc/sluice/ca/root-cert.pem")]
        root_cert_file: PathBuf,
        /// The mesh root's private key (PEM, PKCS#8).
        #[arg(long, default_value = "/etc/sluice/ca/root-key.pem")]
        root_key_file: PathBuf,
        #[arg(long, default_value = "cluster.local", env = "SLUICE_TRUST_DOMAIN")]
        trust_domain: String,
        /// DNS names (or IPs) of the serving certificate; agents check the one they dial.
        #[arg(
            long = "serving-name",
            value_delimiter = ',',
            default_value = "sluice-ca.sluice-system.svc,sluice-ca.sluice-system.svc.cluster.local"
        )]
        serving_names: Vec<String>,
        /// The audience callers' tokens must be issued for.
        #[arg(long, default_value = "istio-ca")]
        token_audience: String,
        /// ServiceAccounts (namespace/name) allowed to ask for identities of pods on their node.
        #[arg(
            long = "agent-service-account",
            value_delimiter = ',',
            default_value = "sluice-system/sluice"
        )]
        agent_service_accounts: Vec<String>,
        /// Longest workload certificate lifetime granted.
        #[arg(long, default_value = "24h")]
        max_ttl: sluice::config::CertTtl,
        /// Kubeconfig (default: in-cluster, or KUBECONFIG).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
    },
    /// Chained CNI plugin (reads CNI_* variables and stdin, as the CNI spec says).
    Cni,
    /// Talk to a running agent's enrollment API.
    Enroll {
        #[arg(long, default_value = sluice::redirect::cni::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[command(subcommand)]
        op: EnrollOp,
    },
    /// Write the CRDs Sluice reads into DIR/crds, or with --check validate every manifest in DIR.
    Manifests {
        #[arg(long, default_value = "deploy")]
        dir: PathBuf,
        /// Validate instead of writing: YAML parses, CRDs current, AgentConfig valid, RBAC exact.
        #[arg(long)]
        check: bool,
    },
    /// Render the install (deploy/ with values) as YAML.
    Manifest {
        #[command(subcommand)]
        op: ManifestOp,
    },
    /// Install Sluice on the cluster (server-side apply, in order: namespace, RBAC, config, CA,
    /// DaemonSet with the CNI installer, GatewayClass).
    Install {
        #[command(flatten)]
        values: ValuesArgs,
        /// Let the API server check every object without persisting anything.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
    },
    /// Remove Sluice from the cluster (the DaemonSet first, so agents take capture off their
    /// nodes; then the rest in reverse order). CRDs stay.
    Uninstall {
        #[command(flatten)]
        values: ValuesArgs,
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
    },
    /// Put the CNI plugin, its kubeconfig and its conflist entry on the node; with --watch keep
    /// them in place (the DaemonSet's `install-cni` container) and remove them when Sluice is
    /// uninstalled.
    InstallCni(InstallCniArgs),
    /// Make a mesh root and print it as the Secret the CA Deployment mounts, and its certificate
    /// alone as the ConfigMap agents verify the CA with (`sluice root-secret | kubectl apply -f -`).
    RootSecret {
        /// Trust domain of the root (the AgentConfig's `trustDomain`).
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long, default_value = "sluice-system")]
        namespace: String,
        #[arg(long, default_value = ROOT_SECRET)]
        name: String,
    },
    /// Remove from this node everything Sluice put there: pins (detaching its programs), pod
    /// routing, egress pinning (addresses, rules, routes, table 1339, the `sluice-egress`
    /// interface) and the CNI plugin and conflist entry. Run it after the agent has stopped.
    Cleanup {
        #[arg(long, default_value = "/sys/fs/bpf/sluice")]
        pin_path: PathBuf,
        /// The agent's state directory (its records of pod sandboxes).
        #[arg(long, default_value = "/var/run/sluice")]
        state_dir: PathBuf,
        /// The node's CNI configuration directory.
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        /// The node's CNI binary directory.
        #[arg(long, default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
    },
    /// This node's agent at a glance: captured pods, certificates, HBONE pool, config in force,
    /// rejected resources, limits (read from the agent's admin endpoint).
    Status {
        /// The agent's admin endpoint (its `spec.adminAddr`).
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
        #[arg(short, long, value_enum, default_value = "table")]
        output: sluice::operator::Output,
    },
    /// What the agent knows, in the shape `istioctl ztunnel-config` shows (read from the admin
    /// endpoint's `/config_dump?format=ztunnel`).
    Dump {
        #[arg(value_enum)]
        kind: sluice::operator::DumpKind,
        /// Only this namespace's entries.
        #[arg(short, long)]
        namespace: Option<String>,
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
        #[arg(short, long, value_enum, default_value = "table")]
        output: sluice::operator::Output,
    },
    /// Print a shell completion script (`source <(sluice completion bash)`).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum ManifestOp {
    /// Print the rendered objects as one YAML stream.
    Generate {
        #[command(flatten)]
        values: ValuesArgs,
    },
}

/// Install values: a file, then `--set` on top.
#[derive(clap::Args)]
struct ValuesArgs {
    /// Values file (YAML), in the style of ztunnel's chart.
    #[arg(short = 'f', long = "values")]
    file: Option<PathBuf>,
    /// key=value over the file (e.g. `--set tag=1.2.0 --set crds.install=true`).
    #[arg(long = "set")]
    sets: Vec<String>,
}

impl ValuesArgs {
    fn load(&self) -> Result<sluice::install::values::Values> {
        let text = match &self.file {
            Some(p) => Some(
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            ),
            None => None,
        };
        Ok(sluice::install::values::Values::load(
            text.as_deref(),
            &self.sets,
        )?)
    }
}

#[derive(clap::Args)]
struct InstallCniArgs {
    /// The node's CNI binary directory, as mounted.
    #[arg(long, default_value = "/host/opt/cni/bin")]
    bin_dir: PathBuf,
    /// The node's CNI configuration directory, as mounted.
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// The node's CNI configuration directory as the host (and so the plugin) sees it;
    /// default: --conf-dir (running on the node itself). The DaemonSet passes /etc/cni/net.d.
    #[arg(long)]
    host_conf_dir: Option<PathBuf>,
    /// The agent's enrollment socket as the host sees it.
    #[arg(long, default_value = sluice::redirect::cni::DEFAULT_SOCKET)]
    enrollment_socket: PathBuf,
    /// Namespaces the plugin passes through (Sluice's own, POD_NAMESPACE, is always added).
    #[arg(
        long = "exclude-namespace",
        value_delimiter = ',',
        default_value = "kube-system"
    )]
    exclude_namespaces: Vec<String>,
    /// The API server; default: from KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT.
    #[arg(long)]
    server: Option<String>,
    #[arg(
        long,
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    token_file: PathBuf,
    #[arg(
        long,
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    ca_file: PathBuf,
    /// Keep running: repair drift every --interval; on SIGTERM, remove everything if Sluice's
    /// DaemonSet is being deleted (uninstall), keep it otherwise (restart, upgrade).
    #[arg(long)]
    watch: bool,
    #[arg(long, default_value = "2s", value_parser = humantime_duration)]
    interval: std::time::Duration,
    /// The DaemonSet (in POD_NAMESPACE) whose deletion means uninstall.
    #[arg(long, default_value = "sluice")]
    daemonset: String,
    /// Remove the plugin, its kubeconfig and the conflist entry, then exit.
    #[arg(long, conflicts_with = "watch")]
    uninstall: bool,
}

fn humantime_duration(s: &str) -> Result<std::time::Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 2s or 500ms"))?;
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(n)),
        "s" | "" => Ok(std::time::Duration::from_secs(n)),
        _ => Err(format!("{s:?}: expected e.g. 2s or 500ms")),
    }
}

#[derive(Subcommand)]
enum EnrollOp {
    /// Report a pod sandbox.
    Add {
        #[arg(long)]
        uid: String,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        netns: PathBuf,
        #[arg(long = "ip", required = true)]
        ips: Vec<std::net::IpAddr>,
    },
    /// Forget a pod sandbox.
    Del {
        #[arg(long)]
        uid: String,
    },
    /// List sandboxes.
    List,
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::{EnvFilter, fmt};
    // SLUICE_LOG first, then the RUST_LOG every Rust tool reads.
    let filter = EnvFilter::try_from_env("SLUICE_LOG")
        .or_else(|_| EnvFilter::try_from_env("RUST_LOG"))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// The agent's tokio runtime: current-thread for 1 worker, multi-thread otherwise.
fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    builder.enable_all().build()
}

/// The Secret holding the mesh root and its key, as `deploy/05-ca.yaml` mounts it.
const ROOT_SECRET: &str = "sluice-root-ca";
/// The ConfigMap with the root certificate alone, as `deploy/04-daemonset.yaml` mounts it.
const ROOT_CONFIG_MAP: &str = "sluice-ca-root-cert";

fn main() -> Result<()> {
    // A container runtime runs `/opt/cni/bin/sluice` with no arguments and the command in
    // `CNI_COMMAND` (CNI spec), so that invocation is the CNI plugin.
    if std::env::args_os().len() == 1 && std::env::var_os("CNI_COMMAND").is_some() {
        std::process::exit(sluice::redirect::cni::main());
    }
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Cni => std::process::exit(sluice::redirect::cni::main()),
        Cmd::Run { config, node } => {
            sluice::memory::limit_arenas();
            init_logging(cli.log_format);
            let rt = runtime(cli.worker_threads)?;
            rt.block_on(sluice::app::run(sluice::app::RunArgs { config, node }))
        }
        Cmd::Ca {
            listen,
            root_cert_file,
            root_key_file,
            trust_domain,
            serving_names,
            token_audience,
            agent_service_accounts,
            max_ttl,
            kubeconfig,
        } => {
            init_logging(cli.log_format);
            let rt = runtime(cli.worker_threads)?;
            rt.block_on(sluice::ca_service::run(sluice::ca_service::CaServiceArgs {
                listen,
                root_cert_file,
                root_key_file,
                trust_domain,
                serving_names,
                token_audience,
                agent_service_accounts,
                max_ttl,
                kubeconfig,
            }))?;
            Ok(())
        }
        Cmd::Gateway { config } => {
            sluice::memory::limit_arenas();
            init_logging(cli.log_format);
            // Accept loops, sources and admin on one thread; connections on the workers.
            let rt = runtime(1)?;
            rt.block_on(sluice::gateway::run(sluice::gateway::GatewayArgs {
                config,
                workers: cli.worker_threads,
            }))
        }
        Cmd::Enroll { socket, op } => {
            let req = match op {
                EnrollOp::Add {
                    uid,
                    namespace,
                    name,
                    netns,
                    ips,
                } => Request::Add {
                    pod: Sandbox {
                        uid,
                        namespace,
                        name,
                        netns,
                        cgroup: None,
                        ips,
                    },
                },
                EnrollOp::Del { uid } => Request::Del { uid },
                EnrollOp::List => Request::List,
            };
            let resp = enroll::call(&socket, &req)?;
            println!("{}", serde_json::to_string_pretty(&resp)?);
            if !resp.ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Manifests { dir, check } => {
            use sluice::sources::kube::manifests;
            if check {
                for line in manifests::check(&dir)? {
                    eprintln!("ok: {line}");
                }
            } else {
                for path in manifests::write(&dir)? {
                    eprintln!("wrote {}", path.display());
                }
            }
            Ok(())
        }
        Cmd::InstallCni(args) => install_cni(args, cli.log_format),
        Cmd::Manifest {
            op: ManifestOp::Generate { values },
        } => {
            let rendered = sluice::install::render::render(&values.load()?)?;
            print!("{}", rendered.to_yaml());
            Ok(())
        }
        Cmd::Install {
            values,
            dry_run,
            kubeconfig,
        } => {
            init_logging(cli.log_format);
            let mut values = values.load()?;
            runtime(1)?.block_on(async {
                use sluice::install::{apply, render};
                let client = sluice::sources::kube::client(kubeconfig.as_deref()).await?;
                if values.daemon_set_max_surge && !apply::supports_daemonset_surge(&client).await? {
                    eprintln!(
                        "note: this API server predates DaemonSet maxSurge (1.22): the agents roll \
                         with maxUnavailable: 1 (capture fails closed on a node while its agent restarts)"
                    );
                    values.daemon_set_max_surge = false;
                }
                let rendered = render::render(&values)?;
                for step in apply::install(&client, &rendered, dry_run).await? {
                    println!("{:?}: {}", step.outcome, step.object);
                }
                anyhow::Ok(())
            })
        }
        Cmd::Uninstall { values, kubeconfig } => {
            init_logging(cli.log_format);
            let values = values.load()?;
            runtime(1)?.block_on(async {
                use sluice::install::{apply, render};
                let client = sluice::sources::kube::client(kubeconfig.as_deref()).await?;
                let rendered = render::render(&values)?;
                for step in apply::uninstall(&client, &rendered).await? {
                    println!("{:?}: {}", step.outcome, step.object);
                }
                anyhow::Ok(())
            })
        }
        Cmd::RootSecret {
            trust_domain,
            namespace,
            name,
        } => {
            let ca = sluice::identity::BuiltinCa::generate(&trust_domain)?;
            let (cert, key) = ca.root_pem_pair();
            let secret = serde_json::json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "namespace": namespace,
                             "labels": {"app.kubernetes.io/name": "sluice"}},
                "type": "Opaque",
                "stringData": {"root-cert.pem": cert, "root-key.pem": key},
            });
            // The root certificate alone, for the agents: a Secret a DaemonSet mounted could be
            // read by every node (the node authorizer lets a kubelet read its pods' Secrets).
            let root_config_map = serde_json::json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": ROOT_CONFIG_MAP, "namespace": namespace,
                             "labels": {"app.kubernetes.io/name": "sluice"}},
                "data": {"root-cert.pem": ca.root_pem()},
            });
            print!("{}", serde_yaml::to_string(&secret)?);
            print!("---\n{}", serde_yaml::to_string(&root_config_map)?);
            Ok(())
        }
        Cmd::Completion { shell } => {
            print_completion(shell, &mut std::io::stdout());
            Ok(())
        }
        Cmd::Status { admin, output } => {
            use sluice::operator::{Output, render, status};
            let status = runtime(1)?.block_on(status(admin))?;
            match output {
                Output::Table => print!("{}", render::status_text(&status)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
                Output::Yaml => print!("{}", serde_yaml::to_string(&status)?),
            }
            Ok(())
        }
        Cmd::Dump {
            kind,
            namespace,
            admin,
            output,
        } => {
            use sluice::operator::{Output, dump, render};
            let items = runtime(1)?.block_on(dump(admin, kind, namespace.as_deref()))?;
            match output {
                Output::Table => print!("{}", render::dump_table(kind, &items)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&items)?),
                Output::Yaml => print!("{}", serde_yaml::to_string(&items)?),
            }
            Ok(())
        }
        Cmd::Cleanup {
            pin_path,
            state_dir,
            cni_conf_dir,
            cni_bin_dir,
        } => {
            init_logging(cli.log_format);
            let cleanup = sluice::cleanup::Cleanup {
                pin_path,
                state_dir,
                cni_conf_dir: sluice::cleanup::if_dir(&cni_conf_dir),
                cni_bin_dir: sluice::cleanup::if_dir(&cni_bin_dir),
            };
            for line in runtime(1)?.block_on(cleanup.run())? {
                eprintln!("removed {line}");
            }
            Ok(())
        }
    }
}

/// `sluice install-cni`.
fn install_cni(args: InstallCniArgs, log_format: LogFormat) -> Result<()> {
    use sluice::redirect::cni_install;
    if args.uninstall {
        for path in cni_install::uninstall(&args.bin_dir, &args.conf_dir)? {
            eprintln!("removed or changed {}", path.display());
        }
        return Ok(());
    }
    let server = match args.server {
        Some(s) => s,
        None => {
            let var = |k: &str| {
                std::env::var(k).with_context(|| format!("{k} is not set (or pass --server)"))
            };
            let host = var("KUBERNETES_SERVICE_HOST")?;
            let port = var("KUBERNETES_SERVICE_PORT")?;
            // An IPv6 service address needs brackets in a URL.
            if host.contains(':') {
                format!("https://[{host}]:{port}")
            } else {
                format!("https://{host}:{port}")
            }
        }
    };
    let own_namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "sluice-system".into());
    let mut exclude_namespaces = args.exclude_namespaces;
    if !exclude_namespaces.contains(&own_namespace) {
        exclude_namespaces.push(own_namespace.clone());
    }
    let install = cni_install::InstallCni {
        host_conf_dir: args.host_conf_dir.unwrap_or_else(|| args.conf_dir.clone()),
        bin_dir: args.bin_dir,
        conf_dir: args.conf_dir,
        server,
        token_file: args.token_file,
        ca_file: args.ca_file,
        enrollment_socket: args.enrollment_socket,
        exclude_namespaces,
    };
    if !args.watch {
        for path in install.run()?.written {
            eprintln!("wrote {}", path.display());
        }
        return Ok(());
    }
    init_logging(log_format);
    let rt = runtime(1)?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        install
            .watch(args.interval, async {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            })
            .await;
        let asked = async {
            let client = sluice::sources::kube::client(None).await?;
            sluice::sources::kube::uninstall::uninstalling(client, &own_namespace, &args.daemonset)
                .await
        };
        match asked.await {
            Ok(true) => {
                let removed = install.uninstall()?;
                tracing::info!(?removed, "Sluice is being uninstalled: CNI plugin and entry removed");
            }
            Ok(false) => tracing::info!("stopping for a restart or upgrade: the CNI entry stays"),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot tell uninstall from restart; the CNI entry stays"),
        }
        anyhow::Ok(())
    })
}

/// Writes `shell`'s completion script for the whole command line to `out`.
fn print_completion(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    use clap::CommandFactory;
    clap_complete::generate(shell, &mut Cli::command(), "sluice", out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_scripts_know_every_subcommand() {
        use clap::CommandFactory;
        let names: Vec<String> = Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_owned())
            .collect();
        assert!(names.len() >= 10, "{names:?}");
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            print_completion(shell, &mut out);
            let script = String::from_utf8(out).expect("utf-8");
            for name in &names {
                assert!(script.contains(name.as_str()), "{shell}: no {name}");
            }
            assert!(script.contains("pin-path"), "{shell}: no cleanup flags");
        }
    }
}

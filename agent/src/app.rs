//! `sluice run`: wires sources → state → consumers.
use std::{path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    config::AgentConfig,
    netns::HomeNetns,
    pods::PodManager,
    proxy::ProxyInputs,
    redirect::{
        ebpf::{Capture, CaptureSettings},
        enroll,
    },
    sources::file,
    state,
};

/// Command-line overrides for `sluice run`.
#[derive(Debug, Default)]
pub struct RunArgs {
    pub config: PathBuf,
    pub node: Option<String>,
}

/// Loads the config file, applying overrides and validating.
pub fn load_config(args: &RunArgs) -> Result<file::LocalFile> {
    let mut local = file::load(&args.config)?;
    if let Some(node) = args
        .node
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok())
    {
        local.agent.node_name = node;
    }
    local
        .agent
        .validate()
        .with_context(|| format!("{}", args.config.display()))?;
    Ok(local)
}

/// Runs the agent until SIGINT/SIGTERM.
pub async fn run(args: RunArgs) -> Result<()> {
    let local = load_config(&args)?;
    let agent: AgentConfig = local.agent.clone();
    info!(node = %agent.node_name, config = %args.config.display(), "starting sluice agent");

    // Sources → state.
    let (publisher, state) = state::channel();
    let source =
        crate::sources::start(&agent, local.resources, publisher, Some(&args.config)).await?;

    // Capture.
    let home = HomeNetns::capture().context("opening the agent's own network namespace")?;
    let settings = CaptureSettings::from_config(&agent.capture, agent.ebpf_log_level.as_u32());
    let capture =
        Capture::load(&agent.bpf_pin_path, &agent.cgroup_root, &settings).with_context(|| {
            format!(
                "loading eBPF programs (pins under {})",
                agent.bpf_pin_path.display()
            )
        })?;
    let ca = crate::identity::ca_from_config(&agent.identity, &agent.trust_domain)
        .context("setting up the mesh CA")?;
    let identity = Arc::new(crate::identity::SecretManager::with_key_exchange(
        ca,
        agent.identity.workload_cert_ttl.get(),
        agent.tls.key_exchange,
    ));
    tracing::info!(
        key_exchange = %agent.tls.key_exchange,
        groups = ?crate::identity::kx_group_names(agent.tls.key_exchange),
        "mesh TLS key exchange"
    );
    // Observability: Prometheus metrics, readiness, and the loopback-only config dump.
    let metrics = Arc::new(crate::admin::metrics::Metrics::new());
    let ready = crate::admin::server::Ready::new();
    if let crate::sources::Running::Kube(kube) = &source {
        tokio::spawn(block_while_forbidden(kube.source.rebuilt(), ready.clone()));
    }
    let certs: Arc<std::sync::Mutex<Vec<crate::identity::CertInfo>>> = Arc::default();
    let metrics_server =
        crate::admin::server::serve_metrics(agent.metrics_addr, metrics.clone()).await?;
    let ready_server =
        crate::admin::server::serve_readiness(agent.readiness_addr, ready.clone()).await?;
    let dump: crate::admin::server::ConfigDump = {
        let state = state.clone();
        let certs = certs.clone();
        let tls = agent.tls.clone();
        let upgrade = agent.upgrade.clone();
        Arc::new(move |w: &mut crate::admin::server::DumpWriter<'_>| {
            let certs = certs.lock().map(|c| c.clone()).unwrap_or_default();
            let current = state.current();
            if w.format() == crate::admin::server::DumpFormat::Ztunnel {
                return crate::admin::ztunnel_dump::write(w, &current, &certs);
            }
            current.visit_sections(&mut MeshStateDump(w))?;
            w.section(None, "certificates", &certs)?;
            w.section(None, "tls", &tls)?;
            w.section(None, "upgrade", &upgrade)
        })
    };
    let nofile = raise_nofile_limit();
    let per_node = node_connection_cap(agent.proxy.max_connections_per_node.get(), nofile);
    // Enrollment requests (CNI plugin, discovery, `/status`) to the pod manager.
    let (tx, rx) = mpsc::channel(64);
    let status = status_report(StatusInputs {
        node: agent.node_name.clone(),
        state: state.clone(),
        ready: ready.clone(),
        certs: certs.clone(),
        pool: metrics.hbone_pool_stats(),
        pods: tx.clone(),
        limits: crate::admin::status::Limits {
            max_connections_per_pod: agent.proxy.max_connections_per_pod.get(),
            max_connections_per_node: per_node,
            open_files: nofile,
        },
    });
    let admin_server = crate::admin::server::serve_admin(agent.admin_addr, dump, status).await?;
    {
        let identity = identity.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            loop {
                let now = identity.certificates().await;
                metrics.set_certificates(&now);
                if let Ok(mut c) = certs.lock() {
                    *c = now;
                }
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        });
    }
    // What the node proxy does not enforce of each policy, logged once per policy.
    tokio::spawn(crate::policy::PolicyNotices::default().run(state.clone()));
    tokio::spawn(watch_mesh_config(state.clone(), metrics.clone()));
    let egress = start_egress(&agent, &state, metrics.clone());
    let (drain_trigger, drain_watcher) = crate::proxy::drain::channel();
    let proxy = ProxyInputs {
        identity: identity.clone(),
        state: state.clone(),
        capture: capture.maps(),
        home: home.clone(),
        node_name: agent.node_name.clone(),
        egress,
        metrics: metrics.clone(),
        hbone: Arc::new(agent.hbone.clone()),
        balance: Arc::default(),
        host: Arc::new(crate::proxy::host::HostAddresses::new(
            agent.capture.node_traffic_bypasses_policy,
        )),
        caps: Arc::new(crate::proxy::limits::ConnectionCaps::new(
            agent.proxy.max_connections_per_pod.get(),
            per_node,
            metrics.clone(),
        )),
        unauthenticated: Arc::new(crate::proxy::limits::UnauthenticatedGate::new(
            agent.hbone.server.max_unauthenticated.get(),
            agent.hbone.server.max_unauthenticated_per_source.get(),
            metrics.clone(),
        )),
        window_budget: Arc::new(crate::proxy::window_budget::WindowBudget::new(
            agent.hbone.server.window_budget,
            metrics.clone(),
        )),
        unknown_hold: agent.proxy.unknown_workload_hold(),
        drain: drain_watcher,
    };
    let caps = proxy.caps.clone();
    // Upgrades: the listeners of an agent still running on this node are served from here on.
    let handover_path = agent.upgrade.socket(&agent.state_dir);
    let mut handover = take_over(&handover_path).await;
    if let Some(h) = handover.as_mut() {
        let carried = std::mem::take(&mut h.certs);
        let offered = carried.len();
        let report = identity.adopt(carried).await;
        info!(
            offered,
            adopted = report.adopted,
            "workload certificates carried over from the previous agent"
        );
        for (identity, reason) in &report.left_out {
            warn!(%identity, %reason, "carried certificate not used; it is issued anew on first need");
        }
    }
    let taken = handover.as_ref().map(|h| h.taken.clone());
    let listeners = crate::handover::Listeners::default();
    let mut writers = Vec::new();
    if let Some(gw) = &agent.egress.gateway {
        let key = crate::handover::egress_gateway_key(gw.listen);
        let listener = match taken.as_ref().and_then(|t| t.take(&key)) {
            Some(fd) => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)?
            }
            None => crate::proxy::socket::listen_tcp(gw.listen)
                .with_context(|| format!("egress gateway listener {}", gw.listen))?,
        };
        listeners.register(key, &listener)?;
        info!(listen = %gw.listen, "egress gateway role");
        writers.push(tokio::spawn(crate::proxy::egress_gateway::serve(
            listener,
            proxy.clone(),
        )));
    }
    let mut manager = PodManager::new(capture, home.clone(), &agent.state_dir, proxy)
        .with_context(|| format!("state directory {}", agent.state_dir.display()))?
        .with_handover(listeners.clone(), taken);
    if agent.kube.enabled {
        // Captured pods carry `ambient.istio.io/redirection: enabled`, as under Istio's CNI.
        match crate::sources::kube::client(agent.kube.kubeconfig.as_deref()).await {
            Ok(client) => {
                let (tx, rx) = mpsc::unbounded_channel();
                manager = manager.with_captured_notices(tx);
                writers.push(tokio::spawn(crate::sources::kube::annotate::run(
                    client, rx,
                )));
            }
            Err(e) => warn!(error = %e, "no Kubernetes client to annotate captured pods"),
        }
    }
    manager.restore();
    if handover.is_some() {
        // Capture the known pods now, on the listeners handed over, before the previous agent
        // is told to stop accepting.
        manager.reconcile(&state.current()).await;
        let pods = manager.finish_adoption();
        info!(pods, "pods captured on handed-over listeners");
    }
    let (adopted_tx, mut adopted) = tokio::sync::watch::channel(false);
    let handover_socket = crate::handover::bind(&handover_path)?;
    let carrier = identity.clone();
    crate::handover::spawn_server(
        handover_socket,
        listeners.clone(),
        Box::new(move || carrier.carry_blocking()),
        adopted_tx,
    )?;
    if let Some(h) = handover
        && let Err(e) = h.adopted()
    {
        // It drains when its successor closes the socket too; it keeps serving otherwise.
        warn!(error = %e, "telling the previous agent that its listeners are adopted");
    }

    if agent.kube.enabled && agent.kube.discover_sandboxes {
        // On a cluster node: find the sandboxes of this node's mesh pods without the CNI plugin.
        let settings = crate::pods::discover::DiscoverSettings::new(&agent.node_name);
        writers.push(tokio::spawn(crate::pods::discover::run(
            settings,
            home,
            state.clone(),
            tx.clone(),
        )));
    }
    let listener = enroll::bind(&agent.enrollment_socket)
        .with_context(|| format!("enrollment socket {}", agent.enrollment_socket.display()))?;
    writers.push(tokio::spawn(enroll::serve(listener, tx)));
    let manager_task = tokio::spawn(manager.run(rx, state.clone()));
    ready.set_ready();
    info!(socket = %agent.enrollment_socket.display(), "ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut manager_task = manager_task;
    let mut terminated = false;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("interrupted"),
        _ = term.recv() => {
            info!("terminated");
            terminated = true;
        }
        r = &mut manager_task => { r.context("pod manager stopped")?; }
        _ = adopted.wait_for(|a| *a) => {
            // A successor serves the listeners now: stop accepting and writing capture state,
            // and let the connections in flight finish.
            manager_task.abort();
            for w in &writers {
                w.abort();
            }
            listeners.clear();
            for server in [&metrics_server, &ready_server, &admin_server] {
                server.abort();
            }
            drain_trigger.start();
            drain(&drain_trigger, &caps, agent.upgrade.drain_deadline(), &mut term).await;
        }
    }
    // Pinned programs, links and maps stay: capture keeps working across a restart, and
    // connections already established continue. Only an uninstall (the DaemonSet is being
    // deleted) removes them, here or with `sluice cleanup`.
    if terminated && agent.kube.enabled {
        uninstall_if_asked(&agent).await;
    }
    drop(source);
    Ok(())
}

/// What `/status` reads, each from the room that owns it.
struct StatusInputs {
    node: String,
    state: crate::state::StateHandle,
    ready: crate::admin::server::Ready,
    certs: Arc<std::sync::Mutex<Vec<crate::identity::CertInfo>>>,
    pool: Arc<crate::admin::PoolStats>,
    /// The pod manager's request queue (asked for its sandboxes).
    pods: mpsc::Sender<enroll::Command>,
    limits: crate::admin::status::Limits,
}

/// How long `/status` waits for the pod manager's list of sandboxes.
const STATUS_PODS_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// Answers `/status` from `inputs`.
fn status_report(inputs: StatusInputs) -> crate::admin::server::StatusReport {
    use crate::admin::status::{AgentStatus, CertStatus, ConfigStatus, PodStatus};
    let inputs = Arc::new(inputs);
    Arc::new(move || {
        let inputs = inputs.clone();
        Box::pin(async move {
            let mut warnings = Vec::new();
            let (reply, answer) = tokio::sync::oneshot::channel();
            let listed = async {
                inputs
                    .pods
                    .send((enroll::Request::List, reply))
                    .await
                    .ok()?;
                tokio::time::timeout(STATUS_PODS_PATIENCE, answer)
                    .await
                    .ok()?
                    .ok()
            };
            let pods = match listed.await {
                Some(response) => response
                    .sandboxes
                    .into_iter()
                    .map(|s| PodStatus {
                        namespace: s.pod.namespace,
                        name: s.pod.name,
                        uid: s.pod.uid,
                        ips: s.pod.ips,
                        captured: s.captured,
                    })
                    .collect(),
                None => {
                    warnings.push(format!(
                        "the pod manager did not list its pods within {STATUS_PODS_PATIENCE:?}"
                    ));
                    Vec::new()
                }
            };
            let now = std::time::SystemTime::now();
            let certificates = inputs
                .certs
                .lock()
                .map(|c| c.iter().map(|c| CertStatus::new(c, now)).collect())
                .unwrap_or_default();
            let state = inputs.state.current();
            warnings.extend(mesh_config_notices(&state).into_iter().map(|n| n.message));
            AgentStatus {
                node: inputs.node.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                ready: inputs.ready.is_ready(),
                waiting_for: inputs.ready.pending(),
                config: ConfigStatus::new(&state, inputs.state.report()),
                pods,
                certificates,
                hbone_pool: inputs.pool.snapshot(),
                limits: inputs.limits.clone(),
                warnings,
            }
        })
    })
}

/// Mesh config ConfigMaps an operator may expect in force that are not (see
/// [`OutboundPolicy::notices`](crate::state::egress::OutboundPolicy::notices)).
fn mesh_config_notices(
    state: &crate::state::MeshState,
) -> Vec<crate::state::egress::outbound_policy::MeshConfigNotice> {
    state.egress.policy.notices(
        state
            .namespaces
            .iter()
            .map(|(name, ns)| (name.as_str(), &ns.labels)),
    )
}

/// Logs each mesh config notice when it appears, and keeps `sluice_mesh_config_not_in_force`
/// in step with the state.
async fn watch_mesh_config(
    mut state: crate::state::StateHandle,
    metrics: Arc<crate::admin::metrics::Metrics>,
) {
    let mut said = std::collections::BTreeSet::new();
    let mut current = Some(state.current());
    while let Some(snapshot) = current {
        let notices = mesh_config_notices(&snapshot);
        metrics.set_mesh_config_not_in_force(notices.iter().map(|n| n.config_map.as_str()));
        let now: std::collections::BTreeSet<String> =
            notices.iter().map(|n| n.message.clone()).collect();
        for message in now.difference(&said) {
            warn!(notice = %message, "mesh config not in force");
        }
        said = now;
        current = state.changed().await;
    }
}

/// On SIGTERM in a cluster: when Sluice's DaemonSet is being deleted, removes what the agent
/// put on the node ([`crate::cleanup`]; the CNI entry is the install-cni container's); on a
/// restart or an upgrade, leaves it for the next agent.
async fn uninstall_if_asked(agent: &AgentConfig) {
    let Ok(namespace) = std::env::var("POD_NAMESPACE") else {
        return;
    };
    let asked = async {
        let client = crate::sources::kube::client(agent.kube.kubeconfig.as_deref()).await?;
        crate::sources::kube::uninstall::uninstalling(client, &namespace, UNINSTALL_DAEMONSET).await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), asked).await {
        Ok(Ok(true)) => {
            let cleanup = crate::cleanup::Cleanup {
                pin_path: agent.bpf_pin_path.clone(),
                state_dir: agent.state_dir.clone(),
                cni_conf_dir: None,
                cni_bin_dir: None,
            };
            match cleanup.run().await {
                Ok(removed) => info!(?removed, "Sluice is being uninstalled: node state removed"),
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "uninstall cleanup incomplete; run `sluice cleanup` on the node")
                }
            }
        }
        Ok(Ok(false)) => {
            info!("stopping for a restart or upgrade: capture state stays for the next agent")
        }
        Ok(Err(e)) => {
            warn!(error = %format!("{e:#}"), "cannot tell uninstall from restart; capture state stays")
        }
        Err(_) => warn!("cannot tell uninstall from restart (API timeout); capture state stays"),
    }
}

/// The DaemonSet whose deletion means Sluice is being uninstalled.
const UNINSTALL_DAEMONSET: &str = crate::sources::kube::uninstall::DAEMONSET;

/// How long a starting agent keeps asking a draining one for its listeners (until that one's
/// successor has bound the handover socket).
const TAKE_OVER_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Takes the listeners of the agent serving the handover socket at `path`; `None` when there
/// is none, or when taking them fails (the pods' listeners are then bound anew, and a pod whose
/// ports are held is held closed until they are free).
async fn take_over(path: &std::path::Path) -> Option<crate::handover::Handover> {
    let p = path.to_owned();
    let taken =
        tokio::task::spawn_blocking(move || crate::handover::take_over(&p, TAKE_OVER_PATIENCE))
            .await;
    match taken {
        Ok(Ok(Some(h))) => {
            info!(listeners = h.received, socket = %path.display(), "took over the running agent's listeners");
            Some(h)
        }
        Ok(Ok(None)) => None,
        Ok(Err(e)) => {
            warn!(error = %e, "taking over from the running agent failed; binding listeners anew");
            None
        }
        Err(e) => {
            warn!(error = %e, "taking over from the running agent failed; binding listeners anew");
            None
        }
    }
}

/// Waits until no connection is in flight and no HBONE connection is served, or `deadline`
/// passes (SIGINT cuts it short; SIGTERM, which the old pod of a rollout gets, does not).
async fn drain(
    trigger: &crate::proxy::drain::DrainTrigger,
    caps: &crate::proxy::limits::ConnectionCaps,
    deadline: std::time::Duration,
    term: &mut tokio::signal::unix::Signal,
) {
    let started = std::time::Instant::now();
    info!(
        connections = caps.current(),
        hbone_connections = trigger.served(),
        deadline_s = deadline.as_secs(),
        "draining"
    );
    let until = tokio::time::Instant::now() + deadline;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = term.recv() => info!("terminated while draining; draining goes on until done or the deadline"),
            _ = tokio::signal::ctrl_c() => {
                warn!(connections = caps.current(), "interrupted while draining; connections in flight are cut");
                return;
            }
            _ = tokio::time::sleep_until(until) => {
                warn!(connections = caps.current(), hbone_connections = trigger.served(),
                    "drain deadline passed; connections still in flight are cut");
                return;
            }
        }
        if caps.current() == 0 && trigger.served() == 0 {
            info!(after_ms = started.elapsed().as_millis() as u64, "drained");
            return;
        }
    }
}

/// Holds readiness back, naming the kinds, while RBAC forbids listing a security kind: an agent
/// that cannot see AuthorizationPolicies must not report ready as if there were none.
async fn block_while_forbidden(
    mut rebuilt: tokio::sync::watch::Receiver<Arc<crate::sources::kube::Rebuilt>>,
    ready: crate::admin::server::Ready,
) {
    let mut held: Option<(Vec<String>, crate::admin::server::BlockReady)> = None;
    loop {
        let forbidden = rebuilt.borrow_and_update().forbidden.clone();
        if held.as_ref().map(|(kinds, _)| kinds) != Some(&forbidden) {
            held = (!forbidden.is_empty()).then(|| {
                let what = format!(
                    "listing {} is forbidden (RBAC): policies unknown",
                    forbidden.join(", ")
                );
                (forbidden, ready.block(what))
            });
        }
        if rebuilt.changed().await.is_err() {
            return;
        }
    }
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (a proxy holds two descriptors
/// per connection); returns the soft limit in force afterwards.
fn raise_nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "reading RLIMIT_NOFILE");
        return 1024;
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), soft = before,
                hard = limit.rlim_max, "raising RLIMIT_NOFILE");
            return before;
        }
    }
    info!(
        from = before,
        to = limit.rlim_cur,
        "open file limit (RLIMIT_NOFILE)"
    );
    limit.rlim_cur
}

/// The node's cap on connections in flight: as configured, lowered so that two descriptors per
/// connection fit in `nofile` with room for everything else the agent holds.
fn node_connection_cap(configured: usize, nofile: u64) -> usize {
    const RESERVED_FDS: u64 = 1024;
    let fits = usize::try_from(nofile.saturating_sub(RESERVED_FDS) / 2).unwrap_or(usize::MAX);
    let cap = configured.min(fits).max(1);
    if cap < configured {
        info!(
            configured,
            cap,
            nofile,
            "spec.proxy.maxConnectionsPerNode lowered to what the open file limit holds"
        );
    }
    cap
}

/// Egress consumers: the DNS ServiceEntry resolver and prefix pinning; returns what the proxy
/// needs of egress.
fn start_egress(
    agent: &AgentConfig,
    state: &state::StateHandle,
    metrics: Arc<crate::admin::metrics::Metrics>,
) -> Arc<crate::proxy::egress::EgressRuntime> {
    use crate::egress::dns::{DnsCache, Resolver};
    let server = agent.egress.dns_server.or_else(Resolver::system_server);
    let dns = server.map(|s| {
        let cache = DnsCache::new(Resolver::new(s, std::time::Duration::from_secs(2)));
        tokio::spawn(cache.clone().run(state.clone()));
        cache
    });
    if dns.is_none() {
        tracing::warn!(
            "no DNS server for egress (spec.egress.dnsServer, /etc/resolv.conf): DNS ServiceEntries are not resolved"
        );
    }
    let pinning = crate::egress::pinning::PinningLoop::new(
        agent.node_name.clone(),
        agent.egress.pinning.clone(),
    );
    let kube = agent.kube.clone();
    let pin_state = state.clone();
    tokio::spawn(async move {
        let pinning = if kube.enabled {
            match crate::sources::kube::client(kube.kubeconfig.as_deref()).await {
                Ok(client) => pinning.with_reporter(Arc::new(EgressPrefixStatus(client))),
                Err(e) => {
                    tracing::warn!(error = %e, "no Kubernetes client for egress status");
                    pinning
                }
            }
        } else {
            pinning
        };
        pinning.run(pin_state).await;
    });
    Arc::new(crate::proxy::egress::EgressRuntime::from_config(
        agent,
        dns,
        Some(metrics),
    ))
}

/// Reports pinned prefixes in the StaticGatewayConfiguration's `status.egressIpPrefix`
/// (server-side apply, field manager `sluice`).
struct EgressPrefixStatus(kube::Client);

impl crate::egress::pinning::PrefixReporter for EgressPrefixStatus {
    fn report<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        prefix: ipnet::IpNet,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<(), crate::egress::pinning::ReportError>>
                + Send
                + 'a,
        >,
    > {
        Box::pin(async move {
            crate::sources::kube::status::set_egress_ip_prefix(&self.0, namespace, name, prefix)
                .await
                .map_err(Into::into)
        })
    }
}

/// Writes MeshState's fields as the `meshState` group of `/config_dump`.
struct MeshStateDump<'a, 'b>(&'a mut crate::admin::server::DumpWriter<'b>);

impl crate::state::mesh::SectionVisitor for MeshStateDump<'_, '_> {
    type Error = std::io::Error;
    fn section<T: serde::Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> std::io::Result<()> {
        self.0.section(Some("meshState"), name, value)
    }
}

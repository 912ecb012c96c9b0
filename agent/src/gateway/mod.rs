//! `sluice gateway`: the north-south data plane. A Deployment per Gateway (or per class),
//! behind a Service: it reads the same sources as the node agent, serves the listeners of the
//! Gateways of its classes, routes each request by HTTPRoute, and hands it to the backend's
//! endpoints over HBONE with its own SPIFFE identity (plaintext to endpoints outside the mesh).
//!
//! Data flows one way: sources → MeshState → [`routes::RouteTable`] → [`listeners`] →
//! [`handler`] → [`upstream`].
pub mod certificates;
pub mod forwarding;
pub mod handler;
pub mod listeners;
pub mod routes;
pub mod upstream;
pub mod workers;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, RwLock},
};

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::{
    admin::{Metrics, server::Ready},
    identity::SecretManager,
    proxy::hbone::{Baggage, HbonePool},
    sources, state,
    state::Identity,
};

/// How often the gateway reads its listeners' certificates again.
const CERTIFICATE_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// Command-line overrides for `sluice gateway`.
#[derive(Debug, Default)]
pub struct GatewayArgs {
    pub config: PathBuf,
    /// Worker threads, each with its own runtime and upstream pools; 0 means one per CPU.
    pub workers: usize,
}

/// Runs the gateway until SIGINT/SIGTERM.
pub async fn run(args: GatewayArgs) -> Result<()> {
    let mut local = sources::file::load(&args.config)?;
    let agent = &mut local.agent;
    if agent.node_name.is_empty() {
        agent.node_name = std::env::var("NODE_NAME").unwrap_or_else(|_| "gateway".into());
    }
    if let Ok(ns) = std::env::var("POD_NAMESPACE") {
        agent.ingress.namespace = ns;
    }
    if let Ok(sa) = std::env::var("SERVICE_ACCOUNT") {
        agent.ingress.service_account = sa;
    }
    // Status is the node agents' (leader-elected) job; a gateway only reads.
    agent.kube.write_status = false;
    agent
        .validate()
        .with_context(|| format!("{}", args.config.display()))?;
    let agent = local.agent.clone();
    let ingress = agent.ingress.clone();
    let me = Identity::new(
        &agent.trust_domain,
        &ingress.namespace,
        &ingress.service_account,
    );
    info!(identity = %me, classes = ?ingress.classes, gateways = ?ingress.gateways, "starting sluice gateway");

    let (publisher, mut state) = state::channel();
    let _source = sources::start(&agent, local.resources, publisher, Some(&args.config)).await?;

    let ca = crate::identity::ca_from_config(&agent.identity, &agent.trust_domain)
        .context("setting up the mesh CA")?;
    let identity = Arc::new(SecretManager::with_key_exchange(
        ca,
        agent.identity.workload_cert_ttl.get(),
        agent.tls.key_exchange,
    ));
    // The gateway's own certificate, before any listener takes a request.
    identity
        .fetch(&me)
        .await
        .with_context(|| format!("certificate for {me}"))?;
    let metrics = Arc::new(Metrics::new());
    let ready = Ready::new();
    let _metrics_server =
        crate::admin::server::serve_metrics(agent.metrics_addr, metrics.clone()).await?;
    let _ready_server =
        crate::admin::server::serve_readiness(agent.readiness_addr, ready.clone()).await?;
    let source_ip = ingress.bind_address.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let baggage = Baggage {
        namespace: Some(ingress.namespace.clone()),
        workload_kind: Some("deployment".into()),
        workload_name: Some(ingress.service_account.clone()),
        service: Some(ingress.service_account.clone()),
        ..Baggage::default()
    };
    let table = Arc::new(RwLock::new(Arc::default()));
    let balance = Arc::default();
    let policy_target = handler::policy_target(&ingress, &agent.node_name);
    let count = match args.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    // Each worker its own pools: a request never waits on another thread's connection.
    let workers = Arc::new(
        workers::Workers::start(count, || {
            let pool = HbonePool::new(agent.hbone.pool.clone(), agent.hbone.h2.clone())
                .with_stats(metrics.hbone_pool_stats());
            let connector = upstream::MeshConnector::new(
                state.clone(),
                identity.clone(),
                me.clone(),
                pool,
                SocketAddr::new(source_ip, 0),
                baggage.clone(),
            );
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .pool_idle_timeout(std::time::Duration::from_secs(60))
                    .pool_max_idle_per_host(256)
                    .build(connector.clone());
            Arc::new(handler::Shared {
                table: table.clone(),
                state: state.clone(),
                client,
                connector,
                balance: Arc::clone(&balance),
                metrics: metrics.clone(),
                num_trusted_proxies: ingress.num_trusted_proxies,
                me: me.clone(),
                workload: ingress.service_account.clone(),
                namespace: ingress.namespace.clone(),
                policy_target: policy_target.clone(),
            })
        })
        .context("starting the gateway's workers")?,
    );
    info!(workers = workers.len(), "gateway workers started");

    let kube = if agent.kube.enabled {
        Some(
            sources::kube::client(agent.kube.kubeconfig.as_deref())
                .await
                .context("the kube client that reads listener certificates")?,
        )
    } else {
        None
    };
    let certificates = certificates::CertificateSource::new(ingress.certificates.clone(), kube);
    let mut listeners = listeners::Listeners::default();
    // Certificates are re-read this often (a rotated Secret or file).
    let mut recheck = tokio::time::interval(CERTIFICATE_RECHECK);
    recheck.tick().await;
    let mut _held: Option<crate::admin::server::BlockReady> = None;
    let mut snapshot = state.current();
    // Whether this pass follows a new state (logged) or only the certificate recheck.
    let mut changed = true;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (next_table, skipped) = routes::RouteTable::build(&snapshot, &ingress);
        for s in skipped {
            warn!(error = %s, "left out of the gateway's routes");
        }
        let bound = listeners
            .reconcile(&next_table, ingress.bind_address, &certificates, &workers)
            .await;
        let served: usize = next_table.ports.values().flat_map(|p| &p.listeners).count();
        // Ready (and so `Programmed` in the Gateway's status) only while every port a served
        // listener needs is bound.
        let unbound: Vec<u16> = next_table
            .ports
            .keys()
            .copied()
            .filter(|p| !bound.contains(p))
            .collect();
        _held = (!unbound.is_empty())
            .then(|| ready.block(format!("listener ports {unbound:?} are not bound")));
        *table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next_table);
        if changed {
            info!(ports = ?bound, ?unbound, listeners = served, "gateway routes applied");
        }
        ready.set_ready();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { info!("interrupted"); break; }
            _ = term.recv() => { info!("terminated"); break; }
            next = state.changed() => match next {
                Some(s) => { snapshot = s; changed = true; }
                None => break,
            },
            _ = recheck.tick() => changed = false,
        }
    }
    Ok(())
}

//! Leader election on a `coordination.k8s.io/v1` Lease, so that one agent of the DaemonSet writes
//! status rather than every node.
//!
//! The algorithm is client-go's: the holder renews `renewTime` every [`LeaseSettings::renew_every`];
//! another candidate takes over once it has seen the lease record unchanged for
//! [`LeaseSettings::duration`] *by its own clock* (so clock skew between nodes does not matter).
//! Every write carries the `resourceVersion` it read, so two candidates cannot both win. A holder
//! that cannot renew steps down after `duration`, before anyone else may take over.
use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Name of the status writer's Lease.
pub const NAME: &str = "sluice-status-writer";
/// The RBAC verbs this module uses on leases.
pub const VERBS: &[&str] = &["get", "create", "update"];

/// Where the Lease lives and who we are.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// This candidate's identity (the node name).
    pub identity: String,
    /// How long a lease record must stay unrenewed before another candidate takes over.
    pub duration: Duration,
    /// How often the holder renews (and candidates look).
    pub renew_every: Duration,
}

impl LeaseSettings {
    /// Defaults: 15 s lease, renewed every 5 s (client-go's 15 s / 10 s deadline / 2 s retry, a bit
    /// more relaxed).
    pub fn new(namespace: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: NAME.to_owned(),
            identity: identity.to_owned(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }
}

/// The lease record as last seen, and when (by our clock) it last changed.
struct Observed {
    holder: Option<String>,
    renew: Option<Timestamp>,
    since: Instant,
}

/// Runs the election forever, publishing whether this candidate holds the lease.
pub async fn run(client: Client, settings: LeaseSettings, leader: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let mut observed: Option<Observed> = None;
    let mut last_renewed: Option<Instant> = None;
    loop {
        let outcome = attempt(&api, &settings, &mut observed).await;
        let held = match outcome {
            Ok(held) => {
                if held {
                    last_renewed = Some(Instant::now());
                }
                held
            }
            Err(e) => {
                // Keep leading only while our last renewal is still within the lease.
                let still = last_renewed.is_some_and(|t| t.elapsed() < settings.duration);
                warn!(lease = %settings.name, namespace = %settings.namespace, error = %e, still_leader = still,
                    "lease renewal failed");
                still
            }
        };
        let was = *leader.borrow();
        if held != was {
            if held {
                info!(lease = %settings.name, identity = %settings.identity, "became the status writer");
            } else {
                info!(lease = %settings.name, identity = %settings.identity, "no longer the status writer");
                last_renewed = None;
            }
            leader.send_replace(held);
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.renew_every) => {}
            _ = leader.closed() => return,
        }
    }
}

fn record(lease: &Lease) -> (Option<String>, Option<Timestamp>) {
    let spec = lease.spec.as_ref();
    (
        spec.and_then(|s| s.holder_identity.clone())
            .filter(|h| !h.is_empty()),
        spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
    )
}

/// One round: returns whether we hold the lease afterwards.
async fn attempt(
    api: &Api<Lease>,
    settings: &LeaseSettings,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let now = MicroTime(Timestamp::now());
    let duration_s = i32::try_from(settings.duration.as_secs()).unwrap_or(i32::MAX);
    let current = match api.get_opt(&settings.name).await? {
        Some(l) => l,
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(settings.name.clone()),
                    namespace: Some(settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(settings.identity.clone()),
                    lease_duration_seconds: Some(duration_s),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.is_already_exists() || s.is_conflict() => Ok(false),
                Err(e) => Err(e),
            };
        }
    };
    let (holder, renew) = record(&current);
    let changed = observed
        .as_ref()
        .is_none_or(|o| o.holder != holder || o.renew != renew);
    if changed {
        *observed = Some(Observed {
            holder: holder.clone(),
            renew,
            since: Instant::now(),
        });
    }
    let ours = holder.as_deref() == Some(settings.identity.as_str());
    let expired = holder.is_none()
        || observed
            .as_ref()
            .is_some_and(|o| o.since.elapsed() >= settings.duration);
    if !ours && !expired {
        debug!(holder = ?holder, "lease held by another agent");
        return Ok(false);
    }
    let mut next = current.clone();
    let spec = next.spec.get_or_insert_with(LeaseSpec::default);
    if !ours {
        spec.holder_identity = Some(settings.identity.clone());
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(now);
    spec.lease_duration_seconds = Some(duration_s);
    match api
        .replace(&settings.name, &PostParams::default(), &next)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
        Err(e) => Err(e),
    }
}

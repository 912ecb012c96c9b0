//! One watcher and reflector store per watched kind.
//!
//! Each kind runs `watcher` → `reflector` on its own task and reports to the rebuild loop over a
//! channel: the store changed, the first list completed, or the kind is absent from the cluster
//! (its CRD is not installed, or RBAC forbids it). Errors never end a watch: the watcher retries
//! with [`WatchBackoff`] and relists on return, and the store keeps its last contents meanwhile, so
//! the last good state stays served while the API server is away.
use std::{any::Any, sync::Arc, time::Duration};

use futures::StreamExt;
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        utils::Backoff,
        watcher,
    },
};
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{debug, error, info, warn};

use crate::resources::{
    ResourceSet,
    kinds::{self, KindInfo, KindScope, KindVisitor, Reach, WatchedKind},
};

/// What a watch task tells the rebuild loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// The store of kind `usize` (a [`WatchedKind::INDEX`]) changed.
    Changed(usize),
    /// The kind's (re)list completed and its store was replaced.
    Listed(usize),
    /// The kind cannot be listed: no CRD, or forbidden. Its store keeps what it had.
    Absent(usize),
    /// A security kind (PeerAuthentication, AuthorizationPolicy) cannot be listed because RBAC
    /// forbids it: its policies are unknown, which must not read as "there are none".
    Forbidden(usize),
}

/// The API group whose kinds decide who may connect; listing them may not fail quietly.
pub const SECURITY_GROUP: &str = "security.istio.io";

/// Retry delays of a failing watch: 0.5 s doubling to 8 s, each with ±25 % jitter so that the
/// agents of many nodes do not relist in step. kube's `default_backoff` grows to 30 s, which after
/// an API server outage would leave a node on a stale mesh for up to half a minute.
#[derive(Debug)]
pub struct WatchBackoff {
    next: Duration,
    seed: u64,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(8);

    /// A fresh backoff; `seed` spreads the jitter (any per-process value will do).
    pub fn new(seed: u64) -> Self {
        Self {
            next: Self::FIRST,
            seed: seed | 1,
        }
    }

    fn jitter(&mut self) -> f64 {
        // xorshift64: plenty for spreading retries.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        0.75 + (self.seed % 1000) as f64 / 2000.0
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Some(base.mul_f64(self.jitter()))
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Where the kube source's watches look.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchScope {
    /// Namespace and name of the mesh config ConfigMap.
    pub mesh_config: (String, String),
}

/// The reflector stores of every watched kind, one per kind (found by its type).
#[derive(Clone)]
pub struct Stores(Arc<[Box<dyn Any + Send + Sync>]>);

/// Running watch tasks; dropping this stops them.
pub struct Watches {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Watches {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The objects of `store`, sorted by namespace and name (stores are hash maps; builds should
/// not depend on their order).
fn sorted<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> Vec<K> {
    let mut items: Vec<Arc<K>> = store.state();
    items.sort_by(|a, b| {
        (a.meta().namespace.as_deref(), a.meta().name.as_deref())
            .cmp(&(b.meta().namespace.as_deref(), b.meta().name.as_deref()))
    });
    items.into_iter().map(|k| (*k).clone()).collect()
}

impl Stores {
    /// The store of kind `K`.
    pub fn get<K: WatchedKind>(&self) -> &Store<K> {
        self.0
            .get(K::INDEX)
            .and_then(|s| s.downcast_ref())
            .expect("Stores holds one store per kind, at its index")
    }

    /// Everything the stores hold now, as the resource set `state::build` reads.
    pub fn resource_set(&self) -> ResourceSet {
        struct Fill<'a>(&'a Stores, ResourceSet);
        impl KindVisitor for Fill<'_> {
            fn visit<K: WatchedKind>(&mut self) {
                *K::list_mut(&mut self.1) = sorted(self.0.get::<K>());
            }
        }
        let mut fill = Fill(self, ResourceSet::default());
        kinds::for_each_kind(&mut fill);
        fill.1
    }

    /// `metadata.generation` of a watched object, if the store has it (for logging rejections once
    /// per generation). `kind` is the qualified name a [`Rejection`](crate::state::Rejection)
    /// carries.
    pub fn generation(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<i64> {
        struct Find<'a> {
            stores: &'a Stores,
            namespace: Option<&'a str>,
            name: &'a str,
            found: Option<i64>,
        }
        impl KindVisitor for Find<'_> {
            fn visit<K: WatchedKind>(&mut self) {
                let key = match self.namespace {
                    Some(ns) => reflector::ObjectRef::new(self.name).within(ns),
                    None => reflector::ObjectRef::new(self.name),
                };
                self.found = self
                    .stores
                    .get::<K>()
                    .get(&key)
                    .and_then(|o| o.meta().generation);
            }
        }
        let mut find = Find {
            stores: self,
            namespace,
            name,
            found: None,
        };
        kinds::visit_named(kind, &mut find);
        find.found
    }
}

/// Starts one watch per watched kind; every store change is reported on `signals`.
pub fn start(
    client: &Client,
    scope: &WatchScope,
    signals: mpsc::UnboundedSender<Signal>,
) -> (Stores, Watches) {
    struct Start<'a> {
        client: &'a Client,
        scope: &'a WatchScope,
        signals: &'a mpsc::UnboundedSender<Signal>,
        stores: Vec<Box<dyn Any + Send + Sync>>,
        tasks: Vec<JoinHandle<()>>,
    }
    impl KindVisitor for Start<'_> {
        fn visit<K: WatchedKind>(&mut self) {
            let (api, config) = match K::REACH {
                Reach::All => (
                    <K::Scope as KindScope>::api::<K>(self.client.clone(), None),
                    watcher::Config::default(),
                ),
                Reach::OneObject => {
                    let (ns, name) = &self.scope.mesh_config;
                    (
                        <K::Scope as KindScope>::api::<K>(self.client.clone(), Some(ns)),
                        watcher::Config::default().fields(&format!("metadata.name={name}")),
                    )
                }
            };
            let (store, task) = watch::<K>(api, config, self.signals.clone());
            self.stores.push(Box::new(store));
            self.tasks.push(task);
        }
    }
    let mut start = Start {
        client,
        scope,
        signals: &signals,
        stores: Vec::with_capacity(kinds::COUNT),
        tasks: Vec::with_capacity(kinds::COUNT),
    };
    kinds::for_each_kind(&mut start);
    (Stores(start.stores.into()), Watches { tasks: start.tasks })
}

/// Why a list or watch failed, as far as the source cares.
enum Failure {
    /// 404: the kind is not served (no CRD).
    NotServed,
    /// 403: RBAC does not allow it.
    Forbidden,
    /// Anything else (connection refused, timeouts, 410 handled by the watcher, …).
    Transient,
}

fn classify(e: &watcher::Error) -> Failure {
    let api = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.as_ref()),
        watcher::Error::WatchError(s) => Some(s.as_ref()),
        _ => None,
    };
    // By code as well as reason: an unknown API group answers with a plain-text "404 page not
    // found", which kube turns into a Status without the NotFound reason.
    match api {
        Some(s) if s.code == 404 || s.is_not_found() => Failure::NotServed,
        Some(s) if s.code == 403 || s.is_forbidden() => Failure::Forbidden,
        _ => Failure::Transient,
    }
}

/// Spawns `watcher → reflector` for one kind.
fn watch<K: WatchedKind>(
    api: Api<K>,
    config: watcher::Config,
    signals: mpsc::UnboundedSender<Signal>,
) -> (Store<K>, JoinHandle<()>) {
    let (store, writer) = reflector::store::<K>();
    let index = K::INDEX;
    let kind: &'static KindInfo = &kinds::watched()[index];
    let seed =
        (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(std::process::id());
    let stream = reflector::reflector(
        writer,
        watcher(api, config.any_semantic())
            .modify(K::trim)
            .backoff(WatchBackoff::new(seed)),
    );
    let task = tokio::spawn(async move {
        let mut failing = false;
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let signal = match event {
                Ok(watcher::Event::InitDone) => {
                    if failing {
                        info!(kind = %kind.qualified(), "watch recovered; relisted");
                        failing = false;
                    }
                    Some(Signal::Listed(index))
                }
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    Some(Signal::Changed(index))
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => None,
                Err(e) => {
                    let first = !failing;
                    failing = true;
                    match classify(&e) {
                        Failure::NotServed => {
                            if first {
                                warn!(kind = %kind.qualified(), api_version = %kind.api_version(),
                                    "not served by the API server (CRD not installed?); the other kinds \
                                     carry on, and this one is retried");
                            }
                            Some(Signal::Absent(index))
                        }
                        Failure::Forbidden if kind.group == SECURITY_GROUP => {
                            if first {
                                error!(kind = %kind.qualified(), error = %e,
                                    "listing is forbidden (check the ClusterRole): its policies are unknown, \
                                     so the agent is not ready until it can list them; retrying");
                            }
                            Some(Signal::Forbidden(index))
                        }
                        Failure::Forbidden => {
                            if first {
                                warn!(kind = %kind.qualified(), error = %e,
                                    "listing is forbidden (check the ClusterRole); retrying");
                            }
                            Some(Signal::Absent(index))
                        }
                        Failure::Transient => {
                            if first {
                                warn!(kind = %kind.qualified(), error = %e,
                                    "watch failed; serving the last state and retrying");
                            } else {
                                debug!(kind = %kind.qualified(), error = %e, "watch still failing");
                            }
                            None
                        }
                    }
                }
            };
            if let Some(signal) = signal
                && signals.send(signal).is_err()
            {
                return;
            }
        }
    });
    (store, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_with_jitter_and_resets() {
        let mut b = WatchBackoff::new(42);
        let delays: Vec<Duration> = (0..8).map(|_| b.next().expect("endless")).collect();
        for (i, d) in delays.iter().enumerate() {
            let base = (WatchBackoff::FIRST * 2u32.pow(i as u32)).min(WatchBackoff::MAX);
            assert!(
                *d >= base.mul_f64(0.75) && *d <= base.mul_f64(1.25),
                "delay {i}: {d:?} vs base {base:?}"
            );
        }
        assert!(delays[7] > Duration::from_secs(5));
        b.reset();
        assert!(b.next().expect("endless") < Duration::from_secs(1));
    }
}

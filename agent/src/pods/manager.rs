//! The pod manager: reconciles sandboxes (from the enrollment API) and mesh membership (from
//! MeshState) into capture state — eBPF map entries, the pod's sk_lookup link, its routing and
//! its proxy listeners. It is the only writer of that state, and every step is idempotent.
//!
//! A pod whose capture fails (its application already holds 15001, 15006 or `pod_ip:15008`,
//! say after an agent restart) is not let go: it stays enrolled *closed* (its connects are
//! refused, SYNs for its addresses dropped), counted (`sluice_capture_failures_total`,
//! `sluice_pods_held_closed`) and logged, and capture is retried every [`CAPTURE_RETRY`].
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::{
    handover::{Listeners, Taken},
    netns::{HomeNetns, Netns, NetnsError},
    proxy::{
        ProxyInputs,
        pod::{ListenerHandover, PodContext, PodProxy},
    },
    redirect::{
        ebpf::{Capture, CaptureMaps, EbpfError},
        enroll::{Command, Request, Response, Sandbox, SandboxStatus},
        pod_net,
    },
    state::{MeshState, Snapshot, StateHandle, WorkloadUid, build::membership},
};

/// A sandbox the manager has accepted, with its namespace open.
struct Known {
    sandbox: Sandbox,
    netns: Arc<Netns>,
}

/// A captured pod.
struct Captured {
    ips: Vec<IpAddr>,
    cookie: u64,
    netns: Arc<Netns>,
    _proxy: PodProxy,
}

/// A pod enrolled closed after its capture failed.
struct HeldClosed {
    ips: Vec<IpAddr>,
    cookie: u64,
    netns: Arc<Netns>,
}

/// How often capture is retried for a pod held closed.
pub const CAPTURE_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Why a request was refused; the state is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("pod uid {0:?}: must be 1-128 characters of [A-Za-z0-9._-]")]
    BadUid(String),
    #[error("pod {0}: namespace and name must not be empty")]
    NoName(String),
    #[error("pod {0}: no IP addresses")]
    NoIps(String),
    #[error("pod {uid}: address {ip} already belongs to pod {owner}")]
    IpTaken {
        uid: String,
        ip: IpAddr,
        owner: String,
    },
    #[error("pod {uid}: {source}")]
    Netns { uid: String, source: NetnsError },
    #[error(
        "pod {uid}: network namespace {path} is the agent's own (host network pods are not captured)"
    )]
    HostNetns { uid: String, path: PathBuf },
}

/// Owns capture state for this node.
pub struct PodManager {
    capture: Capture,
    maps: Arc<CaptureMaps>,
    home: HomeNetns,
    records: PathBuf,
    proxy: ProxyInputs,
    known: BTreeMap<String, Known>,
    captured: BTreeMap<String, Captured>,
    closed: BTreeMap<String, HeldClosed>,
    /// Where pods' listeners are registered for a successor agent.
    handover: Listeners,
    /// Listeners handed over by the previous agent, until the first reconcile has taken them.
    taken: Option<Taken>,
    /// Told `(namespace, name)` of each pod captured (kube mode annotates them).
    captured_notices: Option<tokio::sync::mpsc::UnboundedSender<(String, String)>>,
}

fn valid_uid(uid: &str) -> bool {
    (1..=128).contains(&uid.len())
        && uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl PodManager {
    /// A manager over loaded `capture`; `state_dir` keeps sandbox records across restarts.
    pub fn new(
        capture: Capture,
        home: HomeNetns,
        state_dir: &Path,
        proxy: ProxyInputs,
    ) -> std::io::Result<Self> {
        let records = state_dir.join("sandboxes");
        std::fs::create_dir_all(&records)?;
        Ok(Self {
            maps: capture.maps(),
            capture,
            home,
            records,
            proxy,
            known: BTreeMap::new(),
            captured: BTreeMap::new(),
            closed: BTreeMap::new(),
            handover: Listeners::default(),
            taken: None,
            captured_notices: None,
        })
    }

    /// Sends `(namespace, name)` of every pod captured from now on to `tx`.
    pub fn with_captured_notices(
        mut self,
        tx: tokio::sync::mpsc::UnboundedSender<(String, String)>,
    ) -> Self {
        self.captured_notices = Some(tx);
        self
    }

    /// Registers pods' listeners in `listeners` (for a successor), and serves those in
    /// `taken` (from the previous agent) instead of binding new ones.
    pub fn with_handover(mut self, listeners: Listeners, taken: Option<Taken>) -> Self {
        self.handover = listeners;
        self.taken = taken;
        self
    }

    /// Closes the handed-over listeners no pod took (pods gone or out of the mesh since);
    /// returns how many pods are captured.
    pub fn finish_adoption(&mut self) -> usize {
        if let Some(taken) = self.taken.take() {
            let rest = taken.remaining();
            if !rest.is_empty() {
                info!(listeners = ?rest, "closing handed-over listeners no pod took");
            }
            taken.close_rest();
        }
        self.captured.len()
    }

    /// Reloads the sandboxes recorded by an earlier run. Records whose namespace is gone are
    /// dropped; their map entries are swept by the next [`reconcile`](Self::reconcile).
    pub fn restore(&mut self) {
        let Ok(dir) = std::fs::read_dir(&self.records) else {
            return;
        };
        for entry in dir.filter_map(Result::ok) {
            let path = entry.path();
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Sandbox>(&b).map_err(|e| e.to_string()));
            match parsed.map(|sb| (self.validate(&sb).map_err(|e| e.to_string()), sb)) {
                Ok((Ok(netns), sandbox)) => {
                    info!(pod = %sandbox.uid, "restored sandbox record");
                    self.known.insert(
                        sandbox.uid.clone(),
                        Known {
                            sandbox,
                            netns: Arc::new(netns),
                        },
                    );
                }
                Ok((Err(e), _)) | Err(e) => {
                    warn!(record = %path.display(), error = %e, "dropping stale sandbox record");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }

    fn validate(&self, sb: &Sandbox) -> Result<Netns, EnrollError> {
        if !valid_uid(&sb.uid) {
            return Err(EnrollError::BadUid(sb.uid.clone()));
        }
        if sb.namespace.is_empty() || sb.name.is_empty() {
            return Err(EnrollError::NoName(sb.uid.clone()));
        }
        if sb.ips.is_empty() {
            return Err(EnrollError::NoIps(sb.uid.clone()));
        }
        for (uid, k) in &self.known {
            if uid == &sb.uid {
                continue;
            }
            if let Some(ip) = sb.ips.iter().find(|ip| k.sandbox.ips.contains(ip)) {
                return Err(EnrollError::IpTaken {
                    uid: sb.uid.clone(),
                    ip: *ip,
                    owner: uid.clone(),
                });
            }
        }
        let netns = Netns::open(&sb.netns).map_err(|source| EnrollError::Netns {
            uid: sb.uid.clone(),
            source,
        })?;
        if netns.cookie() == self.home.netns().cookie() {
            return Err(EnrollError::HostNetns {
                uid: sb.uid.clone(),
                path: sb.netns.clone(),
            });
        }
        Ok(netns)
    }

    fn record_path(&self, uid: &str) -> PathBuf {
        self.records.join(format!("{uid}.json"))
    }

    /// Handles one API request.
    pub async fn handle(&mut self, req: Request, state: &MeshState) -> Response {
        match req {
            Request::Add { pod } => {
                let netns = match self.validate(&pod) {
                    Ok(n) => n,
                    Err(e) => {
                        warn!(error = %e, "enrollment refused");
                        return Response::error(e.to_string());
                    }
                };
                let body = serde_json::to_vec_pretty(&pod).unwrap_or_default();
                if let Err(e) = std::fs::write(self.record_path(&pod.uid), body) {
                    return Response::error(format!("pod {}: recording the sandbox: {e}", pod.uid));
                }
                let uid = pod.uid.clone();
                // A changed sandbox (new namespace or addresses) is recaptured from scratch.
                if self.known.get(&uid).is_some_and(|k| k.sandbox != pod) {
                    self.release(&uid).await;
                }
                self.known.insert(
                    uid.clone(),
                    Known {
                        sandbox: pod,
                        netns: Arc::new(netns),
                    },
                );
                if let Err(e) = self.reconcile_one(&uid, state).await {
                    return Response::error(e);
                }
                Response {
                    ok: true,
                    captured: Some(self.captured.contains_key(&uid)),
                    error: None,
                    sandboxes: vec![],
                }
            }
            Request::Del { uid } => {
                self.release(&uid).await;
                self.known.remove(&uid);
                let _ = std::fs::remove_file(self.record_path(&uid));
                Response {
                    ok: true,
                    captured: Some(false),
                    error: None,
                    sandboxes: vec![],
                }
            }
            Request::List => Response {
                ok: true,
                captured: None,
                error: None,
                sandboxes: self
                    .known
                    .values()
                    .map(|k| SandboxStatus {
                        pod: k.sandbox.clone(),
                        captured: self.captured.contains_key(&k.sandbox.uid),
                    })
                    .collect(),
            },
        }
    }

    fn wanted(sb: &Sandbox, state: &MeshState) -> bool {
        let workload = state
            .workloads
            .get(&WorkloadUid(sb.uid.clone()))
            .or_else(|| state.workload_by_name(&sb.namespace, &sb.name));
        match workload {
            Some(w) => w.membership.in_mesh(),
            // Not (yet) seen by the sources: the namespace decides.
            None => membership(&BTreeMap::new(), state.namespaces.get(&sb.namespace)).in_mesh(),
        }
    }

    async fn reconcile_one(&mut self, uid: &str, state: &MeshState) -> Result<(), String> {
        let Some(known) = self.known.get(uid) else {
            self.release(uid).await;
            return Ok(());
        };
        let want = Self::wanted(&known.sandbox, state);
        let held = self.captured.contains_key(uid) || self.closed.contains_key(uid);
        match (want, self.captured.contains_key(uid)) {
            // Logged (once) and counted by the hold that follows a failure.
            (true, false) => {
                let sandbox = known.sandbox.clone();
                let netns = known.netns.clone();
                self.capture_pod(sandbox, netns).await
            }
            (false, _) if held => {
                self.release(uid).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Captures the pod; when that fails, holds it closed (and the caller retries).
    async fn capture_pod(&mut self, sb: Sandbox, netns: Arc<Netns>) -> Result<(), String> {
        match self.try_capture(&sb, &netns).await {
            Ok(()) => {
                if self.closed.remove(&sb.uid).is_some() {
                    info!(pod = %sb.uid, "capture succeeded on retry; the pod is no longer held closed");
                    self.proxy.metrics.set_pods_held_closed(self.closed.len());
                }
                Ok(())
            }
            Err(e) => {
                self.hold_closed(&sb, &netns, &e);
                Err(e)
            }
        }
    }

    /// Enrolls the pod closed after a failed capture: its traffic is refused, never let around
    /// the proxy, until a retry succeeds.
    fn hold_closed(&mut self, sb: &Sandbox, netns: &Arc<Netns>, error: &str) {
        self.proxy.metrics.capture_failed();
        let cookie = netns.cookie();
        let held = self
            .capture
            .attach_pod(&sb.uid, netns)
            .and_then(|()| self.maps.hold_closed(cookie, &sb.ips));
        let first = !self.closed.contains_key(&sb.uid);
        match held {
            Ok(()) if first => {
                warn!(pod = %sb.uid, namespace = %sb.namespace, name = %sb.name, error, retry_in = ?CAPTURE_RETRY, "capture failed; the pod is held closed (its traffic refused) until a retry succeeds");
            }
            Ok(()) => {
                debug!(pod = %sb.uid, error, "capture retry failed; the pod stays held closed")
            }
            Err(e) => {
                warn!(pod = %sb.uid, error, hold_error = %e, "capture failed, and holding the pod closed failed too; retrying");
            }
        }
        self.closed.insert(
            sb.uid.clone(),
            HeldClosed {
                ips: sb.ips.clone(),
                cookie,
                netns: netns.clone(),
            },
        );
        self.proxy.metrics.set_pods_held_closed(self.closed.len());
    }

    async fn try_capture(&mut self, sb: &Sandbox, netns: &Arc<Netns>) -> Result<(), String> {
        let sb = sb.clone();
        let netns = netns.clone();
        let uid = sb.uid.clone();
        pod_net::install(&netns, &self.home, &sb.ips)
            .await
            .map_err(|e| e.to_string())?;
        let ctx = Arc::new(PodContext::new(
            uid.clone(),
            sb.namespace.clone(),
            sb.name.clone(),
            netns.clone(),
            sb.ips.clone(),
            &self.proxy,
        ));
        let handover = ListenerHandover {
            taken: self.taken.as_ref(),
            listeners: &self.handover,
        };
        let proxy =
            PodProxy::start(ctx, self.proxy.clone(), handover).map_err(|e| e.to_string())?;
        let adopted = proxy.adopted();
        let cookie = netns.cookie();
        let steps = || -> Result<(), EbpfError> {
            for ip in &sb.ips {
                if let Some(fd) = proxy.inbound_listener_for(*ip) {
                    self.maps.set_pod_ip(*ip, cookie, &fd)?;
                }
            }
            Ok(())
        };
        if let Err(e) = steps()
            .and_then(|()| self.capture.attach_pod(&uid, &netns))
            .and_then(|()| self.maps.enroll_netns(cookie))
        {
            // The caller holds the pod closed: never purged into leaving capture.
            return Err(e.to_string());
        }
        info!(pod = %uid, namespace = %sb.namespace, name = %sb.name, netns = %sb.netns.display(), netns_cookie = cookie, ips = ?sb.ips, adopted_listeners = adopted, "pod captured");
        if let Some(tx) = &self.captured_notices {
            let _ = tx.send((sb.namespace.clone(), sb.name.clone()));
        }
        self.captured.insert(
            uid,
            Captured {
                ips: sb.ips,
                cookie,
                netns,
                _proxy: proxy,
            },
        );
        Ok(())
    }

    async fn release(&mut self, uid: &str) {
        if let Some(h) = self.closed.remove(uid) {
            self.proxy.metrics.set_pods_held_closed(self.closed.len());
            if !self.captured.contains_key(uid) {
                let _ = self.capture.detach_pod(uid);
                let _ = pod_net::remove(&h.netns, &self.home).await;
                for ip in &h.ips {
                    let _ = self.maps.remove_pod_ip(*ip);
                }
                match self.maps.purge_netns(h.cookie) {
                    Ok(_) => info!(pod = %uid, "pod held closed released"),
                    Err(e) => warn!(pod = %uid, error = %e, "purging a pod held closed"),
                }
                return;
            }
        }
        let Some(c) = self.captured.remove(uid) else {
            return;
        };
        if let Err(e) = self.maps.unenroll_netns(c.cookie) {
            warn!(pod = %uid, error = %e, "unenrolling");
        }
        for ip in &c.ips {
            if let Err(e) = self.maps.remove_pod_ip(*ip) {
                warn!(pod = %uid, error = %e, "removing pod address");
            }
        }
        if let Err(e) = self.capture.detach_pod(uid) {
            warn!(pod = %uid, error = %e, "detaching");
        }
        if let Err(e) = pod_net::remove(&c.netns, &self.home).await {
            // The namespace is often gone already with the pod; nothing to undo then.
            tracing::debug!(pod = %uid, error = %e, "removing pod routing");
        }
        match self.maps.purge_netns(c.cookie) {
            Ok(n) if n > 0 => info!(pod = %uid, entries = n, "purged leftover map entries"),
            Ok(_) => {}
            Err(e) => warn!(pod = %uid, error = %e, "purging map entries"),
        }
        info!(pod = %uid, "pod released");
    }

    /// Brings every sandbox in line with `state`, then sweeps map entries and pinned links
    /// that belong to no captured pod (left by a crash, or by pods deleted while we were down).
    pub async fn reconcile(&mut self, state: &MeshState) {
        let uids: Vec<String> = self
            .known
            .keys()
            .chain(self.captured.keys())
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for uid in uids {
            if let Err(e) = self.reconcile_one(&uid, state).await {
                warn!(pod = %uid, error = %e, "reconcile failed; will retry on the next change");
            }
        }
        let live: BTreeSet<u64> = self
            .captured
            .values()
            .map(|c| c.cookie)
            .chain(self.closed.values().map(|h| h.cookie))
            .collect();
        for cookie in self.maps.known_netns().difference(&live) {
            match self.maps.purge_netns(*cookie) {
                Ok(n) => info!(
                    netns_cookie = cookie,
                    entries = n,
                    "swept entries of a namespace no pod owns"
                ),
                Err(e) => warn!(netns_cookie = cookie, error = %e, "sweeping"),
            }
        }
        for uid in self.capture.pinned_pods() {
            if !self.captured.contains_key(&uid) && !self.closed.contains_key(&uid) {
                info!(pod = %uid, "removing a pinned link no pod owns");
                let _ = self.capture.detach_pod(&uid);
            }
        }
    }

    /// Runs until both the command channel and the state channel close.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>, mut state: StateHandle) {
        let mut current: Snapshot = state.current();
        self.reconcile(&current).await;
        let mut retry = tokio::time::interval(CAPTURE_RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = retry.tick(), if !self.closed.is_empty() => {
                    let held: Vec<String> = self.closed.keys().cloned().collect();
                    for uid in held {
                        // Errors are logged (once) and counted by the hold itself.
                        let _ = self.reconcile_one(&uid, &current).await;
                    }
                }
                cmd = commands.recv() => match cmd {
                    Some((req, reply)) => {
                        let resp = self.handle(req, &current).await;
                        let _ = reply.send(resp);
                    }
                    None => break,
                },
                next = state.changed() => match next {
                    Some(s) => {
                        current = s;
                        self.reconcile(&current).await;
                    }
                    None => break,
                },
            }
        }
    }
}

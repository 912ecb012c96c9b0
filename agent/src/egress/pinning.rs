//! The consumer that keeps this node's pinned prefixes equal to MeshState: for every snapshot,
//! the StaticGatewayConfigurations placed on this node whose prefix is known
//! ([`super::pinned_prefixes_for`]) are handed to a [`PrefixPinner`]; one that goes away is
//! unpinned, a bad one is reported and changes nothing.
use std::{future::Future, pin::Pin, sync::Arc, time::Instant};

use tracing::{info, warn};

use super::{
    PinnedPrefix, PrefixPinner, ReconcileReport,
    netlink::{NetlinkError, PinningConfig, Uplink, discover_uplink},
    pinned_prefixes_for,
};
use crate::resources::NamespacedName;
use crate::{
    config::PinningSettings,
    state::{MeshState, StateHandle, egress::PrefixSource},
};

/// What this node should pin in `state` (nothing when the node is not in it).
pub fn desired(state: &MeshState, node_name: &str) -> Vec<PinnedPrefix> {
    state
        .nodes
        .get(node_name)
        .map(|n| pinned_prefixes_for(&state.egress, n))
        .unwrap_or_default()
}

/// Prefixes that came from the agent's config (not from status), for the status writer.
pub fn from_agent_config(
    state: &MeshState,
    node_name: &str,
) -> Vec<(String, String, ipnet::IpNet)> {
    let Some(node) = state.nodes.get(node_name) else {
        return Vec::new();
    };
    state
        .egress
        .static_gateways
        .configs
        .values()
        .filter(|g| g.hosted_on(node) && g.prefix_source == Some(PrefixSource::AgentConfig))
        .filter_map(|g| Some((g.key.namespace.clone(), g.key.name.clone(), g.prefix?)))
        .collect()
}

/// Where the loop reports a prefix it took from the agent's config once it is pinned; in kube
/// mode `app.rs` hands in one that writes the StaticGatewayConfiguration's
/// `status.egressIpPrefix`.
pub trait PrefixReporter: Send + Sync {
    /// Reports that `prefix` of StaticGatewayConfiguration `namespace/name` is pinned.
    fn report<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        prefix: ipnet::IpNet,
    ) -> Pin<Box<dyn Future<Output = Result<(), ReportError>> + Send + 'a>>;
}

/// Why a [`PrefixReporter`] could not report.
pub type ReportError = Box<dyn std::error::Error + Send + Sync>;

/// Reconciles this node's prefixes with the state until every publisher is gone.
pub struct PinningLoop {
    node_name: String,
    settings: PinningSettings,
    pinner: Option<PrefixPinner>,
    last: Option<Vec<PinnedPrefix>>,
    /// Where to report prefixes taken from the agent's config (kube mode).
    reporter: Option<Arc<dyn PrefixReporter>>,
    reported: std::collections::BTreeSet<(String, String, ipnet::IpNet)>,
}

impl PinningLoop {
    /// A loop for `node_name`; the netlink side is opened on first need.
    pub fn new(node_name: String, settings: PinningSettings) -> Self {
        Self {
            node_name,
            settings,
            pinner: None,
            last: None,
            reporter: None,
            reported: Default::default(),
        }
    }

    /// Reports prefixes from the agent's config through `reporter` once they are pinned,
    /// each once.
    pub fn with_reporter(mut self, reporter: Arc<dyn PrefixReporter>) -> Self {
        self.reporter = Some(reporter);
        self
    }

    async fn report_status(&mut self, state: &MeshState, pinned: &[String]) {
        let Some(reporter) = self.reporter.clone() else {
            return;
        };
        for entry in from_agent_config(state, &self.node_name) {
            let key = NamespacedName::new(&entry.0, &entry.1).key();
            if !pinned.contains(&key) || self.reported.contains(&entry) {
                continue;
            }
            match reporter.report(&entry.0, &entry.1, entry.2).await {
                Ok(()) => {
                    info!(sgc = %key, prefix = %entry.2, "reported status.egressIpPrefix");
                    self.reported.insert(entry);
                }
                Err(e) => warn!(sgc = %key, error = %e, "writing status.egressIpPrefix"),
            }
        }
    }

    async fn pinner(&mut self) -> Result<&mut PrefixPinner, NetlinkError> {
        if self.pinner.is_none() {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
            tokio::spawn(conn);
            let uplink = match &self.settings.uplink_interface {
                Some(interface) => Uplink {
                    interface: interface.clone(),
                    gateway_v4: self.settings.uplink_gateway_v4,
                    gateway_v6: self.settings.uplink_gateway_v6,
                },
                None => {
                    let mut found = discover_uplink(&handle).await?;
                    found.gateway_v4 = self.settings.uplink_gateway_v4.or(found.gateway_v4);
                    found.gateway_v6 = self.settings.uplink_gateway_v6.or(found.gateway_v6);
                    found
                }
            };
            info!(uplink = %uplink.interface, gateway_v4 = ?uplink.gateway_v4, "egress prefix pinning ready");
            self.pinner = Some(PrefixPinner::new(handle, PinningConfig::new(uplink)));
        }
        // Just set when it was empty.
        self.pinner.as_mut().ok_or(NetlinkError::NoUplink)
    }

    /// One reconcile for `state`; `None` when nothing changed since the last one.
    pub async fn apply(
        &mut self,
        state: &MeshState,
    ) -> Option<Result<ReconcileReport, NetlinkError>> {
        let want = desired(state, &self.node_name);
        if self.last.as_ref() == Some(&want) {
            return None;
        }
        if want.is_empty() && self.pinner.is_none() && self.last.is_none() {
            // Nothing wanted and nothing done by this process: still sweep leftovers of an
            // earlier run, but only if a netlink socket opens without an uplink lookup.
            self.last = Some(want);
            return None;
        }
        let start = Instant::now();
        let result = match self.pinner().await {
            Ok(p) => p.reconcile(&want).await,
            Err(e) => Err(e),
        };
        match &result {
            Ok(report) => {
                for e in &report.rejected {
                    warn!(sgc = e.name(), error = %e, "egress prefix not pinned; nothing changed for it");
                }
                info!(
                    pinned = report.pinned.len(),
                    rejected = report.rejected.len(),
                    added = %report.added,
                    removed = %report.removed,
                    elapsed_ms = start.elapsed().as_millis() as u64,
                    "egress prefixes reconciled"
                );
                self.last = Some(want);
            }
            Err(e) => {
                warn!(error = %e, "egress prefix reconcile failed; retrying on the next change")
            }
        }
        Some(result)
    }

    /// Runs until the state channel closes.
    pub async fn run(mut self, mut state: StateHandle) {
        if !self.settings.enabled {
            return;
        }
        let mut current = state.current();
        loop {
            match self.apply(&current).await {
                Some(Err(_)) => {
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    current = state.current();
                    continue;
                }
                Some(Ok(report)) => self.report_status(&current, &report.pinned).await,
                None => {}
            }
            match state.changed().await {
                Some(s) => current = s,
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{
        resources::ResourceSet,
        state::{MeshSettings, Node, build, egress::static_gateway::AGENTPOOL_LABEL},
    };

    /// Remembers what it was asked to report.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl PrefixReporter for Recorder {
        fn report<'a>(
            &'a self,
            namespace: &'a str,
            name: &'a str,
            prefix: ipnet::IpNet,
        ) -> Pin<Box<dyn Future<Output = Result<(), ReportError>> + Send + 'a>> {
            Box::pin(async move {
                self.0
                    .lock()
                    .map_err(|e| e.to_string())?
                    .push(format!("{namespace}/{name}={prefix}"));
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn pinned_prefixes_from_the_agent_config_are_reported_once_through_the_reporter() {
        let yaml = r#"
apiVersion: egressgateway.kubernetes.azure.com/v1alpha1
kind: StaticGatewayConfiguration
metadata: {name: here, namespace: a}
spec: {gatewayNodepoolName: gwpool}
---
apiVersion: egressgateway.kubernetes.azure.com/v1alpha1
kind: StaticGatewayConfiguration
metadata: {name: from-status, namespace: a}
spec: {gatewayNodepoolName: gwpool}
status: {egressIpPrefix: 203.0.113.16/28}
"#;
        let mut set = ResourceSet::default();
        for (i, doc) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
            let value = serde::Deserialize::deserialize(doc).expect("yaml");
            set.add_document(i, value).expect("known kind");
        }
        let settings = MeshSettings {
            static_gateway_prefixes: [(
                "a/here".to_owned(),
                "203.0.113.0/28".parse().expect("net"),
            )]
            .into(),
            ..MeshSettings::default()
        };
        let mut state = build(&set, &settings).state;
        std::sync::Arc::make_mut(&mut state.nodes).insert(
            "gw-0".into(),
            Node {
                name: "gw-0".into(),
                addresses: vec![],
                labels: [(AGENTPOOL_LABEL.to_owned(), "gwpool".to_owned())].into(),
            },
        );
        let recorder = Arc::new(Recorder::default());
        let mut pinning = PinningLoop::new("gw-0".into(), PinningSettings::default())
            .with_reporter(recorder.clone());
        // Not pinned yet: nothing to report.
        pinning.report_status(&state, &[]).await;
        assert!(recorder.0.lock().expect("lock").is_empty());
        let pinned = ["a/here".to_owned(), "a/from-status".to_owned()];
        pinning.report_status(&state, &pinned).await;
        pinning.report_status(&state, &pinned).await;
        // Only the prefix the agent's config supplied, and only once.
        assert_eq!(*recorder.0.lock().expect("lock"), ["a/here=203.0.113.0/28"]);
    }
}

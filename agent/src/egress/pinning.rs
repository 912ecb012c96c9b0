//! The consumer that keeps this node's pinned prefixes equal to MeshState: for every snapshot,
//! the StaticGatewayConfigurations placed on this node whose prefix is known
//! ([`super::pinned_prefixes_for`]) are handed to a [`PrefixPinner`]; one that goes away is
//! unpinned, a bad one is reported and changes nothing.
use std::time::Instant;

use tracing::{info, warn};

use super::{
    PinnedPrefix, PrefixPinner, ReconcileReport,
    netlink::{NetlinkError, PinningConfig, Uplink, discover_uplink},
    pinned_prefixes_for,
};
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

/// Reconciles this node's prefixes with the state until every publisher is gone.
pub struct PinningLoop {
    node_name: String,
    settings: PinningSettings,
    pinner: Option<PrefixPinner>,
    last: Option<Vec<PinnedPrefix>>,
    /// In kube mode: where to report prefixes taken from the agent's config.
    status: Option<kube::Client>,
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
            status: None,
            reported: Default::default(),
        }
    }

    /// Reports prefixes from the agent's config in `status.egressIpPrefix` through `client`
    /// (server-side apply, field manager `sluice`) once they are pinned.
    pub fn with_status(mut self, client: kube::Client) -> Self {
        self.status = Some(client);
        self
    }

    async fn report_status(&mut self, state: &MeshState, pinned: &[String]) {
        let Some(client) = self.status.clone() else {
            return;
        };
        for entry in from_agent_config(state, &self.node_name) {
            let key = format!("{}/{}", entry.0, entry.1);
            if !pinned.contains(&key) || self.reported.contains(&entry) {
                continue;
            }
            match crate::sources::kube::status::set_egress_ip_prefix(
                &client, &entry.0, &entry.1, entry.2,
            )
            .await
            {
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

//! Egress settings and shared parts for the outbound path and the egress gateway role: how
//! long to peek for a host, the DNS ServiceEntry cache, where egress gateways listen and who
//! they are. The decision itself is [`crate::state::outbound`].
use std::{net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use crate::{
    admin::metrics::Metrics,
    config::AgentConfig,
    egress::dns::DnsCache,
    state::{
        egress::{NothingResolved, Resolved},
        outbound::GatewayPeer,
    },
};

/// Egress settings and shared parts every proxy task reads.
#[derive(Debug)]
pub struct EgressRuntime {
    /// Answers for DNS-resolution ServiceEntries (and the resolver gateways use).
    pub dns: Option<Arc<DnsCache>>,
    pub metrics: Option<Arc<Metrics>>,
    pub peek_bytes: usize,
    pub peek_timeout: Duration,
    /// Where egress gateways accept HBONE, and their identity.
    pub gateway: GatewayPeer,
    /// CA file for TLS origination when a DestinationRule names none.
    pub upstream_ca_file: Option<PathBuf>,
}

impl Default for EgressRuntime {
    fn default() -> Self {
        Self::from_config(&AgentConfig::default(), None, None)
    }
}

impl EgressRuntime {
    /// Settings from the agent's config.
    pub fn from_config(
        agent: &AgentConfig,
        dns: Option<Arc<DnsCache>>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        let e = &agent.egress;
        Self {
            dns,
            metrics,
            peek_bytes: e.peek_bytes.max(64),
            peek_timeout: Duration::from_millis(e.peek_timeout_ms),
            gateway: GatewayPeer {
                port: e
                    .gateway
                    .as_ref()
                    .map_or(super::hbone::HBONE_PORT, |g| g.listen.port()),
                namespace: e
                    .gateway_namespace
                    .clone()
                    .unwrap_or_else(|| agent.root_namespace.clone()),
                service_account: e.gateway_service_account.clone(),
            },
            upstream_ca_file: e.gateway.as_ref().and_then(|g| g.upstream_ca_file.clone()),
        }
    }

    /// The resolver's answers, for the egress decision.
    pub fn resolved(&self) -> &dyn Resolved {
        match &self.dns {
            Some(d) => &**d,
            None => &NothingResolved,
        }
    }

    /// A name the agent's resolver answered with `ip` (DNS ServiceEntries).
    pub fn resolved_host(&self, ip: IpAddr) -> Option<String> {
        self.dns.as_ref().and_then(|d| d.host_for(ip))
    }

    /// Counts a refusal.
    pub fn refused(&self, label: &str) {
        if let Some(m) = &self.metrics {
            m.egress_refused(label);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_name_the_gateway_identity() {
        let rt = EgressRuntime::default();
        assert_eq!(
            rt.gateway.identity("cluster.local").to_string(),
            "spiffe://cluster.local/ns/istio-system/sa/sluice-egress-gateway"
        );
        assert_eq!(rt.gateway.port, 15008);
        assert_eq!(rt.peek_bytes, super::super::peek::DEFAULT_PEEK_BYTES);
    }
}

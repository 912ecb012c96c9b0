//! Logs, once per policy, what the node proxy does not enforce as written.
use std::collections::HashSet;

use crate::state::{
    StateHandle,
    policy::{AuthzAction, Policies},
};

/// Remembers which notices were logged, so each policy's is logged once (again only if the
/// policy changes what is left out). The agent runs one over every new snapshot ([`Self::run`]).
#[derive(Debug, Default)]
pub struct PolicyNotices {
    seen: HashSet<String>,
}

impl PolicyNotices {
    /// Logs the notices of `policies` not logged before and returns them.
    pub fn log_new(&mut self, policies: &Policies) -> Vec<String> {
        let mut fresh = Vec::new();
        for a in &policies.authorizations {
            if a.http_attributes.is_empty() {
                continue;
            }
            let consequence = match a.action {
                AuthzAction::Allow => {
                    "ALLOW rules (or, for a remote address, the sources) using them never match (more restrictive than written)"
                }
                AuthzAction::Deny => {
                    "DENY rules using them match on their L4 part alone (more restrictive than written)"
                }
            };
            fresh.push(format!(
                "AuthorizationPolicy {}/{}: the node proxy cannot check HTTP attributes ({}); {consequence}",
                a.namespace,
                a.name,
                a.http_attributes.join(", ")
            ));
        }
        for i in &policies.ignored {
            fresh.push(format!(
                "{} {}/{} is not enforced by the node proxy: {}",
                i.kind, i.namespace, i.name, i.reason
            ));
        }
        fresh.retain(|notice| self.seen.insert(notice.clone()));
        for notice in &fresh {
            tracing::warn!(target: "sluice::policy", "{notice}");
        }
        fresh
    }

    /// Logs the notices of the current snapshot and of every later one, until every publisher
    /// is gone.
    pub async fn run(mut self, mut state: StateHandle) {
        let mut current = state.current();
        loop {
            self.log_new(&current.policy);
            match state.changed().await {
                Some(next) => current = next,
                None => return,
            }
        }
    }
}

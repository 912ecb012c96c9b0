//! PeerAuthentication: the mTLS mode a workload port requires.
use crate::state::{
    Workload,
    policy::{MtlsMode, Policies, PolicyScope},
};

impl PolicyScope {
    /// True if a policy with this scope applies to `workload`.
    pub fn selects(&self, workload: &Workload) -> bool {
        match self {
            PolicyScope::Mesh => true,
            PolicyScope::Namespace { namespace } => *namespace == workload.namespace,
            PolicyScope::Workloads { namespace, labels } => {
                namespace
                    .as_ref()
                    .is_none_or(|ns| *ns == workload.namespace)
                    && labels
                        .iter()
                        .all(|(k, v)| workload.labels.get(k) == Some(v))
            }
        }
    }
}

impl Policies {
    /// The mTLS mode for connections to `workload` on `port`, as Istio resolves it:
    /// the workload's selector policy (its `portLevelMtls` entry for `port`, then its `mtls`),
    /// then the namespace's policy, then the mesh-wide one in the root namespace; `UNSET`
    /// inherits from the next level; with nothing set, `PERMISSIVE`. When several policies
    /// apply at one level, the oldest wins.
    pub fn mtls_mode(&self, workload: &Workload, port: u16) -> MtlsMode {
        let oldest = |level: fn(&PolicyScope) -> bool| {
            self.peer_authentications
                .iter()
                .find(|pa| level(&pa.scope) && pa.scope.selects(workload))
        };
        if let Some(pa) = oldest(|s| matches!(s, PolicyScope::Workloads { .. })) {
            if let Some(Some(mode)) = pa.port_modes.get(&port) {
                return *mode;
            }
            if let Some(mode) = pa.mode {
                return mode;
            }
        }
        if let Some(mode) =
            oldest(|s| matches!(s, PolicyScope::Namespace { .. })).and_then(|pa| pa.mode)
        {
            return mode;
        }
        oldest(|s| matches!(s, PolicyScope::Mesh))
            .and_then(|pa| pa.mode)
            .unwrap_or(MtlsMode::Permissive)
    }
}

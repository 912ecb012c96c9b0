//! PeerAuthentication: the mTLS mode a workload port requires.
use crate::state::{
    Workload,
    policy::{MtlsMode, PeerAuthn, Policies, PolicyScope},
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
        resolve(
            |level| {
                self.peer_authentications
                    .selecting(workload)
                    .find(|pa| level(&pa.scope))
            },
            port,
        )
    }
}

/// Istio's resolution over the three levels, given `oldest`: the oldest policy of a level
/// (the scope test) that selects the workload.
fn resolve<'a>(
    oldest: impl Fn(fn(&PolicyScope) -> bool) -> Option<&'a PeerAuthn>,
    port: u16,
) -> MtlsMode {
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::policy::{
        PeerAuthentications,
        tests::{labels, workload},
    };

    /// The mode as resolved before the index: every PeerAuthentication read at each level.
    fn linear(all: &[PeerAuthn], workload: &Workload, port: u16) -> MtlsMode {
        resolve(
            |level| {
                all.iter()
                    .find(|pa| level(&pa.scope) && pa.scope.selects(workload))
            },
            port,
        )
    }

    /// The indexed lookup resolves every workload and port as reading every PeerAuthentication
    /// would: each level, UNSET inheriting, port-level modes, the oldest winning.
    #[test]
    fn the_indexed_mode_equals_reading_every_peer_authentication() {
        let modes = [
            None,
            Some(MtlsMode::Strict),
            Some(MtlsMode::Permissive),
            Some(MtlsMode::Disable),
        ];
        let selectors: [&[(&str, &str)]; 4] = [
            &[("app", "web")],
            &[("app", "db")],
            &[("app", "web"), ("tier", "front")],
            &[("tier", "front")],
        ];
        let mut list = Vec::new();
        let mut n = 0usize;
        // Several rounds, so that several policies apply at one level and the oldest must win.
        for round in 0..3 {
            for ns in ["a", "b"] {
                for (k, sel) in selectors.iter().enumerate() {
                    n += 1;
                    let mut port_modes = BTreeMap::new();
                    if (round + k) % 2 == 0 {
                        port_modes.insert(8080, modes[(n + 1) % 4]);
                    }
                    list.push(PeerAuthn {
                        namespace: ns.into(),
                        name: format!("{round}-{ns}-{k}"),
                        scope: PolicyScope::Workloads {
                            namespace: Some(ns.into()),
                            labels: labels(sel),
                        },
                        mode: modes[n % 4],
                        port_modes,
                    });
                }
                n += 1;
                list.push(PeerAuthn {
                    namespace: ns.into(),
                    name: format!("{round}-{ns}"),
                    scope: PolicyScope::Namespace {
                        namespace: ns.into(),
                    },
                    mode: modes[n % 4],
                    port_modes: BTreeMap::new(),
                });
            }
            n += 1;
            list.push(PeerAuthn {
                namespace: "istio-system".into(),
                name: format!("{round}-mesh"),
                scope: PolicyScope::Mesh,
                mode: modes[(n + round) % 4],
                port_modes: BTreeMap::new(),
            });
        }
        // Each prefix of the list, so that every level is sometimes missing or UNSET.
        let mut differing = std::collections::BTreeSet::new();
        for len in 0..=list.len() {
            let policies = Policies {
                peer_authentications: list[..len].iter().cloned().collect::<PeerAuthentications>(),
                ..Policies::default()
            };
            for ns in ["a", "b", "c"] {
                for pairs in [
                    &[][..],
                    &[("app", "web")],
                    &[("app", "web"), ("tier", "front")],
                    &[("app", "db"), ("tier", "back")],
                    &[("tier", "front")],
                ] {
                    let w = workload(ns, pairs);
                    for port in [8080, 9090] {
                        let mode = policies.mtls_mode(&w, port);
                        assert_eq!(
                            mode,
                            linear(&list[..len], &w, port),
                            "{len} policies, {ns} {pairs:?} port {port}"
                        );
                        differing.insert(format!("{mode:?}"));
                    }
                }
            }
        }
        assert_eq!(differing.len(), 3, "every mode is reached: {differing:?}");
    }
}

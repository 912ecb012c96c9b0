//! Rebuilding MeshState after a change from the parts the change touched.
//!
//! [`build`](super::build) makes the whole state in three parts (the core of namespaces, nodes
//! and workloads; egress, Services and ingress; the policies). [`Incremental`] keeps the parts
//! of its last build and, given each kind's fingerprint from the source ([`KindPrints`]),
//! builds again only the parts that read a kind whose fingerprint changed; the others are shared
//! with the previous snapshot through their `Arc`s. Its output, rejections included, is the
//! whole build's for the same resources.
use super::{
    MeshSettings,
    build::{BuildOutput, Core, PolicyPart, Rest, assemble},
};
use crate::resources::{ResourceSet, kinds};

/// A fingerprint of each kind's list, by [`WatchedKind::INDEX`](kinds::WatchedKind::INDEX), as
/// the source knows it (a hash of the documents' text, a count of watch events): equal
/// fingerprints must mean equal lists. `None` is unknown, and never equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KindPrints(pub [Option<u64>; kinds::COUNT]);

impl KindPrints {
    /// Nothing known: every part is built.
    pub fn unknown() -> Self {
        Self([None; kinds::COUNT])
    }

    /// Whether kind `index` is known to be as it was in `before`.
    pub(super) fn same(&self, before: &Self, index: usize) -> bool {
        self.0[index].is_some() && self.0[index] == before.0[index]
    }

    /// Forgets kind `index` (its list was changed after the source fingerprinted it).
    pub fn forget(&mut self, index: usize) {
        self.0[index] = None;
    }
}

impl Default for KindPrints {
    fn default() -> Self {
        Self::unknown()
    }
}

/// Which parts a build with some fingerprints builds again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rebuilds {
    pub core: bool,
    pub rest: bool,
    pub policy: bool,
}

/// The parts of the last build, and what they were built from.
#[derive(Debug)]
struct Last {
    prints: KindPrints,
    settings: MeshSettings,
    core: Core,
    rest: Rest,
    policy: PolicyPart,
}

/// Builds MeshState, reusing the parts of its previous build that a change did not touch.
#[derive(Debug, Default)]
pub struct Incremental {
    last: Option<Last>,
}

impl Incremental {
    /// The parts a build with `prints` and `settings` would build again.
    pub fn rebuilds(&self, prints: &KindPrints, settings: &MeshSettings) -> Rebuilds {
        let Some(last) = self.last.as_ref().filter(|l| l.settings == *settings) else {
            return Rebuilds {
                core: true,
                rest: true,
                policy: true,
            };
        };
        let changed = |index: usize| !prints.same(&last.prints, index);
        let policy_kinds = PolicyPart::kinds();
        let core = Core::kinds().into_iter().any(changed);
        Rebuilds {
            core,
            // Every kind but the policies' may be read by this part, and it reads the core.
            rest: core
                || (0..kinds::COUNT)
                    .filter(|i| !policy_kinds.contains(i))
                    .any(changed),
            policy: policy_kinds.into_iter().any(changed),
        }
    }

    /// The kinds (by [`WatchedKind::INDEX`](kinds::WatchedKind::INDEX)) a build with `prints`
    /// and `settings` reads: a source may leave the others' lists empty.
    pub fn kinds_read(&self, prints: &KindPrints, settings: &MeshSettings) -> [bool; kinds::COUNT] {
        let again = self.rebuilds(prints, settings);
        let policy = PolicyPart::kinds();
        // The rest part reads every kind but the policies' (and is built whenever the core is).
        std::array::from_fn(|i| {
            if policy.contains(&i) {
                again.policy
            } else {
                again.rest
            }
        })
    }

    /// As [`build`](super::build) of `resources`, whose kinds have the fingerprints `prints`.
    pub fn build(
        &mut self,
        resources: &ResourceSet,
        prints: &KindPrints,
        settings: &MeshSettings,
    ) -> BuildOutput {
        let again = self.rebuilds(prints, settings);
        let last = self.last.take();
        let (core, rest, policy) = match last {
            Some(l) if again != Rebuilds::full() => (Some(l.core), Some(l.rest), Some(l.policy)),
            _ => (None, None, None),
        };
        let t = std::time::Instant::now();
        let core = match core {
            Some(c) if !again.core => c,
            _ => Core::build(resources),
        };
        let core_us = t.elapsed().as_micros() as u64;
        let rest = match rest {
            Some(r) if !again.rest => r,
            _ => Rest::build(resources, settings, &core),
        };
        let rest_us = t.elapsed().as_micros() as u64 - core_us;
        let policy = match policy {
            Some(p) if !again.policy => p,
            _ => PolicyPart::build(resources, settings),
        };
        tracing::debug!(
            ?again,
            core_us,
            rest_us,
            policy_us = t.elapsed().as_micros() as u64 - core_us - rest_us,
            "mesh state parts built"
        );
        let out = assemble(settings, &core, &rest, &policy);
        self.last = Some(Last {
            prints: *prints,
            settings: settings.clone(),
            core,
            rest,
            policy,
        });
        out
    }

    /// Forgets the last build: the next builds every part.
    pub fn clear(&mut self) {
        self.last = None;
    }
}

impl Rebuilds {
    fn full() -> Self {
        Self {
            core: true,
            rest: true,
            policy: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        resources::kinds::{KindVisitor, WatchedKind},
        state::{LastGood, build},
    };

    /// What a source would fingerprint: a hash of each kind's list.
    fn prints(set: &ResourceSet) -> KindPrints {
        struct Hash<'a>(&'a ResourceSet, KindPrints);
        impl KindVisitor for Hash<'_> {
            fn visit<K: WatchedKind>(&mut self) {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                serde_json::to_string(K::list(self.0))
                    .expect("serializes")
                    .hash(&mut h);
                self.1.0[K::INDEX] = Some(h.finish());
            }
        }
        let mut hash = Hash(set, KindPrints::unknown());
        kinds::for_each_kind(&mut hash);
        hash.1
    }

    /// A small cluster as named YAML documents, changed one document at a time.
    struct World {
        docs: std::collections::BTreeMap<String, String>,
    }

    impl World {
        fn new() -> Self {
            let mut docs = std::collections::BTreeMap::new();
            let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/seeds");
            for name in ["002-egress.yaml", "003-gateway-api.yaml"] {
                let text = std::fs::read_to_string(seeds.join(name)).expect("seed");
                docs.insert(format!("seed/{name}"), text);
            }
            let mut w = Self { docs };
            w.namespace("shop", "ambient");
            w.namespace("legacy", "none");
            w.namespace("istio-system", "none");
            w.node("n1", "192.168.0.1");
            for i in 0..6 {
                w.pod(i, i % 3);
            }
            w.service(0, 8080);
            w.service(1, 8081);
            w.peer_authentication("shop", "STRICT");
            w.peer_authentication("istio-system", "PERMISSIVE");
            w.authorization_policy(0, "10.0.0.0/8");
            w
        }

        fn namespace(&mut self, name: &str, mode: &str) {
            self.docs.insert(
                format!("ns/{name}"),
                format!(
                    "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{istio.io/dataplane-mode: {mode}}}}}\n"
                ),
            );
        }

        fn node(&mut self, name: &str, address: &str) {
            self.docs.insert(
                format!("node/{name}"),
                format!(
                    "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nstatus: {{addresses: [{{type: InternalIP, address: \"{address}\"}}]}}\n"
                ),
            );
        }

        fn pod(&mut self, i: usize, app: usize) {
            let ns = if i.is_multiple_of(2) {
                "shop"
            } else {
                "legacy"
            };
            self.docs.insert(
                format!("pod/{i}"),
                format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: {ns}, uid: u{i}, labels: {{app: a{app}}}}}\n\
                     spec: {{nodeName: n1, containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
                     status: {{phase: Running, podIP: 10.1.0.{}}}\n",
                    i + 1
                ),
            );
        }

        fn service(&mut self, app: usize, target: u16) {
            self.docs.insert(
                format!("svc/{app}"),
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: s{app}, namespace: shop}}\n\
                     spec: {{clusterIP: 10.96.0.{}, selector: {{app: a{app}}}, ports: [{{port: 80, targetPort: {target}}}]}}\n",
                    app + 1
                ),
            );
        }

        fn peer_authentication(&mut self, ns: &str, mode: &str) {
            self.docs.insert(
                format!("pa/{ns}"),
                format!(
                    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
                     metadata: {{name: default, namespace: {ns}}}\nspec: {{mtls: {{mode: {mode}}}}}\n"
                ),
            );
        }

        fn authorization_policy(&mut self, i: usize, block: &str) {
            self.docs.insert(
                format!("ap/{i}"),
                format!(
                    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                     metadata: {{name: ap{i}, namespace: shop}}\n\
                     spec: {{selector: {{matchLabels: {{app: a{}}}}}, rules: [{{from: [{{source: {{ipBlocks: [\"{block}\"]}}}}]}}]}}\n",
                    i % 3
                ),
            );
        }

        fn resources(&self) -> ResourceSet {
            let text: Vec<&str> = self.docs.values().map(String::as_str).collect();
            ResourceSet::from_yaml(&text.join("\n---\n")).expect("the world parses")
        }

        /// Change number `step` of a fixed pseudo-random sequence; its kind, for the report.
        fn change(&mut self, step: usize, pick: usize) -> &'static str {
            match pick % 10 {
                0 => {
                    self.pod(10 + step, step % 3);
                    "add a pod"
                }
                1 => {
                    let pods: Vec<String> = self
                        .docs
                        .keys()
                        .filter(|k| k.starts_with("pod/"))
                        .cloned()
                        .collect();
                    if let Some(k) = pods.get(step % pods.len().max(1)) {
                        self.docs.remove(k);
                    }
                    "remove a pod"
                }
                2 => {
                    self.pod(step % 6, step % 4);
                    "relabel a pod"
                }
                3 => {
                    let mode = ["ambient", "none"][step % 2];
                    self.namespace("legacy", mode);
                    "relabel a namespace"
                }
                4 => {
                    let mode = ["STRICT", "STRCT", "DISABLE", "PERMISSIVE"][step % 4];
                    self.peer_authentication("shop", mode);
                    "change a PeerAuthentication (sometimes invalid)"
                }
                5 => {
                    let block = ["10.0.0.0/8", "10.0.0.0/33", "192.168.0.0/16"][step % 3];
                    self.authorization_policy(step % 3, block);
                    "add or change an AuthorizationPolicy (sometimes invalid)"
                }
                6 => {
                    self.docs.remove(&format!("ap/{}", step % 3));
                    "remove an AuthorizationPolicy"
                }
                7 => {
                    self.service(step % 3, 8080 + (step % 5) as u16);
                    "add or change a Service"
                }
                8 => {
                    let address = ["192.168.0.1", "192.168.0.999", "192.168.0.2"][step % 3];
                    self.node("n1", address);
                    "change a Node (sometimes invalid)"
                }
                _ => "nothing",
            }
        }
    }

    /// Over a sequence of changes of every kind, the incremental build equals the whole build
    /// of the same resources (state and rejections, with and without LastGood's fallback), and
    /// a change shares the parts it did not touch with the previous state.
    #[test]
    fn the_incremental_build_equals_the_whole_build() {
        let settings = MeshSettings::default();
        let mut world = World::new();
        let mut incremental = Incremental::default();
        let (mut whole_lg, mut incremental_lg) = (LastGood::default(), LastGood::default());
        let mut previous: Option<crate::state::MeshState> = None;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut kinds_seen = std::collections::BTreeSet::new();
        let mut fell_back = 0;
        let mut shared_policy = 0;
        for step in 0..120 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let what = if step == 0 {
                "start"
            } else {
                world.change(step, seed as usize)
            };
            kinds_seen.insert(what);
            let set = world.resources();
            let p = prints(&set);

            let whole = build(&set, &settings);
            let inc = incremental.build(&set, &p, &settings);
            assert_eq!(inc.state, whole.state, "step {step}: {what}");
            assert_eq!(inc.rejections, whole.rejections, "step {step}: {what}");

            let whole = whole_lg.build(set.clone(), &settings);
            let inc_lg = incremental_lg.build_changed(set, &p, &settings);
            assert_eq!(inc_lg.state, whole.state, "step {step}: {what} (LastGood)");
            assert_eq!(
                inc_lg.rejections, whole.rejections,
                "step {step}: {what} (LastGood)"
            );
            assert_eq!(
                incremental_lg.accepted_text(),
                whole_lg.accepted_text(),
                "step {step}: {what}"
            );
            fell_back += whole
                .rejections
                .iter()
                .filter(|r| r.message.ends_with(crate::state::last_good::KEPT_NOTE))
                .count();

            // A change to pods alone leaves the policies shared, and the other way round.
            if let Some(prev) = &previous {
                let pods_only = what.contains("pod");
                if pods_only {
                    assert!(Arc::ptr_eq(&prev.policy, &inc.state.policy), "step {step}");
                    shared_policy += 1;
                }
                if what.contains("Policy") || what.contains("PeerAuthentication") {
                    assert!(
                        Arc::ptr_eq(&prev.workloads, &inc.state.workloads),
                        "step {step}"
                    );
                    assert!(
                        Arc::ptr_eq(&prev.services, &inc.state.services),
                        "step {step}"
                    );
                }
            }
            previous = Some(inc.state);
        }
        assert_eq!(kinds_seen.len(), 11, "every kind of change: {kinds_seen:?}");
        assert!(
            fell_back > 0,
            "some change fell back to a last valid version"
        );
        assert!(shared_policy > 5, "{shared_policy}");
    }

    #[test]
    fn unknown_prints_and_new_settings_build_everything() {
        let set = World::new().resources();
        let p = prints(&set);
        let mut incremental = Incremental::default();
        let settings = MeshSettings::default();
        incremental.build(&set, &p, &settings);
        let none = Rebuilds::default();
        assert_eq!(incremental.rebuilds(&p, &settings), none);
        assert_eq!(
            incremental.rebuilds(&KindPrints::unknown(), &settings),
            Rebuilds::full()
        );
        let other = MeshSettings {
            root_namespace: "mesh-root".into(),
            ..MeshSettings::default()
        };
        assert_eq!(incremental.rebuilds(&p, &other), Rebuilds::full());
        let mut pods_changed = p;
        pods_changed.forget(k8s_openapi::api::core::v1::Pod::INDEX);
        assert_eq!(
            incremental.rebuilds(&pods_changed, &settings),
            Rebuilds {
                core: true,
                rest: true,
                policy: false
            }
        );
    }
}

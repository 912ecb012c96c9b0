//! Keeps serving the last valid version of a resource that an update made invalid.
//!
//! [`build`](super::build) leaves an invalid resource out of MeshState. For a resource that was
//! never valid that is all there is to do; for one that *was* valid, leaving it out would turn
//! a typo into a change of behaviour (a mistyped STRICT PeerAuthentication would open a port to
//! plaintext, a broken StaticGatewayConfiguration would unpin its prefix). [`LastGood`]
//! remembers the accepted version of every resource and builds from it instead, while the
//! rejection of the new version is still reported (log line and status condition).
use std::collections::{HashMap, HashSet};

use kube::Resource;

use super::{
    MeshSettings,
    build::BuildOutput,
    incremental::{Incremental, KindPrints},
    rejections::Rejection,
};
use crate::resources::{
    ResourceSet,
    kinds::{self, KindVisitor, WatchedKind},
};

/// What the message of a rejection whose previous version stays in force ends with.
pub const KEPT_NOTE: &str = "; the last valid version stays in force";

/// A resource's kind ([`WatchedKind::INDEX`]), namespace and name.
type Key = (usize, Option<String>, String);

/// The last accepted version of every resource, across builds.
///
/// Kept as compact JSON, not as typed objects: a fallback is rare, and a cluster's worth of
/// typed resources is several times the size of its JSON (the built MeshState is what serves).
/// Builds go through an [`Incremental`] builder, and only the kinds whose fingerprint changed
/// are serialized again.
#[derive(Debug, Default)]
pub struct LastGood {
    accepted: HashMap<Key, Box<[u8]>>,
    /// The fingerprints of the kinds `accepted` was last taken from.
    prints: KindPrints,
    /// The resources left out of `accepted` by the last build's rejections.
    rejected: HashSet<Key>,
    builder: Incremental,
}

impl LastGood {
    /// Builds MeshState from `resources`, substituting the last accepted version for every
    /// resource that is rejected now but was accepted before. Every rejection of the current
    /// versions is returned; those that fell back say so ([`KEPT_NOTE`]).
    pub fn build(&mut self, resources: ResourceSet, settings: &MeshSettings) -> BuildOutput {
        self.build_changed(resources, &KindPrints::unknown(), settings)
    }

    /// As [`LastGood::build`], for `resources` whose kinds have the fingerprints `prints`:
    /// the parts of the state and the accepted versions of unchanged kinds are reused.
    pub fn build_changed(
        &mut self,
        resources: ResourceSet,
        prints: &KindPrints,
        settings: &MeshSettings,
    ) -> BuildOutput {
        let first = self.builder.build(&resources, prints, settings);
        if first.rejections.is_empty() {
            self.accept(&resources, prints, &[]);
            return first;
        }
        let mut patched = resources;
        let mut patched_prints = *prints;
        let mut rejections = first.rejections;
        let mut kept = 0;
        for r in &mut rejections {
            if self.restore(&mut patched, r) {
                r.message.push_str(KEPT_NOTE);
                kept += 1;
                if let Some(index) = kind_index(&r.kind) {
                    patched_prints.forget(index);
                }
            }
        }
        if kept == 0 {
            // Nothing to fall back to: the first build is the answer.
            self.accept(&patched, prints, &rejections);
            return BuildOutput {
                state: first.state,
                rejections,
            };
        }
        let second = self.builder.build(&patched, &patched_prints, settings);
        // An old version can be invalid now (e.g. against a resource added since): then it goes.
        self.accept(&patched, &patched_prints, &second.rejections);
        BuildOutput {
            state: second.state,
            rejections,
        }
    }

    /// The kinds [`LastGood::build_changed`] with `prints` reads (the others' lists may be left
    /// empty): those of the parts of the state it builds again.
    pub fn kinds_read(&self, prints: &KindPrints, settings: &MeshSettings) -> [bool; kinds::COUNT] {
        self.builder.kinds_read(prints, settings)
    }

    /// Takes the resources of `set` but those `rejections` name as the accepted versions,
    /// serializing again only the kinds whose fingerprint changed (and, of the others, those
    /// rejected last time and accepted now).
    fn accept(&mut self, set: &ResourceSet, prints: &KindPrints, rejections: &[Rejection]) {
        let changed: Vec<bool> = (0..kinds::COUNT)
            .map(|i| !prints.same(&self.prints, i))
            .collect();
        self.accepted.retain(|(kind, _, _), _| !changed[*kind]);
        let rejected: HashSet<Key> = rejections
            .iter()
            .filter_map(|r| Some((kind_index(&r.kind)?, r.namespace.clone(), r.name.clone())))
            .collect();
        // Unchanged kinds: what was left out last time and is not now comes back.
        let returning: HashSet<&Key> = self
            .rejected
            .iter()
            .filter(|k| !changed[k.0] && !rejected.contains(*k))
            .collect();
        let mut collect = Collect {
            set,
            changed: &changed,
            returning: &returning,
            out: &mut self.accepted,
        };
        kinds::for_each_kind(&mut collect);
        for key in &rejected {
            self.accepted.remove(key);
        }
        self.rejected = rejected;
        self.prints = *prints;
    }

    /// Replaces, in `set`, the resource `r` names with its accepted version; whether it did.
    fn restore(&self, set: &mut ResourceSet, r: &Rejection) -> bool {
        struct Restore<'a> {
            set: &'a mut ResourceSet,
            accepted: &'a HashMap<Key, Box<[u8]>>,
            ns: Option<&'a str>,
            name: &'a str,
            done: bool,
        }
        impl KindVisitor for Restore<'_> {
            fn visit<K: WatchedKind>(&mut self) {
                let key = (K::INDEX, self.ns.map(str::to_owned), self.name.to_owned());
                let Some(json) = self.accepted.get(&key) else {
                    return;
                };
                let (ns, name) = (self.ns, self.name);
                let Some(slot) = K::list_mut(self.set)
                    .iter_mut()
                    .find(|o| is(&**o, ns, name))
                else {
                    return;
                };
                match serde_json::from_slice::<K>(json) {
                    Ok(old) => {
                        *slot = old;
                        self.done = true;
                    }
                    Err(error) => {
                        tracing::error!(%error, kind = %K::qualified(), ?ns, name, "the last valid version does not read back");
                    }
                }
            }
        }
        let mut op = Restore {
            set,
            accepted: &self.accepted,
            ns: r.namespace.as_deref(),
            name: &r.name,
            done: false,
        };
        kinds::visit_named(&r.kind, &mut op) && op.done
    }

    /// How many resources have an accepted version.
    pub fn len(&self) -> usize {
        self.accepted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.accepted.is_empty()
    }

    /// The accepted versions, as text by kind, namespace and name (for tests).
    #[cfg(test)]
    pub(super) fn accepted_text(&self) -> std::collections::BTreeMap<String, String> {
        self.accepted
            .iter()
            .map(|(k, v)| (format!("{k:?}"), String::from_utf8_lossy(v).into_owned()))
            .collect()
    }
}

/// Adds to `out` the JSON of every resource of `set` of a changed kind, and of those
/// `returning`, by kind, namespace and name.
struct Collect<'a> {
    set: &'a ResourceSet,
    changed: &'a [bool],
    returning: &'a HashSet<&'a Key>,
    out: &'a mut HashMap<Key, Box<[u8]>>,
}

impl KindVisitor for Collect<'_> {
    fn visit<K: WatchedKind>(&mut self) {
        let all = self.changed[K::INDEX];
        if !all && !self.returning.iter().any(|k| k.0 == K::INDEX) {
            return;
        }
        for o in K::list(self.set) {
            let meta = o.meta();
            let key = (
                K::INDEX,
                meta.namespace.clone(),
                meta.name.clone().unwrap_or_default(),
            );
            if !all && !self.returning.contains(&key) {
                continue;
            }
            match serde_json::to_vec(o) {
                Ok(json) => {
                    self.out.insert(key, json.into_boxed_slice());
                }
                Err(error) => {
                    tracing::error!(%error, kind = %K::qualified(), name = ?meta.name, "cannot keep the valid version");
                }
            }
        }
    }
}

/// [`WatchedKind::INDEX`] of the kind a [`Rejection::kind`] names (any watched kind).
fn kind_index(kind: &str) -> Option<usize> {
    struct Find(Option<usize>);
    impl KindVisitor for Find {
        fn visit<K: WatchedKind>(&mut self) {
            self.0 = Some(K::INDEX);
        }
    }
    let mut find = Find(None);
    kinds::visit_named(kind, &mut find);
    find.0
}

fn is<T: Resource>(o: &T, ns: Option<&str>, name: &str) -> bool {
    o.meta().namespace.as_deref() == ns && o.meta().name.as_deref() == Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::MtlsMode;

    const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: web}
spec: {serviceAccountName: web, containers: []}
status: {podIP: 10.0.1.2}
"#;

    fn set(extra: &str) -> ResourceSet {
        ResourceSet::from_yaml(&format!("{WORLD}\n---\n{extra}")).unwrap()
    }

    fn pa(mode: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
             metadata: {{name: default, namespace: shop}}\nspec: {{mtls: {{mode: {mode}}}}}"
        )
    }

    fn web_mode(out: &BuildOutput) -> MtlsMode {
        let web = out.state.workload_by_name("shop", "web").unwrap();
        out.state.policy.mtls_mode(web, 8080)
    }

    #[test]
    fn an_update_that_breaks_a_resource_keeps_its_last_valid_version() {
        let settings = MeshSettings::default();
        let mut last = LastGood::default();
        let out = last.build(set(&pa("STRICT")), &settings);
        assert!(out.rejections.is_empty());
        assert_eq!(web_mode(&out), MtlsMode::Strict);

        // A typo must not open the port to plaintext: STRICT stays, the typo is reported.
        let out = last.build(set(&pa("STRCT")), &settings);
        assert_eq!(web_mode(&out), MtlsMode::Strict);
        assert_eq!(out.rejections.len(), 1, "{:?}", out.rejections);
        let r = &out.rejections[0];
        assert_eq!(r.field, "spec.mtls.mode");
        assert!(r.message.ends_with(KEPT_NOTE), "{}", r.message);
        // Still broken on the next build (another resource changed): still STRICT.
        let out = last.build(
            set(&format!(
                "{}\n---\n{}",
                pa("STRCT"),
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}"
            )),
            &settings,
        );
        assert_eq!(web_mode(&out), MtlsMode::Strict);

        // Fixed: the new version applies.
        let out = last.build(set(&pa("DISABLE")), &settings);
        assert!(out.rejections.is_empty());
        assert_eq!(web_mode(&out), MtlsMode::Disable);

        // Deleted: gone, whatever was accepted before.
        let out = last.build(set(""), &settings);
        assert_eq!(web_mode(&out), MtlsMode::Permissive);
    }

    #[test]
    fn a_resource_never_valid_is_left_out() {
        let mut last = LastGood::default();
        let out = last.build(set(&pa("STRCT")), &MeshSettings::default());
        assert_eq!(web_mode(&out), MtlsMode::Permissive);
        assert_eq!(out.rejections.len(), 1);
        assert!(!out.rejections[0].message.ends_with(KEPT_NOTE));
        // Its invalid version is not remembered as "last good" either.
        let out = last.build(set(&pa("STRCT")), &MeshSettings::default());
        assert_eq!(web_mode(&out), MtlsMode::Permissive);
    }

    #[test]
    fn every_watched_kind_can_fall_back_namespaces_included() {
        let names: Vec<String> = kinds::watched().iter().map(|k| k.qualified()).collect();
        assert!(names.iter().any(|n| n == "Namespace"), "{names:?}");
        for name in &names {
            assert!(kind_index(name).is_some(), "{name}");
        }
        assert_eq!(kind_index("Unknown.example.com"), None);
    }

    /// Every accepted resource reads back from what is kept as it was, and a rejected one is
    /// not kept.
    #[test]
    fn accepted_versions_read_back_unchanged() {
        let resources = set(&format!(
            "{}\n---\n{}",
            pa("STRICT"),
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {name: ap, namespace: shop}\nspec: {selector: {matchLabels: {app: web}}, \
             rules: [{from: [{source: {principals: [td/ns/a/sa/b]}}], to: [{operation: {ports: [\"80\"]}}]}]}"
        ));
        let mut last = LastGood::default();
        let out = last.build(resources.clone(), &MeshSettings::default());
        assert!(out.rejections.is_empty(), "{:?}", out.rejections);
        assert_eq!(last.len(), 4);
        let mut emptied = resources.clone();
        emptied.peer_authentications[0].spec = Default::default();
        emptied.authorization_policies[0].spec = Default::default();
        emptied.pods[0].spec = None;
        for (kind, ns, name) in [
            ("PeerAuthentication.security.istio.io", "shop", "default"),
            ("AuthorizationPolicy.security.istio.io", "shop", "ap"),
            ("Pod", "shop", "web"),
        ] {
            let r = Rejection {
                kind: kind.into(),
                namespace: Some(ns.into()),
                name: name.into(),
                field: String::new(),
                message: String::new(),
            };
            assert!(last.restore(&mut emptied, &r), "{kind}");
        }
        let json = |s: &ResourceSet| {
            serde_json::to_value((&s.pods, &s.peer_authentications, &s.authorization_policies))
                .unwrap()
        };
        assert_eq!(json(&emptied), json(&resources));
        assert_ne!(emptied.pods[0].spec, None);

        let out = last.build(set(&pa("STRCT")), &MeshSettings::default());
        assert_eq!(out.rejections.len(), 1);
        // The namespace, the pod and the PeerAuthentication (its STRICT version restored).
        assert_eq!(last.len(), 3);
    }
}

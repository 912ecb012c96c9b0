//! Keeps serving the last valid version of a resource that an update made invalid.
//!
//! [`build`](super::build) leaves an invalid resource out of MeshState. For a resource that was
//! never valid that is all there is to do; for one that *was* valid, leaving it out would turn
//! a typo into a change of behaviour (a mistyped STRICT PeerAuthentication would open a port to
//! plaintext, a broken StaticGatewayConfiguration would unpin its prefix). [`LastGood`]
//! remembers the accepted version of every resource and builds from it instead, while the
//! rejection of the new version is still reported (log line and status condition).
use kube::Resource;

use super::{
    MeshSettings,
    build::{BuildOutput, build},
    rejections::Rejection,
};
use crate::resources::{
    ResourceSet,
    kinds::{self, KindVisitor, WatchedKind},
};

/// What the message of a rejection whose previous version stays in force ends with.
pub const KEPT_NOTE: &str = "; the last valid version stays in force";

/// The last accepted version of every resource, across builds.
#[derive(Debug, Default)]
pub struct LastGood {
    accepted: ResourceSet,
}

impl LastGood {
    /// Builds MeshState from `resources`, substituting the last accepted version for every
    /// resource that is rejected now but was accepted before. Every rejection of the current
    /// versions is returned; those that fell back say so ([`KEPT_NOTE`]).
    ///
    /// Takes the set by value and keeps it (no copy) as the accepted versions when every
    /// resource is valid, the common case: a cluster's worth of objects is held once, not twice.
    pub fn build(&mut self, resources: ResourceSet, settings: &MeshSettings) -> BuildOutput {
        let first = build(&resources, settings);
        if first.rejections.is_empty() {
            self.accepted = resources;
            return first;
        }
        let mut patched = resources.clone();
        let mut rejections = first.rejections;
        let mut kept = 0;
        for r in &mut rejections {
            if restore(&mut patched, &self.accepted, r) {
                r.message.push_str(KEPT_NOTE);
                kept += 1;
            }
        }
        if kept == 0 {
            // Nothing to fall back to: the first build is the answer.
            self.accepted = without(resources, &rejections);
            return BuildOutput {
                state: first.state,
                rejections,
            };
        }
        let second = build(&patched, settings);
        // An old version can be invalid now (e.g. against a resource added since): then it goes.
        self.accepted = without(patched, &second.rejections);
        BuildOutput {
            state: second.state,
            rejections,
        }
    }
}

/// Replaces, in `set`, the resource `r` names with its version in `accepted`; whether it did.
fn restore(set: &mut ResourceSet, accepted: &ResourceSet, r: &Rejection) -> bool {
    let (ns, name) = (r.namespace.as_deref(), r.name.as_str());
    by_kind(&r.kind, set, accepted, &mut Restore { ns, name })
}

/// `set` without the resources `rejections` name.
fn without(mut set: ResourceSet, rejections: &[Rejection]) -> ResourceSet {
    let none = ResourceSet::default();
    for r in rejections {
        let (ns, name) = (r.namespace.as_deref(), r.name.as_str());
        by_kind(&r.kind, &mut set, &none, &mut Remove { ns, name });
    }
    set
}

/// An operation on the list of one kind in a [`ResourceSet`] (and the same list in another).
trait KindOp {
    fn apply<T: Resource + Clone>(&mut self, current: &mut Vec<T>, accepted: &[T]) -> bool;
}

/// Runs `op` on the lists of `kind` (as [`Rejection::kind`] names it, any watched kind); false
/// for other kinds.
fn by_kind(
    kind: &str,
    set: &mut ResourceSet,
    accepted: &ResourceSet,
    op: &mut impl KindOp,
) -> bool {
    struct Apply<'a, O> {
        set: &'a mut ResourceSet,
        accepted: &'a ResourceSet,
        op: &'a mut O,
        done: bool,
    }
    impl<O: KindOp> KindVisitor for Apply<'_, O> {
        fn visit<K: WatchedKind>(&mut self) {
            self.done = self.op.apply(K::list_mut(self.set), K::list(self.accepted));
        }
    }
    let mut apply = Apply {
        set,
        accepted,
        op,
        done: false,
    };
    kinds::visit_named(kind, &mut apply) && apply.done
}

fn is<T: Resource>(o: &T, ns: Option<&str>, name: &str) -> bool {
    o.meta().namespace.as_deref() == ns && o.meta().name.as_deref() == Some(name)
}

/// Puts the accepted version of one resource in place of the current one.
struct Restore<'a> {
    ns: Option<&'a str>,
    name: &'a str,
}

impl KindOp for Restore<'_> {
    fn apply<T: Resource + Clone>(&mut self, current: &mut Vec<T>, accepted: &[T]) -> bool {
        let Some(old) = accepted.iter().find(|o| is(*o, self.ns, self.name)) else {
            return false;
        };
        match current.iter_mut().find(|o| is(&**o, self.ns, self.name)) {
            Some(slot) => {
                *slot = old.clone();
                true
            }
            None => false,
        }
    }
}

/// Drops one resource.
struct Remove<'a> {
    ns: Option<&'a str>,
    name: &'a str,
}

impl KindOp for Remove<'_> {
    fn apply<T: Resource + Clone>(&mut self, current: &mut Vec<T>, _: &[T]) -> bool {
        let before = current.len();
        current.retain(|o| !is(o, self.ns, self.name));
        current.len() != before
    }
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
        /// Reports that it reached a kind's lists.
        struct Reached;
        impl KindOp for Reached {
            fn apply<T: Resource + Clone>(&mut self, _: &mut Vec<T>, _: &[T]) -> bool {
                true
            }
        }
        let names: Vec<String> = kinds::watched().iter().map(|k| k.qualified()).collect();
        assert!(names.iter().any(|n| n == "Namespace"), "{names:?}");
        for name in &names {
            let (mut set, accepted) = (ResourceSet::default(), ResourceSet::default());
            assert!(by_kind(name, &mut set, &accepted, &mut Reached), "{name}");
        }
        assert!(!by_kind(
            "Unknown.example.com",
            &mut ResourceSet::default(),
            &ResourceSet::default(),
            &mut Reached
        ));
    }
}

//! ReferenceGrants, normalised: which cross-namespace references the Gateway API permits.
//!
//! A reference from an object in one namespace to an object in another (an HTTPRoute's backend
//! Service, a Gateway listener's certificate Secret) holds only when a ReferenceGrant in the
//! namespace referred *to* names the referrer's group, kind and namespace, and the referent's
//! group and kind (and, when it gives one, its name). A same-namespace reference needs no grant.
use std::collections::BTreeSet;

use serde::Serialize;

use crate::resources::gateway_api::ReferenceGrant;

/// One side of a reference: an object's group (`""` for core), kind, namespace and name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectRef<'a> {
    pub group: &'a str,
    pub kind: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
}

/// One permission: `from` objects may refer to `to` objects (all of the kind, or one name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
struct Permit {
    /// `namespace/name` of the ReferenceGrant that gives it.
    grant: String,
    to_namespace: String,
    to_group: String,
    to_kind: String,
    /// `None`: every object of the kind.
    to_name: Option<String>,
    from_namespace: String,
    from_group: String,
    from_kind: String,
}

/// Every permission granted in the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ReferenceGrants {
    permits: BTreeSet<Permit>,
}

impl ReferenceGrants {
    /// Reads every grant; each `from` × `to` pair of a grant is one permission.
    pub fn build(grants: &[ReferenceGrant]) -> Self {
        let mut permits = BTreeSet::new();
        for grant in grants {
            let (Some(namespace), Some(name)) = (
                grant.metadata.namespace.as_deref(),
                grant.metadata.name.as_deref(),
            ) else {
                continue;
            };
            for from in &grant.spec.from {
                for to in &grant.spec.to {
                    permits.insert(Permit {
                        grant: format!("{namespace}/{name}"),
                        to_namespace: namespace.to_owned(),
                        to_group: to.group.clone().unwrap_or_default(),
                        to_kind: to.kind.clone(),
                        to_name: to.name.clone().filter(|n| !n.is_empty()),
                        from_namespace: from.namespace.clone(),
                        from_group: from.group.clone().unwrap_or_default(),
                        from_kind: from.kind.clone(),
                    });
                }
            }
        }
        Self { permits }
    }

    /// Whether `from` may refer to `to`.
    pub fn permits(&self, from: ObjectRef<'_>, to: ObjectRef<'_>) -> bool {
        from.namespace == to.namespace
            || self.permits.iter().any(|p| {
                p.to_namespace == to.namespace
                    && p.to_group == to.group
                    && p.to_kind == to.kind
                    && p.to_name.as_deref().is_none_or(|n| n == to.name)
                    && p.from_namespace == from.namespace
                    && p.from_group == from.group
                    && p.from_kind == from.kind
            })
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    fn grants(yaml: &str) -> ReferenceGrants {
        let grants: Vec<ReferenceGrant> = serde_yaml::Deserializer::from_str(yaml)
            .map(|d| ReferenceGrant::deserialize(d).expect("grant parses"))
            .collect();
        ReferenceGrants::build(&grants)
    }

    const ROUTE: ObjectRef<'static> = ObjectRef {
        group: "gateway.networking.k8s.io",
        kind: "HTTPRoute",
        namespace: "web",
        name: "shop",
    };

    fn service(namespace: &'static str, name: &'static str) -> ObjectRef<'static> {
        ObjectRef {
            group: "",
            kind: "Service",
            namespace,
            name,
        }
    }

    const GRANTS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: from-web, namespace: backends}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: web}]
  to: [{group: "", kind: Service, name: api}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: everything, namespace: shared}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: web}]
  to: [{group: "", kind: Service}]
"#;

    #[test]
    fn a_grant_permits_only_what_it_names() {
        let g = grants(GRANTS);
        // Same namespace: no grant needed.
        assert!(ReferenceGrants::default().permits(ROUTE, service("web", "x")));
        // Named Service only.
        assert!(g.permits(ROUTE, service("backends", "api")));
        assert!(!g.permits(ROUTE, service("backends", "admin")));
        // Every Service of the namespace.
        assert!(g.permits(ROUTE, service("shared", "anything")));
        // No grant in the target namespace.
        assert!(!g.permits(ROUTE, service("other", "api")));
        // Another referrer namespace or kind.
        let elsewhere = ObjectRef {
            namespace: "evil",
            ..ROUTE
        };
        assert!(!g.permits(elsewhere, service("shared", "x")));
        let gateway = ObjectRef {
            kind: "Gateway",
            ..ROUTE
        };
        assert!(!g.permits(gateway, service("shared", "x")));
        // Another referent kind.
        let secret = ObjectRef {
            kind: "Secret",
            ..service("shared", "x")
        };
        assert!(!g.permits(ROUTE, secret));
    }
}

//! Normalisation (through [`crate::state::build`]) and evaluation of PeerAuthentication and
//! AuthorizationPolicy, from YAML as a user writes it.
use std::net::IpAddr;

use super::*;
use crate::{
    resources::ResourceSet,
    state::{MeshSettings, MeshState, Rejection, build},
};

const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: web, labels: {app: web, tier: front}}
spec: {serviceAccountName: web, containers: []}
status: {podIP: 10.0.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, uid: db, labels: {app: db}}
spec: {serviceAccountName: db, containers: []}
status: {podIPs: [{ip: 10.0.1.3}, {ip: "fd00::3"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: other, uid: api, labels: {app: api, tier: front}}
spec: {serviceAccountName: api, containers: []}
status: {podIP: 10.0.2.2}
"#;

fn world(policies: &str) -> (MeshState, Vec<Rejection>) {
    let set = ResourceSet::from_yaml(&format!("{WORLD}\n---\n{policies}")).unwrap();
    let out = build(&set, &MeshSettings::default());
    (out.state, out.rejections)
}

/// The state of `policies`, which must all be valid.
fn valid(policies: &str) -> MeshState {
    let (state, rejections) = world(policies);
    assert!(rejections.is_empty(), "{rejections:?}");
    state
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn mode(state: &MeshState, workload: &str, port: u16) -> MtlsMode {
    let (ns, name) = workload.split_once('/').unwrap();
    let w = state.workload_by_name(ns, name).unwrap();
    state.policy.mtls_mode(w, port)
}

/// Connects from `source` (identity, address) to `ns/name` on `port`.
fn decide(
    state: &MeshState,
    source: Option<&Identity>,
    source_ip: &str,
    to: &str,
    port: u16,
) -> Decision {
    let (ns, name) = to.split_once('/').unwrap();
    let w = state.workload_by_name(ns, name).unwrap();
    state.policy.authorize(&ConnectionInfo {
        source_identity: source,
        source_ip: ip(source_ip),
        destination: w,
        destination_ip: w.ips[0],
        destination_port: port,
        remote_ip: None,
    })
}

fn allowed(state: &MeshState, source: Option<&Identity>, to: &str, port: u16) -> bool {
    decide(state, source, "10.0.9.9", to, port).is_allowed()
}

// ---------------------------------------------------------------------------------------------
// PeerAuthentication

const NS_STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
"#;

#[test]
fn seed_scenario_strict_refuses_plaintext_and_deleting_it_restores_permissive() {
    let strict = valid(NS_STRICT);
    assert_eq!(mode(&strict, "shop/web", 8080), MtlsMode::Strict);
    assert!(!mode(&strict, "shop/web", 8080).allows_plaintext());
    // Other namespaces are untouched.
    assert_eq!(mode(&strict, "other/api", 8080), MtlsMode::Permissive);

    let deleted = valid("");
    assert_eq!(mode(&deleted, "shop/web", 8080), MtlsMode::Permissive);
    assert!(mode(&deleted, "shop/web", 8080).allows_plaintext());
}

#[test]
fn mtls_precedence_workload_over_namespace_over_mesh() {
    let state = valid(
        r#"
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: DISABLE}
    9090: {mode: UNSET}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  portLevelMtls:
    "7070": {mode: STRICT}
"#,
    );
    // Mesh-wide STRICT where nothing else applies.
    assert_eq!(mode(&state, "other/api", 80), MtlsMode::Strict);
    // Namespace PERMISSIVE over mesh STRICT.
    // web: UNSET (no mtls) inherits the namespace, except its STRICT port.
    assert_eq!(mode(&state, "shop/web", 80), MtlsMode::Permissive);
    assert_eq!(mode(&state, "shop/web", 7070), MtlsMode::Strict);
    // db: workload STRICT over namespace, DISABLE on 8080, UNSET port inherits the workload.
    assert_eq!(mode(&state, "shop/db", 80), MtlsMode::Strict);
    assert_eq!(mode(&state, "shop/db", 8080), MtlsMode::Disable);
    assert_eq!(mode(&state, "shop/db", 9090), MtlsMode::Strict);
}

#[test]
fn unset_everywhere_is_permissive_and_unset_namespace_inherits_the_mesh() {
    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: UNSET}}
"#,
    );
    assert_eq!(mode(&state, "shop/web", 80), MtlsMode::Permissive);
    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"#,
    );
    assert_eq!(mode(&state, "shop/web", 80), MtlsMode::Strict);
}

#[test]
fn the_oldest_policy_wins_at_one_level() {
    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: a-newer, namespace: shop, creationTimestamp: "2024-05-01T00:00:00Z"}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: z-older, namespace: shop, creationTimestamp: "2024-01-01T00:00:00Z"}
spec: {mtls: {mode: DISABLE}}
"#,
    );
    assert_eq!(mode(&state, "shop/web", 80), MtlsMode::Disable);
    // Without creation times (a local file), by name.
    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: b, namespace: shop}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: a, namespace: shop}
spec: {mtls: {mode: PERMISSIVE}}
"#,
    );
    assert_eq!(mode(&state, "shop/web", 80), MtlsMode::Permissive);
}

#[test]
fn selector_policies_in_the_root_namespace_are_ignored() {
    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: fronts, namespace: istio-system}
spec:
  selector: {matchLabels: {tier: front}}
  mtls: {mode: STRICT}
"#,
    );
    assert_eq!(mode(&state, "shop/web", 80), MtlsMode::Permissive);
    assert_eq!(state.policy.ignored.len(), 1);
    assert_eq!(state.policy.ignored[0].name, "fronts");
}

#[test]
fn invalid_peer_authentications_are_rejected_naming_the_field() {
    let (state, rejections) = world(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: typo, namespace: shop}
spec: {mtls: {mode: STRICTER}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: named-port, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  portLevelMtls: {http: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: big-port, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  portLevelMtls: {70000: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: zero-port, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  portLevelMtls: {0: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: port-mode, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  portLevelMtls: {8080: {mode: OFF}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: no-selector, namespace: shop}
spec:
  mtls: {mode: STRICT}
  portLevelMtls: {8080: {mode: DISABLE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: good, namespace: other}
spec: {mtls: {mode: STRICT}}
"#,
    );
    let fields: Vec<(&str, &str)> = rejections
        .iter()
        .map(|r| (r.name.as_str(), r.field.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            ("big-port", r#"spec.portLevelMtls["70000"]"#),
            ("named-port", r#"spec.portLevelMtls["http"]"#),
            ("no-selector", "spec.portLevelMtls"),
            ("port-mode", r#"spec.portLevelMtls["8080"].mode"#),
            ("typo", "spec.mtls.mode"),
            ("zero-port", r#"spec.portLevelMtls["0"]"#),
        ]
    );
    assert!(
        rejections
            .iter()
            .all(|r| r.kind == "PeerAuthentication.security.istio.io")
    );
    assert!(
        rejections[4].message.contains("STRICTER"),
        "{}",
        rejections[4]
    );
    // The invalid ones are left out, the valid one is kept.
    let kept: Vec<&str> = state
        .policy
        .peer_authentications
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(kept, ["good"]);
    assert_eq!(mode(&state, "shop/web", 8080), MtlsMode::Permissive);
    assert_eq!(mode(&state, "other/api", 8080), MtlsMode::Strict);
}

// ---------------------------------------------------------------------------------------------
// AuthorizationPolicy

#[test]
fn no_policy_allows_everything() {
    let state = valid("");
    assert_eq!(
        decide(&state, None, "1.2.3.4", "shop/web", 80),
        Decision::Allow
    );
}

#[test]
fn allow_by_principal_denies_everyone_else() {
    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-api, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/other/sa/api"]}
"#,
    );
    assert!(allowed(&state, Some(&id("other", "api")), "shop/web", 80));
    assert_eq!(
        decide(&state, Some(&id("shop", "db")), "10.0.1.3", "shop/web", 80),
        Decision::Deny {
            policy: "shop/web-from-api".into(),
            reason: DenyReason::NoAllowRuleMatched
        }
    );
    assert!(
        !allowed(&state, None, "shop/web", 80),
        "plaintext has no principal"
    );
    // db is not selected.
    assert!(allowed(&state, Some(&id("shop", "web")), "shop/db", 80));
}

#[test]
fn principal_wildcards() {
    let policy = |principal: &str| {
        valid(&format!(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p, namespace: shop}}
spec:
  rules:
  - from:
    - source: {{principals: ["{principal}"]}}
"#
        ))
    };
    let prefix = policy("cluster.local/ns/other/*");
    assert!(allowed(&prefix, Some(&id("other", "api")), "shop/web", 80));
    assert!(!allowed(&prefix, Some(&id("shop", "db")), "shop/web", 80));

    let suffix = policy("*/sa/db");
    assert!(allowed(&suffix, Some(&id("shop", "db")), "shop/web", 80));
    assert!(allowed(
        &suffix,
        Some(&Identity::new("other.td", "x", "db")),
        "shop/web",
        80
    ));
    assert!(!allowed(&suffix, Some(&id("shop", "dba")), "shop/web", 80));

    let any = policy("*");
    assert!(allowed(&any, Some(&id("other", "api")), "shop/web", 80));
    assert!(!allowed(&any, None, "shop/web", 80), "* needs an identity");
}

#[test]
fn namespaces_service_accounts_and_their_negations() {
    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec:
  rules:
  - from:
    - source: {namespaces: [other], notPrincipals: ["*/sa/blocked"]}
    - source: {serviceAccounts: [db, "other/admin"]}
"#,
    );
    assert!(allowed(&state, Some(&id("other", "api")), "shop/web", 80));
    assert!(!allowed(
        &state,
        Some(&id("other", "blocked")),
        "shop/web",
        80
    ));
    // `db` means shop/db (the policy's namespace).
    assert!(allowed(&state, Some(&id("shop", "db")), "shop/web", 80));
    assert!(!allowed(
        &state,
        Some(&id("elsewhere", "db")),
        "shop/web",
        80
    ));
    assert!(allowed(&state, Some(&id("other", "admin")), "shop/web", 80));
    assert!(!allowed(&state, Some(&id("shop", "web")), "shop/web", 80));

    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: not-shop, namespace: shop}
spec:
  action: DENY
  rules:
  - from:
    - source: {notNamespaces: [shop]}
"#,
    );
    assert!(allowed(&state, Some(&id("shop", "db")), "shop/web", 80));
    assert!(!allowed(&state, Some(&id("other", "api")), "shop/web", 80));
    assert!(
        !allowed(&state, None, "shop/web", 80),
        "plaintext is in no namespace"
    );
}

#[test]
fn deny_not_principals_star_refuses_plaintext_only() {
    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-mtls, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from:
    - source: {notPrincipals: ["*"]}
"#,
    );
    assert_eq!(
        decide(&state, None, "10.0.9.9", "other/api", 80),
        Decision::Deny {
            policy: "istio-system/require-mtls".into(),
            reason: DenyReason::DenyRuleMatched
        }
    );
    assert!(allowed(&state, Some(&id("shop", "web")), "other/api", 80));
}

#[test]
fn ip_blocks_cidrs_single_addresses_and_negations() {
    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec:
  rules:
  - from:
    - source: {ipBlocks: [10.0.0.0/16, 192.168.7.7, "fd00::/64"], notIpBlocks: [10.0.5.0/24]}
"#,
    );
    let from = |src: &str| decide(&state, None, src, "shop/web", 80).is_allowed();
    assert!(from("10.0.1.3"));
    assert!(!from("10.0.5.1"), "notIpBlocks");
    assert!(!from("10.1.0.1"));
    assert!(from("192.168.7.7"));
    assert!(!from("192.168.7.8"));
    assert!(from("fd00::3"));
    assert!(!from("fd01::3"));
}

#[test]
fn ports_and_not_ports() {
    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - to:
    - operation: {ports: ["8080", 9090]}
  - to:
    - operation: {notPorts: ["22", "8080", "9090"]}
    from:
    - source: {principals: ["cluster.local/ns/shop/sa/db"]}
"#,
    );
    assert!(allowed(&state, None, "shop/web", 8080));
    assert!(allowed(&state, None, "shop/web", 9090));
    assert!(!allowed(&state, None, "shop/web", 80));
    assert!(allowed(&state, Some(&id("shop", "db")), "shop/web", 80));
    assert!(!allowed(&state, Some(&id("shop", "db")), "shop/web", 22));
}

#[test]
fn deny_wins_over_allow() {
    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-db, namespace: shop}
spec:
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/shop/sa/db"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin-port, namespace: shop}
spec:
  action: DENY
  rules:
  - to:
    - operation: {ports: ["9090"]}
"#,
    );
    let db = id("shop", "db");
    assert!(allowed(&state, Some(&db), "shop/web", 8080));
    assert_eq!(
        decide(&state, Some(&db), "10.0.1.3", "shop/web", 9090),
        Decision::Deny {
            policy: "shop/no-admin-port".into(),
            reason: DenyReason::DenyRuleMatched
        }
    );
}

#[test]
fn empty_rules_and_empty_specs() {
    // `spec: {}` is ALLOW with no rules: allow-nothing for the namespace.
    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: shop}
spec: {}
"#,
    );
    assert!(!allowed(&state, Some(&id("shop", "db")), "shop/web", 80));
    assert!(allowed(&state, Some(&id("shop", "db")), "other/api", 80));

    // A rule with neither from nor to matches everything.
    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: shop}
spec:
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: shop}
spec: {}
"#,
    );
    assert!(allowed(&state, None, "shop/web", 80));

    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: shop}
spec: {action: DENY, rules: [{}]}
"#,
    );
    assert!(!allowed(&state, Some(&id("shop", "db")), "shop/web", 80));

    // DENY without rules denies nothing.
    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-nothing, namespace: shop}
spec: {action: DENY}
"#,
    );
    assert!(allowed(&state, None, "shop/web", 80));
}

#[test]
fn scopes_namespace_selector_and_root_namespace() {
    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: fronts-only-on-80, namespace: istio-system}
spec:
  selector: {matchLabels: {tier: front}}
  action: DENY
  rules:
  - to:
    - operation: {notPorts: ["80"]}
"#,
    );
    // Root namespace + selector: matching workloads in every namespace.
    assert!(!allowed(&state, None, "shop/web", 8080));
    assert!(!allowed(&state, None, "other/api", 8080));
    assert!(allowed(&state, None, "shop/db", 8080));

    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: fronts-only-on-80, namespace: shop}
spec:
  selector: {matchLabels: {tier: front}}
  action: DENY
  rules:
  - to:
    - operation: {notPorts: ["80"]}
"#,
    );
    // Elsewhere, the selector stays in the policy's namespace.
    assert!(!allowed(&state, None, "shop/web", 8080));
    assert!(allowed(&state, None, "other/api", 8080));
}

#[test]
fn http_attributes_make_allow_rules_never_match_and_deny_rules_match_on_l4() {
    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/other/sa/api"]}
    to:
    - operation: {methods: [GET]}
  - from:
    - source: {principals: ["cluster.local/ns/shop/sa/db"]}
  - from:
    - source: {requestPrincipals: ["*"]}
  - when:
    - key: request.headers[x-user]
      values: [admin]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules:
  - to:
    - operation: {ports: ["5432"], paths: ["/admin"]}
  - from:
    - source: {namespaces: [other], remoteIpBlocks: [1.2.3.4]}
    when:
    - key: request.auth.claims[iss]
      values: [x]
"#,
    );
    // ALLOW: the L7 rules are gone, the L4 one remains (fail closed).
    assert!(!allowed(&state, Some(&id("other", "api")), "shop/web", 80));
    assert!(allowed(&state, Some(&id("shop", "db")), "shop/web", 80));
    let allow = &state.policy.authorizations[0];
    assert_eq!(allow.rules.len(), 1);
    assert_eq!(
        allow.http_attributes,
        ["methods", "request.headers[x-user]", "requestPrincipals"]
    );
    // DENY: enforced on the L4 part (port 5432, namespace other), whatever the HTTP part.
    assert!(!allowed(&state, Some(&id("shop", "web")), "shop/db", 5432));
    assert!(allowed(&state, Some(&id("shop", "web")), "shop/db", 80));
    assert!(!allowed(&state, Some(&id("other", "api")), "shop/db", 80));
    let deny = &state.policy.authorizations[1];
    assert_eq!(
        deny.http_attributes,
        ["paths", "remoteIpBlocks", "request.auth.claims[iss]"]
    );
}

/// As a gateway decides: the remote address known (`Some`), or as the node proxy (`None`).
fn allowed_remote(state: &MeshState, to: &str, remote: Option<&str>) -> bool {
    let (ns, name) = to.split_once('/').unwrap();
    let w = state.workload_by_name(ns, name).unwrap();
    state
        .policy
        .authorize(&ConnectionInfo {
            source_identity: None,
            source_ip: ip("10.0.9.9"),
            destination: w,
            destination_ip: w.ips[0],
            destination_port: 80,
            remote_ip: remote.map(ip),
        })
        .is_allowed()
}

#[test]
fn remote_ip_blocks_hold_where_the_remote_address_is_known() {
    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-office, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from:
    - source: {remoteIpBlocks: [203.0.113.0/24]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-bad, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules:
  - when:
    - {key: remote.ip, values: [198.51.100.0/24]}
"#,
    );
    // ALLOW: a known remote address in the block passes, another does not; unknown (the node
    // proxy) never matches.
    assert!(allowed_remote(&state, "shop/web", Some("203.0.113.7")));
    assert!(!allowed_remote(&state, "shop/web", Some("198.51.100.1")));
    assert!(!allowed_remote(&state, "shop/web", None));
    // DENY: a known address in the block is denied, another passes; unknown is denied (more
    // restrictive than written, as before).
    assert!(!allowed_remote(&state, "shop/db", Some("198.51.100.1")));
    assert!(allowed_remote(&state, "shop/db", Some("203.0.113.7")));
    assert!(!allowed_remote(&state, "shop/db", None));
    // Both are named in the node proxy's notice.
    assert_eq!(
        state.policy.authorizations[0].http_attributes,
        ["remoteIpBlocks"]
    );
    assert_eq!(
        state.policy.authorizations[1].http_attributes,
        ["remote.ip"]
    );
}

#[test]
fn l4_when_conditions_are_enforced() {
    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec:
  rules:
  - when:
    - {key: source.ip, values: [10.0.1.0/24]}
    - {key: destination.port, notValues: ["22"]}
    - {key: destination.ip, values: [10.0.1.2]}
"#,
    );
    let d = |src: &str, to: &str, port: u16| decide(&state, None, src, to, port).is_allowed();
    assert!(d("10.0.1.3", "shop/web", 80));
    assert!(!d("10.0.2.3", "shop/web", 80), "source.ip");
    assert!(!d("10.0.1.3", "shop/web", 22), "destination.port notValues");
    assert!(!d("10.0.1.3", "shop/db", 80), "destination.ip");
}

#[test]
fn custom_audit_and_target_ref_policies_are_not_enforced() {
    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: shop}
spec:
  action: CUSTOM
  provider: {name: opa}
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: shop}
spec: {action: AUDIT, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{}]
"#,
    );
    assert!(allowed(&state, None, "shop/web", 80));
    assert!(state.policy.authorizations.is_empty());
    let ignored: Vec<&str> = state
        .policy
        .ignored
        .iter()
        .map(|i| i.name.as_str())
        .collect();
    assert_eq!(ignored, ["ext-authz", "audit", "waypoint"]);
}

#[test]
fn invalid_authorization_policies_are_rejected_naming_the_field() {
    let (state, rejections) = world(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-cidr, namespace: shop}
spec:
  rules:
  - from:
    - source: {ipBlocks: [10.0.0.0/8, 10.0.0.300/24]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-port, namespace: shop}
spec:
  action: DENY
  rules:
  - {}
  - to:
    - operation: {ports: ["80"]}
    - operation: {notPorts: [http]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-action, namespace: shop}
spec: {action: REJECT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-when, namespace: shop}
spec:
  rules:
  - when:
    - {key: destination.port, values: ["99999"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: fine, namespace: other}
spec:
  rules:
  - from:
    - source: {ipBlocks: [10.0.0.0/8]}
"#,
    );
    let fields: Vec<(&str, &str)> = rejections
        .iter()
        .map(|r| (r.name.as_str(), r.field.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            ("bad-cidr", "spec.rules[0].from[0].source.ipBlocks[1]"),
            ("bad-port", "spec.rules[1].to[1].operation.notPorts[0]"),
            ("bad-action", "spec.action"),
            ("bad-when", "spec.rules[0].when[0].values[0]"),
        ]
    );
    assert!(
        rejections
            .iter()
            .all(|r| r.kind == "AuthorizationPolicy.security.istio.io")
    );
    // None was ever valid, so each fails closed: an ALLOW policy (or one whose action is
    // unknown) keeps no rule and so denies everything it selects; a DENY policy keeps its rules
    // without the clauses it could not read.
    let kept: Vec<(&str, usize)> = state
        .policy
        .authorizations
        .iter()
        .map(|a| (a.name.as_str(), a.rules.len()))
        .collect();
    assert_eq!(
        kept,
        [
            ("bad-cidr", 0),
            ("bad-port", 2),
            ("bad-action", 0),
            ("bad-when", 0),
            ("fine", 1)
        ]
    );
    let bad_port = &state.policy.authorizations[1];
    assert!(bad_port.rules.iter().all(|r| r.clauses.is_empty()));
    use crate::state::policy::{FAIL_CLOSED_ALLOW, FAIL_CLOSED_DENY};
    assert!(rejections[0].message.ends_with(FAIL_CLOSED_ALLOW));
    assert!(rejections[1].message.ends_with(FAIL_CLOSED_DENY));
}

#[test]
fn notices_are_logged_once_per_policy() {
    let state = valid(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: shop}
spec:
  rules:
  - to:
    - operation: {methods: [GET]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l4, namespace: shop}
spec:
  rules:
  - to:
    - operation: {ports: ["80"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: shop}
spec: {action: CUSTOM, provider: {name: opa}}
"#,
    );
    let mut notices = PolicyNotices::default();
    let first = notices.log_new(&state.policy);
    assert_eq!(first.len(), 2, "{first:?}");
    assert!(
        first[0].contains("shop/l7") && first[0].contains("methods"),
        "{first:?}"
    );
    assert!(
        first[1].contains("shop/ext") && first[1].contains("CUSTOM"),
        "{first:?}"
    );
    assert!(notices.log_new(&state.policy).is_empty());
}

/// Log lines written while a test runs, as `tracing` formats them.
#[derive(Clone, Default)]
struct CapturedLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLog {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log lock")).into_owned()
    }

    async fn wait_for(&self, needle: &str) {
        let seen = async {
            while !self.text().contains(needle) {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), seen)
            .await
            .unwrap_or_else(|_| panic!("no log line with {needle:?} in:\n{}", self.text()));
    }
}

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn the_agents_notices_task_logs_each_published_policy_once() {
    let log = CapturedLog::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        const L7: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: shop}
spec:
  rules:
  - to:
    - operation: {methods: [GET]}
"#;
        const EXT: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: shop}
spec: {action: CUSTOM, provider: {name: opa}}
"#;
        let (publisher, state) = crate::state::channel();
        let task = tokio::spawn(PolicyNotices::default().run(state));
        // The same consumer the agent runs sees each snapshot as the sources publish it.
        publisher.publish(valid(L7));
        log.wait_for("AuthorizationPolicy shop/l7").await;
        publisher.publish(valid(&format!("{L7}\n---\n{EXT}")));
        log.wait_for("shop/ext is not enforced").await;
        // Republishing changes nothing that was logged.
        publisher.publish(valid(&format!("{L7}\n---\n{EXT}")));
        drop(publisher);
        tokio::time::timeout(std::time::Duration::from_secs(10), task)
            .await
            .expect("the task ends with the last publisher")
            .expect("the task does not panic");
    });
    let text = log.text();
    assert_eq!(
        text.matches("AuthorizationPolicy shop/l7:").count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.matches("shop/ext is not enforced").count(),
        1,
        "{text}"
    );
    assert!(
        text.contains("WARN") && text.contains("sluice::policy"),
        "{text}"
    );
    assert!(
        text.contains("methods") && text.contains("CUSTOM"),
        "{text}"
    );
}

//! Policy part of MeshState: PeerAuthentication and AuthorizationPolicy, normalised for the
//! node proxy, which evaluates them ([`crate::policy`]) on every inbound connection.
//!
//! Normalisation is pure. A resource with an invalid value (unknown mTLS mode or action, a bad
//! CIDR, a port that is not a port) is left out and reported as a [`Rejection`] naming the field,
//! as Istio's validation would refuse it at admission. Policies the node proxy does not enforce
//! (`CUSTOM` and `AUDIT` actions, policies attached to gateways or waypoints with `targetRef`,
//! PeerAuthentications with a selector in the root namespace) are kept aside in
//! [`Policies::ignored`] with the reason.
//!
//! HTTP-only attributes (`hosts`, `methods`, `paths`, `requestPrincipals`, `remoteIpBlocks`,
//! `when` keys other than `source.ip`, `source.namespace`, `source.principal`,
//! `destination.ip`, `destination.port`) are handled as Istio does for ztunnel: in an `ALLOW`
//! policy the *rule* using them is dropped (it never matches: fail closed), in a `DENY` policy the
//! rule is kept without them, so it matches on its L4 part alone (more restrictive than
//! written). Either way the attributes are listed in [`Authorization::http_attributes`] so the
//! proxy can log it once per policy.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    str::FromStr,
};

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::Serialize;

use super::rejections::Rejections;
use crate::resources::{
    ResourceSet,
    istio_security::{
        AuthorizationPolicy, Condition, PeerAuthentication, PortText, Rule, Source,
        WorkloadSelector,
    },
    kinds::WatchedKind,
};

/// All policies, normalised.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Policies {
    /// PeerAuthentications, oldest first (when several apply at one level, the oldest wins).
    pub peer_authentications: Vec<PeerAuthn>,
    /// AuthorizationPolicies with an `ALLOW` or `DENY` action, attached to workloads.
    pub authorizations: Authorizations,
    /// Valid policies the node proxy does not enforce, and why.
    pub ignored: Vec<IgnoredPolicy>,
}

/// The enforced AuthorizationPolicies in their order, indexed by the namespace their scope
/// reaches, so that a connection's decision reads only the policies that can select its
/// destination (a cluster has thousands; a namespace a few).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Authorizations {
    list: Vec<Authorization>,
    /// Namespace → positions in `list` of the policies scoped to it, ascending.
    by_namespace: HashMap<String, Vec<usize>>,
    /// Positions of the policies that reach every namespace (mesh-wide, or a selector in the
    /// root namespace), ascending.
    everywhere: Vec<usize>,
}

impl Authorizations {
    /// Every policy, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Authorization> {
        self.list.iter()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The policies whose scope can reach a workload in `namespace`, in order (the scope's
    /// labels are still to be checked).
    pub fn reaching<'a>(&'a self, namespace: &str) -> impl Iterator<Item = &'a Authorization> {
        let local = self
            .by_namespace
            .get(namespace)
            .map_or(&[][..], Vec::as_slice);
        // Merge two ascending position lists, keeping the policies' order.
        let (mut a, mut b) = (local.iter().peekable(), self.everywhere.iter().peekable());
        std::iter::from_fn(move || {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x < y => a.next(),
                (Some(_), Some(_)) | (None, Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, None) => None,
            }?;
            Some(&self.list[*next])
        })
    }
}

impl FromIterator<Authorization> for Authorizations {
    fn from_iter<I: IntoIterator<Item = Authorization>>(iter: I) -> Self {
        let mut out = Authorizations::default();
        for (i, a) in iter.into_iter().enumerate() {
            match &a.scope {
                PolicyScope::Mesh
                | PolicyScope::Workloads {
                    namespace: None, ..
                } => out.everywhere.push(i),
                PolicyScope::Namespace { namespace }
                | PolicyScope::Workloads {
                    namespace: Some(namespace),
                    ..
                } => out
                    .by_namespace
                    .entry(namespace.clone())
                    .or_default()
                    .push(i),
            }
            out.list.push(a);
        }
        out
    }
}

impl std::ops::Index<usize> for Authorizations {
    type Output = Authorization;
    fn index(&self, i: usize) -> &Authorization {
        &self.list[i]
    }
}

impl<'a> IntoIterator for &'a Authorizations {
    type Item = &'a Authorization;
    type IntoIter = std::slice::Iter<'a, Authorization>;
    fn into_iter(self) -> Self::IntoIter {
        self.list.iter()
    }
}

impl Serialize for Authorizations {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.list.serialize(s)
    }
}

/// An effective mutual TLS mode for inbound connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Only mTLS (HBONE); plaintext is refused before it reaches the app.
    Strict,
    /// mTLS and plaintext.
    Permissive,
    /// Plaintext allowed (in ambient mode HBONE still arrives as mTLS).
    Disable,
}

impl MtlsMode {
    /// True if a plaintext connection may reach the workload.
    pub fn allows_plaintext(self) -> bool {
        !matches!(self, MtlsMode::Strict)
    }
}

/// Which workloads a policy applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum PolicyScope {
    /// Every workload: a policy without selector in the root namespace.
    Mesh,
    /// Every workload of one namespace.
    Namespace { namespace: String },
    /// Workloads carrying all of `labels`, in `namespace` (`None`: in every namespace, for an
    /// AuthorizationPolicy with a selector in the root namespace).
    Workloads {
        namespace: Option<String>,
        labels: BTreeMap<String, String>,
    },
}

/// A PeerAuthentication.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerAuthn {
    pub namespace: String,
    pub name: String,
    pub scope: PolicyScope,
    /// `None` is `UNSET`: inherit from the level above.
    pub mode: Option<MtlsMode>,
    /// Workload port → mode (`None`: inherit); only with a workload selector.
    pub port_modes: BTreeMap<u16, Option<MtlsMode>>,
}

/// `ALLOW` or `DENY` (the actions the node proxy enforces).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthzAction {
    Allow,
    Deny,
}

/// An AuthorizationPolicy the node proxy enforces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Authorization {
    pub namespace: String,
    pub name: String,
    pub scope: PolicyScope,
    pub action: AuthzAction,
    /// The policy matches if any rule matches; no rules match nothing (an `ALLOW` policy
    /// without rules therefore allows nothing).
    pub rules: Vec<AuthzRule>,
    /// HTTP-only attributes found in the policy, which the node proxy cannot check (see the
    /// module documentation for what it does instead). Empty for pure L4 policies.
    pub http_attributes: Vec<String>,
}

/// One rule: every clause must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AuthzRule {
    pub clauses: Vec<Clause>,
}

/// A clause (`from`, `to`, or one `when` condition): any of its matches will do.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Clause {
    pub any_of: Vec<ConnMatch>,
}

/// Conditions on a connection; every non-empty positive list must have a hit, no negative list
/// may have one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConnMatch {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountRef>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountRef>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*` (present).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    /// Reads Istio's wildcard syntax.
    pub fn parse(s: &str) -> Self {
        if s == "*" {
            StringMatch::Presence
        } else if let Some(suffix) = s.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_owned())
        } else if let Some(prefix) = s.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_owned())
        } else {
            StringMatch::Exact(s.to_owned())
        }
    }

    /// True if `value` is present and matches.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let Some(v) = value else {
            return false;
        };
        match self {
            StringMatch::Exact(s) => v == s,
            StringMatch::Prefix(p) => v.starts_with(p.as_str()),
            StringMatch::Suffix(s) => v.ends_with(s.as_str()),
            StringMatch::Presence => !v.is_empty(),
        }
    }
}

/// A service account named by an AuthorizationPolicy (`serviceAccounts`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceAccountRef {
    pub namespace: String,
    pub name: String,
}

/// A valid policy that the node proxy does not enforce.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IgnoredPolicy {
    /// `Kind.group`.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

/// What the message of a rejected ALLOW AuthorizationPolicy ends with.
pub const FAIL_CLOSED_ALLOW: &str =
    "; while no valid version exists it denies every connection to the workloads it selects";
/// What the message of a rejected DENY AuthorizationPolicy ends with.
pub const FAIL_CLOSED_DENY: &str =
    "; while no valid version exists its rules deny without the clauses that could not be read";

/// Normalises every PeerAuthentication and AuthorizationPolicy of `resources`.
pub fn normalise(resources: &ResourceSet, root_namespace: &str, out: &mut Rejections) -> Policies {
    let mut policies = Policies::default();

    let mut pas: Vec<&PeerAuthentication> = resources.peer_authentications.iter().collect();
    pas.sort_by_key(|pa| age_key(&pa.metadata));
    for pa in pas {
        match peer_authentication(pa, root_namespace, out) {
            Some(Normalised::Kept(p)) => policies.peer_authentications.push(p),
            Some(Normalised::Ignored(i)) => policies.ignored.push(i),
            None => {}
        }
    }

    let mut authorizations = Vec::new();
    for ap in &resources.authorization_policies {
        match authorization_policy(ap, root_namespace, out) {
            Some(Normalised::Kept(a)) => authorizations.push(a),
            Some(Normalised::Ignored(i)) => policies.ignored.push(i),
            None => {}
        }
    }
    policies.authorizations = authorizations.into_iter().collect();
    policies
}

enum Normalised<T> {
    Kept(T),
    Ignored(IgnoredPolicy),
}

/// Oldest first, as Istio resolves conflicts; resources without a creation time (a local file)
/// count as oldest and are ordered by namespace and name.
fn age_key(meta: &ObjectMeta) -> (Option<Time>, String, String) {
    (
        meta.creation_timestamp.clone(),
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn names(meta: &ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

fn selector_labels(selector: &Option<WorkloadSelector>) -> Option<&BTreeMap<String, String>> {
    selector
        .as_ref()
        .map(|s| &s.match_labels)
        .filter(|l| !l.is_empty())
}

/// `UNSET` (or absent) is `None`; an unknown mode is an error message.
fn mtls_mode(mode: Option<&str>) -> Result<Option<MtlsMode>, String> {
    match mode {
        None | Some("UNSET") => Ok(None),
        Some("STRICT") => Ok(Some(MtlsMode::Strict)),
        Some("PERMISSIVE") => Ok(Some(MtlsMode::Permissive)),
        Some("DISABLE") => Ok(Some(MtlsMode::Disable)),
        Some(other) => Err(format!(
            "{other:?} is not one of UNSET, DISABLE, PERMISSIVE, STRICT"
        )),
    }
}

/// A workload port: a number in 1..=65535.
fn port(text: &PortText) -> Result<u16, String> {
    match text.0.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(format!("{p} is not in 1..65535")),
        Err(_) => Err(format!("{:?} is not a port number", text.0)),
    }
}

/// An IP address or a CIDR.
fn ip_block(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if text.contains('/') {
        IpNet::from_str(text).map_err(|_| format!("{text:?} is not a CIDR"))
    } else {
        IpAddr::from_str(text)
            .map(IpNet::from)
            .map_err(|_| format!("{text:?} is not an IP address or CIDR"))
    }
}

fn peer_authentication(
    pa: &PeerAuthentication,
    root_namespace: &str,
    out: &mut Rejections,
) -> Option<Normalised<PeerAuthn>> {
    let (namespace, name) = names(&pa.metadata);
    let mut reject = |field: &str, message: String| {
        out.reject(
            &PeerAuthentication::qualified(),
            Some(&namespace),
            &name,
            field,
            message,
        );
    };
    let spec = &pa.spec;
    let mode = match mtls_mode(spec.mtls.as_ref().and_then(|m| m.mode.as_deref())) {
        Ok(m) => m,
        Err(message) => {
            reject("spec.mtls.mode", message);
            return None;
        }
    };
    let labels = selector_labels(&spec.selector);
    if labels.is_none() && !spec.port_level_mtls.is_empty() {
        reject(
            "spec.portLevelMtls",
            "port-level modes need a workload selector".into(),
        );
        return None;
    }
    let mut port_modes = BTreeMap::new();
    for (key, setting) in &spec.port_level_mtls {
        let p = match port(key) {
            Ok(p) => p,
            Err(message) => {
                reject(&format!("spec.portLevelMtls[{:?}]", key.0), message);
                return None;
            }
        };
        match mtls_mode(setting.mode.as_deref()) {
            Ok(m) => {
                port_modes.insert(p, m);
            }
            Err(message) => {
                reject(&format!("spec.portLevelMtls[{:?}].mode", key.0), message);
                return None;
            }
        }
    }
    let scope = match labels {
        Some(_) if namespace == root_namespace => {
            return Some(Normalised::Ignored(IgnoredPolicy {
                kind: PeerAuthentication::qualified(),
                namespace,
                name,
                reason: "a PeerAuthentication with a selector in the root namespace is ignored"
                    .into(),
            }));
        }
        Some(labels) => PolicyScope::Workloads {
            namespace: Some(namespace.clone()),
            labels: labels.clone(),
        },
        None if namespace == root_namespace => PolicyScope::Mesh,
        None => PolicyScope::Namespace {
            namespace: namespace.clone(),
        },
    };
    Some(Normalised::Kept(PeerAuthn {
        namespace,
        name,
        scope,
        mode,
        port_modes,
    }))
}

fn authorization_policy(
    ap: &AuthorizationPolicy,
    root_namespace: &str,
    out: &mut Rejections,
) -> Option<Normalised<Authorization>> {
    let (namespace, name) = names(&ap.metadata);
    let spec = &ap.spec;
    let ignored = |reason: &str| {
        Some(Normalised::Ignored(IgnoredPolicy {
            kind: AuthorizationPolicy::qualified(),
            namespace: namespace.clone(),
            name: name.clone(),
            reason: reason.into(),
        }))
    };
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => AuthzAction::Allow,
        Some("DENY") => AuthzAction::Deny,
        Some("CUSTOM") => {
            return ignored("CUSTOM (external authorizer) is not enforced by the node proxy");
        }
        Some("AUDIT") => return ignored("AUDIT only logs; the node proxy does not audit"),
        Some(other) => {
            // Fail closed, as for an ALLOW policy that cannot be read (below).
            out.reject(
                &AuthorizationPolicy::qualified(),
                Some(&namespace),
                &name,
                "spec.action",
                format!("{other:?} is not one of ALLOW, DENY, AUDIT, CUSTOM{FAIL_CLOSED_ALLOW}"),
            );
            return Some(Normalised::Kept(Authorization {
                scope: scope(&spec.selector, &namespace, root_namespace),
                namespace,
                name,
                action: AuthzAction::Allow,
                rules: Vec::new(),
                http_attributes: Vec::new(),
            }));
        }
    };
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        return ignored("attached with targetRef to a gateway or waypoint, which enforce it");
    }
    let mut http_attributes = Vec::new();
    let mut rules = Vec::new();
    let mut errors = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        let (rule, found) = authz_rule(rule, &path, &namespace, action, &mut errors);
        http_attributes.extend(found);
        rules.extend(rule);
    }
    if let Some((field, message)) = errors.into_iter().next() {
        // Fail closed. The rejection is reported (log line, condition), and a version of the
        // policy that was valid before stays in force instead (`state::LastGood`). One that was
        // never valid must not leave its workloads open: an ALLOW policy keeps no rule (it
        // denies every connection its selector covers), a DENY policy keeps its rules without
        // the clauses that could not be read (they deny more, never less).
        let note = match action {
            AuthzAction::Allow => FAIL_CLOSED_ALLOW,
            AuthzAction::Deny => FAIL_CLOSED_DENY,
        };
        out.reject(
            &AuthorizationPolicy::qualified(),
            Some(&namespace),
            &name,
            &field,
            format!("{message}{note}"),
        );
        if action == AuthzAction::Allow {
            rules.clear();
        }
    }
    http_attributes.sort();
    http_attributes.dedup();
    Some(Normalised::Kept(Authorization {
        scope: scope(&spec.selector, &namespace, root_namespace),
        namespace,
        name,
        action,
        rules,
        http_attributes,
    }))
}

/// Which workloads an AuthorizationPolicy in `namespace` with `selector` applies to.
fn scope(
    selector: &Option<WorkloadSelector>,
    namespace: &str,
    root_namespace: &str,
) -> PolicyScope {
    match selector_labels(selector) {
        Some(labels) => PolicyScope::Workloads {
            namespace: (namespace != root_namespace).then(|| namespace.to_owned()),
            labels: labels.clone(),
        },
        None if namespace == root_namespace => PolicyScope::Mesh,
        None => PolicyScope::Namespace {
            namespace: namespace.to_owned(),
        },
    }
}

type FieldError = (String, String);

/// One rule; `None` if it can never match (an ALLOW rule with HTTP attributes). Also returns the
/// HTTP attributes found. A clause (`to`, `from`, one `when`) with an invalid field is left out
/// and its error pushed to `errors`: leaving a clause out makes the rule match more, which is
/// what a DENY rule must do while it cannot be read whole (an ALLOW policy with errors is
/// replaced as a whole by the caller).
fn authz_rule(
    rule: &Rule,
    path: &str,
    policy_namespace: &str,
    action: AuthzAction,
    errors: &mut Vec<FieldError>,
) -> (Option<AuthzRule>, Vec<String>) {
    let mut http = Vec::new();
    let mut clauses = Vec::new();
    let mut keep = |clause: Result<Clause, FieldError>, clauses: &mut Vec<Clause>| match clause {
        Ok(c) => clauses.push(c),
        Err(e) => errors.push(e),
    };

    if !rule.to.is_empty() {
        let to = (|| {
            let mut any_of = Vec::new();
            for (j, to) in rule.to.iter().enumerate() {
                let op = &to.operation;
                let at = format!("{path}.to[{j}].operation");
                for (field, list) in [
                    ("hosts", &op.hosts),
                    ("notHosts", &op.not_hosts),
                    ("methods", &op.methods),
                    ("notMethods", &op.not_methods),
                    ("paths", &op.paths),
                    ("notPaths", &op.not_paths),
                ] {
                    if !list.is_empty() {
                        http.push(field.to_owned());
                    }
                }
                any_of.push(ConnMatch {
                    destination_ports: ports(&op.ports, &format!("{at}.ports"))?,
                    not_destination_ports: ports(&op.not_ports, &format!("{at}.notPorts"))?,
                    ..ConnMatch::default()
                });
            }
            Ok(Clause { any_of })
        })();
        keep(to, &mut clauses);
    }

    if !rule.from.is_empty() {
        let from = (|| {
            let mut any_of = Vec::new();
            for (j, from) in rule.from.iter().enumerate() {
                let at = format!("{path}.from[{j}].source");
                let (m, found) = source(&from.source, &at, policy_namespace)?;
                http.extend(found);
                any_of.push(m);
            }
            Ok(Clause { any_of })
        })();
        keep(from, &mut clauses);
    }

    for (j, when) in rule.when.iter().enumerate() {
        let at = format!("{path}.when[{j}]");
        match condition(when, &at) {
            Ok(Some(m)) => clauses.push(Clause { any_of: vec![m] }),
            // An HTTP condition: dropped (DENY) or the whole rule dropped (ALLOW), below.
            Ok(None) => http.push(when.key.clone()),
            Err(e) => errors.push(e),
        }
    }

    if action == AuthzAction::Allow && !http.is_empty() {
        return (None, http);
    }
    (Some(AuthzRule { clauses }), http)
}

fn ports(list: &[PortText], field: &str) -> Result<Vec<u16>, FieldError> {
    list.iter()
        .enumerate()
        .map(|(k, p)| port(p).map_err(|m| (format!("{field}[{k}]"), m)))
        .collect()
}

fn ip_blocks(list: &[String], field: &str) -> Result<Vec<IpNet>, FieldError> {
    list.iter()
        .enumerate()
        .map(|(k, b)| ip_block(b).map_err(|m| (format!("{field}[{k}]"), m)))
        .collect()
}

fn string_matches(list: &[String]) -> Vec<StringMatch> {
    list.iter().map(|s| StringMatch::parse(s)).collect()
}

fn service_accounts(list: &[String], policy_namespace: &str) -> Vec<ServiceAccountRef> {
    list.iter()
        .map(|s| match s.split_once('/') {
            Some((ns, sa)) => ServiceAccountRef {
                namespace: ns.to_owned(),
                name: sa.to_owned(),
            },
            None => ServiceAccountRef {
                namespace: policy_namespace.to_owned(),
                name: s.clone(),
            },
        })
        .collect()
}

fn source(
    s: &Source,
    at: &str,
    policy_namespace: &str,
) -> Result<(ConnMatch, Vec<String>), FieldError> {
    let mut http = Vec::new();
    for (field, list) in [
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ] {
        if !list.is_empty() {
            http.push(field.to_owned());
        }
    }
    let m = ConnMatch {
        principals: string_matches(&s.principals),
        not_principals: string_matches(&s.not_principals),
        namespaces: string_matches(&s.namespaces),
        not_namespaces: string_matches(&s.not_namespaces),
        service_accounts: service_accounts(&s.service_accounts, policy_namespace),
        not_service_accounts: service_accounts(&s.not_service_accounts, policy_namespace),
        source_ips: ip_blocks(&s.ip_blocks, &format!("{at}.ipBlocks"))?,
        not_source_ips: ip_blocks(&s.not_ip_blocks, &format!("{at}.notIpBlocks"))?,
        ..ConnMatch::default()
    };
    Ok((m, http))
}

/// A `when` condition on an L4 key as a match; `None` for an HTTP key.
fn condition(c: &Condition, at: &str) -> Result<Option<ConnMatch>, FieldError> {
    let values = format!("{at}.values");
    let not_values = format!("{at}.notValues");
    let as_ports = |list: &[String], field: &str| {
        let texts: Vec<PortText> = list.iter().map(|s| PortText(s.clone())).collect();
        ports(&texts, field)
    };
    let mut m = ConnMatch::default();
    match c.key.as_str() {
        "source.ip" => {
            m.source_ips = ip_blocks(&c.values, &values)?;
            m.not_source_ips = ip_blocks(&c.not_values, &not_values)?;
        }
        "destination.ip" => {
            m.destination_ips = ip_blocks(&c.values, &values)?;
            m.not_destination_ips = ip_blocks(&c.not_values, &not_values)?;
        }
        "destination.port" => {
            m.destination_ports = as_ports(&c.values, &values)?;
            m.not_destination_ports = as_ports(&c.not_values, &not_values)?;
        }
        "source.namespace" => {
            m.namespaces = string_matches(&c.values);
            m.not_namespaces = string_matches(&c.not_values);
        }
        "source.principal" => {
            m.principals = string_matches(&c.values);
            m.not_principals = string_matches(&c.not_values);
        }
        _ => return Ok(None),
    }
    Ok(Some(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, scope: PolicyScope) -> Authorization {
        Authorization {
            namespace: "x".into(),
            name: name.into(),
            scope,
            action: AuthzAction::Allow,
            rules: Vec::new(),
            http_attributes: Vec::new(),
        }
    }

    #[test]
    fn reaching_keeps_the_order_of_local_and_mesh_wide_policies() {
        let ns = |n: &str| PolicyScope::Namespace {
            namespace: n.into(),
        };
        let all: Authorizations = [
            policy("mesh", PolicyScope::Mesh),
            policy("a1", ns("a")),
            policy("b1", ns("b")),
            policy(
                "root-selector",
                PolicyScope::Workloads {
                    namespace: None,
                    labels: BTreeMap::new(),
                },
            ),
            policy(
                "a2",
                PolicyScope::Workloads {
                    namespace: Some("a".into()),
                    labels: BTreeMap::new(),
                },
            ),
        ]
        .into_iter()
        .collect();
        let names =
            |ns: &str| -> Vec<String> { all.reaching(ns).map(|p| p.name.clone()).collect() };
        assert_eq!(names("a"), ["mesh", "a1", "root-selector", "a2"]);
        assert_eq!(names("b"), ["mesh", "b1", "root-selector"]);
        assert_eq!(names("c"), ["mesh", "root-selector"]);
        assert_eq!(all.len(), 5);
    }
}

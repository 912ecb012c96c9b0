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
//! HTTP-only attributes (`hosts`, `methods`, `paths`, `requestPrincipals`, `when` keys other
//! than `source.ip`, `source.namespace`, `source.principal`, `destination.ip`,
//! `destination.port`, `remote.ip`) are handled as Istio does for ztunnel: in an `ALLOW` policy
//! the *rule* using them is dropped (it never matches: fail closed), in a `DENY` policy the rule
//! is kept without them, so it matches on its L4 part alone (more restrictive than written).
//! The remote address (`remoteIpBlocks`, `remote.ip`) is kept as a term, because a gateway knows
//! it (from `X-Forwarded-For`); where it is unknown, at the node proxy, the term never matches in
//! `ALLOW` and always in `DENY`, to the same effect. Either way the attributes are listed in
//! [`Authorization::http_attributes`] so the proxy can log it once per policy.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    str::FromStr,
};

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::Serialize;

use super::{rejections::Rejections, workload::Workload};
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
    pub peer_authentications: PeerAuthentications,
    /// AuthorizationPolicies with an `ALLOW` or `DENY` action, attached to workloads.
    pub authorizations: Authorizations,
    /// Valid policies the node proxy does not enforce, and why.
    pub ignored: Vec<IgnoredPolicy>,
}

/// The enforced AuthorizationPolicies in their order, indexed by the namespace their scope
/// reaches and by one label of their selector, so that a connection's decision reads only the
/// policies that can select its destination (a cluster has thousands; a namespace tens, of which
/// a workload's labels pick a few).
pub type Authorizations = ScopedList<Authorization>;

/// PeerAuthentications, oldest first, indexed as [`Authorizations`] are: the mTLS mode of a
/// connection reads only those that can select its destination.
pub type PeerAuthentications = ScopedList<PeerAuthn>;

/// A policy that has a [`PolicyScope`].
pub trait Scoped {
    fn scope(&self) -> &PolicyScope;
}

impl Scoped for Authorization {
    fn scope(&self) -> &PolicyScope {
        &self.scope
    }
}

impl Scoped for PeerAuthn {
    fn scope(&self) -> &PolicyScope {
        &self.scope
    }
}

/// Policies in their order, indexed by the namespace their scope reaches and by one label of
/// their selector ([`ScopedList::selecting`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopedList<T> {
    list: Vec<T>,
    /// Namespace → the policies scoped to it.
    by_namespace: HashMap<String, ScopeIndex>,
    /// The policies that reach every namespace (mesh-wide, or a selector in the root
    /// namespace).
    everywhere: ScopeIndex,
}

impl<T> Default for ScopedList<T> {
    fn default() -> Self {
        Self {
            list: Vec::new(),
            by_namespace: HashMap::new(),
            everywhere: ScopeIndex::default(),
        }
    }
}

/// Positions in [`ScopedList::list`] of the policies of one reach, ascending in each list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ScopeIndex {
    /// Policies without labels to match: they select every workload they reach.
    unlabelled: Vec<usize>,
    /// Label key → value → the policies whose selector's first label (in key order) is that
    /// pair; a workload without that label is never selected by them.
    by_label: HashMap<String, HashMap<String, Vec<usize>>>,
}

impl ScopeIndex {
    fn add(&mut self, i: usize, labels: Option<&BTreeMap<String, String>>) {
        match labels.and_then(|l| l.iter().next()) {
            None => self.unlabelled.push(i),
            Some((k, v)) => self
                .by_label
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .push(i),
        }
    }

    /// Adds to `out` the positions of the policies that may select a workload with `labels`.
    fn candidates(&self, labels: &BTreeMap<String, String>, out: &mut Vec<usize>) {
        out.extend_from_slice(&self.unlabelled);
        if self.by_label.is_empty() {
            return;
        }
        for (k, v) in labels {
            if let Some(found) = self.by_label.get(k).and_then(|values| values.get(v)) {
                out.extend_from_slice(found);
            }
        }
    }
}

impl<T: Scoped> ScopedList<T> {
    /// Every policy, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.list.iter()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The policies whose scope selects `workload`, in order: the same as
    /// `iter().filter(|p| p.scope().selects(workload))`, without reading the others.
    pub fn selecting<'a>(&'a self, workload: &'a Workload) -> impl Iterator<Item = &'a T> {
        let mut positions = Vec::new();
        self.everywhere.candidates(&workload.labels, &mut positions);
        if let Some(local) = self.by_namespace.get(&workload.namespace) {
            local.candidates(&workload.labels, &mut positions);
        }
        // Each policy sits in one list only: sorting restores the order without duplicates.
        positions.sort_unstable();
        positions
            .into_iter()
            .map(|i| &self.list[i])
            .filter(move |p| p.scope().selects(workload))
    }
}

impl<T: Scoped> FromIterator<T> for ScopedList<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut out = ScopedList::default();
        for (i, a) in iter.into_iter().enumerate() {
            match a.scope() {
                PolicyScope::Mesh => out.everywhere.add(i, None),
                PolicyScope::Workloads {
                    namespace: None,
                    labels,
                } => out.everywhere.add(i, Some(labels)),
                PolicyScope::Namespace { namespace } => out
                    .by_namespace
                    .entry(namespace.clone())
                    .or_default()
                    .add(i, None),
                PolicyScope::Workloads {
                    namespace: Some(namespace),
                    labels,
                } => out
                    .by_namespace
                    .entry(namespace.clone())
                    .or_default()
                    .add(i, Some(labels)),
            }
            out.list.push(a);
        }
        out
    }
}

impl<T> std::ops::Index<usize> for ScopedList<T> {
    type Output = T;
    fn index(&self, i: usize) -> &T {
        &self.list[i]
    }
}

impl<'a, T> IntoIterator for &'a ScopedList<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.list.iter()
    }
}

impl<T: Serialize> Serialize for ScopedList<T> {
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
    pub clauses: Box<[Clause]>,
}

/// A clause (`from`, `to`, or one `when` condition): any of its matches will do.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Clause {
    pub any_of: Box<[ConnMatch]>,
}

/// Conditions on a connection; every non-empty positive list must have a hit, no negative list
/// may have one. Built from [`ConnLists`]; only the lists that are not empty are kept (a cluster
/// holds tens of thousands of matches, most with one or two lists of twelve).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnMatch {
    terms: Box<[Term]>,
}

impl ConnMatch {
    /// The non-empty lists, in the order of [`ConnLists`]' fields.
    pub fn terms(&self) -> &[Term] {
        &self.terms
    }
}

/// One non-empty list of a [`ConnMatch`], named as the field of [`ConnLists`] it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Term {
    Principals(Box<[StringMatch]>),
    NotPrincipals(Box<[StringMatch]>),
    Namespaces(Box<[StringMatch]>),
    NotNamespaces(Box<[StringMatch]>),
    ServiceAccounts(Box<[ServiceAccountRef]>),
    NotServiceAccounts(Box<[ServiceAccountRef]>),
    SourceIps(Box<[IpNet]>),
    NotSourceIps(Box<[IpNet]>),
    DestinationIps(Box<[IpNet]>),
    NotDestinationIps(Box<[IpNet]>),
    DestinationPorts(Box<[u16]>),
    NotDestinationPorts(Box<[u16]>),
    /// `remoteIpBlocks` / `remote.ip`: the original client, as a gateway derives it from
    /// `X-Forwarded-For`. Unknown at the node proxy (see [`Term`]'s evaluation).
    RemoteIps(Box<[IpNet]>),
    NotRemoteIps(Box<[IpNet]>),
}

impl Term {
    /// The field name it serializes under (the same as [`ConnLists`]').
    fn field(&self) -> &'static str {
        match self {
            Term::Principals(_) => "principals",
            Term::NotPrincipals(_) => "not_principals",
            Term::Namespaces(_) => "namespaces",
            Term::NotNamespaces(_) => "not_namespaces",
            Term::ServiceAccounts(_) => "service_accounts",
            Term::NotServiceAccounts(_) => "not_service_accounts",
            Term::SourceIps(_) => "source_ips",
            Term::NotSourceIps(_) => "not_source_ips",
            Term::DestinationIps(_) => "destination_ips",
            Term::NotDestinationIps(_) => "not_destination_ips",
            Term::DestinationPorts(_) => "destination_ports",
            Term::NotDestinationPorts(_) => "not_destination_ports",
            Term::RemoteIps(_) => "remote_ips",
            Term::NotRemoteIps(_) => "not_remote_ips",
        }
    }
}

/// Serialized as the map of its non-empty lists, as [`ConnLists`] would be.
impl Serialize for ConnMatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.terms.len()))?;
        for t in self.terms.iter() {
            match t {
                Term::Principals(l)
                | Term::NotPrincipals(l)
                | Term::Namespaces(l)
                | Term::NotNamespaces(l) => map.serialize_entry(t.field(), l)?,
                Term::ServiceAccounts(l) | Term::NotServiceAccounts(l) => {
                    map.serialize_entry(t.field(), l)?
                }
                Term::SourceIps(l)
                | Term::NotSourceIps(l)
                | Term::DestinationIps(l)
                | Term::NotDestinationIps(l)
                | Term::RemoteIps(l)
                | Term::NotRemoteIps(l) => map.serialize_entry(t.field(), l)?,
                Term::DestinationPorts(l) | Term::NotDestinationPorts(l) => {
                    map.serialize_entry(t.field(), l)?
                }
            }
        }
        map.end()
    }
}

/// The lists of a [`ConnMatch`] while it is being read from a policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnLists {
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub service_accounts: Vec<ServiceAccountRef>,
    pub not_service_accounts: Vec<ServiceAccountRef>,
    pub source_ips: Vec<IpNet>,
    pub not_source_ips: Vec<IpNet>,
    pub destination_ips: Vec<IpNet>,
    pub not_destination_ips: Vec<IpNet>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
    pub remote_ips: Vec<IpNet>,
    pub not_remote_ips: Vec<IpNet>,
}

impl From<ConnLists> for ConnMatch {
    fn from(l: ConnLists) -> Self {
        fn add<T>(terms: &mut Vec<Term>, list: Vec<T>, term: fn(Box<[T]>) -> Term) {
            if !list.is_empty() {
                terms.push(term(list.into_boxed_slice()));
            }
        }
        let mut t = Vec::new();
        add(&mut t, l.principals, Term::Principals);
        add(&mut t, l.not_principals, Term::NotPrincipals);
        add(&mut t, l.namespaces, Term::Namespaces);
        add(&mut t, l.not_namespaces, Term::NotNamespaces);
        add(&mut t, l.service_accounts, Term::ServiceAccounts);
        add(&mut t, l.not_service_accounts, Term::NotServiceAccounts);
        add(&mut t, l.source_ips, Term::SourceIps);
        add(&mut t, l.not_source_ips, Term::NotSourceIps);
        add(&mut t, l.destination_ips, Term::DestinationIps);
        add(&mut t, l.not_destination_ips, Term::NotDestinationIps);
        add(&mut t, l.destination_ports, Term::DestinationPorts);
        add(&mut t, l.not_destination_ports, Term::NotDestinationPorts);
        add(&mut t, l.remote_ips, Term::RemoteIps);
        add(&mut t, l.not_remote_ips, Term::NotRemoteIps);
        ConnMatch {
            terms: t.into_boxed_slice(),
        }
    }
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*` (present).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Presence,
}

impl StringMatch {
    /// Reads Istio's wildcard syntax.
    pub fn parse(s: &str) -> Self {
        if s == "*" {
            StringMatch::Presence
        } else if let Some(suffix) = s.strip_prefix('*') {
            StringMatch::Suffix(suffix.into())
        } else if let Some(prefix) = s.strip_suffix('*') {
            StringMatch::Prefix(prefix.into())
        } else {
            StringMatch::Exact(s.into())
        }
    }

    /// True if `value` is present and matches.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let Some(v) = value else {
            return false;
        };
        match self {
            StringMatch::Exact(s) => v == &**s,
            StringMatch::Prefix(p) => v.starts_with(&**p),
            StringMatch::Suffix(s) => v.ends_with(&**s),
            StringMatch::Presence => !v.is_empty(),
        }
    }
}

/// A service account named by an AuthorizationPolicy (`serviceAccounts`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceAccountRef {
    pub namespace: Box<str>,
    pub name: Box<str>,
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
    let mut peer_authentications = Vec::new();
    for pa in pas {
        match peer_authentication(pa, root_namespace, out) {
            Some(Normalised::Kept(p)) => peer_authentications.push(p),
            Some(Normalised::Ignored(i)) => policies.ignored.push(i),
            None => {}
        }
    }
    policies.peer_authentications = peer_authentications.into_iter().collect();

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
    rules.shrink_to_fit();
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
    // Attributes only a gateway sees (the remote address): kept as terms, and named for the
    // node proxy's notice, without dropping the rule.
    let mut remote = Vec::new();
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
                any_of.push(ConnMatch::from(ConnLists {
                    destination_ports: ports(&op.ports, &format!("{at}.ports"))?,
                    not_destination_ports: ports(&op.not_ports, &format!("{at}.notPorts"))?,
                    ..ConnLists::default()
                }));
            }
            Ok(Clause {
                any_of: any_of.into_boxed_slice(),
            })
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
                for (field, list) in [
                    ("remoteIpBlocks", &from.source.remote_ip_blocks),
                    ("notRemoteIpBlocks", &from.source.not_remote_ip_blocks),
                ] {
                    if !list.is_empty() {
                        remote.push(field.to_owned());
                    }
                }
                any_of.push(m);
            }
            Ok(Clause {
                any_of: any_of.into_boxed_slice(),
            })
        })();
        keep(from, &mut clauses);
    }

    for (j, when) in rule.when.iter().enumerate() {
        let at = format!("{path}.when[{j}]");
        match condition(when, &at) {
            Ok(Some(m)) => {
                if when.key == "remote.ip" {
                    remote.push(when.key.clone());
                }
                clauses.push(Clause {
                    any_of: Box::new([m]),
                })
            }
            // An HTTP condition: dropped (DENY) or the whole rule dropped (ALLOW), below.
            Ok(None) => http.push(when.key.clone()),
            Err(e) => errors.push(e),
        }
    }

    let dropped = action == AuthzAction::Allow && !http.is_empty();
    http.extend(remote);
    if dropped {
        return (None, http);
    }
    (
        Some(AuthzRule {
            clauses: clauses.into_boxed_slice(),
        }),
        http,
    )
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
                namespace: ns.into(),
                name: sa.into(),
            },
            None => ServiceAccountRef {
                namespace: policy_namespace.into(),
                name: s.as_str().into(),
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
    // remoteIpBlocks are kept as a term: a gateway knows the remote address, the node proxy
    // does not (and evaluates the term as the HTTP attributes are handled, see `policy::authz`).
    for (field, list) in [
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
    ] {
        if !list.is_empty() {
            http.push(field.to_owned());
        }
    }
    let m = ConnLists {
        principals: string_matches(&s.principals),
        not_principals: string_matches(&s.not_principals),
        namespaces: string_matches(&s.namespaces),
        not_namespaces: string_matches(&s.not_namespaces),
        service_accounts: service_accounts(&s.service_accounts, policy_namespace),
        not_service_accounts: service_accounts(&s.not_service_accounts, policy_namespace),
        source_ips: ip_blocks(&s.ip_blocks, &format!("{at}.ipBlocks"))?,
        not_source_ips: ip_blocks(&s.not_ip_blocks, &format!("{at}.notIpBlocks"))?,
        remote_ips: ip_blocks(&s.remote_ip_blocks, &format!("{at}.remoteIpBlocks"))?,
        not_remote_ips: ip_blocks(&s.not_remote_ip_blocks, &format!("{at}.notRemoteIpBlocks"))?,
        ..ConnLists::default()
    };
    Ok((m.into(), http))
}

/// A `when` condition on an L4 key as a match; `None` for an HTTP key.
fn condition(c: &Condition, at: &str) -> Result<Option<ConnMatch>, FieldError> {
    let values = format!("{at}.values");
    let not_values = format!("{at}.notValues");
    let as_ports = |list: &[String], field: &str| {
        let texts: Vec<PortText> = list.iter().map(|s| PortText(s.clone())).collect();
        ports(&texts, field)
    };
    let mut m = ConnLists::default();
    match c.key.as_str() {
        "source.ip" => {
            m.source_ips = ip_blocks(&c.values, &values)?;
            m.not_source_ips = ip_blocks(&c.not_values, &not_values)?;
        }
        "remote.ip" => {
            m.remote_ips = ip_blocks(&c.values, &values)?;
            m.not_remote_ips = ip_blocks(&c.not_values, &not_values)?;
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
    Ok(Some(m.into()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::{Membership, WorkloadUid};

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

    pub(crate) fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A workload of `namespace` with the labels `pairs`.
    pub(crate) fn workload(namespace: &str, pairs: &[(&str, &str)]) -> Workload {
        Workload {
            uid: WorkloadUid("w".into()),
            name: "w".into(),
            namespace: namespace.into(),
            service_account: "default".into(),
            node: None,
            ips: Vec::new(),
            labels: labels(pairs),
            annotations: BTreeMap::new(),
            membership: Membership::Namespace,
            ports: BTreeMap::new(),
            ready: true,
        }
    }

    fn selected(all: &Authorizations, w: &Workload) -> Vec<String> {
        all.selecting(w).map(|p| p.name.clone()).collect()
    }

    #[test]
    fn selecting_keeps_the_order_of_local_and_mesh_wide_policies() {
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
                    labels: labels(&[("app", "web")]),
                },
            ),
            policy(
                "a2",
                PolicyScope::Workloads {
                    namespace: Some("a".into()),
                    labels: labels(&[("app", "web")]),
                },
            ),
            policy("a3", ns("a")),
        ]
        .into_iter()
        .collect();
        let web = [("app", "web")];
        assert_eq!(
            selected(&all, &workload("a", &web)),
            ["mesh", "a1", "root-selector", "a2", "a3"]
        );
        assert_eq!(selected(&all, &workload("a", &[])), ["mesh", "a1", "a3"]);
        assert_eq!(
            selected(&all, &workload("b", &web)),
            ["mesh", "b1", "root-selector"]
        );
        assert_eq!(selected(&all, &workload("c", &[])), ["mesh"]);
        assert_eq!(all.len(), 6);
    }

    /// The index finds exactly what reading every policy would: selectors of one and several
    /// labels, labels a workload has with another value, every reach.
    #[test]
    fn selecting_equals_filtering_every_policy() {
        let namespaces = [None, Some("a"), Some("b")];
        let selectors: [&[(&str, &str)]; 6] = [
            &[],
            &[("app", "web")],
            &[("app", "db")],
            &[("app", "web"), ("tier", "front")],
            &[("tier", "front")],
            &[("app", "web"), ("zone", "z1")],
        ];
        let mut policies = Vec::new();
        for round in 0..2 {
            for ns in namespaces {
                for (k, sel) in selectors.iter().enumerate() {
                    let name = format!("{round}-{}-{k}", ns.unwrap_or("root"));
                    let scope = match (ns, sel.is_empty()) {
                        (None, true) => PolicyScope::Mesh,
                        (Some(n), true) => PolicyScope::Namespace {
                            namespace: n.into(),
                        },
                        (ns, false) => PolicyScope::Workloads {
                            namespace: ns.map(str::to_owned),
                            labels: labels(sel),
                        },
                    };
                    policies.push(policy(&name, scope));
                }
            }
        }
        let all: Authorizations = policies.into_iter().collect();
        let mut checked = 0;
        for ns in ["a", "b", "c"] {
            for pairs in [
                &[][..],
                &[("app", "web")],
                &[("app", "web"), ("tier", "front")],
                &[("app", "db"), ("tier", "back"), ("zone", "z1")],
                &[("app", "web"), ("tier", "front"), ("zone", "z1")],
                &[("tier", "front")],
            ] {
                let w = workload(ns, pairs);
                let expected: Vec<String> = all
                    .iter()
                    .filter(|p| p.scope.selects(&w))
                    .map(|p| p.name.clone())
                    .collect();
                assert_eq!(selected(&all, &w), expected, "{ns} {pairs:?}");
                checked += expected.len();
            }
        }
        assert!(checked > 50, "the cases select policies: {checked}");
    }

    /// A compact match serializes as the lists it was read from did: only the non-empty ones.
    #[test]
    fn conn_match_serializes_its_non_empty_lists() {
        let m = ConnMatch::from(ConnLists {
            principals: vec![StringMatch::parse("td/ns/a/sa/*")],
            not_destination_ports: vec![22],
            ..ConnLists::default()
        });
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            serde_json::json!({"principals": [{"prefix": "td/ns/a/sa/"}], "not_destination_ports": [22]})
        );
        assert_eq!(
            serde_json::to_value(ConnMatch::from(ConnLists::default())).unwrap(),
            serde_json::json!({})
        );
    }
}

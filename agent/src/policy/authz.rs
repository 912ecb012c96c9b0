//! AuthorizationPolicy, L4 subset: DENY before ALLOW; no ALLOW policy selecting the workload
//! allows everything; otherwise some ALLOW rule must match.
use super::{ConnectionInfo, Decision, DenyReason};
use crate::resources::NamespacedName;
use crate::state::policy::{
    Authorization, AuthzAction, AuthzRule, Clause, ConnMatch, Policies, ServiceAccountRef,
    StringMatch, Term,
};

impl Policies {
    /// Decides whether `conn` may reach its destination.
    pub fn authorize(&self, conn: &ConnectionInfo<'_>) -> Decision {
        let facts = Facts::of(conn);
        let mut first_allow: Option<&Authorization> = None;
        let mut allowed = false;
        for policy in self.authorizations.selecting(conn.destination) {
            match policy.action {
                AuthzAction::Deny if policy.matches(&facts) => {
                    return Decision::Deny {
                        policy: NamespacedName::new(&policy.namespace, &policy.name).key(),
                        reason: DenyReason::DenyRuleMatched,
                    };
                }
                AuthzAction::Deny => {}
                AuthzAction::Allow => {
                    first_allow.get_or_insert(policy);
                    // Keep looking: a DENY policy later in the list still wins.
                    allowed = allowed || policy.matches(&facts);
                }
            }
        }
        match first_allow {
            Some(policy) if !allowed => Decision::Deny {
                policy: NamespacedName::new(&policy.namespace, &policy.name).key(),
                reason: DenyReason::NoAllowRuleMatched,
            },
            _ => Decision::Allow,
        }
    }
}

/// A connection's attributes in the form the matchers compare.
struct Facts<'a> {
    conn: &'a ConnectionInfo<'a>,
    /// `<td>/ns/<ns>/sa/<sa>`, as principals are written.
    principal: Option<String>,
}

impl<'a> Facts<'a> {
    fn of(conn: &'a ConnectionInfo<'a>) -> Self {
        let principal = conn.source_identity.map(|id| {
            format!(
                "{}/ns/{}/sa/{}",
                id.trust_domain, id.namespace, id.service_account
            )
        });
        Self { conn, principal }
    }

    fn namespace(&self) -> Option<&str> {
        self.conn.source_identity.map(|id| id.namespace.as_str())
    }
}

impl Authorization {
    fn matches(&self, facts: &Facts<'_>) -> bool {
        // What a term on an attribute this proxy cannot see answers: no match in ALLOW (fail
        // closed), a match in DENY (it denies more, never less).
        let unknown = self.action == AuthzAction::Deny;
        self.rules.iter().any(|rule| rule.matches(facts, unknown))
    }
}

impl AuthzRule {
    fn matches(&self, facts: &Facts<'_>, unknown: bool) -> bool {
        self.clauses
            .iter()
            .all(|clause| clause.matches(facts, unknown))
    }
}

impl Clause {
    fn matches(&self, facts: &Facts<'_>, unknown: bool) -> bool {
        self.any_of.iter().any(|m| m.matches(facts, unknown))
    }
}

impl ConnMatch {
    fn matches(&self, facts: &Facts<'_>, unknown: bool) -> bool {
        self.terms().iter().all(|t| t.holds(facts, unknown))
    }
}

impl Term {
    /// A positive list has a hit; a negative list has none; `unknown` when the attribute is not
    /// known here.
    fn holds(&self, facts: &Facts<'_>, unknown: bool) -> bool {
        let conn = facts.conn;
        let principal = |m: &StringMatch| m.matches(facts.principal.as_deref());
        let namespace = |m: &StringMatch| m.matches(facts.namespace());
        let service_account = |sa: &ServiceAccountRef| {
            conn.source_identity
                .is_some_and(|id| *id.namespace == *sa.namespace && *id.service_account == *sa.name)
        };
        let source_ip = |net: &ipnet::IpNet| net.contains(&conn.source_ip);
        let destination_ip = |net: &ipnet::IpNet| net.contains(&conn.destination_ip);
        let port = |p: &u16| *p == conn.destination_port;
        match self {
            Term::Principals(l) => l.iter().any(principal),
            Term::NotPrincipals(l) => !l.iter().any(principal),
            Term::Namespaces(l) => l.iter().any(namespace),
            Term::NotNamespaces(l) => !l.iter().any(namespace),
            Term::ServiceAccounts(l) => l.iter().any(service_account),
            Term::NotServiceAccounts(l) => !l.iter().any(service_account),
            Term::SourceIps(l) => l.iter().any(source_ip),
            Term::NotSourceIps(l) => !l.iter().any(source_ip),
            Term::DestinationIps(l) => l.iter().any(destination_ip),
            Term::NotDestinationIps(l) => !l.iter().any(destination_ip),
            Term::DestinationPorts(l) => l.iter().any(port),
            Term::NotDestinationPorts(l) => !l.iter().any(port),
            Term::RemoteIps(l) => conn
                .remote_ip
                .map_or(unknown, |ip| l.iter().any(|net| net.contains(&ip))),
            Term::NotRemoteIps(l) => conn
                .remote_ip
                .map_or(unknown, |ip| !l.iter().any(|net| net.contains(&ip))),
        }
    }
}

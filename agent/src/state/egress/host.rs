//! Host names as Istio matches them, namespaced object keys, and `exportTo` visibility.
use std::{collections::BTreeSet, fmt, net::IpAddr};

use serde::Serialize;

/// `namespace/name` of a namespaced resource.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(into = "String")]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    /// The key of `name` in `namespace`.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl From<ObjectKey> for String {
    fn from(k: ObjectKey) -> String {
        k.to_string()
    }
}

/// One entry of a `hosts` list.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostMatch {
    /// A full name, lower-case, without a trailing dot.
    Exact(String),
    /// `*.example.com`, kept as `.example.com`: matches any name ending in it (one or more labels
    /// in front), never `example.com` itself.
    Suffix(String),
    /// `*`: every host.
    Any,
}

/// Why a `hosts` entry is not a host name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("empty host")]
    Empty,
    #[error("{0:?}: a wildcard may only be the whole first label (`*.example.com`)")]
    Wildcard(String),
    #[error("{0:?}: not a DNS name (labels of letters, digits and '-', at most 63 each)")]
    NotDns(String),
}

impl HostMatch {
    /// Parses a host or wildcard host; `*` is allowed (callers that forbid it check for `Any`).
    pub fn parse(raw: &str) -> Result<Self, HostError> {
        let host = raw.trim_end_matches('.').to_ascii_lowercase();
        if host.is_empty() {
            return Err(HostError::Empty);
        }
        if host == "*" {
            return Ok(Self::Any);
        }
        let (wild, rest) = match host.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, host.as_str()),
        };
        if rest.contains('*') {
            return Err(HostError::Wildcard(raw.to_owned()));
        }
        if !is_dns_name(rest) {
            return Err(HostError::NotDns(raw.to_owned()));
        }
        Ok(if wild {
            Self::Suffix(format!(".{rest}"))
        } else {
            Self::Exact(rest.to_owned())
        })
    }

    /// True if the (already normalised) `host` is covered.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(h) => h == host,
            Self::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
            Self::Any => true,
        }
    }

    /// True if every host `other` covers is covered by `self` (used to join a route's hosts with
    /// a gateway server's hosts).
    pub fn covers(&self, other: &HostMatch) -> bool {
        match (self, other) {
            (Self::Any, _) => true,
            (_, Self::Any) => false,
            (_, Self::Exact(h)) => self.matches(h),
            (Self::Suffix(a), Self::Suffix(b)) => b.ends_with(a.as_str()),
            (Self::Exact(_), Self::Suffix(_)) => false,
        }
    }
}

impl fmt::Display for HostMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(h) => f.write_str(h),
            Self::Suffix(s) => write!(f, "*{s}"),
            Self::Any => f.write_str("*"),
        }
    }
}

fn is_dns_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Normalises what a client named (HTTP `Host`/`:authority`, TLS SNI, a DNS name): lower case,
/// no port, no trailing dot. `None` for an IP literal or something that is not a DNS name.
pub fn normalise_host(raw: &str) -> Option<String> {
    let raw = raw.trim();
    if raw.starts_with('[') {
        return None; // an IPv6 literal, with or without a port
    }
    let host = match raw.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') => h,
        Some(_) => return None, // a bare IPv6 address
        None => raw,
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() || host.parse::<IpAddr>().is_ok() || !is_dns_name(&host) {
        return None;
    }
    Some(host)
}

/// Which namespaces see a resource (`exportTo`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Export {
    /// `*`, or no `exportTo` (Istio's default).
    All,
    /// Listed namespaces (`.` resolved to the resource's own); empty for `~`.
    Namespaces(BTreeSet<String>),
}

impl Export {
    /// Reads `exportTo` of a resource in `own_namespace`; `Err` names the offending entry.
    pub fn parse(own_namespace: &str, entries: &[String]) -> Result<Self, (usize, String)> {
        if entries.is_empty() {
            return Ok(Self::All);
        }
        let mut set = BTreeSet::new();
        for (i, e) in entries.iter().enumerate() {
            match e.as_str() {
                "*" => return Ok(Self::All),
                "~" if entries.len() == 1 => {}
                "~" => return Err((i, "\"~\" cannot be combined with other entries".into())),
                "." => {
                    set.insert(own_namespace.to_owned());
                }
                ns if is_dns_name(ns) && !ns.contains('.') => {
                    set.insert(ns.to_owned());
                }
                other => return Err((i, format!("{other:?} is not a namespace, \".\" or \"*\""))),
            }
        }
        Ok(Self::Namespaces(set))
    }

    /// True if a workload in `namespace` sees the resource.
    pub fn visible_to(&self, namespace: &str) -> bool {
        match self {
            Self::All => true,
            Self::Namespaces(set) => set.contains(namespace),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_subdomains_only() {
        let w = HostMatch::parse("*.Example.com.").expect("valid");
        assert!(w.matches("api.example.com"));
        assert!(w.matches("a.b.example.com"));
        assert!(!w.matches("example.com"));
        assert!(!w.matches("badexample.com"));
        let e = HostMatch::parse("httpbin.org").expect("valid");
        assert!(e.matches("httpbin.org"));
        assert!(!e.matches("www.httpbin.org"));
    }

    #[test]
    fn malformed_hosts_are_refused() {
        for bad in ["", "foo.*.com", "a*.b.com", "-a.com", "a..b", "a_b.com"] {
            assert!(HostMatch::parse(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(HostMatch::parse("*"), Ok(HostMatch::Any));
    }

    #[test]
    fn covers_orders_patterns() {
        let p = |s| HostMatch::parse(s).expect("valid");
        assert!(p("*").covers(&p("*.a.com")));
        assert!(p("*.a.com").covers(&p("x.a.com")));
        assert!(p("*.a.com").covers(&p("*.x.a.com")));
        assert!(!p("*.x.a.com").covers(&p("*.a.com")));
        assert!(!p("x.a.com").covers(&p("*.a.com")));
    }

    #[test]
    fn client_hosts_are_normalised() {
        assert_eq!(
            normalise_host("HTTPBIN.org:8080").as_deref(),
            Some("httpbin.org")
        );
        assert_eq!(
            normalise_host("httpbin.org.").as_deref(),
            Some("httpbin.org")
        );
        assert_eq!(normalise_host("10.1.2.3:80"), None);
        assert_eq!(normalise_host("[fd00::1]:443"), None);
        assert_eq!(normalise_host("fd00::1"), None);
        assert_eq!(normalise_host("bad host"), None);
    }

    #[test]
    fn export_to_forms() {
        let all = Export::parse("a", &[]).expect("valid");
        assert!(all.visible_to("zzz"));
        let own = Export::parse("a", &[".".into()]).expect("valid");
        assert!(own.visible_to("a") && !own.visible_to("b"));
        let none = Export::parse("a", &["~".into()]).expect("valid");
        assert!(!none.visible_to("a"));
        assert!(Export::parse("a", &["~".into(), "b".into()]).is_err());
        assert!(Export::parse("a", &["Not/A/Namespace".into()]).is_err());
    }
}

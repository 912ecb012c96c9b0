//! The `identity` section of the agent's configuration.
use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};

/// Where workload certificates come from and how long they live.
///
/// In a cluster, a CA service signs them (`sluice ca`, or Istio's istiod): the agent sends a
/// certificate request with its projected ServiceAccount token and never holds the root key.
///
/// ```yaml
/// identity:
///   caAddress: https://sluice-ca.sluice-system.svc:15012   # or istiod.istio-system.svc:15012
///   caRootFile: /etc/sluice/ca-root/root-cert.pem          # verifies the CA's TLS
///   tokenFile: /var/run/secrets/tokens/istio-token         # projected, audience istio-ca
///   workloadCertTtl: 24h
/// ```
///
/// Without `caAddress` the agent signs itself with the built-in CA (file mode and the demo):
/// `rootCertFile` and `rootKeyFile` (both, or neither for a throw-away root for a single-node
/// local run).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityConfig {
    /// PEM file with the mesh root certificate.
    #[serde(default)]
    pub root_cert_file: Option<PathBuf>,
    /// PEM file with the root's private key (PKCS#8).
    #[serde(default)]
    pub root_key_file: Option<PathBuf>,
    /// Lifetime of workload certificates; they are renewed at half of it.
    #[serde(default)]
    pub workload_cert_ttl: CertTtl,
    /// The CA service, `https://host:port` (or `host:port`); unset: the built-in CA.
    #[serde(default)]
    pub ca_address: Option<String>,
    /// PEM root(s) that verify the CA service's TLS certificate (for istiod: `root-cert.pem` of
    /// the `istio-ca-root-cert` ConfigMap). Required with `caAddress`.
    #[serde(default)]
    pub ca_root_file: Option<PathBuf>,
    /// The agent's projected ServiceAccount token, read again for every request (the kubelet
    /// rotates it).
    #[serde(default = "default_token_file")]
    pub token_file: PathBuf,
    /// The audience the token must carry: the CA reviews tokens for it (`istio-ca`, as Istio).
    #[serde(default = "default_token_audience")]
    pub token_audience: String,
    /// Sent as the `ClusterID` gRPC metadata, as Istio's clients do.
    #[serde(default = "default_cluster_id")]
    pub ca_cluster_id: String,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            root_cert_file: None,
            root_key_file: None,
            workload_cert_ttl: CertTtl::DEFAULT,
            ca_address: None,
            ca_root_file: None,
            token_file: default_token_file(),
            token_audience: default_token_audience(),
            ca_cluster_id: default_cluster_id(),
        }
    }
}

fn default_token_file() -> PathBuf {
    "/var/run/secrets/tokens/istio-token".into()
}

fn default_token_audience() -> String {
    "istio-ca".into()
}

fn default_cluster_id() -> String {
    "Kubernetes".into()
}

/// Why the `identity` section is not usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityConfigError {
    #[error(
        "spec.identity.caRootFile: required with spec.identity.caAddress (the root that verifies the CA's TLS certificate)"
    )]
    NoCaRoot,
    #[error(
        "spec.identity.rootKeyFile: must not be set with spec.identity.caAddress: the root key stays with the CA, never on nodes"
    )]
    KeyWithRemoteCa,
    #[error("spec.identity.caAddress: {address:?} is not https://host:port or host:port")]
    BadCaAddress { address: String },
    #[error("spec.identity.tokenAudience: must not be empty")]
    EmptyAudience,
}

impl IdentityConfig {
    /// Checks the fields that go together; see [`IdentityConfigError`].
    pub fn validate(&self) -> Result<(), IdentityConfigError> {
        let Some(address) = &self.ca_address else {
            return Ok(());
        };
        if ca_host_port(address).is_none() {
            return Err(IdentityConfigError::BadCaAddress {
                address: address.clone(),
            });
        }
        if self.ca_root_file.is_none() {
            return Err(IdentityConfigError::NoCaRoot);
        }
        if self.root_key_file.is_some() {
            return Err(IdentityConfigError::KeyWithRemoteCa);
        }
        if self.token_audience.is_empty() {
            return Err(IdentityConfigError::EmptyAudience);
        }
        Ok(())
    }

    /// Whether certificates come from a CA service rather than the built-in CA.
    pub fn remote_ca(&self) -> bool {
        self.ca_address.is_some()
    }
}

/// The host and port of a CA address (`https://host:port` or `host:port`; IPv6 in brackets).
pub fn ca_host_port(address: &str) -> Option<(String, u16)> {
    let rest = address.strip_prefix("https://").unwrap_or(address);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port.parse().ok()?;
    if host.is_empty() || port == 0 || host.contains('/') || rest.contains("://") {
        return None;
    }
    Some((host.to_owned(), port))
}

/// A certificate lifetime written as a number with a unit: `24h`, `90m`, `600s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CertTtl(Duration);

impl CertTtl {
    /// Istio's default workload certificate lifetime.
    pub const DEFAULT: CertTtl = CertTtl(Duration::from_secs(24 * 3600));
    /// Shorter lifetimes leave no room for clock skew and renewal.
    pub const MIN: Duration = Duration::from_secs(60);

    /// A lifetime of `d`, if it is at least [`CertTtl::MIN`].
    pub fn new(d: Duration) -> Result<Self, CertTtlError> {
        if d < Self::MIN {
            return Err(CertTtlError::TooShort(d));
        }
        Ok(Self(d))
    }

    /// The lifetime.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl Default for CertTtl {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why a string is not a certificate lifetime.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertTtlError {
    #[error("{0:?} is not a duration like 24h, 90m or 600s")]
    Syntax(String),
    #[error("{0:?} is shorter than the minimum of 60s")]
    TooShort(Duration),
}

impl FromStr for CertTtl {
    type Err = CertTtlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || CertTtlError::Syntax(s.to_owned());
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(syntax)?;
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits.parse().map_err(|_| syntax())?;
        let unit_secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(syntax()),
        };
        let secs = n.checked_mul(unit_secs).ok_or_else(syntax)?;
        Self::new(Duration::from_secs(secs))
    }
}

impl fmt::Display for CertTtl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.as_secs();
        if s.is_multiple_of(3600) {
            write!(f, "{}h", s / 3600)
        } else if s.is_multiple_of(60) {
            write!(f, "{}m", s / 60)
        } else {
            write!(f, "{s}s")
        }
    }
}

impl Serialize for CertTtl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CertTtl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_parses_units_and_round_trips() {
        for (text, secs) in [("24h", 86400), ("90m", 5400), ("61s", 61)] {
            let ttl: CertTtl = text.parse().unwrap();
            assert_eq!(ttl.get(), Duration::from_secs(secs));
            assert_eq!(ttl.to_string(), text);
        }
    }

    #[test]
    fn ttl_refuses_bad_text_and_short_lifetimes() {
        for bad in ["", "h", "24", "24d", "-1h", "1.5h", "99999999999999999999h"] {
            assert!(
                matches!(bad.parse::<CertTtl>(), Err(CertTtlError::Syntax(_))),
                "{bad}"
            );
        }
        assert_eq!(
            "59s".parse::<CertTtl>(),
            Err(CertTtlError::TooShort(Duration::from_secs(59)))
        );
    }

    #[test]
    fn config_defaults_and_names_unknown_fields() {
        let c: IdentityConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(c.workload_cert_ttl, CertTtl::DEFAULT);
        let c: IdentityConfig = serde_yaml::from_str("workloadCertTtl: 2h").unwrap();
        assert_eq!(c.workload_cert_ttl.get(), Duration::from_secs(7200));
        let err = serde_yaml::from_str::<IdentityConfig>("rootCert: x").unwrap_err();
        assert!(err.to_string().contains("rootCert"), "{err}");
        assert_eq!(c.token_audience, "istio-ca");
        assert_eq!(c.ca_cluster_id, "Kubernetes");
    }

    #[test]
    fn a_remote_ca_needs_its_root_and_no_key_on_the_node() {
        let parse = |y: &str| {
            serde_yaml::from_str::<IdentityConfig>(y)
                .unwrap()
                .validate()
        };
        assert_eq!(parse("{}"), Ok(()));
        assert_eq!(
            parse("caAddress: https://istiod.istio-system.svc:15012"),
            Err(IdentityConfigError::NoCaRoot)
        );
        assert_eq!(
            parse("{caAddress: 'sluice-ca:15012', caRootFile: /r.pem, rootKeyFile: /k.pem}"),
            Err(IdentityConfigError::KeyWithRemoteCa)
        );
        for bad in [
            "istiod",
            "https://istiod",
            "http://x:1",
            "x:0",
            ":15012",
            "x:99999",
        ] {
            let y = format!("{{caAddress: '{bad}', caRootFile: /r.pem}}");
            assert!(
                matches!(parse(&y), Err(IdentityConfigError::BadCaAddress { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            parse("{caAddress: 'https://[::1]:15012/', caRootFile: /r.pem}"),
            Ok(())
        );
        let msg = IdentityConfigError::NoCaRoot.to_string();
        assert!(msg.starts_with("spec.identity.caRootFile"), "{msg}");
    }

    #[test]
    fn ca_addresses_split_into_host_and_port() {
        assert_eq!(
            ca_host_port("https://istiod.istio-system.svc:15012"),
            Some(("istiod.istio-system.svc".into(), 15012))
        );
        assert_eq!(ca_host_port("[::1]:1"), Some(("::1".into(), 1)));
    }
}

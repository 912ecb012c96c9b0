//! The `identity` section of the agent's configuration.
use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};

/// Where the built-in CA's root comes from and how long workload certificates live.
///
/// ```yaml
/// identity:
///   rootCertFile: /etc/sluice/ca/root-cert.pem   # both files, or neither
///   rootKeyFile: /etc/sluice/ca/root-key.pem
///   workloadCertTtl: 24h
/// ```
///
/// Without files the agent makes a throw-away root for a single-node local run; agents on
/// several nodes must share one root, so give them the same files.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
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
    }
}

//! `spec.tls`: how the mesh-facing TLS (HBONE on both sides, the egress gateway's listener)
//! agrees on keys.
use serde::{Deserialize, Serialize};

/// ```yaml
/// tls:
///   keyExchange: default   # or pqc
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    /// Which key exchange groups the mesh TLS offers and accepts.
    #[serde(default)]
    pub key_exchange: KeyExchange,
}

/// The key exchange policy, in the spirit of ztunnel's `COMPLIANCE_POLICY`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyExchange {
    /// The post-quantum hybrid X25519MLKEM768 preferred, then X25519, P-256 and P-384 for peers
    /// without it.
    #[default]
    Default,
    /// X25519MLKEM768 only: a peer that cannot do it fails the handshake.
    Pqc,
}

impl KeyExchange {
    /// The name written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Pqc => "pqc",
        }
    }
}

impl std::fmt::Display for KeyExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_exchange_defaults_parses_and_names_a_bad_value() {
        let c: TlsConfig = serde_yaml::from_str("{}").expect("defaults");
        assert_eq!(c.key_exchange, KeyExchange::Default);
        let c: TlsConfig = serde_yaml::from_str("{keyExchange: pqc}").expect("pqc");
        assert_eq!(c.key_exchange, KeyExchange::Pqc);
        let err = serde_yaml::from_str::<crate::config::AgentConfig>(
            "nodeName: n\ntls: {keyExchange: kyber}",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("tls.keyExchange"), "{err}");
        assert!(err.contains("kyber") && err.contains("pqc"), "{err}");
        assert_eq!(
            serde_yaml::to_string(&c).unwrap().trim(),
            "keyExchange: pqc"
        );
    }
}

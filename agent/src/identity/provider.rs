//! The rustls crypto provider of every certificate and TLS configuration Sluice makes.
//!
//! Provider: *aws-lc-rs*, for its post-quantum hybrid key exchange X25519MLKEM768, which Istio's
//! ztunnel offers and, in its `pqc` compliance mode, requires (*ring* has no ML-KEM). It builds
//! here with the C compiler alone (aws-lc-sys's cc builder, about a minute on two cores). Kube's
//! client uses the same provider, so only one C crypto library is linked in.
use std::sync::{Arc, OnceLock};

use rustls::{
    NamedGroup,
    crypto::{CryptoProvider, SupportedKxGroup, aws_lc_rs},
};

use crate::config::KeyExchange;

/// The crypto provider of the default key exchange policy ([`crypto_provider_for`]).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    crypto_provider_for(KeyExchange::Default)
}

/// The crypto provider HBONE configurations use under `policy`: aws-lc-rs with the TLS 1.3
/// AES-GCM suites only (AES-128 preferred: faster with AES-NI, and what ztunnel peers accept)
/// and the key exchange groups of [`kx_groups`].
pub fn crypto_provider_for(policy: KeyExchange) -> Arc<CryptoProvider> {
    static DEFAULT: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    static PQC: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    let cell = match policy {
        KeyExchange::Default => &DEFAULT,
        KeyExchange::Pqc => &PQC,
    };
    cell.get_or_init(|| {
        let mut provider = aws_lc_rs::default_provider();
        provider.cipher_suites = vec![
            aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
            aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ];
        provider.kx_groups = kx_groups(policy);
        Arc::new(provider)
    })
    .clone()
}

/// The key exchange groups offered (client) and accepted (server), most preferred first:
/// `default` puts the hybrid X25519MLKEM768 first and keeps X25519, P-256 and P-384 for peers
/// without it (a client sends key shares for the hybrid and X25519, so a classic server needs
/// no extra round trip); `pqc` offers the hybrid alone.
pub fn kx_groups(policy: KeyExchange) -> Vec<&'static dyn SupportedKxGroup> {
    use aws_lc_rs::kx_group::{SECP256R1, SECP384R1, X25519, X25519MLKEM768};
    match policy {
        KeyExchange::Default => vec![X25519MLKEM768, X25519, SECP256R1, SECP384R1],
        KeyExchange::Pqc => vec![X25519MLKEM768],
    }
}

/// The groups of `policy` as names, for log lines.
pub fn kx_group_names(policy: KeyExchange) -> Vec<NamedGroup> {
    kx_groups(policy).iter().map(|g| g.name()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_prefers_the_hybrid_and_pqc_offers_only_it() {
        assert_eq!(
            kx_group_names(KeyExchange::Default)[..2],
            [NamedGroup::X25519MLKEM768, NamedGroup::X25519]
        );
        assert_eq!(
            kx_group_names(KeyExchange::Pqc),
            [NamedGroup::X25519MLKEM768]
        );
        let p = crypto_provider_for(KeyExchange::Pqc);
        assert_eq!(p.kx_groups.len(), 1);
        assert_eq!(p.cipher_suites.len(), 2);
    }
}

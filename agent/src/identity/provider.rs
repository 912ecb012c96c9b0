//! The rustls crypto provider of every certificate and TLS configuration Sluice makes.
//!
//! Provider: *ring*. It is already in the build (kube's rustls uses it), builds with no C
//! toolchain beyond cc and in seconds, and offers AES-GCM with AES-NI and P-256/X25519.
//! aws-lc-rs builds here too (cc only, about a minute on two cores) and does X25519 in half the
//! time, but measured in the mesh bench it changed neither the handshake-bound connection rate
//! nor bulk throughput beyond run-to-run noise: not worth a second C crypto library.
use std::sync::{Arc, OnceLock};

use rustls::crypto::{CryptoProvider, ring};

/// The crypto provider every HBONE configuration uses: *ring*, with the TLS 1.3 AES-GCM suites
/// only (AES-128 preferred: faster with AES-NI, and what ztunnel peers accept).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = ring::default_provider();
            provider.cipher_suites = vec![
                ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
                ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            ];
            Arc::new(provider)
        })
        .clone()
}

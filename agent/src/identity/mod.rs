//! Workload identity: the mesh CA, workload certificates and their rotation, and the TLS
//! configurations HBONE speaks.
//!
//! - [`ca`]: the seam for certificate authorities ([`CaSource`]) and the built-in one
//!   ([`BuiltinCa`], rcgen, ECDSA P-256).
//! - [`cert`]: one issued certificate with its key ([`WorkloadCert`]) and the live, rotating view
//!   of it that TLS configurations read on every handshake ([`CertHandle`]).
//! - [`manager`]: [`SecretManager`] issues a certificate per identity on first need, caches it
//!   and renews it at half-life in the background.
//! - [`tls`]: rustls server and client configurations exactly as a ztunnel peer speaks HBONE
//!   (TLS 1.3, AES-GCM, ALPN `h2`, mutual auth, SPIFFE checks, no SNI), and [`peer_identity`].
//! - [`carried`]: certificates a running agent hands to its successor during an upgrade
//!   ([`CarriedCert`]).
//! - [`provider`]: the rustls crypto provider all of them use.
//! - [`ca_client`]: [`RemoteCa`], the client of a CA service (`sluice ca` or istiod) speaking
//!   Istio's certificate API, whose messages [`ca_wire`] encodes.
pub mod ca;
pub mod ca_client;
pub mod ca_wire;
pub mod carried;
pub mod cert;
pub mod manager;
pub mod provider;
pub mod tls;

pub use crate::config::{CertTtl, IdentityConfig, KeyExchange};
pub use ca::{BuiltinCa, CaError, CaSource, CustomCert, SignRequest};
pub use ca_client::RemoteCa;
pub use carried::CarriedCert;
pub use cert::{
    CertChain, CertHandle, CertInfo, MissingRoot, WorkloadCert, certificate_request, generate_key,
};
pub use manager::{Adopted, SecretManager};
pub use provider::{crypto_provider, crypto_provider_for, kx_group_names, kx_groups};
pub use tls::{
    HBONE_ALPN, NegotiatedTls, client_config, client_config_with, handshake_hint, peer_identity,
    server_config, server_config_with,
};

use std::sync::Arc;

use crate::state::Identity;

/// The CA the configuration asks for: the CA service at `identity.caAddress` (no root key on
/// this node), or else the built-in CA with its root files (file mode and the demo).
pub fn ca_from_config(
    config: &IdentityConfig,
    trust_domain: &str,
) -> Result<Arc<dyn CaSource>, CaError> {
    if config.remote_ca() {
        let ca = RemoteCa::from_config(config)?;
        tracing::info!(
            target: "sluice::identity",
            address = config.ca_address.as_deref().unwrap_or_default(),
            token_file = %config.token_file.display(),
            "workload certificates from the CA service"
        );
        Ok(Arc::new(ca))
    } else {
        Ok(Arc::new(BuiltinCa::from_config(config, trust_domain)?))
    }
}

/// Why a workload certificate could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
    #[error("generating a key for {identity}: {source}")]
    KeyGen {
        identity: Identity,
        source: rcgen::Error,
    },
    #[error("building a certificate request for {identity}: {source}")]
    Csr {
        identity: Identity,
        source: rcgen::Error,
    },
    #[error("certificate for {identity}: {message}")]
    BadCertificate { identity: Identity, message: String },
    #[error("certificate for {identity}: key does not load or match: {source}")]
    Key {
        identity: Identity,
        source: Box<rustls::Error>,
    },
    #[error("building a TLS configuration: {0}")]
    Tls(Box<rustls::Error>),
    #[error("a client configuration needs at least one expected server identity")]
    NoExpectedIdentity,
    #[error("building the trust store from the mesh roots: {0}")]
    Roots(#[from] rustls::server::VerifierBuilderError),
}

impl From<rustls::Error> for IdentityError {
    fn from(e: rustls::Error) -> Self {
        Self::Tls(Box::new(e))
    }
}

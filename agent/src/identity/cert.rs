//! One issued workload certificate with its key ([`WorkloadCert`]), and the live view of an
//! identity's current certificate that TLS configurations read on every handshake
//! ([`CertHandle`]).
use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::{RootCertStore, server::WebPkiClientVerifier, sign::CertifiedKey};
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::{IdentityError, provider::crypto_provider};
use crate::state::Identity;

/// A signed workload certificate with the chain up to the mesh roots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertChain {
    leaf: CertificateDer<'static>,
    intermediates: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

impl CertChain {
    /// A chain; `roots` must hold at least one trust anchor.
    pub fn new(
        leaf: CertificateDer<'static>,
        intermediates: Vec<CertificateDer<'static>>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, MissingRoot> {
        if roots.is_empty() {
            return Err(MissingRoot);
        }
        Ok(Self {
            leaf,
            intermediates,
            roots,
        })
    }

    /// A chain as Istio's CA returns it: leaf first, then intermediates, the root last.
    pub fn from_istio(mut chain: Vec<CertificateDer<'static>>) -> Result<Self, MissingRoot> {
        if chain.len() < 2 {
            return Err(MissingRoot);
        }
        let root = chain.pop().ok_or(MissingRoot)?;
        let leaf = chain.remove(0);
        Self::new(leaf, chain, vec![root])
    }

    /// The workload's own certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.leaf
    }

    /// Certificates between the leaf and a root, leaf side first.
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.intermediates
    }

    /// The trust anchors peers' certificates are checked against.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// What a peer is sent in the handshake: the leaf, then the intermediates.
    pub fn presented(&self) -> Vec<CertificateDer<'static>> {
        std::iter::once(self.leaf.clone())
            .chain(self.intermediates.iter().cloned())
            .collect()
    }
}

/// A chain without a trust anchor (a CA's answer that lacks its root).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the CA answered without a root certificate")]
pub struct MissingRoot;

/// A fresh ECDSA P-256 key for `identity`.
pub fn generate_key(identity: &Identity) -> Result<KeyPair, IdentityError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| IdentityError::KeyGen {
        identity: identity.clone(),
        source,
    })
}

/// A PKCS#10 request for `identity` (URI SAN only, no subject) signed with `key`.
pub fn certificate_request(
    identity: &Identity,
    key: &KeyPair,
) -> Result<CertificateSigningRequestDer<'static>, IdentityError> {
    let err = |source| IdentityError::Csr {
        identity: identity.clone(),
        source,
    };
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = rcgen::string::Ia5String::try_from(identity.to_string()).map_err(err)?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params.serialize_request(key).map_err(err)?;
    Ok(csr.der().clone())
}

/// Why a peer's (or our own) certificate does not name one SPIFFE identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SanError {
    #[error("not a parsable X.509 certificate")]
    Unparsable,
    #[error("no SPIFFE URI SAN")]
    NoSpiffeId,
    #[error("more than one SPIFFE URI SAN: {0:?}")]
    SeveralSpiffeIds(Vec<String>),
    #[error("{0:?} is not of the form spiffe://<td>/ns/<ns>/sa/<sa>")]
    NotIstioShaped(String),
}

/// The one SPIFFE identity a certificate's URI SAN names.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, SanError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|_| SanError::Unparsable)?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|_| SanError::Unparsable)?;
    let spiffe: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
                Some(*uri)
            }
            _ => None,
        })
        .collect();
    match spiffe.as_slice() {
        [] => Err(SanError::NoSpiffeId),
        [one] => one
            .parse()
            .map_err(|_| SanError::NotIstioShaped((*one).to_owned())),
        many => Err(SanError::SeveralSpiffeIds(
            many.iter().map(|s| (*s).to_owned()).collect(),
        )),
    }
}

/// What may be shown about a certificate (metrics, `/config_dump`): never key material.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertInfo {
    /// The URI SAN, `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub identity: String,
    /// Serial number, hex.
    pub serial: String,
    /// Issuer's distinguished name.
    pub issuer: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// Number of trust anchors that came with it.
    pub roots: usize,
}

impl CertInfo {
    /// Seconds until the certificate expires (negative once it has), for a gauge.
    pub fn seconds_to_expiry(&self, now: SystemTime) -> i64 {
        (self.not_after - OffsetDateTime::from(now)).whole_seconds()
    }
}

/// A workload certificate, its private key and the mesh roots it came with: everything one
/// side of an HBONE handshake needs. Immutable; rotation makes a new one.
pub struct WorkloadCert {
    identity: Identity,
    certified_key: Arc<CertifiedKey>,
    /// The chain and the key (PKCS#8 DER) as issued, to carry them to a successor agent.
    chain: CertChain,
    key_pkcs8: Arc<[u8]>,
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    info: CertInfo,
    received_at: SystemTime,
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("WorkloadCert")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl WorkloadCert {
    /// Pairs a signed chain with its key, checking that the leaf names exactly `identity` and
    /// belongs to `key`.
    pub fn new(identity: Identity, chain: CertChain, key: &KeyPair) -> Result<Self, IdentityError> {
        let bad = |message: String| IdentityError::BadCertificate {
            identity: identity.clone(),
            message,
        };
        let named = identity_of(chain.leaf()).map_err(|e| bad(e.to_string()))?;
        if named != identity {
            return Err(bad(format!("its URI SAN names {named}")));
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(chain.leaf())
            .map_err(|e| bad(format!("not parsable: {e}")))?;
        let info = CertInfo {
            identity: identity.to_string(),
            serial: parsed.raw_serial_as_string(),
            issuer: parsed.issuer().to_string(),
            not_before: parsed.validity().not_before.to_datetime(),
            not_after: parsed.validity().not_after.to_datetime(),
            roots: chain.roots().len(),
        };
        let provider = crypto_provider();
        let key_pkcs8: Arc<[u8]> = key.serialize_der().into();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.to_vec()));
        let certified_key =
            CertifiedKey::from_der(chain.presented(), key_der, &provider).map_err(|source| {
                IdentityError::Key {
                    identity: identity.clone(),
                    source: Box::new(source),
                }
            })?;
        let mut roots = RootCertStore::empty();
        for (i, root) in chain.roots().iter().enumerate() {
            roots
                .add(root.clone())
                .map_err(|e| bad(format!("root {i} is not a usable trust anchor: {e}")))?;
        }
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider).build()?;
        Ok(Self {
            identity,
            certified_key: Arc::new(certified_key),
            chain,
            key_pkcs8,
            roots,
            client_verifier,
            info,
            received_at: SystemTime::now(),
        })
    }

    /// The identity this certificate proves.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Subject, serial and validity (no key material).
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// The chain and signing key, as rustls presents them.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified_key
    }

    /// The leaf certificate (DER).
    pub fn leaf(&self) -> &CertificateDer<'static> {
        self.chain.leaf()
    }

    /// The mesh roots peers are checked against.
    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    /// The chain as issued: leaf, intermediates and roots.
    pub fn chain(&self) -> &CertChain {
        &self.chain
    }

    /// The private key, PKCS#8 DER (only to carry it to a successor agent).
    pub(crate) fn key_pkcs8(&self) -> &[u8] {
        &self.key_pkcs8
    }

    /// When the certificate was received from the CA.
    pub fn received_at(&self) -> SystemTime {
        self.received_at
    }

    /// The same certificate, received at `at` (a successor agent continues the renewal plan
    /// of the agent that received it).
    pub(crate) fn received(mut self, at: SystemTime) -> Self {
        self.received_at = at;
        self
    }

    /// Chain and validity checks of a client certificate against [`Self::roots`].
    pub(crate) fn client_verifier(&self) -> &Arc<dyn rustls::server::danger::ClientCertVerifier> {
        &self.client_verifier
    }

    /// When the certificate is renewed: half-way through its lifetime, counted from when it
    /// was received (or from `notBefore` if that is later), so that a CA backdating
    /// `notBefore` for clock skew does not make short-lived certificates renew at once.
    pub fn refresh_at(&self) -> SystemTime {
        let start = OffsetDateTime::from(self.received_at).max(self.info.not_before);
        if self.info.not_after <= start {
            return SystemTime::from(start);
        }
        let half = (self.info.not_after - start) / 2;
        SystemTime::from(start + half)
    }

    /// How long from `now` until [`Self::refresh_at`] (zero if already past).
    pub fn refresh_in(&self, now: SystemTime) -> Duration {
        self.refresh_at()
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    }
}

/// A live view of one identity's current certificate. TLS configurations hold one and read it
/// on every handshake, so a rotation takes effect for the next handshake while established
/// connections carry on with the keys they negotiated.
#[derive(Clone)]
pub struct CertHandle(watch::Receiver<Arc<WorkloadCert>>);

impl fmt::Debug for CertHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CertHandle")
            .field(&self.0.borrow().info)
            .finish()
    }
}

impl CertHandle {
    /// A handle on a certificate that never changes (tests, tools).
    pub fn fixed(cert: WorkloadCert) -> Self {
        let (_tx, rx) = watch::channel(Arc::new(cert));
        Self(rx)
    }

    pub(crate) fn from_receiver(rx: watch::Receiver<Arc<WorkloadCert>>) -> Self {
        Self(rx)
    }

    /// The certificate in force now.
    pub fn current(&self) -> Arc<WorkloadCert> {
        self.0.borrow().clone()
    }

    /// Waits for the next rotation; `None` once the certificate can no longer change.
    pub async fn changed(&mut self) -> Option<Arc<WorkloadCert>> {
        self.0.changed().await.ok()?;
        Some(self.0.borrow_and_update().clone())
    }
}

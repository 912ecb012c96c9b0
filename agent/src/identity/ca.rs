//! Certificate authorities: the seam ([`CaSource`]) and the CA built into the agent
//! ([`BuiltinCa`]).
//!
//! A CA signs a certificate request for a workload identity and answers with a chain whose
//! roots are the mesh's trust anchors, the same contract as Istio's
//! `IstioCertificateService/CreateCertificate` (whose answer ends with the root).
use std::{
    fmt, io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use futures::future::BoxFuture;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, pem::PemObject};
use time::OffsetDateTime;

use super::{
    IdentityConfig, IdentityError, WorkloadCert,
    cert::{CertChain, MissingRoot},
};
use crate::state::Identity;

/// How far back a new workload certificate's `notBefore` is set, so that a peer whose clock is
/// a little behind does not refuse it as not yet valid.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);
/// Lifetime of a root the agent makes for itself.
const GENERATED_ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// What a workload asks a CA for.
#[derive(Clone, Debug)]
pub struct SignRequest<'a> {
    /// The identity the agent vouches for (it knows the pod's service account).
    pub identity: &'a Identity,
    /// PKCS#10 request carrying the workload's public key.
    pub csr: CertificateSigningRequestDer<'a>,
    /// Requested lifetime; a CA may grant less.
    pub ttl: Duration,
}

/// A certificate authority the [`SecretManager`](super::SecretManager) asks for workload
/// certificates: the built-in one, or (later) Istio's CA over gRPC.
pub trait CaSource: fmt::Debug + Send + Sync {
    /// Signs `request`'s key for its identity.
    fn sign<'a>(&'a self, request: SignRequest<'a>) -> BoxFuture<'a, Result<CertChain, CaError>>;

    /// The mesh roots this CA signs under, when it knows them: a certificate carried over from
    /// a previous agent is served only if its chain holds one of them. Empty: not checked.
    fn trust_anchors(&self) -> Vec<CertificateDer<'static>> {
        Vec::new()
    }
}

/// Why a CA could not be set up or could not sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "identity.rootCertFile and identity.rootKeyFile go together: set both, or neither for a \
         throw-away root"
    )]
    HalfConfigured,
    #[error("root key {origin}: {source}")]
    RootKey {
        origin: String,
        source: rcgen::Error,
    },
    #[error("root certificate {origin}: {message}")]
    RootCert { origin: String, message: String },
    #[error("making a root certificate: {0}")]
    Generate(rcgen::Error),
    #[error("certificate request for {identity}: {source}")]
    Csr {
        identity: Identity,
        source: rcgen::Error,
    },
    #[error("{identity} is outside this CA's trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        identity: Identity,
        trust_domain: String,
    },
    #[error("signing a certificate for {identity}: {source}")]
    Sign {
        identity: Identity,
        source: rcgen::Error,
    },
    #[error("the CA answered without a root certificate")]
    NoRoot,
    #[error("CA unavailable: {0}")]
    Unavailable(String),
    #[error("spec.identity.{field}: {message}")]
    Config {
        field: &'static str,
        message: String,
    },
    #[error("ServiceAccount token {path}: {message}")]
    Token { path: PathBuf, message: String },
    #[error("the CA refused ({code:?}): {message}")]
    Refused {
        code: super::ca_wire::GrpcCode,
        message: String,
    },
    #[error("the CA's answer: {0}")]
    Protocol(String),
}

impl From<MissingRoot> for CaError {
    fn from(_: MissingRoot) -> Self {
        Self::NoRoot
    }
}

/// The CA built into the agent: one ECDSA P-256 root (loaded from PEM files, or made for a
/// local run) that signs workload certificates directly.
pub struct BuiltinCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
}

impl fmt::Debug for BuiltinCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("BuiltinCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// A certificate with any identity and validity window, for tests that need certificates a
/// correct CA would not hand out (expired, not yet valid, foreign trust domain).
#[derive(Clone, Debug)]
pub struct CustomCert {
    pub identity: Identity,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl BuiltinCa {
    /// A fresh self-signed root for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "Sluice mesh root");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = OffsetDateTime::from(now - CLOCK_SKEW_ALLOWANCE);
        params.not_after = OffsetDateTime::from(now + GENERATED_ROOT_LIFETIME);
        let root = params.self_signed(&key).map_err(CaError::Generate)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            issuer: Issuer::new(params, key),
            root: root.der().clone(),
        })
    }

    /// A CA from a PEM root certificate and its PEM (PKCS#8) key; `origin` names them in errors.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        trust_domain: &str,
        origin: &str,
    ) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|source| CaError::RootKey {
            origin: origin.to_owned(),
            source,
        })?;
        let bad = |message: String| CaError::RootCert {
            origin: origin.to_owned(),
            message,
        };
        let root = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| bad(format!("no PEM certificate: {e}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&root)
            .map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(bad("is not a CA certificate (basicConstraints cA)".into()));
        }
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad("does not belong to the key".into()));
        }
        let issuer = Issuer::from_ca_cert_der(&root, key)
            .map_err(|e| bad(format!("unusable as issuer: {e}")))?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            issuer,
            root,
        })
    }

    /// A CA from PEM files.
    pub fn load(cert_path: &Path, key_path: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CaError::Read {
                path: path.into(),
                source,
            })
        };
        let cert = read(cert_path)?;
        let key = read(key_path)?;
        let origin = format!("{} / {}", cert_path.display(), key_path.display());
        Self::from_pem(&cert, &key, trust_domain, &origin)
    }

    /// The CA the configuration asks for: its files, or a throw-away root when it names none.
    pub fn from_config(config: &IdentityConfig, trust_domain: &str) -> Result<Self, CaError> {
        match (&config.root_cert_file, &config.root_key_file) {
            (Some(cert), Some(key)) => Self::load(cert, key, trust_domain),
            (None, None) => {
                tracing::warn!(
                    target: "sluice::identity",
                    trust_domain,
                    "no identity.rootCertFile: using a throw-away root; agents on other nodes \
                     will not trust this one"
                );
                Self::generate(trust_domain)
            }
            _ => Err(CaError::HalfConfigured),
        }
    }

    /// The root certificate and its private key (PKCS#8), both PEM.
    pub fn root_pem_pair(&self) -> (String, String) {
        (self.root_pem(), self.issuer.key().serialize_pem())
    }

    /// Writes the root certificate and key as PEM (the key readable by the owner only), for
    /// other agents or a test harness to load.
    pub fn write_pem_files(&self, cert_path: &Path, key_path: &Path) -> Result<(), CaError> {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        let write = |path: &Path, mode: u32, text: &str| {
            let err = |source| CaError::Write {
                path: path.into(),
                source,
            };
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(path)
                .map_err(err)?;
            f.write_all(text.as_bytes()).map_err(err)
        };
        let (cert, key) = self.root_pem_pair();
        write(key_path, 0o600, &key)?;
        write(cert_path, 0o644, &cert)
    }

    /// The trust domain this CA signs for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate.
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// The root certificate as PEM.
    pub fn root_pem(&self) -> String {
        let pem = pem::Pem::new("CERTIFICATE", self.root.to_vec());
        pem::encode_config(
            &pem,
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        )
    }

    /// Signs `request` now. The request's own names are ignored: the certificate carries the
    /// identity the caller vouched for, and only the request's public key is used.
    pub fn sign_now(&self, request: &SignRequest<'_>) -> Result<CertChain, CaError> {
        let identity = request.identity;
        if identity.trust_domain != self.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                identity: identity.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let csr = CertificateSigningRequestParams::from_der(&request.csr).map_err(|source| {
            CaError::Csr {
                identity: identity.clone(),
                source,
            }
        })?;
        let now = SystemTime::now();
        self.sign_key(
            identity,
            &csr.public_key,
            now - CLOCK_SKEW_ALLOWANCE,
            now + request.ttl,
        )
    }

    fn sign_key(
        &self,
        identity: &Identity,
        key: &impl PublicKeyData,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<CertChain, CaError> {
        let sign_err = |source| CaError::Sign {
            identity: identity.clone(),
            source,
        };
        let mut params = CertificateParams::default();
        // Like Istio's workload certificates: no subject, the identity is the (critical) URI SAN.
        params.distinguished_name = DistinguishedName::new();
        let uri = rcgen::string::Ia5String::try_from(identity.to_string()).map_err(sign_err)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        let cert = params.signed_by(key, &self.issuer).map_err(sign_err)?;
        Ok(CertChain::new(
            cert.der().clone(),
            vec![],
            vec![self.root.clone()],
        )?)
    }

    /// A certificate (and its fresh key) for any identity and validity window, signed by this
    /// root; see [`CustomCert`].
    pub fn issue_custom(&self, spec: &CustomCert) -> Result<WorkloadCert, IdentityError> {
        let key = super::cert::generate_key(&spec.identity)?;
        let chain = self.sign_key(&spec.identity, &key, spec.not_before, spec.not_after)?;
        WorkloadCert::new(spec.identity.clone(), chain, &key)
    }

    /// A TLS server certificate for `names` (DNS names or IP addresses) signed by this root,
    /// with its fresh key (PKCS#8 DER): how the CA service proves itself to agents that trust
    /// the mesh root, as istiod does on port 15012.
    pub fn issue_serving(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, Vec<u8>), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(CaError::Generate)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, self.trust_domain.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = OffsetDateTime::from(now - CLOCK_SKEW_ALLOWANCE);
        params.not_after = OffsetDateTime::from(now + lifetime);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Generate)?;
        Ok((
            vec![cert.der().clone(), self.root.clone()],
            key.serialize_der(),
        ))
    }
}

impl CaSource for BuiltinCa {
    fn sign<'a>(&'a self, request: SignRequest<'a>) -> BoxFuture<'a, Result<CertChain, CaError>> {
        Box::pin(async move { self.sign_now(&request) })
    }

    fn trust_anchors(&self) -> Vec<CertificateDer<'static>> {
        vec![self.root().clone()]
    }
}

#[cfg(test)]
mod tests {
    use x509_parser::{extensions::GeneralName, prelude::FromDer};

    use super::*;
    use crate::identity::cert::{SanError, certificate_request, generate_key, identity_of};

    const TD: &str = "cluster.local";
    const HOUR: Duration = Duration::from_secs(3600);

    fn sign(ca: &BuiltinCa, identity: &Identity, csr_for: &Identity) -> CertChain {
        let key = generate_key(csr_for).unwrap();
        let csr = certificate_request(csr_for, &key).unwrap();
        ca.sign_now(&SignRequest {
            identity,
            csr,
            ttl: HOUR,
        })
        .unwrap()
    }

    fn parse<'a>(der: &'a CertificateDer<'_>) -> x509_parser::certificate::X509Certificate<'a> {
        x509_parser::certificate::X509Certificate::from_der(der)
            .unwrap()
            .1
    }

    #[test]
    fn workload_certificates_look_like_istios() {
        let ca = BuiltinCa::generate(TD).unwrap();
        let web = Identity::new(TD, "shop", "web");
        let chain = sign(&ca, &web, &web);
        assert_eq!(chain.roots(), std::slice::from_ref(ca.root()));
        let cert = parse(chain.leaf());
        assert_eq!(
            cert.subject().iter().count(),
            0,
            "workload certs have no subject"
        );
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "SAN must be critical with an empty subject");
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://cluster.local/ns/shop/sa/web")]
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!cert.is_ca());
        let root = parse(ca.root());
        cert.verify_signature(Some(root.public_key())).unwrap();
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(
            lifetime,
            (HOUR + CLOCK_SKEW_ALLOWANCE).as_secs() as i64,
            "ttl plus the backdated notBefore"
        );
    }

    #[test]
    fn the_ca_signs_the_vouched_identity_not_the_requested_one() {
        let ca = BuiltinCa::generate(TD).unwrap();
        let web = Identity::new(TD, "shop", "web");
        let admin = Identity::new(TD, "kube-system", "admin");
        let chain = sign(&ca, &web, &admin);
        assert_eq!(identity_of(chain.leaf()), Ok(web));
    }

    #[test]
    fn foreign_trust_domains_are_not_signed() {
        let ca = BuiltinCa::generate(TD).unwrap();
        let other = Identity::new("other.td", "shop", "web");
        let key = generate_key(&other).unwrap();
        let csr = certificate_request(&other, &key).unwrap();
        let err = ca
            .sign_now(&SignRequest {
                identity: &other,
                csr,
                ttl: HOUR,
            })
            .unwrap_err();
        assert!(matches!(err, CaError::ForeignTrustDomain { .. }), "{err}");
    }

    #[test]
    fn root_round_trips_through_pem_files() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("root.pem"), dir.path().join("key.pem"));
        let ca = BuiltinCa::generate(TD).unwrap();
        ca.write_pem_files(&cert_path, &key_path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let config = IdentityConfig {
            root_cert_file: Some(cert_path.clone()),
            root_key_file: Some(key_path.clone()),
            ..Default::default()
        };
        let loaded = BuiltinCa::from_config(&config, TD).unwrap();
        assert_eq!(loaded.root(), ca.root());
        // What the loaded CA signs verifies against the original root.
        let web = Identity::new(TD, "shop", "web");
        let chain = sign(&loaded, &web, &web);
        parse(chain.leaf())
            .verify_signature(Some(parse(ca.root()).public_key()))
            .unwrap();
        assert_eq!(parse(chain.leaf()).issuer(), parse(ca.root()).subject());
    }

    #[test]
    fn bad_roots_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (a_cert, a_key) = (dir.path().join("a.pem"), dir.path().join("a.key"));
        let (b_cert, b_key) = (dir.path().join("b.pem"), dir.path().join("b.key"));
        BuiltinCa::generate(TD)
            .unwrap()
            .write_pem_files(&a_cert, &a_key)
            .unwrap();
        BuiltinCa::generate(TD)
            .unwrap()
            .write_pem_files(&b_cert, &b_key)
            .unwrap();

        let err = BuiltinCa::load(&a_cert, &b_key, TD).unwrap_err();
        assert!(
            err.to_string().contains("does not belong to the key"),
            "{err}"
        );

        // A workload certificate is no root.
        let ca = BuiltinCa::generate(TD).unwrap();
        let web = Identity::new(TD, "shop", "web");
        let leaf = sign(&ca, &web, &web);
        let leaf_pem = pem::encode(&pem::Pem::new("CERTIFICATE", leaf.leaf().to_vec()));
        let key_pem = std::fs::read_to_string(&a_key).unwrap();
        let err = BuiltinCa::from_pem(&leaf_pem, &key_pem, TD, "leaf").unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");

        let err = BuiltinCa::load(&dir.path().join("missing.pem"), &a_key, TD).unwrap_err();
        assert!(matches!(err, CaError::Read { .. }), "{err}");

        let half = IdentityConfig {
            root_cert_file: Some(a_cert),
            ..Default::default()
        };
        assert!(matches!(
            BuiltinCa::from_config(&half, TD),
            Err(CaError::HalfConfigured)
        ));
    }

    #[test]
    fn istio_chains_end_with_the_root() {
        let [leaf, mid, root] =
            [b"leaf", b"mid_", b"root"].map(|b| CertificateDer::from(b.to_vec()));
        let chain = CertChain::from_istio(vec![leaf.clone(), mid.clone(), root.clone()]).unwrap();
        assert_eq!(
            (chain.leaf(), chain.intermediates(), chain.roots()),
            (&leaf, &[mid.clone()][..], &[root][..])
        );
        assert_eq!(chain.presented(), vec![leaf.clone(), mid]);
        assert!(matches!(
            CertChain::from_istio(vec![leaf.clone()]),
            Err(MissingRoot)
        ));
        assert!(matches!(
            CertChain::new(leaf, vec![], vec![]),
            Err(MissingRoot)
        ));
    }

    #[test]
    fn identity_of_wants_exactly_one_istio_shaped_spiffe_id() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let with_sans = |sans: &[&str]| {
            let mut params = CertificateParams::default();
            params.subject_alt_names = sans
                .iter()
                .map(|s| {
                    if s.contains("://") {
                        SanType::URI(rcgen::string::Ia5String::try_from(*s).unwrap())
                    } else {
                        SanType::DnsName(rcgen::string::Ia5String::try_from(*s).unwrap())
                    }
                })
                .collect();
            params.self_signed(&key).unwrap().der().clone()
        };
        assert_eq!(
            identity_of(&with_sans(&["web.shop.svc"])),
            Err(SanError::NoSpiffeId)
        );
        assert_eq!(
            identity_of(&with_sans(&["https://x/ns/a/sa/b"])),
            Err(SanError::NoSpiffeId)
        );
        assert!(matches!(
            identity_of(&with_sans(&[
                "spiffe://td/ns/a/sa/b",
                "spiffe://td/ns/a/sa/c"
            ])),
            Err(SanError::SeveralSpiffeIds(_))
        ));
        assert!(matches!(
            identity_of(&with_sans(&["spiffe://td/workload/7"])),
            Err(SanError::NotIstioShaped(_))
        ));
        assert_eq!(
            identity_of(&with_sans(&["web.shop.svc", "spiffe://td/ns/a/sa/b"])),
            Ok(Identity::new("td", "a", "b"))
        );
        assert_eq!(
            identity_of(&CertificateDer::from(vec![1, 2, 3])),
            Err(SanError::Unparsable)
        );
    }
}

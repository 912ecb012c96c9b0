//! Certificates carried from a running agent to its successor during an upgrade
//! ([`CarriedCert`]), so that the new process serves what was already issued instead of asking
//! the CA again for every identity on the node at once.
use std::{
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::KeyPair;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use super::{CertChain, IdentityError, WorkloadCert};
use crate::state::Identity;

/// One identity's certificate, chain and key, as PEM; it travels only over the agent's
/// owner-only handover socket.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CarriedCert {
    /// The SPIFFE identity the leaf names.
    pub identity: String,
    /// The leaf, then the intermediates.
    pub chain_pem: String,
    /// The trust anchors it came with.
    pub roots_pem: String,
    /// The private key, PKCS#8.
    pub key_pem: String,
    /// When the certificate was received from the CA, in seconds since the epoch: the
    /// successor renews it when the agent that received it would have.
    pub received_at: u64,
}

impl fmt::Debug for CarriedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("CarriedCert")
            .field("identity", &self.identity)
            .field("received_at", &self.received_at)
            .finish_non_exhaustive()
    }
}

impl CarriedCert {
    /// Packs `cert` for the successor.
    pub fn from_cert(cert: &WorkloadCert) -> Self {
        let pem_of = |tag: &str, der: &[u8]| pem::encode(&pem::Pem::new(tag, der.to_vec()));
        let chain = cert.chain();
        Self {
            identity: cert.identity().to_string(),
            chain_pem: std::iter::once(chain.leaf())
                .chain(chain.intermediates())
                .map(|c| pem_of("CERTIFICATE", c))
                .collect(),
            roots_pem: chain
                .roots()
                .iter()
                .map(|c| pem_of("CERTIFICATE", c))
                .collect(),
            key_pem: pem_of("PRIVATE KEY", cert.key_pkcs8()),
            received_at: cert
                .received_at()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// Unpacks it, with the checks of a freshly issued certificate: the leaf names exactly
    /// this identity and belongs to the key, and the roots are usable trust anchors.
    pub fn into_cert(self) -> Result<WorkloadCert, IdentityError> {
        let identity: Identity =
            self.identity
                .parse()
                .map_err(|_| IdentityError::BadCertificate {
                    identity: Identity::new("invalid", "invalid", "invalid"),
                    message: format!("carried identity {:?} is not a SPIFFE ID", self.identity),
                })?;
        let bad = |message: String| IdentityError::BadCertificate {
            identity: identity.clone(),
            message,
        };
        let certs = |text: &str, what: &str| -> Result<Vec<CertificateDer<'static>>, _> {
            pem::parse_many(text)
                .map_err(|e| bad(format!("carried {what}: {e}")))
                .map(|all| {
                    all.into_iter()
                        .map(|p| CertificateDer::from(p.into_contents()))
                        .collect()
                })
        };
        let mut presented = certs(&self.chain_pem, "chain")?;
        if presented.is_empty() {
            return Err(bad("carried chain is empty".into()));
        }
        let leaf = presented.remove(0);
        let chain = CertChain::new(leaf, presented, certs(&self.roots_pem, "roots")?)
            .map_err(|e| bad(e.to_string()))?;
        let key_der = pem::parse(&self.key_pem)
            .map_err(|e| bad(format!("carried key: {e}")))?
            .into_contents();
        let key =
            KeyPair::try_from(key_der.as_slice()).map_err(|e| bad(format!("carried key: {e}")))?;
        let received_at = UNIX_EPOCH + Duration::from_secs(self.received_at);
        Ok(WorkloadCert::new(identity, chain, &key)?.received(received_at.min(SystemTime::now())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::BuiltinCa;

    fn issued(ca: &BuiltinCa, sa: &str) -> WorkloadCert {
        let now = SystemTime::now();
        ca.issue_custom(&crate::identity::CustomCert {
            identity: Identity::new(ca.trust_domain(), "shop", sa),
            not_before: now,
            not_after: now + Duration::from_secs(3600),
        })
        .expect("issue")
    }

    #[test]
    fn a_carried_certificate_comes_back_the_same() {
        let ca = BuiltinCa::generate("cluster.local").expect("ca");
        let cert = issued(&ca, "cart");
        let back = CarriedCert::from_cert(&cert).into_cert().expect("unpack");
        assert_eq!(back.identity(), cert.identity());
        assert_eq!(back.leaf(), cert.leaf());
        assert_eq!(back.chain(), cert.chain());
        assert_eq!(back.key_pkcs8(), cert.key_pkcs8());
        assert_eq!(back.info().serial, cert.info().serial);
        // Whole seconds: the renewal plan carries over.
        let drift = cert
            .received_at()
            .duration_since(back.received_at())
            .expect("not later");
        assert!(drift < Duration::from_secs(1), "{drift:?}");
    }

    #[test]
    fn a_carried_certificate_must_match_its_identity_and_key() {
        let ca = BuiltinCa::generate("cluster.local").expect("ca");
        let (cart, pay) = (issued(&ca, "cart"), issued(&ca, "pay"));
        let mut renamed = CarriedCert::from_cert(&cart);
        renamed.identity = pay.identity().to_string();
        let err = renamed
            .into_cert()
            .expect_err("another identity")
            .to_string();
        assert!(err.contains("URI SAN"), "{err}");
        let mut wrong_key = CarriedCert::from_cert(&cart);
        wrong_key.key_pem = CarriedCert::from_cert(&pay).key_pem;
        let err = wrong_key.into_cert().expect_err("another key").to_string();
        assert!(err.contains("key"), "{err}");
        let mut garbage = CarriedCert::from_cert(&cart);
        garbage.identity = "not-spiffe".into();
        assert!(garbage.into_cert().is_err());
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let ca = BuiltinCa::generate("cluster.local").expect("ca");
        let carried = CarriedCert::from_cert(&issued(&ca, "cart"));
        let shown = format!("{carried:?}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        assert!(
            shown.contains("spiffe://cluster.local/ns/shop/sa/cart"),
            "{shown}"
        );
    }
}

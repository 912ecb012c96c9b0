//! Where an HTTPS listener's certificates come from: the files `spec.ingress.certificates` names
//! for a Secret, or, in kube mode, the `kubernetes.io/tls` Secret itself (`tls.crt`, `tls.key`),
//! read with the gateway's own ServiceAccount. Node agents never read Secrets; only a gateway
//! does, and only the ones its listeners name.
use std::{
    collections::BTreeMap,
    hash::{Hash, Hasher},
    path::PathBuf,
    sync::Arc,
};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::{config::CertificateFiles, resources::NamespacedName};

/// Why a listener's certificate could not be loaded; each names the Secret.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("Secret {secret}: no entry in spec.ingress.certificates (and not in kube mode)")]
    NotConfigured { secret: String },
    #[error("Secret {secret}: reading {path}: {message}")]
    File {
        secret: String,
        path: PathBuf,
        message: String,
    },
    #[error("Secret {secret}: {source}")]
    Api {
        secret: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {secret}: {message}")]
    Invalid { secret: String, message: String },
}

/// A certificate chain and key, with a fingerprint of the chain (to tell a rotation).
#[derive(Clone, Debug)]
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    pub fingerprint: u64,
}

/// Files by Secret (`namespace/name`), then the API server in kube mode.
#[derive(Clone, Default)]
pub struct CertificateSource {
    files: BTreeMap<String, CertificateFiles>,
    kube: Option<Client>,
}

impl CertificateSource {
    pub fn new(files: BTreeMap<String, CertificateFiles>, kube: Option<Client>) -> Self {
        Self { files, kube }
    }

    /// The certificate of `secret` (`namespace/name`).
    pub async fn load(&self, secret: &str) -> Result<Loaded, CertificateError> {
        if let Some(files) = self.files.get(secret) {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|e| CertificateError::File {
                    secret: secret.to_owned(),
                    path: path.clone(),
                    message: e.to_string(),
                })
            };
            return parse(secret, &read(&files.cert_file)?, &read(&files.key_file)?);
        }
        let Some(client) = &self.kube else {
            return Err(CertificateError::NotConfigured {
                secret: secret.to_owned(),
            });
        };
        let invalid = |message: String| CertificateError::Invalid {
            secret: secret.to_owned(),
            message,
        };
        let name =
            NamespacedName::parse(secret).ok_or_else(|| invalid("not a namespace/name".into()))?;
        let api: Api<Secret> = Api::namespaced(client.clone(), name.namespace);
        let object = api
            .get(name.name)
            .await
            .map_err(|source| CertificateError::Api {
                secret: secret.to_owned(),
                source,
            })?;
        let data = object.data.unwrap_or_default();
        let field = |key: &str| {
            data.get(key)
                .map(|b| b.0.as_slice())
                .ok_or_else(|| invalid(format!("has no data.{key} (a kubernetes.io/tls Secret)")))
        };
        parse(secret, field("tls.crt")?, field("tls.key")?)
    }
}

/// A PEM chain and key as rustls serves them.
fn parse(secret: &str, chain: &[u8], key: &[u8]) -> Result<Loaded, CertificateError> {
    let invalid = |message: String| CertificateError::Invalid {
        secret: secret.to_owned(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(format!("tls.crt: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("tls.crt holds no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| invalid(format!("tls.key: {e}")))?;
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
        .map_err(|e| invalid(format!("tls.key: {e}")))?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for c in &certs {
        c.as_ref().hash(&mut h);
    }
    Ok(Loaded {
        key: Arc::new(CertifiedKey::new(certs, signer)),
        fingerprint: h.finish(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem() -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["web.example.com".into()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_chain_and_key_parse_and_bad_ones_name_the_secret() {
        let (cert, key) = pem();
        let loaded = parse("web/cert", cert.as_bytes(), key.as_bytes()).expect("parses");
        assert_eq!(loaded.key.cert.len(), 1);
        let (other, _) = pem();
        let again = parse("web/cert", other.as_bytes(), key.as_bytes());
        // A different chain has another fingerprint (the key does not match it either, which
        // rustls checks when it serves; here only the fingerprint matters).
        assert_ne!(again.map(|l| l.fingerprint).ok(), Some(loaded.fingerprint));
        let err = parse("web/cert", b"", key.as_bytes()).expect_err("empty chain");
        assert_eq!(
            err.to_string(),
            "Secret web/cert: tls.crt holds no certificate"
        );
        let err = parse("web/cert", cert.as_bytes(), b"junk").expect_err("no key");
        assert!(
            err.to_string().starts_with("Secret web/cert: tls.key"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn without_files_or_kube_a_secret_is_not_configured() {
        let err = CertificateSource::default()
            .load("web/cert")
            .await
            .expect_err("nowhere to read");
        assert!(
            matches!(err, CertificateError::NotConfigured { .. }),
            "{err}"
        );
    }
}

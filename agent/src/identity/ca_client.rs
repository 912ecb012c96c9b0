//! [`RemoteCa`]: a [`CaSource`] that asks a CA service for certificates over Istio's
//! certificate API (gRPC over TLS, HTTP/2), authenticated by the agent's projected
//! ServiceAccount token. The same client talks to `sluice ca` and to istiod on port 15012.
//!
//! Per request, as Istio's node proxies do: `authorization: Bearer <token>` (the token file is
//! read again each time, since the kubelet rotates it), `ClusterID` metadata, the CSR in PEM,
//! the lifetime in seconds, and `ImpersonatedIdentity` in the metadata when the identity asked
//! for is not the token's own ServiceAccount.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};

use super::{
    CaError, CaSource, CertChain, IdentityConfig, SignRequest,
    ca_wire::{
        CLUSTER_ID_HEADER, CREATE_CERTIFICATE_PATH, CertificateRequest, CertificateResponse,
        GrpcCode, IMPERSONATED_IDENTITY, frame, unframe,
    },
    cert::identity_of,
};
use crate::{config::ca_host_port, state::Identity};

/// How long one certificate request may take, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// A CA service reached over the network; see the module documentation.
pub struct RemoteCa {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    token_file: PathBuf,
    audience: String,
    cluster_id: String,
    /// The roots the CA's TLS certificate is checked against: the mesh roots too (istiod's
    /// `istio-ca-root-cert`, `sluice ca`'s `sluice-ca-root-cert`).
    roots: Vec<CertificateDer<'static>>,
    conn: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl std::fmt::Debug for RemoteCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteCa")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("token_file", &self.token_file)
            .finish_non_exhaustive()
    }
}

impl RemoteCa {
    /// A client for `config.ca_address`, trusting `config.ca_root_file` for the CA's TLS
    /// certificate. Nothing is sent until the first request.
    pub fn from_config(config: &IdentityConfig) -> Result<Self, CaError> {
        let address = config.ca_address.as_deref().unwrap_or_default();
        let (host, port) = ca_host_port(address).ok_or_else(|| CaError::Config {
            field: "caAddress",
            message: format!("{address:?} is not https://host:port or host:port"),
        })?;
        let root_file = config.ca_root_file.as_deref().ok_or(CaError::Config {
            field: "caRootFile",
            message: "required with caAddress".into(),
        })?;
        let roots = read_roots(root_file)?;
        Self::new(
            host,
            port,
            roots,
            config.token_file.clone(),
            config.token_audience.clone(),
            config.ca_cluster_id.clone(),
        )
    }

    /// A client for `host:port` trusting `roots`, sending the token in `token_file`.
    pub fn new(
        host: String,
        port: u16,
        roots: Vec<CertificateDer<'static>>,
        token_file: PathBuf,
        audience: String,
        cluster_id: String,
    ) -> Result<Self, CaError> {
        let mut store = rustls::RootCertStore::empty();
        for root in roots.iter().cloned() {
            store
                .add(root)
                .map_err(|e| CaError::Unavailable(format!("CA root certificate: {e}")))?;
        }
        // Any TLS version and suite rustls considers safe: istiod is a Go TLS server.
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| CaError::Unavailable(format!("CA TLS configuration: {e}")))?
            .with_root_certificates(store)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let server_name = ServerName::try_from(host.clone()).map_err(|_| CaError::Config {
            field: "caAddress",
            message: format!("{host:?} is not a DNS name or IP address"),
        })?;
        Ok(Self {
            host,
            port,
            server_name,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            token_file,
            audience,
            cluster_id,
            roots,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    /// One `CreateCertificate` call with `token` as the bearer: the CA's chain, or why not.
    pub async fn call(
        &self,
        token: &str,
        request: &CertificateRequest,
    ) -> Result<CertificateResponse, CaError> {
        tokio::time::timeout(CALL_TIMEOUT, self.call_once(token, request))
            .await
            .map_err(|_| CaError::Unavailable(format!("no answer within {CALL_TIMEOUT:?}")))?
    }

    async fn call_once(
        &self,
        token: &str,
        request: &CertificateRequest,
    ) -> Result<CertificateResponse, CaError> {
        let mut sender = self.connection().await?;
        let authority = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let http_request =
            http::Request::post(format!("https://{authority}{CREATE_CERTIFICATE_PATH}"))
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header(http::header::TE, "trailers")
                .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
                .header(CLUSTER_ID_HEADER, &self.cluster_id)
                .body(Full::new(Bytes::from(frame(&request.encode()))))
                .map_err(|e| CaError::Protocol(format!("building the request: {e}")))?;
        let response = sender
            .send_request(http_request)
            .await
            .map_err(|e| CaError::Unavailable(format!("sending the request: {e}")))?;
        let (parts, body) = response.into_parts();
        if parts.status != http::StatusCode::OK {
            return Err(CaError::Protocol(format!("HTTP status {}", parts.status)));
        }
        let collected = body
            .collect()
            .await
            .map_err(|e| CaError::Unavailable(format!("reading the answer: {e}")))?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let bytes = collected.to_bytes();
        // The status comes in the trailers, or in the headers of a trailers-only answer.
        let status = grpc_status(&trailers).or_else(|| grpc_status(&parts.headers));
        match status {
            Some((GrpcCode::Ok, _)) => {}
            Some((code, message)) => return Err(CaError::Refused { code, message }),
            None => return Err(CaError::Protocol("answer without grpc-status".into())),
        }
        let message = unframe(&bytes).map_err(|e| CaError::Protocol(e.to_string()))?;
        CertificateResponse::decode(message).map_err(|e| CaError::Protocol(e.to_string()))
    }

    /// The open HTTP/2 connection, or a new one.
    async fn connection(&self) -> Result<SendRequest<Full<Bytes>>, CaError> {
        let mut slot = self.conn.lock().await;
        if let Some(sender) = slot.as_ref()
            && !sender.is_closed()
        {
            return Ok(sender.clone());
        }
        let unavailable =
            |what: &str, e: &dyn std::fmt::Display| CaError::Unavailable(format!("{what}: {e}"));
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| unavailable(&format!("connecting to {}:{}", self.host, self.port), &e))?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| unavailable("TLS handshake with the CA", &e))?;
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| unavailable("HTTP/2 handshake with the CA", &e))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(target: "sluice::identity", %error, "CA connection ended");
            }
        });
        *slot = Some(sender.clone());
        Ok(sender)
    }

    /// The token, checked for the audience the CA reviews it for.
    fn read_token(&self) -> Result<(String, TokenClaims), CaError> {
        let token = std::fs::read_to_string(&self.token_file)
            .map_err(|source| CaError::Read {
                path: self.token_file.clone(),
                source,
            })?
            .trim()
            .to_owned();
        let claims = TokenClaims::of(&token).ok_or_else(|| CaError::Token {
            path: self.token_file.clone(),
            message: "not a JWT".into(),
        })?;
        if !claims.audiences.contains(&self.audience) {
            return Err(CaError::Token {
                path: self.token_file.clone(),
                message: format!(
                    "its audiences {:?} leave out {:?} (spec.identity.tokenAudience): project the \
                     token with that audience",
                    claims.audiences, self.audience
                ),
            });
        }
        Ok((token, claims))
    }

    async fn sign_remote(&self, request: SignRequest<'_>) -> Result<CertChain, CaError> {
        let identity = request.identity;
        let (token, claims) = self.read_token()?;
        let mut metadata = BTreeMap::new();
        if claims.service_account.as_ref()
            != Some(&(identity.namespace.clone(), identity.service_account.clone()))
        {
            metadata.insert(IMPERSONATED_IDENTITY.to_owned(), identity.to_string());
        }
        let csr = pem::encode_config(
            &pem::Pem::new("CERTIFICATE REQUEST", request.csr.to_vec()),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        );
        let wire = CertificateRequest {
            csr,
            validity_duration: i64::try_from(request.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata,
        };
        let response = self.call(&token, &wire).await?;
        let mut chain = Vec::new();
        for pem_text in &response.cert_chain {
            for cert in CertificateDer::pem_slice_iter(pem_text.as_bytes()) {
                chain.push(cert.map_err(|e| {
                    CaError::Protocol(format!("certificate chain: not PEM certificates: {e}"))
                })?);
            }
        }
        let chain = CertChain::from_istio(chain)?;
        match identity_of(chain.leaf()) {
            Ok(got) if &got == identity => Ok(chain),
            Ok(got) => Err(CaError::Protocol(format!(
                "asked for {identity}, the CA signed {got}"
            ))),
            Err(e) => Err(CaError::Protocol(format!("signed certificate: {e}"))),
        }
    }
}

impl CaSource for RemoteCa {
    fn sign<'a>(&'a self, request: SignRequest<'a>) -> BoxFuture<'a, Result<CertChain, CaError>> {
        Box::pin(self.sign_remote(request))
    }

    fn trust_anchors(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }
}

/// The PEM certificates of `path`.
pub fn read_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let text = std::fs::read(path).map_err(|source| CaError::Read {
        path: path.into(),
        source,
    })?;
    let roots: Vec<_> = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<_, _>>()
        .map_err(|e| CaError::RootCert {
            origin: path.display().to_string(),
            message: format!("not PEM certificates: {e}"),
        })?;
    if roots.is_empty() {
        return Err(CaError::RootCert {
            origin: path.display().to_string(),
            message: "holds no certificate".into(),
        });
    }
    Ok(roots)
}

/// What the agent reads from its own token (unverified: the CA verifies it).
#[derive(Debug, Default, PartialEq, Eq)]
struct TokenClaims {
    audiences: Vec<String>,
    /// Namespace and name from `sub` = `system:serviceaccount:<ns>:<name>`.
    service_account: Option<(String, String)>,
}

impl TokenClaims {
    fn of(token: &str) -> Option<Self> {
        use base64::Engine;
        let payload = token.split('.').nth(1)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()?;
        let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        let audiences = match &value["aud"] {
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(list) => list
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect(),
            _ => vec![],
        };
        let service_account = value["sub"]
            .as_str()
            .and_then(|s| s.strip_prefix("system:serviceaccount:"))
            .and_then(|s| s.split_once(':'))
            .map(|(ns, name)| (ns.to_owned(), name.to_owned()));
        Some(Self {
            audiences,
            service_account,
        })
    }
}

/// The `grpc-status` and decoded `grpc-message` of a header map, if it has a status.
fn grpc_status(headers: &http::HeaderMap) -> Option<(GrpcCode, String)> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some((GrpcCode::from_number(code), message))
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `s` as a `grpc-message` value: printable ASCII except `%` as is, the rest percent-encoded.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The identity a token's ServiceAccount has under `trust_domain`.
pub fn token_identity(token: &str, trust_domain: &str) -> Option<Identity> {
    let (ns, sa) = TokenClaims::of(token)?.service_account?;
    Some(Identity::new(trust_domain, &ns, &sa))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mesh_roots_it_trusts_are_its_trust_anchors() {
        let ca = crate::identity::BuiltinCa::generate("cluster.local").expect("root");
        let remote = RemoteCa::new(
            "sluice-ca.sluice-system.svc".into(),
            15012,
            vec![ca.root().clone()],
            "/nonexistent/token".into(),
            "istio-ca".into(),
            "Kubernetes".into(),
        )
        .expect("client");
        // Carried certificates are checked against these (SecretManager::adopt).
        assert_eq!(remote.trust_anchors(), vec![ca.root().clone()]);
    }

    fn jwt(payload: &str) -> String {
        use base64::Engine;
        let enc = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            enc.encode(r#"{"alg":"RS256"}"#),
            enc.encode(payload)
        )
    }

    #[test]
    fn token_claims_read_audiences_and_service_account() {
        let t = jwt(r#"{"aud":["istio-ca"],"sub":"system:serviceaccount:sluice-system:sluice"}"#);
        assert_eq!(
            TokenClaims::of(&t),
            Some(TokenClaims {
                audiences: vec!["istio-ca".into()],
                service_account: Some(("sluice-system".into(), "sluice".into())),
            })
        );
        let t = jwt(r#"{"aud":"x","sub":"admin"}"#);
        assert_eq!(TokenClaims::of(&t).unwrap().audiences, ["x"]);
        assert_eq!(TokenClaims::of(&t).unwrap().service_account, None);
        assert_eq!(TokenClaims::of("opaque-token"), None);
    }

    #[test]
    fn grpc_messages_survive_percent_encoding() {
        let text = "pod shop/web-1 is on node-b, not node-a: 100% refused ✓";
        let encoded = percent_encode(text);
        assert!(
            encoded.is_ascii() && encoded.contains("100%25 refused"),
            "{encoded}"
        );
        assert_eq!(percent_decode(&encoded), text);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}

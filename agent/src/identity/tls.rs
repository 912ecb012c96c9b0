//! rustls configurations for HBONE, as a ztunnel peer speaks it: TLS 1.3 only, AES-GCM suites
//! only, ALPN `h2`, client and server certificates both required, no SNI.
//!
//! - The server checks the client chain against the mesh roots and its validity window, and
//!   that its one SPIFFE URI SAN lies in the mesh's trust domain.
//! - The client checks the server chain the same way and wants the SAN to be exactly one of the
//!   identities the destination is expected to have.
//!
//! Both sides read the local certificate through a [`CertHandle`] on every handshake, so a
//! rotation reaches new handshakes without touching established connections.
//!
//! The crypto provider is [`crypto_provider`](super::crypto_provider).
//!
//! Session resumption is off on both sides: every connection proves its certificate afresh, so
//! an expired or rotated-away peer certificate is never carried forward by a ticket.
use std::sync::Arc;

use rustls::{
    ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName, ServerConfig,
    SignatureScheme,
    client::{
        ResolvesClientCert, Resumption,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::WebPkiSupportedAlgorithms,
    server::{
        ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{
    CertHandle, IdentityError,
    cert::identity_of,
    provider::{crypto_provider, crypto_provider_for},
};
use crate::{config::KeyExchange, state::Identity};

/// The ALPN protocol HBONE negotiates.
pub const HBONE_ALPN: &[u8] = b"h2";

fn algorithms() -> WebPkiSupportedAlgorithms {
    crypto_provider().signature_verification_algorithms
}

/// The inbound (port 15008) side: presents `cert`'s current certificate, requires a client
/// certificate from the mesh. Default key exchange policy.
pub fn server_config(cert: CertHandle) -> Result<ServerConfig, IdentityError> {
    server_config_with(cert, KeyExchange::Default)
}

/// [`server_config`] accepting the key exchange groups of `policy`.
pub fn server_config_with(
    cert: CertHandle,
    policy: KeyExchange,
) -> Result<ServerConfig, IdentityError> {
    let verifier = Arc::new(MeshClientVerifier {
        cert: cert.clone(),
        algorithms: algorithms(),
    });
    let mut config = ServerConfig::builder_with_provider(crypto_provider_for(policy))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CurrentCert(cert)));
    config.alpn_protocols = vec![HBONE_ALPN.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The outbound side: presents the source workload's certificate (`source`) and accepts only a
/// server whose SAN is one of `expected`. Sends no SNI; the server name given to the connector
/// is not checked (pass the destination IP). Default key exchange policy.
pub fn client_config(
    source: CertHandle,
    expected: Vec<Identity>,
) -> Result<ClientConfig, IdentityError> {
    client_config_with(source, expected, KeyExchange::Default)
}

/// [`client_config`] offering the key exchange groups of `policy`.
pub fn client_config_with(
    source: CertHandle,
    expected: Vec<Identity>,
    policy: KeyExchange,
) -> Result<ClientConfig, IdentityError> {
    if expected.is_empty() {
        return Err(IdentityError::NoExpectedIdentity);
    }
    let verifier = Arc::new(MeshServerVerifier {
        cert: source.clone(),
        expected,
        algorithms: algorithms(),
    });
    let mut config = ClientConfig::builder_with_provider(crypto_provider_for(policy))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(CurrentCert(source)));
    config.alpn_protocols = vec![HBONE_ALPN.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// The peer's SPIFFE identity once the handshake is done (its certificate was verified by the
/// configurations above). Works on both `ServerConnection` and `ClientConnection`.
pub fn peer_identity(conn: &CommonState) -> Option<Identity> {
    conn.peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| identity_of(leaf).ok())
}

/// What a completed TLS handshake agreed on, for log lines (`tls.group`, `tls.cipher_suite`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NegotiatedTls {
    /// The key exchange group: `X25519MLKEM768`, `X25519`, … (empty before a handshake).
    pub group: String,
    /// The cipher suite: `TLS13_AES_128_GCM_SHA256`, …
    pub cipher_suite: String,
}

impl NegotiatedTls {
    /// What `conn`'s handshake agreed on. Works on both sides.
    pub fn of(conn: &CommonState) -> Self {
        Self {
            group: conn
                .negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name()))
                .unwrap_or_default(),
            cipher_suite: conn
                .negotiated_cipher_suite()
                .map(|s| format!("{:?}", s.suite()))
                .unwrap_or_default(),
        }
    }
}

/// A sentence saying why a failed HBONE handshake failed when the key exchange policy is the
/// likely cause, for log lines: no group in common (this side refused the peer's offer), or,
/// under `pqc`, the peer's `handshake_failure` alert (it refused the hybrid-only offer). `None`
/// for any other error. Looks through `std::io::Error` wrappers (tokio-rustls's).
pub fn handshake_hint(
    error: &(dyn std::error::Error + 'static),
    policy: KeyExchange,
) -> Option<String> {
    let offered = || {
        super::provider::kx_group_names(policy)
            .iter()
            .map(|g| format!("{g:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(hint) = handshake_hint(inner, policy)
        {
            return Some(hint);
        }
        match e.downcast_ref::<rustls::Error>() {
            Some(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoKxGroupsInCommon)) => {
                return Some(format!(
                    "TLS key exchange: no group in common with the peer (this side allows \
                     {} under spec.tls.keyExchange: {policy})",
                    offered()
                ));
            }
            Some(rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure))
                if policy == KeyExchange::Pqc =>
            {
                return Some(format!(
                    "TLS key exchange: the peer refused the handshake; this side offers only \
                     {} (spec.tls.keyExchange: pqc), which the peer probably does not support",
                    offered()
                ));
            }
            _ => {}
        }
        next = e.source();
    }
    None
}

/// Why a verified chain is still refused.
#[derive(Debug, thiserror::Error)]
enum PeerRefused {
    #[error("peer certificate: {0}")]
    San(#[from] super::cert::SanError),
    #[error("peer identity {peer} is outside the trust domain {trust_domain:?}")]
    TrustDomain {
        peer: Identity,
        trust_domain: String,
    },
    #[error("peer identity {peer} is not the expected {expected}")]
    Unexpected { peer: Identity, expected: String },
}

impl From<PeerRefused> for rustls::Error {
    fn from(e: PeerRefused) -> Self {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(e),
        )))
    }
}

/// Serves the handle's current certificate to every handshake, on either side.
#[derive(Debug)]
struct CurrentCert(CertHandle);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified_key().clone())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified_key().clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Server side: a mesh client certificate is required.
#[derive(Debug)]
struct MeshClientVerifier {
    cert: CertHandle,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Mesh clients have one certificate and send it whatever the hints say.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let local = self.cert.current();
        // Chain to the mesh roots, validity window, clientAuth usage.
        local
            .client_verifier()
            .verify_client_cert(end_entity, intermediates, now)?;
        let peer = identity_of(end_entity).map_err(PeerRefused::from)?;
        let trust_domain = &local.identity().trust_domain;
        if peer.trust_domain != *trust_domain {
            return Err(PeerRefused::TrustDomain {
                peer,
                trust_domain: trust_domain.clone(),
            }
            .into());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Client side: the server must be one of the identities the destination is expected to have.
#[derive(Debug)]
struct MeshServerVerifier {
    cert: CertHandle,
    expected: Vec<Identity>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let local = self.cert.current();
        let parsed = ParsedCertificate::try_from(end_entity)?;
        // Chain to the mesh roots, validity window, serverAuth usage.
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            local.roots(),
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let peer = identity_of(end_entity).map_err(PeerRefused::from)?;
        if !self.expected.contains(&peer) {
            let expected = self
                .expected
                .iter()
                .map(Identity::to_string)
                .collect::<Vec<_>>()
                .join(" or ");
            return Err(PeerRefused::Unexpected { peer, expected }.into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        net::{IpAddr, Ipv4Addr},
        time::{Duration, SystemTime},
    };

    use rustls::{CertificateError, ClientConnection, ServerConnection};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

    use rustls::crypto::{CryptoProvider, aws_lc_rs};

    use super::*;
    use crate::identity::{BuiltinCa, CustomCert};

    const TD: &str = "cluster.local";
    const HOUR: Duration = Duration::from_secs(3600);

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new(TD, ns, sa)
    }

    fn cert_valid(
        ca: &BuiltinCa,
        identity: Identity,
        from: SystemTime,
        to: SystemTime,
    ) -> CertHandle {
        let cert = ca
            .issue_custom(&CustomCert {
                identity,
                not_before: from,
                not_after: to,
            })
            .unwrap();
        CertHandle::fixed(cert)
    }

    fn cert(ca: &BuiltinCa, identity: Identity) -> CertHandle {
        let now = SystemTime::now();
        cert_valid(ca, identity, now - HOUR, now + HOUR)
    }

    type Outcome = (
        io::Result<server::TlsStream<DuplexStream>>,
        io::Result<client::TlsStream<DuplexStream>>,
    );

    async fn handshake(
        server: ServerConfig,
        client: ClientConfig,
        name: ServerName<'static>,
    ) -> Outcome {
        let (s, c) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(Arc::new(server));
        let connector = TlsConnector::from(Arc::new(client));
        tokio::join!(acceptor.accept(s), connector.connect(name, c))
    }

    fn ip_name() -> ServerName<'static> {
        ServerName::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 2)).into())
    }

    /// Handshake between a server presenting `server_cert` and a client presenting
    /// `client_cert` that expects `expected`.
    async fn connect(
        server_cert: CertHandle,
        client_cert: CertHandle,
        expected: Identity,
    ) -> Outcome {
        handshake(
            server_config(server_cert).unwrap(),
            client_config(client_cert, vec![expected]).unwrap(),
            ip_name(),
        )
        .await
    }

    /// A client presenting `presented` but trusting the roots of `trusting`, as a client
    /// with a certificate from elsewhere that knows the mesh root would be.
    fn client_presenting(
        presented: Option<CertHandle>,
        trusting: CertHandle,
        expected: Identity,
    ) -> ClientConfig {
        let verifier = Arc::new(MeshServerVerifier {
            cert: trusting,
            expected: vec![expected],
            algorithms: algorithms(),
        });
        let builder = ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match presented {
            Some(cert) => builder.with_client_cert_resolver(Arc::new(CurrentCert(cert))),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![HBONE_ALPN.to_vec()];
        config
    }

    /// The rustls error inside an I/O error from tokio-rustls.
    fn tls_error(e: &io::Error) -> rustls::Error {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .cloned()
            .unwrap_or_else(|| panic!("not a TLS error: {e:?}"))
    }

    fn certificate_error(e: &io::Error) -> CertificateError {
        match tls_error(e) {
            rustls::Error::InvalidCertificate(c) => c,
            other => panic!("not a certificate error: {other:?}"),
        }
    }

    /// The server refused the client's certificate: the server's accept fails with the
    /// certificate error, and the client, whose side of TLS 1.3 completes first, reads nothing.
    async fn server_refused(outcome: Outcome) -> CertificateError {
        let (server, client) = outcome;
        let error = certificate_error(&server.expect_err("server accepted"));
        if let Ok(mut client) = client {
            let mut buf = [0u8; 1];
            let read = client.read(&mut buf).await;
            assert!(
                matches!(read, Err(_) | Ok(0)),
                "client still got data: {read:?}"
            );
        }
        error
    }

    fn client_refused(outcome: Outcome) -> CertificateError {
        let (server, client) = outcome;
        assert!(
            server.is_err(),
            "server finished a handshake the client refused"
        );
        certificate_error(&client.expect_err("client accepted"))
    }

    fn other_message(e: &CertificateError) -> String {
        match e {
            CertificateError::Other(other) => other.to_string(),
            e => panic!("expected a SPIFFE refusal, got {e:?}"),
        }
    }

    #[tokio::test]
    async fn mutual_handshake_proves_both_identities() {
        let ca = BuiltinCa::generate(TD).unwrap();
        let (a, b) = (id("shop", "web"), id("shop", "db"));
        // A DNS name, to show no SNI is sent even when there is a name to send.
        let name = ServerName::try_from("db.shop.svc").unwrap();
        let (server, client) = handshake(
            server_config(cert(&ca, b.clone())).unwrap(),
            client_config(cert(&ca, a.clone()), vec![b.clone()]).unwrap(),
            name,
        )
        .await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        let s: &ServerConnection = server.get_ref().1;
        let c: &ClientConnection = client.get_ref().1;
        assert_eq!(peer_identity(s), Some(a));
        assert_eq!(peer_identity(c), Some(b));
        assert_eq!(s.server_name(), None, "SNI was sent");
        for conn in [&***s as &CommonState, &***c] {
            assert_eq!(conn.alpn_protocol(), Some(HBONE_ALPN));
            assert_eq!(
                conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            let suite = conn.negotiated_cipher_suite().unwrap().suite();
            assert!(
                matches!(
                    suite,
                    rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                        | rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
                ),
                "{suite:?}"
            );
        }
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }

    #[tokio::test]
    async fn certificates_from_another_root_are_refused_both_ways() {
        let mesh = BuiltinCa::generate(TD).unwrap();
        let stranger = BuiltinCa::generate(TD).unwrap();
        let (a, b) = (id("shop", "web"), id("shop", "db"));

        let server = cert(&mesh, b.clone());
        let client = client_presenting(Some(cert(&stranger, a.clone())), server.clone(), b.clone());
        let e = server_refused(handshake(server_config(server).unwrap(), client, ip_name()).await)
            .await;
        // Same issuer name, other key: the signature does not verify; another name: unknown.
        assert!(
            matches!(
                e,
                CertificateError::UnknownIssuer | CertificateError::BadSignature
            ),
            "{e:?}"
        );

        let e = client_refused(
            connect(
                cert(&stranger, b.clone()),
                cert(&mesh, a.clone()),
                b.clone(),
            )
            .await,
        );
        // Same issuer name, other key: the signature does not verify; another name: unknown.
        assert!(
            matches!(
                e,
                CertificateError::UnknownIssuer | CertificateError::BadSignature
            ),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn client_of_another_trust_domain_is_refused() {
        let ca = BuiltinCa::generate(TD).unwrap();
        let b = id("shop", "db");
        // Same root, foreign trust domain in the SAN.
        let foreign = Identity::new("evil.example", "shop", "web");
        let e = server_refused(connect(cert(&ca, b.clone()), cert(&ca, foreign), b).await).await;
        assert!(
            other_message(&e).contains("outside the trust domain"),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn expired_certificates_are_refused_both_ways() {
        let ca = BuiltinCa::generate(TD).unwrap();
        let (a, b) = (id("shop", "web"), id("shop", "db"));
        let now = SystemTime::now();
        let expired = |who: Identity| cert_valid(&ca, who, now - 2 * HOUR, now - HOUR);
        let expired_error = |e: CertificateError| {
            assert!(
                matches!(
                    e,
                    CertificateError::Expired | CertificateError::ExpiredContext { .. }
                ),
                "{e:?}"
            )
        };

        expired_error(
            server_refused(connect(cert(&ca, b.clone()), expired(a.clone()), b.clone()).await)
                .await,
        );
        expired_error(client_refused(
            connect(expired(b.clone()), cert(&ca, a.clone()), b.clone()).await,
        ));
    }

    #[tokio::test]
    async fn not_yet_valid_certificates_are_refused_both_ways() {
        let ca = BuiltinCa::generate(TD).unwrap();
        let (a, b) = (id("shop", "web"), id("shop", "db"));
        let now = SystemTime::now();
        let future = |who: Identity| cert_valid(&ca, who, now + HOUR, now + 2 * HOUR);
        let future_error = |e: CertificateError| {
            assert!(
                matches!(
                    e,
                    CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }
                ),
                "{e:?}"
            )
        };

        future_error(
            server_refused(connect(cert(&ca, b.clone()), future(a.clone()), b.clone()).await).await,
        );
        future_error(client_refused(
            connect(future(b.clone()), cert(&ca, a.clone()), b.clone()).await,
        ));
    }

    #[tokio::test]
    async fn client_refuses_a_server_with_another_identity() {
        let ca = BuiltinCa::generate(TD).unwrap();
        let (a, b, c) = (id("shop", "web"), id("shop", "db"), id("shop", "cache"));
        let e = client_refused(connect(cert(&ca, c), cert(&ca, a.clone()), b.clone()).await);
        assert!(other_message(&e).contains("is not the expected"), "{e:?}");

        // Any of several expected identities will do.
        let (server, client) = handshake(
            server_config(cert(&ca, b.clone())).unwrap(),
            client_config(cert(&ca, a), vec![id("shop", "cache"), b.clone()]).unwrap(),
            ip_name(),
        )
        .await;
        assert!(server.is_ok());
        assert_eq!(peer_identity(client.unwrap().get_ref().1), Some(b));
    }

    #[tokio::test]
    async fn server_refuses_clients_without_certificate_or_tls13_or_aes_gcm() {
        let ca = BuiltinCa::generate(TD).unwrap();
        let b = id("shop", "db");
        let server = || server_config(cert(&ca, b.clone())).unwrap();
        let roots = cert(&ca, b.clone()).current().roots().clone();
        let plain = |provider: CryptoProvider,
                     versions: &[&'static rustls::SupportedProtocolVersion]| {
            ClientConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth()
        };

        // No client certificate.
        let anonymous = client_presenting(None, cert(&ca, b.clone()), b.clone());
        let (s, _) = handshake(server(), anonymous, ip_name()).await;
        assert!(
            matches!(
                tls_error(&s.unwrap_err()),
                rustls::Error::NoCertificatesPresented
            ),
            "a client without certificate got in"
        );

        // TLS 1.2 only.
        let (s, _) = handshake(
            server(),
            plain(aws_lc_rs::default_provider(), &[&rustls::version::TLS12]),
            ip_name(),
        )
        .await;
        assert!(
            matches!(
                tls_error(&s.unwrap_err()),
                rustls::Error::PeerIncompatible(_)
            ),
            "a TLS 1.2 client got in"
        );

        // ChaCha20 only.
        let mut chacha = aws_lc_rs::default_provider();
        chacha.cipher_suites = vec![aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256];
        let (s, _) = handshake(
            server(),
            plain(chacha, &[&rustls::version::TLS13]),
            ip_name(),
        )
        .await;
        assert!(
            matches!(
                tls_error(&s.unwrap_err()),
                rustls::Error::PeerIncompatible(_)
            ),
            "a ChaCha20-only client got in"
        );
    }

    #[test]
    fn client_config_needs_an_expected_identity() {
        let ca = BuiltinCa::generate(TD).unwrap();
        assert!(matches!(
            client_config(cert(&ca, id("a", "b")), vec![]),
            Err(IdentityError::NoExpectedIdentity)
        ));
    }
}

//! A hand-made HBONE client for tests that need a peer no agent would ever be: one presenting
//! a certificate from another root, another trust domain, or one that has expired. It trusts
//! any server, so that the *server's* checks are what the test observes.
use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
    sign::CertifiedKey,
};
use sluice::{
    config::{H2Limits, PoolLimits},
    identity::{BuiltinCa, CustomCert, WorkloadCert, crypto_provider},
    proxy::hbone::{Baggage, HbonePool, PoolKey, RequestMeta},
    state::Identity,
};
use tokio::io::AsyncBufReadExt;

/// A certificate for `identity` signed by `ca`, valid from `not_before` to `not_after`.
pub fn certificate(
    ca: &BuiltinCa,
    identity: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> WorkloadCert {
    ca.issue_custom(&CustomCert {
        identity: identity.parse().expect("SPIFFE identity"),
        not_before,
        not_after,
    })
    .expect("issue test certificate")
}

/// From inside the network namespace at `netns`, opens HBONE to `hbone` (`<ip>:15008`)
/// presenting `cert`, asks for `authority`, and returns the first line the application behind
/// it sends (the test server announces itself), or the error that stopped it.
pub fn probe(
    netns: &Path,
    cert: WorkloadCert,
    hbone: SocketAddr,
    authority: SocketAddr,
) -> Result<String, String> {
    crate::netns::block_on_at(netns, move || async move {
        let source = cert.identity().clone();
        let tls = Arc::new(trusting_client_config(cert.certified_key().clone()));
        let pool = HbonePool::new(PoolLimits::default(), H2Limits::default());
        let key = PoolKey {
            source,
            destination: hbone,
            // Not checked by this client.
            destination_identity: Identity::new("any", "any", "any"),
        };
        let meta = RequestMeta::new(SocketAddr::new(hbone.ip(), 0), Baggage::default());
        let attempt = async {
            let stream = pool
                .connect(&key, tls, authority, &meta)
                .await
                .map_err(|e| format!("CONNECT: {e}"))?;
            let (recv, _send) = stream.into_split();
            let mut line = String::new();
            tokio::io::BufReader::new(recv)
                .read_line(&mut line)
                .await
                .map_err(|e| format!("reading from the application: {e}"))?;
            if line.is_empty() {
                return Err("the stream ended before the application spoke".to_owned());
            }
            Ok(line)
        };
        tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .map_err(|_| "timed out".to_owned())?
    })?
}

/// TLS 1.3, ALPN `h2`, presenting `key`, trusting every server.
fn trusting_client_config(key: Arc<CertifiedKey>) -> rustls::ClientConfig {
    let provider = crypto_provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TrustAnyServer(provider)))
        .with_client_cert_resolver(Arc::new(Present(key)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.enable_sni = false;
    config
}

/// Presents one fixed certificate as a TLS client.
#[derive(Debug)]
pub(crate) struct Present(pub(crate) Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for Present {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Accepts any server certificate (signatures still checked with the provider's algorithms).
#[derive(Debug)]
pub(crate) struct TrustAnyServer(pub(crate) Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for TrustAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An authenticated peer that feeds applications which never read: what [`flood`] left open.
pub struct Flood {
    /// Bytes the peer's streams managed to write before each one stalled (flow control).
    pub written: u64,
    /// Streams the server answered.
    pub streams: usize,
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<Option<()>>>,
}

impl Flood {
    /// Closes every connection and waits for the peer's thread.
    pub fn stop(mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// From inside `netns`, opens `connections` HBONE connections to `hbone` presenting `cert`,
/// `streams` CONNECT streams to `authority` on each, and writes 64 KiB chunks on every stream
/// until a write has waited `stall` (the server stopped granting window). Returns once every
/// stream has stalled, with the connections held open until [`Flood::stop`] or drop.
pub fn flood(
    netns: &Path,
    cert: WorkloadCert,
    hbone: SocketAddr,
    authority: SocketAddr,
    connections: usize,
    streams: usize,
    stall: Duration,
) -> Result<Flood, String> {
    use tokio::io::AsyncWriteExt;
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Result<(u64, usize), String>>();
    let thread = crate::netns::runtime_thread_at(netns, move || async move {
        let source = cert.identity().clone();
        let tls = Arc::new(trusting_client_config(cert.certified_key().clone()));
        let key = PoolKey {
            source,
            destination: hbone,
            destination_identity: Identity::new("any", "any", "any"),
        };
        let meta = RequestMeta::new(SocketAddr::new(hbone.ip(), 0), Baggage::default());
        // One pool per connection, so that each one is its own HTTP/2 connection.
        let mut pools = Vec::new();
        let mut held = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..connections {
            let pool = HbonePool::new(PoolLimits::default(), H2Limits::default());
            for _ in 0..streams {
                let stream = match tokio::time::timeout(
                    Duration::from_secs(10),
                    pool.connect(&key, tls.clone(), authority, &meta),
                )
                .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        let _ = done_tx.send(Err(format!("CONNECT: {e}")));
                        return;
                    }
                    Err(_) => {
                        let _ = done_tx.send(Err("CONNECT timed out".to_owned()));
                        return;
                    }
                };
                let (recv, mut send) = stream.into_split();
                held.push(recv);
                tasks.spawn(async move {
                    let chunk = vec![0x5a_u8; 64 * 1024];
                    let mut written = 0u64;
                    // Bounded: at most 64 MiB per stream, far beyond any window.
                    for _ in 0..1024 {
                        match tokio::time::timeout(stall, send.write_all(&chunk)).await {
                            Ok(Ok(())) => written += chunk.len() as u64,
                            _ => break,
                        }
                    }
                    (written, send)
                });
            }
            pools.push(pool);
        }
        let mut written = 0;
        let mut sends = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            if let Ok((n, send)) = joined {
                written += n;
                sends.push(send);
            }
        }
        let _ = done_tx.send(Ok((written, sends.len())));
        // Hold everything until told to stop (or the test is gone).
        let _ = tokio::task::spawn_blocking(move || {
            let _ = stopped.recv_timeout(Duration::from_secs(120));
        })
        .await;
        drop((sends, held, pools));
    })?;
    match done_rx.recv_timeout(Duration::from_secs(120)) {
        Ok(Ok((written, streams))) => Ok(Flood {
            written,
            streams,
            stop,
            thread: Some(thread),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => Err("the flood did not stall within 120 s".to_owned()),
    }
}

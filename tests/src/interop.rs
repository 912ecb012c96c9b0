//! A HBONE peer written in the test harness, with its own rustls key exchange policy, to check
//! what a real agent negotiates with peers that are not Sluice (ztunnel's `pqc` compliance mode,
//! or a classic X25519-only stack):
//!
//! - [`PeerServer`]: serves HBONE on `<pod-ip>:15008` inside a pod's network namespace (a pod
//!   whose node runs no agent), records each handshake's group (or why it failed) and each
//!   `CONNECT`'s headers, and splices accepted streams to the application at the authority.
//! - [`connect`]: a client that opens HBONE to an agent, reports the negotiated group and the
//!   first line the application sends back.
//!
//! Both print a line for every failed handshake, as a peer's log would.
use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{HeaderMap, Method, Request, StatusCode};
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use sluice::{
    config::{H2Limits, KeyExchange},
    identity::{NegotiatedTls, WorkloadCert, crypto_provider_for, peer_identity},
    proxy::hbone::{ConnectRequest, ConnectionInfo, HboneServer, Refusal, RefusalStatus, Upstream},
};
use tokio::net::{TcpListener, TcpStream};

use crate::hbone_client::{Present, TrustAnyServer};

/// The key exchange groups a harness peer offers and accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Groups {
    /// Sluice's default: X25519MLKEM768 preferred, classic groups after it.
    Default,
    /// X25519MLKEM768 only (ztunnel's `COMPLIANCE_POLICY=pqc`).
    Pqc,
    /// X25519 only: a stack without post-quantum key exchange.
    Classic,
}

impl Groups {
    /// The rustls crypto provider with these groups (aws-lc-rs, TLS 1.3 AES-GCM suites).
    pub fn provider(self) -> Arc<CryptoProvider> {
        match self {
            Groups::Default => crypto_provider_for(KeyExchange::Default),
            Groups::Pqc => crypto_provider_for(KeyExchange::Pqc),
            Groups::Classic => {
                let mut p = (*crypto_provider_for(KeyExchange::Default)).clone();
                p.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
                Arc::new(p)
            }
        }
    }
}

/// What a [`PeerServer`] saw.
#[derive(Clone, Debug)]
pub enum ServerEvent {
    /// A TLS handshake: the negotiated group's name (`X25519MLKEM768`, `X25519`), or the error.
    Handshake(Result<String, String>),
    /// A `CONNECT` request: the client's certificate identity and the request headers.
    Connect { client: String, headers: HeaderMap },
}

/// A harness HBONE server in a pod's network namespace; stopped when dropped.
pub struct PeerServer {
    events: Arc<Mutex<Vec<ServerEvent>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Option<()>>>,
}

impl PeerServer {
    /// Listens on `listen` inside the network namespace at `netns`, presenting `cert` (and
    /// requiring a client certificate from its roots), with the key exchange groups `groups`.
    pub fn start(netns: &Path, listen: SocketAddr, cert: WorkloadCert, groups: Groups) -> Self {
        let config = Arc::new(server_config(&cert, groups));
        let events: Arc<Mutex<Vec<ServerEvent>>> = Arc::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let recorded = events.clone();
        let thread = crate::netns::runtime_thread_at(netns, move || async move {
            let listener = match TcpListener::bind(listen).await {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("bind {listen}: {e}")));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let serve = async {
                loop {
                    let Ok((tcp, peer)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(serve_one(tcp, peer, config.clone(), recorded.clone()));
                }
            };
            tokio::select! {
                _ = serve => {}
                _ = stopped => {}
            }
        })
        .unwrap_or_else(|e| panic!("harness HBONE server on {listen}: {e}"));
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("harness HBONE server on {listen}: {e}"),
            Err(e) => panic!("harness HBONE server on {listen} did not start: {e}"),
        }
        PeerServer {
            events,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Everything seen so far.
    pub fn events(&self) -> Vec<ServerEvent> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Waits up to 10 s for an event matching `pred` and returns it; panics with all events.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&ServerEvent) -> bool) -> ServerEvent {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = self.events().into_iter().find(|e| pred(e)) {
                return e;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "harness server never saw {what}: {:?}",
                self.events()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve_one(
    tcp: TcpStream,
    peer: SocketAddr,
    config: Arc<ServerConfig>,
    events: Arc<Mutex<Vec<ServerEvent>>>,
) {
    let record = |e: ServerEvent| {
        if let Ok(mut v) = events.lock() {
            v.push(e);
        }
    };
    let Ok(local) = tcp.local_addr() else {
        return;
    };
    let tls = match tokio_rustls::TlsAcceptor::from(config).accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            let e = match e.get_ref() {
                Some(inner) => format!("{inner:?}: {inner}"),
                None => e.to_string(),
            };
            eprintln!("interop server: TLS handshake from {peer} failed: {e}");
            record(ServerEvent::Handshake(Err(e)));
            return;
        }
    };
    let conn = tls.get_ref().1;
    let negotiated = NegotiatedTls::of(conn);
    record(ServerEvent::Handshake(Ok(negotiated.group.clone())));
    let Some(client) = peer_identity(conn) else {
        eprintln!("interop server: {peer} presented no SPIFFE identity");
        return;
    };
    let info = ConnectionInfo {
        peer_identity: client.clone(),
        peer_addr: peer,
        local_addr: local,
        tls: negotiated,
    };
    let seen = events.clone();
    let server = HboneServer::new(H2Limits::default(), move |req: ConnectRequest| {
        if let Ok(mut v) = seen.lock() {
            v.push(ServerEvent::Connect {
                client: req.connection.peer_identity.to_string(),
                headers: req.headers.clone(),
            });
        }
        async move {
            TcpStream::connect(req.authority)
                .await
                .map(Upstream::new)
                .map_err(|e| Refusal::new(RefusalStatus::ServiceUnavailable, e.to_string()))
        }
    });
    let _ = server
        .serve_connection(tls, info, std::future::pending())
        .await;
}

fn server_config(cert: &WorkloadCert, groups: Groups) -> ServerConfig {
    let provider = groups.provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(cert.roots().clone(), provider.clone())
            .build()
            .expect("client verifier");
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(FixedCert(cert.certified_key().clone())));
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// What [`connect`] got: the negotiated group, and the application's first line.
#[derive(Clone, Debug)]
pub struct ClientReport {
    pub group: String,
    pub line: String,
}

/// From inside the network namespace at `netns`, opens TLS to `hbone` presenting `cert` with the
/// key exchange groups `groups`, then HBONE `CONNECT authority` with `headers` (e.g. a
/// `baggage`); returns the group and the first line the application sends, or the error (a
/// failed handshake is also printed).
pub fn connect(
    netns: &Path,
    cert: WorkloadCert,
    groups: Groups,
    hbone: SocketAddr,
    authority: SocketAddr,
    headers: &[(&'static str, String)],
) -> Result<ClientReport, String> {
    let headers = headers.to_vec();
    crate::netns::block_on_at(netns, move || async move {
        let attempt = client_exchange(cert, groups, hbone, authority, headers);
        tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .map_err(|_| "timed out".to_owned())?
    })?
}

async fn client_exchange(
    cert: WorkloadCert,
    groups: Groups,
    hbone: SocketAddr,
    authority: SocketAddr,
    headers: Vec<(&'static str, String)>,
) -> Result<ClientReport, String> {
    let provider = groups.provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TrustAnyServer(provider)))
        .with_client_cert_resolver(Arc::new(Present(cert.certified_key().clone())));
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.enable_sni = false;
    let tcp = TcpStream::connect(hbone)
        .await
        .map_err(|e| format!("TCP connect to {hbone}: {e}"))?;
    let name = rustls::pki_types::ServerName::IpAddress(hbone.ip().into());
    let tls = match tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
    {
        Ok(tls) => tls,
        Err(e) => {
            let e = match e.get_ref() {
                Some(inner) => format!("{inner:?}: {inner}"),
                None => e.to_string(),
            };
            eprintln!("interop client: TLS handshake with {hbone} failed: {e}");
            return Err(format!("TLS handshake: {e}"));
        }
    };
    let group = tls
        .get_ref()
        .1
        .negotiated_key_exchange_group()
        .map(|g| format!("{:?}", g.name()))
        .unwrap_or_else(|| "none".into());
    let (send, conn) = h2::client::handshake(tls)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(conn);
    let mut send = send.ready().await.map_err(|e| e.to_string())?;
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority.to_string());
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let req = req.body(()).map_err(|e| e.to_string())?;
    let (response, _stream) = send
        .send_request(req, false)
        .map_err(|e| format!("CONNECT: {e}"))?;
    let response = response.await.map_err(|e| format!("CONNECT: {e}"))?;
    if response.status() != StatusCode::OK {
        return Err(format!("CONNECT answered {}", response.status()));
    }
    let mut body = response.into_body();
    let mut got = Vec::new();
    while !got.contains(&b'\n') {
        match body.data().await {
            Some(Ok(chunk)) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                got.extend_from_slice(&chunk);
            }
            Some(Err(e)) => return Err(format!("reading the stream: {e}")),
            None => break,
        }
    }
    Ok(ClientReport {
        group,
        line: String::from_utf8_lossy(&got).into_owned(),
    })
}

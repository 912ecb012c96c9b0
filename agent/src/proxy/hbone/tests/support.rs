//! Test helpers: a CA issuing SPIFFE certificates, TLS configs as ztunnel uses them, an HBONE
//! server harness, a client, an outbound listener, and small apps.
use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rustls::{ClientConfig, ServerConfig};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_rustls::TlsAcceptor;

use crate::config::{H2Limits, PoolLimits};
use crate::identity::{BuiltinCa, SecretManager, peer_identity};
use crate::proxy::hbone::{
    ConnectError, ConnectHandler, ConnectRequest, ConnectionInfo, HbonePool, HboneServer,
    HboneStream, PoolKey, Refusal, RefusalStatus, RequestMeta, ServeError, SpliceCounters,
    SpliceReport, Upstream, splice,
};
use crate::state::workload::Identity;

pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A listener on a free loopback port with the accept queue of Sluice's own listeners. With
/// tokio's `bind` (128), a burst of a thousand connects overflowed it and the kernel reset
/// connections it could not queue (`ListenOverflows`, `SyncookiesFailed` in `nstat`).
pub fn listen_local() -> TcpListener {
    crate::proxy::socket::listen_tcp((LOCALHOST, 0).into()).expect("listen")
}

pub const TRUST_DOMAIN: &str = "cluster.local";

pub fn client_identity() -> Identity {
    Identity::new(TRUST_DOMAIN, "client-ns", "client-sa")
}

pub fn server_identity() -> Identity {
    Identity::new(TRUST_DOMAIN, "server-ns", "server-sa")
}

/// Fails the test when `fut` takes longer than `secs`.
pub async fn within<T>(secs: u64, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {secs}s"))
}

/// Polls `check` with doubling pauses until it holds or `secs` pass.
pub async fn eventually(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut pause = Duration::from_millis(5);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// A mesh CA (the agent's built-in one) and the agent's certificate manager: the TLS configs
/// the tests use are the ones the proxy will use.
pub struct TestPki {
    secrets: SecretManager,
}

impl TestPki {
    pub fn new() -> Self {
        let ca = BuiltinCa::generate(TRUST_DOMAIN).expect("CA");
        Self {
            secrets: SecretManager::new(Arc::new(ca), Duration::from_secs(3600)),
        }
    }

    /// The HBONE server config presenting `identity`.
    pub async fn server_config(&self, identity: &Identity) -> Arc<ServerConfig> {
        self.secrets
            .server_config(identity)
            .await
            .expect("server config")
    }

    /// The HBONE client config presenting `source`, accepting only `expected`.
    pub async fn client_config(&self, source: &Identity, expected: &Identity) -> Arc<ClientConfig> {
        self.secrets
            .client_config(source, vec![expected.clone()])
            .await
            .expect("client config")
    }
}

/// An HBONE server on 127.0.0.1 with a TLS acceptor in front of [`HboneServer`].
pub struct ServerHarness<H> {
    pub addr: SocketAddr,
    pub server: HboneServer<H>,
    /// TLS handshakes completed by the listener.
    pub tls_accepts: Arc<AtomicU64>,
    /// Setting it to true drains every connection.
    pub drain: watch::Sender<bool>,
    /// One result per served connection, in order of completion.
    pub served: mpsc::UnboundedReceiver<Result<(), ServeError>>,
}

impl<H: ConnectHandler> ServerHarness<H> {
    pub async fn start(pki: &TestPki, h2: H2Limits, handler: H) -> Self {
        let listener = listen_local();
        let addr = listener.local_addr().expect("local addr");
        let acceptor = TlsAcceptor::from(pki.server_config(&server_identity()).await);
        let server = HboneServer::new(h2, handler);
        let tls_accepts = Arc::new(AtomicU64::new(0));
        let (drain, drain_rx) = watch::channel(false);
        let (served_tx, served) = mpsc::unbounded_channel();
        let (srv, accepts) = (server.clone(), tls_accepts.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, peer_addr)) = listener.accept().await else {
                    return;
                };
                let (acceptor, server, accepts) = (acceptor.clone(), srv.clone(), accepts.clone());
                let (mut drain_rx, served_tx) = (drain_rx.clone(), served_tx.clone());
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let Ok(local_addr) = tcp.local_addr() else {
                        return;
                    };
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    accepts.fetch_add(1, Ordering::Relaxed);
                    let Some(peer_identity) = peer_identity(tls.get_ref().1) else {
                        return;
                    };
                    let info = ConnectionInfo {
                        peer_identity,
                        peer_addr,
                        local_addr,
                        tls: Default::default(),
                    };
                    let drained = async move {
                        if drain_rx.wait_for(|d| *d).await.is_err() {
                            // The harness is gone: never drain.
                            std::future::pending::<()>().await;
                        }
                    };
                    let result = server.serve_connection(tls, info, drained).await;
                    let _ = served_tx.send(result);
                });
            }
        });
        Self {
            addr,
            server,
            tls_accepts,
            drain,
            served,
        }
    }

    pub fn tls_accepts(&self) -> u64 {
        self.tls_accepts.load(Ordering::Relaxed)
    }
}

/// Connects to `req.authority`; 503 when that fails.
pub async fn forward(req: ConnectRequest) -> Result<Upstream<TcpStream>, Refusal> {
    let tcp = TcpStream::connect(req.authority)
        .await
        .map_err(|e| Refusal::new(RefusalStatus::ServiceUnavailable, e.to_string()))?;
    tcp.set_nodelay(true)
        .map_err(|e| Refusal::new(RefusalStatus::ServiceUnavailable, e.to_string()))?;
    Ok(Upstream::new(tcp))
}

/// The client side: a pool and what it needs to reach one server.
#[derive(Clone)]
pub struct Client {
    pub pool: HbonePool,
    pub tls: Arc<ClientConfig>,
    pub key: PoolKey,
}

impl Client {
    pub async fn new(pki: &TestPki, server: SocketAddr, cfg: PoolLimits, h2: H2Limits) -> Self {
        Self {
            pool: HbonePool::new(cfg, h2),
            tls: pki
                .client_config(&client_identity(), &server_identity())
                .await,
            key: PoolKey {
                source: client_identity(),
                destination: server,
                destination_identity: server_identity(),
            },
        }
    }

    /// A client of `server` with the default pool and HTTP/2 settings.
    pub async fn with_defaults(pki: &TestPki, server: SocketAddr) -> Self {
        Self::new(pki, server, PoolLimits::default(), H2Limits::default()).await
    }

    pub async fn connect(&self, authority: SocketAddr) -> Result<HboneStream, ConnectError> {
        let meta = RequestMeta::new((LOCALHOST, 40000).into(), Default::default());
        self.pool
            .connect(&self.key, self.tls.clone(), authority, &meta)
            .await
    }
}

/// A listener that tunnels every connection it accepts to `target` over HBONE, as the
/// outbound proxy will; a refused tunnel closes the accepted socket. Yields each splice's
/// report (or the connect error).
pub async fn outbound(
    client: Client,
    target: SocketAddr,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<Result<SpliceReport, ConnectError>>,
) {
    let listener = listen_local();
    let addr = listener.local_addr().expect("local addr");
    let (reports_tx, reports) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (client, reports_tx) = (client.clone(), reports_tx.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let report = match client.connect(target).await {
                    Ok(stream) => Ok(splice(tcp, stream, &SpliceCounters::default()).await),
                    Err(e) => Err(e),
                };
                let _ = reports_tx.send(report);
            });
        }
    });
    (addr, reports)
}

/// An app that echoes each connection until EOF, then half-closes.
pub async fn echo_app() -> SocketAddr {
    serve_app(|mut tcp| async move {
        let (mut r, mut w) = tcp.split();
        if tokio::io::copy(&mut r, &mut w).await.is_ok() {
            let _ = w.shutdown().await;
        }
    })
    .await
}

/// An app running `f` for every accepted connection.
pub async fn serve_app<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = listen_local();
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(f(tcp));
        }
    });
    addr
}

/// Deterministic test data: `len` bytes derived from `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut data = vec![0; len];
    rng.fill(&mut data);
    data
}

/// Reads to EOF.
pub async fn read_all(tcp: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await?;
    Ok(out)
}

/// Resident set size of this process, in bytes.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("statm resident field");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).expect("page size")
}

/// Resets `tcp` (SO_LINGER 0, close).
pub fn abort(tcp: TcpStream) {
    socket2::SockRef::from(&tcp)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    drop(tcp);
}

/// A whole path: test client → outbound listener → HBONE (pool, TLS) → server → app.
pub struct Tunnel<H> {
    pub server: ServerHarness<H>,
    pub client: Client,
    /// Where the test client connects to reach the app.
    pub entry: SocketAddr,
    pub reports: mpsc::UnboundedReceiver<Result<SpliceReport, ConnectError>>,
}

/// A [`Tunnel`] to `app` with default settings and a forwarding handler.
pub async fn tunnel_to(app: SocketAddr) -> Tunnel<impl ConnectHandler<Io = TcpStream>> {
    tunnel_with(app, PoolLimits::default(), H2Limits::default(), forward).await
}

/// A [`Tunnel`] to `app` with the given settings and handler.
pub async fn tunnel_with<H: ConnectHandler>(
    app: SocketAddr,
    pool: PoolLimits,
    h2: H2Limits,
    handler: H,
) -> Tunnel<H> {
    let pki = TestPki::new();
    let server = ServerHarness::start(&pki, h2.clone(), handler).await;
    let client = Client::new(&pki, server.addr, pool, h2).await;
    let (entry, reports) = outbound(client.clone(), app).await;
    Tunnel {
        server,
        client,
        entry,
        reports,
    }
}

/// Writes `total` bytes of `block` repeated.
pub async fn write_blocks(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    block: &[u8],
    total: usize,
) -> std::io::Result<()> {
    let mut left = total;
    while left > 0 {
        let n = left.min(block.len());
        w.write_all(&block[..n]).await?;
        left -= n;
    }
    Ok(())
}

/// Reads to EOF, checking every byte against `block` repeated; returns the byte count.
pub async fn read_blocks(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    block: &[u8],
) -> std::io::Result<usize> {
    let mut buf = vec![0; 256 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        let mut got = &buf[..n];
        while !got.is_empty() {
            let at = total % block.len();
            let take = got.len().min(block.len() - at);
            assert!(
                got[..take] == block[at..at + take],
                "corrupt data at offset {total}"
            );
            got = &got[take..];
            total += take;
        }
    }
}

//! Connections from the gateway to backends: HBONE with the gateway's own identity to an
//! endpoint in the mesh, plain TCP to one outside it. A hyper client pools the HTTP/1.1
//! connections on top (keep-alive per endpoint), and the HBONE pool shares its mTLS
//! connections between them.
use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::{
    identity::SecretManager,
    proxy::hbone::{Baggage, HbonePool, HboneStream, PoolKey, RequestMeta},
    state::{Identity, StateHandle},
};
use sluice_common::HBONE_PORT;

/// A byte stream to one endpoint.
pub enum Upstream {
    Hbone(HboneStream),
    Tcp(TcpStream),
}

impl Connection for Upstream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Hbone(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Hbone(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Hbone(s) => Pin::new(s).poll_flush(cx),
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Hbone(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Why an endpoint could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    #[error("upstream URI {0} has no endpoint address")]
    NoAddress(Uri),
    #[error("TCP to {dst}: {source}")]
    Tcp { dst: SocketAddr, source: io::Error },
    #[error("HBONE to {dst} as {identity}: {error}")]
    Hbone {
        dst: SocketAddr,
        identity: Identity,
        error: String,
    },
    #[error("connecting to {0} timed out")]
    Timeout(SocketAddr),
}

/// Opens [`Upstream`]s for the hyper client: the URI's authority is the endpoint's
/// `ip:port`, and the current MeshState says whether that endpoint is in the mesh.
#[derive(Clone)]
pub struct MeshConnector {
    inner: Arc<Inner>,
}

struct Inner {
    state: StateHandle,
    identity: Arc<SecretManager>,
    me: Identity,
    pool: HbonePool,
    /// The gateway's own address, sent as the HBONE `forwarded` source (connections are shared
    /// between clients; the client address travels in X-Forwarded-For).
    source: SocketAddr,
    baggage: Baggage,
    connect_timeout: Duration,
}

impl MeshConnector {
    /// A connector presenting `me` to mesh endpoints.
    pub fn new(
        state: StateHandle,
        identity: Arc<SecretManager>,
        me: Identity,
        pool: HbonePool,
        source: SocketAddr,
        baggage: Baggage,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                state,
                identity,
                me,
                pool,
                source,
                baggage,
                connect_timeout: Duration::from_secs(5),
            }),
        }
    }

    /// The identity an endpoint at `dst` must prove, if it is in the mesh.
    pub fn peer_identity(&self, dst: SocketAddr) -> Option<Identity> {
        let state = self.inner.state.current();
        let w = state.workload_by_ip(dst.ip())?;
        (w.membership.in_mesh() && dst.port() != HBONE_PORT)
            .then(|| w.identity(&state.trust_domain))
    }

    async fn open(self, dst: SocketAddr) -> Result<Upstream, ConnectFailure> {
        let inner = &self.inner;
        let connect = async {
            match self.peer_identity(dst) {
                Some(identity) => {
                    let fail = |error: String| ConnectFailure::Hbone {
                        dst,
                        identity: identity.clone(),
                        error,
                    };
                    let tls = inner
                        .identity
                        .client_config(&inner.me, vec![identity.clone()])
                        .await
                        .map_err(|e| fail(e.to_string()))?;
                    let key = PoolKey {
                        source: inner.me.clone(),
                        destination: SocketAddr::new(dst.ip(), HBONE_PORT),
                        destination_identity: identity.clone(),
                    };
                    let meta = RequestMeta::new(inner.source, inner.baggage.clone());
                    inner
                        .pool
                        .connect(&key, tls, dst, &meta)
                        .await
                        .map(Upstream::Hbone)
                        .map_err(|e| fail(e.to_string()))
                }
                None => {
                    let tcp = TcpStream::connect(dst)
                        .await
                        .map_err(|source| ConnectFailure::Tcp { dst, source })?;
                    let _ = tcp.set_nodelay(true);
                    Ok(Upstream::Tcp(tcp))
                }
            }
        };
        tokio::time::timeout(inner.connect_timeout, connect)
            .await
            .map_err(|_| ConnectFailure::Timeout(dst))?
    }
}

impl tower_service::Service<Uri> for MeshConnector {
    type Response = hyper_util::rt::TokioIo<Upstream>;
    type Error = ConnectFailure;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let dst: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| ConnectFailure::NoAddress(uri.clone()))?;
            this.open(dst).await.map(hyper_util::rt::TokioIo::new)
        })
    }
}

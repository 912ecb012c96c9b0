//! The gateway's listening sockets: one per port of the served listeners, bound when a port
//! appears in the routing table and closed when it leaves. HTTPS ports terminate TLS with the
//! certificate of the listener whose hostname matches the SNI; every port speaks HTTP/1.1 and
//! HTTP/2 (ALPN, or prior knowledge in cleartext). Certificates are read again on every
//! reconcile; a rotated one serves new connections, and one that can no longer be read leaves
//! the last good one in place.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{
    certificates::CertificateSource,
    handler::{self, ConnInfo},
    routes::RouteTable,
    workers::Workers,
};
use crate::state::ingress::ListenerProtocol;

/// Certificates of HTTPS listeners by hostname (`None`: the listener has no hostname).
#[derive(Debug, Default)]
pub struct SniCertificates {
    by_host: Vec<(Option<String>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for SniCertificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name().map(str::to_ascii_lowercase);
        let rank = |pattern: &Option<String>| -> Option<(u8, usize)> {
            match (pattern, &sni) {
                (None, _) => Some((0, 0)),
                (Some(p), Some(s)) if p == s => Some((2, p.len())),
                (Some(p), Some(s))
                    if p.starts_with("*.") && s.ends_with(&p[1..]) && s.len() > p.len() - 1 =>
                {
                    Some((1, p.len()))
                }
                _ => None,
            }
        };
        self.by_host
            .iter()
            .filter_map(|(h, k)| Some((rank(h)?, k)))
            .max_by_key(|(r, _)| *r)
            .map(|(_, k)| k.clone())
    }
}

/// An HTTPS port's TLS configuration, swapped in place when a certificate rotates.
type SharedTls = Arc<RwLock<(u64, tokio_rustls::TlsAcceptor)>>;

/// One bound port.
struct Bound {
    protocol: ListenerProtocol,
    task: JoinHandle<()>,
    /// HTTPS: the acceptor the accept loop uses, with the fingerprint of its certificates.
    tls: Option<SharedTls>,
}

/// The bound ports and their accept loops.
#[derive(Default)]
pub struct Listeners {
    bound: BTreeMap<u16, Bound>,
}

impl Listeners {
    /// Binds what `table` serves and is not bound yet, and closes what it no longer serves.
    /// Returns the ports now bound. A port that cannot be bound is logged and left out (so
    /// status can say so).
    pub async fn reconcile(
        &mut self,
        table: &RouteTable,
        bind: Option<IpAddr>,
        certificates: &CertificateSource,
        workers: &Arc<Workers>,
    ) -> BTreeSet<u16> {
        let wanted: BTreeMap<u16, ListenerProtocol> =
            table.ports.iter().map(|(p, r)| (*p, r.protocol)).collect();
        self.bound.retain(|port, b| {
            let keep = wanted.get(port) == Some(&b.protocol);
            if !keep {
                b.task.abort();
                info!(port, "gateway listener closed");
            }
            keep
        });
        // Bound HTTPS ports: a rotated certificate replaces the old one for new connections.
        for (port, b) in &self.bound {
            let Some(tls) = &b.tls else { continue };
            match server_config(table, *port, certificates).await {
                Ok((fingerprint, config)) => {
                    let mut current = tls.write().unwrap_or_else(|e| e.into_inner());
                    if current.0 != fingerprint {
                        *current = (fingerprint, tokio_rustls::TlsAcceptor::from(config));
                        info!(port, "gateway listener certificates replaced");
                    }
                }
                Err(e) => {
                    warn!(port, error = %e, "certificates not re-read; the listener keeps serving its last good ones");
                }
            }
        }
        for (port, protocol) in &wanted {
            if self.bound.contains_key(port) {
                continue;
            }
            let tls = match protocol {
                ListenerProtocol::Https => match server_config(table, *port, certificates).await {
                    Ok((fingerprint, c)) => Some(Arc::new(RwLock::new((
                        fingerprint,
                        tokio_rustls::TlsAcceptor::from(c),
                    )))),
                    Err(e) => {
                        warn!(port, error = %e, "HTTPS listener not bound: its certificates are not usable");
                        continue;
                    }
                },
                _ => None,
            };
            let addr = SocketAddr::new(bind.unwrap_or(IpAddr::from([0, 0, 0, 0])), *port);
            let listener = match crate::proxy::socket::listen_tcp(addr) {
                Ok(l) => l,
                Err(e) => {
                    warn!(%addr, error = %e, "gateway listener not bound");
                    continue;
                }
            };
            info!(%addr, protocol = ?protocol, "gateway listener bound");
            let task = tokio::spawn(accept(listener, *port, tls.clone(), workers.clone()));
            self.bound.insert(
                *port,
                Bound {
                    protocol: *protocol,
                    task,
                    tls,
                },
            );
        }
        self.bound.keys().copied().collect()
    }
}

/// A TLS server config for the HTTPS listeners on `port`, their certificates chosen by SNI,
/// with a fingerprint of those certificates.
async fn server_config(
    table: &RouteTable,
    port: u16,
    certificates: &CertificateSource,
) -> anyhow::Result<(u64, Arc<rustls::ServerConfig>)> {
    use std::hash::{Hash, Hasher};
    let mut sni = SniCertificates::default();
    let mut fingerprint = std::collections::hash_map::DefaultHasher::new();
    for l in table
        .ports
        .get(&port)
        .map(|p| &p.listeners[..])
        .unwrap_or(&[])
    {
        for secret in &l.certificates {
            let loaded = certificates
                .load(secret)
                .await
                .map_err(|e| anyhow::anyhow!("listener {}/{}: {e}", l.gateway, l.name))?;
            (&l.hostname, loaded.fingerprint).hash(&mut fingerprint);
            sni.by_host.push((l.hostname.clone(), loaded.key));
        }
    }
    if sni.by_host.is_empty() {
        anyhow::bail!("no certificate for port {port}");
    }
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(sni));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((fingerprint.finish(), Arc::new(config)))
}

/// Accepts connections on `listener` and hands each to a worker, until aborted.
async fn accept(listener: TcpListener, port: u16, tls: Option<SharedTls>, workers: Arc<Workers>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(port, error = %e, "gateway accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let local = match tcp.local_addr() {
            Ok(a) => a,
            Err(e) => {
                warn!(port, error = %e, "gateway connection without a local address");
                continue;
            }
        };
        // The acceptor of this moment: a rotation applies from the next connection on.
        let tls = tls
            .as_ref()
            .map(|t| t.read().unwrap_or_else(|e| e.into_inner()).1.clone());
        workers.spawn(move |shared| async move {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let conn = ConnInfo {
                peer,
                local,
                port,
                scheme,
            };
            let service = service_fn(move |req| handler::handle(shared.clone(), conn, req));
            let builder = auto::Builder::new(TokioExecutor::new());
            let result = match tls {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(stream) => {
                        builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                    }
                    Err(e) => {
                        debug!(%peer, port, error = %e, "TLS handshake failed");
                        return;
                    }
                },
                None => builder.serve_connection(TokioIo::new(tcp), service).await,
            };
            if let Err(e) = result {
                debug!(%peer, port, error = %e, "gateway connection ended with an error");
            }
        });
    }
}

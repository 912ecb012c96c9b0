//! The client pool: HTTP/2 connections per [`PoolKey`], each carrying many `CONNECT` streams.
//!
//! A connection is used for a new stream while it has fewer streams than the smaller of
//! [`PoolLimits::max_streams_per_conn`] and the peer's SETTINGS_MAX_CONCURRENT_STREAMS; then a
//! new one is dialled, up to [`PoolLimits::max_conns_per_key`], after which callers wait for a
//! stream to end. Concurrent callers for a key that has no room share one dial (one handshake).
//! Each connection has a driver task that runs the HTTP/2 state machine, sends keepalive pings,
//! and closes the connection after [`PoolLimits::idle_timeout`] without streams.
use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::{net::TcpStream, sync::Notify};
use tracing::debug;

use super::{
    HboneStream, RequestMeta,
    client::{self, ClientConnection, ConnectError, DialError, OpenError},
    headers::connect_request,
};
use crate::{
    admin::PoolStats,
    config::{H2Limits, Keepalive, PoolLimits},
    identity::NegotiatedTls,
    state::workload::Identity,
};

/// Which connections may carry a stream: same source identity (the client certificate), same
/// peer address, same expected peer identity (what the TLS config verifies).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Identity of the source workload, presented as the client certificate.
    pub source: Identity,
    /// The peer's HBONE address, `<ip>:15008`.
    pub destination: SocketAddr,
    /// The identity the peer's certificate must carry.
    pub destination_identity: Identity,
}

/// Opens the TCP connection a pooled HBONE connection runs on (a seam for socket marks,
/// binding to a pod address, or entering a network namespace).
pub trait Dial: Send + Sync + 'static {
    /// Connects to `key.destination`.
    fn dial<'a>(
        &'a self,
        key: &'a PoolKey,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + 'a>>;
}

/// Plain `connect()` with `TCP_NODELAY`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpDial;

impl Dial for TcpDial {
    fn dial<'a>(
        &'a self,
        key: &'a PoolKey,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + 'a>> {
        Box::pin(async move {
            let tcp = TcpStream::connect(key.destination).await?;
            tcp.set_nodelay(true)?;
            Ok(tcp)
        })
    }
}

/// Pooled HBONE client connections. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct HbonePool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    cfg: PoolLimits,
    h2: H2Limits,
    dialer: Arc<dyn Dial>,
    keys: Mutex<HashMap<PoolKey, KeyEntry>>,
    stats: Arc<PoolStats>,
    /// Origin of the millisecond timestamps kept in atomics.
    epoch: Instant,
    next_conn_id: AtomicU64,
}

/// The connections of one key.
struct KeyEntry {
    conns: Vec<Arc<PooledConn>>,
    /// Held while dialling, so concurrent callers share one handshake; remembers the last
    /// failure so that the callers queued behind a failed dial do not each retry it.
    dial_lock: Arc<tokio::sync::Mutex<DialRecord>>,
    /// Signalled when a stream ends or a connection closes.
    notify: Arc<Notify>,
}

#[derive(Default)]
struct DialRecord {
    last_failure: Option<(Instant, Arc<DialError>)>,
}

impl KeyEntry {
    fn new() -> Self {
        Self {
            conns: Vec::new(),
            dial_lock: Arc::default(),
            notify: Arc::default(),
        }
    }
}

/// One pooled HTTP/2 connection, as the pool and its streams see it.
pub(crate) struct PooledConn {
    id: u64,
    /// Taken out when the connection retires idle: without it h2 sends GOAWAY and closes.
    sender: Mutex<Option<SendRequest<Bytes>>>,
    /// Claimed stream slots.
    active: AtomicU32,
    /// Current stream limit: min(config, peer setting).
    max_streams: AtomicU32,
    /// When `active` last dropped to zero, in ms since the pool epoch.
    idle_since_ms: AtomicU64,
    created: Instant,
    /// Takes no new streams (closing, GOAWAY received, or retired idle).
    retired: AtomicBool,
    notify: Arc<Notify>,
    stats: Arc<PoolStats>,
    epoch: Instant,
}

impl PooledConn {
    fn sender(&self) -> Option<SendRequest<Bytes>> {
        self.sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn aged(&self, max_age: Option<Duration>) -> bool {
        max_age.is_some_and(|age| self.created.elapsed() >= age)
    }

    fn accepting(&self, max_age: Option<Duration>) -> bool {
        !self.retired.load(Ordering::Acquire) && !self.aged(max_age)
    }

    /// Takes a stream slot if the connection has room.
    fn try_claim(&self, max_age: Option<Duration>) -> bool {
        if !self.accepting(max_age) {
            return false;
        }
        let max = self.max_streams.load(Ordering::Acquire);
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn idle_for(&self) -> Duration {
        let since = self.idle_since_ms.load(Ordering::Acquire);
        Duration::from_millis(self.now_ms().saturating_sub(since))
    }
}

/// A claimed stream on a pooled connection; dropping it frees the slot.
pub(crate) struct StreamSlot {
    conn: Arc<PooledConn>,
}

impl StreamSlot {
    fn new(conn: Arc<PooledConn>) -> Self {
        conn.stats.active_streams.fetch_add(1, Ordering::Relaxed);
        Self { conn }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let conn = &self.conn;
        conn.idle_since_ms.store(conn.now_ms(), Ordering::Release);
        conn.active.fetch_sub(1, Ordering::AcqRel);
        conn.stats.active_streams.fetch_sub(1, Ordering::Relaxed);
        conn.notify.notify_waiters();
    }
}

/// What the pool has for a key right now.
enum Claim {
    /// A stream slot on an existing connection.
    Slot(StreamSlot),
    /// No room, but a new connection may be dialled.
    MayDial(Arc<tokio::sync::Mutex<DialRecord>>),
    /// No room and no more connections allowed: wait for a stream to end.
    Full(Arc<Notify>),
}

impl HbonePool {
    /// A pool dialling with plain TCP.
    pub fn new(cfg: PoolLimits, h2: H2Limits) -> Self {
        Self::with_dialer(cfg, h2, Arc::new(TcpDial))
    }

    /// A pool dialling through `dialer`.
    pub fn with_dialer(cfg: PoolLimits, h2: H2Limits, dialer: Arc<dyn Dial>) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                cfg,
                h2,
                dialer,
                keys: Mutex::default(),
                stats: Arc::default(),
                epoch: Instant::now(),
                next_conn_id: AtomicU64::new(1),
            }),
        }
    }

    /// This pool counting into `stats` (shared with other pools, e.g. node-wide metrics)
    /// instead of its own counters. Call before the pool is used.
    pub fn with_stats(mut self, stats: Arc<PoolStats>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.stats = stats;
        }
        self
    }

    /// The pool's counters.
    pub fn stats(&self) -> &PoolStats {
        &self.inner.stats
    }

    /// Opens a `CONNECT` stream to `authority` (the original destination `ip:port`) through a
    /// connection of `key`, dialling one with `tls` when needed. Returns once the peer answered
    /// 200; any other answer is [`ConnectError::Status`].
    pub async fn connect(
        &self,
        key: &PoolKey,
        tls: Arc<rustls::ClientConfig>,
        authority: SocketAddr,
        meta: &RequestMeta,
    ) -> Result<HboneStream, ConnectError> {
        self.connect_with_data(key, tls, authority, meta, Bytes::new())
            .await
    }

    /// [`Self::connect`], sending `early` (the client's first bytes, at most
    /// [`EARLY_DATA_MAX`](super::EARLY_DATA_MAX)) right after the `CONNECT` instead of after
    /// the answer. A retried stream sends them again; a refused one never delivered them.
    pub async fn connect_with_data(
        &self,
        key: &PoolKey,
        tls: Arc<rustls::ClientConfig>,
        authority: SocketAddr,
        meta: &RequestMeta,
        early: Bytes,
    ) -> Result<HboneStream, ConnectError> {
        debug_assert!(early.len() <= super::EARLY_DATA_MAX);
        let stats = &self.inner.stats;
        // One retry, for a stream the peer did not process (GOAWAY, REFUSED_STREAM, dead conn).
        let mut retry = true;
        loop {
            let req = connect_request(authority, meta)?;
            let slot = self.checkout(key, &tls).await?;
            let Some(sender) = slot.conn.sender() else {
                // Retired between the claim and here; the next claim will not pick it.
                continue;
            };
            let failure = match client::open_stream(sender, req, &early).await {
                Ok((send, recv)) => {
                    stats.streams_opened.fetch_add(1, Ordering::Relaxed);
                    return Ok(HboneStream::new(send, recv, Some(Arc::new(slot))));
                }
                Err(OpenError::Retryable(e)) if retry => {
                    debug!(conn = slot.conn.id, error = %e, "HBONE stream not processed, retrying");
                    if e.is_go_away() || e.is_io() || e.reason().is_none() {
                        slot.conn.retired.store(true, Ordering::Release);
                    }
                    retry = false;
                    continue;
                }
                Err(OpenError::Retryable(source) | OpenError::Failed(source)) => {
                    ConnectError::Stream {
                        dst: key.destination,
                        authority,
                        source,
                    }
                }
                Err(OpenError::Status(status)) => ConnectError::Status {
                    dst: key.destination,
                    authority,
                    status,
                },
            };
            stats.streams_failed.fetch_add(1, Ordering::Relaxed);
            return Err(failure);
        }
    }

    fn lock_keys(&self) -> MutexGuard<'_, HashMap<PoolKey, KeyEntry>> {
        self.inner
            .keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn claim(&self, key: &PoolKey) -> Claim {
        let cfg = &self.inner.cfg;
        let mut keys = self.lock_keys();
        let entry = match keys.get_mut(key) {
            Some(entry) => entry,
            None => keys.entry(key.clone()).or_insert_with(KeyEntry::new),
        };
        if let Some(conn) = entry
            .conns
            .iter()
            .find(|c| c.try_claim(cfg.max_connection_age))
        {
            return Claim::Slot(StreamSlot::new(conn.clone()));
        }
        let accepting = entry
            .conns
            .iter()
            .filter(|c| c.accepting(cfg.max_connection_age))
            .count();
        if accepting < cfg.max_conns_per_key.get() {
            Claim::MayDial(entry.dial_lock.clone())
        } else {
            Claim::Full(entry.notify.clone())
        }
    }

    /// A stream slot on a connection of `key`, dialling one if needed and allowed.
    async fn checkout(
        &self,
        key: &PoolKey,
        tls: &Arc<rustls::ClientConfig>,
    ) -> Result<StreamSlot, ConnectError> {
        let started = Instant::now();
        loop {
            match self.claim(key) {
                Claim::Slot(slot) => return Ok(slot),
                Claim::MayDial(dial_lock) => {
                    let mut record = dial_lock.lock().await;
                    match self.claim(key) {
                        Claim::Slot(slot) => return Ok(slot),
                        Claim::Full(_) => continue,
                        Claim::MayDial(_) => {}
                    }
                    if let Some((at, cause)) = &record.last_failure
                        && *at >= started
                    {
                        return Err(ConnectError::Dial(cause.clone()));
                    }
                    match self.dial(key, tls).await {
                        Ok(slot) => return Ok(slot),
                        Err(cause) => {
                            let cause = Arc::new(cause);
                            record.last_failure = Some((Instant::now(), cause.clone()));
                            return Err(ConnectError::Dial(cause));
                        }
                    }
                }
                Claim::Full(notify) => {
                    let notified = notify.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    // A stream may have ended between the claim and enabling the waiter.
                    if let Claim::Slot(slot) = self.claim(key) {
                        return Ok(slot);
                    }
                    notified.await;
                }
            }
        }
    }

    /// Dials a new connection for `key` and returns a slot on it.
    async fn dial(
        &self,
        key: &PoolKey,
        tls: &Arc<rustls::ClientConfig>,
    ) -> Result<StreamSlot, DialError> {
        let inner = &self.inner;
        let dst = key.destination;
        let max_streams = inner.cfg.max_streams_per_conn.get();
        let attempt = async {
            let tcp = inner
                .dialer
                .dial(key)
                .await
                .map_err(|source| DialError::Tcp { dst, source })?;
            let tls = client::tls_handshake(tcp, dst, tls.clone()).await?;
            inner.stats.handshakes.fetch_add(1, Ordering::Relaxed);
            let negotiated = NegotiatedTls::of(tls.get_ref().1);
            client::h2_handshake(tls, dst, &inner.h2, max_streams)
                .await
                .map(|(sender, connection)| (sender, connection, negotiated))
        };
        let after = inner.cfg.connect_timeout;
        let result = match tokio::time::timeout(after, attempt).await {
            Ok(r) => r,
            Err(_) => Err(DialError::Timeout { dst, after }),
        };
        let (sender, connection, negotiated) = result.inspect_err(|e| {
            inner.stats.dial_failures.fetch_add(1, Ordering::Relaxed);
            debug!(%dst, error = %e, "HBONE dial failed");
        })?;

        let mut keys = self.lock_keys();
        let entry = keys.entry(key.clone()).or_insert_with(KeyEntry::new);
        let conn = Arc::new(PooledConn {
            id: inner.next_conn_id.fetch_add(1, Ordering::Relaxed),
            sender: Mutex::new(Some(sender)),
            // Born with the caller's stream claimed.
            active: AtomicU32::new(1),
            max_streams: AtomicU32::new(max_streams),
            idle_since_ms: AtomicU64::new(0),
            created: Instant::now(),
            retired: AtomicBool::new(false),
            notify: entry.notify.clone(),
            stats: inner.stats.clone(),
            epoch: inner.epoch,
        });
        entry.conns.push(conn.clone());
        drop(keys);
        inner.stats.connections.fetch_add(1, Ordering::Relaxed);
        debug!(
            conn = conn.id,
            %dst,
            source = %key.source,
            tls.group = %negotiated.group,
            tls.cipher_suite = %negotiated.cipher_suite,
            "HBONE connection established"
        );
        let driver = Driver {
            pool: Arc::downgrade(inner),
            key: key.clone(),
            conn: conn.clone(),
            idle_timeout: inner.cfg.idle_timeout,
            max_age: inner.cfg.max_connection_age,
            max_streams_cfg: max_streams,
        };
        tokio::spawn(driver.run(connection, inner.h2.keepalive));
        Ok(StreamSlot::new(conn))
    }
}

/// Runs one pooled connection until it fails, the peer closes it, or it is idle too long.
struct Driver {
    pool: Weak<PoolInner>,
    key: PoolKey,
    conn: Arc<PooledConn>,
    idle_timeout: Duration,
    max_age: Option<Duration>,
    max_streams_cfg: u32,
}

/// How long a retiring connection may take to say GOAWAY.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How often a connection past its maximum age checks whether its last stream ended.
const AGED_CHECK_INTERVAL: Duration = Duration::from_secs(1);

impl Driver {
    async fn run(self, mut connection: ClientConnection, keepalive: Option<Keepalive>) {
        let pings = keepalive.and_then(|k| connection.ping_pong().map(|p| (p, k)));
        let keepalive = async move {
            let Some((mut ping_pong, k)) = pings else {
                return std::future::pending::<()>().await;
            };
            loop {
                tokio::time::sleep(k.interval).await;
                match tokio::time::timeout(k.timeout, ping_pong.ping(h2::Ping::opaque())).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return debug!(error = %e, "HBONE ping failed"),
                    Err(_) => return debug!("HBONE ping timed out"),
                }
            }
        };
        tokio::pin!(keepalive);
        let conn = &self.conn;
        let mut published_max = self.max_streams_cfg;
        let mut drive = std::future::poll_fn(|cx| {
            let r = Pin::new(&mut connection).poll(cx);
            let max = self
                .max_streams_cfg
                .min(u32::try_from(connection.max_concurrent_send_streams()).unwrap_or(u32::MAX));
            if max != published_max {
                published_max = max;
                conn.max_streams.store(max, Ordering::Release);
            }
            r
        });
        loop {
            let wait = if self.conn.aged(self.max_age) {
                AGED_CHECK_INTERVAL
            } else {
                let idle_wait = if self.conn.active.load(Ordering::Acquire) > 0 {
                    // Busy: the earliest it can expire is a full timeout after its last stream.
                    self.idle_timeout
                } else {
                    self.idle_timeout.saturating_sub(self.conn.idle_for())
                };
                let age_wait = self
                    .max_age
                    .map(|age| age.saturating_sub(self.conn.created.elapsed()));
                age_wait.map_or(idle_wait, |a| a.min(idle_wait))
            };
            tokio::select! {
                result = &mut drive => {
                    if let Err(e) = result {
                        debug!(conn = conn.id, error = %e, "HBONE connection failed");
                    }
                    break;
                }
                () = &mut keepalive => break,
                () = tokio::time::sleep(wait) => {
                    if self.retire_if_idle() {
                        debug!(conn = conn.id, "HBONE connection idle, closing");
                        // Without a sender and streams, h2 sends GOAWAY and finishes.
                        drop(conn.sender.lock().unwrap_or_else(PoisonError::into_inner).take());
                        let _ = tokio::time::timeout(CLOSE_GRACE, &mut drive).await;
                        break;
                    }
                }
            }
        }
        conn.retired.store(true, Ordering::Release);
        self.remove();
        conn.stats.connections.fetch_sub(1, Ordering::Relaxed);
        conn.notify.notify_waiters();
        // Dropping `connection` closes the socket.
    }

    /// Retires the connection if it has no streams and has been idle long enough (or is past
    /// its maximum age). Decided under the pool lock, which claims also take.
    fn retire_if_idle(&self) -> bool {
        let Some(pool) = self.pool.upgrade() else {
            return self.conn.active.load(Ordering::Acquire) == 0;
        };
        let _keys = pool.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let conn = &self.conn;
        let idle = conn.active.load(Ordering::Acquire) == 0
            && (conn.aged(self.max_age) || conn.idle_for() >= self.idle_timeout);
        if idle {
            conn.retired.store(true, Ordering::Release);
        }
        idle
    }

    /// Takes the connection out of the pool, and the key too once it has nothing left.
    fn remove(&self) {
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        let mut keys = pool.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = keys.get_mut(&self.key) {
            entry.conns.retain(|c| !Arc::ptr_eq(c, &self.conn));
            if entry.conns.is_empty() && Arc::strong_count(&entry.dial_lock) == 1 {
                keys.remove(&self.key);
            }
        }
    }
}

//! The agent's own resolver for egress: ServiceEntries with `resolution: DNS` are resolved here
//! (and re-resolved when their TTL runs out), so that under `REGISTRY_ONLY` a connection to one
//! of their addresses is known to be for that host; in gateway role, upstream hosts are resolved
//! with the same server.
//!
//! A deliberately small stub resolver: A and AAAA queries over UDP, retried over TCP when the
//! answer is truncated, to one configured server (`spec.egress.dnsServer`, else the first
//! `nameserver` of `/etc/resolv.conf`). A reply counts only if it carries the query's id and
//! question; of its answers, only the addresses owned by the name asked, or by the names its
//! CNAME chain leads to, are taken.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use hickory_proto::{
    op::{Message, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};
use tokio::{net::UdpSocket, time::Instant};
use tracing::{debug, warn};

use crate::state::{StateHandle, egress::Resolved};

/// Shortest and longest time an answer is kept, whatever its TTL says.
pub const MIN_TTL: Duration = Duration::from_secs(1);
pub const MAX_TTL: Duration = Duration::from_secs(300);
/// How soon a failed lookup is retried.
pub const RETRY: Duration = Duration::from_secs(2);

/// Why a lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("{0:?} is not a DNS name")]
    BadName(String),
    #[error("DNS server {server}: {source}")]
    Io {
        server: SocketAddr,
        source: io::Error,
    },
    #[error("DNS server {server} did not answer within {timeout:?}")]
    Timeout {
        server: SocketAddr,
        timeout: Duration,
    },
    #[error("DNS server {server} answered {code} for {host}")]
    Rcode {
        server: SocketAddr,
        host: String,
        code: ResponseCode,
    },
    #[error("DNS: {0}")]
    Proto(String),
}

/// Addresses of one name and how long they hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub addrs: Vec<IpAddr>,
    pub ttl: Duration,
}

/// A stub resolver asking one server.
#[derive(Clone, Debug)]
pub struct Resolver {
    server: SocketAddr,
    timeout: Duration,
}

impl Resolver {
    /// Asks `server`, waiting at most `timeout` per query.
    pub fn new(server: SocketAddr, timeout: Duration) -> Self {
        Self { server, timeout }
    }

    /// The server asked.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The first `nameserver` of `/etc/resolv.conf`, port 53.
    pub fn system_server() -> Option<SocketAddr> {
        let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
        text.lines().find_map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next() == Some("nameserver"))
                .then(|| parts.next())
                .flatten()
                .and_then(|a| a.split('%').next()?.parse::<IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, 53))
        })
    }

    /// A and AAAA records of `host` (IPv4 first). An IP literal answers itself.
    pub async fn lookup(&self, host: &str) -> Result<Answer, DnsError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Answer {
                addrs: vec![ip],
                ttl: MAX_TTL,
            });
        }
        let (a, aaaa) = tokio::join!(
            self.query(host, RecordType::A),
            self.query(host, RecordType::AAAA)
        );
        let mut addrs = Vec::new();
        let mut ttl = MAX_TTL;
        let mut first_err = None;
        for r in [a, aaaa] {
            match r {
                Ok(ans) => {
                    if !ans.addrs.is_empty() {
                        ttl = ttl.min(ans.ttl);
                    }
                    addrs.extend(ans.addrs);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match (addrs.is_empty(), first_err) {
            (true, Some(e)) => Err(e),
            _ => Ok(Answer {
                addrs,
                ttl: ttl.clamp(MIN_TTL, MAX_TTL),
            }),
        }
    }

    async fn query(&self, host: &str, kind: RecordType) -> Result<Answer, DnsError> {
        let name = query_name(host)?;
        let mut msg = Message::query();
        msg.metadata.recursion_desired = true;
        msg.add_query(Query::query(name.clone(), kind));
        let id = msg.metadata.id;
        let wire = msg.to_vec().map_err(|e| DnsError::Proto(e.to_string()))?;
        let deadline = Instant::now() + self.timeout;
        let mut reply = self.exchange_udp(&wire, &name, kind, id, deadline).await?;
        if reply.metadata.truncation {
            // The answer did not fit in a datagram: ask again over TCP for all of it.
            debug!(%host, ?kind, "DNS answer truncated; retrying over TCP");
            reply = self.exchange_tcp(&wire, &name, kind, id, deadline).await?;
        }
        answer_of(&reply, self.server, host, &name, kind)
    }

    fn io_error(&self, source: io::Error) -> DnsError {
        DnsError::Io {
            server: self.server,
            source,
        }
    }

    fn timeout_error(&self) -> DnsError {
        DnsError::Timeout {
            server: self.server,
            timeout: self.timeout,
        }
    }

    /// Sends `wire` over UDP (once more halfway to `deadline` if nothing came back) and returns
    /// the first reply to it: same id, same question.
    async fn exchange_udp(
        &self,
        wire: &[u8],
        name: &Name,
        kind: RecordType,
        id: u16,
        deadline: Instant,
    ) -> Result<Message, DnsError> {
        let bind = if self.server.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let sock = UdpSocket::bind(bind).await.map_err(|e| self.io_error(e))?;
        sock.connect(self.server)
            .await
            .map_err(|e| self.io_error(e))?;
        let mut buf = vec![0u8; 4096];
        sock.send(wire).await.map_err(|e| self.io_error(e))?;
        let halfway = Instant::now() + self.timeout / 2;
        let mut resent = false;
        loop {
            let wait = if resent { deadline } else { halfway };
            let n = match tokio::time::timeout_at(wait, sock.recv(&mut buf)).await {
                Ok(r) => r.map_err(|e| self.io_error(e))?,
                Err(_) if !resent => {
                    resent = true;
                    sock.send(wire).await.map_err(|e| self.io_error(e))?;
                    continue;
                }
                Err(_) => return Err(self.timeout_error()),
            };
            if let Some(reply) = reply_to(&buf[..n], name, kind, id) {
                return Ok(reply);
            }
        }
    }

    /// Sends `wire` over TCP (two-byte length prefix, RFC 1035 4.2.2) and reads the reply.
    async fn exchange_tcp(
        &self,
        wire: &[u8],
        name: &Name,
        kind: RecordType,
        id: u16,
        deadline: Instant,
    ) -> Result<Message, DnsError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let exchange = async {
            let mut tcp = tokio::net::TcpStream::connect(self.server).await?;
            let len = u16::try_from(wire.len())
                .map_err(|_| io::Error::other("query too long for TCP"))?;
            let mut out = Vec::with_capacity(wire.len() + 2);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(wire);
            tcp.write_all(&out).await?;
            let n = usize::from(tcp.read_u16().await?);
            let mut buf = vec![0u8; n];
            tcp.read_exact(&mut buf).await?;
            Ok::<_, io::Error>(buf)
        };
        let buf = tokio::time::timeout_at(deadline, exchange)
            .await
            .map_err(|_| self.timeout_error())?
            .map_err(|e| self.io_error(e))?;
        match Message::from_vec(&buf) {
            Ok(reply) if answers(&reply, name, kind, id) => Ok(reply),
            Ok(_) => Err(DnsError::Proto(format!(
                "the TCP answer from {} is not for {name} {kind}",
                self.server
            ))),
            Err(e) => Err(DnsError::Proto(e.to_string())),
        }
    }
}

/// The name queried for `host` (made fully qualified).
fn query_name(host: &str) -> Result<Name, DnsError> {
    let fqdn = format!("{}.", host.trim_end_matches('.'));
    Name::from_ascii(&fqdn).map_err(|_| DnsError::BadName(host.to_owned()))
}

/// `bytes` decoded, if they are a reply to the query `id` for `name` `kind`.
fn reply_to(bytes: &[u8], name: &Name, kind: RecordType, id: u16) -> Option<Message> {
    Message::from_vec(bytes)
        .ok()
        .filter(|reply| answers(reply, name, kind, id))
}

/// What a reply from `server` to the query for `host` (`name`) `kind` answers.
fn answer_of(
    reply: &Message,
    server: SocketAddr,
    host: &str,
    name: &Name,
    kind: RecordType,
) -> Result<Answer, DnsError> {
    match reply.metadata.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => {
            return Ok(Answer {
                addrs: vec![],
                ttl: MIN_TTL,
            });
        }
        code => {
            return Err(DnsError::Rcode {
                server,
                host: host.to_owned(),
                code,
            });
        }
    }
    let (addrs, ttl) = addresses_of(reply, name, kind);
    let ttl = if addrs.is_empty() {
        MIN_TTL
    } else {
        Duration::from_secs(u64::from(ttl))
    };
    Ok(Answer { addrs, ttl })
}

/// What the resolver makes of `bytes` arriving from `server` over UDP for its query `id` for
/// the A (or, with `v6`, AAAA) records of `host`: `None` when they are no reply to that query
/// (ignored, as a stray datagram is). The truncation bit is not followed here (the resolver
/// asks again over TCP). The seam the fuzz targets use.
#[doc(hidden)]
pub fn read_udp_reply(
    server: SocketAddr,
    bytes: &[u8],
    host: &str,
    v6: bool,
    id: u16,
) -> Option<Result<Answer, DnsError>> {
    let kind = if v6 { RecordType::AAAA } else { RecordType::A };
    let name = match query_name(host) {
        Ok(name) => name,
        Err(e) => return Some(Err(e)),
    };
    let reply = reply_to(bytes, &name, kind, id)?;
    Some(answer_of(&reply, server, host, &name, kind))
}

/// Longest CNAME chain followed.
const MAX_CNAME_CHAIN: usize = 8;

/// True if `reply` answers the query `id` for `name` `kind`: a response with that id whose one
/// question is the one asked.
fn answers(reply: &Message, name: &Name, kind: RecordType, id: u16) -> bool {
    reply.metadata.id == id
        && reply.metadata.message_type == hickory_proto::op::MessageType::Response
        && reply.queries.len() == 1
        && reply.queries[0].query_type() == kind
        && reply.queries[0].name().eq_ignore_root_case(name)
}

/// The addresses `reply` gives for `name` (and the lowest TTL on the way): only records owned by
/// `name` or by a name its CNAME chain leads to, in order, at most [`MAX_CNAME_CHAIN`] links.
/// Records for any other owner (what a spoofing or confused server might add) are ignored.
fn addresses_of(reply: &Message, name: &Name, kind: RecordType) -> (Vec<IpAddr>, u32) {
    let mut owner = name.clone();
    let mut ttl = u32::MAX;
    for _ in 0..=MAX_CNAME_CHAIN {
        let owned: Vec<_> = reply
            .answers
            .iter()
            .filter(|r| r.name.eq_ignore_root_case(&owner))
            .collect();
        let addrs: Vec<IpAddr> = owned
            .iter()
            .filter_map(|r| match (&r.data, kind) {
                (RData::A(a), RecordType::A) => Some((IpAddr::V4(a.0), r.ttl)),
                (RData::AAAA(a), RecordType::AAAA) => Some((IpAddr::V6(a.0), r.ttl)),
                _ => None,
            })
            .map(|(ip, t)| {
                ttl = ttl.min(t);
                ip
            })
            .collect();
        if !addrs.is_empty() {
            return (addrs, ttl);
        }
        match owned.iter().find_map(|r| match &r.data {
            RData::CNAME(c) => Some((c.0.clone(), r.ttl)),
            _ => None,
        }) {
            Some((next, t)) => {
                ttl = ttl.min(t);
                owner = next;
            }
            None => break,
        }
    }
    (Vec::new(), ttl)
}

#[derive(Debug, Default)]
struct Entries {
    /// Host → its addresses and when to ask again.
    hosts: BTreeMap<String, (Vec<IpAddr>, Instant)>,
    by_ip: HashMap<IpAddr, BTreeSet<String>>,
}

impl Entries {
    fn rebuild_index(&mut self) {
        self.by_ip.clear();
        for (host, (addrs, _)) in &self.hosts {
            for ip in addrs {
                self.by_ip.entry(*ip).or_default().insert(host.clone());
            }
        }
    }
}

impl Resolved for DnsCache {
    fn addrs_of(&self, host: &str) -> Vec<IpAddr> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .hosts
            .get(host)
            .map(|(a, _)| a.clone())
            .unwrap_or_default()
    }
}

/// Answers for the hosts of DNS-resolution ServiceEntries, kept fresh by [`DnsCache::run`].
#[derive(Debug)]
pub struct DnsCache {
    resolver: Resolver,
    entries: RwLock<Entries>,
}

impl DnsCache {
    /// An empty cache resolving with `resolver`.
    pub fn new(resolver: Resolver) -> Arc<Self> {
        Arc::new(Self {
            resolver,
            entries: RwLock::default(),
        })
    }

    /// The resolver behind the cache.
    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }

    /// A host (of a DNS-resolution ServiceEntry) that resolved to `ip`, if any (the first by name).
    pub fn host_for(&self, ip: IpAddr) -> Option<String> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .by_ip
            .get(&ip)
            .and_then(|s| s.iter().next().cloned())
    }

    /// The addresses currently known for `host`.
    pub fn addrs_of(&self, host: &str) -> Vec<IpAddr> {
        Resolved::addrs_of(self, host)
    }

    /// Resolves every host in `wanted` whose answer is due, forgets hosts no longer wanted, and
    /// returns when the next answer falls due.
    pub async fn refresh(&self, wanted: &BTreeSet<String>) -> Instant {
        let now = Instant::now();
        let due: Vec<String> = {
            let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
            let before = entries.hosts.len();
            entries.hosts.retain(|h, _| wanted.contains(h));
            if entries.hosts.len() != before {
                entries.rebuild_index();
            }
            wanted
                .iter()
                .filter(|h| entries.hosts.get(*h).is_none_or(|(_, at)| *at <= now))
                .cloned()
                .collect()
        };
        let results = futures::future::join_all(due.iter().map(|h| self.resolver.lookup(h))).await;
        {
            let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
            for (host, result) in due.into_iter().zip(results) {
                match result {
                    Ok(ans) => {
                        debug!(%host, addrs = ?ans.addrs, ttl = ?ans.ttl, "egress DNS answer");
                        entries.hosts.insert(host, (ans.addrs, now + ans.ttl));
                    }
                    Err(e) => {
                        warn!(%host, error = %e, "resolving a DNS ServiceEntry host");
                        // Keep the last answer for a while rather than forgetting the host.
                        let old = entries
                            .hosts
                            .get(&host)
                            .map(|(a, _)| a.clone())
                            .unwrap_or_default();
                        entries.hosts.insert(host, (old, now + RETRY));
                    }
                }
            }
            entries.rebuild_index();
            entries
                .hosts
                .values()
                .map(|(_, at)| *at)
                .min()
                .unwrap_or(now + MAX_TTL)
        }
    }

    /// Keeps the cache equal to the DNS hosts of the current MeshState until aborted.
    pub async fn run(self: Arc<Self>, mut state: StateHandle) {
        let mut wanted = state.current().egress.dns_hosts();
        loop {
            let next = self.refresh(&wanted).await;
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                changed = state.changed() => match changed {
                    Some(s) => wanted = s.egress.dns_hosts(),
                    None => return,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use hickory_proto::{
        op::{Message, MessageType, OpCode},
        rr::{Record, rdata::A},
    };

    use super::*;

    /// A real UDP DNS server on loopback answering `*.test` with 198.51.100.<n> where n counts
    /// the queries so far, TTL `ttl`; AAAA is answered empty; `gone.test` is NXDOMAIN.
    async fn server(ttl: u32) -> (SocketAddr, Arc<AtomicU32>) {
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = sock.local_addr().expect("addr");
        let count = Arc::new(AtomicU32::new(0));
        let c = count.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
                let Some(query) = q.queries.first().cloned() else {
                    continue;
                };
                r.add_query(query.clone());
                if query.name().to_ascii() == "gone.test." {
                    r.metadata.response_code = ResponseCode::NXDomain;
                } else if query.query_type() == RecordType::A {
                    let k = c.fetch_add(1, Ordering::SeqCst) + 1;
                    let ip = std::net::Ipv4Addr::new(198, 51, 100, k as u8);
                    r.add_answer(Record::from_rdata(
                        query.name().clone(),
                        ttl,
                        RData::A(A(ip)),
                    ));
                }
                let _ = sock.send_to(&r.to_vec().expect("encode"), peer).await;
            }
        });
        (addr, count)
    }

    /// A hostile or quirky DNS server on loopback, UDP and TCP on one port. For A queries:
    /// `chain.test` answers with a stranger's record first, then a CNAME to `cdn.test` and its
    /// address 192.0.2.7; `forged.test` answers only with `evil.test`'s address; `big.test`
    /// answers truncated (and empty) over UDP, 192.0.2.8 over TCP.
    async fn hostile_server() -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = udp.local_addr().expect("addr");
        let tcp = tokio::net::TcpListener::bind(addr).await.expect("bind tcp");
        fn answer(q: &Message, over_tcp: bool) -> Option<Vec<u8>> {
            let query = q.queries.first()?.clone();
            let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
            r.add_query(query.clone());
            let name = |s: &str| Name::from_ascii(s).expect("name");
            let a = |owner: &str, ip: [u8; 4]| {
                Record::from_rdata(name(owner), 60, RData::A(A(std::net::Ipv4Addr::from(ip))))
            };
            if query.query_type() == RecordType::A {
                match query.name().to_ascii().as_str() {
                    "chain.test." => {
                        r.add_answer(a("other.test.", [6, 6, 6, 6]));
                        r.add_answer(Record::from_rdata(
                            name("chain.test."),
                            60,
                            RData::CNAME(hickory_proto::rr::rdata::CNAME(name("cdn.test."))),
                        ));
                        r.add_answer(a("cdn.test.", [192, 0, 2, 7]));
                    }
                    "forged.test." => {
                        r.add_answer(a("evil.test.", [6, 6, 6, 6]));
                    }
                    "big.test." if over_tcp => {
                        r.add_answer(a("big.test.", [192, 0, 2, 8]));
                    }
                    "big.test." => r.metadata.truncation = true,
                    _ => {}
                }
            }
            r.to_vec().ok()
        }
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                if let Some(out) = Message::from_vec(&buf[..n])
                    .ok()
                    .and_then(|q| answer(&q, false))
                {
                    let _ = udp.send_to(&out, peer).await;
                }
            }
        });
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = tcp.accept().await {
                tokio::spawn(async move {
                    let Ok(n) = conn.read_u16().await else { return };
                    let mut buf = vec![0u8; usize::from(n)];
                    if conn.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    if let Some(out) = Message::from_vec(&buf).ok().and_then(|q| answer(&q, true)) {
                        let mut framed = (out.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&out);
                        let _ = conn.write_all(&framed).await;
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn only_the_asked_name_and_its_cname_chain_count() {
        let r = Resolver::new(hostile_server().await, Duration::from_secs(2));
        let chain = r.lookup("chain.test").await.expect("chain.test");
        assert_eq!(chain.addrs, vec![IpAddr::from([192, 0, 2, 7])]);
        let forged = r.lookup("forged.test").await.expect("forged.test");
        assert_eq!(
            forged.addrs,
            Vec::<IpAddr>::new(),
            "a stranger's record was taken"
        );
    }

    #[tokio::test]
    async fn a_truncated_answer_is_asked_again_over_tcp() {
        let r = Resolver::new(hostile_server().await, Duration::from_secs(2));
        let big = r.lookup("big.test").await.expect("big.test");
        assert_eq!(big.addrs, vec![IpAddr::from([192, 0, 2, 8])]);
    }

    #[tokio::test]
    async fn lookups_return_addresses_and_ttl() {
        let (addr, _) = server(7).await;
        let r = Resolver::new(addr, Duration::from_secs(2));
        let ans = r.lookup("api.test").await.expect("answer");
        assert_eq!(ans.addrs, vec![IpAddr::from([198, 51, 100, 1])]);
        assert_eq!(ans.ttl, Duration::from_secs(7));
        let none = r.lookup("gone.test").await.expect("nxdomain is an answer");
        assert!(none.addrs.is_empty());
        assert!(r.lookup("bad name!").await.is_err());
    }

    #[tokio::test]
    async fn an_unanswering_server_times_out() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let r = Resolver::new(
            silent.local_addr().expect("addr"),
            Duration::from_millis(200),
        );
        let err = r.lookup("api.test").await.expect_err("no answer");
        assert!(matches!(err, DnsError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn the_cache_re_resolves_on_ttl_and_forgets_unwanted_hosts() {
        let (addr, count) = server(1).await;
        let cache = DnsCache::new(Resolver::new(addr, Duration::from_secs(2)));
        let wanted: BTreeSet<String> = ["api.test".to_owned()].into();
        let next = cache.refresh(&wanted).await;
        let first = IpAddr::from([198, 51, 100, 1]);
        assert_eq!(cache.host_for(first).as_deref(), Some("api.test"));
        // Not due yet: no new query.
        cache.refresh(&wanted).await;
        assert_eq!(count.load(Ordering::SeqCst), 1);
        tokio::time::sleep_until(next).await;
        cache.refresh(&wanted).await;
        assert_eq!(count.load(Ordering::SeqCst), 2, "re-resolved after the TTL");
        assert_eq!(cache.host_for(first), None, "the old address is forgotten");
        assert_eq!(
            cache.host_for(IpAddr::from([198, 51, 100, 2])).as_deref(),
            Some("api.test")
        );
        cache.refresh(&BTreeSet::new()).await;
        assert_eq!(cache.host_for(IpAddr::from([198, 51, 100, 2])), None);
    }
}

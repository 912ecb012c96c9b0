//! The servers of the simulated internet, run as `sluice-testpod internet DIR DNS_ADDR` inside
//! the internet's network namespace (see [`crate::internet`] for the files in `DIR`).
//!
//! * HTTP/1.1 on `0.0.0.0:80` and HTTP over TLS on `0.0.0.0:443` answer every request with
//!   `200` and a JSON body `{"proto","peer","local","host","path","sni"}`.
//! * TLS certificates come from a CA generated at start (`DIR/ca.pem`), issued on demand for
//!   the SNI names listed in `DIR/tls-hosts`; any other SNI (or none) fails the handshake.
//! * DNS on `DNS_ADDR:53`, UDP and TCP: A records from `DIR/dns.json`, read on every query.
//!
//! Every connection or query appends one JSON line to `DIR/log.jsonl`, written before the
//! answer is sent, so a client that got its answer finds its record already there.
use std::{
    collections::HashMap,
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{RData, Record, RecordType, rdata::A},
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use serde_json::{Value, json};

use super::{CA_FILE, DNS_FILE, DnsTable, LOG_FILE, TLS_HOSTS_FILE};

/// Appends JSON lines to the log, one whole line per write.
struct Log(Mutex<File>);

impl Log {
    fn record(&self, v: Value) {
        let line = format!("{v}\n");
        if let Ok(mut f) = self.0.lock() {
            let _ = f.write_all(line.as_bytes());
            let _ = f.flush();
        }
    }
}

/// Runs the servers until killed; prints `{"event":"listening"}` once all listen.
pub fn run(args: &[String]) -> Result<(), String> {
    let dir = PathBuf::from(args.first().ok_or("missing DIR")?);
    let dns_addr: IpAddr = args
        .get(1)
        .ok_or("missing DNS_ADDR")?
        .parse()
        .map_err(|_| "bad DNS_ADDR")?;
    let log = Arc::new(Log(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(LOG_FILE))
            .map_err(|e| format!("log: {e}"))?,
    )));
    let resolver = Arc::new(Issuing::generate(&dir)?);
    let tls = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(resolver),
    );
    let bind = |addr: SocketAddr| TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"));
    let http = bind(SocketAddr::new([0, 0, 0, 0].into(), 80))?;
    let https = bind(SocketAddr::new([0, 0, 0, 0].into(), 443))?;
    let dns_tcp = bind(SocketAddr::new(dns_addr, 53))?;
    let dns_udp = UdpSocket::bind(SocketAddr::new(dns_addr, 53))
        .map_err(|e| format!("bind udp {dns_addr}:53: {e}"))?;

    let l = log.clone();
    accept_loop(http, move |conn| serve_http(conn, &l));
    let l = log.clone();
    accept_loop(https, move |conn| serve_tls(conn, &tls, &l));
    let (l, d) = (log.clone(), dir.clone());
    accept_loop(dns_tcp, move |conn| serve_dns_tcp(conn, &d, &l));
    println!("{}", json!({"event": "listening"}));
    let _ = std::io::stdout().flush();
    serve_dns_udp(&dns_udp, &dir, &log);
    Ok(())
}

/// Accepts on a thread; each connection gets its own thread running `handle`.
fn accept_loop<F>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream) + Clone + Send + 'static,
{
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            let handle = handle.clone();
            std::thread::spawn(move || handle(conn));
        }
    });
}

fn addrs(conn: &TcpStream) -> (String, String) {
    let s = |a: std::io::Result<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
    (s(conn.peer_addr()), s(conn.local_addr()))
}

/// A parsed request head: (method, path, Host header).
type Head = (String, String, Option<String>);

fn read_head(r: &mut impl Read) -> Result<Head, String> {
    let mut reader = BufReader::new(r);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("request line: {e}"))?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Err(format!("bad request line {line:?}"));
    };
    let (method, path) = (method.to_owned(), path.to_owned());
    let mut host = None;
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| format!("header: {e}"))?;
        let l = line.trim_end();
        if n == 0 || l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':')
            && k.eq_ignore_ascii_case("host")
        {
            host = Some(v.trim().to_owned());
        }
    }
    Ok((method, path, host))
}

/// Reads one request, records it, answers it with the JSON body.
fn exchange(
    stream: &mut (impl Read + Write),
    mut record: Value,
    log: &Log,
) -> Result<(), std::io::Error> {
    match read_head(stream) {
        Ok((method, path, host)) => {
            record["method"] = json!(method);
            record["path"] = json!(path);
            record["host"] = json!(host);
            log.record(record.clone());
            let body = record.to_string();
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            stream.flush()
        }
        Err(e) => {
            record["error"] = json!(e);
            log.record(record);
            Ok(())
        }
    }
}

fn serve_http(mut conn: TcpStream, log: &Log) {
    let (peer, local) = addrs(&conn);
    let record = json!({"proto": "http", "peer": peer, "local": local});
    let _ = exchange(&mut conn, record, log);
}

fn serve_tls(mut conn: TcpStream, config: &Arc<rustls::ServerConfig>, log: &Log) {
    let (peer, local) = addrs(&conn);
    let mut record = json!({"proto": "tls", "peer": peer, "local": local});
    let Ok(mut tls) = rustls::ServerConnection::new(config.clone()) else {
        return;
    };
    while tls.is_handshaking() {
        if let Err(e) = tls.complete_io(&mut conn) {
            record["sni"] = json!(tls.server_name());
            record["error"] = json!(format!("handshake: {e}"));
            log.record(record);
            return;
        }
    }
    record["sni"] = json!(tls.server_name());
    let mut stream = rustls::StreamOwned::new(tls, conn);
    let _ = exchange(&mut stream, record, log);
    stream.conn.send_close_notify();
    let _ = stream.conn.complete_io(&mut stream.sock);
}

/// Issues a server certificate for any SNI name listed in `tls-hosts`, signed by the CA.
struct Issuing {
    issuer: Issuer<'static, KeyPair>,
    ca: CertificateDer<'static>,
    hosts: PathBuf,
    issued: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for Issuing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuing")
            .field("hosts", &self.hosts)
            .finish()
    }
}

impl Issuing {
    /// A fresh CA, its certificate written to `dir/ca.pem`.
    fn generate(dir: &Path) -> Result<Self, String> {
        let err = |e: rcgen::Error| format!("test CA: {e}");
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Sluice test internet CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(err)?;
        std::fs::write(dir.join(CA_FILE), cert.pem()).map_err(|e| format!("ca.pem: {e}"))?;
        Ok(Self {
            ca: cert.der().clone(),
            issuer: Issuer::new(params, key),
            hosts: dir.join(TLS_HOSTS_FILE),
            issued: Mutex::new(HashMap::new()),
        })
    }

    fn issue(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let mut issued = self.issued.lock().ok()?;
        if let Some(c) = issued.get(name) {
            return Some(c.clone());
        }
        let key = KeyPair::generate().ok()?;
        let cert = CertificateParams::new(vec![name.to_owned()])
            .ok()?
            .signed_by(&key, &self.issuer)
            .ok()?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der).ok()?;
        let certified = Arc::new(CertifiedKey::new(
            vec![cert.der().clone(), self.ca.clone()],
            signing,
        ));
        issued.insert(name.to_owned(), certified.clone());
        Some(certified)
    }
}

impl ResolvesServerCert for Issuing {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name()?.to_ascii_lowercase();
        let hosts = std::fs::read_to_string(&self.hosts).unwrap_or_default();
        if !hosts.lines().any(|h| h.trim().eq_ignore_ascii_case(&sni)) {
            return None;
        }
        self.issue(&sni)
    }
}

/// Answers one DNS message from the table; records it. `None` if it does not parse.
fn answer(query: &[u8], dir: &Path, mut record: Value, log: &Log) -> Option<Vec<u8>> {
    let request = match Message::from_vec(query) {
        Ok(m) => m,
        Err(e) => {
            record["error"] = json!(format!("bad query: {e}"));
            log.record(record);
            return None;
        }
    };
    let table: DnsTable = std::fs::read(dir.join(DNS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut response = Message::new(
        request.metadata.id,
        MessageType::Response,
        request.metadata.op_code,
    );
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    let mut answers = Vec::new();
    match (request.metadata.op_code, request.queries.first()) {
        (OpCode::Query, Some(q)) => {
            response.add_query(q.clone());
            let qname = q.name().to_ascii();
            let key = qname.trim_end_matches('.').to_ascii_lowercase();
            record["qname"] = json!(key);
            record["qtype"] = json!(q.query_type().to_string());
            match table.a.get(&key) {
                Some(ips) => {
                    if q.query_type() == RecordType::A {
                        for ip in ips {
                            answers.push(ip.to_string());
                            response.add_answer(Record::from_rdata(
                                q.name().clone(),
                                table.ttl,
                                RData::A(A(*ip)),
                            ));
                        }
                    }
                }
                None => response.metadata.response_code = ResponseCode::NXDomain,
            }
        }
        _ => response.metadata.response_code = ResponseCode::FormErr,
    }
    record["rcode"] = json!(format!("{:?}", response.metadata.response_code));
    record["answers"] = json!(answers);
    log.record(record);
    response.to_vec().ok()
}

fn serve_dns_udp(socket: &UdpSocket, dir: &Path, log: &Log) {
    let local = socket
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let record =
            json!({"proto": "dns", "transport": "udp", "peer": peer.to_string(), "local": local});
        if let Some(reply) = answer(&buf[..n], dir, record, log) {
            let _ = socket.send_to(&reply, peer);
        }
    }
}

fn serve_dns_tcp(mut conn: TcpStream, dir: &Path, log: &Log) {
    let (peer, local) = addrs(&conn);
    loop {
        let mut len = [0u8; 2];
        if conn.read_exact(&mut len).is_err() {
            return;
        }
        let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
        if conn.read_exact(&mut query).is_err() {
            return;
        }
        let record = json!({"proto": "dns", "transport": "tcp", "peer": peer, "local": local});
        let Some(reply) = answer(&query, dir, record, log) else {
            return;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        if conn.write_all(&len.to_be_bytes()).is_err() || conn.write_all(&reply).is_err() {
            return;
        }
    }
}

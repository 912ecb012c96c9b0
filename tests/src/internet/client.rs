//! The clients `sluice-testpod` runs in pods against the simulated internet. Each returns the
//! JSON it prints, or an error string (printed as `{"error":..}`).
//!
//! * `http-get ADDR HOST [PATH]` → `{"local","status","body"}`: `body` is the server's JSON
//!   (a string if it is not JSON).
//! * `tls-get ADDR SNI CA_FILE [PATH]` → the same, verifying the server against `CA_FILE`;
//!   a failed handshake or verification is the error `tls: ...`.
//! * `dns SERVER NAME [udp|tcp]` → `{"rcode","answers":[{"ip","ttl"}]}` for an A query
//!   (`rcode` as `NoError`, `NXDomain`, ...).
use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    sync::Arc,
    time::Duration,
};

use hickory_proto::{
    op::{Message, Query},
    rr::{Name, RData, RecordType},
};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(10);

fn parse<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T, String> {
    args.get(i)
        .ok_or(format!("missing {what}"))?
        .parse()
        .map_err(|_| format!("bad {what}"))
}

fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    Ok(s)
}

/// Sends a GET and reads the whole answer (the server closes after one).
fn get(
    stream: &mut (impl Read + Write),
    host: &str,
    path: &str,
    err: &str,
) -> Result<(u64, Value), String> {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .and_then(|()| stream.flush())
    .map_err(|e| format!("{err}send: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("{err}receive: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or(format!("no HTTP answer: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(format!("bad status line in {head:?}"))?;
    let body = serde_json::from_str(body).unwrap_or_else(|_| json!(body));
    Ok((status, body))
}

/// `http-get ADDR HOST [PATH]`.
pub fn http_get(args: &[String]) -> Result<Value, String> {
    let addr: SocketAddr = parse(args, 0, "ADDR")?;
    let host: String = parse(args, 1, "HOST")?;
    let path = args.get(2).map_or("/", String::as_str);
    let mut s = connect(addr)?;
    let local = s.local_addr().map_err(|e| e.to_string())?;
    let (status, body) = get(&mut s, &host, path, "")?;
    Ok(json!({"local": local.to_string(), "status": status, "body": body}))
}

/// `tls-get ADDR SNI CA_FILE [PATH]`.
pub fn tls_get(args: &[String]) -> Result<Value, String> {
    let addr: SocketAddr = parse(args, 0, "ADDR")?;
    let sni: String = parse(args, 1, "SNI")?;
    let ca: String = parse(args, 2, "CA_FILE")?;
    let path = args.get(3).map_or("/", String::as_str);
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&ca).map_err(|e| format!("{ca}: {e}"))? {
        roots
            .add(cert.map_err(|e| format!("{ca}: {e}"))?)
            .map_err(|e| format!("{ca}: {e}"))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from(sni.clone()).map_err(|e| format!("SNI {sni}: {e}"))?;
    let tls =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| format!("tls: {e}"))?;
    let mut sock = connect(addr)?;
    let local = sock.local_addr().map_err(|e| e.to_string())?;
    let mut stream = rustls::StreamOwned::new(tls, sock.try_clone().map_err(|e| e.to_string())?);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut sock)
            .map_err(|e| format!("tls: {e}"))?;
    }
    let (status, body) = get(&mut stream, &sni, path, "tls: ")?;
    Ok(json!({"local": local.to_string(), "status": status, "body": body}))
}

/// `dns SERVER NAME [udp|tcp]`: one A query.
pub fn dns(args: &[String]) -> Result<Value, String> {
    let server: IpAddr = parse(args, 0, "SERVER")?;
    let name: String = parse(args, 1, "NAME")?;
    let transport = args.get(2).map_or("udp", String::as_str);
    let server = SocketAddr::new(server, 53);
    let qname = Name::from_ascii(&name).map_err(|e| format!("name {name}: {e}"))?;
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(qname, RecordType::A));
    let bytes = query.to_vec().map_err(|e| e.to_string())?;
    let reply = match transport {
        "udp" => {
            let bind: SocketAddr = if server.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()
            .map_err(|_| "bind address")?;
            let s = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            s.connect(server)
                .map_err(|e| format!("connect {server}: {e}"))?;
            s.send(&bytes).map_err(|e| format!("send: {e}"))?;
            let mut buf = vec![0u8; 4096];
            let n = s.recv(&mut buf).map_err(|e| format!("receive: {e}"))?;
            buf.truncate(n);
            buf
        }
        "tcp" => {
            let mut s = connect(server)?;
            let len = u16::try_from(bytes.len()).map_err(|e| e.to_string())?;
            s.write_all(&len.to_be_bytes())
                .and_then(|()| s.write_all(&bytes))
                .map_err(|e| format!("send: {e}"))?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len)
                .map_err(|e| format!("receive: {e}"))?;
            let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut buf)
                .map_err(|e| format!("receive: {e}"))?;
            buf
        }
        other => return Err(format!("transport {other}: use udp or tcp")),
    };
    let reply = Message::from_vec(&reply).map_err(|e| format!("bad reply: {e}"))?;
    if reply.metadata.id != query.metadata.id {
        return Err("reply id does not match".into());
    }
    let answers: Vec<Value> = reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(json!({"ip": a.0.to_string(), "ttl": r.ttl})),
            _ => None,
        })
        .collect();
    Ok(json!({"rcode": format!("{:?}", reply.metadata.response_code), "answers": answers}))
}

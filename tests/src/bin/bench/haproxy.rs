//! HAProxy as the mesh benchmark's peer: a mutual-TLS TCP tunnel between the same two nodes, on
//! the same veth path as Sluice's HBONE connections.
//!
//! client pod → haproxy in node 1 (plain TCP listener on the node's pod-facing address) → TLS 1.3,
//! ECDSA P-256 certificates issued from the world's mesh root, verified both ways → haproxy in
//! node 2 → server pod. Both processes run in their node's network namespace (not in its cgroup,
//! so Sluice's capture hooks never see them), from Debian's package; their certificates, keys and
//! configuration live in a temporary directory removed with the peer.
use std::{
    fs::File,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use sluice_tests::{
    netns,
    world::{World, link_id},
};

/// Node 1's plain listeners (on 10.0.1.1, the address every pod of node 1 routes to).
const ECHO_PORT: u16 = 28080;
/// The same echo server, but node 1's haproxy never resumes a TLS session to node 2 for it: each
/// connection pays a full handshake.
const ECHO_FULL_PORT: u16 = 28081;
const SINK_PORT: u16 = 29000;
/// Node 2's TLS listeners (on its underlay address).
const TLS_ECHO_PORT: u16 = 28443;
const TLS_SINK_PORT: u16 = 29443;
/// What the README says was set: both processes get these lines in `global`.
pub const TUNING: &str = "nbthread 2, tune.bufsize 65536, maxconn 5000, option splice-auto";

/// Both haproxy processes; killed, and their files removed, when dropped.
pub struct HaproxyPeer {
    children: Vec<Child>,
    dir: tempfile::TempDir,
    node2: IpAddr,
    /// Node 2's DNS name in its certificate (node 1 checks it with `verifyhost`).
    node2_name: String,
}

/// A leaf certificate and key signed by the mesh root: `(cert PEM, key PEM)`.
fn issue(issuer: &Issuer<'_, KeyPair>, spiffe: &str, dns: &str) -> (String, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![
        SanType::URI(spiffe.try_into().expect("SPIFFE URI")),
        SanType::DnsName(dns.try_into().expect("DNS name")),
    ];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, issuer).expect("sign leaf");
    (cert.pem(), key.serialize_pem())
}

/// Fails the bench (never skips) when Debian's haproxy is not installed.
pub fn require_haproxy() -> String {
    let out = Command::new("haproxy")
        .arg("-v")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "the mesh benchmark runs HAProxy beside Sluice and cannot find `haproxy` ({e}): \
             run `cargo xtask setup` (Debian package haproxy)"
            )
        });
    assert!(out.status.success(), "haproxy -v failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

impl HaproxyPeer {
    /// Starts node 2's haproxy (TLS → `server`'s echo on 8080 and sink on 9000) and node 1's
    /// (plain → TLS to node 2), and waits until both listen.
    pub fn start(w: &World, server: IpAddr) -> HaproxyPeer {
        let dir = tempfile::Builder::new()
            .prefix("sluice-bench-haproxy-")
            .tempdir()
            .expect("haproxy tempdir");
        let root_pem = std::fs::read_to_string(w.root_cert()).expect("mesh root certificate");
        let root_key =
            std::fs::read_to_string(w.dir.path().join("root-key.pem")).expect("mesh root key");
        let issuer = Issuer::from_ca_cert_pem(
            &root_pem,
            KeyPair::from_pem(&root_key).expect("mesh root key PEM"),
        )
        .expect("mesh root as issuer");
        let link = link_id(1, 2);
        let node2: IpAddr = format!("172.30.{link}.2").parse().expect("ip");
        let node2_name = "haproxy-node2.bench.sluice".to_owned();
        let root_file = dir.path().join("root.pem");
        std::fs::write(&root_file, &root_pem).expect("write root");
        let mut crt = Vec::new();
        for (i, dns) in [(1, "haproxy-node1.bench.sluice"), (2, node2_name.as_str())] {
            let (cert, key) = issue(
                &issuer,
                &format!("spiffe://cluster.local/ns/bench/sa/haproxy-node{i}"),
                dns,
            );
            // HAProxy's `crt` file: certificate, then its key.
            let path = dir.path().join(format!("node{i}.pem"));
            std::fs::write(&path, format!("{cert}{key}")).expect("write crt");
            crt.push(path);
        }

        let global = |name: &str| {
            format!(
                "global\n  nbthread 2\n  maxconn 5000\n  tune.bufsize 65536\n  \
                 ssl-server-verify required\n  stats socket {}/{name}.sock mode 600 level admin\n\
                 defaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n  \
                 timeout client 120s\n  timeout server 120s\n",
                dir.path().display()
            )
        };
        let d = dir.path().display();
        let tls = "ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3";
        let n2 = format!(
            "{}\
             listen echo\n  bind {node2}:{TLS_ECHO_PORT} ssl crt {c2} ca-file {d}/root.pem verify required {tls}\n  server app {server}:8080\n\
             listen sink\n  bind {node2}:{TLS_SINK_PORT} ssl crt {c2} ca-file {d}/root.pem verify required {tls}\n  server app {server}:9000\n",
            global("node2"),
            c2 = crt[1].display(),
        );
        let upstream = |port: u16, extra: &str| {
            format!(
                "server node2 {node2}:{port} ssl crt {c1} ca-file {d}/root.pem verify required \
                 verifyhost {node2_name} {tls}{extra}",
                c1 = crt[0].display()
            )
        };
        let n1 = format!(
            "{}\
             listen echo\n  bind 10.0.1.1:{ECHO_PORT}\n  {}\n\
             listen echo_full\n  bind 10.0.1.1:{ECHO_FULL_PORT}\n  {}\n\
             listen sink\n  bind 10.0.1.1:{SINK_PORT}\n  {}\n",
            global("node1"),
            upstream(TLS_ECHO_PORT, ""),
            upstream(TLS_ECHO_PORT, " no-ssl-reuse"),
            upstream(TLS_SINK_PORT, ""),
        );
        let mut peer = HaproxyPeer {
            children: Vec::new(),
            dir,
            node2,
            node2_name,
        };
        for (i, cfg) in [(2, n2), (1, n1)] {
            let path = peer.dir.path().join(format!("node{i}.cfg"));
            std::fs::write(&path, cfg).expect("write haproxy.cfg");
            let check = netns::command(&w.node_netns(i), "haproxy")
                .args(["-c", "-q", "-f"])
                .arg(&path)
                .output()
                .expect("haproxy -c");
            assert!(
                check.status.success(),
                "node {i}'s haproxy.cfg is invalid: {}",
                String::from_utf8_lossy(&check.stderr)
            );
            let log = File::create(peer.log(i)).expect("haproxy log");
            let child = netns::command(&w.node_netns(i), "haproxy")
                // -db: foreground, one process (its threads per nbthread).
                .args(["-db", "-f"])
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log fd"))
                .stderr(log)
                .spawn()
                .expect("start haproxy");
            peer.children.push(child);
        }
        let waits = [
            (2, SocketAddr::new(node2, TLS_ECHO_PORT)),
            (2, SocketAddr::new(node2, TLS_SINK_PORT)),
            (1, SocketAddr::new(node1_pod_side(), ECHO_PORT)),
            (1, SocketAddr::new(node1_pod_side(), ECHO_FULL_PORT)),
            (1, SocketAddr::new(node1_pod_side(), SINK_PORT)),
        ];
        for (i, addr) in waits {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                for child in &mut peer.children {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!(
                            "haproxy exited ({status}):\n{}\n{}",
                            peer.log_text(1),
                            peer.log_text(2)
                        );
                    }
                }
                let up = netns::on_thread(&w.node_netns(i), move || {
                    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
                });
                if up {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "haproxy on node {i} never listened on {addr}:\n{}",
                    peer.log_text(i)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        peer
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{i}.log"))
    }

    pub fn log_text(&self, i: usize) -> String {
        std::fs::read_to_string(self.log(i)).unwrap_or_default()
    }

    /// The echo server through the tunnel (node 1 resumes TLS sessions to node 2, HAProxy's
    /// default).
    pub fn echo(&self) -> String {
        SocketAddr::new(node1_pod_side(), ECHO_PORT).to_string()
    }

    /// The echo server through the tunnel, a full TLS handshake per connection.
    pub fn echo_full(&self) -> String {
        SocketAddr::new(node1_pod_side(), ECHO_FULL_PORT).to_string()
    }

    /// The sink through the tunnel.
    pub fn sink(&self) -> String {
        SocketAddr::new(node1_pod_side(), SINK_PORT).to_string()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// Checks the tunnel really is mutual TLS on the mesh root, once: from node 1, a client
    /// with node 1's certificate gets the echo server's greeting from node 2's TLS listener;
    /// one without a certificate, and one with a certificate from another root, do not.
    pub fn check_mtls(&self, w: &World) {
        let root = std::fs::read(self.dir.path().join("root.pem")).expect("root");
        let node1_pem = std::fs::read(self.dir.path().join("node1.pem")).expect("node1.pem");
        let other = sluice::identity::BuiltinCa::generate("cluster.local").expect("other root");
        let (other_root_pem, other_key_pem) = other.root_pem_pair();
        let other_issuer = Issuer::from_ca_cert_pem(
            &other_root_pem,
            KeyPair::from_pem(&other_key_pem).expect("other root key"),
        )
        .expect("other root as issuer");
        let (c, k) = issue(
            &other_issuer,
            "spiffe://cluster.local/ns/bench/sa/intruder",
            "haproxy-node1.bench.sluice",
        );
        let foreign = format!("{c}{k}").into_bytes();
        let addr = SocketAddr::new(self.node2, TLS_ECHO_PORT);
        let name = self.node2_name.clone();
        let tries = [
            ("node 1's mesh certificate", Some(node1_pem)),
            ("no client certificate", None),
            ("a certificate from another root", Some(foreign)),
        ];
        let results = netns::on_thread(&w.node_netns(1), move || {
            tries
                .into_iter()
                .map(|(what, client)| (what, greeting(&root, client.as_deref(), addr, &name)))
                .collect::<Vec<_>>()
        });
        for (what, result) in &results {
            println!("haproxy mTLS check, {what}: {result:?}");
        }
        assert!(
            results[0].1.as_ref().is_ok_and(|g| g.contains("accepted")),
            "node 2's haproxy did not serve node 1's certificate: {:?}\n{}",
            results[0].1,
            self.log_text(2)
        );
        for (what, result) in &results[1..] {
            assert!(
                result.as_ref().is_err(),
                "node 2's haproxy served a client with {what}: {result:?}"
            );
        }
    }
}

/// Node 1's address on its pod veths (each pod's gateway).
fn node1_pod_side() -> IpAddr {
    IpAddr::from([10, 0, 1, 1])
}

/// A TLS 1.3 connection to `addr` trusting only `root_pem`, checking the server's DNS name,
/// with the client certificate and key in `client_pem` if any; the first line the application
/// behind it sends, or why there was none.
fn greeting(
    root_pem: &[u8],
    client_pem: Option<&[u8]>,
    addr: SocketAddr,
    name: &str,
) -> Result<String, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem) {
        roots.add(cert.expect("root PEM")).expect("add root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots);
    let config = match client_pem {
        Some(pem) => {
            let chain: Vec<_> = CertificateDer::pem_slice_iter(pem)
                .map(|c| c.expect("client cert PEM"))
                .collect();
            let key = PrivateKeyDer::from_pem_slice(pem).expect("client key PEM");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client auth")
        }
        None => builder.with_no_client_auth(),
    };
    let server_name = ServerName::try_from(name.to_owned()).expect("server name");
    let conn = rustls::ClientConnection::new(Arc::new(config), server_name)
        .map_err(|e| format!("client: {e}"))?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // The client's handshake ends before the server has judged its certificate: only reading
    // shows whether the server accepted it.
    tls.write_all(b"x").map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.contains(&b'\n') {
        match tls.read(&mut buf) {
            Ok(0) => return Err(format!("closed after {} bytes", got.len())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned())
}

impl Drop for HaproxyPeer {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The temporary directory (keys, configurations, logs) goes with `self.dir`.
    }
}

//! A simulated internet behind one node of a [`World`]: a network namespace joined to the
//! gateway node by a veth "uplink", with HTTP, TLS and DNS servers that record the source
//! address of every connection and query.
//!
//! Addressing (TEST-NET-3, fixed):
//! * gateway node: `uplink` with [`UPLINK_NODE`] `203.0.113.1/24`;
//! * internet: `eth0` with [`INTERNET_ADDR`] `203.0.113.2/24`, the server addresses
//!   [`SERVERS`] `203.0.113.10`–`.12` and the DNS server [`DNS_SERVER`] `203.0.113.53`
//!   (more with [`Internet::add_address`]); routes back to `10.0.0.0/8`, `172.30.0.0/16`
//!   and the egress prefixes ([`InternetSpec::egress_prefixes`], default
//!   [`EGRESS_PREFIX`] `198.51.100.0/24`) go via `203.0.113.1`; no default route, so nothing
//!   leaves the test's namespaces;
//! * every other node routes `203.0.113.0/24` to the gateway node over the underlay.
//!
//! Servers (see [`server`]): HTTP on every address port 80, TLS on port 443, DNS on
//! `203.0.113.53:53` (UDP and TCP). Their files live in [`Internet::dir`]:
//! `ca.pem` (the CA of the TLS servers), `tls-hosts` (names the TLS server has certificates
//! for, one a line), `dns.json` ([`DnsTable`]), `log.jsonl` (one [`Record`] a line).
pub mod client;
pub mod server;

use std::{
    collections::BTreeMap,
    fs::File,
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::world::{World, ip, link_id, testpod_bin};

/// The gateway node's end of the uplink.
pub const UPLINK_NODE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The internet's end of the uplink.
pub const INTERNET_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// Extra server addresses on the internet side (all serve HTTP and TLS).
pub const SERVERS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(203, 0, 113, 10),
    Ipv4Addr::new(203, 0, 113, 11),
    Ipv4Addr::new(203, 0, 113, 12),
];
/// The DNS server's address.
pub const DNS_SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 53);
/// The internet's subnet, routed to the gateway node by the other nodes.
pub const INTERNET_PREFIX: &str = "203.0.113.0/24";
/// The default egress prefix (TEST-NET-2) the internet routes back to the gateway node.
pub const EGRESS_PREFIX: &str = "198.51.100.0/24";

pub(crate) const CA_FILE: &str = "ca.pem";
pub(crate) const TLS_HOSTS_FILE: &str = "tls-hosts";
pub(crate) const DNS_FILE: &str = "dns.json";
pub(crate) const LOG_FILE: &str = "log.jsonl";

/// What the DNS server answers, `dns.json`: A records by lower-case name without the
/// trailing dot; a name in the table answers other types with no records, a name not in it
/// with NXDOMAIN.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DnsTable {
    /// TTL of every answer, seconds.
    pub ttl: u32,
    /// Name → addresses.
    pub a: BTreeMap<String, Vec<Ipv4Addr>>,
}

/// What to build.
#[derive(Clone, Debug)]
pub struct InternetSpec {
    /// Prefixes the internet routes back via the gateway node (the agent's egress addresses).
    pub egress_prefixes: Vec<String>,
    /// Names the TLS server has certificates for.
    pub tls_hosts: Vec<String>,
    /// DNS A records.
    pub dns: BTreeMap<String, Vec<Ipv4Addr>>,
    /// TTL of the DNS answers.
    pub dns_ttl: u32,
}

impl Default for InternetSpec {
    fn default() -> Self {
        Self {
            egress_prefixes: vec![EGRESS_PREFIX.into()],
            tls_hosts: Vec::new(),
            dns: BTreeMap::new(),
            dns_ttl: 30,
        }
    }
}

/// One line of `log.jsonl`: a connection or a query a server saw.
#[derive(Clone, Debug, Deserialize)]
pub struct Record {
    /// `http`, `tls` or `dns`.
    pub proto: String,
    /// Who connected or asked (the source address the internet saw).
    pub peer: SocketAddr,
    /// The server address it reached.
    pub local: SocketAddr,
    /// HTTP (and TLS): the request's Host header.
    #[serde(default)]
    pub host: Option<String>,
    /// HTTP (and TLS): the request's method.
    #[serde(default)]
    pub method: Option<String>,
    /// HTTP (and TLS): the request's path.
    #[serde(default)]
    pub path: Option<String>,
    /// TLS: the client's SNI.
    #[serde(default)]
    pub sni: Option<String>,
    /// DNS: `udp` or `tcp`.
    #[serde(default)]
    pub transport: Option<String>,
    /// DNS: the query name, lower case, without the trailing dot.
    #[serde(default)]
    pub qname: Option<String>,
    /// DNS: the query type (`A`, `AAAA`, ...).
    #[serde(default)]
    pub qtype: Option<String>,
    /// DNS: the answer code (`NoError`, `NXDomain`, `FormErr`).
    #[serde(default)]
    pub rcode: Option<String>,
    /// DNS: the addresses answered.
    #[serde(default)]
    pub answers: Vec<String>,
    /// Why the exchange failed (a TLS handshake, a request that did not parse).
    #[serde(default)]
    pub error: Option<String>,
}

/// A running internet; dropping it stops the servers and removes its namespace.
pub struct Internet {
    /// The internet's network namespace.
    pub netns: String,
    /// The node it hangs off (1-based).
    pub gateway: usize,
    /// The servers' files (CA, host list, DNS table, log).
    pub dir: PathBuf,
    dns: Mutex<DnsTable>,
    child: Option<Child>,
}

impl World {
    /// Adds an internet behind node `gateway_node` with the default [`InternetSpec`].
    pub fn add_internet(&mut self, gateway_node: usize) -> Internet {
        self.add_internet_with(gateway_node, InternetSpec::default())
    }

    /// Adds an internet behind node `gateway_node`: namespace, uplink, routes, servers.
    pub fn add_internet_with(&mut self, gateway_node: usize, spec: InternetSpec) -> Internet {
        assert!(
            gateway_node >= 1 && gateway_node <= self.nodes,
            "gateway node {gateway_node} of {}",
            self.nodes
        );
        let ns = format!("{}-internet", self.id);
        assert!(!self.extra_netns.contains(&ns), "a world has one internet");
        ip(None, &format!("netns add {ns}"));
        self.extra_netns.push(ns.clone());
        ip(Some(&ns), "link set lo up");
        let node = self.node_netns(gateway_node);
        ip(
            None,
            &format!("link add uplink netns {node} type veth peer name eth0 netns {ns}"),
        );
        ip(
            Some(&node),
            &format!("addr add {UPLINK_NODE}/24 dev uplink"),
        );
        ip(Some(&node), "link set uplink up");
        ip(Some(&ns), &format!("addr add {INTERNET_ADDR}/24 dev eth0"));
        for a in SERVERS.iter().chain([&DNS_SERVER]) {
            ip(Some(&ns), &format!("addr add {a}/32 dev eth0"));
        }
        ip(Some(&ns), "link set eth0 up");
        for prefix in ["10.0.0.0/8", "172.30.0.0/16"]
            .into_iter()
            .chain(spec.egress_prefixes.iter().map(String::as_str))
        {
            ip(Some(&ns), &format!("route add {prefix} via {UPLINK_NODE}"));
        }
        for j in (1..=self.nodes).filter(|&j| j != gateway_node) {
            ip(
                Some(&self.node_netns(j)),
                &format!(
                    "route add {INTERNET_PREFIX} via 172.30.{}.{gateway_node}",
                    link_id(j, gateway_node)
                ),
            );
        }

        let dir = self.dir.path().join("internet");
        std::fs::create_dir_all(&dir).expect("internet dir");
        let mut internet = Internet {
            netns: ns,
            gateway: gateway_node,
            dir,
            dns: Mutex::new(DnsTable {
                ttl: spec.dns_ttl,
                a: spec
                    .dns
                    .into_iter()
                    .map(|(k, v)| (normalize(&k), v))
                    .collect(),
            }),
            child: None,
        };
        internet.write_dns();
        std::fs::write(internet.dir.join(TLS_HOSTS_FILE), "").expect("tls-hosts");
        for h in &spec.tls_hosts {
            internet.add_tls_host(h);
        }
        let cgroup = self.cgroup_root.join("internet");
        std::fs::create_dir_all(&cgroup).expect("internet cgroup");
        internet.start(&cgroup);
        internet
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Internet {
    fn start(&mut self, cgroup: &Path) {
        let netns = File::open(Path::new("/run/netns").join(&self.netns)).expect("internet netns");
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(cgroup.join("cgroup.procs"))
            .expect("internet cgroup.procs");
        let mut cmd = Command::new(testpod_bin());
        cmd.arg("internet")
            .arg(&self.dir)
            .arg(DNS_SERVER.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: only async-signal-safe calls (write, setns) on descriptors opened before fork.
        unsafe {
            cmd.pre_exec(move || {
                let zero = b"0";
                if libc::write(procs.as_raw_fd(), zero.as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("start the internet's servers");
        let stdout = child.stdout.take().expect("piped stdout");
        self.child = Some(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the internet's servers did not start");
        assert!(
            line.contains("\"listening\""),
            "the internet's servers: {line}"
        );
    }

    /// The CA certificate (PEM) that issued the TLS servers' certificates.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join(CA_FILE)
    }

    /// The log of every connection and query (`log.jsonl`).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    /// Adds another server address on the internet side (HTTP and TLS answer on it).
    pub fn add_address(&self, addr: Ipv4Addr) {
        ip(Some(&self.netns), &format!("addr add {addr}/32 dev eth0"));
    }

    /// Routes another prefix back to the gateway node (e.g. more egress addresses).
    pub fn add_return_route(&self, prefix: &str) {
        ip(
            Some(&self.netns),
            &format!("route add {prefix} via {UPLINK_NODE}"),
        );
    }

    /// Lets the TLS server present a certificate for `name` (effective on the next handshake).
    pub fn add_tls_host(&self, name: &str) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join(TLS_HOSTS_FILE))
            .expect("tls-hosts");
        writeln!(f, "{}", normalize(name)).expect("write tls-hosts");
    }

    /// Sets the A records of `name` (an empty list answers NOERROR without records).
    pub fn set_dns(&self, name: &str, addrs: &[Ipv4Addr]) {
        self.dns
            .lock()
            .expect("dns table")
            .a
            .insert(normalize(name), addrs.to_vec());
        self.write_dns();
    }

    /// Removes `name` from the DNS table (it then answers NXDOMAIN).
    pub fn remove_dns(&self, name: &str) {
        self.dns
            .lock()
            .expect("dns table")
            .a
            .remove(&normalize(name));
        self.write_dns();
    }

    /// Sets the TTL of every DNS answer.
    pub fn set_dns_ttl(&self, ttl: u32) {
        self.dns.lock().expect("dns table").ttl = ttl;
        self.write_dns();
    }

    fn write_dns(&self) {
        let table = self.dns.lock().expect("dns table");
        let tmp = self.dir.join(format!("{DNS_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(&*table).expect("json")).expect("dns.json");
        std::fs::rename(&tmp, self.dir.join(DNS_FILE)).expect("dns.json");
    }

    /// Every record so far, oldest first.
    pub fn records(&self) -> Vec<Record> {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("internet log line {l:?}: {e}"))
            })
            .collect()
    }

    /// The first record matching `pred`, waiting up to `timeout` for it.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Record) -> bool) -> Option<Record> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.records().into_iter().find(&pred) {
                return Some(r);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The world may have removed it already.
        if std::path::Path::new("/run/netns")
            .join(&self.netns)
            .exists()
        {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.netns])
                .status();
        }
    }
}

//! Loading Sluice's eBPF programs, pinning them, and the typed maps the agent writes.
//!
//! Layout under the pin directory (default `/sys/fs/bpf/sluice`):
//! `maps/<map name>`, `progs/<program name>`, `links/<program name>` for the node-wide cgroup
//! attachments, and `links/pod-<uid>-sk_lookup` for each enrolled pod's namespace.
//!
//! Restarts adopt the pinned state: maps are reopened from their pins (their contents are the
//! capture state, so nothing is lost), and each pinned link is replaced by one to the newly
//! loaded program with no gap: the new link is attached before the old one is released.
use std::{
    collections::BTreeSet,
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, SockHash, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use ipnet::IpNet;
use sluice_common::{
    AF_INET, AF_INET6, Config, ENROLLED_CAPTURED, ENROLLED_CLOSED, EXCLUDE_INBOUND,
    EXCLUDE_OUTBOUND, HBONE_PORT, IpKey, OUTBOUND_PORT, OrigDst, PROXY_MARK, PeerKey, SourceKey,
    TRANSPARENT_MARK, maps,
};

use crate::netns::Netns;

pub mod object;

/// bpf_link attachments to a cgroup take no flags (the kernel refuses BPF_F_ALLOW_MULTI there)
/// and always coexist with other programs; aya spells "no flags" `Single`.
const LINK_ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

const CONNECT4: &str = "sluice_connect4";
const CONNECT6: &str = "sluice_connect6";
const GETPEER4: &str = "sluice_getpeer4";
const GETPEER6: &str = "sluice_getpeer6";
const SOCKOPS: &str = "sluice_sockops";
const SK_LOOKUP: &str = "sluice_sk_lookup";

/// Errors loading, attaching or updating the programs and maps.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(transparent)]
    NoKernelPrograms(#[from] object::NoKernelPrograms),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {0} missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("{what} {path}: {source}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("program {name}: link is not an fd link: {message}")]
    Link { name: &'static str, message: String },
    #[error("opening cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> EbpfError {
    move |source| EbpfError::Program { name, source }
}

/// Settings the programs read at run time.
#[derive(Clone, Debug)]
pub struct CaptureSettings {
    pub log_level: u32,
    /// Ports captured in neither direction / only not outbound / only not inbound.
    pub excluded_ports: Vec<(u16, u8)>,
    pub excluded_cidrs: Vec<IpNet>,
}

impl CaptureSettings {
    /// Builds settings from the agent config's capture section.
    pub fn from_config(capture: &crate::config::CaptureConfig, log_level: u32) -> Self {
        let mut ports: std::collections::BTreeMap<u16, u8> = Default::default();
        for p in &capture.excluded_ports {
            *ports.entry(*p).or_default() |= EXCLUDE_INBOUND | EXCLUDE_OUTBOUND;
        }
        for p in &capture.excluded_outbound_ports {
            *ports.entry(*p).or_default() |= EXCLUDE_OUTBOUND;
        }
        for p in &capture.excluded_inbound_ports {
            *ports.entry(*p).or_default() |= EXCLUDE_INBOUND;
        }
        Self {
            log_level,
            excluded_ports: ports.into_iter().collect(),
            excluded_cidrs: capture.excluded_cidrs.clone(),
        }
    }
}

/// Converts an address into the programs' key form (network byte order words).
pub fn ip_key(ip: IpAddr) -> IpKey {
    match ip {
        IpAddr::V4(v4) => IpKey {
            family: AF_INET,
            _pad: 0,
            addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        },
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            IpKey {
                family: AF_INET6,
                _pad: 0,
                addr: [w(0), w(4), w(8), w(12)],
            }
        }
    }
}

/// Converts the programs' key form back into an address.
pub fn key_ip(key: &IpKey) -> IpAddr {
    if key.family == AF_INET {
        IpAddr::from(key.addr[0].to_ne_bytes())
    } else {
        let mut o = [0u8; 16];
        for (i, w) in key.addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    }
}

/// The maps the agent and proxy read and write, each behind its own lock.
pub struct CaptureMaps {
    config: Mutex<Array<MapData, Config>>,
    enrolled: Mutex<HashMap<MapData, u64, u8>>,
    orig_by_cookie: Mutex<HashMap<MapData, u64, OrigDst>>,
    orig_by_peer: Mutex<HashMap<MapData, PeerKey, OrigDst>>,
    excluded_ports: Mutex<HashMap<MapData, u16, u8>>,
    excluded_v4: Mutex<LpmTrie<MapData, [u8; 4], u8>>,
    excluded_v6: Mutex<LpmTrie<MapData, [u8; 16], u8>>,
    pod_ips: Mutex<HashMap<MapData, IpKey, u64>>,
    inbound_sockets: Mutex<SockHash<MapData, IpKey>>,
    transparent_sources: Mutex<HashMap<MapData, SourceKey, u8>>,
    agent_cgroups: Mutex<HashMap<MapData, u64, u8>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a map lock leaves the map itself consistent (the kernel owns it).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ignores "no such entry" when removing.
fn removed(r: Result<(), aya::maps::MapError>, name: &'static str) -> Result<(), EbpfError> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(source) => Err(EbpfError::Map { name, source }),
    }
}

impl CaptureMaps {
    /// Takes the original destination of a captured connection, as the proxy sees it:
    /// `(pod netns cookie, family of the accepted socket, client source port)`.
    pub fn take_orig_dst(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = PeerKey {
            netns_cookie,
            family: if peer.is_ipv4() { AF_INET } else { AF_INET6 },
            port: peer.port(),
            _pad: 0,
        };
        let mut map = lock(&self.orig_by_peer);
        let orig = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(SocketAddr::new(key_ip(&orig.ip), orig.port))
    }

    /// Lets SYNs from `source` reach the application instead of the proxy (the proxy's own
    /// transparent connection); undo with [`forget_transparent_source`](Self::forget_transparent_source).
    pub fn allow_transparent_source(&self, source: SocketAddr) -> Result<(), EbpfError> {
        let key = SourceKey {
            ip: ip_key(source.ip()),
            port: source.port(),
            _pad: 0,
        };
        lock(&self.transparent_sources)
            .insert(key, 1, 0)
            .map_err(map_err(maps::TRANSPARENT_SOURCES))
    }

    /// Undoes [`allow_transparent_source`](Self::allow_transparent_source).
    pub fn forget_transparent_source(&self, source: SocketAddr) -> Result<(), EbpfError> {
        let key = SourceKey {
            ip: ip_key(source.ip()),
            port: source.port(),
            _pad: 0,
        };
        removed(
            lock(&self.transparent_sources).remove(&key),
            maps::TRANSPARENT_SOURCES,
        )
    }

    /// Marks a namespace as enrolled: connects made inside it are captured.
    pub fn enroll_netns(&self, cookie: u64) -> Result<(), EbpfError> {
        lock(&self.enrolled)
            .insert(cookie, ENROLLED_CAPTURED, 0)
            .map_err(map_err(maps::ENROLLED_NETNS))
    }

    /// Enrolls a namespace closed, for a pod whose proxy listeners could not be bound: its
    /// connects (but to loopback and exclusions) are refused, and SYNs for `ips` (and any other
    /// non-loopback address there, once steering is attached) are dropped.
    pub fn hold_closed(&self, cookie: u64, ips: &[IpAddr]) -> Result<(), EbpfError> {
        lock(&self.enrolled)
            .insert(cookie, ENROLLED_CLOSED, 0)
            .map_err(map_err(maps::ENROLLED_NETNS))?;
        for ip in ips {
            let key = ip_key(*ip);
            removed(
                lock(&self.inbound_sockets).remove(&key),
                maps::INBOUND_SOCKETS,
            )?;
            lock(&self.pod_ips)
                .insert(key, cookie, 0)
                .map_err(map_err(maps::POD_IPS))?;
        }
        Ok(())
    }

    /// Lets the agent's own marked sockets through the capture hooks: those made by a task in
    /// the agent's cgroup v2 (`id`, [`own_cgroup_id`]). Entries of earlier agents stay (one may
    /// still be draining) until the map is full, when all but this one are dropped.
    pub fn trust_agent_cgroup(&self, id: u64) -> Result<(), EbpfError> {
        let mut map = lock(&self.agent_cgroups);
        if map.insert(id, 1, 0).is_ok() {
            return Ok(());
        }
        let old: Vec<u64> = map.keys().filter_map(Result::ok).collect();
        for k in old {
            removed(map.remove(&k), maps::AGENT_CGROUPS)?;
        }
        map.insert(id, 1, 0).map_err(map_err(maps::AGENT_CGROUPS))
    }

    /// Stops capturing connects made in this namespace.
    pub fn unenroll_netns(&self, cookie: u64) -> Result<(), EbpfError> {
        removed(lock(&self.enrolled).remove(&cookie), maps::ENROLLED_NETNS)
    }

    /// Registers a pod address and the proxy's inbound listener for it.
    pub fn set_pod_ip(
        &self,
        ip: IpAddr,
        netns_cookie: u64,
        listener: &impl AsRawFd,
    ) -> Result<(), EbpfError> {
        let key = ip_key(ip);
        lock(&self.inbound_sockets)
            .insert(key, listener.as_raw_fd(), 0)
            .map_err(map_err(maps::INBOUND_SOCKETS))?;
        lock(&self.pod_ips)
            .insert(key, netns_cookie, 0)
            .map_err(map_err(maps::POD_IPS))
    }

    /// Forgets a pod address.
    pub fn remove_pod_ip(&self, ip: IpAddr) -> Result<(), EbpfError> {
        let key = ip_key(ip);
        removed(lock(&self.pod_ips).remove(&key), maps::POD_IPS)?;
        removed(
            lock(&self.inbound_sockets).remove(&key),
            maps::INBOUND_SOCKETS,
        )
    }

    /// Removes every entry belonging to a namespace; returns how many went.
    pub fn purge_netns(&self, cookie: u64) -> Result<usize, EbpfError> {
        let mut n = 0;
        self.unenroll_netns(cookie)?;
        let ips: Vec<IpKey> = lock(&self.pod_ips)
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, c)| *c == cookie)
            .map(|(k, _)| k)
            .collect();
        for ip in ips {
            self.remove_pod_ip(key_ip(&ip))?;
            n += 1;
        }
        {
            let mut peers = lock(&self.orig_by_peer);
            let keys: Vec<PeerKey> = peers
                .keys()
                .filter_map(Result::ok)
                .filter(|k| k.netns_cookie == cookie)
                .collect();
            for k in keys {
                removed(peers.remove(&k), maps::ORIG_BY_PEER)?;
                n += 1;
            }
        }
        let mut cookies = lock(&self.orig_by_cookie);
        let keys: Vec<u64> = cookies
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.netns_cookie == cookie)
            .map(|(k, _)| k)
            .collect();
        for k in keys {
            removed(cookies.remove(&k), maps::ORIG_BY_COOKIE)?;
            n += 1;
        }
        Ok(n)
    }

    /// Namespace cookies present in any map (enrolled, pod addresses, pending originals).
    pub fn known_netns(&self) -> BTreeSet<u64> {
        let mut out: BTreeSet<u64> = lock(&self.enrolled).keys().filter_map(Result::ok).collect();
        out.extend(
            lock(&self.pod_ips)
                .iter()
                .filter_map(Result::ok)
                .map(|(_, c)| c),
        );
        out.extend(
            lock(&self.orig_by_peer)
                .keys()
                .filter_map(Result::ok)
                .map(|k| k.netns_cookie),
        );
        out
    }

    /// Entries per map, for the config dump and tests.
    pub fn counts(&self) -> MapCounts {
        MapCounts {
            enrolled: lock(&self.enrolled).keys().count(),
            pod_ips: lock(&self.pod_ips).keys().count(),
            orig_by_cookie: lock(&self.orig_by_cookie).keys().count(),
            orig_by_peer: lock(&self.orig_by_peer).keys().count(),
        }
    }

    fn apply_settings(&self, s: &CaptureSettings) -> Result<(), EbpfError> {
        let config = Config {
            log_level: s.log_level,
            proxy_mark: PROXY_MARK,
            transparent_mark: TRANSPARENT_MARK,
            outbound_port: OUTBOUND_PORT,
            hbone_port: HBONE_PORT,
        };
        lock(&self.config)
            .set(0, config, 0)
            .map_err(map_err(maps::CONFIG))?;

        let mut ports = lock(&self.excluded_ports);
        let stale: Vec<u16> = ports
            .keys()
            .filter_map(Result::ok)
            .filter(|p| !s.excluded_ports.iter().any(|(q, _)| q == p))
            .collect();
        for p in stale {
            removed(ports.remove(&p), maps::EXCLUDED_PORTS)?;
        }
        for (port, flags) in &s.excluded_ports {
            ports
                .insert(port, flags, 0)
                .map_err(map_err(maps::EXCLUDED_PORTS))?;
        }
        drop(ports);

        let mut v4 = lock(&self.excluded_v4);
        let mut v6 = lock(&self.excluded_v6);
        for k in v4.keys().filter_map(Result::ok).collect::<Vec<_>>() {
            removed(v4.remove(&k), maps::EXCLUDED_CIDRS4)?;
        }
        for k in v6.keys().filter_map(Result::ok).collect::<Vec<_>>() {
            removed(v6.remove(&k), maps::EXCLUDED_CIDRS6)?;
        }
        for net in &s.excluded_cidrs {
            match net {
                IpNet::V4(n) => v4
                    .insert(
                        &Key::new(u32::from(n.prefix_len()), n.network().octets()),
                        1,
                        0,
                    )
                    .map_err(map_err(maps::EXCLUDED_CIDRS4))?,
                IpNet::V6(n) => v6
                    .insert(
                        &Key::new(u32::from(n.prefix_len()), n.network().octets()),
                        1,
                        0,
                    )
                    .map_err(map_err(maps::EXCLUDED_CIDRS6))?,
            }
        }
        Ok(())
    }
}

/// The cgroup v2 id (the directory's inode number) of this process's cgroup, as
/// `bpf_get_current_cgroup_id` reports it: `/proc/self/cgroup`'s `0::` path under the cgroup2
/// mount of `/proc/self/mountinfo`.
pub fn own_cgroup_id() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")?;
    let path = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| io::Error::other("no cgroup v2 line in /proc/self/cgroup"))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    // Fields: id parent major:minor root mount-point options... - fstype source super-options.
    let mount = mountinfo
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4))
                .flatten()
        })
        .ok_or_else(|| io::Error::other("no cgroup2 mount in /proc/self/mountinfo"))?;
    let dir = Path::new(mount).join(path.trim_start_matches('/'));
    Ok(std::fs::metadata(&dir)?.ino())
}

/// Entry counts of the capture maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MapCounts {
    pub enrolled: usize,
    pub pod_ips: usize,
    pub orig_by_cookie: usize,
    pub orig_by_peer: usize,
}

/// The loaded programs, their node-wide attachments, and the maps.
pub struct Capture {
    bpf: Ebpf,
    pin_dir: PathBuf,
    maps: std::sync::Arc<CaptureMaps>,
}

impl Capture {
    /// Loads the programs (reusing pinned maps), attaches the cgroup programs once at
    /// `cgroup_root` (replacing any pinned attachment of an earlier run), applies `settings`.
    pub fn load(
        pin_dir: &Path,
        cgroup_root: &Path,
        settings: &CaptureSettings,
    ) -> Result<Self, EbpfError> {
        let object = object::embedded()?;
        for sub in ["maps", "progs", "links"] {
            let dir = pin_dir.join(sub);
            std::fs::create_dir_all(&dir).map_err(|source| EbpfError::Pin {
                what: "creating",
                path: dir,
                source,
            })?;
        }
        let mut bpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir.join("maps"))
            .load(object)?;
        if let Err(e) = aya_log::EbpfLogger::init(&mut bpf).map(spawn_ebpf_logger) {
            tracing::warn!(error = %e, "eBPF log forwarding unavailable");
        }

        let cgroup = File::open(cgroup_root).map_err(|source| EbpfError::Cgroup {
            path: cgroup_root.into(),
            source,
        })?;
        for name in [CONNECT4, CONNECT6, GETPEER4, GETPEER6] {
            let prog: &mut CgroupSockAddr = bpf
                .program_mut(name)
                .ok_or(EbpfError::MissingProgram(name))?
                .try_into()
                .map_err(prog_err(name))?;
            prog.load().map_err(prog_err(name))?;
            pin_program(pin_dir, name, |p| prog.pin(p))?;
            let id = prog
                .attach(&cgroup, LINK_ATTACH_MODE)
                .map_err(prog_err(name))?;
            let link = fd_link(name, prog.take_link(id).map_err(prog_err(name))?)?;
            replace_pinned_link(&pin_dir.join("links").join(name), link)?;
        }
        {
            let prog: &mut SockOps = bpf
                .program_mut(SOCKOPS)
                .ok_or(EbpfError::MissingProgram(SOCKOPS))?
                .try_into()
                .map_err(prog_err(SOCKOPS))?;
            prog.load().map_err(prog_err(SOCKOPS))?;
            pin_program(pin_dir, SOCKOPS, |p| prog.pin(p))?;
            let id = prog
                .attach(&cgroup, LINK_ATTACH_MODE)
                .map_err(prog_err(SOCKOPS))?;
            let link = fd_link(SOCKOPS, prog.take_link(id).map_err(prog_err(SOCKOPS))?)?;
            replace_pinned_link(&pin_dir.join("links").join(SOCKOPS), link)?;
        }
        {
            let prog: &mut SkLookup = bpf
                .program_mut(SK_LOOKUP)
                .ok_or(EbpfError::MissingProgram(SK_LOOKUP))?
                .try_into()
                .map_err(prog_err(SK_LOOKUP))?;
            prog.load().map_err(prog_err(SK_LOOKUP))?;
            pin_program(pin_dir, SK_LOOKUP, |p| prog.pin(p))?;
        }

        let maps = CaptureMaps {
            config: Mutex::new(take(&mut bpf, maps::CONFIG)?),
            enrolled: Mutex::new(take(&mut bpf, maps::ENROLLED_NETNS)?),
            orig_by_cookie: Mutex::new(take(&mut bpf, maps::ORIG_BY_COOKIE)?),
            orig_by_peer: Mutex::new(take(&mut bpf, maps::ORIG_BY_PEER)?),
            excluded_ports: Mutex::new(take(&mut bpf, maps::EXCLUDED_PORTS)?),
            excluded_v4: Mutex::new(take(&mut bpf, maps::EXCLUDED_CIDRS4)?),
            excluded_v6: Mutex::new(take(&mut bpf, maps::EXCLUDED_CIDRS6)?),
            pod_ips: Mutex::new(take(&mut bpf, maps::POD_IPS)?),
            inbound_sockets: Mutex::new(take(&mut bpf, maps::INBOUND_SOCKETS)?),
            transparent_sources: Mutex::new(take(&mut bpf, maps::TRANSPARENT_SOURCES)?),
            agent_cgroups: Mutex::new(take(&mut bpf, maps::AGENT_CGROUPS)?),
        };
        maps.apply_settings(settings)?;
        let cgroup_id = own_cgroup_id().map_err(|source| EbpfError::Cgroup {
            path: "/proc/self/cgroup".into(),
            source,
        })?;
        maps.trust_agent_cgroup(cgroup_id)?;
        tracing::debug!(
            cgroup_id,
            "the agent's own cgroup is trusted with the proxy's marks"
        );
        Ok(Self {
            bpf,
            pin_dir: pin_dir.into(),
            maps: std::sync::Arc::new(maps),
        })
    }

    /// The maps, shared with the proxy.
    pub fn maps(&self) -> std::sync::Arc<CaptureMaps> {
        self.maps.clone()
    }

    fn pod_link_path(&self, uid: &str) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("pod-{uid}-sk_lookup"))
    }

    /// Attaches inbound steering to a pod's namespace (idempotent; replaces an older link).
    pub fn attach_pod(&mut self, uid: &str, netns: &Netns) -> Result<(), EbpfError> {
        let prog: &mut SkLookup = self
            .bpf
            .program_mut(SK_LOOKUP)
            .ok_or(EbpfError::MissingProgram(SK_LOOKUP))?
            .try_into()
            .map_err(prog_err(SK_LOOKUP))?;
        let id = prog.attach(netns).map_err(prog_err(SK_LOOKUP))?;
        let link = fd_link(SK_LOOKUP, prog.take_link(id).map_err(prog_err(SK_LOOKUP))?)?;
        replace_pinned_link(&self.pod_link_path(uid), link)
    }

    /// Detaches inbound steering from a pod's namespace (idempotent).
    pub fn detach_pod(&self, uid: &str) -> Result<(), EbpfError> {
        let path = self.pod_link_path(uid);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(EbpfError::Pin {
                what: "unpinning",
                path,
                source,
            }),
        }
    }

    /// UIDs of pods with a pinned inbound link.
    pub fn pinned_pods(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(self.pin_dir.join("links")) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                Some(
                    name.strip_prefix("pod-")?
                        .strip_suffix("-sk_lookup")?
                        .to_owned(),
                )
            })
            .collect()
    }
}

fn fd_link<L>(name: &'static str, link: L) -> Result<FdLink, EbpfError>
where
    FdLink: TryFrom<L>,
    <FdLink as TryFrom<L>>::Error: std::fmt::Display,
{
    FdLink::try_from(link).map_err(|e| EbpfError::Link {
        name,
        message: e.to_string(),
    })
}

fn take<T>(bpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    bpf.take_map(name)
        .ok_or(EbpfError::MissingMap(name))?
        .try_into()
        .map_err(map_err(name))
}

fn pin_program(
    pin_dir: &Path,
    name: &'static str,
    pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
) -> Result<(), EbpfError> {
    let path = pin_dir.join("progs").join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(EbpfError::Pin {
                what: "unpinning",
                path,
                source,
            });
        }
    }
    pin(&path).map_err(|e| EbpfError::Pin {
        what: "pinning",
        path,
        source: io::Error::other(e),
    })
}

/// Pins `new` at `path`; an older link pinned there stays attached until `new` is in place.
fn replace_pinned_link(path: &Path, new: FdLink) -> Result<(), EbpfError> {
    let old = match PinnedLink::from_pin(path) {
        Ok(old) => Some(old.unpin().map_err(|source| EbpfError::Pin {
            what: "unpinning",
            path: path.into(),
            source,
        })?),
        Err(_) => {
            // Not a link (or absent): clear the name so the new pin can take it.
            let _ = std::fs::remove_file(path);
            None
        }
    };
    new.pin(path).map_err(|e| EbpfError::Pin {
        what: "pinning",
        path: path.into(),
        source: io::Error::other(e),
    })?;
    drop(old); // detaches the previous program
    Ok(())
}

fn spawn_ebpf_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the AsyncFd owns the logger, so the ring buffer's fd lives as long as it does.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut fd) = registered else {
        tracing::warn!("eBPF log forwarding unavailable: cannot poll its ring buffer");
        return;
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

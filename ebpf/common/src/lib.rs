//! Types shared by Sluice's eBPF programs (`ebpf/programs`) and the agent.
//!
//! Everything here is `#[repr(C)]`, padded explicitly and free of pointers, because the
//! kernel copies these values byte for byte between the two sides. Addresses are kept in
//! network byte order, exactly as the kernel hands them to the programs; ports are in
//! host byte order.
#![no_std]

/// `AF_INET`, as the kernel numbers it.
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as the kernel numbers it.
pub const AF_INET6: u16 = 10;

/// `SO_MARK` of the proxy's ordinary sockets inside a pod: captures never touch them.
pub const PROXY_MARK: u32 = 0x539;
/// `SO_MARK` of the proxy's transparent connections to a pod's application (source = the real
/// client). The pod accepts them with `tcp_fwmark_accept`, so the application's replies carry
/// the mark too, and a policy rule on it sends them to [`TRANSPARENT_ROUTE_TABLE`].
pub const TRANSPARENT_MARK: u32 = 0x53a;
/// Routing table, inside each pod's network namespace, that delivers marked replies locally
/// (back to the proxy's transparent socket) instead of out of the pod.
pub const TRANSPARENT_ROUTE_TABLE: u32 = 0x53a;

/// Loopback port of the proxy's outbound listener inside each enrolled pod.
pub const OUTBOUND_PORT: u16 = 15001;
/// Loopback port of the proxy's plaintext inbound listener inside each enrolled pod.
pub const INBOUND_PORT: u16 = 15006;
/// HBONE (HTTP/2 CONNECT over mTLS) port; never captured.
pub const HBONE_PORT: u16 = 15008;

/// `sluice_enrolled` value: the pod is captured (connects redirected, SYNs steered).
pub const ENROLLED_CAPTURED: u8 = 1;
/// `sluice_enrolled` value: the pod is enrolled but its proxy listeners could not be bound;
/// its connects (but to loopback and exclusions) are refused and SYNs for its addresses dropped.
pub const ENROLLED_CLOSED: u8 = 2;

/// Bit in `sluice_excl_port` values: the port is not captured on the way out.
pub const EXCLUDE_OUTBOUND: u8 = 1;
/// Bit in excluded-port values: the port is not captured on the way in.
pub const EXCLUDE_INBOUND: u8 = 2;

/// eBPF log levels, in the order aya-log uses (0 = off).
pub mod log_level {
    pub const OFF: u32 = 0;
    pub const ERROR: u32 = 1;
    pub const WARN: u32 = 2;
    pub const INFO: u32 = 3;
    pub const DEBUG: u32 = 4;
    pub const TRACE: u32 = 5;
}

/// Pinned map names (also the names `bpftool map show` prints; at most 15 bytes).
pub mod maps {
    pub const CONFIG: &str = "sluice_config";
    pub const ENROLLED_NETNS: &str = "sluice_enrolled";
    pub const ORIG_BY_COOKIE: &str = "sluice_orig_ck";
    pub const ORIG_BY_PEER: &str = "sluice_orig_peer";
    pub const EXCLUDED_PORTS: &str = "sluice_excl_port";
    pub const EXCLUDED_CIDRS4: &str = "sluice_excl_v4";
    pub const EXCLUDED_CIDRS6: &str = "sluice_excl_v6";
    pub const POD_IPS: &str = "sluice_pod_ips";
    pub const INBOUND_SOCKETS: &str = "sluice_in_socks";
    pub const TRANSPARENT_SOURCES: &str = "sluice_tproxy";
    pub const AGENT_CGROUPS: &str = "sluice_agent_cg";
}

/// Runtime settings the agent writes into the one-element `sluice_config` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Highest [`log_level`] the programs emit.
    pub log_level: u32,
    /// Mark of the proxy's own sockets.
    pub proxy_mark: u32,
    /// Mark of the proxy's transparent sockets (also never captured).
    pub transparent_mark: u32,
    /// Outbound listener port (host order).
    pub outbound_port: u16,
    /// HBONE port (host order), never steered inbound.
    pub hbone_port: u16,
}

/// An IPv4 or IPv6 address as a map key. IPv4 uses `addr[0]`, the rest is zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpKey {
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    pub _pad: u16,
    /// Network byte order, as in `struct in6_addr` / `struct in_addr`.
    pub addr: [u32; 4],
}

/// The destination a captured connect asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// The original destination address.
    pub ip: IpKey,
    /// The original destination port (host order).
    pub port: u16,
    /// Family of the listener the connect was sent to (IPv4-mapped IPv6 connects travel as
    /// IPv4, so this may differ from `ip.family`).
    pub listener_family: u16,
    pub _pad: u32,
    /// Network namespace the connect came from, so a removed pod's entries can be found.
    pub netns_cookie: u64,
}

/// Finds a captured connection from the proxy's side: the pod's network namespace, and the
/// loopback source port of the client socket that the proxy sees as its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// `SO_NETNS_COOKIE` of the pod's network namespace.
    pub netns_cookie: u64,
    /// Family of the loopback connection ([`AF_INET`] or [`AF_INET6`]).
    pub family: u16,
    /// Client source port (host order).
    pub port: u16,
    pub _pad: u32,
}

/// A client address the proxy is connecting *from* (a transparent connection to a pod's
/// application). `sk_lookup` lets SYNs from these through to the application: looped back
/// inside the pod, they are otherwise indistinguishable from a real client's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    pub ip: IpKey,
    /// Source port (host order).
    pub port: u16,
    pub _pad: u16,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::IpKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::SourceKey {}
}

//! Sluice's kernel side.
//!
//! * `sluice_connect4` / `sluice_connect6` (cgroup `connect4`/`connect6`, attached once at the
//!   node's pod cgroup root): a TCP connect made inside an enrolled pod's network namespace is
//!   rewritten to the proxy's loopback outbound listener in that namespace, and the address the
//!   application asked for is recorded under the socket's cookie.
//! * `sluice_sockops` (cgroup `sock_ops`, same root): once such a connect is established, the
//!   record moves to a key the proxy can compute from its accepted socket: (pod netns cookie,
//!   family, client source port). The proxy reads it and deletes it. The socket's cookie keeps
//!   the original destination in `sluice_peer_name` until the socket closes (a state callback
//!   removes it).
//! * `sluice_getpeer4` / `sluice_getpeer6` (cgroup `getpeername4`/`getpeername6`, same
//!   root): a captured socket reports the address the application dialled as its peer, not the
//!   proxy's loopback listener.
//! * `sluice_sk_lookup` (`sk_lookup`, attached to each enrolled pod's network namespace): a TCP
//!   SYN for a pod address arriving from outside the pod is handed to the proxy's inbound
//!   listener; the accepted socket's local address is then the original destination.
//!
//!   Every other TCP SYN for a non-loopback address in an enrolled pod (a secondary or
//!   link-local address nobody registered, a pod held closed) is dropped, never passed to the
//!   application around the proxy.
//!
//! Enrollment is a netns-cookie entry in `sluice_enrolled`, so one attachment serves every pod
//! and non-enrolled pods pay one hash lookup per connect. A pod whose proxy listeners could not
//! be bound is enrolled closed: its connects are refused. The proxy's own sockets carry its
//! mark, but the mark alone proves nothing (a pod with `CAP_NET_ADMIN` can set it): they are
//! exempt only when made by a task in one of the agent's cgroups (`sluice_agent_cg`).
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE, sk_action,
    },
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, SockHash, lpm_trie::Key},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, trace};
use sluice_common::{
    AF_INET, AF_INET6, Config, ENROLLED_CLOSED, EXCLUDE_INBOUND, EXCLUDE_OUTBOUND, IpKey, OrigDst,
    PeerKey, SourceKey, log_level,
};

const IPPROTO_TCP: u32 = 6;
/// cgroup_sock_addr verdict: let the (possibly rewritten) connect proceed.
const PROCEED: i32 = 1;
/// cgroup_sock_addr verdict: refuse the connect (`EPERM`).
const REFUSE: i32 = 0;
/// `BPF_F_NO_PREALLOC`, required for LPM tries.
const NO_PREALLOC: u32 = 1;

#[map(name = "sluice_config")]
static CONFIG: Array<Config> = Array::pinned(1, 0);

/// Network namespaces (by cookie) of enrolled pods: `ENROLLED_CAPTURED` or `ENROLLED_CLOSED`.
#[map(name = "sluice_enrolled")]
static ENROLLED: HashMap<u64, u8> = HashMap::pinned(16384, 0);

/// Original destination of a captured connect, by client socket cookie, until established.
#[map(name = "sluice_orig_ck")]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65536, 0);

/// Original destination by socket cookie for captured connections, while they are open: what
/// `getpeername` reports.
#[map(name = "sluice_peer_name")]
static PEER_NAME: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65536, 0);

/// Original destination of a captured connection, by what the proxy sees of it.
#[map(name = "sluice_orig_peer")]
static ORIG_BY_PEER: LruHashMap<PeerKey, OrigDst> = LruHashMap::pinned(65536, 0);

/// Ports never captured: host-order port → EXCLUDE_OUTBOUND | EXCLUDE_INBOUND.
#[map(name = "sluice_excl_port")]
static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::pinned(1024, 0);

/// Destination CIDRs never captured on the way out.
#[map(name = "sluice_excl_v4")]
static EXCLUDED_V4: LpmTrie<[u8; 4], u8> = LpmTrie::pinned(1024, NO_PREALLOC);
#[map(name = "sluice_excl_v6")]
static EXCLUDED_V6: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(1024, NO_PREALLOC);

/// Addresses of enrolled pods → their netns cookie. Inbound SYNs for these are steered, or
/// dropped while the proxy has no listener there (fail closed, never around the proxy).
#[map(name = "sluice_pod_ips")]
static POD_IPS: HashMap<IpKey, u64> = HashMap::pinned(16384, 0);

/// Sources of the proxy's own transparent connections to applications (see `SourceKey`).
#[map(name = "sluice_tproxy")]
static TRANSPARENT_SOURCES: HashMap<SourceKey, u8> = HashMap::pinned(65536, 0);

/// The proxy's inbound listener for each pod address.
#[map(name = "sluice_in_socks")]
static INBOUND_SOCKETS: SockHash<IpKey> = SockHash::pinned(16384, 0);

/// cgroup v2 ids of the agent (this one, and one it is taking over from); the value is unused.
#[map(name = "sluice_agent_cg")]
static AGENT_CGROUPS: HashMap<u64, u8> = HashMap::pinned(64, 0);

#[inline(always)]
fn config() -> Config {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    }
}

#[inline(always)]
fn port_excluded(port: u16, direction: u8) -> bool {
    // SAFETY: read-only lookup of a plain value.
    match unsafe { EXCLUDED_PORTS.get(&port) } {
        Some(flags) => *flags & direction != 0,
        None => false,
    }
}

#[inline(always)]
fn v4_excluded(addr: u32) -> bool {
    // 127.0.0.0/8, in network byte order: the first octet is the lowest byte.
    addr & 0xff == 127 || EXCLUDED_V4.get(&Key::new(32, addr.to_ne_bytes())).is_some()
}

#[inline(always)]
fn v6_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// The netns cookie and enrollment state of a TCP connect made in an enrolled pod by anyone
/// but the proxy: a socket with the proxy's mark made by a task in an agent cgroup.
#[inline(always)]
fn enrolled_stream(ctx: &SockAddrContext, cfg: &Config) -> Option<(u64, u8)> {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return None;
    }
    // SAFETY: helper allowed for cgroup_sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain value.
    let state = *unsafe { ENROLLED.get(&netns) }?;
    // SAFETY: `sk` is always set for connect hooks.
    let mark = unsafe { (*sa.__bindgen_anon_1.sk).mark };
    if mark == cfg.proxy_mark || mark == cfg.transparent_mark {
        // SAFETY: helper allowed for cgroup programs; read-only lookup.
        let cgroup = unsafe { bpf_get_current_cgroup_id() };
        if unsafe { AGENT_CGROUPS.get(&cgroup) }.is_some() {
            return None;
        }
    }
    Some((netns, state))
}

#[inline(always)]
fn record(ctx: &SockAddrContext, orig: &OrigDst) -> bool {
    // SAFETY: helper allowed for cgroup_sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    ORIG_BY_COOKIE.insert(&cookie, orig, 0).is_ok()
}

#[cgroup_sock_addr(connect4)]
pub fn sluice_connect4(ctx: SockAddrContext) -> i32 {
    let cfg = config();
    let Some((netns_cookie, state)) = enrolled_stream(&ctx, &cfg) else {
        return PROCEED;
    };
    // SAFETY: the context pointer is valid and writable for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip = sa.user_ip4;
    let port = u16::from_be(sa.user_port as u16);
    if v4_excluded(ip) || port_excluded(port, EXCLUDE_OUTBOUND) {
        return PROCEED;
    }
    if state == ENROLLED_CLOSED {
        return REFUSE;
    }
    let orig = OrigDst {
        ip: IpKey {
            family: AF_INET,
            _pad: 0,
            addr: [ip, 0, 0, 0],
        },
        port,
        listener_family: AF_INET,
        _pad: 0,
        netns_cookie,
    };
    if !record(&ctx, &orig) {
        // Never around the proxy: without its record the connect cannot be captured.
        return REFUSE;
    }
    sa.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
    sa.user_port = u32::from(cfg.outbound_port.to_be());
    if cfg.log_level >= log_level::DEBUG {
        debug!(&ctx, "connect4 captured: {:i}:{}", u32::from_be(ip), port);
    }
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn sluice_connect6(ctx: SockAddrContext) -> i32 {
    let cfg = config();
    let Some((netns_cookie, state)) = enrolled_stream(&ctx, &cfg) else {
        return PROCEED;
    };
    // SAFETY: the context pointer is valid and writable for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let w = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let port = u16::from_be(sa.user_port as u16);
    if port_excluded(port, EXCLUDE_OUTBOUND) {
        return PROCEED;
    }
    let mapped = w[0] == 0 && w[1] == 0 && w[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]);
    if mapped {
        // A dual-stack socket dialling IPv4: it travels as IPv4, so it meets the IPv4 listener.
        if v4_excluded(w[3]) {
            return PROCEED;
        }
        if state == ENROLLED_CLOSED {
            return REFUSE;
        }
        let orig = OrigDst {
            ip: IpKey {
                family: AF_INET,
                _pad: 0,
                addr: [w[3], 0, 0, 0],
            },
            port,
            listener_family: AF_INET,
            _pad: 0,
            netns_cookie,
        };
        if !record(&ctx, &orig) {
            // Never around the proxy: without its record the connect cannot be captured.
            return REFUSE;
        }
        sa.user_ip6[3] = u32::from_ne_bytes([127, 0, 0, 1]);
    } else {
        let loopback =
            w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == u32::from_ne_bytes([0, 0, 0, 1]);
        if loopback || EXCLUDED_V6.get(&Key::new(128, v6_bytes(w))).is_some() {
            return PROCEED;
        }
        if state == ENROLLED_CLOSED {
            return REFUSE;
        }
        let orig = OrigDst {
            ip: IpKey {
                family: AF_INET6,
                _pad: 0,
                addr: w,
            },
            port,
            listener_family: AF_INET6,
            _pad: 0,
            netns_cookie,
        };
        if !record(&ctx, &orig) {
            // Never around the proxy: without its record the connect cannot be captured.
            return REFUSE;
        }
        sa.user_ip6[0] = 0;
        sa.user_ip6[1] = 0;
        sa.user_ip6[2] = 0;
        sa.user_ip6[3] = u32::from_ne_bytes([0, 0, 0, 1]);
    }
    sa.user_port = u32::from(cfg.outbound_port.to_be());
    if cfg.log_level >= log_level::DEBUG {
        debug!(
            &ctx,
            "connect6 captured: port {} (v4-mapped: {})", port, mapped as u8
        );
    }
    PROCEED
}

#[sock_ops]
pub fn sluice_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => captured_established(&ctx),
        // Only captured sockets asked for state callbacks (below).
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            // SAFETY: helper allowed for sock_ops programs.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = PEER_NAME.remove(&cookie);
        }
        _ => {}
    }
    1
}

#[inline(always)]
fn captured_established(ctx: &SockOpsContext) {
    // SAFETY: helper allowed for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup; the value is copied out before the entry is removed.
    let orig = match unsafe { ORIG_BY_COOKIE.get(&cookie) } {
        Some(orig) => *orig,
        None => return,
    };
    // SAFETY: helper allowed for sock_ops programs (Linux 5.15+).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = PeerKey {
        netns_cookie: netns,
        family: orig.listener_family,
        // sock_ops hands local_port over in host byte order.
        port: ctx.local_port() as u16,
        _pad: 0,
    };
    let _ = ORIG_BY_PEER.insert(&key, &orig, 0);
    let _ = ORIG_BY_COOKIE.remove(&cookie);
    // Remember the dialled address for getpeername until the socket closes; without the state
    // callback the LRU would still bound the map.
    if PEER_NAME.insert(&cookie, &orig, 0).is_ok() {
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
    if config().log_level >= log_level::TRACE {
        trace!(
            ctx,
            "sockops: captured connection from port {} established", key.port
        );
    }
}

/// The original destination of a captured socket, if `ctx`'s socket is one.
#[inline(always)]
fn peer_name(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: helper allowed for cgroup_sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup, copied out.
    unsafe { PEER_NAME.get(&cookie) }.copied()
}

#[cgroup_sock_addr(getpeername4)]
pub fn sluice_getpeer4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = peer_name(&ctx) {
        if orig.ip.family == AF_INET {
            // SAFETY: the context pointer is valid and writable for the program's run.
            let sa = unsafe { &mut *ctx.sock_addr };
            sa.user_ip4 = orig.ip.addr[0];
            sa.user_port = u32::from(orig.port.to_be());
        }
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn sluice_getpeer6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = peer_name(&ctx) {
        // SAFETY: the context pointer is valid and writable for the program's run.
        let sa = unsafe { &mut *ctx.sock_addr };
        if orig.ip.family == AF_INET {
            // A dual-stack socket that dialled an IPv4 address: report it v4-mapped.
            sa.user_ip6[0] = 0;
            sa.user_ip6[1] = 0;
            sa.user_ip6[2] = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
            sa.user_ip6[3] = orig.ip.addr[0];
        } else {
            sa.user_ip6[0] = orig.ip.addr[0];
            sa.user_ip6[1] = orig.ip.addr[1];
            sa.user_ip6[2] = orig.ip.addr[2];
            sa.user_ip6[3] = orig.ip.addr[3];
        }
        sa.user_port = u32::from(orig.port.to_be());
    }
    PROCEED
}

#[sk_lookup]
pub fn sluice_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's run.
    let l = unsafe { &*ctx.lookup };
    if l.protocol != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    let cfg = config();
    let port = l.local_port as u16;
    if port_excluded(port, EXCLUDE_INBOUND) {
        return sk_action::SK_PASS;
    }
    // Volatile reads, one context field at a time: the verifier refuses context loads through
    // a computed pointer, which is what LLVM emits if it merges the two families' loads.
    let key = if l.family == u32::from(AF_INET) {
        // SAFETY: in-bounds field of the context.
        let ip4 = unsafe { core::ptr::read_volatile(&l.local_ip4) };
        // 127.0.0.0/8 (network byte order: the first octet is the lowest byte).
        if ip4 & 0xff == 127 {
            return sk_action::SK_PASS;
        }
        IpKey {
            family: AF_INET,
            _pad: 0,
            addr: [ip4, 0, 0, 0],
        }
    } else {
        // SAFETY: in-bounds fields of the context.
        let w = unsafe {
            [
                core::ptr::read_volatile(&l.local_ip6[0]),
                core::ptr::read_volatile(&l.local_ip6[1]),
                core::ptr::read_volatile(&l.local_ip6[2]),
                core::ptr::read_volatile(&l.local_ip6[3]),
            ]
        };
        if w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == u32::from_ne_bytes([0, 0, 0, 1]) {
            return sk_action::SK_PASS;
        }
        IpKey {
            family: AF_INET6,
            _pad: 0,
            addr: w,
        }
    };
    // From here on: a non-loopback address of an enrolled pod. It is steered to the proxy or
    // dropped; nothing reaches the application around it.
    // SAFETY: read-only lookups of plain values.
    let registered = match unsafe { POD_IPS.get(&key) } {
        Some(cookie) => match unsafe { ENROLLED.get(cookie) } {
            // Held closed: its proxy listeners could not be bound.
            Some(state) if *state == ENROLLED_CLOSED => {
                if cfg.log_level >= log_level::DEBUG {
                    debug!(&ctx, "sk_lookup dropped port {}: pod held closed", port);
                }
                return sk_action::SK_DROP;
            }
            _ => true,
        },
        None => false,
    };
    if !registered {
        if cfg.log_level >= log_level::DEBUG {
            debug!(
                &ctx,
                "sk_lookup dropped port {}: address not registered for the pod", port
            );
        }
        return sk_action::SK_DROP;
    }
    // The proxy's own HBONE listener, bound to the registered address.
    if port == cfg.hbone_port {
        return sk_action::SK_PASS;
    }
    // The proxy's own connection to the application, from the real client's address.
    let remote = if l.family == u32::from(AF_INET) {
        // SAFETY: in-bounds field of the context.
        let ip4 = unsafe { core::ptr::read_volatile(&l.remote_ip4) };
        IpKey {
            family: AF_INET,
            _pad: 0,
            addr: [ip4, 0, 0, 0],
        }
    } else {
        // SAFETY: in-bounds fields of the context.
        let w = unsafe {
            [
                core::ptr::read_volatile(&l.remote_ip6[0]),
                core::ptr::read_volatile(&l.remote_ip6[1]),
                core::ptr::read_volatile(&l.remote_ip6[2]),
                core::ptr::read_volatile(&l.remote_ip6[3]),
            ]
        };
        IpKey {
            family: AF_INET6,
            _pad: 0,
            addr: w,
        }
    };
    // SAFETY: in-bounds field of the context.
    let remote_port = u16::from_be(unsafe { core::ptr::read_volatile(&l.remote_port) });
    let source = SourceKey {
        ip: remote,
        port: remote_port,
        _pad: 0,
    };
    // SAFETY: read-only lookup.
    if unsafe { TRANSPARENT_SOURCES.get(&source) }.is_some() {
        return sk_action::SK_PASS;
    }
    match INBOUND_SOCKETS.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => {
            if cfg.log_level >= log_level::DEBUG {
                debug!(&ctx, "sk_lookup steered inbound port {} to the proxy", port);
            }
            sk_action::SK_PASS
        }
        Err(_) => {
            if cfg.log_level >= log_level::DEBUG {
                debug!(
                    &ctx,
                    "sk_lookup dropped port {}: enrolled pod has no proxy listener", port
                );
            }
            sk_action::SK_DROP
        }
    }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

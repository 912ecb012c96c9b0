//! Routing inside an enrolled pod for the proxy's transparent connections.
//!
//! The proxy connects to the application from the real client's address. The application's
//! replies to that address would normally leave the pod; instead:
//! * `net.ipv4.tcp_fwmark_accept = 1` makes the application's accepted socket inherit the
//!   proxy SYN's mark ([`TRANSPARENT_MARK`]), so every reply carries it;
//! * `net.ipv{4,6}.fwmark_reflect = 1` gives the kernel's own replies (a RST when the
//!   application does not listen, ICMP errors) the mark of the packet they answer, so the
//!   proxy's connect fails at once instead of waiting for SYN retries;
//! * a policy rule `fwmark TRANSPARENT_MARK lookup TRANSPARENT_ROUTE_TABLE` and a route
//!   `local default dev lo` in that table deliver marked replies locally, to the proxy.
//!
//! Same effect as the connmark rules a TPROXY setup uses, with no iptables.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::TryStreamExt;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        route::{RouteMessage, RouteProtocol, RouteScope, RouteType},
        rule::RuleAction,
    },
};
use sluice_common::{TRANSPARENT_MARK, TRANSPARENT_ROUTE_TABLE};

use crate::netns::{HomeNetns, Netns, NetnsError};

/// Priority of Sluice's policy rule inside pods (before the main table at 32766).
const RULE_PRIORITY: u32 = 100;
const LOOPBACK_IFINDEX: u32 = 1;

/// Errors programming a pod's routing.
#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("pod network namespace {netns}: {what}: {source}")]
    Io {
        netns: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("pod network namespace {netns}: {what}: {source}")]
    Netlink {
        netns: String,
        what: &'static str,
        source: rtnetlink::Error,
    },
}

fn exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

fn absent(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::ENOENT || m.raw_code() == -libc::ESRCH)
}

/// A netlink connection whose socket lives in `netns`.
fn handle_in(
    netns: &Netns,
    home: &HomeNetns,
) -> Result<(Handle, tokio::task::JoinHandle<()>), PodNetError> {
    let name = netns.path().display().to_string();
    let (conn, handle, _) = netns
        .run(home, rtnetlink::new_connection)?
        .map_err(|source| PodNetError::Io {
            netns: name,
            what: "opening netlink",
            source,
        })?;
    Ok((handle, tokio::spawn(conn)))
}

fn local_default_route(v4: bool) -> RouteMessage {
    let b = if v4 {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .build()
    } else {
        RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .build()
    };
    let mut m = b;
    m.header.table = 0; // set through the attribute below (the table id exceeds 255)
    m.header.kind = RouteType::Local;
    m.header.scope = RouteScope::Host;
    m.header.protocol = RouteProtocol::Static;
    m.attributes
        .push(rtnetlink::packet_route::route::RouteAttribute::Table(
            TRANSPARENT_ROUTE_TABLE,
        ));
    m.attributes
        .push(rtnetlink::packet_route::route::RouteAttribute::Oif(
            LOOPBACK_IFINDEX,
        ));
    m
}

/// Writes a sysctl of the calling thread's network namespace. Container runtimes mount `/proc/sys`
/// read-only in unprivileged containers; the DaemonSet also mounts the host's `/proc` at
/// `/host/proc`, whose sysctl files resolve the writer's namespace just the same.
fn write_sysctl(key: &str, value: &str) -> io::Result<()> {
    match std::fs::write(format!("/proc/sys/{key}"), value) {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
            std::fs::write(format!("/host/proc/sys/{key}"), value)
        }
        r => r,
    }
}

/// Sets up reply routing in a pod (idempotent). `families` says which IP versions it has.
pub async fn install(netns: &Netns, home: &HomeNetns, ips: &[IpAddr]) -> Result<(), PodNetError> {
    let name = netns.path().display().to_string();
    netns
        .run(home, || write_sysctl("net/ipv4/tcp_fwmark_accept", "1"))?
        .map_err(|source| PodNetError::Io {
            netns: name.clone(),
            what: "setting net.ipv4.tcp_fwmark_accept",
            source,
        })?;
    for (key, family_present) in [
        ("net/ipv4/fwmark_reflect", true),
        ("net/ipv6/fwmark_reflect", ips.iter().any(IpAddr::is_ipv6)),
    ] {
        if !family_present {
            continue;
        }
        netns
            .run(home, || write_sysctl(key, "1"))?
            .map_err(|source| PodNetError::Io {
                netns: name.clone(),
                what: "setting fwmark_reflect",
                source,
            })?;
    }
    let (handle, conn) = handle_in(netns, home)?;
    let result = async {
        for v4 in [true, false] {
            if !ips.iter().any(|ip| ip.is_ipv4() == v4) {
                continue;
            }
            let rule = handle
                .rule()
                .add()
                .fw_mark(TRANSPARENT_MARK)
                .table_id(TRANSPARENT_ROUTE_TABLE)
                .priority(RULE_PRIORITY)
                .action(RuleAction::ToTable);
            let added = if v4 {
                rule.v4().execute().await
            } else {
                rule.v6().execute().await
            };
            match added {
                Ok(()) => {}
                Err(e) if exists(&e) => {}
                Err(source) => {
                    return Err(PodNetError::Netlink {
                        netns: name.clone(),
                        what: "adding the transparent-reply rule",
                        source,
                    });
                }
            }
            match handle
                .route()
                .add(local_default_route(v4))
                .replace()
                .execute()
                .await
            {
                Ok(()) => {}
                Err(source) => {
                    return Err(PodNetError::Netlink {
                        netns: name.clone(),
                        what: "adding the transparent-reply route",
                        source,
                    });
                }
            }
        }
        Ok(())
    }
    .await;
    conn.abort();
    result
}

/// Removes what [`install`] added (idempotent; the sysctl is left, it is harmless).
pub async fn remove(netns: &Netns, home: &HomeNetns) -> Result<(), PodNetError> {
    let name = netns.path().display().to_string();
    let (handle, conn) = handle_in(netns, home)?;
    let result = async {
        for v4 in [true, false] {
            let rules = if v4 { handle.rule().get(rtnetlink::IpVersion::V4) } else { handle.rule().get(rtnetlink::IpVersion::V6) };
            let rules: Vec<_> = rules.execute().try_collect().await.unwrap_or_default();
            for rule in rules {
                let ours = rule.attributes.iter().any(|a| matches!(a, rtnetlink::packet_route::rule::RuleAttribute::FwMark(m) if *m == TRANSPARENT_MARK))
                    && rule.attributes.iter().any(|a| matches!(a, rtnetlink::packet_route::rule::RuleAttribute::Table(t) if *t == TRANSPARENT_ROUTE_TABLE));
                if !ours {
                    continue;
                }
                if let Err(source) = handle.rule().del(rule).execute().await
                    && !absent(&source)
                {
                    return Err(PodNetError::Netlink {
                        netns: name.clone(),
                        what: "removing the transparent-reply rule",
                        source,
                    });
                }
            }
            if let Err(source) = handle.route().del(local_default_route(v4)).execute().await
                && !absent(&source)
            {
                return Err(PodNetError::Netlink {
                    netns: name.clone(),
                    what: "removing the transparent-reply route",
                    source,
                });
            }
        }
        Ok(())
    }
    .await;
    conn.abort();
    result
}

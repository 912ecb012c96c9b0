//! Prefix pinning against a real kernel, inside a network namespace of the test's own.
//!
//! Each test runs on a fresh thread that `unshare`s a new network namespace; the kernel removes
//! the namespace when that thread ends, whether the test passed or panicked, so nothing reaches
//! the host. They need root (CAP_NET_ADMIN) and fail, with that reason, without it.
use std::{
    collections::BTreeSet,
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener},
    time::Instant,
};

use futures::TryStreamExt;
use ipnet::IpNet;
use nix::sched::{CloneFlags, unshare};
use rtnetlink::{
    Handle, IpVersion, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressProtocol},
        link::LinkAttribute,
        route::{RouteAttribute, RouteFlags, RouteProtocol},
        rule::RuleAttribute,
    },
};

use super::*;
use crate::{egress::prefix, state::WorkloadUid};

const UPLINK: &str = "uplink0";
const RT_TABLE_LOCAL: u8 = 255;
const GW4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);
const MAIN_GW4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 253);
const GW6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xe, 0, 0, 0, 0, 0, 0xfe);

/// Runs `test` in a new network namespace that disappears with the thread.
fn in_netns<F, Fut>(test: F)
where
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    assert!(
        nix::unistd::geteuid().is_root(),
        "the netlink tests need root (CAP_NET_ADMIN) to create network namespaces"
    );
    let thread = std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let (conn, handle, _) = rtnetlink::new_connection().expect("netlink socket");
            tokio::spawn(conn);
            node_setup(&handle).await;
            test(handle).await;
        });
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

async fn index_of(handle: &Handle, name: &str) -> u32 {
    handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
        .expect("link lookup")
        .expect("link exists")
        .header
        .index
}

/// A node: loopback up, an uplink with IPv4 and IPv6 addresses, a main default route.
async fn node_setup(handle: &Handle) {
    let lo = index_of(handle, "lo").await;
    handle
        .link()
        .set(LinkUnspec::new_with_index(lo).up().build())
        .execute()
        .await
        .expect("lo up");
    // A veth pair (this kernel has no dummy driver); its peer stays in the namespace, up.
    handle
        .link()
        .add(LinkVeth::new(UPLINK, "uplink0-peer").up().build())
        .execute()
        .await
        .expect("uplink");
    let peer = index_of(handle, "uplink0-peer").await;
    handle
        .link()
        .set(LinkUnspec::new_with_index(peer).up().build())
        .execute()
        .await
        .expect("peer up");
    let up = index_of(handle, UPLINK).await;
    handle
        .address()
        .add(up, IpAddr::from([192, 0, 2, 1]), 24)
        .execute()
        .await
        .expect("uplink v4");
    let mut v6 = handle
        .address()
        .add(up, "fd00:e::1".parse().expect("ip"), 64);
    v6.message_mut().header.flags |= AddressHeaderFlags::Nodad;
    v6.message_mut()
        .attributes
        .push(AddressAttribute::Flags(AddressFlags::Nodad));
    v6.execute().await.expect("uplink v6");
    handle
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(MAIN_GW4)
                .output_interface(up)
                .build(),
        )
        .execute()
        .await
        .expect("main default route");
}

fn config() -> PinningConfig {
    PinningConfig::new(Uplink {
        interface: UPLINK.into(),
        gateway_v4: Some(GW4),
        gateway_v6: Some(GW6),
    })
}

fn pinned(name: &str, prefix: &str, route: DefaultRoute, exclude: &[&str]) -> PinnedPrefix {
    PinnedPrefix {
        name: name.into(),
        prefix: prefix.parse().expect("prefix"),
        default_route: route,
        exclude_cidrs: exclude.iter().map(|c| c.parse().expect("cidr")).collect(),
    }
}

/// Every address, rule and route in the namespace, one line each, marked `ours` or not. IPv6
/// link-local addresses and routes are left out: the kernel adds them when it likes.
async fn everything(handle: &Handle) -> BTreeSet<String> {
    let proto = DEFAULT_PROTOCOL;
    let mut out = BTreeSet::new();
    let mut names = std::collections::BTreeMap::new();
    let mut links = handle.link().get().execute();
    while let Some(l) = links.try_next().await.expect("links") {
        for a in &l.attributes {
            if let LinkAttribute::IfName(n) = a {
                names.insert(l.header.index, n.clone());
                out.insert(format!("link {n}"));
            }
        }
    }
    let mut addrs = handle.address().get().execute();
    while let Some(a) = addrs.try_next().await.expect("addresses") {
        let ip = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let ip = ip.or_else(|| {
            a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        let ours = a
            .attributes
            .contains(&AddressAttribute::Protocol(AddressProtocol::Other(proto)));
        if let Some(ip) = ip {
            out.insert(format!(
                "addr {ip}/{} dev {}{}",
                a.header.prefix_len,
                names.get(&a.header.index).cloned().unwrap_or_default(),
                if ours { " ours" } else { "" }
            ));
        }
    }
    for v in [IpVersion::V4, IpVersion::V6] {
        let mut rules = handle.rule().get(v).execute();
        while let Some(r) = rules.try_next().await.expect("rules") {
            let mut line = format!("rule {:?}", r.header.action);
            let mut mine = false;
            for a in &r.attributes {
                match a {
                    RuleAttribute::Source(s) => line += &format!(" from {s}/{}", r.header.src_len),
                    RuleAttribute::Destination(d) => {
                        line += &format!(" to {d}/{}", r.header.dst_len)
                    }
                    RuleAttribute::Table(t) => line += &format!(" table {t}"),
                    RuleAttribute::Priority(p) => line += &format!(" prio {p}"),
                    RuleAttribute::Protocol(p) => mine = *p == RouteProtocol::Other(proto),
                    _ => {}
                }
            }
            if mine {
                line += " ours";
            }
            out.insert(line);
        }
    }
    for probe in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut routes = handle.route().get(probe).execute();
        while let Some(r) = routes.try_next().await.expect("routes") {
            if r.header.table == RT_TABLE_LOCAL {
                continue; // the kernel's own local routes follow the addresses
            }
            let mut line = format!(
                "route {:?} {:?}/{} proto {:?}",
                r.header.kind,
                r.header.address_family,
                r.header.destination_prefix_length,
                r.header.protocol
            );
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(d) => line += &format!(" dst {d:?}"),
                    RouteAttribute::Gateway(g) => line += &format!(" via {g:?}"),
                    RouteAttribute::Table(t) => line += &format!(" table {t}"),
                    RouteAttribute::Oif(o) => {
                        line += &format!(" dev {}", names.get(o).cloned().unwrap_or_default())
                    }
                    _ => {}
                }
            }
            out.insert(line);
        }
    }
    out.retain(|l| !l.contains("fe80"));
    out
}

fn ours(all: &BTreeSet<String>) -> BTreeSet<String> {
    all.iter()
        .filter(|l| l.ends_with(" ours") || l.contains(&format!("proto Other({DEFAULT_PROTOCOL})")))
        .cloned()
        .collect()
}

/// The kernel's answer to `ip route get <dst> from <src>`: (table, gateway).
async fn route_get(handle: &Handle, dst: IpAddr, src: IpAddr) -> Option<(u32, Option<IpAddr>)> {
    let mut msg = match (dst, src) {
        (IpAddr::V4(d), IpAddr::V4(_)) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(d, 32)
            .build(),
        (IpAddr::V6(d), IpAddr::V6(_)) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(d, 128)
            .build(),
        _ => panic!("mixed families"),
    };
    msg.header.source_prefix_length = if src.is_ipv4() { 32 } else { 128 };
    // Report the table the lookup used, not RT_TABLE_MAIN.
    msg.header.flags |= RouteFlags::LookupTable;
    msg.attributes.push(RouteAttribute::Source(src.into()));
    let reply = handle.route().get(msg).execute().try_next().await.ok()??;
    let mut table = u32::from(reply.header.table);
    let mut gateway = None;
    for a in &reply.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Gateway(g) => gateway = super::ip_of(g),
            _ => {}
        }
    }
    Some((table, gateway))
}

fn in_prefix<'a>(lines: &'a BTreeSet<String>, needle: &'a str) -> impl Iterator<Item = &'a String> {
    lines.iter().filter(move |l| l.contains(needle))
}

#[test]
fn reconcile_programs_the_prefix_and_twice_changes_nothing() {
    in_netns(|handle| async move {
        let mut pinner = PrefixPinner::new(handle.clone(), config());
        let want = [
            pinned(
                "apps/a",
                "203.0.113.8/29",
                DefaultRoute::StaticEgressGateway,
                &["10.0.0.0/8"],
            ),
            pinned(
                "apps/b",
                "198.51.100.0/30",
                DefaultRoute::AzureNetworking,
                &["172.16.0.0/12"],
            ),
            pinned(
                "apps/c",
                "2001:db8:5c::/124",
                DefaultRoute::StaticEgressGateway,
                &[],
            ),
        ];
        let first = pinner.reconcile(&want).await.expect("reconcile");
        assert_eq!(first.pinned, vec!["apps/a", "apps/b", "apps/c"]);
        assert!(first.rejected.is_empty(), "{:?}", first.rejected);
        assert_eq!(first.added.links, 1);
        assert_eq!(first.added.addresses, 6 + 2 + 15);
        assert_eq!(first.added.rules, 2 + 1 + 1);
        assert_eq!(first.added.routes, 2);
        let after_first = everything(&handle).await;

        let second = pinner.reconcile(&want).await.expect("reconcile again");
        assert!(
            second.added.is_empty() && second.removed.is_empty(),
            "{second:?}"
        );
        assert_eq!(everything(&handle).await, after_first);
        // A fresh pinner (an agent restart) sees the same objects as its own.
        let third = PrefixPinner::new(handle.clone(), config())
            .reconcile(&want)
            .await
            .expect("reconcile after restart");
        assert!(
            third.added.is_empty() && third.removed.is_empty(),
            "{third:?}"
        );

        // The kernel now routes the prefix as asked.
        let a = prefix::source_address(want[0].prefix, &WorkloadUid("pod-1".into()));
        let out = route_get(&handle, IpAddr::from([93, 184, 216, 34]), a).await;
        assert_eq!(out, Some((DEFAULT_TABLE, Some(IpAddr::V4(GW4)))));
        let excluded = route_get(&handle, IpAddr::from([10, 1, 2, 3]), a).await;
        assert_eq!(excluded, Some((RT_TABLE_MAIN, Some(IpAddr::V4(MAIN_GW4)))));
        // azureNetworking: only the excluded CIDR takes the pinned path.
        let b = prefix::source_address(want[1].prefix, &WorkloadUid("pod-2".into()));
        let via = route_get(&handle, IpAddr::from([172, 16, 0, 9]), b).await;
        assert_eq!(via, Some((DEFAULT_TABLE, Some(IpAddr::V4(GW4)))));
        let direct = route_get(&handle, IpAddr::from([93, 184, 216, 34]), b).await;
        assert_eq!(direct, Some((RT_TABLE_MAIN, Some(IpAddr::V4(MAIN_GW4)))));
        let c = prefix::source_address(want[2].prefix, &WorkloadUid("pod-3".into()));
        let v6 = route_get(&handle, "2001:db8:ffff::1".parse().expect("ip"), c).await;
        assert_eq!(v6, Some((DEFAULT_TABLE, Some(IpAddr::V6(GW6)))));
        // And a gateway can bind to the chosen addresses.
        for addr in [a, b, c] {
            TcpListener::bind((addr, 0)).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        }
    });
}

#[test]
fn deleting_a_prefix_removes_exactly_what_it_made() {
    in_netns(|handle| async move {
        let mut pinner = PrefixPinner::new(handle.clone(), config());
        let a = pinned(
            "apps/a",
            "203.0.113.8/29",
            DefaultRoute::StaticEgressGateway,
            &["10.0.0.0/8"],
        );
        let b = pinned(
            "apps/b",
            "203.0.113.16/29",
            DefaultRoute::StaticEgressGateway,
            &[],
        );
        pinner
            .reconcile(std::slice::from_ref(&b))
            .await
            .expect("b alone");
        let b_alone = ours(&everything(&handle).await);
        pinner
            .reconcile(&[a.clone(), b.clone()])
            .await
            .expect("a and b");

        // Someone else's objects: a rule, a route in Sluice's own table, addresses on Sluice's
        // dummy and on the uplink.
        let mut rule = handle.rule().add();
        fill_rule(
            rule.message_mut(),
            &RuleKey {
                src: "10.99.0.0/24".parse().expect("net"),
                dst: None,
                table: 100,
                priority: 500,
            },
            RouteProtocol::Static.into(),
        );
        rule.execute().await.expect("foreign rule");
        let up = index_of(&handle, UPLINK).await;
        let mut foreign_route = route_message(
            &RouteKey {
                dst: "198.18.0.0/15".parse().expect("net"),
                gateway: IpAddr::V4(GW4),
                oif: up,
            },
            RouteProtocol::Static.into(),
            DEFAULT_TABLE,
        );
        foreign_route.header.protocol = RouteProtocol::Static;
        handle
            .route()
            .add(foreign_route)
            .execute()
            .await
            .expect("foreign route");
        let dummy = index_of(&handle, DEFAULT_INTERFACE).await;
        handle
            .address()
            .add(dummy, IpAddr::from([198, 18, 5, 5]), 32)
            .execute()
            .await
            .expect("foreign address on the dummy");
        handle
            .address()
            .add(up, IpAddr::from([198, 19, 1, 1]), 24)
            .execute()
            .await
            .expect("foreign address on the uplink");
        let before = everything(&handle).await;
        let foreign: BTreeSet<String> = before.difference(&ours(&before)).cloned().collect();
        assert!(
            foreign.iter().any(|l| l.contains("table 100")),
            "{foreign:#?}"
        );

        let report = pinner
            .reconcile(std::slice::from_ref(&b))
            .await
            .expect("a deleted");
        assert_eq!(report.removed.addresses, 6);
        assert_eq!(report.removed.rules, 2);
        assert_eq!(report.removed.routes, 0, "b still needs the default route");
        let after = everything(&handle).await;
        assert_eq!(ours(&after), b_alone, "exactly b's objects remain");
        assert!(
            foreign.is_subset(&after),
            "someone else's objects were touched: {:#?}",
            foreign.difference(&after).collect::<Vec<_>>()
        );
        assert_eq!(in_prefix(&after, "203.0.113.9/").count(), 0);

        let report = pinner.reconcile(&[]).await.expect("all deleted");
        assert_eq!(report.removed.routes, 1);
        let after = everything(&handle).await;
        assert!(ours(&after).is_empty(), "{:#?}", ours(&after));
        assert!(foreign.is_subset(&after));

        // Teardown keeps a dummy that holds someone else's address, and removes it otherwise.
        pinner.teardown().await.expect("teardown");
        assert!(
            everything(&handle)
                .await
                .contains(&format!("link {DEFAULT_INTERFACE}"))
        );
        let mut addrs = handle
            .address()
            .get()
            .set_link_index_filter(dummy)
            .execute();
        while let Some(m) = addrs.try_next().await.expect("addresses") {
            let mine = m
                .attributes
                .contains(&AddressAttribute::Local(IpAddr::from([198, 18, 5, 5])));
            if mine {
                handle
                    .address()
                    .del(m)
                    .execute()
                    .await
                    .expect("remove foreign address");
            }
        }
        let report = pinner.teardown().await.expect("teardown");
        assert_eq!(report.removed.links, 1);
        assert!(
            !everything(&handle)
                .await
                .contains(&format!("link {DEFAULT_INTERFACE}"))
        );
    });
}

#[test]
fn bad_prefixes_change_nothing_and_are_reported() {
    in_netns(|handle| async move {
        let mut pinner = PrefixPinner::new(handle.clone(), config());
        let clean = everything(&handle).await;
        // Nothing valid: not even the dummy interface is created.
        let report = pinner
            .reconcile(&[
                pinned(
                    "apps/host-bits",
                    "203.0.113.9/29",
                    DefaultRoute::StaticEgressGateway,
                    &[],
                ),
                pinned(
                    "apps/node",
                    "192.0.2.0/28",
                    DefaultRoute::StaticEgressGateway,
                    &[],
                ),
            ])
            .await
            .expect("reconcile");
        assert!(
            matches!(report.rejected[0], PrefixError::NotANetwork { .. }),
            "{report:?}"
        );
        assert!(
            matches!(&report.rejected[1], PrefixError::OverlapsNode { address, interface, .. }
                if *address == IpAddr::from([192, 0, 2, 1]) && interface == UPLINK),
            "{report:?}"
        );
        assert_eq!(everything(&handle).await, clean);

        // A good version is applied; a bad update to it keeps the good one.
        let good = pinned(
            "apps/a",
            "203.0.113.8/29",
            DefaultRoute::StaticEgressGateway,
            &[],
        );
        pinner
            .reconcile(std::slice::from_ref(&good))
            .await
            .expect("good");
        let applied = everything(&handle).await;
        let mut bad = good.clone();
        bad.prefix = "203.0.113.9/29".parse().expect("net");
        let overlapping = pinned(
            "apps/z",
            "203.0.113.0/28",
            DefaultRoute::StaticEgressGateway,
            &[],
        );
        let report = pinner
            .reconcile(&[bad, overlapping])
            .await
            .expect("reconcile");
        assert_eq!(report.kept, vec!["apps/a"]);
        assert_eq!(report.rejected.len(), 2, "{report:?}");
        assert!(
            matches!(report.rejected[1], PrefixError::OverlapsPrefix { .. }),
            "{report:?}"
        );
        assert!(
            report.added.is_empty() && report.removed.is_empty(),
            "{report:?}"
        );
        assert_eq!(everything(&handle).await, applied);

        // No IPv6 gateway on the uplink: an IPv6 prefix is refused.
        let mut v4_only = config();
        v4_only.uplink.gateway_v6 = None;
        let report = PrefixPinner::new(handle.clone(), v4_only)
            .reconcile(&[
                good,
                pinned(
                    "apps/v6",
                    "2001:db8::/126",
                    DefaultRoute::StaticEgressGateway,
                    &[],
                ),
            ])
            .await
            .expect("reconcile");
        assert!(
            matches!(
                report.rejected[0],
                PrefixError::NoUplinkGateway { family: 6, .. }
            ),
            "{report:?}"
        );
    });
}

#[test]
fn a_foreign_interface_named_like_the_dummy_is_not_taken_over() {
    in_netns(|handle| async move {
        handle
            .link()
            .add(LinkVeth::new(DEFAULT_INTERFACE, "peer0").build())
            .execute()
            .await
            .expect("veth");
        let err = PrefixPinner::new(handle.clone(), config())
            .reconcile(&[pinned(
                "apps/a",
                "203.0.113.8/29",
                DefaultRoute::StaticEgressGateway,
                &[],
            )])
            .await
            .expect_err("refused");
        assert!(matches!(err, NetlinkError::NotOurs { .. }), "{err}");
    });
}

#[test]
fn the_uplink_is_found_from_the_main_table() {
    in_netns(|handle| async move {
        let up = discover_uplink(&handle).await.expect("uplink");
        assert_eq!(up.interface, UPLINK);
        assert_eq!(up.gateway_v4, Some(MAIN_GW4));
        assert_eq!(up.gateway_v6, None);
    });
}

#[test]
fn reconcile_of_500_prefixes() {
    in_netns(|handle| async move {
        let base = u32::from(Ipv4Addr::new(100, 64, 0, 0));
        let want: Vec<PinnedPrefix> = (0..500u32)
            .map(|i| PinnedPrefix {
                name: format!("ns-{i}/sgc"),
                prefix: IpNet::new(IpAddr::V4(Ipv4Addr::from(base + i * 16)), 28).expect("net"),
                default_route: DefaultRoute::StaticEgressGateway,
                exclude_cidrs: vec!["10.0.0.0/8".parse().expect("cidr")],
            })
            .collect();
        let mut pinner = PrefixPinner::new(handle.clone(), config());

        let start = Instant::now();
        let first = pinner.reconcile(&want).await.expect("reconcile 500");
        let create = start.elapsed();
        assert_eq!(first.pinned.len(), 500);
        assert_eq!(first.added.addresses, 500 * 14);
        assert_eq!(first.added.rules, 1000);

        let start = Instant::now();
        let again = pinner.reconcile(&want).await.expect("reconcile 500 again");
        let steady = start.elapsed();
        assert!(
            again.added.is_empty() && again.removed.is_empty(),
            "{again:?}"
        );

        let start = Instant::now();
        let gone = pinner.reconcile(&[]).await.expect("remove 500");
        let remove = start.elapsed();
        assert_eq!(gone.removed.addresses, 500 * 14);
        assert_eq!(gone.removed.rules, 1000);
        println!(
            "egress pinning, 500 StaticGatewayConfigurations (/28, 7000 addresses, 1000 rules): \
             create {create:?}, unchanged {steady:?}, remove {remove:?}"
        );
    });
}

#[test]
fn kernel_releases_compare_by_major_and_minor() {
    assert!(release_at_least("6.18.44-fc-v769", 6, 3));
    assert!(release_at_least("6.3.0", 6, 3));
    assert!(!release_at_least("6.2.16-generic", 6, 3));
    assert!(!release_at_least("5.15.0-1064-azure", 6, 3));
    assert!(release_at_least("7.0", 6, 3));
    assert!(!release_at_least("garbage", 6, 3));
}

#[test]
fn without_address_marks_sluices_own_interface_still_works() {
    in_netns(|handle| async move {
        // As on kernels before 6.3: addresses are owned by living on Sluice's interface.
        let mut pinner = PrefixPinner::new(handle.clone(), config());
        pinner.marks_addresses = false;
        let want = [pinned(
            "apps/a",
            "203.0.113.8/29",
            DefaultRoute::StaticEgressGateway,
            &[],
        )];
        let first = pinner.reconcile(&want).await.expect("reconcile");
        assert_eq!(first.added.addresses, 6);
        let again = pinner.reconcile(&want).await.expect("reconcile again");
        assert!(
            again.added.is_empty() && again.removed.is_empty(),
            "{again:?}"
        );
        let gone = pinner.reconcile(&[]).await.expect("remove");
        assert_eq!(gone.removed.addresses, 6);

        let mut on_nic = config();
        on_nic.addresses = AddressHome::Interface(UPLINK.into());
        let mut pinner = PrefixPinner::new(handle.clone(), on_nic);
        pinner.marks_addresses = false;
        let err = pinner.reconcile(&want).await.expect_err("refused");
        assert!(matches!(err, NetlinkError::Unmarkable { .. }), "{err}");
    });
}

#[test]
fn addresses_can_live_on_an_existing_interface() {
    in_netns(|handle| async move {
        let mut on_nic = config();
        on_nic.addresses = AddressHome::Interface(UPLINK.into());
        let mut pinner = PrefixPinner::new(handle.clone(), on_nic);
        let want = [pinned(
            "apps/a",
            "203.0.113.8/29",
            DefaultRoute::StaticEgressGateway,
            &[],
        )];
        let first = pinner.reconcile(&want).await.expect("reconcile");
        assert_eq!((first.added.links, first.added.addresses), (0, 6));
        let all = everything(&handle).await;
        assert_eq!(in_prefix(&all, &format!("dev {UPLINK} ours")).count(), 6);
        assert!(!all.contains(&format!("link {DEFAULT_INTERFACE}")));
        let again = pinner.reconcile(&want).await.expect("reconcile again");
        assert!(
            again.added.is_empty() && again.removed.is_empty(),
            "{again:?}"
        );
        let report = pinner.teardown().await.expect("teardown");
        assert_eq!((report.removed.addresses, report.removed.links), (6, 0));
        assert!(
            everything(&handle)
                .await
                .contains("addr 192.0.2.1/24 dev uplink0")
        );
    });
}

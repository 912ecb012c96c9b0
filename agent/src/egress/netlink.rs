//! Static source-prefix pinning on a gateway node, programmed over rtnetlink.
//!
//! For each pinned prefix `P` (one per StaticGatewayConfiguration this node serves):
//! * the addresses of `P`'s pool ([`super::prefix::pool`]) as host addresses on an interface
//!   (by default Sluice's own `sluice-egress`: a dummy, or an ifb on kernels built without the
//!   dummy driver), so the gateway can bind to them;
//! * `defaultRoute: staticEgressGateway`: a rule `from P lookup <table>`, and for each
//!   `excludeCidrs` entry `C` a rule `from P to C lookup main` just before it, so excluded
//!   destinations keep the node's normal routing;
//! * `defaultRoute: azureNetworking`: only rules `from P to C lookup <table>`, so only excluded
//!   destinations take the pinned path;
//! * in Sluice's table, one default route per address family via the uplink's gateway.
//!
//! Every object carries Sluice's protocol number (`rtm_protocol` for routes, `FRA_PROTOCOL` for
//! rules, `IFA_PROTO` for addresses, Linux 6.3+), and routes live in Sluice's table. Reconcile
//! reads the kernel, touches only objects so marked, adds what is missing and removes what is no
//! longer wanted, so it is idempotent, survives agent restarts, and leaves everything else alone.
//! A prefix that is not a network, overlaps an address of the node or another prefix, or has
//! no uplink gateway for its family is reported and left exactly as it was.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::{StreamExt, TryStreamExt, stream};
use ipnet::IpNet;
use rtnetlink::{
    Handle, IpVersion, LinkDummy, LinkIfb, LinkUnspec, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        address::{
            AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressProtocol,
        },
        link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
        route::{
            RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
        },
        rule::{RuleAction, RuleAttribute, RuleMessage},
    },
};

use super::prefix;
use crate::state::egress::{DefaultRoute, StaticGateway};

/// Sluice's routing table for pinned egress.
pub const DEFAULT_TABLE: u32 = 0x53b;
/// Sluice's protocol number on routes, rules and addresses (unassigned in `rt_protos`).
pub const DEFAULT_PROTOCOL: u8 = 0x53;
/// Priority of the `from <prefix>` rules; exclusion rules take the one before.
pub const DEFAULT_RULE_PRIORITY: u32 = 0x53b;
/// Sluice's own interface holding the prefix addresses.
pub const DEFAULT_INTERFACE: &str = "sluice-egress";

/// How many netlink requests are in flight at once.
const IN_FLIGHT: usize = 64;
const RT_TABLE_MAIN: u32 = RouteHeader::RT_TABLE_MAIN as u32;

/// Where the prefix addresses go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressHome {
    /// An interface Sluice creates (a dummy; an ifb where the kernel has no dummy driver), brings
    /// up and, on teardown, removes.
    Owned(String),
    /// An existing interface (e.g. the egress NIC), which Sluice never creates or removes.
    Interface(String),
}

/// The node's way out: its interface and next hops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    pub interface: String,
    pub gateway_v4: Option<Ipv4Addr>,
    pub gateway_v6: Option<Ipv6Addr>,
}

/// Numbers and names that make Sluice's objects its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinningConfig {
    pub table: u32,
    pub protocol: u8,
    pub rule_priority: u32,
    pub addresses: AddressHome,
    pub uplink: Uplink,
}

impl PinningConfig {
    /// Sluice's defaults around `uplink`.
    pub fn new(uplink: Uplink) -> Self {
        Self {
            table: DEFAULT_TABLE,
            protocol: DEFAULT_PROTOCOL,
            rule_priority: DEFAULT_RULE_PRIORITY,
            addresses: AddressHome::Owned(DEFAULT_INTERFACE.to_owned()),
            uplink,
        }
    }
}

/// One prefix this node should pin (from one StaticGatewayConfiguration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedPrefix {
    /// `namespace/name` of the SGC, for reports.
    pub name: String,
    pub prefix: IpNet,
    pub default_route: DefaultRoute,
    pub exclude_cidrs: Vec<IpNet>,
}

impl PinnedPrefix {
    /// The pinning `gateway` asks for, once its prefix is known.
    pub fn from_static_gateway(gateway: &StaticGateway) -> Option<Self> {
        Some(Self {
            name: gateway.key.to_string(),
            prefix: gateway.prefix?,
            default_route: gateway.default_route,
            exclude_cidrs: gateway.exclude_cidrs.clone(),
        })
    }
}

/// Why one prefix was not programmed (nothing was changed for it).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("{name}: {prefix} is not a network (host bits set; did you mean {network}?)")]
    NotANetwork {
        name: String,
        prefix: IpNet,
        network: IpNet,
    },
    #[error("{name}: {prefix} contains {address}, an address of this node (interface {interface})")]
    OverlapsNode {
        name: String,
        prefix: IpNet,
        address: IpAddr,
        interface: String,
    },
    #[error("{name}: {prefix} overlaps the prefix of {other}")]
    OverlapsPrefix {
        name: String,
        prefix: IpNet,
        other: String,
    },
    #[error("{name}: uplink {uplink} has no IPv{family} gateway for {prefix}")]
    NoUplinkGateway {
        name: String,
        prefix: IpNet,
        uplink: String,
        family: u8,
    },
    #[error("{name}: listed twice")]
    Duplicate { name: String },
}

impl PrefixError {
    /// The SGC the error is about.
    pub fn name(&self) -> &str {
        match self {
            Self::NotANetwork { name, .. }
            | Self::OverlapsNode { name, .. }
            | Self::OverlapsPrefix { name, .. }
            | Self::NoUplinkGateway { name, .. }
            | Self::Duplicate { name } => name,
        }
    }
}

/// A netlink failure that stopped a reconcile part-way (the next one picks up from there).
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("{what}: {source}")]
    Request {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("interface {name} not found")]
    NoInterface { name: String },
    #[error("interface {name} exists and is not a dummy or ifb; Sluice will not take it over")]
    NotOurs { name: String },
    #[error("no default route with a gateway in the main table to use as uplink")]
    NoUplink,
    #[error(
        "addresses on {name} cannot be marked as Sluice's (IFA_PROTO needs Linux 6.3+); use Sluice's own interface"
    )]
    Unmarkable { name: String },
}

/// How many objects of each kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub links: usize,
    pub addresses: usize,
    pub rules: usize,
    pub routes: usize,
}

impl Counts {
    /// True when all are zero.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} links, {} addresses, {} rules, {} routes",
            self.links, self.addresses, self.rules, self.routes
        )
    }
}

/// What a reconcile did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Prefixes now programmed as asked, by name.
    pub pinned: Vec<String>,
    /// Prefixes refused; each left as it was before this reconcile.
    pub rejected: Vec<PrefixError>,
    /// Refused names still programmed from an earlier, valid version.
    pub kept: Vec<String>,
    pub added: Counts,
    pub removed: Counts,
}

/// Keeps the node's pinned prefixes equal to what it is given.
#[derive(Debug)]
pub struct PrefixPinner {
    handle: Handle,
    config: PinningConfig,
    /// Last version of each prefix that was programmed, to keep it when a new one is refused.
    applied: BTreeMap<String, PinnedPrefix>,
    /// Whether the kernel keeps `IFA_PROTO` on addresses (Linux 6.3+).
    marks_addresses: bool,
}

/// True if a kernel `release` string (`uname -r`) is at least `major.minor`.
pub fn release_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}

fn kernel_marks_addresses() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .is_ok_and(|release| release_at_least(release.trim(), 6, 3))
}

// ---------------------------------------------------------------------------------------------
// Object identities

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct AddrKey {
    index: u32,
    addr: IpAddr,
    prefix_len: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct RuleKey {
    src: IpNet,
    dst: Option<IpNet>,
    table: u32,
    priority: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct RouteKey {
    dst: IpNet,
    gateway: IpAddr,
    oif: u32,
}

/// What the kernel holds that matters here.
struct Observed {
    /// Interface name → (index, is a dummy or ifb, the kinds Sluice creates).
    links: BTreeMap<String, (u32, bool)>,
    names: BTreeMap<u32, String>,
    /// Sluice's addresses.
    addresses: BTreeMap<AddrKey, AddressMessage>,
    /// Everyone else's addresses (index, address).
    foreign_addresses: Vec<(u32, IpAddr, Option<AddressProtocol>)>,
    rules: BTreeMap<RuleKey, RuleMessage>,
    routes: BTreeMap<RouteKey, RouteMessage>,
}

fn request(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |source| NetlinkError::Request { what, source }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

fn family_of(net: &IpNet) -> AddressFamily {
    match net {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    }
}

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

fn net_of(ip: IpAddr, len: u8) -> Option<IpNet> {
    IpNet::new(ip, len).ok()
}

impl PrefixPinner {
    /// A pinner using `handle` (its socket decides the network namespace).
    pub fn new(handle: Handle, config: PinningConfig) -> Self {
        Self {
            handle,
            config,
            applied: BTreeMap::new(),
            marks_addresses: kernel_marks_addresses(),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &PinningConfig {
        &self.config
    }

    /// Makes the node hold exactly `desired` (plus the last good version of refused entries).
    pub async fn reconcile(
        &mut self,
        desired: &[PinnedPrefix],
    ) -> Result<ReconcileReport, NetlinkError> {
        if let AddressHome::Interface(name) = &self.config.addresses
            && !self.marks_addresses
        {
            return Err(NetlinkError::Unmarkable { name: name.clone() });
        }
        let observed = self.observe().await?;
        let mut report = ReconcileReport::default();

        // Validate, in name order, against the node and against the prefixes accepted so far.
        let mut sorted: Vec<&PinnedPrefix> = desired.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let mut accepted: Vec<PinnedPrefix> = Vec::new();
        let mut seen = BTreeSet::new();
        for p in sorted {
            if !seen.insert(p.name.clone()) {
                report.rejected.push(PrefixError::Duplicate {
                    name: p.name.clone(),
                });
                continue;
            }
            match self.check(p, &observed, &accepted) {
                Ok(()) => {
                    report.pinned.push(p.name.clone());
                    accepted.push(p.clone());
                }
                Err(e) => {
                    report.rejected.push(e);
                    if let Some(old) = self.applied.get(&p.name)
                        && self.check(old, &observed, &accepted).is_ok()
                    {
                        report.kept.push(old.name.clone());
                        accepted.push(old.clone());
                    }
                }
            }
        }

        let (want_addrs, want_rules, want_routes) = if accepted.is_empty() {
            Default::default()
        } else {
            let uplink = &self.config.uplink.interface;
            let uplink_index = observed.links.get(uplink).map(|(i, _)| *i).ok_or_else(|| {
                NetlinkError::NoInterface {
                    name: uplink.clone(),
                }
            })?;
            let addr_index = self
                .ensure_address_home(&observed, &mut report.added)
                .await?;
            self.desired(&accepted, addr_index, uplink_index)
        };

        // Remove what is ours and unwanted: rules first, so nothing points at a half-torn path.
        let stale_rules: Vec<RuleMessage> = observed
            .rules
            .iter()
            .filter(|(k, _)| !want_rules.contains(k))
            .map(|(_, m)| m.clone())
            .collect();
        report.removed.rules = self.delete_rules(stale_rules).await?;
        let stale_routes: Vec<RouteMessage> = observed
            .routes
            .iter()
            .filter(|(k, _)| !want_routes.contains(k))
            .map(|(_, m)| m.clone())
            .collect();
        report.removed.routes = self.delete_routes(stale_routes).await?;
        let stale_addrs: Vec<AddressMessage> = observed
            .addresses
            .iter()
            .filter(|(k, _)| !want_addrs.contains(k))
            .map(|(_, m)| m.clone())
            .collect();
        report.removed.addresses = self.delete_addresses(stale_addrs).await?;

        // Add what is missing: addresses, then routes, then the rules that use them.
        let new_addrs: Vec<AddrKey> = want_addrs
            .into_iter()
            .filter(|k| !observed.addresses.contains_key(k))
            .collect();
        report.added.addresses = self.add_addresses(new_addrs).await?;
        let new_routes: Vec<RouteKey> = want_routes
            .into_iter()
            .filter(|k| !observed.routes.contains_key(k))
            .collect();
        report.added.routes = self.add_routes(new_routes).await?;
        let new_rules: Vec<RuleKey> = want_rules
            .into_iter()
            .filter(|k| !observed.rules.contains_key(k))
            .collect();
        report.added.rules = self.add_rules(new_rules).await?;

        self.applied = accepted.into_iter().map(|p| (p.name.clone(), p)).collect();
        Ok(report)
    }

    /// Removes every object of Sluice's (and its own interface, if nothing else lives on it).
    pub async fn teardown(&mut self) -> Result<ReconcileReport, NetlinkError> {
        let mut report = self.reconcile(&[]).await?;
        let AddressHome::Owned(name) = &self.config.addresses else {
            return Ok(report);
        };
        let observed = self.observe().await?;
        let Some((index, true)) = observed.links.get(name).copied() else {
            return Ok(report);
        };
        let occupied = observed.foreign_addresses.iter().any(|(i, _, proto)| {
            *i == index
                && !matches!(
                    proto,
                    Some(AddressProtocol::LinkLocal | AddressProtocol::RouterAnnouncement)
                )
        });
        if !occupied {
            self.handle
                .link()
                .del(index)
                .execute()
                .await
                .map_err(request(format!("deleting interface {name}")))?;
            report.removed.links += 1;
        }
        Ok(report)
    }

    fn check(
        &self,
        p: &PinnedPrefix,
        observed: &Observed,
        accepted: &[PinnedPrefix],
    ) -> Result<(), PrefixError> {
        let name = p.name.clone();
        if p.prefix.trunc() != p.prefix {
            return Err(PrefixError::NotANetwork {
                name,
                prefix: p.prefix,
                network: p.prefix.trunc(),
            });
        }
        let has_gateway = match p.prefix {
            IpNet::V4(_) => self.config.uplink.gateway_v4.is_some(),
            IpNet::V6(_) => self.config.uplink.gateway_v6.is_some(),
        };
        if !has_gateway {
            return Err(PrefixError::NoUplinkGateway {
                name,
                prefix: p.prefix,
                uplink: self.config.uplink.interface.clone(),
                family: if p.prefix.addr().is_ipv4() { 4 } else { 6 },
            });
        }
        if let Some((index, address, _)) = observed
            .foreign_addresses
            .iter()
            .find(|(_, a, _)| p.prefix.contains(a))
        {
            return Err(PrefixError::OverlapsNode {
                name,
                prefix: p.prefix,
                address: *address,
                interface: observed.names.get(index).cloned().unwrap_or_default(),
            });
        }
        if let Some(other) = accepted.iter().find(|o| {
            o.prefix.contains(&p.prefix.network()) || p.prefix.contains(&o.prefix.network())
        }) {
            return Err(PrefixError::OverlapsPrefix {
                name,
                prefix: p.prefix,
                other: other.name.clone(),
            });
        }
        Ok(())
    }

    fn desired(
        &self,
        accepted: &[PinnedPrefix],
        addr_index: u32,
        uplink_index: u32,
    ) -> (BTreeSet<AddrKey>, BTreeSet<RuleKey>, BTreeSet<RouteKey>) {
        let c = &self.config;
        let mut addrs = BTreeSet::new();
        let mut rules = BTreeSet::new();
        let mut families = BTreeSet::new();
        for p in accepted {
            for addr in prefix::pool(p.prefix) {
                addrs.insert(AddrKey {
                    index: addr_index,
                    addr,
                    prefix_len: host_net(addr).prefix_len(),
                });
            }
            let excluded = p
                .exclude_cidrs
                .iter()
                .filter(|c| c.addr().is_ipv4() == p.prefix.addr().is_ipv4());
            match p.default_route {
                DefaultRoute::StaticEgressGateway => {
                    rules.insert(RuleKey {
                        src: p.prefix,
                        dst: None,
                        table: c.table,
                        priority: c.rule_priority,
                    });
                    for x in excluded {
                        rules.insert(RuleKey {
                            src: p.prefix,
                            dst: Some(x.trunc()),
                            table: RT_TABLE_MAIN,
                            priority: c.rule_priority.saturating_sub(1),
                        });
                    }
                    families.insert(p.prefix.addr().is_ipv4());
                }
                DefaultRoute::AzureNetworking => {
                    for x in excluded {
                        rules.insert(RuleKey {
                            src: p.prefix,
                            dst: Some(x.trunc()),
                            table: c.table,
                            priority: c.rule_priority,
                        });
                        families.insert(p.prefix.addr().is_ipv4());
                    }
                }
            }
        }
        let mut routes = BTreeSet::new();
        for v4 in families {
            let gateway = if v4 {
                c.uplink.gateway_v4.map(IpAddr::V4)
            } else {
                c.uplink.gateway_v6.map(IpAddr::V6)
            };
            let any = if v4 {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            };
            if let (Some(gateway), Ok(dst)) = (gateway, IpNet::new(any, 0)) {
                routes.insert(RouteKey {
                    dst,
                    gateway,
                    oif: uplink_index,
                });
            }
        }
        (addrs, rules, routes)
    }

    /// Makes sure the address interface exists and is up; returns its index.
    async fn ensure_address_home(
        &self,
        observed: &Observed,
        added: &mut Counts,
    ) -> Result<u32, NetlinkError> {
        let (name, owned) = match &self.config.addresses {
            AddressHome::Owned(n) => (n, true),
            AddressHome::Interface(n) => (n, false),
        };
        let index = match observed.links.get(name) {
            Some((_, false)) if owned => {
                return Err(NetlinkError::NotOurs { name: name.clone() });
            }
            Some((index, _)) => *index,
            None if !owned => return Err(NetlinkError::NoInterface { name: name.clone() }),
            None => {
                let dummy = self
                    .handle
                    .link()
                    .add(LinkDummy::new(name).up().build())
                    .execute()
                    .await;
                match dummy {
                    Err(e) if errno(&e) == Some(libc::EOPNOTSUPP) => self
                        .handle
                        .link()
                        .add(LinkIfb::new(name).up().build())
                        .execute()
                        .await
                        .map_err(request(format!("creating ifb interface {name}")))?,
                    other => other.map_err(request(format!("creating dummy interface {name}")))?,
                }
                added.links += 1;
                let link = self
                    .link_by_name(name)
                    .await?
                    .ok_or_else(|| NetlinkError::NoInterface { name: name.clone() })?;
                link.header.index
            }
        };
        if owned {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(request(format!("bringing {name} up")))?;
        }
        Ok(index)
    }

    async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
        let found = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute()
            .try_next()
            .await;
        match found {
            Ok(link) => Ok(link),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(request(format!("looking up interface {name}"))(e)),
        }
    }

    async fn observe(&self) -> Result<Observed, NetlinkError> {
        let proto = self.config.protocol;
        let mut links = BTreeMap::new();
        let mut names = BTreeMap::new();
        let mut dump = self.handle.link().get().execute();
        while let Some(link) = dump
            .try_next()
            .await
            .map_err(request("listing interfaces"))?
        {
            let mut name = None;
            let mut ownable = false;
            for attr in &link.attributes {
                match attr {
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    LinkAttribute::LinkInfo(infos) => {
                        ownable |= infos
                            .iter()
                            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Dummy | InfoKind::Ifb)));
                    }
                    _ => {}
                }
            }
            if let Some(name) = name {
                names.insert(link.header.index, name.clone());
                links.insert(name, (link.header.index, ownable));
            }
        }

        // Without IFA_PROTO (before Linux 6.3) addresses cannot be marked; then everything on
        // Sluice's own interface except kernel link-local addresses counts as Sluice's.
        let owned_index = match &self.config.addresses {
            AddressHome::Owned(name) if !self.marks_addresses => links.get(name).map(|(i, _)| *i),
            _ => None,
        };
        let mut addresses = BTreeMap::new();
        let mut foreign_addresses = Vec::new();
        let mut dump = self.handle.address().get().execute();
        while let Some(msg) = dump
            .try_next()
            .await
            .map_err(request("listing addresses"))?
        {
            let mut local = None;
            let mut address = None;
            let mut protocol = None;
            for attr in &msg.attributes {
                match attr {
                    AddressAttribute::Local(a) => local = Some(*a),
                    AddressAttribute::Address(a) => address = Some(*a),
                    AddressAttribute::Protocol(p) => protocol = Some(*p),
                    _ => {}
                }
            }
            let Some(addr) = local.or(address) else {
                continue;
            };
            let unmarked_ours = owned_index == Some(msg.header.index)
                && !matches!(addr, IpAddr::V6(v6) if v6.is_unicast_link_local());
            if protocol == Some(AddressProtocol::Other(proto)) || unmarked_ours {
                addresses.insert(
                    AddrKey {
                        index: msg.header.index,
                        addr,
                        prefix_len: msg.header.prefix_len,
                    },
                    msg,
                );
            } else {
                foreign_addresses.push((msg.header.index, addr, protocol));
            }
        }

        let mut rules = BTreeMap::new();
        for version in [IpVersion::V4, IpVersion::V6] {
            let mut dump = self.handle.rule().get(version).execute();
            while let Some(msg) = dump.try_next().await.map_err(request("listing rules"))? {
                if let Some(key) = rule_key(&msg, proto) {
                    rules.insert(key, msg);
                }
            }
        }

        let mut routes = BTreeMap::new();
        let families = [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ];
        for probe in families {
            let mut dump = self.handle.route().get(probe).execute();
            while let Some(msg) = dump.try_next().await.map_err(request("listing routes"))? {
                if let Some(key) = route_key(&msg, proto, self.config.table) {
                    routes.insert(key, msg);
                }
            }
        }
        Ok(Observed {
            links,
            names,
            addresses,
            foreign_addresses,
            rules,
            routes,
        })
    }

    async fn add_addresses(&self, keys: Vec<AddrKey>) -> Result<usize, NetlinkError> {
        let proto = self.config.protocol;
        let added = stream::iter(keys)
            .map(|k| async move {
                let mut req = self.handle.address().add(k.index, k.addr, k.prefix_len);
                let msg = req.message_mut();
                msg.attributes
                    .push(AddressAttribute::Protocol(AddressProtocol::Other(proto)));
                if k.addr.is_ipv6() {
                    // Usable at once: no duplicate address detection on an address we own.
                    msg.header.flags |= AddressHeaderFlags::Nodad;
                    msg.attributes
                        .push(AddressAttribute::Flags(AddressFlags::Nodad));
                }
                match req.execute().await {
                    Ok(()) => Ok(1),
                    Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(0),
                    Err(e) => Err(request(format!("adding address {}", k.addr))(e)),
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_fold(0, |n, one| async move { Ok(n + one) })
            .await?;
        Ok(added)
    }

    async fn delete_addresses(&self, msgs: Vec<AddressMessage>) -> Result<usize, NetlinkError> {
        stream::iter(msgs)
            .map(|m| async move {
                match self.handle.address().del(m).execute().await {
                    Ok(()) => Ok(1),
                    Err(e)
                        if matches!(
                            errno(&e),
                            Some(libc::EADDRNOTAVAIL | libc::ENOENT | libc::ENODEV)
                        ) =>
                    {
                        Ok(0)
                    }
                    Err(e) => Err(request("deleting an address")(e)),
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_fold(0, |n, one| async move { Ok(n + one) })
            .await
    }

    async fn add_rules(&self, keys: Vec<RuleKey>) -> Result<usize, NetlinkError> {
        let proto = self.config.protocol;
        stream::iter(keys)
            .map(|k| async move {
                let mut req = self.handle.rule().add();
                let msg = req.message_mut();
                fill_rule(msg, &k, proto);
                match req.execute().await {
                    Ok(()) => Ok(1),
                    Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(0),
                    Err(e) => Err(request(format!("adding rule from {}", k.src))(e)),
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_fold(0, |n, one| async move { Ok(n + one) })
            .await
    }

    async fn delete_rules(&self, msgs: Vec<RuleMessage>) -> Result<usize, NetlinkError> {
        stream::iter(msgs)
            .map(|m| async move {
                match self.handle.rule().del(m).execute().await {
                    Ok(()) => Ok(1),
                    Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::ESRCH)) => Ok(0),
                    Err(e) => Err(request("deleting a rule")(e)),
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_fold(0, |n, one| async move { Ok(n + one) })
            .await
    }

    async fn add_routes(&self, keys: Vec<RouteKey>) -> Result<usize, NetlinkError> {
        let (proto, table) = (self.config.protocol, self.config.table);
        stream::iter(keys)
            .map(|k| async move {
                let msg = route_message(&k, proto, table);
                match self.handle.route().add(msg).execute().await {
                    Ok(()) => Ok(1),
                    Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(0),
                    Err(e) => Err(request(format!("adding route {} via {}", k.dst, k.gateway))(e)),
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_fold(0, |n, one| async move { Ok(n + one) })
            .await
    }

    async fn delete_routes(&self, msgs: Vec<RouteMessage>) -> Result<usize, NetlinkError> {
        stream::iter(msgs)
            .map(|m| async move {
                match self.handle.route().del(m).execute().await {
                    Ok(()) => Ok(1),
                    Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::ESRCH)) => Ok(0),
                    Err(e) => Err(request("deleting a route")(e)),
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_fold(0, |n, one| async move { Ok(n + one) })
            .await
    }
}

fn rule_key(msg: &RuleMessage, proto: u8) -> Option<RuleKey> {
    let mut src = None;
    let mut dst = None;
    let mut table = u32::from(msg.header.table);
    let mut priority = 0;
    let mut ours = false;
    for attr in &msg.attributes {
        match attr {
            RuleAttribute::Source(a) => src = Some(*a),
            RuleAttribute::Destination(a) => dst = Some(*a),
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Priority(p) => priority = *p,
            RuleAttribute::Protocol(p) => ours = *p == RouteProtocol::Other(proto),
            _ => {}
        }
    }
    if !ours || msg.header.action != RuleAction::ToTable {
        return None;
    }
    Some(RuleKey {
        src: net_of(src?, msg.header.src_len)?,
        dst: match dst {
            Some(d) => Some(net_of(d, msg.header.dst_len)?),
            None => None,
        },
        table,
        priority,
    })
}

fn fill_rule(msg: &mut RuleMessage, k: &RuleKey, proto: u8) {
    msg.header.family = family_of(&k.src);
    msg.header.action = RuleAction::ToTable;
    msg.header.src_len = k.src.prefix_len();
    msg.attributes.push(RuleAttribute::Source(k.src.addr()));
    if let Some(dst) = k.dst {
        msg.header.dst_len = dst.prefix_len();
        msg.attributes.push(RuleAttribute::Destination(dst.addr()));
    }
    match u8::try_from(k.table) {
        Ok(t) => msg.header.table = t,
        Err(_) => {
            msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
            msg.attributes.push(RuleAttribute::Table(k.table));
        }
    }
    msg.attributes.push(RuleAttribute::Priority(k.priority));
    msg.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::Other(proto)));
}

fn route_key(msg: &RouteMessage, proto: u8, table: u32) -> Option<RouteKey> {
    if msg.header.protocol != RouteProtocol::Other(proto) || msg.header.kind != RouteType::Unicast {
        return None;
    }
    let mut in_table = u32::from(msg.header.table);
    let mut dst = None;
    let mut gateway = None;
    let mut oif = 0;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => in_table = *t,
            RouteAttribute::Destination(a) => dst = ip_of(a),
            RouteAttribute::Gateway(a) => gateway = ip_of(a),
            RouteAttribute::Oif(i) => oif = *i,
            _ => {}
        }
    }
    if in_table != table {
        return None;
    }
    let any = match msg.header.address_family {
        AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    Some(RouteKey {
        dst: net_of(dst.unwrap_or(any), msg.header.destination_prefix_length)?,
        gateway: gateway?,
        oif,
    })
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn route_message(k: &RouteKey, proto: u8, table: u32) -> RouteMessage {
    let mut msg = match (k.dst, k.gateway) {
        (IpNet::V4(d), IpAddr::V4(g)) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(d.addr(), d.prefix_len())
            .gateway(g)
            .build(),
        (IpNet::V6(d), IpAddr::V6(g)) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(d.addr(), d.prefix_len())
            .gateway(g)
            .build(),
        // Keys are built per family; a mixed one cannot occur.
        _ => RouteMessage::default(),
    };
    msg.header.protocol = RouteProtocol::Other(proto);
    match u8::try_from(table) {
        Ok(t) => msg.header.table = t,
        Err(_) => {
            msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
            msg.attributes.push(RouteAttribute::Table(table));
        }
    }
    msg.attributes.push(RouteAttribute::Oif(k.oif));
    msg
}

/// The uplink from the main table's default routes (IPv4 first; an IPv6 gateway is used when it
/// leaves through the same interface).
pub async fn discover_uplink(handle: &Handle) -> Result<Uplink, NetlinkError> {
    let mut found: Vec<(u32, IpAddr)> = Vec::new();
    let probes = [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ];
    for probe in probes {
        let mut dump = handle.route().get(probe).execute();
        while let Some(msg) = dump.try_next().await.map_err(request("listing routes"))? {
            if msg.header.destination_prefix_length != 0 || msg.header.kind != RouteType::Unicast {
                continue;
            }
            let mut table = u32::from(msg.header.table);
            let (mut gateway, mut oif) = (None, None);
            for attr in &msg.attributes {
                match attr {
                    RouteAttribute::Table(t) => table = *t,
                    RouteAttribute::Gateway(a) => gateway = ip_of(a),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if let (RT_TABLE_MAIN, Some(g), Some(i)) = (table, gateway, oif) {
                found.push((i, g));
            }
        }
    }
    let (index, _) = found.first().copied().ok_or(NetlinkError::NoUplink)?;
    let mut dump = handle.link().get().match_index(index).execute();
    let link = dump
        .try_next()
        .await
        .map_err(request("looking up the uplink"))?
        .ok_or(NetlinkError::NoUplink)?;
    let interface = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .ok_or(NetlinkError::NoUplink)?;
    let on_uplink = |v4: bool| {
        found
            .iter()
            .filter(|(i, g)| *i == index && g.is_ipv4() == v4)
            .map(|(_, g)| *g)
            .next()
    };
    Ok(Uplink {
        interface,
        gateway_v4: on_uplink(true).and_then(|g| match g {
            IpAddr::V4(g) => Some(g),
            IpAddr::V6(_) => None,
        }),
        gateway_v6: on_uplink(false).and_then(|g| match g {
            IpAddr::V6(g) => Some(g),
            IpAddr::V4(_) => None,
        }),
    })
}

#[cfg(test)]
mod tests;

//! The addresses of a static egress prefix that a gateway node holds, and which of them a given
//! workload's connections leave from.
//!
//! The pool of a prefix is its host addresses (IPv4 without the network and broadcast addresses
//! below /31; IPv6 without the subnet-router anycast address below /127), at most
//! [`MAX_POOL`] of them, from the bottom. The netlink side puts exactly the pool on the node, and
//! [`source_address`] picks from it with a fixed hash of the workload UID, so a workload leaves
//! from the same address on every gateway node, across restarts and agent versions.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::state::WorkloadUid;

/// Most addresses of one prefix that a gateway node holds.
pub const MAX_POOL: u32 = 256;

/// Number of addresses in `prefix`'s pool (at least 1).
pub fn pool_size(prefix: IpNet) -> u32 {
    let host_bits = u32::from(prefix.max_prefix_len() - prefix.prefix_len());
    let all: u128 = if host_bits >= 127 {
        u128::MAX
    } else {
        1u128 << host_bits
    };
    let usable = match prefix {
        IpNet::V4(_) if host_bits >= 2 => all - 2,
        IpNet::V6(_) if host_bits >= 2 => all - 1,
        _ => all,
    };
    u32::try_from(usable.min(u128::from(MAX_POOL))).unwrap_or(MAX_POOL)
}

/// The `i`-th address of `prefix`'s pool, if `i < pool_size(prefix)`.
pub fn pool_address(prefix: IpNet, i: u32) -> Option<IpAddr> {
    if i >= pool_size(prefix) {
        return None;
    }
    let host_bits = prefix.max_prefix_len() - prefix.prefix_len();
    let skip = u32::from(host_bits >= 2);
    let offset = i + skip;
    Some(match prefix {
        IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n.network()).wrapping_add(offset))),
        IpNet::V6(n) => IpAddr::V6(Ipv6Addr::from(
            u128::from(n.network()).wrapping_add(u128::from(offset)),
        )),
    })
}

/// Every address of `prefix`'s pool, lowest first.
pub fn pool(prefix: IpNet) -> impl Iterator<Item = IpAddr> {
    (0..pool_size(prefix)).filter_map(move |i| pool_address(prefix, i))
}

/// The address of `prefix` that `workload`'s egress connections leave from: stable for a given
/// prefix and UID, spread evenly over the pool.
pub fn source_address(prefix: IpNet, workload: &WorkloadUid) -> IpAddr {
    let index = fnv1a64(workload.0.as_bytes()) % u64::from(pool_size(prefix));
    // `index < pool_size`, so both the conversion and the lookup succeed.
    let index = u32::try_from(index).unwrap_or(0);
    pool_address(prefix, index).unwrap_or_else(|| prefix.network())
}

/// FNV-1a, 64 bit: fixed by its specification, unlike std's hasher.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("prefix")
    }

    #[test]
    fn pools_skip_network_and_broadcast() {
        let p = net("203.0.113.8/29");
        let addrs: Vec<IpAddr> = pool(p).collect();
        assert_eq!(addrs.len(), 6);
        assert!(!addrs.contains(&IpAddr::from([203, 0, 113, 8])));
        assert!(!addrs.contains(&IpAddr::from([203, 0, 113, 15])));
        assert!(addrs.iter().all(|a| p.contains(a)));
        assert_eq!(pool(net("203.0.113.8/31")).count(), 2);
        assert_eq!(
            pool(net("203.0.113.9/32")).collect::<Vec<_>>(),
            vec![IpAddr::from([203, 0, 113, 9])]
        );
        let v6: Vec<IpAddr> = pool(net("2001:db8::/124")).collect();
        assert_eq!(v6.len(), 15);
        assert!(!v6.contains(&"2001:db8::".parse::<IpAddr>().expect("ip")));
    }

    #[test]
    fn large_prefixes_are_capped() {
        assert_eq!(pool_size(net("10.0.0.0/8")), MAX_POOL);
        assert_eq!(pool_size(net("2001:db8::/64")), MAX_POOL);
        assert_eq!(pool_size(net("2001:db8::/0")), MAX_POOL);
        assert_eq!(pool_size(net("0.0.0.0/0")), MAX_POOL);
        assert_eq!(pool_address(net("10.0.0.0/8"), MAX_POOL), None);
    }

    #[test]
    fn source_addresses_are_stable_and_spread() {
        let p = net("198.51.100.0/29");
        let pool: BTreeSet<IpAddr> = pool(p).collect();
        let mut used = BTreeSet::new();
        for i in 0..200 {
            let uid = WorkloadUid(format!("pod-{i}"));
            let a = source_address(p, &uid);
            assert!(pool.contains(&a), "{a} outside the pool");
            assert_eq!(a, source_address(p, &uid.clone()), "not stable");
            used.insert(a);
        }
        assert_eq!(
            used, pool,
            "200 workloads should use every address of a /29"
        );
        let v6 = net("2001:db8:5c::/120");
        let a = source_address(v6, &WorkloadUid("x".into()));
        assert!(v6.contains(&a));
    }

    #[test]
    fn fnv_matches_its_specification() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }
}

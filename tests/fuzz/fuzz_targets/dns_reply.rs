//! A reply datagram from the DNS server the egress resolver asks (`egress::dns`): decoded,
//! matched to the query, and its addresses taken only from the name asked and its CNAME chain.
//!
//! Input: the reply; its own id is taken as the query's (so the fuzzer need not guess it), and
//! it is read both as the answer to an A and to an AAAA query for `svc.example.com`.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use hickory_proto::{op::Message, rr::RData};
use libfuzzer_sys::fuzz_target;
use sluice::egress::dns::read_udp_reply;

const HOST: &str = "svc.example.com";

fuzz_target!(|data: &[u8]| {
    let id = match data {
        [a, b, ..] => u16::from_be_bytes([*a, *b]),
        _ => 0,
    };
    let server = SocketAddr::from(([192, 0, 2, 53], 53));
    for v6 in [false, true] {
        let Some(Ok(answer)) = read_udp_reply(server, data, HOST, v6, id) else {
            continue;
        };
        // Only an accepted reply gives addresses, and each is of the family asked and is the
        // data of an answer record in it.
        let reply = Message::from_vec(data).expect("an accepted reply decodes");
        assert!(answer.addrs.len() <= reply.answers.len());
        for addr in &answer.addrs {
            assert_eq!(addr.is_ipv6(), v6, "{addr} for v6={v6}");
            let present = reply.answers.iter().any(|r| match &r.data {
                RData::A(a) => IpAddr::V4(a.0) == *addr,
                RData::AAAA(a) => IpAddr::V6(a.0) == *addr,
                _ => false,
            });
            assert!(present, "{addr} is in no answer record");
        }
        if answer.addrs.is_empty() {
            assert_eq!(answer.ttl, sluice::egress::dns::MIN_TTL);
        }
    }
});

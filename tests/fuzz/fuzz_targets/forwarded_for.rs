//! The gateway's view of a client through proxies: `X-Forwarded-For` with a number of trusted
//! hops (`gateway::forwarding`), and the hop-by-hop headers it strips before forwarding.
//!
//! Input: the first byte is the number of trusted proxies, each further line a header value of
//! `X-Forwarded-For` (or, starting with `C`, of `Connection`).
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use http::{HeaderMap, HeaderValue, header};
use libfuzzer_sys::fuzz_target;
use sluice::gateway::forwarding::{
    X_FORWARDED_FOR, client_address, set_forwarding_headers, strip_hop_by_hop,
};

fuzz_target!(|data: &[u8]| {
    let Some((trusted, rest)) = data.split_first() else {
        return;
    };
    let trusted = usize::from(*trusted);
    let peer = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    let mut headers = HeaderMap::new();
    for line in rest.split(|b| *b == b'\n') {
        let (name, line) = match line.strip_prefix(b"C") {
            Some(line) => (header::CONNECTION, line),
            None => (X_FORWARDED_FOR, line),
        };
        if let Ok(value) = HeaderValue::from_bytes(line) {
            headers.append(name, value);
        }
    }
    let client = client_address(&headers, peer, trusted);
    // The client is the peer or an address some X-Forwarded-For header names.
    if client != peer {
        let named = headers.get_all(&X_FORWARDED_FOR).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|p| p.trim().parse() == Ok(client)))
        });
        assert!(named, "{client} came from nowhere");
    }
    // No trusted proxy: the peer, whatever the headers say.
    if trusted == 0 {
        assert_eq!(client, peer);
    }

    let mut forwarded = headers.clone();
    strip_hop_by_hop(&mut forwarded);
    assert!(forwarded.get(header::CONNECTION).is_none());
    set_forwarding_headers(&mut forwarded, peer, "https", trusted);
    // The header the gateway sends on ends with the peer that it saw.
    let last = forwarded
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .map(str::trim);
    assert_eq!(last, Some(peer.to_string().as_str()));
});

//! What the gateway adds to a request on its way in: the client address through a chain of
//! proxies (X-Forwarded-For with Istio's `numTrustedProxies`), X-Forwarded-Proto, X-Request-Id
//! and the W3C trace context.
use std::net::IpAddr;

use http::{HeaderMap, HeaderValue, header::HeaderName};

use crate::proxy::hbone::TraceParent;

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Headers that describe one hop and are never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
}

/// The addresses in every X-Forwarded-For header, left to right; `None` if one is not an
/// address (then no hop of the header can be trusted).
fn forwarded_chain(headers: &HeaderMap) -> Option<Vec<IpAddr>> {
    let mut chain = Vec::new();
    for v in headers.get_all(&X_FORWARDED_FOR) {
        for part in v.to_str().ok()?.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            chain.push(part.parse().ok()?);
        }
    }
    Some(chain)
}

/// The client's address: with `trusted` proxies in front of the gateway (each appending to
/// X-Forwarded-For), the address `trusted` hops left of the immediate peer; the peer itself when
/// `trusted` is 0, and the leftmost address when the chain is shorter than that.
pub fn client_address(headers: &HeaderMap, peer: IpAddr, trusted: usize) -> IpAddr {
    if trusted == 0 {
        return peer;
    }
    let Some(mut chain) = forwarded_chain(headers) else {
        return peer;
    };
    chain.push(peer);
    let i = chain.len().saturating_sub(1 + trusted);
    chain[i]
}

/// Sets the forwarding headers on a request the gateway received from `peer` over `scheme`.
pub fn set_forwarding_headers(
    headers: &mut HeaderMap,
    peer: IpAddr,
    scheme: &'static str,
    trusted: usize,
) -> String {
    // X-Forwarded-For: the peer appended to what came (kept whole, as Envoy does).
    let appended = match headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
    {
        prior if prior.is_empty() => peer.to_string(),
        prior => format!("{}, {peer}", prior.join(", ")),
    };
    headers.remove(&X_FORWARDED_FOR);
    if let Ok(v) = HeaderValue::from_str(&appended) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    // X-Forwarded-Proto: a trusted proxy's word stands, otherwise what this hop saw.
    if trusted == 0 || !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
    }
    // X-Request-Id: kept when a client sent one, made otherwise.
    let id = match headers.get(&X_REQUEST_ID).and_then(|v| v.to_str().ok()) {
        Some(id) if !id.is_empty() => id.to_owned(),
        _ => {
            let id = request_id();
            if let Ok(v) = HeaderValue::from_str(&id) {
                headers.insert(X_REQUEST_ID, v);
            }
            id
        }
    };
    // traceparent: the same trace, with the gateway's span as the parent.
    let trace = headers
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<TraceParent>().ok())
        .map(|t| TraceParent {
            parent_id: fastrand::u64(1..),
            ..t
        })
        .unwrap_or_else(TraceParent::random);
    if let Ok(v) = HeaderValue::from_str(&trace.to_string()) {
        headers.insert(TRACEPARENT, v);
    }
    id
}

/// A random UUID (version 4) as text.
fn request_id() -> String {
    let n = fastrand::u128(..);
    let n = (n & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let h = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append(X_FORWARDED_FOR, v.parse().expect("value"));
        }
        h
    }

    #[test]
    fn the_client_is_found_behind_trusted_proxies() {
        let peer: IpAddr = "10.0.0.3".parse().expect("ip");
        // client 192.0.2.7 → proxy 10.0.0.1 → proxy 10.0.0.2 → (peer 10.0.0.3 is the second)
        let h = headers(&["203.0.113.9, 192.0.2.7", "10.0.0.2"]);
        assert_eq!(client_address(&h, peer, 0), peer);
        assert_eq!(client_address(&h, peer, 1).to_string(), "10.0.0.2");
        assert_eq!(client_address(&h, peer, 2).to_string(), "192.0.2.7");
        // A forged leftmost entry is never picked while enough hops are trusted.
        assert_eq!(client_address(&h, peer, 9).to_string(), "203.0.113.9");
        assert_eq!(client_address(&headers(&["not-an-ip"]), peer, 2), peer);
    }

    #[test]
    fn forwarding_headers_are_appended_and_set() {
        let mut h = headers(&["192.0.2.7"]);
        h.insert(
            TRACEPARENT,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .expect("tp"),
        );
        h.insert(X_FORWARDED_PROTO, "https".parse().expect("proto"));
        let id = set_forwarding_headers(&mut h, "10.0.0.2".parse().expect("ip"), "http", 0);
        assert_eq!(h[&X_FORWARDED_FOR], "192.0.2.7, 10.0.0.2");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_REQUEST_ID], id.as_str());
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        let tp = h[&TRACEPARENT].to_str().expect("ascii");
        assert!(
            tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
            "{tp}"
        );
        assert!(!tp.contains("b7ad6b7169203331"), "{tp}");
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-private".parse().expect("v"));
        h.insert("x-private", "1".parse().expect("v"));
        h.insert("keep-alive", "5".parse().expect("v"));
        h.insert("x-kept", "1".parse().expect("v"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}

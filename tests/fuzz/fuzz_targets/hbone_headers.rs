//! The headers of an HBONE `CONNECT` from a peer on 15008: `:authority`, `forwarded`,
//! `baggage` and `traceparent`, read as `proxy::hbone` reads them.
//!
//! Input: lines; the first is the request target, each further line `name: value` a header.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use libfuzzer_sys::fuzz_target;
use sluice::proxy::hbone::{Baggage, TraceParent, parse_authority, parse_forwarded_for};

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|b| *b == b'\n');
    let target = lines.next().unwrap_or_default();
    if let Ok(uri) = Uri::try_from(target) {
        if let Some(addr) = parse_authority(&uri) {
            // The address that was read is the one the authority names.
            let again: Uri = addr
                .to_string()
                .parse()
                .expect("an ip:port is a valid authority");
            assert_eq!(parse_authority(&again), Some(addr));
        }
    }
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }

    // baggage: what was read writes out as a header that reads back the same (what the agent
    // forwards of it), up to the values the writer leaves out.
    let baggage = Baggage::from_headers(&headers);
    let written = baggage.header_value();
    if let Ok(value) = HeaderValue::from_str(&written) {
        let mut again = HeaderMap::new();
        again.insert("baggage", value);
        let reread = Baggage::from_headers(&again);
        assert_eq!(reread.header_value(), written, "baggage did not round trip");
    } else {
        panic!("baggage wrote a header value that is not one: {written:?}");
    }

    for value in headers.get_all(http::header::FORWARDED) {
        if let Ok(value) = value.to_str() {
            let _ = parse_forwarded_for(value);
        }
    }

    for value in headers.get_all("traceparent") {
        let Ok(value) = value.to_str() else { continue };
        if let Ok(parsed) = value.parse::<TraceParent>() {
            // A valid traceparent prints in the canonical form (version 00) and reads back.
            assert_ne!(parsed.trace_id, 0);
            assert_ne!(parsed.parent_id, 0);
            let printed = parsed.to_string();
            assert_eq!(printed.parse::<TraceParent>(), Ok(parsed), "{printed}");
        }
    }
});

//! The first bytes of a client's connection: HTTP/1 `Host` or TLS ClientHello SNI
//! (`proxy::peek::classify`), which egress and the gateway act on before any TLS or policy.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::proxy::peek::{Classified, Sniffed, classify};

fuzz_target!(|data: &[u8]| {
    let verdict = classify(data);
    // A verdict on a prefix is final: more bytes never change a decided classification (the
    // peek loop stops at the first `Done`, so a later byte must not have mattered).
    if let Classified::Done(sniffed) = &verdict {
        let mut longer = data.to_vec();
        longer.extend_from_slice(b"\r\n\r\nHost: other\r\n\r\n");
        assert_eq!(
            classify(&longer),
            verdict,
            "a decided verdict changed with more bytes"
        );
        // A name that was found is non-empty.
        match sniffed {
            Sniffed::Http(host) | Sniffed::Tls(host) => assert!(!host.is_empty()),
            _ => {}
        }
    }
});

//! A request line on the agent's enrollment socket (what the CNI plugin sends), decoded as the
//! agent decodes it (`redirect::enroll::parse_request`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::redirect::enroll::parse_request;

fuzz_target!(|data: &[u8]| {
    // The agent reads one line of UTF-8 (a read of anything else fails before decoding).
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(request) = parse_request(line) {
        // A request the agent accepted means the same when written out again.
        let wire = serde_json::to_string(&request).expect("a request serialises");
        assert_eq!(parse_request(&wire).ok(), Some(request), "{wire}");
    }
});

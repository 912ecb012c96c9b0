//! The CNI plugin's input: the network configuration JSON on stdin (with the previous plugin's
//! `prevResult`) and `CNI_ARGS`, decoded as `sluice cni` decodes them (`redirect::cni::decode`,
//! which does no I/O: the fuzzer never reaches a socket or the API server).
//!
//! Input: the first byte picks `CNI_COMMAND`, the rest up to the first newline is `CNI_ARGS`,
//! and what follows is stdin.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use sluice::redirect::cni::{Invocation, decode};

const COMMANDS: &[&str] = &["ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS", "bogus"];

fuzz_target!(|data: &[u8]| {
    let Some((first, rest)) = data.split_first() else {
        return;
    };
    let command = COMMANDS[usize::from(*first) % COMMANDS.len()];
    let (args, stdin) = match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&b""[..], rest),
    };
    let (Ok(args), Ok(stdin)) = (std::str::from_utf8(args), std::str::from_utf8(stdin)) else {
        return;
    };
    let env: BTreeMap<String, String> = [
        ("CNI_COMMAND", command),
        ("CNI_ARGS", args),
        ("CNI_NETNS", "/var/run/netns/fuzz"),
        ("CNI_CONTAINERID", "container"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    match decode(&env, stdin) {
        Ok(Invocation::Add { sandbox, prev, .. }) => {
            // Every entry of prevResult.ips became one address, in order.
            let listed = prev
                .get("ips")
                .and_then(|v| v.as_array())
                .map_or(0, Vec::len);
            assert_eq!(sandbox.ips.len(), listed);
            assert_eq!(sandbox.netns.to_str(), Some("/var/run/netns/fuzz"));
            // What the plugin sends the agent is a request the agent reads back as sent.
            let request = sluice::redirect::enroll::Request::Add { pod: sandbox };
            let wire = serde_json::to_string(&request).expect("a request serialises");
            assert_eq!(
                sluice::redirect::enroll::parse_request(&wire).ok(),
                Some(request)
            );
        }
        Ok(Invocation::Version) => assert_eq!(command, "VERSION"),
        Ok(_) | Err(_) => {}
    }
});

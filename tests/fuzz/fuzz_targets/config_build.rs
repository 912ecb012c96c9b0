//! The local config file (a YAML document stream: the agent's settings and Kubernetes
//! resources), parsed by the file source and built into MeshState (`state::build`): the path
//! every resource the API server or an operator hands the agent takes.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sluice::sources::file::{DocumentCache, parse, parse_cached};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.yaml");
    let whole = parse(text, path);
    // The watcher's document cache reads what a whole parse reads, from cold and from warm.
    let mut cache = DocumentCache::default();
    for _ in 0..2 {
        let cached = parse_cached(text, path, &mut cache);
        match (&whole, &cached) {
            (Ok(w), Ok(c)) => assert_eq!(
                format!("{:?}", w.resources),
                format!("{:?}", c.resources),
                "the cache read something else"
            ),
            (Err(_), Err(_)) => {}
            (w, c) => panic!("whole parse {:?}, cached {:?}", w.is_ok(), c.is_ok()),
        }
    }
    let Ok(file) = whole else {
        return;
    };
    let settings = file.agent.mesh_settings();
    let built = sluice::state::build(&file.resources, &settings);
    // Building is a function of its input.
    let again = sluice::state::build(&file.resources, &settings);
    assert_eq!(built.rejections.len(), again.rejections.len());
});

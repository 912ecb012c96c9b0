//! Reading kernel state the way an operator would: `bpftool` on the pinned objects.
use std::{path::Path, process::Command};

/// Entries of a pinned map as raw `(key, value)` bytes (`bpftool -j map dump pinned`).
pub fn map_entries(pin: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pin)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool map dump {}: {}",
        pin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    let bytes = |x: &serde_json::Value| -> Vec<u8> {
        x.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|b| b.as_str())
                    .filter_map(|s| u8::from_str_radix(s.trim_start_matches("0x"), 16).ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    v.as_array()
        .into_iter()
        .flatten()
        .map(|e| (bytes(&e["key"]), bytes(&e["value"])))
        .collect()
}

/// Little-endian u64 at the start of `b`.
pub fn u64_at(b: &[u8], offset: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[offset..offset + 8]);
    u64::from_le_bytes(a)
}

/// Programs attached to a cgroup (`bpftool cgroup show`), as `(attach type, program name)`.
pub fn cgroup_programs(cgroup: &Path) -> Vec<(String, String)> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool cgroup show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    v.as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["attach_type"].as_str().unwrap_or_default().to_owned(),
                p["name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Number of sk_lookup links attached to the network namespace at `netns` (by inode).
pub fn sk_lookup_links(netns: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(netns).expect("netns").ino();
    let out = Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()
        .expect("bpftool");
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["attach_type"] == "sk_lookup" && l["netns_ino"].as_u64() == Some(ino))
        .count()
}

//! Embeds the eBPF object that `cargo xtask build-ebpf` produces.
//!
//! Without it (a fresh clone under plain `cargo build`, `cargo clippy` or rust-analyzer) an empty
//! stub is embedded instead and cargo prints a warning: the crate then compiles and lints, and the
//! agent refuses at run time, when it would load its programs, naming the command that builds the
//! real object (`src/redirect/ebpf/object.rs`). `cargo xtask build` never ships the stub: it
//! checks that the object exists before it builds the agent.
use std::{
    env, fs,
    path::{Path, PathBuf},
};

/// Where `cargo xtask build-ebpf` leaves the object, from the workspace root (xtask/src/main.rs
/// names the same path).
const OBJECT: &str = "ebpf/programs/target/bpfel-unknown-none/release/sluice-ebpf";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("set by cargo")).join("sluice-ebpf.o");
    println!("cargo::rerun-if-env-changed=SLUICE_EBPF_OBJECT");
    let object = match env::var_os("SLUICE_EBPF_OBJECT") {
        Some(path) => {
            // Asked for by name: a missing file is a mistake, not a fresh clone.
            let path = PathBuf::from(path);
            println!("cargo::rerun-if-changed={}", path.display());
            assert!(
                path.is_file(),
                "SLUICE_EBPF_OBJECT={} is not a file",
                path.display()
            );
            path
        }
        None => {
            let path = manifest
                .parent()
                .expect("agent/ is in the workspace")
                .join(OBJECT);
            // Cargo reruns a build script on every build while a watched path is missing, so
            // watch the object when it exists and otherwise its nearest existing ancestor
            // directory: creating the object (or the directories on the way to it) changes that
            // directory's newest mtime, and the next build embeds the real object.
            println!("cargo::rerun-if-changed={}", watched(&path).display());
            if !path.is_file() {
                println!(
                    "cargo::warning=no eBPF object at {}: building a sluice without kernel \
                     programs, which refuses to run; `cargo xtask build` builds the real one",
                    path.display()
                );
                fs::write(&out, b"").unwrap_or_else(|e| panic!("write {}: {e}", out.display()));
                return;
            }
            path
        }
    };
    fs::copy(&object, &out).unwrap_or_else(|e| panic!("copy {}: {e}", object.display()));
}

/// `path` if it exists, else its nearest existing ancestor.
fn watched(path: &Path) -> &Path {
    path.ancestors()
        .find(|p| p.exists())
        .expect("the manifest directory exists")
}

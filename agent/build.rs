//! Embeds the eBPF object that `cargo xtask build-ebpf` produces. Without it the agent cannot
//! capture anything, so a plain `cargo build` stops here and says how to get it.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let object = match env::var_os("SLUICE_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => manifest.join("../ebpf/programs/target/bpfel-unknown-none/release/sluice-ebpf"),
    };
    println!("cargo:rerun-if-env-changed=SLUICE_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        panic!(
            "\n\nThe eBPF object {} is missing.\n\
             Build Sluice with `cargo xtask build` (it compiles ebpf/programs with nightly first),\n\
             or run `cargo xtask build-ebpf` once before a plain `cargo build`.\n",
            object.display()
        );
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("set by cargo")).join("sluice-ebpf.o");
    fs::copy(&object, &out).unwrap_or_else(|e| panic!("copy {}: {e}", object.display()));
}

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
    embed_deploy(&manifest);
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

/// Embeds `deploy/NN-*.yaml` (in name order) and `deploy/gateway-api/*.yaml` for `sluice manifest
/// generate` and `sluice install`: a new numbered file joins the install without a code change.
fn embed_deploy(manifest: &Path) {
    let deploy = manifest.parent().expect("workspace").join("deploy");
    println!("cargo::rerun-if-changed={}", deploy.display());
    let list = |dir: &Path, numbered: bool| -> Vec<PathBuf> {
        println!("cargo::rerun-if-changed={}", dir.display());
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.retain(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let b = name.as_bytes();
            name.ends_with(".yaml")
                && (!numbered
                    || (b.len() > 3
                        && b[0].is_ascii_digit()
                        && b[1].is_ascii_digit()
                        && b[2] == b'-'))
        });
        files.sort();
        files
    };
    let mut code = String::new();
    for (name, files) in [
        ("DEPLOY_FILES", list(&deploy, true)),
        (
            "GATEWAY_API_FILES",
            list(&deploy.join("gateway-api"), false),
        ),
        ("CRD_FILES", list(&deploy.join("crds"), false)),
    ] {
        code.push_str(&format!("pub const {name}: &[(&str, &str)] = &[\n"));
        for f in files {
            println!("cargo::rerun-if-changed={}", f.display());
            let file = f.file_name().and_then(|n| n.to_str()).expect("utf-8 name");
            code.push_str(&format!(
                "    ({file:?}, include_str!({:?})),\n",
                f.display().to_string()
            ));
        }
        code.push_str("];\n");
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("set by cargo")).join("deploy_files.rs");
    fs::write(&out, code).unwrap_or_else(|e| panic!("write {}: {e}", out.display()));
}

//! The eBPF object embedded at build time by `agent/build.rs`.
//!
//! A build that did not go through `cargo xtask build` (plain `cargo build`, `cargo clippy` or
//! rust-analyzer on a fresh clone) embeds an empty stub so that it still compiles; [`embedded`]
//! turns the stub into a clear error at the moment the agent would load its programs.

/// The bytes `build.rs` wrote: the compiled programs, or nothing in a build without them.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-ebpf.o"));

/// This binary was built without its kernel programs.
#[derive(Debug, thiserror::Error)]
#[error(
    "this sluice was built without its eBPF kernel programs (the eBPF object was missing at build \
     time, so an empty stub was embedded); build the real one with `cargo xtask build`, or run \
     `cargo xtask build-ebpf` once before `cargo build`"
)]
pub struct NoKernelPrograms;

/// The embedded object, or [`NoKernelPrograms`] in a build that embedded the stub.
pub fn embedded() -> Result<&'static [u8], NoKernelPrograms> {
    check(OBJECT)
}

/// The stub is the empty object: a real one is an ELF file, never empty.
fn check(object: &[u8]) -> Result<&[u8], NoKernelPrograms> {
    if object.is_empty() {
        Err(NoKernelPrograms)
    } else {
        Ok(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stub_is_refused_and_names_the_real_build() {
        let err = check(b"").unwrap_err().to_string();
        assert!(err.contains("without its eBPF kernel programs"), "{err}");
        assert!(err.contains("cargo xtask build"), "{err}");
    }

    #[test]
    fn a_real_object_passes_through() {
        let elf = b"\x7fELF rest of the object";
        assert_eq!(check(elf).unwrap(), elf);
    }
}

//! The allocator's part in memory at scale (glibc malloc).
//!
//! A state rebuild allocates a whole new MeshState on one thread while the runtime's other
//! threads allocate too; glibc gives each thread its own arena and keeps freed pages in them, so
//! every rebuild of a large state left its size behind (measured: +230 MB per reload at 10,000
//! pods). Two arenas, and handing freed pages back after each rebuild, keep the agent at the
//! size of the state it holds.

/// Limits malloc to two arenas. Call before any thread starts.
pub fn limit_arenas() {
    // SAFETY: mallopt only changes a malloc tunable; no pointers are involved.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Returns freed memory at the top of the heap and in free chunks to the kernel: after a
/// rebuild, when the previous state has been dropped.
pub fn release_freed() {
    // SAFETY: malloc_trim only walks malloc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

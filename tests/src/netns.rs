//! Entering a named network namespace (`/run/netns/<name>`): for a child process, or for a
//! short-lived thread of the test.
use std::{
    ffi::OsStr, fs::File, os::fd::AsRawFd, os::unix::process::CommandExt, path::Path,
    process::Command,
};

fn open(netns: &str) -> File {
    File::open(Path::new("/run/netns").join(netns)).unwrap_or_else(|e| panic!("netns {netns}: {e}"))
}

/// `program` to run inside `netns` (through setns, not `ip netns exec`, so the process keeps the
/// host's mount namespace, as a CNI plugin under a runtime does, and the caller's cgroup).
pub fn command(netns: &str, program: impl AsRef<OsStr>) -> Command {
    let ns = open(netns);
    let mut cmd = Command::new(program);
    // SAFETY: only setns, async-signal-safe, on a descriptor opened before fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Runs `f` on a short-lived thread inside `netns` (its sockets are made there).
pub fn on_thread<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    on_thread_at(&Path::new("/run/netns").join(netns), f)
}

/// As [`on_thread`], for the namespace file at `path` (a pod's `netns_path()`).
pub fn on_thread_at<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = File::open(path).unwrap_or_else(|e| panic!("netns {}: {e}", path.display()));
    std::thread::spawn(move || {
        // SAFETY: setns on this short-lived thread only.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns: {}",
            std::io::Error::last_os_error()
        );
        f()
    })
    .join()
    .expect("netns thread")
}

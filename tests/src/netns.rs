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

/// Starts a thread inside the namespace file at `path` that runs `f`'s future on a
/// current-thread tokio runtime (its sockets are made there). Returns once the thread is in the
/// namespace with its runtime, or the error that kept it from getting there; the thread's
/// result is `None` only in that case.
pub fn runtime_thread_at<F, Fut>(
    path: &Path,
    f: F,
) -> Result<std::thread::JoinHandle<Option<Fut::Output>>, String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future,
    Fut::Output: Send + 'static,
{
    let ns = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let thread = std::thread::spawn(move || {
        // SAFETY: setns on this thread only; every socket it makes is made after it.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let _ = ready_tx.send(Err(format!("setns: {}", std::io::Error::last_os_error())));
            return None;
        }
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(format!("tokio runtime: {e}")));
                return None;
            }
        };
        let _ = ready_tx.send(Ok(()));
        Some(rt.block_on(f()))
    });
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => Err("the namespace thread ended before it started".to_owned()),
    }
}

/// As [`runtime_thread_at`], waiting for the future's output.
pub fn block_on_at<F, Fut>(path: &Path, f: F) -> Result<Fut::Output, String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future,
    Fut::Output: Send + 'static,
{
    runtime_thread_at(path, f)?
        .join()
        .map_err(|_| "the namespace thread panicked".to_owned())?
        .ok_or_else(|| "the namespace thread ended before its runtime ran".to_owned())
}

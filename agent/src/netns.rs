//! Network namespaces: entering one on the current thread, and making sockets inside it.
//!
//! A socket belongs to the namespace it was created in for its whole life, so the proxy enters
//! a pod's namespace only for the `socket()` call and returns at once. That is a pair of
//! `setns` calls on the calling thread with nothing awaited in between, so it is safe on a
//! tokio worker.
use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};

/// `SO_NETNS_COOKIE` (Linux 5.14+), not yet in every libc.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Errors entering or inspecting a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is not a network namespace")]
    NotNetns { path: PathBuf },
    #[error("entering network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("returning to the agent's network namespace: {0}")]
    Return(nix::Error),
    #[error("reading the cookie of network namespace {path}: {source}")]
    Cookie { path: PathBuf, source: io::Error },
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    cookie: u64,
}

/// The agent's own namespace, to return to after a call inside a pod.
#[derive(Debug, Clone)]
pub struct HomeNetns(Arc<Netns>);

impl HomeNetns {
    /// Captures the calling thread's namespace; call once, at startup.
    pub fn capture() -> Result<Self, NetnsError> {
        Ok(Self(Arc::new(Netns::open(Path::new(
            "/proc/thread-self/ns/net",
        ))?)))
    }

    /// The agent's namespace.
    pub fn netns(&self) -> &Netns {
        &self.0
    }
}

impl Netns {
    /// Opens the namespace at `path` (e.g. `/run/netns/x` or `/proc/<pid>/ns/net`).
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.into(),
            source,
        })?;
        let stat = nix::sys::statfs::fstatfs(&file).map_err(|e| NetnsError::Open {
            path: path.into(),
            source: e.into(),
        })?;
        if stat.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
            return Err(NetnsError::NotNetns { path: path.into() });
        }
        let mut ns = Self {
            file,
            path: path.into(),
            cookie: 0,
        };
        ns.cookie = ns.read_cookie()?;
        Ok(ns)
    }

    /// Where this namespace was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kernel's cookie for this namespace (what `bpf_get_netns_cookie` returns inside it).
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    fn read_cookie(&self) -> Result<u64, NetnsError> {
        let here = File::open("/proc/thread-self/ns/net").map_err(|source| NetnsError::Open {
            path: "/proc/thread-self/ns/net".into(),
            source,
        })?;
        let sock = self
            .enter_and(&here, || Socket::new(Domain::UNIX, Type::DGRAM, None))?
            .map_err(|source| NetnsError::Cookie {
                path: self.path.clone(),
                source,
            })?;
        netns_cookie_of(sock.as_fd()).map_err(|source| NetnsError::Cookie {
            path: self.path.clone(),
            source,
        })
    }

    /// Runs `f` with the calling thread inside this namespace, then returns to `home`.
    pub fn run<T>(
        &self,
        home: &HomeNetns,
        f: impl FnOnce() -> io::Result<T>,
    ) -> Result<io::Result<T>, NetnsError> {
        self.enter_and(&home.netns().file, f)
    }

    fn enter_and<T>(
        &self,
        back: &File,
        f: impl FnOnce() -> io::Result<T>,
    ) -> Result<io::Result<T>, NetnsError> {
        setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        let out = f();
        // If this failed the thread would be stranded in the pod: there is no safe way on.
        setns(back, CloneFlags::CLONE_NEWNET).map_err(NetnsError::Return)?;
        Ok(out)
    }

    /// A non-blocking TCP socket created inside this namespace, carrying `mark`.
    pub fn tcp_socket(&self, home: &HomeNetns, domain: Domain, mark: u32) -> io::Result<Socket> {
        self.run(home, || {
            let s = Socket::new(
                domain,
                Type::STREAM.nonblocking().cloexec(),
                Some(Protocol::TCP),
            )?;
            s.set_mark(mark)?;
            Ok(s)
        })
        .map_err(io::Error::other)?
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// `SO_NETNS_COOKIE` of any socket: the namespace it lives in.
pub fn netns_cookie_of(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a buffer of the size we pass.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

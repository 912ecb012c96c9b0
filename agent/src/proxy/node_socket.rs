//! Whether a TCP connection was made by a socket of the node's own network namespace, asked of
//! the kernel with `sock_diag` (`NETLINK_SOCK_DIAG`, an exact `SOCK_DIAG_BY_FAMILY` lookup).
//!
//! The node's own connection to a pod (a kubelet probe, a hostNetwork process) has a socket in
//! the node's namespace whose local end is the connection's source and whose remote end is the
//! pod. A connection the node only forwarded (DNAT and MASQUERADE: a NodePort, hairpin) arrives
//! from the same node address, but no socket of the node holds it; conntrack does.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::Mutex,
    time::Duration,
};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_HEADER: usize = 16;
/// `inet_diag_req_v2`: family, protocol, ext, pad, states, then `inet_diag_sockid`.
const REQUEST: usize = 8 + SOCKID;
/// `inet_diag_sockid`: sport, dport, src[4], dst[4], if, cookie[2].
const SOCKID: usize = 4 + 16 + 16 + 4 + 8;
const TCP_LISTEN: u8 = 10;
/// How long one lookup may wait for the kernel's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// A `sock_diag` socket of the namespace it was opened in.
#[derive(Debug)]
pub struct NodeSockets {
    fd: Mutex<OwnedFd>,
}

impl NodeSockets {
    /// Opens the netlink socket in the calling thread's network namespace (the node's).
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let tv = libc::timeval {
            tv_sec: ANSWER_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: valid descriptor and a timeval-sized option value.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd: Mutex::new(fd) })
    }

    /// True if a TCP socket of this namespace, not a listener, has local end `local` and remote
    /// end `remote`.
    pub fn holds(&self, local: SocketAddr, remote: SocketAddr) -> io::Result<bool> {
        let (family, src, dst) = match (local.ip(), remote.ip()) {
            (IpAddr::V4(l), IpAddr::V4(r)) => {
                let mut src = [0u8; 16];
                let mut dst = [0u8; 16];
                src[..4].copy_from_slice(&l.octets());
                dst[..4].copy_from_slice(&r.octets());
                (libc::AF_INET as u8, src, dst)
            }
            (IpAddr::V6(l), IpAddr::V6(r)) => (libc::AF_INET6 as u8, l.octets(), r.octets()),
            _ => return Ok(false),
        };
        let mut msg = [0u8; NLMSG_HEADER + REQUEST];
        msg[0..4].copy_from_slice(&((NLMSG_HEADER + REQUEST) as u32).to_ne_bytes());
        msg[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        msg[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        let seq: u32 = fastrand::u32(..);
        msg[8..12].copy_from_slice(&seq.to_ne_bytes());
        let req = &mut msg[NLMSG_HEADER..];
        req[0] = family;
        req[1] = libc::IPPROTO_TCP as u8;
        req[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
        let id = &mut req[8..];
        id[0..2].copy_from_slice(&local.port().to_be_bytes());
        id[2..4].copy_from_slice(&remote.port().to_be_bytes());
        id[4..20].copy_from_slice(&src);
        id[20..36].copy_from_slice(&dst);
        // Interface 0 (any); cookie INET_DIAG_NOCOOKIE.
        id[40..48].copy_from_slice(&[0xff; 8]);

        let fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: valid descriptor, buffer and address of the sizes given.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: valid descriptor and buffer.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            if n < NLMSG_HEADER + 4 {
                return Err(io::Error::other("short sock_diag answer"));
            }
            let kind = u16::from_ne_bytes([buf[4], buf[5]]);
            let got_seq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
            if got_seq != seq {
                // An answer to an earlier lookup that timed out.
                continue;
            }
            return match kind {
                NLMSG_ERROR => {
                    let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
                    match -code {
                        0 | libc::ENOENT => Ok(false),
                        errno => Err(io::Error::from_raw_os_error(errno)),
                    }
                }
                // inet_diag_msg: family, state, ...
                SOCK_DIAG_BY_FAMILY => Ok(buf[NLMSG_HEADER + 1] != TCP_LISTEN),
                other => Err(io::Error::other(format!(
                    "unexpected sock_diag answer type {other}"
                ))),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_its_own_connection_and_not_a_made_up_one() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let server = listener.local_addr().expect("addr");
        let client = std::net::TcpStream::connect(server).expect("connect");
        let local = client.local_addr().expect("local");
        let diag = NodeSockets::open().expect("sock_diag");
        assert!(diag.holds(local, server).expect("lookup"));
        // Reversed, it is the accepted end (also a socket of this namespace).
        let (_accepted, _) = listener.accept().expect("accept");
        assert!(diag.holds(server, local).expect("lookup"));
        // A connection nobody here made.
        let nobody: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        assert!(!diag.holds(nobody, server).expect("lookup"));
        // The listener alone does not count.
        assert!(!diag.holds(server, nobody).expect("lookup"));
    }
}

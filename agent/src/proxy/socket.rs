//! Small socket helpers the proxy and its HBONE transport share.
use std::{io, net::SocketAddr, os::fd::AsFd, time::Duration};

use socket2::{Domain, Socket, Type};

/// Accept queue of every TCP listener Sluice opens (the kernel caps it at
/// `net.core.somaxconn`). tokio's `TcpListener::bind` queues only 128: a burst of connects
/// beyond that overflows the queue, and the kernel falls back to SYN cookies and resets what
/// it cannot queue.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Makes the eventual close of `socket` an RST (SO_LINGER 0), so the peer sees a refusal or
/// an abort, never a clean end of an empty answer.
pub fn reset_on_close(socket: &impl AsFd) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

/// A TCP listener on `addr` (SO_REUSEADDR, IPv6 only for IPv6 addresses) with
/// [`LISTEN_BACKLOG`]. Must be called inside a tokio runtime.
pub fn listen_tcp(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    listen_on(
        Socket::new(Domain::for_address(addr), Type::STREAM, None)?,
        addr,
    )
}

/// Makes `socket` (made for `addr`'s family, in whatever network namespace) a listener on
/// `addr`, as [`listen_tcp`] does. Must be called inside a tokio runtime.
pub fn listen_on(socket: Socket, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// The accept queue limit of a listening socket, as the kernel applies it (TCP_INFO's
/// `tcpi_sacked` holds it for a socket in LISTEN).
pub fn accept_queue_limit(listener: &impl AsFd) -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    let fd = listener.as_fd();
    // SAFETY: tcp_info is plain data; zeroed is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a properly sized, writable tcp_info and `len` holds its size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_sacked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn somaxconn() -> u32 {
        std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .expect("read net.core.somaxconn")
            .trim()
            .parse()
            .expect("somaxconn is a number")
    }

    #[tokio::test]
    async fn listeners_queue_bursts_beyond_tokios_default() {
        let expected = (LISTEN_BACKLOG as u32).min(somaxconn());
        assert!(expected > 128, "net.core.somaxconn is {}", somaxconn());
        let l = listen_tcp("127.0.0.1:0".parse().expect("addr")).expect("listen");
        assert_eq!(accept_queue_limit(&l).expect("TCP_INFO"), expected);
        // The measurement itself: tokio's own bind is the 128 this replaces.
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        assert_eq!(accept_queue_limit(&plain).expect("TCP_INFO"), 128);
    }
}

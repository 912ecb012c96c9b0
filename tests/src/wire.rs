//! Watching the wire: an `AF_PACKET` capture on one interface of a test namespace, and just
//! enough Ethernet/IP/TCP parsing to say which flows crossed it and what their payload was.
use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// One TCP segment seen on the wire.
#[derive(Clone, Debug)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

/// A running capture; [`Capture::stop`] returns what it saw.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Segment>>>,
}

const ETH_P_ALL: u16 = 0x0003;
const MAX_FRAMES: usize = 200_000;

impl Capture {
    /// Starts capturing every frame on `ifname` inside the network namespace `netns`
    /// (a name under `/run/netns`). Panics with the reason if the socket cannot be opened.
    pub fn start(netns: &str, ifname: &str) -> Capture {
        let ns = File::open(Path::new("/run/netns").join(netns)).expect("open netns");
        let ifname = std::ffi::CString::new(ifname).expect("interface name");
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // SAFETY: setns on this capture thread only.
                assert_eq!(
                    unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                    0,
                    "setns for capture"
                );
                let sock = open_packet_socket(&ifname);
                let _ = ready_tx.send(());
                let mut frames = Vec::new();
                // Room for a whole GSO frame (64 KiB of IP plus the link header).
                let mut buf = vec![0u8; 128 * 1024];
                let mut read = |flags: libc::c_int, frames: &mut Vec<Segment>| {
                    // SAFETY: valid fd and buffer.
                    let n = unsafe {
                        libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags)
                    };
                    if n > 0
                        && let Some(seg) = parse_ethernet(&buf[..n as usize])
                    {
                        frames.push(seg);
                    }
                    n
                };
                while !stop.load(Ordering::Relaxed) && frames.len() < MAX_FRAMES {
                    read(0, &mut frames);
                }
                // What was captured before the stop but not read yet belongs to the capture.
                while frames.len() < MAX_FRAMES && read(libc::MSG_DONTWAIT, &mut frames) >= 0 {}
                let drops = packet_drops(&sock);
                assert_eq!(drops, 0, "the capture socket dropped {drops} frames");
                frames
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("capture socket did not open");
        Capture {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the capture and returns the TCP segments seen, in order.
    pub fn stop(mut self) -> Vec<Segment> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("capture thread"))
            .unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn open_packet_socket(ifname: &std::ffi::CStr) -> OwnedFd {
    // SAFETY: plain socket call.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ETH_P_ALL.to_be()),
        )
    };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd was just returned by socket().
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: valid C string.
    let index = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
    assert!(
        index != 0,
        "no interface {ifname:?} in the capture namespace"
    );
    // SAFETY: sockaddr_ll is plain data.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ALL.to_be();
    addr.sll_ifindex = index as i32;
    // SAFETY: addr is a valid sockaddr_ll of the given size.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "bind capture: {}", std::io::Error::last_os_error());
    // Bursts of 64 KiB GSO frames overflow the default receive buffer.
    let rcvbuf: libc::c_int = 64 << 20;
    // SAFETY: valid fd and option value.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&rcvbuf as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "SO_RCVBUFFORCE on the capture: {}",
        std::io::Error::last_os_error()
    );
    // Wake up regularly to notice `stop`.
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: valid fd and option value.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    sock
}

/// Frames the kernel dropped on this packet socket (`PACKET_STATISTICS`, which also resets
/// the counters).
fn packet_drops(sock: &OwnedFd) -> u32 {
    // SAFETY: tpacket_stats is plain data.
    let mut stats: libc::tpacket_stats = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: valid fd, and a buffer of the size we pass.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut stats as *mut libc::tpacket_stats).cast(),
            &mut len,
        )
    };
    assert_eq!(
        rc,
        0,
        "PACKET_STATISTICS: {}",
        std::io::Error::last_os_error()
    );
    stats.tp_drops
}

/// Parses an Ethernet frame carrying IPv4 or IPv6 TCP.
pub fn parse_ethernet(frame: &[u8]) -> Option<Segment> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (src, dst, proto, l4) = match ethertype {
        0x0800 => {
            let h = ip.get(..20)?;
            let ihl = usize::from(h[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
            let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
            let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
            (
                IpAddr::V4(src),
                IpAddr::V4(dst),
                h[9],
                ip.get(ihl..total.min(ip.len()))?,
            )
        }
        0x86dd => {
            let len = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            let octets = |r: std::ops::Range<usize>| -> Option<Ipv6Addr> {
                let b: [u8; 16] = ip.get(r)?.try_into().ok()?;
                Some(Ipv6Addr::from(b))
            };
            (
                IpAddr::V6(octets(8..24)?),
                IpAddr::V6(octets(24..40)?),
                *ip.get(6)?,
                ip.get(40..(40 + len).min(ip.len()))?,
            )
        }
        _ => return None,
    };
    if proto != 6 {
        return None;
    }
    let sport = u16::from_be_bytes([*l4.first()?, *l4.get(1)?]);
    let dport = u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]);
    let off = usize::from(l4.get(12)? >> 4) * 4;
    Some(Segment {
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(dst, dport),
        payload: l4.get(off..)?.to_vec(),
    })
}

/// The longest run of bytes counting up modulo 251 (`x, x+1, x+2, …`), which is what
/// `sluice-testpod connect` sends: plaintext test data has runs as long as the segment,
/// ciphertext has none worth the name.
pub fn longest_counting_run(payload: &[u8]) -> usize {
    let mut longest = usize::from(!payload.is_empty());
    let mut run = longest;
    for w in payload.windows(2) {
        run = if u16::from(w[1]) == (u16::from(w[0]) + 1) % 251 {
            run + 1
        } else {
            1
        };
        longest = longest.max(run);
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_ipv4_tcp_frame() {
        let mut f = vec![0u8; 14];
        f[12] = 0x08;
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 1, 2, 10, 0, 2, 2,
        ];
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&15008u16.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp.extend_from_slice(b"\x16\x03\x01hello");
        let total = (ip.len() + tcp.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        f.extend(ip);
        f.extend(tcp);
        f.extend([0u8; 6]); // Ethernet padding is not payload
        let s = parse_ethernet(&f).expect("segment");
        assert_eq!(s.src, "10.0.1.2:40000".parse().unwrap());
        assert_eq!(s.dst, "10.0.2.2:15008".parse().unwrap());
        assert_eq!(s.payload, b"\x16\x03\x01hello");
        assert_eq!(longest_counting_run(&[7, 249, 250, 0, 1, 9]), 4);
        assert_eq!(longest_counting_run(&[]), 0);
    }
}

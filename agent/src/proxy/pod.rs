//! One enrolled pod's listeners, opened inside its network namespace, each served by its
//! own room (outbound, inbound, HBONE inbound).
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, RawFd},
    sync::Arc,
};

use sluice_common::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT, PROXY_MARK};
use socket2::{Domain, Socket};
use tokio::{net::TcpListener, task::JoinHandle};

pub use super::context::PodContext;
use super::{ProxyInputs, hbone_inbound, inbound, outbound};
use crate::netns::{HomeNetns, Netns};

/// The running listeners of one pod; dropping it closes them (connections in flight go on).
#[derive(Debug)]
pub struct PodProxy {
    tasks: Vec<JoinHandle<()>>,
    /// Inbound listener per family, registered in `sluice_in_socks` by the caller.
    inbound_v4: Option<RawFd>,
    inbound_v6: Option<RawFd>,
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Errors opening a pod's listeners.
#[derive(Debug, thiserror::Error)]
#[error("pod {pod}: listening on {addr} inside its network namespace: {source}")]
pub struct ListenError {
    pub pod: String,
    pub addr: SocketAddr,
    pub source: io::Error,
}

/// Accept queue of a pod's listeners.
const LISTEN_BACKLOG: i32 = 4096;

fn listen_in(netns: &Netns, home: &HomeNetns, addr: SocketAddr) -> io::Result<TcpListener> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket: Socket = netns.tcp_socket(home, domain, PROXY_MARK)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    // Bursts of connects from one pod queue here while the proxy accepts; the kernel caps
    // this at net.core.somaxconn.
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

impl PodProxy {
    /// Opens the outbound (`127.0.0.1`/`::1` port 15001) and inbound (15006) listeners inside
    /// the pod and starts serving them. IPv6 listeners are skipped when the pod has no IPv6.
    pub fn start(pod: Arc<PodContext>, inputs: ProxyInputs) -> Result<Self, ListenError> {
        let mut me = Self {
            tasks: Vec::new(),
            inbound_v4: None,
            inbound_v6: None,
        };
        let families: [(IpAddr, bool); 2] = [
            (Ipv4Addr::LOCALHOST.into(), true),
            (Ipv6Addr::LOCALHOST.into(), false),
        ];
        for (loopback, v4) in families {
            let out_addr = SocketAddr::new(loopback, OUTBOUND_PORT);
            let in_addr = SocketAddr::new(loopback, INBOUND_PORT);
            let err = |addr, source| ListenError {
                pod: pod.uid.clone(),
                addr,
                source,
            };
            let outbound = match listen_in(&pod.netns, &inputs.home, out_addr) {
                Ok(l) => l,
                // A pod without IPv6 (or with it disabled) has no ::1.
                Err(e) if !v4 && e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => continue,
                Err(e) if !v4 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => continue,
                Err(e) => return Err(err(out_addr, e)),
            };
            let inbound =
                listen_in(&pod.netns, &inputs.home, in_addr).map_err(|e| err(in_addr, e))?;
            if v4 {
                me.inbound_v4 = Some(inbound.as_raw_fd());
            } else {
                me.inbound_v6 = Some(inbound.as_raw_fd());
            }
            me.tasks.push(tokio::spawn(outbound::serve(
                outbound,
                pod.clone(),
                inputs.clone(),
            )));
            me.tasks.push(tokio::spawn(inbound::serve(
                inbound,
                pod.clone(),
                inputs.clone(),
            )));
        }
        // HBONE on each pod address, so the address dialled is known for every request.
        for ip in &pod.ips {
            let addr = SocketAddr::new(*ip, HBONE_PORT);
            let listener =
                listen_in(&pod.netns, &inputs.home, addr).map_err(|source| ListenError {
                    pod: pod.uid.clone(),
                    addr,
                    source,
                })?;
            me.tasks.push(tokio::spawn(hbone_inbound::serve(
                listener,
                pod.clone(),
                inputs.clone(),
            )));
        }
        Ok(me)
    }

    /// The inbound listener that connections to `ip` are steered to.
    pub fn inbound_listener_for(&self, ip: IpAddr) -> Option<RawFd> {
        if ip.is_ipv4() {
            self.inbound_v4
        } else {
            self.inbound_v6
        }
    }
}

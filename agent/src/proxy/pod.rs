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
use crate::{
    handover::{Listeners, Taken, pod_key},
    netns::{HomeNetns, Netns, netns_cookie_of},
    proxy::socket::{LISTEN_BACKLOG, listen_on},
};

/// The running listeners of one pod; dropping it closes them (connections in flight go on).
#[derive(Debug)]
pub struct PodProxy {
    tasks: Vec<JoinHandle<()>>,
    /// Inbound listener per family, registered in `sluice_in_socks` by the caller.
    inbound_v4: Option<RawFd>,
    inbound_v6: Option<RawFd>,
    /// Where its listeners are registered for a successor, under `pod/<uid>/`.
    handover: Listeners,
    uid: String,
    /// How many listeners came from the previous agent.
    adopted: usize,
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        self.handover.remove_prefix(&pod_key_prefix(&self.uid));
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Where a pod's listeners come from and go to across upgrades.
#[derive(Clone, Copy, Debug)]
pub struct ListenerHandover<'a> {
    /// Listeners received from the previous agent, taken before binding new ones.
    pub taken: Option<&'a Taken>,
    /// Where served listeners are registered for the next agent.
    pub listeners: &'a Listeners,
}

fn pod_key_prefix(uid: &str) -> String {
    format!("pod/{uid}/")
}

/// The listener the previous agent served on `addr` in this pod, if it handed one over that
/// really is that (same namespace, same address).
fn adopt(
    taken: Option<&Taken>,
    pod: &PodContext,
    addr: SocketAddr,
) -> Option<std::net::TcpListener> {
    let fd = taken?.take(&pod_key(&pod.uid, addr))?;
    let same_netns =
        netns_cookie_of(std::os::fd::AsFd::as_fd(&fd)).ok() == Some(pod.netns.cookie());
    let socket = Socket::from(fd);
    let same_addr = socket.local_addr().ok().and_then(|a| a.as_socket()) == Some(addr);
    if !(same_netns && same_addr) {
        tracing::warn!(pod = %pod.uid, %addr, "a handed-over listener is not this pod's; binding anew");
        return None;
    }
    socket.set_nonblocking(true).ok()?;
    socket.listen(LISTEN_BACKLOG).ok()?;
    Some(socket.into())
}

/// Errors opening a pod's listeners.
#[derive(Debug, thiserror::Error)]
#[error("pod {pod}: listening on {addr} inside its network namespace: {source}")]
pub struct ListenError {
    pub pod: String,
    pub addr: SocketAddr,
    pub source: io::Error,
}

fn listen_in(netns: &Netns, home: &HomeNetns, addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = netns.tcp_socket(home, Domain::for_address(addr), PROXY_MARK)?;
    // Bursts of connects from one pod queue here while the proxy accepts.
    listen_on(socket, addr)
}

impl PodProxy {
    /// The pod's listener on `addr`: the one handed over if there is one, else a new one; it
    /// is registered for the next agent either way.
    fn listener(
        &mut self,
        pod: &PodContext,
        inputs: &ProxyInputs,
        handover: ListenerHandover<'_>,
        addr: SocketAddr,
    ) -> io::Result<TcpListener> {
        let listener = match adopt(handover.taken, pod, addr) {
            Some(l) => {
                self.adopted += 1;
                TcpListener::from_std(l)?
            }
            None => listen_in(&pod.netns, &inputs.home, addr)?,
        };
        if let Err(e) = self.handover.register(pod_key(&pod.uid, addr), &listener) {
            tracing::warn!(pod = %pod.uid, %addr, error = %e, "registering a listener for handover");
        }
        Ok(listener)
    }

    /// How many of its listeners were handed over by the previous agent.
    pub fn adopted(&self) -> usize {
        self.adopted
    }
}

impl PodProxy {
    /// Opens the outbound (`127.0.0.1`/`::1` port 15001) and inbound (15006) listeners inside
    /// the pod and starts serving them. IPv6 listeners are skipped when the pod has no IPv6.
    /// Listeners handed over by the previous agent are served rather than bound anew.
    pub fn start(
        pod: Arc<PodContext>,
        inputs: ProxyInputs,
        handover: ListenerHandover<'_>,
    ) -> Result<Self, ListenError> {
        let mut me = Self {
            tasks: Vec::new(),
            inbound_v4: None,
            inbound_v6: None,
            handover: handover.listeners.clone(),
            uid: pod.uid.clone(),
            adopted: 0,
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
            let outbound = match me.listener(&pod, &inputs, handover, out_addr) {
                Ok(l) => l,
                // A pod without IPv6 (or with it disabled) has no ::1.
                Err(e) if !v4 && e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => continue,
                Err(e) if !v4 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => continue,
                Err(e) => return Err(err(out_addr, e)),
            };
            let inbound = me
                .listener(&pod, &inputs, handover, in_addr)
                .map_err(|e| err(in_addr, e))?;
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
            let listener = me
                .listener(&pod, &inputs, handover, addr)
                .map_err(|source| ListenError {
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

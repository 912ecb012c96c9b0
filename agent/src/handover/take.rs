//! The successor's side: takes the running agent's listeners, and tells it when they are
//! served.
use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use nix::{errno::Errno, sys::socket::UnixAddr};
use tracing::{info, warn};

use super::{
    HandoverError, PROTOCOL_VERSION, Taken,
    wire::{self, Message},
};

/// How long one message from the running agent may take.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Listeners received from a running agent, which waits for [`Handover::adopted`].
#[derive(Debug)]
pub struct Handover {
    conn: OwnedFd,
    /// The listeners, by key.
    pub taken: Taken,
    /// How many were received.
    pub received: usize,
}

impl Handover {
    /// Tells the previous agent that its listeners are served here: it stops accepting and
    /// drains.
    pub fn adopted(self) -> Result<(), HandoverError> {
        wire::send(self.conn.as_fd(), &Message::Adopted, &[])
    }
}

/// Takes the listeners of the agent serving the handover socket at `path`. `Ok(None)` when no
/// agent serves it (a first start, or after a crash). An agent that refuses (it is draining,
/// and its successor has not bound the socket yet) is asked again until `patience` runs out.
pub fn take_over(path: &Path, patience: Duration) -> Result<Option<Handover>, HandoverError> {
    let deadline = Instant::now() + patience;
    loop {
        match try_once(path) {
            Err(HandoverError::Refused(reason)) if Instant::now() < deadline => {
                info!(%reason, "the agent at the handover socket is draining; asking again");
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

fn try_once(path: &Path) -> Result<Option<Handover>, HandoverError> {
    let sock = wire::seqpacket()?;
    let addr = UnixAddr::new(path).map_err(|e| HandoverError::Socket {
        path: path.into(),
        source: e.into(),
    })?;
    match nix::sys::socket::connect(sock.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(Errno::ENOENT | Errno::ECONNREFUSED) => return Ok(None),
        Err(e) => {
            return Err(HandoverError::Socket {
                path: path.into(),
                source: e.into(),
            });
        }
    }
    wire::set_receive_timeout(sock.as_fd(), RECEIVE_TIMEOUT)?;
    let mut fds = BTreeMap::new();
    loop {
        let (msg, received) = wire::recv(sock.as_fd())?;
        match msg {
            Message::Refused { reason } => return Err(HandoverError::Refused(reason)),
            Message::Listeners { version, .. } if version != PROTOCOL_VERSION => {
                return Err(HandoverError::Version { theirs: version });
            }
            Message::Listeners { keys, last, .. } => {
                if keys.len() != received.len() {
                    return Err(HandoverError::BadMessage(format!(
                        "{} keys for {} descriptors",
                        keys.len(),
                        received.len()
                    )));
                }
                fds.extend(keys.into_iter().zip(received));
                if last {
                    break;
                }
            }
            Message::Adopted => {
                return Err(HandoverError::BadMessage("unexpected adopted".into()));
            }
        }
    }
    let received = fds.len();
    if received == 0 {
        warn!("the running agent handed over no listeners");
    }
    Ok(Some(Handover {
        conn: sock,
        taken: Taken::new(fds),
        received,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handover::{Listeners, bind, spawn_server};

    #[test]
    fn a_successor_takes_the_listeners_and_later_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handover.sock");
        assert!(take_over(&path, Duration::ZERO).unwrap().is_none());
        let listeners = Listeners::default();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let key = crate::handover::pod_key("u1", tcp.local_addr().unwrap());
        listeners.register(key.clone(), &tcp).unwrap();
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        spawn_server(bind(&path).unwrap(), listeners, tx).unwrap();
        let handover = take_over(&path, Duration::ZERO).unwrap().unwrap();
        assert_eq!(handover.received, 1);
        let fd = handover.taken.take(&key).unwrap();
        let again = std::net::TcpListener::from(fd);
        assert_eq!(again.local_addr().unwrap(), tcp.local_addr().unwrap());
        assert!(!*rx.borrow_and_update());
        handover.adopted().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !*rx.borrow() {
            assert!(Instant::now() < deadline, "adoption not signalled");
            std::thread::sleep(Duration::from_millis(10));
        }
        match take_over(&path, Duration::ZERO) {
            Err(HandoverError::Refused(_)) => {}
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}

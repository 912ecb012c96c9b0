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
    ACCEPTED_VERSIONS, HandoverError, Taken,
    wire::{self, Message},
};
use crate::identity::CarriedCert;

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
    /// The running agent's workload certificates (none from an agent speaking protocol 1).
    pub certs: Vec<CarriedCert>,
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
    let mut certs = Vec::new();
    loop {
        let (msg, received) = wire::recv(sock.as_fd())?;
        match msg {
            Message::Refused { reason } => return Err(HandoverError::Refused(reason)),
            Message::Certificates { certs: more } => certs.extend(more),
            Message::Listeners { version, .. } if !ACCEPTED_VERSIONS.contains(&version) => {
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
        certs,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handover::{
        Listeners, PROTOCOL_VERSION, bind, spawn_server, wire::CERTS_PER_MESSAGE,
    };
    use crate::identity::{BuiltinCa, CustomCert};
    use crate::state::Identity;

    fn carried_certs(n: usize) -> Vec<CarriedCert> {
        let ca = BuiltinCa::generate("cluster.local").unwrap();
        let now = std::time::SystemTime::now();
        (0..n)
            .map(|i| {
                let cert = ca
                    .issue_custom(&CustomCert {
                        identity: Identity::new("cluster.local", "shop", &format!("sa-{i}")),
                        not_before: now,
                        not_after: now + Duration::from_secs(3600),
                    })
                    .unwrap();
                CarriedCert::from_cert(&cert)
            })
            .collect()
    }

    #[test]
    fn a_successor_takes_over_from_an_agent_speaking_protocol_1() {
        assert_ne!(PROTOCOL_VERSION, 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handover.sock");
        let server = crate::handover::bind(&path).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let old = std::thread::spawn(move || {
            let conn = nix::sys::socket::accept(server.as_raw_fd()).unwrap();
            // SAFETY: accept returned a new descriptor that nothing else owns.
            let conn = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(conn) };
            let msg = Message::Listeners {
                version: 1,
                keys: vec!["k".into()],
                last: true,
            };
            wire::send(conn.as_fd(), &msg, &[tcp.as_raw_fd()]).unwrap();
            wire::recv(conn.as_fd()).unwrap().0
        });
        let handover = take_over(&path, Duration::ZERO).unwrap().unwrap();
        assert_eq!(handover.received, 1);
        assert!(handover.certs.is_empty());
        handover.adopted().unwrap();
        assert_eq!(old.join().unwrap(), Message::Adopted);
    }

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
        // More certificates than one message carries.
        let certs = carried_certs(CERTS_PER_MESSAGE + 5);
        let sent = certs.clone();
        spawn_server(
            bind(&path).unwrap(),
            listeners,
            Box::new(move || sent.clone()),
            tx,
        )
        .unwrap();
        let handover = take_over(&path, Duration::ZERO).unwrap().unwrap();
        assert_eq!(handover.received, 1);
        assert_eq!(handover.certs, certs);
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

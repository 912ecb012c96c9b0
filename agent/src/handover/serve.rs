//! The running agent's side: hands every registered listener to the first successor that asks,
//! and says when that successor has adopted them.
use std::{
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    time::Duration,
};

use nix::sys::socket::{Backlog, SockFlag, UnixAddr, accept4, listen};
use tracing::{info, warn};

use super::{
    HandoverError, Listeners, PROTOCOL_VERSION,
    wire::{self, CERTS_PER_MESSAGE, MAX_FDS, Message},
};
use crate::identity::CarriedCert;

/// How long a successor may take between receiving the listeners and adopting them.
const ADOPT_TIMEOUT: Duration = Duration::from_secs(120);

/// Binds the handover socket at `path` (replacing a stale one; owner-only).
pub fn bind(path: &Path) -> Result<OwnedFd, HandoverError> {
    let err = |source| HandoverError::Socket {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let sock = wire::seqpacket()?;
    let addr = UnixAddr::new(path).map_err(|e| err(e.into()))?;
    nix::sys::socket::bind(sock.as_raw_fd(), &addr).map_err(|e| err(e.into()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    let backlog = Backlog::new(8).map_err(|e| err(e.into()))?;
    listen(&sock, backlog).map_err(|e| err(e.into()))?;
    Ok(sock)
}

/// What the running agent hands over besides its listeners: its workload certificates, read
/// when a successor asks.
pub type CarryCerts = Box<dyn Fn() -> Vec<CarriedCert> + Send>;

/// Serves successors on a thread of its own. The first one to adopt the listeners sets
/// `adopted` to true; later ones are refused (the listeners are theirs by then).
pub fn spawn_server(
    listener: OwnedFd,
    listeners: Listeners,
    certs: CarryCerts,
    adopted: tokio::sync::watch::Sender<bool>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("sluice-handover".into())
        .spawn(move || {
            loop {
                let conn = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                    // SAFETY: accept4 returned a new descriptor that nothing else owns.
                    Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        warn!(error = %e, "handover socket: accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                match hand_over(&conn, &listeners, &certs, &adopted) {
                    Ok(true) => {
                        info!(
                            "successor adopted the listeners; this agent stops accepting and drains"
                        );
                        let _ = adopted.send(true);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        warn!(error = %e, "handover failed; this agent keeps serving")
                    }
                }
            }
        })
        .map(drop)
}

/// Sends every certificate and listener to one successor; whether it adopted them.
fn hand_over(
    conn: &OwnedFd,
    listeners: &Listeners,
    certs: &CarryCerts,
    adopted: &tokio::sync::watch::Sender<bool>,
) -> Result<bool, HandoverError> {
    let sock = conn.as_fd();
    if *adopted.borrow() {
        let reason = "this agent has handed over already and is draining".to_owned();
        wire::send(sock, &Message::Refused { reason }, &[])?;
        return Ok(false);
    }
    let carried = certs();
    info!(
        certificates = carried.len(),
        "a successor asked to take over; handing over the workload certificates"
    );
    for chunk in carried.chunks(CERTS_PER_MESSAGE) {
        let msg = Message::Certificates {
            certs: chunk.to_vec(),
        };
        wire::send(sock, &msg, &[])?;
    }
    let all = listeners.snapshot().map_err(|source| HandoverError::Io {
        what: "duplicating listeners",
        source,
    })?;
    info!(
        listeners = all.len(),
        "a successor asked for the listeners; handing them over"
    );
    let chunks: Vec<&[(String, OwnedFd)]> = if all.is_empty() {
        vec![&[]]
    } else {
        all.chunks(MAX_FDS).collect()
    };
    let count = chunks.len();
    for (i, chunk) in chunks.into_iter().enumerate() {
        let keys = chunk.iter().map(|(k, _)| k.clone()).collect();
        let fds: Vec<RawFd> = chunk.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        let msg = Message::Listeners {
            version: PROTOCOL_VERSION,
            keys,
            last: i + 1 == count,
        };
        wire::send(sock, &msg, &fds)?;
    }
    wire::set_receive_timeout(sock, ADOPT_TIMEOUT)?;
    match wire::recv(sock)? {
        (Message::Adopted, _) => Ok(true),
        (other, _) => Err(HandoverError::BadMessage(format!(
            "expected adopted, got {other:?}"
        ))),
    }
}

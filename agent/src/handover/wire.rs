//! The handover's messages: one JSON document per seqpacket message, with the descriptors it
//! names in `SCM_RIGHTS`.
use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

use super::HandoverError;
use crate::identity::CarriedCert;

/// Descriptors per message (the kernel takes at most 253).
pub const MAX_FDS: usize = 200;
/// Largest message body.
const MAX_MESSAGE: usize = 256 * 1024;
/// Certificates per message (a few KiB each as JSON).
pub const CERTS_PER_MESSAGE: usize = 32;

/// One message of the handover.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase", deny_unknown_fields)]
pub enum Message {
    /// Running agent → successor, before the listeners (protocol 2): workload certificates
    /// with their keys, so the successor does not ask the CA for every identity again.
    Certificates { certs: Vec<CarriedCert> },
    /// Running agent → successor: the descriptors of this message, `keys[i]` naming the i-th;
    /// `last` on the final one.
    Listeners {
        version: u32,
        keys: Vec<String>,
        last: bool,
    },
    /// Running agent → successor: nothing is handed over (it has handed over already).
    Refused { reason: String },
    /// Successor → running agent: the listeners are served; stop accepting and drain.
    Adopted,
}

/// Sends `msg` with `fds`.
pub fn send(sock: BorrowedFd<'_>, msg: &Message, fds: &[RawFd]) -> Result<(), HandoverError> {
    let body = serde_json::to_vec(msg).map_err(|e| HandoverError::BadMessage(e.to_string()))?;
    let iov = [IoSlice::new(&body)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(HandoverError::io("sending"))?;
    Ok(())
}

/// Receives one message and the descriptors it carries (close-on-exec).
pub fn recv(sock: BorrowedFd<'_>) -> Result<(Message, Vec<OwnedFd>), HandoverError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let (bytes, flags, fds) = {
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(HandoverError::io("receiving"))?;
        let mut fds = Vec::new();
        for c in msg
            .cmsgs()
            .map_err(HandoverError::io("reading descriptors"))?
        {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel installed these descriptors for us; nothing else owns them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, msg.flags, fds)
    };
    if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
        return Err(HandoverError::BadMessage("truncated".into()));
    }
    if bytes == 0 {
        return Err(HandoverError::Io {
            what: "receiving",
            source: std::io::ErrorKind::UnexpectedEof.into(),
        });
    }
    let msg = serde_json::from_slice(&buf[..bytes])
        .map_err(|e| HandoverError::BadMessage(e.to_string()))?;
    Ok((msg, fds))
}

/// Bounds every later receive on `sock` by `limit`.
pub fn set_receive_timeout(sock: BorrowedFd<'_>, limit: Duration) -> Result<(), HandoverError> {
    let tv = nix::sys::time::TimeVal::new(
        limit.as_secs().try_into().unwrap_or(i64::MAX),
        limit.subsec_micros().into(),
    );
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
        .map_err(HandoverError::io("setting a receive timeout"))
}

/// A new unix seqpacket socket (close-on-exec).
pub fn seqpacket() -> Result<OwnedFd, HandoverError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(HandoverError::io("creating a socket"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_travel_with_their_keys() {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let msg = Message::Listeners {
            version: 1,
            keys: vec!["k".into()],
            last: true,
        };
        send(a.as_fd(), &msg, &[l.as_raw_fd()]).unwrap();
        let (got, fds) = recv(b.as_fd()).unwrap();
        assert_eq!(got, msg);
        assert_eq!(fds.len(), 1);
        let again = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(again.local_addr().unwrap(), l.local_addr().unwrap());
        send(b.as_fd(), &Message::Adopted, &[]).unwrap();
        assert_eq!(recv(a.as_fd()).unwrap().0, Message::Adopted);
        drop(b);
        assert!(recv(a.as_fd()).is_err(), "a closed peer is an error");
    }

    #[test]
    fn unknown_messages_are_refused() {
        assert!(serde_json::from_str::<Message>(r#"{"kind":"nuke"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Message::Adopted).unwrap(),
            r#"{"kind":"adopted"}"#
        );
    }
}

//! Small socket helpers the proxy and its HBONE transport share.
use std::{os::fd::AsFd, time::Duration};

/// Makes the eventual close of `socket` an RST (SO_LINGER 0), so the peer sees a refusal or
/// an abort, never a clean end of an empty answer.
pub fn reset_on_close(socket: &impl AsFd) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

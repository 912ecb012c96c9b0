//! Pods that MeshState does not know yet (between CNI ADD and the pod reaching the agent, or
//! while the API server is away): "unknown" means "not yet decided", never "allowed". A
//! connection waits a bounded time for the state to arrive, as ztunnel does, and is refused
//! if it does not.
use std::time::Duration;

use crate::state::{MeshState, Snapshot, StateHandle};

/// The first snapshot in which `known` holds: the current one, or one published within
/// `hold`; `None` when none arrived in time.
pub async fn wait_until(
    state: &StateHandle,
    hold: Duration,
    known: impl Fn(&MeshState) -> bool,
) -> Option<Snapshot> {
    // A clone sees every change published after it was made.
    let mut changes = state.clone();
    let current = changes.current();
    if known(&current) {
        return Some(current);
    }
    let deadline = tokio::time::Instant::now() + hold;
    loop {
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Some(next)) if known(&next) => return Some(next),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return None,
        }
    }
}

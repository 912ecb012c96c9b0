//! What an agent can hand over ([`Listeners`]) and what it received ([`Taken`]).
use std::{
    collections::BTreeMap,
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, Mutex, PoisonError},
};

/// The listening sockets this agent serves, by key: a successor receives them all. Each entry
/// is a duplicate of the serving socket's descriptor (the same kernel socket); the owner
/// removes its entries when it stops serving them.
#[derive(Clone, Debug, Default)]
pub struct Listeners {
    inner: Arc<Mutex<BTreeMap<String, OwnedFd>>>,
}

impl Listeners {
    /// Registers `socket` under `key` (replacing an earlier entry).
    pub fn register(&self, key: String, socket: impl AsFd) -> std::io::Result<()> {
        let dup = socket.as_fd().try_clone_to_owned()?;
        self.lock().insert(key, dup);
        Ok(())
    }

    /// Forgets every key starting with `prefix`.
    pub fn remove_prefix(&self, prefix: &str) {
        self.lock().retain(|k, _| !k.starts_with(prefix));
    }

    /// Forgets everything (this agent no longer serves its listeners).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// How many listeners are registered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fresh duplicates of every registered listener, in key order.
    pub(super) fn snapshot(&self) -> std::io::Result<Vec<(String, OwnedFd)>> {
        self.lock()
            .iter()
            .map(|(k, fd)| Ok((k.clone(), fd.try_clone()?)))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, OwnedFd>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Listeners received from the previous agent, taken one by one as pods are captured again.
/// What is never taken is closed when this is dropped.
#[derive(Clone, Debug, Default)]
pub struct Taken {
    inner: Arc<Mutex<BTreeMap<String, OwnedFd>>>,
}

impl Taken {
    pub(super) fn new(fds: BTreeMap<String, OwnedFd>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(fds)),
        }
    }

    /// Takes the listener received under `key`, if any.
    pub fn take(&self, key: &str) -> Option<OwnedFd> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key)
    }

    /// Keys received and not taken.
    pub fn remaining(&self) -> Vec<String> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// Closes what was not taken.
    pub fn close_rest(&self) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_duplicates_and_removal_forgets() {
        let l = Listeners::default();
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.register("pod/u1/127.0.0.1:15001".into(), &a).unwrap();
        l.register("pod/u2/127.0.0.1:15001".into(), &b).unwrap();
        assert_eq!(l.snapshot().unwrap().len(), 2);
        l.remove_prefix("pod/u1/");
        let snap = l.snapshot().unwrap();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].0, "pod/u2/127.0.0.1:15001");
        let taken = Taken::new(snap.into_iter().collect());
        assert!(taken.take("pod/u1/127.0.0.1:15001").is_none());
        let fd = taken.take("pod/u2/127.0.0.1:15001").unwrap();
        let again = std::net::TcpListener::from(fd);
        assert_eq!(again.local_addr().unwrap(), b.local_addr().unwrap());
        assert!(taken.remaining().is_empty());
    }
}

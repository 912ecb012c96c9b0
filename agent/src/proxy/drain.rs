//! Draining after a handover: served HBONE connections are told GOAWAY (their clients open new
//! connections, which reach the successor), and the agent can tell when the last one ended.
use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tokio::sync::watch;

/// What proxy tasks watch: whether the agent drains, and how many HBONE connections it serves.
#[derive(Clone, Debug)]
pub struct DrainWatcher {
    draining: watch::Receiver<bool>,
    served: Arc<AtomicUsize>,
}

/// Starts the drain; owned by the agent's lifecycle.
#[derive(Debug)]
pub struct DrainTrigger {
    draining: watch::Sender<bool>,
    served: Arc<AtomicUsize>,
}

/// A served HBONE connection, counted while it lives.
#[derive(Debug)]
pub struct ServedConnection(Arc<AtomicUsize>);

impl Drop for ServedConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A trigger and its watcher.
pub fn channel() -> (DrainTrigger, DrainWatcher) {
    let (tx, rx) = watch::channel(false);
    let served = Arc::new(AtomicUsize::new(0));
    (
        DrainTrigger {
            draining: tx,
            served: served.clone(),
        },
        DrainWatcher {
            draining: rx,
            served,
        },
    )
}

impl DrainWatcher {
    /// Completes once the drain has started (never, if it does not).
    pub async fn started(mut self) {
        if self.draining.wait_for(|d| *d).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Counts one served HBONE connection until the guard drops.
    pub fn serve(&self) -> ServedConnection {
        self.served.fetch_add(1, Ordering::Relaxed);
        ServedConnection(self.served.clone())
    }
}

impl DrainTrigger {
    /// Tells every served HBONE connection to take no new streams.
    pub fn start(&self) {
        self.draining.send_replace(true);
    }

    /// HBONE connections still served.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watchers_see_the_start_and_connections_are_counted() {
        let (trigger, watcher) = channel();
        let a = watcher.serve();
        let b = watcher.serve();
        assert_eq!(trigger.served(), 2);
        drop(a);
        assert_eq!(trigger.served(), 1);
        let started = tokio::spawn(watcher.clone().started());
        tokio::task::yield_now().await;
        assert!(!started.is_finished());
        trigger.start();
        tokio::time::timeout(std::time::Duration::from_secs(1), started)
            .await
            .expect("drain start seen")
            .unwrap();
        // A watcher made after the start sees it at once.
        tokio::time::timeout(std::time::Duration::from_secs(1), watcher.started())
            .await
            .expect("late watcher");
        drop(b);
        assert_eq!(trigger.served(), 0);
    }
}

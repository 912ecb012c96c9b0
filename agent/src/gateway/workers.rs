//! The gateway's workers, in the manner of nginx's worker processes: each is a thread running
//! a single-threaded runtime with its own upstream pools (HTTP/1.1 keep-alive and HBONE), and
//! serves the connections the accept loops hand it, round robin. A request then runs start to
//! end on one thread, so the hops between client, gateway and backend wake no other thread;
//! on a shared multi-threaded runtime those wake-ups cost more than the proxying itself (see
//! README, "Ingress" benchmark).
use std::{
    future::Future,
    io,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::runtime::Handle;

use super::handler::Shared;

/// One worker: where its connections run, and the state they use.
struct Worker {
    handle: Handle,
    shared: Arc<Shared>,
}

/// The workers, and the round-robin position of the next connection.
pub struct Workers {
    workers: Vec<Worker>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `count` (at least 1) worker threads; `shared` makes each one's state.
    pub fn start(count: usize, mut shared: impl FnMut() -> Arc<Shared>) -> io::Result<Self> {
        let mut workers = Vec::new();
        for i in 0..count.max(1) {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("gateway-worker-{i}"))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => {
                            let _ = tx.send(Ok(rt.handle().clone()));
                            // Serves what is spawned on it for the life of the process.
                            rt.block_on(std::future::pending::<()>());
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                })?;
            let handle = rx
                .recv()
                .map_err(|_| io::Error::other(format!("gateway worker {i} did not start")))??;
            workers.push(Worker {
                handle,
                shared: shared(),
            });
        }
        Ok(Self {
            workers,
            next: AtomicUsize::new(0),
        })
    }

    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Whether there are none (never, once started).
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Runs the connection that `serve` makes from the next worker's state on that worker.
    pub fn spawn<F, Fut>(&self, serve: F)
    where
        F: FnOnce(Arc<Shared>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        let worker = &self.workers[i];
        worker.handle.spawn(serve(worker.shared.clone()));
    }
}

//! Data-plane threads: one event loop per core.
//!
//! [`Workers::start`] starts N threads, each driving its own single-threaded
//! tokio runtime. The [`Proxy`](crate::Proxy) then binds one listener per
//! worker for every Service address, all in one SO_REUSEPORT group, and
//! registers each with its worker's event loop: the kernel spreads new
//! connections over the listeners, and a connection is accepted, dialed and
//! forwarded on the worker whose listener took it, never leaving that
//! thread. There is no work stealing and no cross-thread wake-up on the
//! connection path; what is shared (the live table, the backend tracker,
//! the connection limit, metrics) is read through atomics and short locks.
//!
//! The control plane (sources, the reconciler, drain timers, admin
//! endpoints) stays on the main runtime. The trade-off is nginx's with
//! `reuseport`: the kernel hashes connections to listeners without looking
//! at how busy each worker is, so a worker stuck on heavy connections keeps
//! its share of new ones.

use std::io;

use tokio::runtime::{Builder, Handle};
use tokio_util::sync::CancellationToken;

/// Running data-plane threads. Dropping it stops them (after their tasks
/// have been dropped: stop the [`Proxy`](crate::Proxy) first).
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// Starts `n` worker threads (named `sluice-worker-I`).
    pub fn start(n: usize) -> io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut workers = Workers {
            handles: Vec::with_capacity(n),
            stop: stop.clone(),
            threads: Vec::with_capacity(n),
        };
        for i in 0..n {
            // On error, `workers` is dropped: the threads started so far stop.
            let runtime = Builder::new_current_thread().enable_all().build()?;
            workers.handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("sluice-worker-{i}"))
                .spawn(move || runtime.block_on(stop.cancelled()))?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// One handle per worker, in order.
    pub fn handles(&self) -> Vec<Handle> {
        self.handles.clone()
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
        for t in self.threads.drain(..) {
            // A worker thread runs no code of its own that could panic; a
            // panicking task is caught by its runtime.
            let _ = t.join();
        }
    }
}

/// The default number of workers: the CPUs this process may use (its
/// affinity mask and cgroup CPU quota, as the standard library reads them).
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_their_worker_thread() {
        let workers = Workers::start(2).unwrap();
        let names: Vec<String> = workers
            .handles()
            .iter()
            .map(|h| {
                let (tx, rx) = std::sync::mpsc::channel();
                h.spawn(async move {
                    let _ = tx.send(std::thread::current().name().map(str::to_owned));
                });
                rx.recv_timeout(std::time::Duration::from_secs(5))
                    .unwrap()
                    .unwrap()
            })
            .collect();
        assert_eq!(names, ["sluice-worker-0", "sluice-worker-1"]);
        drop(workers); // joins both threads
    }
}

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
//! The control plane (sources, the reconciler, admin endpoints) stays on
//! the main runtime; drain timers run wherever the backend's drain started
//! (the reconciler, or a worker whose connection found it draining). The trade-off is nginx's with
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
    /// Starts `n` worker threads, named `sluice-wI` (Linux keeps 15 bytes
    /// of a thread's name: these stay whole up to worker 9,999,999).
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
                .name(format!("sluice-w{i}"))
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

/// Most workers started by default (see [`default_count`]).
pub const DEFAULT_MAX: usize = 4;

/// The default number of workers: the CPUs this process may use (its
/// affinity mask and cgroup CPU quota, as the standard library reads them),
/// at most [`DEFAULT_MAX`]. Each worker holds its own listener for every
/// Service address (~5.7 KiB of kernel memory each, measured), so the
/// default stays small: a node with 10,000 Service ports holds 40,000
/// listeners. Four cores of a proxy whose cost is mostly the kernel's carry
/// tens of thousands of new connections a second; more is a flag away.
pub fn default_count() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(DEFAULT_MAX)
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
        assert_eq!(names, ["sluice-w0", "sluice-w1"]);
        drop(workers); // joins both threads
    }
}

//! Process-wide counters of the data plane.
//!
//! Plain atomics bumped on the connection path; the admin endpoint renders
//! them. Per-service and per-backend breakdowns live where the labels are
//! known (the tracker, the listeners).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::connect::DialErrorKind;
use crate::forward::Outcome;

#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    /// Clients reset because no eligible backend was left to try.
    pub no_backend: AtomicU64,
    pub retries: AtomicU64,
    pub dial_refused: AtomicU64,
    pub dial_unreachable: AtomicU64,
    pub dial_timeout: AtomicU64,
    pub dial_other: AtomicU64,
    pub closed: AtomicU64,
    pub reset: AtomicU64,
    pub cut: AtomicU64,
    pub bytes_client_to_backend: AtomicU64,
    pub bytes_backend_to_client: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Stats {
    pub fn dial_failed(&self, kind: DialErrorKind) {
        bump(match kind {
            DialErrorKind::Refused => &self.dial_refused,
            DialErrorKind::Unreachable => &self.dial_unreachable,
            DialErrorKind::Timeout => &self.dial_timeout,
            DialErrorKind::Other => &self.dial_other,
        });
    }

    pub fn ended(&self, outcome: Outcome) {
        bump(match outcome {
            Outcome::Closed => &self.closed,
            Outcome::Reset => &self.reset,
            Outcome::Cut => &self.cut,
        });
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

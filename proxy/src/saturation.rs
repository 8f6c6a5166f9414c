//! sluice's own saturation: local resources (descriptors, socket buffers,
//! memory, source ports) running out on accept or dial.
//!
//! Such errors are never a backend's fault and never eject one (see
//! [`crate::connect::DialErrorKind::Local`]). They are recorded here as a
//! streak: a streak goes on while errors keep coming less than
//! [`Saturation::QUIET`] apart. A streak that has lasted longer than the
//! caller's threshold makes `/healthz` report the node as degraded (503),
//! so that load balancers stop sending to it; `/livez` ignores it, so the
//! kubelet never restarts a process that is only full.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The current streak of local resource errors, if any.
#[derive(Debug, Default)]
pub struct Saturation {
    streak: Mutex<Option<Streak>>,
}

#[derive(Debug, Clone, Copy)]
struct Streak {
    since: Instant,
    last: Instant,
    reason: &'static str,
}

impl Saturation {
    /// Errors further apart than this end a streak.
    pub const QUIET: Duration = Duration::from_secs(5);

    /// A local resource error (`reason`: what ran out, for `/healthz`).
    pub fn record(&self, now: Instant, reason: &'static str) {
        let mut streak = self.streak.lock().unwrap_or_else(|e| e.into_inner());
        *streak = Some(match *streak {
            Some(s) if now.saturating_duration_since(s.last) < Self::QUIET => Streak {
                last: now,
                reason,
                ..s
            },
            _ => Streak {
                since: now,
                last: now,
                reason,
            },
        });
    }

    /// What has been running out for at least `threshold` up to `now`
    /// (errors still coming), or `None`.
    pub fn persisting(&self, now: Instant, threshold: Duration) -> Option<&'static str> {
        let streak = (*self.streak.lock().unwrap_or_else(|e| e.into_inner()))?;
        let ongoing = now.saturating_duration_since(streak.last) < Self::QUIET;
        let long = now.saturating_duration_since(streak.since) >= threshold;
        (ongoing && long).then_some(streak.reason)
    }
}

/// What ran out, for an I/O error that is local resource exhaustion.
pub fn local_resource(e: &std::io::Error) -> Option<&'static str> {
    match e.raw_os_error()? {
        libc::EMFILE => Some("file descriptors (process limit)"),
        libc::ENFILE => Some("file descriptors (system limit)"),
        libc::ENOBUFS | libc::ENOMEM => Some("kernel memory"),
        libc::EADDRNOTAVAIL => Some("local addresses or ports"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streak_persists_only_while_errors_keep_coming() {
        let s = Saturation::default();
        let t0 = Instant::now();
        let secs = |n| t0 + Duration::from_secs(n);
        let threshold = Duration::from_secs(30);
        assert_eq!(s.persisting(t0, threshold), None);
        for n in 0..=31 {
            s.record(secs(n), "file descriptors (process limit)");
        }
        assert_eq!(
            s.persisting(secs(31), threshold),
            Some("file descriptors (process limit)")
        );
        // Quiet for longer than QUIET: the streak is over.
        assert_eq!(s.persisting(secs(40), threshold), None);
        // A new error starts a new streak, short again.
        s.record(secs(41), "kernel memory");
        assert_eq!(s.persisting(secs(42), threshold), None);
    }

    #[test]
    fn errors_further_apart_than_quiet_never_persist() {
        let s = Saturation::default();
        let t0 = Instant::now();
        for n in 0..10 {
            let t = t0 + Duration::from_secs(n * 6);
            s.record(t, "kernel memory");
            assert_eq!(s.persisting(t, Duration::from_secs(30)), None);
        }
    }

    #[test]
    fn local_resource_errors_are_named() {
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert!(local_resource(&emfile).unwrap().contains("descriptors"));
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(local_resource(&refused), None);
    }
}

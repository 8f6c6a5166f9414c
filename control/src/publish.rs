//! Publishing tables: one writer swaps, every connection loads.
//!
//! [`Publisher`] owns the live table behind an [`ArcSwap`]. Readers call
//! [`Publisher::load`] once per new connection (a wait-free pointer load);
//! subscribers such as the listener reconciler wait on [`Publisher::subscribe`]
//! to learn that a new generation is live. Publishing a table equal to the
//! live one changes nothing and wakes nobody.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::table::Table;

/// A published table and when it went live.
#[derive(Debug)]
pub struct Snapshot {
    pub table: Arc<Table>,
    /// Starts at 0 (the empty table before any source spoke); +1 per change.
    pub generation: u64,
    pub published_at: Instant,
    /// Wall-clock time of the publish, for health reports.
    pub published_wall: SystemTime,
}

/// The single place a table becomes live.
#[derive(Debug)]
pub struct Publisher {
    live: ArcSwap<Snapshot>,
    changed: watch::Sender<u64>,
    /// Since when a source has input that is not reflected in the live
    /// table yet (kube-proxy's health rule: unhealthy when an update waits
    /// too long).
    pending_since: Mutex<Option<Instant>>,
    /// When the live table was last confirmed to reflect all input (a
    /// publish, changed or not): kube-proxy's `lastUpdated`.
    synced_wall: Mutex<SystemTime>,
}

impl Default for Publisher {
    fn default() -> Self {
        Self::new()
    }
}

impl Publisher {
    pub fn new() -> Self {
        let (changed, _) = watch::channel(0);
        Self {
            live: ArcSwap::from_pointee(Snapshot {
                table: Arc::new(Table::new()),
                generation: 0,
                published_at: Instant::now(),
                published_wall: SystemTime::now(),
            }),
            changed,
            pending_since: Mutex::new(None),
            synced_wall: Mutex::new(SystemTime::now()),
        }
    }

    /// The live table, for one new connection.
    pub fn load(&self) -> Arc<Table> {
        self.live.load().table.clone()
    }

    /// The live table with its generation and publish time.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.live.load_full()
    }

    /// Makes `table` live unless it equals the live one.
    /// Returns the new generation, or `None` when nothing changed.
    /// Only one task may publish (the source's); the swap itself is atomic.
    pub fn publish(&self, table: Table) -> Option<u64> {
        let current = self.live.load();
        if *current.table == table && current.generation > 0 {
            self.settle_unchanged();
            return None;
        }
        Some(self.publish_changed(table))
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.pending_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A source received input that may change the table; the next
    /// `publish` (changed or not) clears it.
    pub fn mark_pending(&self) {
        self.pending().get_or_insert_with(Instant::now);
    }

    /// Since when input has been waiting for a publish, if it is.
    pub fn pending_since(&self) -> Option<Instant> {
        *self.pending()
    }

    /// kube-proxy's health rule: healthy unless source input has waited
    /// longer than `timeout` for a publish, counting the process start
    /// (`started`) as input until the first table, so that a starting
    /// proxy is healthy for one timeout.
    pub fn is_healthy(&self, now: Instant, timeout: Duration, started: Instant) -> bool {
        let starting = (self.snapshot().generation == 0).then_some(started);
        let oldest = match (self.pending_since(), starting) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        oldest.is_none_or(|t| now.saturating_duration_since(t) <= timeout)
    }

    /// When the live table was last confirmed to reflect all input (any
    /// publish, changed or not; the start before the first).
    pub fn last_synced(&self) -> SystemTime {
        *self.synced_wall.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn settle(&self) {
        *self.pending() = None;
        *self.synced_wall.lock().unwrap_or_else(|e| e.into_inner()) = SystemTime::now();
    }

    /// Makes `table` live without comparing it to the live one: for a
    /// caller that already knows it differs (the Kubernetes index tracks
    /// which keys changed), so that publishing costs O(1) rather than a
    /// full-table comparison. Returns the new generation.
    pub fn publish_changed(&self, table: Table) -> u64 {
        self.settle();
        let generation = self.live.load().generation + 1;
        self.live.store(Arc::new(Snapshot {
            table: Arc::new(table),
            generation,
            published_at: Instant::now(),
            published_wall: SystemTime::now(),
        }));
        self.changed.send_replace(generation);
        generation
    }

    /// The pending input turned out not to change the table (the caller
    /// knows, without a full comparison): clears the pending mark as an
    /// equal `publish` would.
    pub fn settle_unchanged(&self) {
        self.settle();
    }

    /// A receiver that sees every generation change (the latest, not each).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{ListenKey, Policy, Service};

    fn mk_table(port: u16) -> Table {
        let mut t = Table::new();
        t.insert(
            ListenKey::tcp(([127, 0, 0, 1], port).into()),
            Arc::new(Service::new("s", Policy::RoundRobin, None, vec![])),
        );
        t
    }

    #[test]
    fn equal_table_is_a_no_op() {
        let p = Publisher::new();
        let mut rx = p.subscribe();
        assert_eq!(p.publish(mk_table(80)), Some(1));
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        assert_eq!(p.publish(mk_table(80)), None);
        assert!(!rx.has_changed().unwrap());
        assert_eq!(p.publish(mk_table(81)), Some(2));
        assert_eq!(*rx.borrow_and_update(), 2);
        assert_eq!(p.snapshot().generation, 2);
    }

    #[test]
    fn pending_input_is_cleared_by_any_publish() {
        let p = Publisher::new();
        p.mark_pending();
        let since = p.pending_since().unwrap();
        p.mark_pending();
        assert_eq!(p.pending_since(), Some(since), "the oldest input counts");
        p.publish(Table::new());
        assert_eq!(p.pending_since(), None);
        p.mark_pending();
        assert_eq!(p.publish(Table::new()), None);
        assert_eq!(p.pending_since(), None, "an equal table also clears it");
    }

    #[test]
    fn publish_changed_always_bumps_generation() {
        let p = Publisher::new();
        let mut rx = p.subscribe();
        assert_eq!(p.publish_changed(mk_table(80)), 1);
        assert_eq!(p.publish_changed(mk_table(81)), 2);
        assert_eq!(*rx.borrow_and_update(), 2);
        assert!(
            p.load()
                .get(&ListenKey::tcp(([127, 0, 0, 1], 81).into()))
                .is_some()
        );
        // The equality-checking publish still sees the live table.
        assert_eq!(p.publish(mk_table(81)), None);
    }

    #[test]
    fn first_publish_of_empty_table_counts() {
        // The first table from a source is a change even if empty: readiness
        // is "a first complete table was published".
        let p = Publisher::new();
        assert_eq!(p.publish(Table::new()), Some(1));
        assert_eq!(p.publish(Table::new()), None);
    }
}

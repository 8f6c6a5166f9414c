//! Per-backend runtime state that outlives table swaps.
//!
//! The table says what a backend *is* (ready, terminating, gone); the
//! [`Tracker`] remembers what sluice has *seen* of it, keyed by address:
//! - how many connections it carries right now ([`ConnGuard`], an RAII
//!   guard taken before the dial, so least-connections counts dials too);
//! - whether a failed dial ejected it from new picks, and until when
//!   (a cooldown that doubles per consecutive failure, up to a maximum,
//!   and ends as soon as a dial to it succeeds); a dial that timed out
//!   while the backend was completing other handshakes is not held against
//!   it (an overflowing accept queue drops SYNs; it is busy, not gone);
//! - whether it is draining: terminating, or gone from the live table. Its
//!   established connections keep flowing until they close or the drain
//!   timeout fires, which cancels the backend's cut token and so every
//!   connection still holding it. A backend that is only unready (or at
//!   weight 0) gets no new connections but is not drained: as behind
//!   kube-proxy, unready means "no new connections", not "cut existing
//!   ones", so a flapping readiness probe never cuts a long-lived stream.
//!
//! [`Tracker::on_diff`] is called by the reconciler after every publish,
//! with what changed: only the backends of changed Services are looked at
//! (per-address counts of the Service entries that list and keep each
//! backend). [`Tracker::forget_idle`], on a clock, forgets backends no
//! table lists once their last connection closed.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use sluice_control::{Service, Table, TableDiff};
use tokio_util::sync::CancellationToken;

use crate::connect::DialErrorKind;
use crate::metrics::{BackendMetrics, Metrics};

/// Tuning for ejection and draining.
#[derive(Debug, Clone, Copy)]
pub struct TrackerConfig {
    /// Cooldown after the first failed dial; doubles per further failure.
    pub eject_base: Duration,
    /// Upper bound of the cooldown.
    pub eject_max: Duration,
    /// How long a draining backend's connections may live.
    pub drain_timeout: Duration,
}

/// What sluice knows about one backend address.
#[derive(Debug)]
pub struct BackendState {
    addr: SocketAddr,
    active: AtomicUsize,
    inner: Mutex<Inner>,
    pub metrics: BackendMetrics,
}

#[derive(Debug)]
struct Inner {
    health: Health,
    /// When a dial to it last completed its handshake.
    last_connected: Option<Instant>,
    drain: Drain,
    /// Cancelled when the drain timeout cuts this backend's connections.
    cut: CancellationToken,
}

/// Whether dials to a backend have been failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// The last dial succeeded (or none was made).
    Healthy,
    /// Ejected after `failures` consecutive failed dials: no new picks
    /// before `until`. After it, one dial at a time probes the backend
    /// (`probing`) while the others still skip it, until a dial succeeds.
    Failing {
        failures: u32,
        /// When the current ejection began: failures of dials started
        /// before it were caused by the same outage and do not lengthen it.
        since: Instant,
        until: Instant,
        probing: bool,
    },
}

/// Whether the backend is eligible in the live table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    Serving,
    /// Not eligible since `since`; `recorded` once the drain's duration was
    /// observed (its last connection ended).
    Draining {
        since: Instant,
        recorded: bool,
    },
}

impl BackendState {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means a panic elsewhere while holding it; the
        // state inside is plain data and still consistent enough to use.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The instant until which this backend is ejected, if it is now.
    pub fn ejected_until(&self, now: Instant) -> Option<Instant> {
        match self.lock().health {
            Health::Failing { until, .. } if until > now => Some(until),
            _ => None,
        }
    }

    /// Whether new picks must skip this backend: it is in its cooldown, or
    /// the cooldown is over and a probing dial is under way.
    pub fn is_ejected(&self, now: Instant) -> bool {
        match self.lock().health {
            Health::Healthy => false,
            Health::Failing { until, probing, .. } => until > now || probing,
        }
    }

    pub fn is_draining(&self) -> bool {
        matches!(self.lock().drain, Drain::Draining { .. })
    }
}

/// Counts one connection on a backend for as long as it lives.
#[derive(Debug)]
pub struct ConnGuard {
    state: Arc<BackendState>,
    cut: CancellationToken,
    metrics: Arc<Metrics>,
}

impl ConnGuard {
    /// Cancelled when this connection must be cut (drain timeout, shutdown).
    pub fn cut_token(&self) -> &CancellationToken {
        &self.cut
    }

    pub fn backend(&self) -> &BackendState {
        &self.state
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.state.metrics.active.dec();
        if self.state.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            let mut inner = self.state.lock();
            if let Drain::Draining {
                since,
                recorded: recorded @ false,
            } = &mut inner.drain
            {
                *recorded = true;
                self.metrics
                    .drain_duration
                    .observe(since.elapsed().as_secs_f64());
            }
        }
    }
}

/// How many Service entries of the live table list a backend address, and
/// how many keep it (eligible, or listed as not terminating).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Refs {
    listed: usize,
    kept: usize,
}

/// What the tracker follows of the table.
#[derive(Debug, Default)]
struct Follow {
    /// The table of the last [`Tracker::on_diff`].
    last: Table,
    /// Per backend address listed by the last table.
    refs: std::collections::HashMap<SocketAddr, Refs>,
}

impl Follow {
    /// Adds (`add`) or takes away one Service entry's backends.
    fn count(
        refs: &mut std::collections::HashMap<SocketAddr, Refs>,
        service: &Service,
        add: bool,
        touched: &mut HashSet<SocketAddr>,
    ) {
        let eligible: HashSet<SocketAddr> = service.eligible_iter().map(|b| b.addr).collect();
        let step = |n: &mut usize| {
            *n = if add {
                n.saturating_add(1)
            } else {
                n.saturating_sub(1)
            }
        };
        for b in service.backends() {
            let refs = refs.entry(b.addr).or_default();
            step(&mut refs.listed);
            if !b.conditions.terminating || eligible.contains(&b.addr) {
                step(&mut refs.kept);
            }
            touched.insert(b.addr);
        }
    }
}

/// All backends sluice has dialed or is tracking.
#[derive(Debug)]
pub struct Tracker {
    config: TrackerConfig,
    backends: DashMap<SocketAddr, Arc<BackendState>>,
    /// Addresses the live table keeps (see [`Tracker::on_diff`]; `None`
    /// until the first table was applied): any other is drained. A
    /// persistent set: a publish changes a few addresses of a clone.
    kept: ArcSwap<Option<imbl::HashSet<SocketAddr>>>,
    /// What [`Tracker::on_diff`] follows; touched only by the reconciler.
    follow: Mutex<Follow>,
    /// Parent of every cut token: cancelled at the end of the shutdown grace.
    shutdown_cut: CancellationToken,
    metrics: Arc<Metrics>,
}

impl Tracker {
    pub fn new(
        config: TrackerConfig,
        shutdown_cut: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            metrics,
            config,
            backends: DashMap::new(),
            kept: ArcSwap::from_pointee(None),
            follow: Mutex::default(),
            shutdown_cut,
        }
    }

    fn state(&self, addr: SocketAddr) -> Arc<BackendState> {
        if let Some(s) = self.backends.get(&addr) {
            return s.clone();
        }
        let state = self
            .backends
            .entry(addr)
            .or_insert_with(|| {
                Arc::new(BackendState {
                    addr,
                    active: AtomicUsize::new(0),
                    inner: Mutex::new(Inner {
                        health: Health::Healthy,
                        last_connected: None,
                        drain: Drain::Serving,
                        cut: self.shutdown_cut.child_token(),
                    }),
                    metrics: self.metrics.backend(&addr.to_string()),
                })
            })
            .clone();
        // A connection that picked this backend from a table that has since
        // been replaced may create its entry after `on_diff` ran: check the
        // newest table so it is drained like the others.
        if self
            .kept
            .load()
            .as_ref()
            .as_ref()
            .is_some_and(|e| !e.contains(&addr))
        {
            self.start_drain(&state);
        }
        state
    }

    /// Active connections (including dials in progress) on `addr`.
    pub fn active(&self, addr: SocketAddr) -> usize {
        self.backends.get(&addr).map_or(0, |s| s.active())
    }

    /// Whether `addr` is ejected from new picks at `now`.
    pub fn is_ejected(&self, addr: SocketAddr, now: Instant) -> bool {
        self.backends.get(&addr).is_some_and(|s| s.is_ejected(now))
    }

    /// Registers a connection to `addr` before dialing it. A dial to a
    /// failing backend whose cooldown is over is its probe.
    pub fn connect(&self, addr: SocketAddr) -> ConnGuard {
        let state = self.state(addr);
        state.active.fetch_add(1, Ordering::Relaxed);
        state.metrics.active.inc();
        let cut = {
            let mut inner = state.lock();
            if let Health::Failing { probing, .. } = &mut inner.health {
                *probing = true;
            }
            inner.cut.clone()
        };
        ConnGuard {
            state,
            cut,
            metrics: self.metrics.clone(),
        }
    }

    /// A dial to `addr`, started at `started`, failed: eject the backend
    /// for a cooldown that doubles per consecutive failure. Dials that were
    /// already under way when the current ejection began failed for the
    /// same reason and do not lengthen it. Returns the cooldown in force.
    ///
    /// A [`DialErrorKind::Local`] failure (sluice out of descriptors,
    /// buffers or source ports) is sluice's own saturation, not the
    /// backend's: it is counted and ejects nothing (zero cooldown), so
    /// exhaustion never spreads into ejections of healthy backends.
    ///
    /// A [`DialErrorKind::Timeout`] of a healthy backend that completed
    /// another dial's handshake while this one waited, or within as long
    /// before it started, ejects nothing either: a backend whose accept
    /// queue overflows drops SYNs (the kernel would resend them after 1 s)
    /// while it keeps answering others, and is busy, not gone. A vanished
    /// pod completes no handshake, so its timeouts still eject it, one
    /// dial's wait later at most.
    pub fn dial_failed(&self, addr: SocketAddr, kind: DialErrorKind, started: Instant) -> Duration {
        if kind == DialErrorKind::Local {
            self.metrics.local_dial_error();
            return Duration::ZERO;
        }
        let state = self.state(addr);
        state.metrics.dial_failed(kind);
        let now = Instant::now();
        let mut inner = state.lock();
        let waited = now.saturating_duration_since(started);
        let answering = started
            .checked_sub(waited)
            .map_or(inner.last_connected.is_some(), |from| {
                inner.last_connected.is_some_and(|t| t >= from)
            });
        let failures = match inner.health {
            Health::Failing { since, until, .. } if started < since => {
                return until.saturating_duration_since(since);
            }
            Health::Healthy if kind == DialErrorKind::Timeout && answering => {
                tracing::debug!(backend = %addr, ?waited, "dial timed out while the backend answers others: busy, not ejected");
                return Duration::ZERO;
            }
            Health::Failing { failures, .. } => failures.saturating_add(1),
            Health::Healthy => {
                state.metrics.ejected();
                tracing::info!(backend = %addr, reason = kind.as_str(), "backend ejected after a failed dial");
                1
            }
        };
        let doublings = (failures - 1).min(16);
        let cooldown = self
            .config
            .eject_base
            .saturating_mul(1u32 << doublings)
            .min(self.config.eject_max);
        inner.health = Health::Failing {
            failures,
            since: now,
            until: now + cooldown,
            probing: false,
        };
        cooldown
    }

    /// A dial to `addr` succeeded: any ejection ends. Returns whether the
    /// backend had been failing.
    pub fn dial_succeeded(&self, addr: SocketAddr) -> bool {
        let Some(state) = self.backends.get(&addr).map(|s| s.clone()) else {
            return false;
        };
        state.metrics.connections.inc();
        let mut inner = state.lock();
        let was_failing = inner.health != Health::Healthy;
        inner.health = Health::Healthy;
        inner.last_connected = Some(Instant::now());
        was_failing
    }

    /// Applies a newly published table, computing the diff from the last
    /// one applied (tests; the reconciler has the diff: [`Self::on_diff`]).
    pub fn on_table(self: &Arc<Self>, table: &Table) {
        let diff = {
            let follow = self.follow.lock().unwrap_or_else(|p| p.into_inner());
            TableDiff::between(&follow.last, table)
        };
        self.on_diff(&diff, table);
    }

    /// Applies a newly published table, given `diff` from the table of the
    /// previous call. The table keeps a backend that some Service still
    /// picks, or lists as not terminating (unready or at weight 0: no new
    /// connections, established ones untouched). Any other backend
    /// (terminating everywhere it is listed, or gone) starts draining, its
    /// drain timer starting now; a kept backend stops draining; an idle
    /// backend that left the table is forgotten. Only the backends of the
    /// diff's Services (before and after) are looked at: O(changes).
    pub fn on_diff(self: &Arc<Self>, diff: &TableDiff, table: &Table) {
        let mut follow = self.follow.lock().unwrap_or_else(|p| p.into_inner());
        let follow = &mut *follow;
        let mut touched = HashSet::new();
        let keys = (diff.added.iter())
            .chain(&diff.removed)
            .chain(diff.changed.iter().map(|(k, _)| k));
        for key in keys {
            if let Some(old) = follow.last.get(key) {
                Follow::count(&mut follow.refs, old, false, &mut touched);
            }
            if let Some(new) = table.get(key) {
                Follow::count(&mut follow.refs, new, true, &mut touched);
            }
        }
        follow.last = table.clone();
        let mut kept = match self.kept.load().as_ref() {
            Some(k) => k.clone(),
            None => imbl::HashSet::new(),
        };
        for addr in touched {
            let refs = follow.refs.get(&addr).copied().unwrap_or_default();
            if refs.kept > 0 {
                kept.insert(addr);
            } else {
                kept.remove(&addr);
            }
            if refs == Refs::default() {
                follow.refs.remove(&addr);
            }
            let Some(state) = self.backends.get(&addr).map(|s| s.clone()) else {
                continue;
            };
            if refs.kept > 0 {
                state.lock().drain = Drain::Serving;
            } else if refs.listed == 0
                && (self.backends)
                    .remove_if(&addr, |_, s| s.active() == 0)
                    .is_some()
            {
                self.metrics.forget_backend(&addr.to_string());
            } else {
                self.start_drain(&state);
            }
        }
        self.kept.store(Arc::new(Some(kept)));
    }

    /// Distinct backend addresses the last table applied lists.
    pub fn listed(&self) -> usize {
        let follow = self.follow.lock().unwrap_or_else(|p| p.into_inner());
        follow.refs.len()
    }

    /// Forgets idle backends that no table lists: one whose connections
    /// outlived its removal, or that a connection picked from a table
    /// replaced meanwhile. A walk of the tracked backends, on a clock (the
    /// proxy's housekeeping), not per publish.
    pub fn forget_idle(&self) {
        let follow = self.follow.lock().unwrap_or_else(|p| p.into_inner());
        self.backends.retain(|addr, state| {
            let keep = state.active() > 0 || follow.refs.contains_key(addr);
            if !keep {
                self.metrics.forget_backend(&addr.to_string());
            }
            keep
        });
    }

    fn start_drain(&self, state: &Arc<BackendState>) {
        let since = {
            let mut inner = state.lock();
            if let Drain::Draining { .. } = inner.drain {
                return;
            }
            let now = Instant::now();
            inner.drain = Drain::Draining {
                since: now,
                recorded: false,
            };
            now
        };
        if state.active() > 0 {
            tracing::info!(backend = %state.addr, active = state.active(), "backend draining");
        }
        let state = state.clone();
        let timeout = self.config.drain_timeout;
        let fresh = self.shutdown_cut.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let cut = {
                let mut inner = state.lock();
                if !matches!(inner.drain, Drain::Draining { since: s, .. } if s == since) {
                    return; // eligible again, or a newer drain started
                }
                std::mem::replace(&mut inner.cut, fresh.child_token())
            };
            let active = state.active();
            if active > 0 {
                metrics.drain_cut.inc_by(active as u64);
                tracing::warn!(
                    backend = %state.addr,
                    connections = active,
                    after = ?timeout,
                    "drain timeout: cutting connections"
                );
            }
            cut.cancel();
        });
    }

    /// Total active connections over all backends.
    pub fn total_active(&self) -> usize {
        self.backends.iter().map(|s| s.active()).sum()
    }

    /// A snapshot of every tracked backend (for logs and the debug view).
    pub fn snapshot(&self) -> Vec<Arc<BackendState>> {
        self.backends.iter().map(|s| s.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_control::{Backend, Conditions, ListenKey, Policy, Service};

    fn cfg(drain: Duration) -> TrackerConfig {
        TrackerConfig {
            eject_base: Duration::from_secs(1),
            eject_max: Duration::from_secs(5),
            drain_timeout: drain,
        }
    }

    /// A tracker (1 s cooldown) and the metrics it counts in.
    fn counted() -> (Tracker, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let t = Tracker::new(
            cfg(Duration::from_secs(1)),
            CancellationToken::new(),
            metrics.clone(),
        );
        (t, metrics)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn mk_table(backends: &[(&str, Conditions)]) -> Table {
        let mut t = Table::new();
        t.insert(
            ListenKey::tcp(addr("127.0.0.1:80")),
            Arc::new(Service::new(
                "s",
                Policy::RoundRobin,
                None,
                backends
                    .iter()
                    .map(|(a, c)| Backend::new(addr(a), *c))
                    .collect(),
            )),
        );
        t
    }

    #[test]
    fn ejection_cooldown_doubles_and_caps_then_ends_on_success() {
        let t = Tracker::new(
            cfg(Duration::from_secs(1)),
            CancellationToken::new(),
            Arc::default(),
        );
        let b = addr("10.0.0.1:80");
        // Each failure comes from a dial started after the previous ejection.
        let fail = || t.dial_failed(b, DialErrorKind::Refused, Instant::now());
        assert_eq!(fail(), Duration::from_secs(1));
        assert_eq!(fail(), Duration::from_secs(2));
        assert_eq!(fail(), Duration::from_secs(4));
        assert_eq!(fail(), Duration::from_secs(5));
        let now = Instant::now();
        assert!(t.is_ejected(b, now));
        assert!(!t.is_ejected(b, now + Duration::from_secs(6)));
        assert!(t.dial_succeeded(b));
        assert!(!t.is_ejected(b, now));
        assert_eq!(fail(), Duration::from_secs(1));
    }

    #[test]
    fn local_resource_failures_eject_nothing() {
        let (t, metrics) = counted();
        let b = addr("10.0.0.1:80");
        for _ in 0..5 {
            assert_eq!(
                t.dial_failed(b, DialErrorKind::Local, Instant::now()),
                Duration::ZERO
            );
        }
        assert!(!t.is_ejected(b, Instant::now()));
        let text = metrics.render();
        assert!(text.contains("sluice_local_dial_errors_total 5"), "{text}");
        assert!(text.contains("sluice_ejections_total 0"), "{text}");
    }

    #[test]
    fn a_timeout_while_the_backend_answers_others_ejects_nothing() {
        let (t, metrics) = counted();
        let b = addr("10.0.0.1:80");
        let _g = t.connect(b);
        // A burst: this dial's SYN is dropped by a full accept queue while
        // another dial to the same backend completes.
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(5));
        t.dial_succeeded(b);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            t.dial_failed(b, DialErrorKind::Timeout, started),
            Duration::ZERO
        );
        assert!(!t.is_ejected(b, Instant::now()), "busy, not gone");
        // A refusal is always the backend's answer.
        let started = Instant::now();
        assert_eq!(
            t.dial_failed(b, DialErrorKind::Refused, started),
            Duration::from_secs(1)
        );
        assert!(t.is_ejected(b, Instant::now()));
        let text = metrics.render();
        assert!(text.contains("sluice_ejections_total 1"), "{text}");
    }

    #[test]
    fn a_timeout_long_after_the_last_handshake_ejects() {
        let (t, _) = counted();
        let b = addr("10.0.0.1:80");
        let _g = t.connect(b);
        t.dial_succeeded(b);
        // The pod vanishes: a dial that starts later than one wait after
        // the last handshake and times out is evidence.
        std::thread::sleep(Duration::from_millis(40));
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(
            t.dial_failed(b, DialErrorKind::Timeout, started),
            Duration::from_secs(1)
        );
        assert!(t.is_ejected(b, Instant::now()));
        // A backend never connected to has no answer to show either.
        let c = addr("10.0.0.2:80");
        let _g = t.connect(c);
        assert_eq!(
            t.dial_failed(c, DialErrorKind::Timeout, Instant::now()),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn dials_already_under_way_do_not_lengthen_the_ejection() {
        let t = Tracker::new(
            cfg(Duration::from_secs(1)),
            CancellationToken::new(),
            Arc::default(),
        );
        let b = addr("10.0.0.1:80");
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        // Sixteen dials started together into a black hole fail together.
        for _ in 0..16 {
            assert_eq!(
                t.dial_failed(b, DialErrorKind::Timeout, started),
                Duration::from_secs(1)
            );
        }
    }

    #[test]
    fn after_the_cooldown_one_dial_probes_while_others_skip() {
        let t = Tracker::new(
            cfg(Duration::from_secs(1)),
            CancellationToken::new(),
            Arc::default(),
        );
        let b = addr("10.0.0.1:80");
        t.dial_failed(b, DialErrorKind::Refused, Instant::now());
        let later = Instant::now() + Duration::from_secs(2);
        assert!(!t.is_ejected(b, later), "cooldown over: pickable");
        let probe = t.connect(b);
        assert!(t.is_ejected(b, later), "a probe is under way");
        assert!(t.dial_succeeded(b));
        assert!(!t.is_ejected(b, later));
        drop(probe);
    }

    #[test]
    fn guards_count_active_connections() {
        let t = Tracker::new(
            cfg(Duration::from_secs(1)),
            CancellationToken::new(),
            Arc::default(),
        );
        let b = addr("10.0.0.1:80");
        let g1 = t.connect(b);
        let g2 = t.connect(b);
        assert_eq!(t.active(b), 2);
        drop(g1);
        assert_eq!(t.active(b), 1);
        drop(g2);
        assert_eq!(t.total_active(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_timeout_cuts_only_backends_still_draining() {
        let t = Arc::new(Tracker::new(
            cfg(Duration::from_secs(10)),
            CancellationToken::new(),
            Arc::default(),
        ));
        let (a, b) = (addr("10.0.0.1:80"), addr("10.0.0.2:80"));
        t.on_table(&mk_table(&[
            ("10.0.0.1:80", Conditions::READY),
            ("10.0.0.2:80", Conditions::READY),
        ]));
        let ga = t.connect(a);
        let gb = t.connect(b);
        // Both turn terminating; a second ready backend exists, so neither is
        // eligible any more.
        t.on_table(&mk_table(&[
            ("10.0.0.1:80", Conditions::TERMINATING),
            ("10.0.0.2:80", Conditions::TERMINATING),
            ("10.0.0.3:80", Conditions::READY),
        ]));
        assert!(t.backends.get(&a).unwrap().is_draining());
        // b comes back before the timeout: its drain is called off.
        tokio::time::sleep(Duration::from_secs(5)).await;
        t.on_table(&mk_table(&[
            ("10.0.0.2:80", Conditions::READY),
            ("10.0.0.3:80", Conditions::READY),
        ]));
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(ga.cut_token().is_cancelled(), "a drained past the timeout");
        assert!(!gb.cut_token().is_cancelled(), "b is serving again");
        // A new connection to a cut backend gets a fresh token.
        assert!(!t.connect(a).cut_token().is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn unready_or_weight_zero_backends_keep_their_connections_past_the_drain_timeout() {
        let t = Arc::new(Tracker::new(
            cfg(Duration::from_secs(1)),
            CancellationToken::new(),
            Arc::default(),
        ));
        let (a, b) = (addr("10.0.0.1:80"), addr("10.0.0.2:80"));
        t.on_table(&mk_table(&[
            ("10.0.0.1:80", Conditions::READY),
            ("10.0.0.2:80", Conditions::READY),
        ]));
        let ga = t.connect(a);
        let gb = t.connect(b);
        // a's readiness probe fails (not terminating); b is set to weight 0.
        let unready = Conditions {
            ready: false,
            serving: false,
            terminating: false,
        };
        let mut table = mk_table(&[("10.0.0.1:80", unready), ("10.0.0.3:80", Conditions::READY)]);
        let key = ListenKey::tcp(addr("127.0.0.2:80"));
        let mut zero = Backend::new(b, Conditions::READY);
        zero.weight = 0;
        table.insert(
            key,
            Arc::new(Service::new("z", Policy::RoundRobin, None, vec![zero])),
        );
        t.on_table(&table);
        assert!(!t.backends.get(&a).unwrap().is_draining());
        assert!(!t.backends.get(&b).unwrap().is_draining());
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!ga.cut_token().is_cancelled(), "unready: kept");
        assert!(!gb.cut_token().is_cancelled(), "weight 0: kept");
        // Once a terminates, its drain starts and the timeout cuts it.
        t.on_table(&mk_table(&[
            ("10.0.0.1:80", Conditions::TERMINATING),
            ("10.0.0.3:80", Conditions::READY),
        ]));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(ga.cut_token().is_cancelled(), "terminating: drained");
        assert!(
            gb.cut_token().is_cancelled(),
            "gone from the table: drained"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn late_registration_on_ineligible_backend_drains_too() {
        let t = Arc::new(Tracker::new(
            cfg(Duration::from_secs(1)),
            CancellationToken::new(),
            Arc::default(),
        ));
        t.on_table(&mk_table(&[("10.0.0.3:80", Conditions::READY)]));
        // A connection that picked 10.0.0.1 from an older table registers now.
        let g = t.connect(addr("10.0.0.1:80"));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(g.cut_token().is_cancelled());
    }

    #[test]
    fn idle_backends_that_left_the_table_are_forgotten() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let t = Arc::new(Tracker::new(
                cfg(Duration::from_secs(1)),
                CancellationToken::new(),
                Arc::default(),
            ));
            let b = addr("10.0.0.1:80");
            t.dial_failed(b, DialErrorKind::Refused, Instant::now());
            t.on_table(&mk_table(&[("10.0.0.2:80", Conditions::READY)]));
            // Never in a table: the diff does not name it, the sweep does.
            t.forget_idle();
            assert!(t.backends.get(&b).is_none());
            // One that leaves the table idle is forgotten with the diff;
            // one with a connection stays, draining, until the sweep
            // after its last connection.
            let (c, d) = (addr("10.0.0.3:80"), addr("10.0.0.4:80"));
            let two = [
                ("10.0.0.3:80", Conditions::READY),
                ("10.0.0.4:80", Conditions::READY),
            ];
            t.on_table(&mk_table(&two));
            t.dial_failed(c, DialErrorKind::Refused, Instant::now());
            let g = t.connect(d);
            t.on_table(&mk_table(&[("10.0.0.2:80", Conditions::READY)]));
            assert!(t.backends.get(&c).is_none());
            assert!(t.backends.get(&d).unwrap().is_draining());
            t.forget_idle();
            assert!(t.backends.get(&d).is_some(), "still carries a connection");
            drop(g);
            t.forget_idle();
            assert!(t.backends.get(&d).is_none());
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_two_services_list_is_kept_while_either_keeps_it() {
        let t = Arc::new(counted().0);
        let x = addr("10.0.0.1:80");
        let service = |conditions| {
            Arc::new(Service::new(
                "s",
                Policy::RoundRobin,
                None,
                vec![
                    Backend::new(x, conditions),
                    Backend::new(addr("10.0.0.9:80"), Conditions::READY),
                ],
            ))
        };
        let (k1, k2) = (
            ListenKey::tcp(addr("127.0.0.1:80")),
            ListenKey::tcp(addr("127.0.0.2:80")),
        );
        let mut both = Table::new();
        both.insert(k1, service(Conditions::READY));
        both.insert(k2, service(Conditions::READY));
        t.on_table(&both);
        let g = t.connect(x);
        // Terminating behind one key, ready behind the other: kept.
        let mut mixed = both.clone();
        mixed.insert(k1, service(Conditions::TERMINATING));
        t.on_table(&mixed);
        assert!(!t.backends.get(&x).unwrap().is_draining());
        // The key that kept it goes: only the terminating entry is left.
        let mut one = mixed.clone();
        one.remove(&k2);
        t.on_table(&one);
        assert!(t.backends.get(&x).unwrap().is_draining());
        // Ready again behind a new key: draining is called off, and the
        // drain timeout cuts nothing.
        let mut back = one.clone();
        back.insert(k2, service(Conditions::READY));
        t.on_table(&back);
        assert!(!t.backends.get(&x).unwrap().is_draining());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!g.cut_token().is_cancelled());
        // Every key goes: counted down to nothing, forgotten once idle.
        t.on_table(&Table::new());
        assert!(t.backends.get(&x).unwrap().is_draining());
        drop(g);
        t.forget_idle();
        assert!(t.backends.get(&x).is_none());
        assert!(t.follow.lock().unwrap().refs.is_empty());
    }

    #[test]
    fn shutdown_cuts_every_connection() {
        let shutdown = CancellationToken::new();
        let t = Tracker::new(
            cfg(Duration::from_secs(1)),
            shutdown.clone(),
            Arc::default(),
        );
        let g = t.connect(addr("10.0.0.1:80"));
        shutdown.cancel();
        assert!(g.cut_token().is_cancelled());
    }
}

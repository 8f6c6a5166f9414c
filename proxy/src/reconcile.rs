//! The one place that follows the published table: [`run`] subscribes
//! once, computes `TableDiff::between(previous, next)` once per publish and
//! hands it, with the table, to each [`Follower`]: the health-check
//! responders ([`HealthFollower`]), the Service IPs on a device
//! ([`VipFollower`]), the proxy's listeners, routes and tracker
//! (`server::ProxyFollower`), the pod bridges' re-read
//! (`policy_route::BridgeFollower`) and the nftables programmer
//! ([`NftFollower`]). An incomplete follower alone is retried, on its own
//! clock ([`Follower::retry_after`]); once all have a new generation, each
//! is told ([`Follower::applied`]).
//!
//! UDP follows it too: bind-mode UDP (`udp::UdpFollower`) and the
//! intercept ports (`udp_intercept::UdpIntercept`). What still watches the
//! publisher on its own is each served UDP port's task, which moves its
//! own flows off backends that left (docs/architecture.md, "Reconciler
//! split").

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use sluice_control::source::healthcheck::{self, HealthResponders};
use sluice_control::{Publisher, Snapshot, Table, TableDiff};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::metrics::Metrics;
use crate::nft::{self, Programmer, Ruleset, Synced};
use crate::udp_intercept::UdpSteering;
use crate::vip::{VipDevice, service_ips};

/// How long an incomplete follower waits before it is retried.
pub const RETRY: Duration = Duration::from_secs(5);

/// Something that keeps state equal to the live table.
pub trait Follower: Send {
    /// Brings the state to `table`; `diff` is what changed since the table
    /// of the previous call (from the empty table at the first; empty on a
    /// retry). False when incomplete: the follower is called again with
    /// the same table (and an empty diff) after [`RETRY`], or with the
    /// next table, so a follower whose last apply failed must not rely on
    /// the diff alone.
    fn apply<'a>(&'a mut self, diff: &'a TableDiff, table: &'a Table) -> BoxFuture<'a, bool>;

    /// How long after an incomplete apply this follower is retried (each
    /// incomplete follower on its own clock). [`RETRY`] unless it says.
    fn retry_after(&self) -> Duration {
        RETRY
    }

    /// Every follower has been handed the table of `generation` (a new
    /// publish; not called on a retry): what changed since the previous
    /// generation is `diff`. For what is told once per publish (the live
    /// generation gauge, the `table live` log line). Nothing by default.
    fn applied(&mut self, generation: u64, diff: &TableDiff, table: &Table) {
        let _ = (generation, diff, table);
    }
}

/// Follows the publisher until `stop` fires or the publisher is gone.
/// Nothing is applied before a source published its first table: the
/// state a previous sluice left stays as it is (still answering, adopted at
/// the first table) rather than being emptied until the first full list.
/// On `stop` the state stays as it is, for the sluice that takes over.
pub async fn run(
    publisher: Arc<Publisher>,
    mut followers: Vec<Box<dyn Follower>>,
    stop: CancellationToken,
) {
    let mut changes = publisher.subscribe();
    let mut previous = Arc::new(Table::new());
    let mut generation = None;
    // When each incomplete follower is due again (`None`: complete). Every
    // follower starts due: the first table goes to all, even when empty.
    let start = Instant::now();
    let mut due: Vec<Option<Instant>> = vec![Some(start); followers.len()];
    loop {
        let Some(snapshot) = table_to_sync(&publisher, &mut changes, &stop).await else {
            return;
        };
        let new = generation != Some(snapshot.generation);
        let diff = match new {
            true => TableDiff::between(&previous, &snapshot.table),
            false => TableDiff::default(),
        };
        let now = Instant::now();
        for (follower, due) in followers.iter_mut().zip(due.iter_mut()) {
            // A change goes to every follower; an incomplete one is also
            // called on a new (unchanged) generation and when its retry is due.
            let call = !diff.is_empty() || due.is_some_and(|at| new || at <= now);
            if !call {
                continue;
            }
            *due = match follower.apply(&diff, &snapshot.table).await {
                true => None,
                false => Some(Instant::now() + follower.retry_after()),
            };
        }
        if new {
            for follower in &mut followers {
                follower.applied(snapshot.generation, &diff, &snapshot.table);
            }
            generation = Some(snapshot.generation);
            previous = snapshot.table.clone();
        }
        let next = due.iter().flatten().min().copied();
        if !next_sync(&mut changes, next, &stop).await {
            return;
        }
    }
}

/// The table to follow next: the live one once a source has published.
/// None once `stop` fired or the publisher is gone.
async fn table_to_sync(
    publisher: &Publisher,
    changes: &mut tokio::sync::watch::Receiver<u64>,
    stop: &CancellationToken,
) -> Option<Arc<Snapshot>> {
    loop {
        let snapshot = publisher.snapshot();
        if stop.is_cancelled() {
            return None;
        }
        if snapshot.generation > 0 {
            return Some(snapshot);
        }
        if !next_change(changes, stop).await {
            return None;
        }
    }
}

/// Waits for the next table publish. False when the publisher is gone or
/// `stop` fired.
async fn next_change(
    changes: &mut tokio::sync::watch::Receiver<u64>,
    stop: &CancellationToken,
) -> bool {
    tokio::select! {
        changed = changes.changed() => changed.is_ok(),
        () = stop.cancelled() => false,
    }
}

/// Waits for the next table publish, or until `retry` (the earliest
/// incomplete follower's retry). False when the publisher is gone or
/// `stop` fired.
async fn next_sync(
    changes: &mut tokio::sync::watch::Receiver<u64>,
    retry: Option<Instant>,
    stop: &CancellationToken,
) -> bool {
    let retry = async {
        match retry {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        changed = changes.changed() => changed.is_ok(),
        _ = retry => true,
        () = stop.cancelled() => false,
    }
}

/// Keeps sluice's nftables table equal to the live table's Service
/// addresses. The desired ruleset follows the table key by key (the
/// diff), not rebuilt from all Services per publish; the programmer sends
/// only those keys' element changes. Its first sync, and any after a
/// failure, compares and rewrites the whole table (needs the whole table:
/// the ruleset is kept whole here for that).
pub struct NftFollower {
    port: u16,
    /// Transparent dials on: the mark of the `steer-replies` chain (fixed
    /// for the process's life).
    steer_mark: Option<u32>,
    /// The UDP keys' local ports, bound by the
    /// [`crate::udp_intercept::UdpIntercept`] follower that runs first.
    udp: UdpSteering,
    metrics: Arc<Metrics>,
    programmer: Programmer,
    want: Option<Ruleset>,
}

impl NftFollower {
    pub fn new(
        port: u16,
        steer_mark: Option<u32>,
        udp: UdpSteering,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            port,
            steer_mark,
            udp,
            metrics,
            programmer: Programmer::new(),
            want: None,
        }
    }

    async fn sync(&mut self, diff: &TableDiff, table: &Table) -> bool {
        let range = self.udp.range();
        let udp_ports = &self.udp.ports();
        let (want, keys) = match self.want.as_mut() {
            Some(want) => {
                let keys = nft::diff_keys(diff);
                want.update_keys(table, &keys);
                want.set_udp_ports(udp_ports);
                (&*want, keys)
            }
            None => {
                let built = Ruleset::from_table(table, self.port)
                    .with_udp(udp_ports.iter().map(|(k, p)| (k, *p)), range)
                    .with_steer_mark(self.steer_mark);
                (&*self.want.insert(built), Vec::new())
            }
        };
        // Complete only once every UDP key has its port: until then a retry
        // of the UDP follower may bind one, which this follower must steer
        // at its own retry (no table change will call it).
        let settled = !self.udp.waiting();
        match self.programmer.sync_keys(want, &keys).await {
            Ok(Synced::Unchanged) => settled,
            Ok(how) => {
                info!(
                    table = nft::TABLE,
                    elements = want.elements.len(),
                    ?how,
                    "nftables table synced"
                );
                settled
            }
            Err(e) => {
                self.metrics.nft_sync_failures.inc();
                error!(
                    table = nft::TABLE,
                    "cannot sync the nftables table; retrying in {RETRY:?}: {e}"
                );
                false
            }
        }
    }
}

impl Follower for NftFollower {
    fn apply<'a>(&'a mut self, diff: &'a TableDiff, table: &'a Table) -> BoxFuture<'a, bool> {
        Box::pin(self.sync(diff, table))
    }
}

/// Keeps the device's Service IPs equal to the live table's. Walks the
/// table's addresses at every apply (the device's own sync diffs the
/// address sets), so a retry after a partial failure needs nothing more.
pub struct VipFollower {
    device: VipDevice,
}

impl VipFollower {
    pub fn new(device: VipDevice) -> Self {
        Self { device }
    }

    async fn sync(&mut self, table: &Table) -> bool {
        let want = service_ips(table);
        let device = &mut self.device;
        match device.sync(&want).await {
            Ok(report) => {
                if !report.added.is_empty() || !report.removed.is_empty() {
                    info!(
                        device = device.name(),
                        added = ?report.added,
                        removed = ?report.removed,
                        "service IPs updated"
                    );
                }
                for failure in &report.failed {
                    warn!(device = device.name(), "{failure}");
                }
                report.is_complete()
            }
            Err(e) => {
                error!(device = device.name(), "{e}");
                false
            }
        }
    }
}

impl Follower for VipFollower {
    fn apply<'a>(&'a mut self, _diff: &'a TableDiff, table: &'a Table) -> BoxFuture<'a, bool> {
        Box::pin(self.sync(table))
    }
}

/// Keeps the `healthCheckNodePort` responders equal to the live table's
/// health checks ([`Table::health_checks`], put there by the Kubernetes
/// source): as kube-proxy's healthcheck server is fed by its proxier's
/// sync loop, not by a watch of its own. A port that cannot be bound (held
/// by the kube-proxy being replaced) makes the apply incomplete: retried
/// every [`healthcheck::RETRY`].
pub struct HealthFollower {
    responders: HealthResponders,
}

impl HealthFollower {
    pub fn new(responders: HealthResponders) -> Self {
        Self { responders }
    }
}

impl Follower for HealthFollower {
    fn apply<'a>(&'a mut self, _diff: &'a TableDiff, table: &'a Table) -> BoxFuture<'a, bool> {
        Box::pin(self.responders.follow(table))
    }

    fn retry_after(&self) -> Duration {
        healthcheck::RETRY
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_control::{ListenKey, Policy, Service};
    use std::sync::Mutex;

    /// What a follower was called with: keys added, removed, changed, and
    /// the table's size.
    type Call = (usize, usize, usize, usize);

    /// Records its calls; answers from `results` (true once they run out).
    struct Recorder {
        calls: Arc<Mutex<Vec<Call>>>,
        results: Vec<bool>,
        retry: Duration,
        /// The generations told applied, with their diff's size.
        applied: Arc<Mutex<Vec<(u64, usize)>>>,
    }

    impl Follower for Recorder {
        fn retry_after(&self) -> Duration {
            self.retry
        }

        fn applied(&mut self, generation: u64, diff: &TableDiff, _table: &Table) {
            let size = diff.added.len() + diff.removed.len() + diff.changed.len();
            self.applied.lock().unwrap().push((generation, size));
        }

        fn apply<'a>(&'a mut self, diff: &'a TableDiff, table: &'a Table) -> BoxFuture<'a, bool> {
            let call = (
                diff.added.len(),
                diff.removed.len(),
                diff.changed.len(),
                table.len(),
            );
            self.calls.lock().unwrap().push(call);
            let ok = if self.results.is_empty() {
                true
            } else {
                self.results.remove(0)
            };
            Box::pin(async move { ok })
        }
    }

    impl Recorder {
        /// Retried after `retry` when incomplete.
        fn new(results: Vec<bool>, retry: Duration) -> Self {
            Self {
                calls: Arc::default(),
                results,
                retry,
                applied: Arc::default(),
            }
        }
    }

    fn recorder(results: Vec<bool>) -> (Box<dyn Follower>, Arc<Mutex<Vec<Call>>>) {
        let r = Recorder::new(results, RETRY);
        let calls = r.calls.clone();
        (Box::new(r), calls)
    }

    fn table(ports: &[u16]) -> Table {
        let mut t = Table::new();
        for port in ports {
            let svc = Service::new("svc", Policy::RoundRobin, None, Vec::new());
            t.insert(
                ListenKey::tcp(([10, 96, 0, 1], *port).into()),
                Arc::new(svc),
            );
        }
        t
    }

    /// Lets the reconcile task run until it waits again.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_publish_is_one_diff_handed_to_every_follower() {
        let publisher = Arc::new(Publisher::new());
        let (a, calls_a) = recorder(Vec::new());
        let (b, calls_b) = recorder(Vec::new());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(publisher.clone(), vec![a, b], stop.clone()));
        settle().await;
        // Nothing before the first table: what a previous sluice left stays.
        assert!(calls_a.lock().unwrap().is_empty());
        publisher.publish_changed(table(&[80, 443]));
        settle().await;
        publisher.publish_changed(table(&[80]));
        settle().await;
        let want = vec![(2, 0, 0, 2), (0, 1, 0, 1)];
        assert_eq!(*calls_a.lock().unwrap(), want);
        assert_eq!(*calls_b.lock().unwrap(), want);
        // A quiet minute: no call (no retry is pending).
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(calls_a.lock().unwrap().len(), 2);
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn each_incomplete_follower_is_retried_on_its_own_clock() {
        let publisher = Arc::new(Publisher::new());
        // Fails at the table and at the first two retries.
        let fast = Recorder::new(vec![false, false, false], Duration::from_secs(1));
        let calls_fast = fast.calls.clone();
        let (slow, calls_slow) = recorder(vec![false]);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            publisher.clone(),
            vec![Box::new(fast), slow],
            stop.clone(),
        ));
        publisher.publish_changed(table(&[80]));
        settle().await;
        let count = |c: &Arc<Mutex<Vec<Call>>>| c.lock().unwrap().len();
        assert_eq!((count(&calls_fast), count(&calls_slow)), (1, 1));
        // The 1 s follower is retried each second, the other not yet.
        for n in 2..=4 {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            settle().await;
            assert_eq!((count(&calls_fast), count(&calls_slow)), (n, 1));
        }
        // The fast one is complete since its fourth call (3 s); the slow
        // one is retried at 5 s, alone.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        settle().await;
        assert_eq!((count(&calls_fast), count(&calls_slow)), (4, 1));
        tokio::time::sleep(Duration::from_millis(600)).await;
        settle().await;
        assert_eq!((count(&calls_fast), count(&calls_slow)), (4, 2));
        assert_eq!(calls_slow.lock().unwrap()[1], (0, 0, 0, 1));
        tokio::time::sleep(RETRY * 3).await;
        assert_eq!((count(&calls_fast), count(&calls_slow)), (4, 2));
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn every_new_generation_is_told_once_after_all_applied_it() {
        let publisher = Arc::new(Publisher::new());
        let failing_once = Recorder::new(vec![false], Duration::from_secs(1));
        let (calls, applied) = (failing_once.calls.clone(), failing_once.applied.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            publisher.clone(),
            vec![Box::new(failing_once)],
            stop.clone(),
        ));
        publisher.publish_changed(table(&[80, 443]));
        settle().await;
        // The retry (a second call) is not a new generation.
        tokio::time::sleep(Duration::from_secs(2)).await;
        settle().await;
        assert_eq!(calls.lock().unwrap().len(), 2);
        // An equal table under a new generation: told, with an empty diff,
        // though no follower had anything to apply.
        publisher.publish_changed(table(&[80, 443]));
        settle().await;
        publisher.publish_changed(table(&[80]));
        settle().await;
        assert_eq!(*applied.lock().unwrap(), [(1, 2), (2, 0), (3, 1)]);
        assert_eq!(
            calls.lock().unwrap().len(),
            3,
            "the empty diff was not applied"
        );
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_incomplete_follower_alone_is_retried_with_the_same_table() {
        let publisher = Arc::new(Publisher::new());
        let (failing, calls_f) = recorder(vec![false, false]);
        let (fine, calls_ok) = recorder(Vec::new());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(publisher.clone(), vec![failing, fine], stop.clone()));
        publisher.publish_changed(table(&[80, 443]));
        settle().await;
        assert_eq!(calls_f.lock().unwrap().len(), 1);
        tokio::time::sleep(RETRY + Duration::from_millis(10)).await;
        settle().await;
        // Retried with an empty diff and the whole table; the complete one
        // is left alone.
        assert_eq!(*calls_f.lock().unwrap(), [(2, 0, 0, 2), (0, 0, 0, 2)]);
        assert_eq!(calls_ok.lock().unwrap().len(), 1);
        // Still failing: a new table reaches both, with its diff.
        publisher.publish_changed(table(&[80]));
        settle().await;
        assert_eq!(calls_f.lock().unwrap().last(), Some(&(0, 1, 0, 1)));
        assert_eq!(calls_ok.lock().unwrap().last(), Some(&(0, 1, 0, 1)));
        // That apply succeeded: no more retries.
        tokio::time::sleep(RETRY * 3).await;
        assert_eq!(calls_f.lock().unwrap().len(), 3);
        stop.cancel();
        task.await.unwrap();
    }
}

//! `sluice-bench control`: the Kubernetes index at scale.
//!
//! Builds the index for `--services` Services with `--endpoints` endpoints
//! each (one EndpointSlice per Service), then applies `--updates`
//! single-slice updates (one endpoint of one Service replaced each time) and
//! prints: initial build time, time and allocations per single-slice update
//! (apply + incremental build + publish), table publish time, the proxy's
//! per-publish diff time, JSON decode time of one slice, and resident memory.
//! As root with `nft`, also the time to apply one Service change to
//! sluice's nftables table at that size (over netlink and with `nft -f`)
//! and a full sync, in a throwaway network namespace (`--nft-changes`).
//!
//! Allocations are counted by a counting global allocator declared in this
//! module (it wraps the system allocator with two relaxed atomic adds; it is
//! the bench binary's allocator for every subcommand).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sluice_control::Publisher;
use sluice_control::k8s::Index;
use sluice_control::table::TableDiff;

/// `println!` that ignores a closed stdout (`| head`) instead of panicking.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

/// Counts allocations (and reallocations) and bytes requested.
pub struct CountingAlloc;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static ALLOC_BYTES: AtomicU64 = AtomicU64::new(0);
static FREED_BYTES: AtomicU64 = AtomicU64::new(0);

fn freed(size: usize) {
    FREED_BYTES.fetch_add(u64::try_from(size).unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// Bytes allocated and not yet freed.
fn live_heap() -> u64 {
    ALLOC_BYTES
        .load(Ordering::Relaxed)
        .saturating_sub(FREED_BYTES.load(Ordering::Relaxed))
}

fn count(size: usize) {
    ALLOCS.fetch_add(1, Ordering::Relaxed);
    ALLOC_BYTES.fetch_add(u64::try_from(size).unwrap_or(u64::MAX), Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged; counting touches only atomics.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        freed(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        freed(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn allocs() -> (u64, u64) {
    (
        ALLOCS.load(Ordering::Relaxed),
        ALLOC_BYTES.load(Ordering::Relaxed),
    )
}

/// Options of `sluice-bench control`.
#[derive(Debug, Clone, Args)]
pub struct ControlArgs {
    /// Number of Services (one TCP port, one EndpointSlice each).
    #[arg(long, default_value_t = 10_000)]
    pub services: u32,
    /// Endpoints per Service.
    #[arg(long, default_value_t = 10)]
    pub endpoints: u32,
    /// Single-slice updates to apply and measure.
    #[arg(long, default_value_t = 2_000)]
    pub updates: u32,
    /// Service changes (one Service's endpoints gone, then back) to apply
    /// to sluice's nftables table in a throwaway network namespace, over
    /// netlink and with `nft -f`, plus full syncs (needs root, `ip` and
    /// `nft`; skipped otherwise). 0: skip.
    #[arg(long, default_value_t = 200)]
    pub nft_changes: u32,
}

fn ip4(n: u32) -> String {
    let [a, b, c, d] = n.to_be_bytes();
    format!("{a}.{b}.{c}.{d}")
}

fn mk_service(i: u32) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some(format!("ns{}", i % 100)),
            name: Some(format!("svc{i}")),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip4((10 << 24) | (96 << 16) | i)),
            cluster_ips: Some(vec![ip4((10 << 24) | (96 << 16) | i)]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// The slice of Service `i`; `version` shifts one endpoint's address so that
/// each update is a real change.
fn mk_slice(i: u32, endpoints: u32, version: u32) -> EndpointSlice {
    let eps = (0..endpoints)
        .map(|e| {
            let host = if version > 0 && e == version % endpoints {
                (11 << 24) | (version & 0x00ff_ffff)
            } else {
                (12 << 24) | (i * endpoints + e)
            };
            Endpoint {
                addresses: vec![ip4(host)],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                node_name: Some(format!("node{}", e % 50)),
                ..Default::default()
            }
        })
        .collect();
    EndpointSlice {
        metadata: ObjectMeta {
            namespace: Some(format!("ns{}", i % 100)),
            name: Some(format!("svc{i}-abcde")),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_owned(),
                format!("svc{i}"),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(eps),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            app_protocol: None,
        }]),
    }
}

/// `VmRSS` and `VmHWM` of this process, in KiB.
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU time this thread has used (immune to time spent preempted on a
/// busy machine).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn summary(h: &Histogram<u64>) -> String {
    format!(
        "p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    )
}

/// Runs the scale bench and prints its figures.
pub fn run(args: ControlArgs) -> anyhow::Result<()> {
    // Cluster IPs are 10.96.x.y: at most 65535 Services.
    crate::check::in_range("--services", args.services, 1..=65_535)?;
    anyhow::ensure!(args.endpoints > 0, "--endpoints must be at least 1");
    let (a0, _) = allocs();
    let probe = Box::new(1u64);
    let counting = allocs().0 > a0;
    drop(probe);

    let (rss_start, _) = rss_kib();
    let services: Vec<Service> = (0..args.services).map(mk_service).collect();
    let slices: Vec<EndpointSlice> = (0..args.services)
        .map(|i| mk_slice(i, args.endpoints, 0))
        .collect();

    // Initial build: the first full list of both kinds.
    let publisher = Publisher::new();
    let mut index = Index::new(Some("node0".into()), vec![]);
    let (a0, b0) = allocs();
    let t0 = Instant::now();
    let errs = index.reset(&services, &[]);
    anyhow::ensure!(errs.is_empty(), "malformed services: {errs:?}");
    let errs = index.reset(&slices, &[]);
    anyhow::ensure!(errs.is_empty(), "malformed slices: {errs:?}");
    index.build();
    publisher.publish_changed(index.table().clone());
    let initial = t0.elapsed();
    let (a1, b1) = allocs();
    anyhow::ensure!(
        index.table().len() == args.services as usize,
        "expected {} entries, got {}",
        args.services,
        index.table().len()
    );
    drop(services);
    drop(slices);
    let (rss_built, _) = rss_kib();
    let heap_built = live_heap();

    // Single-slice updates: apply + incremental build + clone + publish.
    let updates: Vec<EndpointSlice> = (1..=args.updates)
        .map(|v| mk_slice(v.wrapping_mul(7919) % args.services, args.endpoints, v))
        .collect();
    let encoded: Vec<Vec<u8>> = updates
        .iter()
        .map(serde_json::to_vec)
        .collect::<Result<_, _>>()
        .context("encoding slices")?;
    let mut h_update = Histogram::<u64>::new(3)?;
    let mut h_publish = Histogram::<u64>::new(3)?;
    let mut h_diff = Histogram::<u64>::new(3)?;
    let mut diff_changed = 0usize;
    let (a2, b2) = allocs();
    let cpu0 = thread_cpu();
    for slice in &updates {
        let t = Instant::now();
        index
            .apply(slice)
            .map_err(|e| anyhow::anyhow!("update rejected: {e}"))?;
        let changed = index.build();
        anyhow::ensure!(changed, "an update changed nothing");
        let table = index.table().clone();
        let tp = Instant::now();
        publisher.publish_changed(table);
        let done = Instant::now();
        h_update.record(ns(done - t).max(1))?;
        h_publish.record(ns(done - tp).max(1))?;
    }
    let update_cpu = thread_cpu().saturating_sub(cpu0);
    let (a3, b3) = allocs();

    // Publish with the full equality check of an equal table (it shares
    // structure with the live one, as the index's tables do).
    let t = Instant::now();
    let same = publisher.publish(index.table().clone());
    let equal_publish = t.elapsed();
    anyhow::ensure!(same.is_none(), "an equal table was published as a change");

    // The proxy's per-publish diff between consecutive tables (not counted
    // above; it runs on the proxy side).
    let mut prev = publisher.load();
    // The proxy's tracker follows the same diffs (Tracker::on_diff: only
    // the changed Services' backends), against a whole walk of every
    // backend (what Tracker::on_table did per publish before).
    let tracker = Arc::new(sluice_proxy::tracker::Tracker::new(
        sluice_proxy::tracker::TrackerConfig {
            eject_base: Duration::from_secs(1),
            eject_max: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
        },
        Default::default(),
        Arc::default(),
    ));
    tracker.on_table(&prev);
    let mut h_tracker = Histogram::<u64>::new(3)?;
    let mut h_walk = Histogram::<u64>::new(3)?;
    for slice in updates.iter().take(200) {
        let mut s = slice.clone();
        if let Some(eps) = s.endpoints.as_mut().and_then(|e| e.first_mut()) {
            eps.conditions = Some(EndpointConditions {
                ready: Some(false),
                serving: Some(true),
                terminating: Some(true),
            });
        }
        index
            .apply(&s)
            .map_err(|e| anyhow::anyhow!("update rejected: {e}"))?;
        index.build();
        let next = Arc::new(index.table().clone());
        let t = Instant::now();
        let d = TableDiff::between(&prev, &next);
        h_diff.record(ns(t.elapsed()).max(1))?;
        diff_changed += d.changed.len();
        let t = Instant::now();
        tracker.on_diff(&d, &next);
        h_tracker.record(ns(t.elapsed()).max(1))?;
        let t = Instant::now();
        let walked: std::collections::HashSet<std::net::SocketAddr> = (next.iter())
            .flat_map(|(_, s)| s.backends().iter().map(|b| b.addr))
            .collect();
        h_walk.record(ns(t.elapsed()).max(1))?;
        anyhow::ensure!(walked.len() == tracker.listed(), "the tracker lost count");
        prev = next;
    }

    // JSON decode of one slice (what the watcher does per event).
    let (a4, _) = allocs();
    let t = Instant::now();
    for bytes in &encoded {
        // As the source decodes: JSON value first (so that an undecodable
        // object is still named), then the typed slice.
        let v: serde_json::Value = serde_json::from_slice(bytes).context("decoding a slice")?;
        let s = <EndpointSlice as serde::Deserialize>::deserialize(&v).context("typing a slice")?;
        std::hint::black_box(s);
    }
    let decode = t.elapsed();
    let (a5, _) = allocs();

    let nft = nft_figures(&mut index, &args)?;

    let (rss_end, hwm) = rss_kib();
    let n = u64::from(args.updates.max(1));
    say!(
        "sluice-bench control: {} services x {} endpoints ({} endpoints), {} single-slice updates",
        args.services,
        args.endpoints,
        u64::from(args.services) * u64::from(args.endpoints),
        args.updates
    );
    let alloc_note = |count: u64, bytes: u64| {
        if counting {
            format!("{count} allocations, {} KiB", bytes / 1024)
        } else {
            "allocations not measured (CountingAlloc is not the global allocator)".to_owned()
        }
    };
    say!(
        "initial build (list of both kinds -> index -> table -> publish): {:.1} ms, {}",
        initial.as_secs_f64() * 1e3,
        alloc_note(a1 - a0, b1 - b0)
    );
    say!(
        "single-slice update (apply + incremental build + publish): {}",
        summary(&h_update)
    );
    say!(
        "  CPU time per update (thread CPU clock, mean): {:.1} µs",
        update_cpu.as_secs_f64() * 1e6 / n as f64
    );
    say!(
        "  allocations per update: {}",
        if counting {
            format!(
                "{:.1} allocations, {:.0} bytes",
                (a3 - a2) as f64 / n as f64,
                (b3 - b2) as f64 / n as f64
            )
        } else {
            alloc_note(0, 0)
        }
    );
    say!("table publish (publish_changed): {}", summary(&h_publish));
    say!(
        "Publisher::publish of an equal table (full equality check, structure shared): {:.1} µs",
        equal_publish.as_secs_f64() * 1e6
    );
    say!(
        "proxy-side TableDiff::between consecutive tables: {} ({} changed entries over {} diffs)",
        summary(&h_diff),
        diff_changed,
        h_diff.len()
    );
    say!(
        "proxy-side Tracker::on_diff per publish: {}; a walk of every backend instead: {}",
        summary(&h_tracker),
        summary(&h_walk)
    );
    say!(
        "JSON decode of one {}-endpoint slice (watcher side, value then typed): {:.1} µs, {:.1} allocations",
        args.endpoints,
        decode.as_secs_f64() * 1e6 / encoded.len().max(1) as f64,
        if counting {
            (a5 - a4) as f64 / encoded.len().max(1) as f64
        } else {
            f64::NAN
        }
    );
    if counting {
        say!(
            "live heap after initial build (index + table, objects dropped): {} MiB",
            heap_built / (1024 * 1024)
        );
    }
    say!(
        "resident memory: {} MiB at start, {} MiB after initial build (objects dropped), {} MiB at end, peak {} MiB",
        rss_start / 1024,
        rss_built / 1024,
        rss_end / 1024,
        hwm / 1024
    );
    let p99 = h_update.value_at_quantile(0.99);
    say!(
        "target: single-slice update < 1 ms: {} (p99 {:.1} µs)",
        if p99 < 1_000_000 { "met" } else { "NOT met" },
        p99 as f64 / 1000.0
    );
    nft.print(args.services);
    Ok(())
}

/// What [`nft_figures`] measured (or why it did not). Built once per run:
/// its size does not matter.
#[allow(clippy::large_enum_variant)]
enum NftFigures {
    Skipped(String),
    Measured {
        /// Per change, table to kernel, as sluice does it: TableDiff, the
        /// ruleset updated at its keys, their ops as one netlink batch.
        netlink: Histogram<u64>,
        /// Of which TableDiff + `Ruleset::update_keys` (no kernel).
        ruleset: Histogram<u64>,
        /// Per change as before: `Ruleset::from_table`, whole-ruleset diff,
        /// `nft -f`.
        script: Histogram<u64>,
        /// A first sync from an empty namespace, and the adoption of an
        /// existing table (flush and refill in one `nft -f`).
        first_sync: Duration,
        resync: Duration,
    },
}

impl NftFigures {
    fn print(&self, services: u32) {
        match self {
            NftFigures::Skipped(why) => say!("nftables table: not measured ({why})"),
            NftFigures::Measured {
                netlink,
                ruleset,
                script,
                first_sync,
                resync,
            } => {
                say!(
                    "nftables, one Service change at {services} Services (endpoints gone or back: one element deleted, one added), {} changes:",
                    netlink.len()
                );
                say!(
                    "  TableDiff, ruleset updated at its keys, one netlink batch: {}",
                    summary(netlink)
                );
                say!(
                    "    of which TableDiff + Ruleset::update_keys: {}",
                    summary(ruleset)
                );
                say!(
                    "  before: Ruleset::from_table, whole-ruleset diff, nft -f: {}",
                    summary(script)
                );
                say!(
                    "  full sync: {:.1} ms into an empty namespace, {:.1} ms adopting the table (flush and refill, nft -f)",
                    first_sync.as_secs_f64() * 1e3,
                    resync.as_secs_f64() * 1e3
                );
                let p99 = netlink.value_at_quantile(0.99);
                say!(
                    "target: one Service change applied < 5 ms: {} (p99 {:.1} µs)",
                    if p99 < 5_000_000 { "met" } else { "NOT met" },
                    p99 as f64 / 1000.0
                );
            }
        }
    }
}

/// Times sluice's nftables programmer at the index's table size, in a
/// throwaway network namespace: a full sync, then `--nft-changes` Service
/// changes (a Service's endpoints gone, then back: its key moves from
/// `service-ips` to `no-endpoint-services` and back) applied over netlink,
/// the same changes with `nft -f`, and the adoption of the existing table.
fn nft_figures(index: &mut Index, args: &ControlArgs) -> anyhow::Result<NftFigures> {
    use sluice_proxy::nft::{Programmer, Ruleset, Synced, diff_keys};
    if args.nft_changes == 0 {
        return Ok(NftFigures::Skipped("--nft-changes 0".into()));
    }
    if let Some(why) = sluice_testkit::netns::unusable(&["ip", "nft"]) {
        return Ok(NftFigures::Skipped(why));
    }
    let base = index.table().clone();
    let mut tables = Vec::new();
    // An even count: the last change puts the table back to `base`.
    for c in 0..args.nft_changes.next_multiple_of(2) {
        let i = (c / 2).wrapping_mul(7919).wrapping_add(13) % args.services;
        let endpoints = if c % 2 == 0 { 0 } else { args.endpoints };
        index
            .apply(&mk_slice(i, endpoints, 0))
            .map_err(|e| anyhow::anyhow!("update rejected: {e}"))?;
        index.build();
        tables.push(index.table().clone());
    }
    let netns =
        sluice_testkit::netns::Netns::new(format!("sluice-bench-nft-{}", std::process::id()))?;
    const PORT: u16 = 10261;
    let measured = netns.block_on(Duration::from_secs(600), move || async move {
        let mut netlink = Histogram::<u64>::new(3)?;
        let mut ruleset = Histogram::<u64>::new(3)?;
        let mut script = Histogram::<u64>::new(3)?;
        let want = Ruleset::from_table(&base, PORT);
        let t = Instant::now();
        let mut fast = Programmer::new();
        anyhow::ensure!(fast.sync(&want).await? == Synced::Full);
        let first_sync = t.elapsed();
        // As sluice follows the table: the publish's TableDiff, the
        // ruleset updated at those keys, their element changes sent.
        let mut want = want;
        let mut previous = &base;
        for table in &tables {
            let t = Instant::now();
            let keys = diff_keys(&TableDiff::between(previous, table));
            want.update_keys(table, &keys);
            ruleset.record(ns(t.elapsed()).max(1))?;
            let how = fast.sync_keys(&want, &keys).await?;
            netlink.record(ns(t.elapsed()).max(1))?;
            anyhow::ensure!(
                how == Synced::Updated {
                    added: 1,
                    deleted: 1
                },
                "{how:?}"
            );
            previous = table;
        }
        let applied = want;
        let t = Instant::now();
        let mut slow = Programmer::script_only();
        anyhow::ensure!(slow.sync(&applied).await? == Synced::Full);
        let resync = t.elapsed();
        for table in &tables {
            let t = Instant::now();
            let want = Ruleset::from_table(table, PORT);
            let how = slow.sync(&want).await?;
            script.record(ns(t.elapsed()).max(1))?;
            anyhow::ensure!(
                how == Synced::Updated {
                    added: 1,
                    deleted: 1
                },
                "{how:?}"
            );
        }
        Ok(NftFigures::Measured {
            netlink,
            ruleset,
            script,
            first_sync,
            resync,
        })
    })??;
    Ok(measured)
}

//! The rolling-update scenario on loopback: old backends replaced one by
//! one by new ones while open-loop clients with reused source ports go
//! through sluice, and the table (sluice's config file) follows the world
//! `--lag` late, on the schedule of [`crate::plan`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::backend::Backend;
use crate::check;
use crate::plan::{self, Action, Death, RolloutArgs, SLUICE_LOG};
use crate::report::{self, Event, Second, Summary};
use crate::sluice::{self, BackendCfg, Config, LogCounts, MetricsSummary, Sluice, StopReport};
use crate::workload::{LoadSpec, PortPool, open_loop};

/// What `--json` prints.
#[derive(Debug, Serialize)]
struct RolloutReport {
    scenario: &'static str,
    #[serde(flatten)]
    summary: Summary,
    local_bind_failures: u64,
    /// Connections open at an old backend when it died, aborted by it with
    /// RST: a client error no L4 proxy can hide (the pod died mid-response).
    aborted_by_dying_backends: u64,
    rate: f64,
    duration_s: f64,
    lag_s: f64,
    grace_s: f64,
    death: Death,
    backends: u8,
    source_ports: u16,
    sluice_path: String,
    table_writes: usize,
    generations_live: usize,
    max_apply_ms: f64,
    sluice_stop: StopReport,
    /// Dial outcomes from sluice's debug log (zeros if not logged).
    sluice_log: LogCounts,
    /// sluice's own counters (/metrics), scraped before SIGTERM.
    sluice_metrics: Option<MetricsSummary>,
    /// What each backend itself counted: requests answered, connections
    /// aborted by its death.
    backend_counts: BTreeMap<String, BackendCount>,
    events: Vec<Event>,
    timeline: Vec<Second>,
    pass: bool,
}

#[derive(Debug, Serialize)]
struct BackendCount {
    address: SocketAddr,
    requests: u64,
    aborted: u64,
}

fn old_addr(i: usize) -> SocketAddr {
    SocketAddr::new(sluice::lo_in(1, i + 1), 0)
}

fn new_addr(i: usize) -> SocketAddr {
    SocketAddr::new(sluice::lo_in(2, i + 1), 0)
}

fn random_base() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    20000 + (h.finish() % 10000) as u16
}

pub async fn run(args: RolloutArgs) -> Result<ExitCode> {
    let lag: Duration = args.lag.into();
    let grace: Duration = args.grace.into();
    let warmup: Duration = args.warmup.into();
    plan::check_lag(lag)?;
    check::positive_at_most("--rate", args.rate, 50_000.0)?;
    check::in_range("--backends", args.backends, 1..=200)?;
    let n = args.backends as usize;
    let schedule = plan::plan(n, warmup, lag, grace);
    let last = schedule.last().map(|p| p.at).unwrap_or(warmup);
    let duration = plan::load_duration(args.duration, last)?;

    let bin = sluice::locate(args.sluice.sluice.as_deref())?;
    let mut olds = Vec::with_capacity(n);
    for i in 0..n {
        olds.push(Backend::start(&format!("old-{}", i + 1), old_addr(i)).await?);
    }
    let listen = SocketAddr::new(
        sluice::lo(1),
        sluice::free_port(std::net::Ipv4Addr::LOCALHOST)?,
    );
    let mut table: Vec<BackendCfg> = olds.iter().map(|b| BackendCfg::ready(b.addr())).collect();
    let mut sluice = Sluice::start_with(
        &bin,
        &args.sluice,
        &[],
        &Config::from(sluice::ServiceCfg::new("rollout", listen, table.clone())),
        listen,
        Some(SLUICE_LOG),
        &[],
    )
    .await?;

    let base = args.source_port_base.unwrap_or_else(random_base);
    let pool = PortPool::new(base, args.source_ports)?;
    let spec = Arc::new(LoadSpec {
        targets: vec![listen],
        pool: Some(pool),
        timeout: args.client_timeout.into(),
        max_inflight: 10_000,
    });
    if !args.json {
        outln!(
            "rollout: {n} old -> {n} new backends, {} conn/s open loop for {:.1}s, lag {}s, grace {}s, death {:?}, source ports {}..{}",
            args.rate,
            duration.as_secs_f64(),
            lag.as_secs_f64(),
            grace.as_secs_f64(),
            args.death,
            base,
            u32::from(base) + u32::from(args.source_ports) - 1
        );
        outln!(
            "sluice: {} (pid {}) listening on {listen}, config and log in {}",
            bin.display(),
            sluice.pid(),
            sluice.dir().display()
        );
    }
    let t0 = Instant::now() + Duration::from_millis(50);
    let load = tokio::spawn(open_loop(spec, args.rate, duration, t0));

    let mut events = Vec::new();
    let mut news: Vec<Option<Backend>> = (0..n).map(|_| None).collect();
    let mut writes: Vec<(Instant, u64)> = Vec::new();
    let mut k = 0;
    while k < schedule.len() {
        let at = schedule[k].at;
        tokio::time::sleep_until((t0 + at).into()).await;
        let mut dirty = false;
        while k < schedule.len() && schedule[k].at == at {
            let action = schedule[k].action;
            k += 1;
            let what = match action {
                Action::StartNew(i) => {
                    let b = Backend::start(&format!("new-{}", i + 1), new_addr(i)).await?;
                    let w = format!("world: new-{} up at {}", i + 1, b.addr());
                    news[i] = Some(b);
                    w
                }
                Action::WorldTerminating(i) => format!("world: old-{} terminating", i + 1),
                Action::Kill(i) => match args.death {
                    Death::Refuse => {
                        olds[i].kill();
                        format!("world: old-{} dies (listener closed, conns RST)", i + 1)
                    }
                    Death::Blackhole => {
                        olds[i].kill_blackhole().await?;
                        format!("world: old-{} vanishes (conns RST, SYNs dropped)", i + 1)
                    }
                },
                Action::TableAdd(i) => {
                    let addr = news[i]
                        .as_ref()
                        .map(Backend::addr)
                        .context("new backend missing")?;
                    table.push(BackendCfg::ready(addr));
                    dirty = true;
                    format!("table: +new-{}", i + 1)
                }
                Action::TableTerminating(i) => {
                    let addr = olds[i].addr();
                    for b in table.iter_mut().filter(|b| b.address == addr) {
                        *b = BackendCfg::terminating(addr);
                    }
                    dirty = true;
                    format!("table: old-{} terminating", i + 1)
                }
                Action::TableRemove(i) => {
                    let addr = olds[i].addr();
                    table.retain(|b| b.address != addr);
                    dirty = true;
                    format!("table: -old-{}", i + 1)
                }
            };
            events.push(Event::new(t0.elapsed(), what));
        }
        if dirty {
            let before = sluice.generation();
            sluice
                .update(&Config::from(sluice::ServiceCfg::new(
                    "rollout",
                    listen,
                    table.clone(),
                )))
                .with_context(|| format!("updating sluice's config\n{}", sluice.log_tail(20)))?;
            writes.push((Instant::now(), before));
        }
    }
    let result = load.await.context("load task")?;
    // Let the last generation show in the log before reading it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let seen = sluice.generations_seen();
    let after_t0: Vec<(Instant, u64)> = seen.iter().copied().filter(|(t, _)| *t >= t0).collect();
    for (t, g) in &after_t0 {
        events.push(Event::new(
            t.duration_since(t0),
            format!("sluice: table live generation={g}"),
        ));
    }
    events.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    let mut max_apply = Duration::ZERO;
    let mut unapplied = 0;
    for (w, before) in &writes {
        match seen.iter().find(|(t, g)| *t >= *w && *g > *before) {
            Some((t, _)) => max_apply = max_apply.max(t.duration_since(*w)),
            None => unapplied += 1,
        }
    }
    let running = sluice.running();
    let sluice_metrics = sluice.scrape_metrics().await;
    let stop = sluice.stop(Duration::from_secs(10)).await;
    let sluice_log = sluice.log_counts();

    let summary = report::summarize(&result.records, result.elapsed);
    let backend_counts: BTreeMap<String, BackendCount> = olds
        .iter()
        .chain(news.iter().flatten())
        .map(|b| {
            (
                b.id().to_string(),
                BackendCount {
                    address: b.addr(),
                    requests: b.stats().requests.load(Ordering::Relaxed),
                    aborted: b.stats().aborted.load(Ordering::Relaxed),
                },
            )
        })
        .collect();
    let seconds = duration.as_secs_f64().ceil() as u64;
    let timeline = report::timeline(&result.records, &events, seconds);
    let client_ok = summary.error_total == 0 || args.allow_errors;
    let sluice_ok = running && stop.clean && unapplied == 0;
    let pass = client_ok && sluice_ok && summary.attempted > 0;
    let aborted: u64 = olds
        .iter()
        .map(|b| b.stats().aborted.load(Ordering::Relaxed))
        .sum();

    if args.json {
        let r = RolloutReport {
            scenario: "rollout",
            summary: summary.clone(),
            local_bind_failures: result.local_bind_failures,
            aborted_by_dying_backends: aborted,
            rate: args.rate,
            duration_s: duration.as_secs_f64(),
            lag_s: lag.as_secs_f64(),
            grace_s: grace.as_secs_f64(),
            death: args.death,
            backends: args.backends,
            source_ports: args.source_ports,
            sluice_path: bin.display().to_string(),
            table_writes: writes.len(),
            generations_live: after_t0.len(),
            max_apply_ms: (max_apply.as_secs_f64() * 1e6).round() / 1e3,
            sluice_stop: stop.clone(),
            sluice_log: sluice_log.clone(),
            sluice_metrics: sluice_metrics.clone(),
            backend_counts,
            events,
            timeline,
            pass,
        };
        outln!("{}", serde_json::to_string(&r)?);
    } else {
        out!("{}", report::timeline_text(&timeline));
        out!("{}", report::summary_text("through sluice", &summary));
        outln!(
            "local bind failures: {} (not client-visible)",
            result.local_bind_failures
        );
        let counts: Vec<String> = backend_counts
            .iter()
            .map(|(id, c)| format!("{id}@{}={} (aborted {})", c.address, c.requests, c.aborted))
            .collect();
        outln!("backends answered: {}", counts.join(" "));
        outln!(
            "sluice (/metrics): {} dials failed and were retried, {} client connections needed a retry, {} clients reset for lack of a backend",
            sluice_log.dial_failures,
            sluice_log.retried_connections,
            sluice_log.no_backend_left
        );
        match &sluice_metrics {
            Some(m) => outln!(
                "sluice metrics: accepted {}, dial failures {:?}, dial retries {}, ejections {}, closed {:?}",
                m.connections_accepted,
                m.dial_failures,
                m.dial_retries,
                m.backend_ejections,
                m.connections_closed
            ),
            None => outln!("sluice metrics: not available"),
        }
        outln!(
            "sluice: {} table writes, {} generations went live, max write->live {:.1} ms; SIGTERM -> exit {:?} in {:.2}s{}",
            writes.len(),
            after_t0.len(),
            max_apply.as_secs_f64() * 1e3,
            stop.exit_code,
            stop.stop_s,
            if stop.killed {
                " (had to be killed)"
            } else {
                ""
            }
        );
    }
    if !pass {
        let mut why = Vec::new();
        if summary.error_total > 0 {
            why.push(format!(
                "{} client-visible errors ({} connections were open at a dying backend and aborted by it with RST: those no proxy can hide)",
                summary.error_total, aborted
            ));
        }
        if !running {
            why.push("sluice exited during the run".to_string());
        }
        if !stop.clean {
            why.push(format!("sluice did not exit 0 on SIGTERM ({stop:?})"));
        }
        if unapplied > 0 {
            why.push(format!("{unapplied} table writes never went live"));
        }
        if summary.attempted == 0 {
            why.push("no connection was attempted".to_string());
        }
        eprintln!("rollout FAILED: {}", why.join("; "));
        eprint!("{}", sluice.log_tail(40));
        return Ok(ExitCode::from(1));
    }
    if !args.json {
        outln!("rollout PASSED");
    }
    if args.sluice.keep_logs {
        eprintln!("sluice-bench: logs kept in {}", sluice.dir().display());
    }
    Ok(ExitCode::SUCCESS)
}

//! `sluice-bench rollout --netns` (root): the rolling update on a mini
//! node built from network namespaces, where the old pod really vanishes
//! (process killed, namespace deleted), through sluice and through
//! nftables DNAT rules shaped like kube-proxy's nftables mode.
//!
//! - [`topo`]: namespaces, veths, the bridge (br_netfilter on), the VIP
//!   device, entering a namespace, cleanup (also of a stale run's leftovers).
//! - [`pod`]: a pod's backend process (`sluice-bench netns-pod`, hidden).
//! - [`nft`]: the kube-proxy-shaped ruleset, replaced atomically.
//! - [`scenario`]: one run (data path × ARP variant).
//! - [`plot`]: the SVG timeline.
//!
//! Each run gets fresh namespaces (fresh ARP and conntrack state), created
//! by the calling thread and removed when the run ends, fails or is
//! interrupted (the run's thread is cancelled and joined first).

pub mod dnsbench;
pub mod dnsroll;
pub mod nft;
pub mod plot;
pub mod pod;
pub mod scenario;
pub mod topo;

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::sync::watch;

pub use pod::PodArgs;

use crate::check;
use crate::plan::{self, Arp, Intercept, Proto, RolloutArgs, Via};
use crate::report::{self, Event, Second, Summary};
use crate::sluice::{self, LogCounts, MetricsSummary, StopReport};
use crate::workload::Outcome;

/// Whether `id` (a `rollout` option) was given on the command line, so
/// that `--netns` can have its own defaults for the shared options.
fn given(id: &str) -> bool {
    use clap::CommandFactory as _;
    crate::Cli::command()
        .try_get_matches_from(std::env::args_os())
        .ok()
        .and_then(|m| {
            m.subcommand_matches("rollout")
                .map(|r| r.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
        })
        .unwrap_or(false)
}

/// One run in the report.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub via: Via,
    /// How sluice received the traffic (via sluice only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intercept: Option<Intercept>,
    pub arp: Arp,
    #[serde(flatten)]
    pub summary: Summary,
    /// Successful connections slower than 100 ms.
    pub slow_100ms: u64,
    /// Latest a client started against its schedule, ms.
    pub max_late_ms: f64,
    pub local_bind_failures: u64,
    /// The node's conntrack entries answered from a dead pod, at the end.
    pub conntrack_to_dead_pods: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sluice_log: Option<LogCounts>,
    /// sluice's own counters (/metrics), scraped before SIGTERM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sluice_metrics: Option<MetricsSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sluice_stop: Option<StopReport>,
    pub events: Vec<Event>,
    pub timeline: Vec<Second>,
    /// sluice: no client-visible error and a clean sluice. nft: the run
    /// happened (its errors are the finding, not a failure).
    pub pass: bool,
}

impl RunReport {
    /// `sluice (nftables)`, `sluice (bind)`, `nft`.
    pub fn label(&self) -> String {
        via_label(self.via, self.intercept)
    }
}

fn via_label(via: Via, intercept: Option<Intercept>) -> String {
    match intercept {
        Some(i) => format!("{} ({})", via.as_str(), i.as_str()),
        None => via.as_str().to_string(),
    }
}

#[derive(Debug, Serialize)]
struct NetnsReport {
    scenario: &'static str,
    rate: f64,
    duration_s: f64,
    warmup_s: f64,
    lag_s: f64,
    grace_s: f64,
    ns_delay_s: f64,
    backends: u8,
    client_timeout_s: f64,
    /// What sluice was given (its own default when null).
    connect_timeout: Option<String>,
    max_attempts: Option<u32>,
    source_ports: u16,
    vip: String,
    runs: Vec<RunReport>,
    pass: bool,
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    // /proc/self belongs to the process's effective uid.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Removes the namespaces of earlier runs killed hard, and says so.
fn remove_stale_runs() {
    let stale = topo::remove_stale();
    if !stale.is_empty() {
        eprintln!(
            "sluice-bench: removed {} stale namespaces of an earlier run: {}",
            stale.len(),
            stale.join(" ")
        );
    }
}

fn dedup<T: PartialEq + Copy>(v: &[T]) -> Vec<T> {
    let mut out = Vec::new();
    for x in v {
        if !out.contains(x) {
            out.push(*x);
        }
    }
    out
}

/// Cancels a run's thread and waits (bounded) for it to clean up.
struct RunGuard {
    cancel: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        let _ = self.cancel.send(true);
        if let Some(h) = self.thread.take() {
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while !h.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

/// Builds the run's namespaces, runs it on a thread in the node's
/// namespace, and removes everything whatever happens.
async fn run_isolated(spec: scenario::Spec, run: usize) -> Result<(scenario::RunResult, String)> {
    let names = topo::Names::new(std::process::id(), run);
    // Declared first, dropped last: after the thread is gone.
    let topo = topo::Topology::create(&names, spec.n)
        .with_context(|| format!("building the mini node {}", names.node()))?;
    let (cancel, cancel_rx) = watch::channel(false);
    let names2 = topo.names().clone();
    let node = names2.node();
    let (rx, h) = scenario::spawn_in(&node, cancel_rx.clone(), move || async move {
        match spec.proto {
            Proto::Tcp => scenario::run(spec, names2, cancel_rx).await,
            Proto::Udp => dnsroll::run(spec, names2, cancel_rx).await,
        }
    });
    let guard = RunGuard {
        cancel,
        thread: Some(h),
    };
    let r = rx.await.context("the run's thread died")?;
    drop(guard);
    drop(topo);
    Ok((r?, node))
}

/// `rollout --netns`.
pub async fn run(a: RolloutArgs) -> Result<ExitCode> {
    anyhow::ensure!(
        is_root(),
        "rollout --netns needs root (network namespaces, veth, bridge, nftables)"
    );
    let lag: Duration = if given("lag") {
        a.lag.into()
    } else {
        Duration::from_secs(3)
    };
    let source_ports = if given("source_ports") {
        a.source_ports
    } else {
        1024
    };
    let client_timeout: Duration = if given("client_timeout") {
        a.client_timeout.into()
    } else if a.netns.proto == Proto::Udp {
        // A DNS query unanswered within 1 s is lost to its client (glibc
        // then waits out its 5 s before trying again).
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    };
    let grace: Duration = a.grace.into();
    let warmup: Duration = a.warmup.into();
    let ns_delay: Duration = a.netns.ns_delay.into();
    plan::check_lag(lag)?;
    anyhow::ensure!(
        grace + ns_delay < lag,
        "--grace + --ns-delay must be under --lag, or the table drops the old pod before its namespace is gone"
    );
    check::positive_at_most("--rate with --netns", a.rate, 5_000.0)?;
    check::in_range(
        "--backends with --netns",
        a.backends as usize,
        1..=topo::MAX_PODS,
    )?;
    let n = a.backends as usize;
    let schedule = scenario::steps(n, warmup, lag, grace, ns_delay);
    let last = schedule.last().map(|s| s.0).unwrap_or(warmup);
    let duration = plan::load_duration(a.duration, last)?;
    let vias = dedup(&a.netns.via);
    let arps = dedup(&a.netns.arp);
    let intercepts = dedup(&a.netns.intercept);
    if vias.contains(&Via::Nft)
        || (vias.contains(&Via::Sluice) && intercepts.contains(&Intercept::Nftables))
    {
        topo::run("nft", &["--version"], None).context(
            "--via nft and --intercept nftables need the `nft` command (apt-get install nftables)",
        )?;
    }
    // One entry per data path: sluice once per interception.
    let paths: Vec<(Via, Option<Intercept>)> = vias
        .iter()
        .flat_map(|&via| match via {
            Via::Sluice => intercepts.iter().map(|&i| (via, Some(i))).collect(),
            Via::Nft => vec![(via, None)],
        })
        .collect();
    topo::run("ip", &["-V"], None).context("--netns needs `ip` (iproute2)")?;
    if a.netns.proto == Proto::Udp {
        topo::run("dnsmasq", &["--version"], None)
            .context("--proto udp needs `dnsmasq` (apt-get install dnsmasq-base)")?;
        if vias.contains(&Via::Nft) {
            topo::run("conntrack", &["--version"], None).context(
                "--proto udp --via nft needs `conntrack` (apt-get install conntrack) for kube-proxy's UDP conntrack cleanup",
            )?;
        }
    }
    remove_stale_runs();
    let sluice_bin = if vias.contains(&Via::Sluice) {
        Some(sluice::locate(a.sluice.sluice.as_deref())?)
    } else {
        None
    };
    let exe = std::env::current_exe().context("finding this executable")?;
    let base = a.source_port_base.unwrap_or(20000);
    anyhow::ensure!(
        base.checked_add(source_ports.saturating_sub(1)).is_some(),
        "source port pool {base}+{} goes past 65535",
        source_ports
    );
    let (unit, port) = match a.netns.proto {
        Proto::Tcp => ("conn/s", topo::VIP_PORT),
        Proto::Udp => ("DNS queries/s (UDP)", dnsroll::DNS_PORT),
    };
    if !a.json {
        outln!(
            "rollout --netns: {n} old -> {n} new pods, {} {} open loop for {:.1}s, lag {}, grace {}, netns deleted {} after death, client timeout {}, source ports {}..{}, VIP {}:{}",
            a.rate,
            unit,
            duration.as_secs_f64(),
            humantime::format_duration(lag),
            a.grace,
            a.netns.ns_delay,
            humantime::format_duration(client_timeout),
            base,
            u32::from(base) + u32::from(source_ports) - 1,
            topo::VIP,
            port
        );
    }

    let mut runs = Vec::new();
    let mut tails = Vec::new();
    let mut k = 0;
    for &(via, intercept) in &paths {
        let label = via_label(via, intercept);
        for &arp in &arps {
            let spec = scenario::Spec {
                via,
                intercept: intercept.unwrap_or(Intercept::Bind),
                arp,
                rate: a.rate,
                duration,
                warmup,
                lag,
                grace,
                ns_delay,
                n,
                client_timeout,
                source_ports,
                source_port_base: base,
                exe: exe.clone(),
                sluice_bin: sluice_bin.clone(),
                sluice_args: a.sluice.clone(),
                proto: a.netns.proto,
            };
            let (r, _node) = run_isolated(spec, k)
                .await
                .with_context(|| format!("run via {label} with ARP {}", arp.as_str()))?;
            k += 1;
            let mut rep = report_of(via, arp, &r, duration);
            rep.intercept = intercept;
            if !a.json {
                outln!("\n== via {label} | ARP {} ==", arp.as_str());
                out!("{}", report::timeline_text(&rep.timeline));
                out!(
                    "{}",
                    report::summary_text(&format!("via {label}"), &rep.summary)
                );
                outln!(
                    "slower than 100 ms: {} | conntrack entries answered by dead pods at the end: {}",
                    rep.slow_100ms,
                    rep.conntrack_to_dead_pods
                );
                if let Some(l) = &rep.sluice_log {
                    outln!(
                        "sluice (/metrics): {} dials failed and were retried, {} client connections needed a retry, {} clients reset for lack of a backend",
                        l.dial_failures,
                        l.retried_connections,
                        l.no_backend_left
                    );
                }
                if let Some(m) = &rep.sluice_metrics {
                    outln!(
                        "sluice metrics: accepted {}, dial failures {:?}, dial retries {}, ejections {}",
                        m.connections_accepted,
                        m.dial_failures,
                        m.dial_retries,
                        m.backend_ejections
                    );
                }
            }
            if let Some(s) = &r.sluice
                && !rep.pass
            {
                tails.push(s.log_tail.clone());
            }
            runs.push(rep);
        }
    }
    let pass = runs.iter().all(|r| r.pass);
    if let Some(path) = &a.netns.plot {
        let panels: Vec<plot::Panel<'_>> = runs
            .iter()
            .map(|r| plot::Panel {
                title: format!(
                    "via {} | ARP {} | {} errors of {}, {} slower than 100 ms, max {:.0} ms",
                    r.label(),
                    r.arp.as_str(),
                    r.summary.error_total,
                    r.summary.attempted,
                    r.slow_100ms,
                    r.summary.max_ms
                ),
                timeline: &r.timeline,
                events: &r.events,
            })
            .collect();
        std::fs::write(path, plot::svg(&panels))
            .with_context(|| format!("writing {}", path.display()))?;
        if !a.json {
            outln!("\nplot written to {}", path.display());
        }
    }
    if a.json {
        let rep = NetnsReport {
            scenario: "rollout-netns",
            rate: a.rate,
            duration_s: duration.as_secs_f64(),
            warmup_s: warmup.as_secs_f64(),
            lag_s: lag.as_secs_f64(),
            grace_s: grace.as_secs_f64(),
            ns_delay_s: ns_delay.as_secs_f64(),
            backends: a.backends,
            client_timeout_s: client_timeout.as_secs_f64(),
            connect_timeout: a.sluice.connect_timeout.map(|d| d.to_string()),
            max_attempts: a.sluice.max_attempts,
            source_ports,
            vip: format!("{}:{}", topo::VIP, port),
            runs,
            pass,
        };
        outln!("{}", serde_json::to_string(&rep)?);
    } else {
        outln!("\n{}", comparison_table(&runs));
    }
    if pass || a.allow_errors {
        if !a.json && pass {
            outln!("rollout --netns PASSED (0 client-visible errors through sluice)");
        } else if !a.json {
            outln!(
                "rollout --netns: client-visible errors through sluice (exit 0 for --allow-errors)"
            );
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "rollout --netns FAILED: client-visible errors through sluice, or sluice did not run cleanly"
        );
        for t in tails {
            eprint!("{t}");
        }
        Ok(ExitCode::from(1))
    }
}

fn report_of(via: Via, arp: Arp, r: &scenario::RunResult, duration: Duration) -> RunReport {
    let recs = &r.load.records;
    let summary = report::summarize(recs, r.load.elapsed);
    let slow_100ms = recs
        .iter()
        .filter(|x| matches!(x.outcome, Outcome::Ok(_)) && x.latency > Duration::from_millis(100))
        .count() as u64;
    let max_late = recs.iter().map(|x| x.late).max().unwrap_or_default();
    let seconds = duration.as_secs_f64().ceil() as u64;
    let timeline = report::timeline(recs, &r.events, seconds);
    let pass = match (&r.sluice, via) {
        (Some(s), Via::Sluice) => {
            summary.error_total == 0 && summary.attempted > 0 && s.ran_throughout && s.stop.clean
        }
        _ => summary.attempted > 0,
    };
    RunReport {
        via,
        intercept: None,
        arp,
        slow_100ms,
        max_late_ms: (max_late.as_secs_f64() * 1e6).round() / 1e3,
        local_bind_failures: r.load.local_bind_failures,
        conntrack_to_dead_pods: r.conntrack_to_dead_pods,
        sluice_log: r.sluice.as_ref().map(|s| s.log.clone()),
        sluice_metrics: r.sluice.as_ref().and_then(|s| s.metrics.clone()),
        sluice_stop: r.sluice.as_ref().map(|s| s.stop.clone()),
        events: r.events.clone(),
        timeline,
        pass,
        summary,
    }
}

/// The runs side by side, as a Markdown table.
pub fn comparison_table(runs: &[RunReport]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| via | ARP | attempted | succeeded | refused | timeout | unreachable | reset | other errors | not started (no free source port) | > 100 ms | p50 ms | p99 ms | max ms |"
    );
    let _ = writeln!(
        s,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in runs {
        let e = |k: &str| r.summary.errors.get(k).copied().unwrap_or(0);
        let other = e("empty") + e("mismatch") + e("other");
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} |",
            r.label(),
            r.arp.as_str(),
            r.summary.attempted,
            r.summary.succeeded,
            e("refused"),
            e("timeout"),
            e("unreachable"),
            e("reset"),
            other,
            r.summary.not_started,
            r.slow_100ms,
            r.summary.p50_ms,
            r.summary.p99_ms,
            r.summary.max_ms
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{ErrorKind, LoadResult, Record};

    fn rec(start_ms: u64, lat_ms: u64, outcome: Outcome) -> Record {
        Record {
            start: Duration::from_millis(start_ms),
            latency: Duration::from_millis(lat_ms),
            late: Duration::ZERO,
            outcome,
        }
    }

    fn result(records: Vec<Record>, sluice: bool) -> scenario::RunResult {
        scenario::RunResult {
            load: LoadResult {
                records,
                local_bind_failures: 0,
                elapsed: Duration::from_secs(2),
            },
            events: vec![Event::new(
                Duration::from_millis(1500),
                "world: old-1 process killed",
            )],
            sluice: sluice.then(|| scenario::SluiceOutcome {
                log: LogCounts::default(),
                metrics: None,
                stop: StopReport {
                    exit_code: Some(0),
                    stop_s: 0.1,
                    killed: false,
                    clean: true,
                },
                ran_throughout: true,
                log_tail: String::new(),
            }),
            conntrack_to_dead_pods: 0,
        }
    }

    #[test]
    fn a_sluice_run_fails_on_any_client_error_an_nft_run_does_not() {
        let ok = Outcome::Ok("new-1".into());
        let clean = vec![rec(0, 1, ok.clone()), rec(1200, 301, ok.clone())];
        let r = report_of(
            Via::Sluice,
            Arp::Fresh,
            &result(clean, true),
            Duration::from_secs(2),
        );
        assert!(r.pass);
        assert_eq!(r.slow_100ms, 1);
        assert_eq!(r.timeline.len(), 2);
        assert_eq!(r.timeline[1].events.len(), 1);

        let with_err = vec![
            rec(0, 1, ok.clone()),
            rec(1200, 5000, Outcome::Failed(ErrorKind::Timeout)),
        ];
        let r = report_of(
            Via::Sluice,
            Arp::Fresh,
            &result(with_err.clone(), true),
            Duration::from_secs(2),
        );
        assert!(!r.pass);
        // A failed connection is not a "slow" one.
        assert_eq!(r.slow_100ms, 0);
        let r = report_of(
            Via::Nft,
            Arp::Failed,
            &result(with_err, false),
            Duration::from_secs(2),
        );
        assert!(r.pass, "the kernel path's errors are the finding");
        let mut through = r.clone();
        through.via = Via::Sluice;
        through.intercept = Some(Intercept::Nftables);
        assert_eq!(through.label(), "sluice (nftables)");

        let table = comparison_table(&[r]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        let cols = |l: &str| l.matches('|').count();
        assert!(lines.iter().all(|l| cols(l) == cols(lines[0])), "{table}");
        assert!(
            lines[2].starts_with("| nft | failed | 2 | 1 | 0 | 1 |"),
            "{table}"
        );
    }

    #[test]
    fn via_and_arp_lists_are_deduplicated_in_order() {
        assert_eq!(
            dedup(&[Via::Nft, Via::Sluice, Via::Nft]),
            vec![Via::Nft, Via::Sluice]
        );
        assert_eq!(dedup(&[Arp::Failed, Arp::Failed]), vec![Arp::Failed]);
    }
}

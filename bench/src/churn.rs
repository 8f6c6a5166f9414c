//! Connection churn: short-lived request/response connections per second
//! and their latency, directly to the backends and through sluice in one
//! run (or against `--target` alone, or `--direct` alone).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use crate::backend::Backend;
use crate::check;
use crate::report::{self, Summary};
use crate::sluice::{self, MetricsSummary, Sluice, SluiceArgs, StopReport};
use crate::workload::{LoadResult, LoadSpec, closed_loop, open_loop};

#[derive(Debug, Clone, clap::Args)]
pub struct ChurnArgs {
    /// Measure only this address (a sluice or a `sluice-bench serve`).
    #[arg(long, conflicts_with = "direct")]
    pub target: Option<SocketAddr>,
    /// Measure only the built-in backends, without sluice.
    #[arg(long)]
    pub direct: bool,
    /// Open loop: new connections per second (default 1000 when no
    /// --concurrency).
    #[arg(long, conflicts_with = "concurrency")]
    pub rate: Option<f64>,
    /// Closed loop: this many workers back to back (finds max conn/s).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Unmeasured load before each phase.
    #[arg(long, default_value = "500ms", value_name = "DURATION")]
    pub warmup: humantime::Duration,
    /// Built-in backends to start.
    #[arg(long, default_value_t = 3)]
    pub backends: u8,
    /// Per-connection client deadline.
    #[arg(long, default_value = "2s", value_name = "DURATION")]
    pub client_timeout: humantime::Duration,
    /// Open loop: most connections in flight; beyond, not started.
    #[arg(long, default_value_t = 4096)]
    pub max_inflight: usize,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Exit 0 even if clients saw errors.
    #[arg(long)]
    pub allow_errors: bool,
    #[command(flatten)]
    pub sluice: SluiceArgs,
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Open,
    Closed,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Comparison {
    /// sluice conn/s ÷ direct conn/s.
    pub conn_per_s_ratio: f64,
    pub p50_ratio: f64,
    pub p99_ratio: f64,
    /// sluice p50 − direct p50, ms.
    pub p50_added_ms: f64,
    /// sluice p99 − direct p99, ms.
    pub p99_added_ms: f64,
}

/// Compares a run through the proxy with a direct one.
pub fn compare(direct: &Summary, proxied: &Summary) -> Comparison {
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            (a / b * 1000.0).round() / 1000.0
        } else {
            0.0
        }
    };
    let diff = |a: f64, b: f64| ((a - b) * 1000.0).round() / 1000.0;
    Comparison {
        conn_per_s_ratio: ratio(proxied.conn_per_s, direct.conn_per_s),
        p50_ratio: ratio(proxied.p50_ms, direct.p50_ms),
        p99_ratio: ratio(proxied.p99_ms, direct.p99_ms),
        p50_added_ms: diff(proxied.p50_ms, direct.p50_ms),
        p99_added_ms: diff(proxied.p99_ms, direct.p99_ms),
    }
}

#[derive(Debug, Serialize)]
struct ChurnReport {
    scenario: &'static str,
    mode: Mode,
    rate: Option<f64>,
    concurrency: Option<usize>,
    seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    direct: Option<Phase>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sluice: Option<Phase>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<Phase>,
    #[serde(skip_serializing_if = "Option::is_none")]
    comparison: Option<Comparison>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sluice_stop: Option<StopReport>,
    /// sluice's own counters (/metrics), scraped before SIGTERM.
    #[serde(skip_serializing_if = "Option::is_none")]
    sluice_metrics: Option<MetricsSummary>,
}

#[derive(Debug, Serialize)]
struct Phase {
    #[serde(flatten)]
    summary: Summary,
    local_bind_failures: u64,
}

/// Runs the same load for `--warmup` (discarded), then measures it for
/// `--seconds`.
async fn measure(args: &ChurnArgs, targets: Vec<SocketAddr>) -> LoadResult {
    let warmup: Duration = args.warmup.into();
    if !warmup.is_zero() {
        let _ = load(args, targets.clone(), warmup).await;
    }
    load(args, targets, Duration::from_secs_f64(args.seconds)).await
}

async fn load(args: &ChurnArgs, targets: Vec<SocketAddr>, duration: Duration) -> LoadResult {
    let spec = Arc::new(LoadSpec {
        targets,
        pool: None,
        timeout: args.client_timeout.into(),
        max_inflight: args.max_inflight,
    });
    let t0 = Instant::now() + Duration::from_millis(20);
    match args.concurrency {
        Some(c) => {
            tokio::time::sleep_until(t0.into()).await;
            closed_loop(spec, c, duration, t0).await
        }
        None => open_loop(spec, args.rate.unwrap_or(1000.0), duration, t0).await,
    }
}

fn phase(r: &LoadResult) -> Phase {
    Phase {
        summary: report::summarize(&r.records, r.elapsed),
        local_bind_failures: r.local_bind_failures,
    }
}

pub async fn run(args: ChurnArgs) -> Result<ExitCode> {
    check::positive_at_most("--seconds", args.seconds, 300.0)?;
    if let Some(r) = args.rate {
        check::positive_at_most("--rate", r, 200_000.0)?;
    }
    if let Some(c) = args.concurrency {
        check::in_range("--concurrency", c, 1..=4096)?;
    }
    check::in_range("--backends", args.backends, 1..=50)?;
    let mode = if args.concurrency.is_some() {
        Mode::Closed
    } else {
        Mode::Open
    };
    let mut out = ChurnReport {
        scenario: "churn",
        mode,
        rate: if args.concurrency.is_some() {
            None
        } else {
            Some(args.rate.unwrap_or(1000.0))
        },
        concurrency: args.concurrency,
        seconds: args.seconds,
        direct: None,
        sluice: None,
        target: None,
        comparison: None,
        sluice_stop: None,
        sluice_metrics: None,
    };
    let load_desc = match args.concurrency {
        Some(c) => format!("closed loop, {c} workers"),
        None => format!("open loop, {} conn/s", args.rate.unwrap_or(1000.0)),
    };

    if let Some(target) = args.target {
        anyhow::ensure!(
            target.ip().is_loopback(),
            "--target must be a loopback address"
        );
        if !args.json {
            outln!("churn: {load_desc}, {}s against {target}", args.seconds);
        }
        out.target = Some(phase(&measure(&args, vec![target]).await));
    } else {
        let mut backends = Vec::new();
        for i in 0..args.backends as usize {
            let addr = SocketAddr::new(sluice::lo_in(3, i + 1), 0);
            backends.push(Backend::start(&format!("b-{}", i + 1), addr).await?);
        }
        let addrs: Vec<SocketAddr> = backends.iter().map(Backend::addr).collect();
        let mut proxy = None;
        if !args.direct {
            proxy = Some(Sluice::start_in_front("churn", &args.sluice, &addrs).await?);
        }
        if !args.json {
            outln!(
                "churn: {load_desc}, {}s per phase, {} backends{}",
                args.seconds,
                addrs.len(),
                if proxy.is_some() {
                    ", direct then through sluice"
                } else {
                    ", direct only"
                }
            );
        }
        out.direct = Some(phase(&measure(&args, addrs.clone()).await));
        if let Some(p) = proxy.as_mut() {
            out.sluice = Some(phase(&measure(&args, vec![p.listen()]).await));
            let running = p.running();
            out.sluice_metrics = p.scrape_metrics().await;
            let stop = p.stop(Duration::from_secs(10)).await;
            let errors = out.sluice.as_ref().map_or(0, |s| s.summary.error_total);
            if !running || !stop.clean || errors > 0 {
                eprintln!(
                    "through sluice: {errors} client-visible errors; sluice running until the end: {running}; stop: {stop:?}"
                );
                eprint!("{}", p.log_tail(30));
            }
            out.sluice_stop = Some(stop);
        }
        if let (Some(d), Some(s)) = (&out.direct, &out.sluice) {
            out.comparison = Some(compare(&d.summary, &s.summary));
        }
    }

    let errors: u64 = [&out.direct, &out.sluice, &out.target]
        .iter()
        .filter_map(|p| p.as_ref())
        .map(|p| p.summary.error_total)
        .sum();
    let sluice_clean = out.sluice_stop.as_ref().is_none_or(|s| s.clean);
    if args.json {
        outln!("{}", serde_json::to_string(&out)?);
    } else {
        for (label, p) in [
            ("direct", &out.direct),
            ("sluice", &out.sluice),
            ("target", &out.target),
        ] {
            if let Some(p) = p {
                out!("{}", report::summary_text(label, &p.summary));
            }
        }
        if let Some(c) = &out.comparison {
            outln!(
                "sluice/direct: conn/s x{:.3}, p50 x{:.2} (+{:.3} ms), p99 x{:.2} (+{:.3} ms added)",
                c.conn_per_s_ratio,
                c.p50_ratio,
                c.p50_added_ms,
                c.p99_ratio,
                c.p99_added_ms
            );
        }
    }
    if (errors > 0 && !args.allow_errors) || !sluice_clean {
        eprintln!("churn: {errors} client-visible errors; sluice clean stop: {sluice_clean}");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{Outcome, Record};

    fn summary(lat_us: u64, n: u64, secs: u64) -> Summary {
        let recs: Vec<Record> = (0..n)
            .map(|i| Record {
                start: Duration::from_millis(i),
                latency: Duration::from_micros(lat_us),
                late: Duration::ZERO,
                outcome: Outcome::Ok("x".into()),
            })
            .collect();
        report::summarize(&recs, Duration::from_secs(secs))
    }

    #[test]
    fn comparison_ratios_and_added_latency() {
        let d = summary(100, 1000, 1);
        let s = summary(300, 500, 1);
        let c = compare(&d, &s);
        assert_eq!(c.conn_per_s_ratio, 0.5);
        assert!((c.p99_ratio - 3.0).abs() < 0.01);
        assert!((c.p99_added_ms - 0.2).abs() < 0.001);
        assert!((c.p50_added_ms - 0.2).abs() < 0.001);
    }
}

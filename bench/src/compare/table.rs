//! The text table of a round: every path's figures, with ratios to the
//! direct path and to HAProxy.

use std::fmt::Write as _;

use super::{PathKind, PathResult};

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a > 0.0 {
        format!("x{:.2}", a / b)
    } else {
        "-".into()
    }
}

pub fn table(results: &[PathResult]) -> String {
    let get = |k: PathKind| results.iter().find(|r| r.path == k && r.skipped.is_none());
    let direct = get(PathKind::Direct);
    let haproxy = get(PathKind::Haproxy);
    let d_short = direct
        .and_then(|r| r.short.as_ref())
        .map_or(0.0, |s| s.per_s);
    let d_keep = direct
        .and_then(|r| r.keepalive.as_ref())
        .map_or(0.0, |s| s.per_s);
    let d_bulk = direct
        .and_then(|r| r.bulk.as_ref())
        .map_or(0.0, |b| b.gbit_s);
    let h_short = haproxy
        .and_then(|r| r.short.as_ref())
        .map_or(0.0, |s| s.per_s);
    let h_cpu = haproxy
        .and_then(|r| r.short.as_ref())
        .and_then(|s| s.proxy_cpu_s_per_10k)
        .unwrap_or(0.0);
    let h_kcpu = haproxy
        .and_then(|r| r.keepalive.as_ref())
        .and_then(|k| k.proxy_cpu_s_per_10k)
        .unwrap_or(0.0);
    let h_gb = haproxy
        .and_then(|r| r.bulk.as_ref())
        .and_then(|b| b.proxy_cpu_s_per_gb)
        .unwrap_or(0.0);
    let cell = |x: f64| {
        if x > 0.0 {
            format!("{x:.3}")
        } else {
            "-".to_string()
        }
    };
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<13} {:>9} {:>6} {:>6} {:>7} {:>6} | {:>9} {:>6} {:>7} {:>7} {:>7} {:>6} | {:>7} {:>6} {:>6} {:>6} | {:>8}",
        "path",
        "short/s",
        "/dir",
        "/hap",
        "cpu10k",
        "/hap",
        "keep/s",
        "/dir",
        "p50ms",
        "p99ms",
        "cpu10k",
        "/hap",
        "Gbit/s",
        "/dir",
        "s/GB",
        "/hap",
        "KiB/idle"
    );
    for r in results {
        if let Some(why) = &r.skipped {
            let _ = writeln!(t, "{:<13} skipped: {why}", r.path.name());
            continue;
        }
        let (s, s_err, cpu) = r.short.as_ref().map_or((0.0, 0, 0.0), |s| {
            (s.per_s, s.errors, s.proxy_cpu_s_per_10k.unwrap_or(0.0))
        });
        let (k, k50, k99, k_err, kcpu) =
            r.keepalive.as_ref().map_or((0.0, 0.0, 0.0, 0, 0.0), |k| {
                (
                    k.per_s,
                    k.p50_ms,
                    k.p99_ms,
                    k.errors,
                    k.proxy_cpu_s_per_10k.unwrap_or(0.0),
                )
            });
        let (b, b_err, gb) = r.bulk.as_ref().map_or((0.0, false, 0.0), |b| {
            (
                b.gbit_s,
                b.error.is_some(),
                b.proxy_cpu_s_per_gb.unwrap_or(0.0),
            )
        });
        let idle = r
            .idle
            .as_ref()
            .map_or("-".to_string(), |i| format!("{:.2}", i.kib_per_connection));
        let _ = writeln!(
            t,
            "{:<13} {:>9.0} {:>6} {:>6} {:>7} {:>6} | {:>9.0} {:>6} {:>7.3} {:>7.3} {:>7} {:>6} | {:>7.2} {:>6} {:>6} {:>6} | {:>8}",
            r.path.name(),
            s,
            ratio(s, d_short),
            ratio(s, h_short),
            cell(cpu),
            ratio(cpu, h_cpu),
            k,
            ratio(k, d_keep),
            k50,
            k99,
            cell(kcpu),
            ratio(kcpu, h_kcpu),
            b,
            ratio(b, d_bulk),
            cell(gb),
            ratio(gb, h_gb),
            idle,
        );
        let mut errs = Vec::new();
        if s_err > 0 {
            errs.push(format!("short: {s_err} failed"));
        }
        if k_err > 0 {
            errs.push(format!("keep-alive: {k_err} failed"));
        }
        if b_err {
            errs.push(format!(
                "bulk: {}",
                r.bulk
                    .as_ref()
                    .and_then(|b| b.error.clone())
                    .unwrap_or_default()
            ));
        }
        if let Some(i) = &r.idle
            && i.failed > 0
        {
            errs.push(format!(
                "idle: {} of {} failed",
                i.failed,
                i.failed + i.connections
            ));
        }
        if !errs.is_empty() {
            let _ = writeln!(t, "{:<13} ERRORS: {}", "", errs.join("; "));
        }
        if let Some(shares) = r.short.as_ref().and_then(|s| s.worker_cpu_share.as_ref()) {
            let pct: Vec<String> = shares
                .iter()
                .map(|x| format!("{:.0}%", x * 100.0))
                .collect();
            let _ = writeln!(
                t,
                "{:<13} workers' CPU split over the short phase: {}",
                "",
                pct.join(" / ")
            );
        }
    }
    t
}

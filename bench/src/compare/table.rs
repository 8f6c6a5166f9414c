//! The text table of a round: every path's figures, with ratios to the
//! direct path and to HAProxy.

use std::fmt::Write as _;

use super::cpu::NODE_SATURATED;
use super::{PathKind, PathResult};

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a > 0.0 {
        format!("x{:.2}", a / b)
    } else {
        "-".into()
    }
}

fn cell(x: f64) -> String {
    if x > 0.0 {
        format!("{x:.3}")
    } else {
        "-".into()
    }
}

/// [`cell`], marked `*` when the node was saturated over the phase.
fn node_cell(x: f64, saturated: bool) -> String {
    let c = cell(x);
    if saturated && x > 0.0 { c + "*" } else { c }
}

/// `a - b` with its sign, when both were measured.
fn delta(a: f64, b: f64) -> String {
    if a > 0.0 && b > 0.0 {
        format!("{:+.3}", a - b)
    } else {
        "-".into()
    }
}

/// A path's figures as the table shows them: 0 where not measured.
#[derive(Default)]
struct Row {
    short: f64,
    short_cpu: f64,
    keep: f64,
    keep_p50: f64,
    keep_p99: f64,
    keep_cpu: f64,
    gbit: f64,
    gb_cpu: f64,
    node_10k: f64,
    node_gb: f64,
    /// The node was saturated over the short / bulk phase.
    node_10k_sat: bool,
    node_gb_sat: bool,
}

impl Row {
    fn of(r: &PathResult) -> Self {
        let cpu = |c: Option<f64>| c.unwrap_or(0.0);
        let mut row = Row::default();
        if let Some(s) = &r.short {
            (row.short, row.short_cpu) = (s.per_s, cpu(s.proxy_cpu_s_per_10k));
            row.node_10k = cpu(s.node_cpu_s_per_10k);
            row.node_10k_sat = s.node_busy.is_some_and(|b| b >= NODE_SATURATED);
        }
        if let Some(k) = &r.keepalive {
            (row.keep, row.keep_p50, row.keep_p99) = (k.per_s, k.p50_ms, k.p99_ms);
            row.keep_cpu = cpu(k.proxy_cpu_s_per_10k);
        }
        if let Some(b) = &r.bulk {
            (row.gbit, row.gb_cpu) = (b.gbit_s, cpu(b.proxy_cpu_s_per_gb));
            row.node_gb = cpu(b.node_cpu_s_per_gb);
            row.node_gb_sat = b.node_busy.is_some_and(|b| b >= NODE_SATURATED);
        }
        row
    }
}

/// One round as text: a header, a line per path, and under a path its
/// errors and how its workers shared the CPU.
pub fn table(results: &[PathResult]) -> String {
    let get = |k: PathKind| {
        results
            .iter()
            .find(|r| r.path == k && r.skipped.is_none())
            .map_or_else(Row::default, Row::of)
    };
    let (d, h) = (get(PathKind::Direct), get(PathKind::Haproxy));
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<13} {:>9} {:>6} {:>6} {:>7} {:>6} | {:>9} {:>6} {:>7} {:>7} {:>7} {:>6} | {:>7} {:>6} {:>6} {:>6} | {:>8} | {:>7} {:>6} {:>6} {:>6}",
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
        "KiB/idle",
        "node10k",
        "+dir",
        "nodeGB",
        "+dir"
    );
    for r in results {
        if let Some(why) = &r.skipped {
            let _ = writeln!(t, "{:<13} skipped: {why}", r.path.name());
            continue;
        }
        let x = Row::of(r);
        let idle = r
            .idle
            .as_ref()
            .map_or("-".to_string(), |i| format!("{:.2}", i.kib_per_connection));
        let _ = writeln!(
            t,
            "{:<13} {:>9.0} {:>6} {:>6} {:>7} {:>6} | {:>9.0} {:>6} {:>7.3} {:>7.3} {:>7} {:>6} | {:>7.2} {:>6} {:>6} {:>6} | {:>8} | {:>7} {:>6} {:>6} {:>6}",
            r.path.name(),
            x.short,
            ratio(x.short, d.short),
            ratio(x.short, h.short),
            cell(x.short_cpu),
            ratio(x.short_cpu, h.short_cpu),
            x.keep,
            ratio(x.keep, d.keep),
            x.keep_p50,
            x.keep_p99,
            cell(x.keep_cpu),
            ratio(x.keep_cpu, h.keep_cpu),
            x.gbit,
            ratio(x.gbit, d.gbit),
            cell(x.gb_cpu),
            ratio(x.gb_cpu, h.gb_cpu),
            idle,
            node_cell(x.node_10k, x.node_10k_sat),
            delta(x.node_10k, d.node_10k),
            node_cell(x.node_gb, x.node_gb_sat),
            delta(x.node_gb, d.node_gb),
        );
        let mut errs = Vec::new();
        if let Some(s) = r.short.as_ref().filter(|s| s.errors > 0) {
            errs.push(format!("short: {} failed", s.errors));
        }
        if let Some(k) = r.keepalive.as_ref().filter(|k| k.errors > 0) {
            errs.push(format!("keep-alive: {} failed", k.errors));
        }
        if let Some(e) = r.bulk.as_ref().and_then(|b| b.error.as_ref()) {
            errs.push(format!("bulk: {e}"));
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
        if let Some(l) = r.short.as_ref().and_then(|s| s.load_cpu_s_per_10k) {
            let total = x.short_cpu + l;
            let _ = writeln!(
                t,
                "{:<13} short: load cpu10k {l:.3}, proxy + load {total:.3}",
                ""
            );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::load::{Bulk, Idle, Rate};

    fn rate(per_s: f64, errors: u64, cpu: Option<f64>) -> Rate {
        Rate {
            ok: 100,
            errors,
            per_s,
            p50_ms: 0.25,
            p99_ms: 1.5,
            proxy_cpu_s_per_10k: cpu,
            ..Rate::default()
        }
    }

    fn path(kind: PathKind, k: f64, cpu: Option<f64>) -> PathResult {
        PathResult {
            short: Some(Rate {
                node_cpu_s_per_10k: Some(1.0 + cpu.unwrap_or(0.0)),
                node_busy: Some(if k < 0.3 { 0.95 } else { 0.5 }),
                ..rate(1000.0 * k, 0, cpu)
            }),
            keepalive: Some(rate(5000.0 * k, 0, cpu.map(|c| c / 4.0))),
            bulk: Some(Bulk {
                gbit_s: 10.0 * k,
                proxy_cpu_s_per_gb: cpu.map(|c| c / 2.0),
                node_cpu_s_per_gb: Some(0.5 + cpu.unwrap_or(0.0) / 2.0),
                ..Bulk::default()
            }),
            idle: cpu.map(|_| Idle {
                connections: 100,
                kib_per_connection: 3.0 * k,
                ..Idle::default()
            }),
            ..PathResult::new(kind)
        }
    }

    #[test]
    fn paths_are_named_as_on_the_command_line() {
        assert_eq!(PathKind::SluiceCopy.name(), "sluice-copy");
        assert_eq!(PathKind::Haproxy.name(), "haproxy");
        assert_eq!(PathKind::NftDnat.name(), "nft-dnat");
        assert!(PathKind::NftDnat.needs_netns());
    }

    #[test]
    fn table_has_ratios_to_direct_and_haproxy_and_names_errors() {
        let mut sluice = path(PathKind::Sluice, 0.5, Some(2.0));
        sluice.short = Some(Rate {
            worker_cpu_share: Some(vec![0.5, 0.25, 0.25]),
            ..rate(500.0, 3, Some(2.0))
        });
        sluice.bulk.as_mut().unwrap().error = Some("sink counted 1 bytes, client sent 2".into());
        sluice.idle.as_mut().unwrap().failed = 4;
        let t = table(&[
            path(PathKind::Direct, 1.0, None),
            sluice,
            path(PathKind::Haproxy, 0.25, Some(4.0)),
            PathResult::skipped(PathKind::Nginx, "not installed".into()),
        ]);
        let expected = [
            "path            short/s   /dir   /hap  cpu10k   /hap |    keep/s   /dir   p50ms   p99ms  cpu10k   /hap |  Gbit/s   /dir   s/GB   /hap | KiB/idle | node10k   +dir nodeGB   +dir",
            "direct             1000  x1.00  x4.00       -      - |      5000  x1.00   0.250   1.500       -      - |   10.00  x1.00      -      - |        - |   1.000 +0.000  0.500 +0.000",
            "sluice              500  x0.50  x2.00   2.000  x0.50 |      2500  x0.50   0.250   1.500   0.500  x0.50 |    5.00  x0.50  1.000  x0.50 |     1.50 |       -      -  1.500 +1.000",
            "              ERRORS: short: 3 failed; bulk: sink counted 1 bytes, client sent 2; idle: 4 of 104 failed",
            "              workers' CPU split over the short phase: 50% / 25% / 25%",
            "haproxy             250  x0.25  x1.00   4.000  x1.00 |      1250  x0.25   0.250   1.500   1.000  x1.00 |    2.50  x0.25  2.000  x1.00 |     0.75 |  5.000* +4.000  2.500 +2.000",
            "nginx         skipped: not installed",
        ];
        assert_eq!(t.lines().collect::<Vec<_>>(), expected, "{t}");

        let mut nft = path(PathKind::SluiceNft, 0.5, Some(2.5));
        nft.short.as_mut().unwrap().load_cpu_s_per_10k = Some(1.25);
        let t = table(&[nft]);
        assert_eq!(
            t.lines().nth(2),
            Some("              short: load cpu10k 1.250, proxy + load 3.750"),
            "{t}"
        );
        assert_eq!(PathKind::SluiceNft.name(), "sluice-nft");
    }
}

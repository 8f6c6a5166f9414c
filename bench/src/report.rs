//! Turning connection records into numbers: latency histograms
//! (hdrhistogram, microsecond resolution), the per-second timeline with
//! scenario events, and their text and JSON forms.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::workload::{ErrorKind, Outcome, Record};

/// Something that happened during a run, placed on the timeline.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    /// Seconds since the load started.
    pub t_s: f64,
    pub what: String,
}

impl Event {
    pub fn new(at: Duration, what: impl Into<String>) -> Self {
        Self {
            t_s: round3(at.as_secs_f64()),
            what: what.into(),
        }
    }
}

/// Totals and latency of a set of connections.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    /// Connections that reached the network (succeeded + errors).
    pub attempted: u64,
    pub succeeded: u64,
    /// Client-visible errors by kind; every kind is present.
    pub errors: BTreeMap<&'static str, u64>,
    pub error_total: u64,
    /// Scheduled connections that never started (no local port, or the
    /// client's in-flight limit). Not client-visible errors.
    pub not_started: u64,
    /// Latency of successful connections, milliseconds.
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// Open loop: how late connections started against their schedule
    /// (p99 and max, ms); latency above is measured from the real start.
    pub start_late_p99_ms: f64,
    pub start_late_max_ms: f64,
    /// Measured window, seconds.
    pub elapsed_s: f64,
    /// Successful connections per second over the window.
    pub conn_per_s: f64,
    /// Successful connections by the backend that answered.
    pub served_by: BTreeMap<String, u64>,
}

/// One second of the timeline (by scheduled start).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Second {
    pub t: u64,
    pub attempted: u64,
    pub ok: u64,
    pub errors: u64,
    pub p99_ms: f64,
    pub max_ms: f64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub fn new_hist() -> Histogram<u64> {
    // 1 µs .. 1 h, 3 significant digits: constant, valid bounds.
    match Histogram::new_with_bounds(1, 3_600_000_000, 3) {
        Ok(h) => h,
        Err(e) => unreachable!("constant histogram bounds rejected: {e}"),
    }
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = (d.as_micros() as u64).max(1);
    h.saturating_record(us);
}

pub fn q_ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        round3(h.value_at_quantile(q) as f64 / 1000.0)
    }
}

/// Summarizes `records` measured over `elapsed`.
pub fn summarize(records: &[Record], elapsed: Duration) -> Summary {
    let mut h = new_hist();
    let mut late = new_hist();
    let mut errors: BTreeMap<&'static str, u64> =
        ErrorKind::ALL.iter().map(|k| (k.as_str(), 0)).collect();
    let mut served_by = BTreeMap::new();
    let (mut ok, mut failed, mut not_started) = (0u64, 0u64, 0u64);
    for r in records {
        if r.outcome != Outcome::NotStarted {
            late.saturating_record(r.late.as_micros() as u64);
        }
        match &r.outcome {
            Outcome::Ok(id) => {
                ok += 1;
                record(&mut h, r.latency);
                *served_by.entry(id.to_string()).or_insert(0) += 1;
            }
            Outcome::Failed(k) => {
                failed += 1;
                *errors.entry(k.as_str()).or_insert(0) += 1;
            }
            Outcome::NotStarted => not_started += 1,
        }
    }
    let secs = elapsed.as_secs_f64();
    Summary {
        attempted: ok + failed,
        succeeded: ok,
        errors,
        error_total: failed,
        not_started,
        p50_ms: q_ms(&h, 0.50),
        p90_ms: q_ms(&h, 0.90),
        p99_ms: q_ms(&h, 0.99),
        p999_ms: q_ms(&h, 0.999),
        max_ms: if h.is_empty() {
            0.0
        } else {
            round3(h.max() as f64 / 1000.0)
        },
        mean_ms: if h.is_empty() {
            0.0
        } else {
            round3(h.mean() / 1000.0)
        },
        start_late_p99_ms: q_ms(&late, 0.99),
        start_late_max_ms: if late.is_empty() {
            0.0
        } else {
            round3(late.max() as f64 / 1000.0)
        },
        elapsed_s: round3(secs),
        conn_per_s: if secs > 0.0 {
            (ok as f64 / secs * 10.0).round() / 10.0
        } else {
            0.0
        },
        served_by,
    }
}

/// Per-second buckets (by scheduled start) covering `seconds`, with each
/// event attached to the second it happened in.
pub fn timeline(records: &[Record], events: &[Event], seconds: u64) -> Vec<Second> {
    let mut out: Vec<(Second, Histogram<u64>)> = (0..seconds.max(1))
        .map(|t| {
            (
                Second {
                    t,
                    attempted: 0,
                    ok: 0,
                    errors: 0,
                    p99_ms: 0.0,
                    max_ms: 0.0,
                    events: Vec::new(),
                },
                new_hist(),
            )
        })
        .collect();
    let last = out.len() - 1;
    for r in records {
        let i = (r.start.as_secs() as usize).min(last);
        let (s, h) = &mut out[i];
        match &r.outcome {
            Outcome::Ok(_) => {
                s.attempted += 1;
                s.ok += 1;
                record(h, r.latency);
            }
            Outcome::Failed(_) => {
                s.attempted += 1;
                s.errors += 1;
            }
            Outcome::NotStarted => {}
        }
    }
    for e in events {
        let i = (e.t_s.max(0.0) as usize).min(last);
        out[i].0.events.push(format!("{:.2}s {}", e.t_s, e.what));
    }
    out.into_iter()
        .map(|(mut s, h)| {
            s.p99_ms = q_ms(&h, 0.99);
            s.max_ms = if h.is_empty() {
                0.0
            } else {
                round3(h.max() as f64 / 1000.0)
            };
            s
        })
        .collect()
}

/// The timeline as an aligned text table.
pub fn timeline_text(tl: &[Second]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>4} {:>9} {:>7} {:>6} {:>8} {:>8}  events",
        "sec", "attempted", "ok", "errors", "p99_ms", "max_ms"
    );
    for sec in tl {
        let mut ev = sec.events.iter();
        let _ = writeln!(
            s,
            "{:>4} {:>9} {:>7} {:>6} {:>8.2} {:>8.2}  {}",
            sec.t,
            sec.attempted,
            sec.ok,
            sec.errors,
            sec.p99_ms,
            sec.max_ms,
            ev.next().map(String::as_str).unwrap_or("")
        );
        for e in ev {
            let _ = writeln!(s, "{:>48}  {}", "", e);
        }
    }
    s
}

/// A summary as a few text lines.
pub fn summary_text(label: &str, s: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{label}: attempted {} ok {} errors {} not_started {} | {:.1} conn/s over {:.2}s",
        s.attempted, s.succeeded, s.error_total, s.not_started, s.conn_per_s, s.elapsed_s
    );
    let _ = writeln!(
        out,
        "{:width$}  latency ms: p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} max {:.3} (client start late: p99 {:.3} max {:.3})",
        "",
        s.p50_ms,
        s.p90_ms,
        s.p99_ms,
        s.p999_ms,
        s.max_ms,
        s.start_late_p99_ms,
        s.start_late_max_ms,
        width = label.len()
    );
    counts_line(&mut out, label.len(), "errors", &s.errors);
    counts_line(&mut out, label.len(), "served by", &s.served_by);
    out
}

/// `what: k=n k=n` for the non-zero counts, indented `width`; nothing when
/// every count is zero.
fn counts_line<K: std::fmt::Display>(
    out: &mut String,
    width: usize,
    what: &str,
    counts: &BTreeMap<K, u64>,
) {
    let kv: Vec<String> = counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    if !kv.is_empty() {
        let _ = writeln!(out, "{:width$}  {what}: {}", "", kv.join(" "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(start_ms: u64, lat_us: u64, outcome: Outcome) -> Record {
        Record {
            start: Duration::from_millis(start_ms),
            latency: Duration::from_micros(lat_us),
            late: Duration::from_micros(start_ms),
            outcome,
        }
    }

    fn ok(id: &str) -> Outcome {
        Outcome::Ok(id.into())
    }

    fn sample() -> Vec<Record> {
        let mut v: Vec<Record> = (0..100)
            .map(|i| {
                rec(
                    i * 10,
                    1000 + i * 10,
                    ok(if i % 2 == 0 { "a" } else { "b" }),
                )
            })
            .collect();
        v.push(rec(1500, 0, Outcome::Failed(ErrorKind::Refused)));
        v.push(rec(1600, 0, Outcome::Failed(ErrorKind::Empty)));
        v.push(rec(1700, 0, Outcome::NotStarted));
        v
    }

    #[test]
    fn summary_counts_and_quantiles() {
        let s = summarize(&sample(), Duration::from_secs(2));
        assert_eq!(s.attempted, 102);
        assert_eq!(s.succeeded, 100);
        assert_eq!(s.error_total, 2);
        assert_eq!(s.not_started, 1);
        assert_eq!(s.errors["refused"], 1);
        assert_eq!(s.errors["empty"], 1);
        assert_eq!(s.errors["timeout"], 0);
        assert_eq!(s.errors.len(), ErrorKind::ALL.len());
        assert_eq!(s.served_by["a"], 50);
        // Latencies 1.000 .. 1.990 ms.
        assert!((s.p50_ms - 1.49).abs() < 0.01, "p50 {}", s.p50_ms);
        assert!((s.p99_ms - 1.98).abs() < 0.01, "p99 {}", s.p99_ms);
        assert!((s.max_ms - 1.99).abs() < 0.01, "max {}", s.max_ms);
        assert_eq!(s.conn_per_s, 50.0);
        // Lateness 0 .. 1.6 ms over the 102 started connections.
        assert!(
            (s.start_late_max_ms - 1.6).abs() < 0.01,
            "{}",
            s.start_late_max_ms
        );
    }

    #[test]
    fn empty_summary_has_zeroes() {
        let s = summarize(&[], Duration::ZERO);
        assert_eq!(s.attempted, 0);
        assert_eq!(s.start_late_max_ms, 0.0);
        assert_eq!(s.p99_ms, 0.0);
        assert_eq!(s.conn_per_s, 0.0);
    }

    #[test]
    fn on_time_starts_report_zero_lateness() {
        let mut v = sample();
        for r in &mut v {
            r.late = Duration::ZERO;
        }
        let s = summarize(&v, Duration::from_secs(2));
        assert_eq!(s.start_late_p99_ms, 0.0);
        assert_eq!(s.start_late_max_ms, 0.0);
    }

    #[test]
    fn summary_json_has_contract_fields() {
        let s = summarize(&sample(), Duration::from_secs(2));
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        for k in ["attempted", "succeeded", "p50_ms", "p99_ms", "max_ms"] {
            assert!(v[k].is_number(), "{k} missing: {v}");
        }
        let errs = v["errors"].as_object().unwrap();
        for k in [
            "refused",
            "reset",
            "timeout",
            "unreachable",
            "empty",
            "mismatch",
            "other",
        ] {
            assert!(errs[k].is_u64(), "errors.{k} missing");
        }
        assert_eq!(errs["refused"], 1);
    }

    #[test]
    fn timeline_buckets_by_start_second_and_places_events() {
        let events = vec![
            Event::new(Duration::from_millis(1200), "old-1 killed"),
            Event::new(Duration::from_secs(30), "late"),
        ];
        let tl = timeline(&sample(), &events, 2);
        assert_eq!(tl.len(), 2);
        assert_eq!(tl[0].attempted, 100);
        assert_eq!(tl[0].ok, 100);
        assert_eq!(tl[1].attempted, 2);
        assert_eq!(tl[1].errors, 2);
        assert_eq!(tl[1].ok, 0);
        assert_eq!(tl[1].p99_ms, 0.0);
        assert_eq!(tl[1].events, vec!["1.20s old-1 killed", "30.00s late"]);
        let text = timeline_text(&tl);
        assert!(text.contains("old-1 killed"));
        assert_eq!(text.lines().count(), 4);
    }

    #[test]
    fn summary_text_lists_errors_and_backends_only_when_there_are_some() {
        let s = summarize(&sample(), Duration::from_secs(2));
        let text = summary_text("via x", &s);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[2], "       errors: empty=1 refused=1");
        assert_eq!(lines[3], "       served by: a=50 b=50");
        let quiet = summary_text("x", &summarize(&[], Duration::ZERO));
        assert_eq!(quiet.lines().count(), 2, "{quiet}");
    }
}

//! `--plot FILE.svg`: the per-second timeline of each run as a small
//! hand-written SVG (no plotting dependency): one panel per run, bars of
//! successful and failed connections per second, p99 latency per second as
//! a line on a log scale, and the rollout's events as vertical marks.

use std::fmt::Write as _;

use crate::report::{Event, Second};

/// One panel.
pub struct Panel<'a> {
    pub title: String,
    pub timeline: &'a [Second],
    pub events: &'a [Event],
}

const W: f64 = 900.0;
const PANEL_H: f64 = 220.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 70.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 40.0;
/// p99 axis: 1 ms .. 10 s, log scale.
const P99_MIN: f64 = 1.0;
const P99_MAX: f64 = 10_000.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Colour of an event mark, or None for events left off the plot.
fn event_colour(what: &str) -> Option<&'static str> {
    if what.contains("killed") {
        Some("#9467bd")
    } else if what.contains("netns deleted") {
        Some("#7f0000")
    } else if what.starts_with("table:") {
        Some("#1f77b4")
    } else if what.starts_with("world: new") {
        Some("#2ca02c")
    } else {
        None
    }
}

fn nice_max(x: u64) -> u64 {
    let x = x.max(1);
    let mag = 10u64.pow((x as f64).log10().floor() as u32);
    for m in [1, 2, 5, 10] {
        if x <= m * mag {
            return m * mag;
        }
    }
    10 * mag
}

/// The SVG document.
pub fn svg(panels: &[Panel<'_>]) -> String {
    let h = PANEL_H * panels.len().max(1) as f64 + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{h}" fill="white"/>"#);
    for (k, p) in panels.iter().enumerate() {
        panel(&mut s, p, k as f64 * PANEL_H);
    }
    // Legend.
    let y = h - 14.0;
    let items = [
        ("#2ca02c", "ok/s"),
        ("#d62728", "errors/s"),
        ("#ff7f0e", "p99 ms (right, log)"),
        ("#2ca02c", "new pod up"),
        ("#1f77b4", "table update"),
        ("#9467bd", "old pod killed"),
        ("#7f0000", "netns deleted"),
    ];
    let mut x = LEFT;
    for (c, label) in items {
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{}" width="10" height="10" fill="{c}"/><text x="{}" y="{y}">{}</text>"#,
            y - 9.0,
            x + 14.0,
            esc(label)
        );
        x += 14.0 + 6.0 * label.len() as f64 + 14.0;
    }
    s.push_str("</svg>\n");
    s
}

fn panel(s: &mut String, p: &Panel<'_>, y0: f64) {
    let plot_w = W - LEFT - RIGHT;
    let plot_h = PANEL_H - TOP - BOTTOM;
    let (top, bottom) = (y0 + TOP, y0 + TOP + plot_h);
    let secs = p.timeline.len().max(1) as f64;
    let bw = plot_w / secs;
    let ymax = nice_max(p.timeline.iter().map(|t| t.attempted).max().unwrap_or(1));
    let y_of = |v: f64| bottom - v / ymax as f64 * plot_h;
    let p99_y = |ms: f64| {
        let l = (ms.clamp(P99_MIN, P99_MAX) / P99_MIN).log10() / (P99_MAX / P99_MIN).log10();
        bottom - l * plot_h
    };
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="{}" font-size="13" font-weight="bold">{}</text>"#,
        y0 + 18.0,
        esc(&p.title)
    );
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>"##
    );
    // Left axis: connections per second.
    for v in [0, ymax / 2, ymax] {
        let y = y_of(v as f64);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{v}</text>"#,
            LEFT - 4.0,
            y + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">conn/s</text>"#,
        (top + bottom) / 2.0,
        (top + bottom) / 2.0
    );
    // Right axis: p99.
    for ms in [1.0, 10.0, 100.0, 1000.0, 10_000.0] {
        let y = p99_y(ms);
        let label = if ms >= 1000.0 {
            format!("{}s", ms / 1000.0)
        } else {
            format!("{ms}ms")
        };
        let _ = writeln!(
            s,
            r##"<line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/><text x="{}" y="{}">{label}</text>"##,
            LEFT,
            LEFT + plot_w,
            LEFT + plot_w + 4.0,
            y + 4.0
        );
    }
    // Bars: ok below, errors stacked on top.
    for (i, t) in p.timeline.iter().enumerate() {
        let x = LEFT + i as f64 * bw + bw * 0.1;
        let w = bw * 0.8;
        let ok_top = y_of(t.ok as f64);
        let err_top = y_of((t.ok + t.errors) as f64);
        if t.ok > 0 {
            let _ = writeln!(
                s,
                r##"<rect x="{x:.1}" y="{ok_top:.1}" width="{w:.1}" height="{:.1}" fill="#2ca02c" fill-opacity="0.6"/>"##,
                bottom - ok_top
            );
        }
        if t.errors > 0 {
            let _ = writeln!(
                s,
                r##"<rect x="{x:.1}" y="{err_top:.1}" width="{w:.1}" height="{:.1}" fill="#d62728"/><text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#d62728">{}</text>"##,
                ok_top - err_top,
                x + w / 2.0,
                err_top - 3.0,
                t.errors
            );
        }
    }
    // Second boundaries: bar i covers [i, i+1).
    for i in 0..=p.timeline.len() {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{i}</text>"#,
            LEFT + i as f64 * bw,
            bottom + 14.0
        );
    }
    // p99 line.
    let pts: Vec<String> = p
        .timeline
        .iter()
        .enumerate()
        .filter(|(_, t)| t.ok > 0)
        .map(|(i, t)| format!("{:.1},{:.1}", LEFT + (i as f64 + 0.5) * bw, p99_y(t.p99_ms)))
        .collect();
    if !pts.is_empty() {
        let _ = writeln!(
            s,
            r##"<polyline points="{}" fill="none" stroke="#ff7f0e" stroke-width="2"/>"##,
            pts.join(" ")
        );
    }
    // Events.
    for e in p.events {
        let Some(c) = event_colour(&e.what) else {
            continue;
        };
        let x = LEFT + e.t_s / secs * plot_w;
        let _ = writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{bottom}" stroke="{c}" stroke-dasharray="4,3"><title>{:.2}s {}</title></line>"#,
            e.t_s,
            esc(&e.what)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">seconds since the load started</text>"#,
        LEFT + plot_w / 2.0,
        bottom + 28.0
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sec(t: u64, ok: u64, errors: u64, p99: f64) -> Second {
        Second {
            t,
            attempted: ok + errors,
            ok,
            errors,
            p99_ms: p99,
            max_ms: p99,
            events: Vec::new(),
        }
    }

    #[test]
    fn one_panel_per_run_with_bars_line_and_marks() {
        let tl = vec![
            sec(0, 200, 0, 1.0),
            sec(1, 150, 50, 300.0),
            sec(2, 200, 0, 2.0),
        ];
        let ev = vec![
            Event::new(Duration::from_millis(1300), "world: old-1 process killed"),
            Event::new(Duration::from_millis(1800), "world: old-1 netns deleted"),
            Event::new(
                Duration::from_millis(2100),
                "sluice: table live generation=3",
            ),
            Event::new(Duration::from_millis(2200), "table: -old-1 <x>"),
        ];
        let panels = vec![
            Panel {
                title: "nft, ARP fresh".into(),
                timeline: &tl,
                events: &ev,
            },
            Panel {
                title: "sluice & co".into(),
                timeline: &tl,
                events: &[],
            },
        ];
        let s = svg(&panels);
        assert!(s.starts_with("<svg"));
        assert!(s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<polyline").count(), 2);
        // 3 kept events, the sluice generation line left off.
        assert_eq!(s.matches("stroke-dasharray").count(), 3);
        assert!(s.contains("sluice &amp; co"));
        assert!(s.contains("table: -old-1 &lt;x&gt;"));
        assert!(s.contains(">50</text>"), "error count labelled");
        assert_eq!(s.matches('<').count(), s.matches('>').count());
    }

    #[test]
    fn nice_axis_maxima() {
        assert_eq!(nice_max(0), 1);
        assert_eq!(nice_max(180), 200);
        assert_eq!(nice_max(201), 500);
        assert_eq!(nice_max(1000), 1000);
    }
}

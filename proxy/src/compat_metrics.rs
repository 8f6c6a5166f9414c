//! Metrics under the names operators already chart and alert on: the
//! standard `process_*` series, and kube-proxy's where sluice has the same
//! meaning (docs/operations.md lists which):
//! - `kubeproxy_sync_proxy_rules_last_timestamp_seconds`: the last time the
//!   live table was confirmed against the sources' input (any publish,
//!   changed or not), as kube-proxy's last successful sync;
//! - `kubeproxy_sync_proxy_rules_duration_seconds` and
//!   `kubeproxy_network_programming_duration_seconds`: registered by the
//!   daemon from the Kubernetes source's histograms (see `main.rs`).
//!
//! Both collectors are read at each scrape, so they cost nothing between
//! scrapes. `/proc` is read with `procfs`; a value that cannot be read
//! (say, no descriptor left to open `/proc/self/fd`) is left out of that
//! scrape rather than reported wrong.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use procfs::WithCurrentSystemInfo as _;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use sluice_control::Publisher;

/// `process_*` of this process, as client_golang's process collector.
#[derive(Debug, Default)]
pub struct ProcessCollector;

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: Option<f64>,
) -> std::fmt::Result {
    let Some(v) = value else { return Ok(()) };
    let g = ConstGauge::new(v);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let me = procfs::process::Process::myself().ok();
        let stat = me.as_ref().and_then(|p| p.stat().ok());
        let ticks = procfs::ticks_per_second() as f64;
        if let Some(s) = &stat {
            let cpu = ConstCounter::new((s.utime + s.stime) as f64 / ticks);
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
                None,
                cpu.metric_type(),
            )?)?;
        }
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            stat.as_ref().map(|s| s.rss_bytes().get() as f64),
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            stat.as_ref().map(|s| s.vsize as f64),
        )?;
        gauge(
            &mut encoder,
            "process_threads",
            "Number of OS threads in the process.",
            stat.as_ref().map(|s| s.num_threads as f64),
        )?;
        let boot = procfs::boot_time_secs().ok();
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            stat.as_ref()
                .zip(boot)
                .map(|(s, b)| b as f64 + s.starttime as f64 / ticks),
        )?;
        gauge(
            &mut encoder,
            "process_open_fds",
            "Number of open file descriptors.",
            me.as_ref()
                .and_then(|p| p.fd_count().ok())
                .map(|n| n as f64),
        )?;
        let max = me.as_ref().and_then(|p| p.limits().ok()).and_then(|l| {
            match l.max_open_files.soft_limit {
                procfs::process::LimitValue::Value(v) => Some(v as f64),
                procfs::process::LimitValue::Unlimited => None,
            }
        });
        gauge(
            &mut encoder,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            max,
        )
    }
}

/// `kubeproxy_sync_proxy_rules_last_timestamp_seconds` from the publisher.
#[derive(Debug)]
pub struct LastSync(pub Arc<Publisher>);

impl Collector for LastSync {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let at = self
            .0
            .last_synced()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .ok();
        gauge(
            &mut encoder,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time the live table was confirmed against the sources' input (kube-proxy: the last time proxy rules were successfully synced)",
            at,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn value(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
    }

    #[test]
    fn process_and_last_sync_series_read_this_process() {
        let publisher = Arc::new(Publisher::new());
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        registry.register_collector(Box::new(LastSync(publisher.clone())));
        let render = |r: &Registry| {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, r).unwrap();
            text
        };
        let text = render(&registry);
        assert!(
            value(&text, "process_resident_memory_bytes") > 1e6,
            "{text}"
        );
        assert!(value(&text, "process_open_fds") >= 3.0, "{text}");
        assert!(value(&text, "process_threads") >= 1.0, "{text}");
        let start = value(&text, "process_start_time_seconds");
        let now = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            start > now - 3600.0 && start <= now + 1.0,
            "{start} vs {now}"
        );
        let first = value(&text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds");
        std::thread::sleep(std::time::Duration::from_millis(20));
        publisher.settle_unchanged();
        let later = value(
            &render(&registry),
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        );
        assert!(later > first, "{first} then {later}");
    }
}

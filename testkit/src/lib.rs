//! The test kit shared by sluice's tests and `sluice-bench`: run the real
//! `sluice` binary and learn its state from its admin endpoints
//! ([`daemon`]), one HTTP GET for those endpoints ([`http`]), named echo
//! backends ([`backend`]), network namespaces ([`netns`]), the upgrade
//! scenario on a mini node ([`upgrade`]), and a process's live children
//! ([`process`]).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod backend;
pub mod daemon;
pub mod http;
pub mod netns;
pub mod process;
pub mod upgrade;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

pub use daemon::{Daemon, Options, StopReport};

/// Where `tool` is on PATH, the lookup a command run by its bare name
/// gets; None when it is not there.
pub fn on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// First and one past the last port [`free_port`] hands out: below the
/// kernel's ephemeral range (`ip_local_port_range`, 32768-60999 by
/// default), so that no outgoing connection of a test running in parallel
/// can take the port as its source port between the check and the use
/// (seen: `bind` then failing with EADDRINUSE), and above the well-known
/// ports sluice and kube-proxy use by default (10249, 10256, 10261).
const FREE_PORTS: (u16, u16) = (12_000, 20_000);

/// A TCP port free right now on `ip` (bound and released), and never
/// handed out before by this process: the kernel may give a released port
/// again to the next `bind(0)`, and two sluice sockets on one address
/// (both SO_REUSEPORT, e.g. a Service listener and the metrics endpoint of
/// a test, or of two tests running in parallel) would share its
/// connections instead of failing. Ports come from [`FREE_PORTS`], in turn
/// from a start that depends on the process id, so that test processes
/// running at once start far apart.
pub fn free_port(ip: impl Into<IpAddr>) -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ip = ip.into();
    let (low, high) = (u32::from(FREE_PORTS.0), u32::from(FREE_PORTS.1));
    let span = high - low;
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        if n >= span {
            break; // every port of the range handed out once
        }
        let port = u16::try_from(low + (start + n) % span).unwrap_or(FREE_PORTS.0);
        if std::net::TcpListener::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::other(format!(
        "no free port on {ip} in {}..{} that this process has not handed out already",
        FREE_PORTS.0, FREE_PORTS.1
    )))
}

/// A TCP port free right now on every one of `ips` (an EndpointSlice has
/// one port number for all its endpoints, so backends on several loopback
/// addresses need one).
pub fn common_port(ips: &[IpAddr]) -> std::io::Result<u16> {
    let (first, rest) = ips
        .split_first()
        .ok_or_else(|| std::io::Error::other("common_port of no address"))?;
    for _ in 0..50 {
        let port = free_port(*first)?;
        if rest
            .iter()
            .all(|ip| std::net::TcpListener::bind((*ip, port)).is_ok())
        {
            return Ok(port);
        }
    }
    Err(std::io::Error::other(format!(
        "no port free on all of {ips:?}"
    )))
}

/// An address on 127.0.0.1 whose port is free right now.
pub fn free_addr() -> std::io::Result<SocketAddr> {
    Ok(SocketAddr::new(
        Ipv4Addr::LOCALHOST.into(),
        free_port(Ipv4Addr::LOCALHOST)?,
    ))
}

/// The value of one series (`name` or `name{labels}`, written exactly as
/// the exposition writes it) in Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_reads_one_exact_series() {
        let text = "# TYPE sluice_table_generation gauge\nsluice_table_generation 7\nsluice_table_generation_x 9\nsluice_closed_total{reason=\"cut\"} 2\n";
        assert_eq!(metric(text, "sluice_table_generation"), Some(7.0));
        assert_eq!(
            metric(text, "sluice_closed_total{reason=\"cut\"}"),
            Some(2.0)
        );
        assert_eq!(metric(text, "sluice_closed_total"), None);
        assert_eq!(metric(text, "absent"), None);
    }

    #[test]
    fn free_port_is_bindable() {
        let a = free_addr().unwrap();
        std::net::TcpListener::bind(a).unwrap();
    }
}

//! The rolling update both `rollout` (on loopback, [`crate::rollout`]) and
//! `rollout --netns` (on a mini node in network namespaces,
//! [`crate::netns`]) run: its options, its schedule and the checks they
//! share. Both import this module; neither imports the other.
//!
//! For backend i (t = a_i, a_0 = warm-up, a_{i+1} = b_i):
//! - world  a_i:           new-i starts, ready
//! - table  a_i + lag:     new-i added (ready)
//! - world  b_i = a_i+lag: old-i terminating (still serving)
//! - table  b_i + lag:     old-i ready=false serving=true terminating=true
//! - world  c_i = b_i+grace: old-i dies: listener closed, connections RST
//! - table  c_i + lag:     old-i removed
//!
//! Between c_i and b_i + lag the table still lists a dead backend as ready:
//! only sluice's dial retry keeps that from the clients.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use crate::sluice::SluiceArgs;

#[derive(Debug, Clone, clap::Args)]
pub struct RolloutArgs {
    /// New connections per second (open loop).
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Length of the load; default: the rollout schedule plus 1s.
    #[arg(long, value_name = "DURATION")]
    pub duration: Option<humantime::Duration>,
    /// Control-plane lag: the table reflects each world event this late (>= 1s).
    #[arg(long, default_value = "1.5s", value_name = "DURATION")]
    pub lag: humantime::Duration,
    /// Time from "terminating" to the old backend's death.
    #[arg(long, default_value = "300ms", value_name = "DURATION")]
    pub grace: humantime::Duration,
    /// How an old backend dies: `refuse` (process gone: dials refused at
    /// once) or `blackhole` (network gone: SYNs vanish, dials time out).
    #[arg(long, value_enum, default_value_t = Death::Refuse)]
    pub death: Death,
    /// Number of old backends, each replaced by a new one.
    #[arg(long, default_value_t = 3)]
    pub backends: u8,
    /// Load before the first event.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub warmup: humantime::Duration,
    /// Per-connection client deadline.
    #[arg(long, default_value = "3s", value_name = "DURATION")]
    pub client_timeout: humantime::Duration,
    /// Size of the source-port pool clients bind from.
    #[arg(long, default_value_t = 64)]
    pub source_ports: u16,
    /// First port of the pool (default: random in 20000..30000).
    #[arg(long)]
    pub source_port_base: Option<u16>,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Exit 0 even if clients saw errors.
    #[arg(long)]
    pub allow_errors: bool,
    #[command(flatten)]
    pub sluice: SluiceArgs,
    /// `--netns` and its options: the same rollout on a mini node in
    /// network namespaces (see `crate::netns`).
    #[command(flatten)]
    pub netns: NetnsArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Death {
    /// Listener closed, connections RST: dials get ECONNREFUSED.
    Refuse,
    /// Then new SYNs are dropped: dials hang until sluice's connect timeout.
    Blackhole,
}

/// One step of the scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// World: new-i starts and is ready.
    StartNew(usize),
    /// World: old-i is told to terminate (keeps serving).
    WorldTerminating(usize),
    /// World: old-i dies.
    Kill(usize),
    /// Table: new-i added, ready.
    TableAdd(usize),
    /// Table: old-i terminating (serving).
    TableTerminating(usize),
    /// Table: old-i removed.
    TableRemove(usize),
}

impl Action {
    pub fn is_table(self) -> bool {
        matches!(
            self,
            Action::TableAdd(_) | Action::TableTerminating(_) | Action::TableRemove(_)
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    pub at: Duration,
    pub action: Action,
}

/// The schedule, sorted by time; at equal times world events come first.
pub fn plan(n: usize, warmup: Duration, lag: Duration, grace: Duration) -> Vec<Planned> {
    let mut v = Vec::with_capacity(n * 6);
    let mut a = warmup;
    for i in 0..n {
        let b = a + lag;
        let c = b + grace;
        v.push(Planned {
            at: a,
            action: Action::StartNew(i),
        });
        v.push(Planned {
            at: a + lag,
            action: Action::TableAdd(i),
        });
        v.push(Planned {
            at: b,
            action: Action::WorldTerminating(i),
        });
        v.push(Planned {
            at: b + lag,
            action: Action::TableTerminating(i),
        });
        v.push(Planned {
            at: c,
            action: Action::Kill(i),
        });
        v.push(Planned {
            at: c + lag,
            action: Action::TableRemove(i),
        });
        a = b;
    }
    v.sort_by_key(|p| (p.at, p.action.is_table()));
    v
}

/// The data path clients go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// sluice in the node's namespace (see --intercept).
    Sluice,
    /// nftables DNAT in kube-proxy's nftables shape.
    Nft,
}

/// How sluice receives Service traffic on the mini node (`--intercept`,
/// passed to sluice explicitly, whatever its own default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Intercept {
    /// The VIP on an ifb device, a socket bound to it.
    Bind,
    /// sluice's own nftables table redirects the VIP to its intercept
    /// port; no VIP on any device.
    Nftables,
}

impl Intercept {
    pub fn as_str(self) -> &'static str {
        match self {
            Intercept::Bind => "bind",
            Intercept::Nftables => "nftables",
        }
    }
}

/// The node's ARP entry for the dead pod once its namespace is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arp {
    /// Still REACHABLE with the old MAC: SYNs vanish (black hole).
    Fresh,
    /// Set to FAILED when the namespace goes: each connect waits for ARP
    /// (~3 s) and ends in `No route to host`.
    Failed,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Sluice => "sluice",
            Via::Nft => "nft",
        }
    }
}

impl Arp {
    pub fn as_str(self) -> &'static str {
        match self {
            Arp::Fresh => "fresh",
            Arp::Failed => "failed",
        }
    }
}

/// Options of `rollout --netns`.
#[derive(Debug, Clone, clap::Args)]
pub struct NetnsArgs {
    /// Run the rollout on a mini node in network namespaces (needs root,
    /// iproute2; nftables for --via nft). With --netns, --lag defaults to
    /// 3s, --client-timeout to 5s and --source-ports to 1024.
    #[arg(long)]
    pub netns: bool,
    /// Data paths to run, comma-separated: sluice, nft.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "sluice",
        requires = "netns"
    )]
    pub via: Vec<Via>,
    /// With --via sluice: how sluice receives the Service traffic,
    /// comma-separated: bind (VIP on an ifb device, bound socket),
    /// nftables (sluice's nftables table redirects it to sluice's
    /// intercept port). Each is one sluice run per ARP variant.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "bind",
        requires = "netns"
    )]
    pub intercept: Vec<Intercept>,
    /// ARP variants to run, comma-separated: fresh, failed.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fresh,failed",
        requires = "netns"
    )]
    pub arp: Vec<Arp>,
    /// From an old pod's death to the deletion of its namespace.
    #[arg(
        long,
        default_value = "500ms",
        value_name = "DURATION",
        requires = "netns"
    )]
    pub ns_delay: humantime::Duration,
    /// Write the timelines as an SVG plot to this file.
    #[arg(long, value_name = "FILE.svg", requires = "netns")]
    pub plot: Option<PathBuf>,
    /// tcp: the built-in backend, new connections. udp: DNS pods
    /// (dnsmasq) under an open-loop query load on UDP port 53.
    #[arg(long, value_enum, default_value = "tcp", requires = "netns")]
    pub proto: Proto,
}

/// The rollout's protocol with `--netns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

/// sluice's RUST_LOG for the rollout (unless RUST_LOG is set): its
/// per-connection debug lines say which dials failed and which client
/// connections needed a retry.
pub const SLUICE_LOG: &str = "info,sluice_proxy::server=debug";

/// The control-plane lag: at least 1s.
pub fn check_lag(lag: Duration) -> Result<()> {
    anyhow::ensure!(
        lag >= Duration::from_secs(1),
        "--lag must be >= 1s (got {})",
        humantime::format_duration(lag)
    );
    Ok(())
}

/// How long the load runs: `--duration`, or 1s past the schedule's last
/// step (`schedule_end`). It must cover the schedule and be at most 10
/// minutes.
pub fn load_duration(
    duration: Option<humantime::Duration>,
    schedule_end: Duration,
) -> Result<Duration> {
    let min = schedule_end + Duration::from_secs(1);
    let duration: Duration = duration.map(Into::into).unwrap_or(min);
    anyhow::ensure!(
        duration >= min,
        "--duration {} is shorter than the rollout schedule ({:.1}s)",
        humantime::format_duration(duration),
        min.as_secs_f64()
    );
    anyhow::ensure!(
        duration <= Duration::from_secs(600),
        "--duration must be at most 10 minutes"
    );
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(p: &[Planned], a: Action) -> Duration {
        p.iter().find(|x| x.action == a).unwrap().at
    }

    #[test]
    fn plan_follows_world_with_lag() {
        let s = Duration::from_secs_f64;
        let p = plan(3, s(1.0), s(1.5), s(0.3));
        assert_eq!(p.len(), 18);
        assert!(p.windows(2).all(|w| w[0].at <= w[1].at));
        for i in 0..3 {
            let start = at(&p, Action::StartNew(i));
            assert_eq!(at(&p, Action::TableAdd(i)), start + s(1.5));
            let term = at(&p, Action::WorldTerminating(i));
            assert_eq!(term, start + s(1.5));
            assert_eq!(at(&p, Action::TableTerminating(i)), term + s(1.5));
            let kill = at(&p, Action::Kill(i));
            assert_eq!(kill, term + s(0.3));
            assert_eq!(at(&p, Action::TableRemove(i)), kill + s(1.5));
            // The dead backend is still listed ready for lag - grace.
            assert!(kill < at(&p, Action::TableTerminating(i)));
        }
        assert_eq!(
            at(&p, Action::StartNew(1)),
            at(&p, Action::WorldTerminating(0))
        );
        assert_eq!(p.last().unwrap().action, Action::TableRemove(2));
        assert!((p.last().unwrap().at.as_secs_f64() - 7.3).abs() < 1e-9);
    }

    #[test]
    fn world_before_table_at_the_same_instant() {
        let s = Duration::from_secs_f64;
        let p = plan(2, s(1.0), s(1.0), s(0.5));
        let same: Vec<Action> = p
            .iter()
            .filter(|x| x.at == s(2.0))
            .map(|x| x.action)
            .collect();
        assert_eq!(
            same,
            vec![
                Action::WorldTerminating(0),
                Action::StartNew(1),
                Action::TableAdd(0)
            ]
        );
    }

    #[test]
    fn lag_and_duration_checks() {
        let s = Duration::from_secs_f64;
        assert!(check_lag(s(1.0)).is_ok());
        let e = check_lag(s(0.5)).unwrap_err().to_string();
        assert!(e.contains("--lag must be >= 1s (got 500ms)"), "{e}");
        assert_eq!(load_duration(None, s(7.3)).unwrap(), s(8.3));
        let given = |t: &str| Some(t.parse::<humantime::Duration>().unwrap());
        assert_eq!(load_duration(given("20s"), s(7.3)).unwrap(), s(20.0));
        let e = load_duration(given("5s"), s(7.3)).unwrap_err().to_string();
        assert!(
            e.contains("shorter than the rollout schedule (8.3s)"),
            "{e}"
        );
        let e = load_duration(given("11m"), s(7.3)).unwrap_err().to_string();
        assert!(e.contains("at most 10 minutes"), "{e}");
        assert!(load_duration(None, s(600.0)).is_err());
    }
}

//! `sluice-bench sched`: the schedulers (issue 15 item 8), in process.
//!
//! For each scheduler and each `--backends` count: the cost of one pick
//! (`sluice_proxy::balance::pick` against the daemon's own [`Tracker`],
//! every backend known to it, a new client IP for each pick out of 65,536),
//! as the mean over `--picks` picks on one thread. For Maglev and source
//! hashing: the time to build the Service (Maglev fills its lookup table
//! there), and the fraction of `--clients` client IPs whose backend changes
//! when one of the N backends leaves (each one in turn: mean and worst)
//! and when an N+1st joins. The ideal is 1/N (leave) and 1/(N+1) (join).

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use sluice_control::{Backend, Conditions, Policy, Service};
use sluice_proxy::balance::{PickContext, ServiceRuntime, pick};
use sluice_proxy::metrics::Metrics;
use sluice_proxy::tracker::{Tracker, TrackerConfig};

/// Options of `sluice-bench sched`.
#[derive(Debug, Clone, Args)]
pub struct SchedArgs {
    /// Picks timed per scheduler and backend count.
    #[arg(long, default_value_t = 1_000_000)]
    pub picks: u32,
    /// Backend counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10,100")]
    pub backends: Vec<u16>,
    /// Client IPs for the remap fractions.
    #[arg(long, default_value_t = 100_000)]
    pub clients: u32,
}

fn backend(i: u16) -> SocketAddr {
    let [hi, lo] = i.to_be_bytes();
    SocketAddr::from(([10, 1, hi, lo], 8080))
}

/// Client `i` of a pool of distinct addresses (10.200.0.0/16 and up).
fn client(i: u32) -> IpAddr {
    std::net::Ipv4Addr::from(((10 << 24) | (200 << 16)) + i).into()
}

fn service(policy: Policy, backends: impl Iterator<Item = u16>) -> Service {
    let backends = backends
        .map(|i| Backend::new(backend(i), Conditions::READY))
        .collect();
    Service::new("bench", policy, None, backends)
}

/// The fraction of `clients` whose pick differs between `a` and `b`.
fn remapped(a: &Service, b: &Service, tracker: &Tracker, clients: u32) -> f64 {
    let rt = ServiceRuntime::default();
    let now = Instant::now();
    let at = |s: &Service, client_ip: IpAddr| {
        let ctx = PickContext {
            health: tracker,
            client_ip,
            exclude: &[],
            now,
        };
        pick(s, &rt, &ctx)
    };
    let moved = (0..clients)
        .map(client)
        .filter(|&ip| at(a, ip) != at(b, ip))
        .count();
    moved as f64 / f64::from(clients.max(1))
}

/// Runs the bench and prints its figures.
pub fn run(args: SchedArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.picks > 0, "--picks must be at least 1");
    anyhow::ensure!(
        args.backends.iter().all(|&n| (2..=10_000).contains(&n)),
        "--backends must be counts in 2..=10000"
    );
    let tracker = Tracker::new(
        TrackerConfig {
            eject_base: Duration::from_secs(1),
            eject_max: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(60),
        },
        Default::default(),
        Arc::new(Metrics::new()),
    );
    let max = args.backends.iter().copied().max().unwrap_or(0);
    for i in 0..=max {
        drop(tracker.connect(backend(i)));
    }
    outln!("sluice-bench sched: {} picks each, one thread", args.picks);
    for &n in &args.backends {
        outln!("\n{n} backends");
        for policy in Policy::ALL {
            let built = Instant::now();
            let s = service(policy, 0..n);
            let build = built.elapsed();
            let rt = ServiceRuntime::default();
            let started = Instant::now();
            for i in 0..args.picks {
                let ctx = PickContext {
                    health: &tracker,
                    client_ip: client(i & 0xffff),
                    exclude: &[],
                    now: started,
                };
                black_box(pick(black_box(&s), &rt, &ctx));
            }
            let per_pick = started.elapsed().as_nanos() as f64 / f64::from(args.picks);
            out!("  {:<18} pick {per_pick:6.1} ns", policy.name());
            if policy.hashes_client() {
                let leave: Vec<f64> = (0..n)
                    .map(|gone| {
                        let less = service(policy, (0..n).filter(|&i| i != gone));
                        remapped(&s, &less, &tracker, args.clients)
                    })
                    .collect();
                let mean = leave.iter().sum::<f64>() / leave.len() as f64;
                let worst = leave.iter().copied().fold(0.0, f64::max);
                let join = remapped(&s, &service(policy, 0..=n), &tracker, args.clients);
                out!(
                    "   build {:7.1} µs   one leaves: {:.2}% moved (mean; worst {:.2}%; ideal {:.2}%)   one joins: {:.2}% (ideal {:.2}%)",
                    build.as_secs_f64() * 1e6,
                    mean * 100.0,
                    worst * 100.0,
                    100.0 / f64::from(n),
                    join * 100.0,
                    100.0 / f64::from(n + 1),
                );
            }
            outln!();
        }
    }
    Ok(())
}

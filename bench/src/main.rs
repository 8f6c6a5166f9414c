//! sluice-bench: scenarios and load for sluice, on loopback, with the real
//! `sluice` binary.
//!
//! Subcommands: `rollout` (rolling update with control-plane lag; 0
//! client-visible errors expected), `churn` (short-lived connections/s and
//! latency, direct vs through sluice), `throughput` (bulk Gbit/s, direct vs
//! through sluice), `control` (control-plane scale: index build and
//! single-slice update cost for thousands of Services), `sched` (pick cost
//! of each scheduler, Maglev's remapping), `serve` (a built-in
//! backend on its own), `dns` (UDP queries/s, direct vs through sluice),
//! `upgrade` (sluice replaced under load on a mini node: hand-over or
//! crash).
//!
//! Modules:
//! - [`backend`]: the built-in backend servers (request/response, sink,
//!   source) and their death (listener closed, connections RST).
//! - [`workload`]: clients: one request/response connection, open- and
//!   closed-loop drivers, the source-port pool, error classification.
//! - [`report`]: hdrhistogram summaries, the per-second timeline with
//!   events, text and JSON forms.
//! - [`sluice`]: locating/building, starting, reconfiguring (atomic write +
//!   SIGHUP), following the log of, and stopping the daemon.
//! - [`plan`]: the rolling update's options and schedule, shared by
//!   [`rollout`] (on loopback) and [`netns`] (the rollout on a mini node in
//!   network namespaces, against nftables DNAT).
//! - [`churn`], [`throughput`], [`compare`]: the other scenarios.
//! - [`check`]: range checks of command-line values.
//! - [`control`]: the control-plane scale bench (counting allocator).
//! - [`sched`]: the schedulers' pick cost and Maglev's remapping.
//!
//! Every address is loopback; every loop is bounded in count and time;
//! children are killed and temp dirs removed on exit, error, Ctrl-C and
//! SIGTERM.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

/// Like `print!`/`println!`, but a closed stdout (`| head`) is not a panic:
/// the run goes on and cleans up.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($t)*);
    }};
}
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

mod backend;
mod check;
mod churn;
mod compare;
mod control;
mod dns;
mod netns;
mod plan;
mod report;
mod rollout;
mod sched;
mod sluice;
mod throughput;
mod upgrade;
mod workload;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "sluice-bench",
    version,
    about = "Load generator and scenarios for sluice"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Rolling update of every backend under open-loop load through sluice,
    /// with a lagging table; exits non-zero on any client-visible error.
    Rollout(plan::RolloutArgs),
    /// Short-lived connections per second and latency, direct vs sluice.
    Churn(churn::ChurnArgs),
    /// Bulk Gbit/s, direct vs sluice.
    Throughput(throughput::ThroughputArgs),
    /// Control-plane scale: index build, single-slice updates, publish,
    /// memory, for thousands of Services.
    Control(control::ControlArgs),
    /// Schedulers: pick cost per connection of each; for Maglev and source
    /// hashing, the clients remapped when one of N backends leaves or joins.
    Sched(sched::SchedArgs),
    /// sluice vs direct, HAProxy and nginx side by side: short connections,
    /// keep-alive requests, bulk, idle memory; proxy pinned to one CPU.
    Compare(compare::CompareArgs),
    /// UDP queries/s (DNS-sized), direct vs through sluice.
    Dns(dns::DnsArgs),
    /// sluice replaced under load on a mini node (root): hand-over (a new
    /// sluice beside the old, SIGTERM) or, with --kill, a crash; exits 1
    /// when a hand-over loses a connection.
    Upgrade(upgrade::UpgradeArgs),
    /// Run one built-in backend (for --target runs by hand).
    Serve(ServeArgs),
    /// Internal: a pod's backend inside a network namespace (`rollout --netns`).
    #[command(hide = true)]
    NetnsPod(netns::PodArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Loopback address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Id the backend answers GET requests with.
    #[arg(long, default_value = "serve")]
    id: String,
    /// Stop after this long.
    #[arg(long = "for", default_value = "10m", value_name = "DURATION")]
    for_: humantime::Duration,
}

async fn serve(args: ServeArgs) -> Result<ExitCode> {
    let b = backend::Backend::start(&args.id, args.listen).await?;
    eprintln!(
        "sluice-bench: backend {} on {} for {}",
        b.id(),
        b.addr(),
        args.for_
    );
    tokio::time::sleep(args.for_.into()).await;
    Ok(ExitCode::SUCCESS)
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Rollout(a) if a.netns.netns => netns::run(a).await,
        Cmd::Rollout(a) => rollout::run(a).await,
        Cmd::Churn(a) => churn::run(a).await,
        Cmd::Throughput(a) => throughput::run(a).await,
        Cmd::Compare(a) => compare::run(a).await,
        Cmd::Dns(a) => dns::run(a).await,
        Cmd::Serve(a) => serve(a).await,
        Cmd::Upgrade(a) => upgrade::run(a).await,
        Cmd::Control(a) => control::run(a).map(|()| ExitCode::SUCCESS),
        Cmd::Sched(a) => sched::run(a).map(|()| ExitCode::SUCCESS),
        Cmd::NetnsPod(a) => netns::pod::run(a).await,
    }
}

/// Resolves on Ctrl-C or SIGTERM, with the signal's name.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice-bench: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // When `run` is dropped (signal), its children are killed (kill_on_drop)
    // and its temp dirs removed; shutting the runtime down ends the tasks.
    let res = rt.block_on(async {
        // A netns pod handles SIGTERM itself: a graceful shutdown.
        let cli = match cli.cmd {
            Cmd::NetnsPod(a) => return netns::pod::run(a).await,
            cmd => Cli { cmd },
        };
        tokio::select! {
            r = run(cli) => r,
            s = interrupted() => Err(anyhow::anyhow!("interrupted by {s}")),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

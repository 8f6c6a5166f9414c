//! `sluice-bench compare`: sluice against the direct path and against the
//! userspace proxies it is judged by (HAProxy `mode tcp`, nginx `stream`),
//! side by side in one run, on loopback.
//!
//! Set-up: the backends and the load run in one single-threaded runtime
//! pinned to the load core; each proxy is started pinned to the proxy core
//! (the affinity is inherited from the thread that spawns it, so a proxy
//! that sizes its thread pool from its CPU mask sees one CPU). Each proxy
//! gets an equivalent configuration written here: one frontend for HTTP and
//! one for bulk, each with one backend, and nothing else.
//!
//! Figures, each over `--seconds`:
//! - short: closed loop of `--concurrency` workers, each opening a
//!   connection, sending one HTTP/1.1 request with `Connection: close`,
//!   reading the response to EOF and checking it byte for byte;
//! - proxy CPU per 10,000 short connections: utime+stime from
//!   /proc/PID/stat over the short phase, divided by the connections;
//! - keep-alive: `--concurrency` connections, each sending requests back to
//!   back and checking every response; requests/s and latency;
//! - bulk: one connection streaming to a sink backend, which counts the
//!   bytes it received (they must equal the bytes sent); Gbit/s;
//! - idle: `--idle` connections opened through the proxy, one keep-alive
//!   request each, then held open; the proxy's VmRSS growth divided by
//!   their number.
//!
//! Every address is loopback, every phase is bounded in time, and every
//! child is killed when the run ends, fails or is interrupted.
//!
//! Here: the options, the rounds over the paths, and the report. Apart:
//! - [`cpu`]: pinning, the descriptor limit, CPU time and RSS from /proc;
//! - [`backends`]: the HTTP and bulk backends, on their own pinned thread;
//! - [`load`]: the short, keep-alive, bulk and idle loads;
//! - [`proxies`]: starting each path (sluice, HAProxy, nginx) pinned;
//! - [`table`]: the text table of a round.

mod backends;
pub(crate) mod cpu;
mod load;
pub(crate) mod proxies;
mod table;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::backend::Backend;
use crate::check;
use crate::sluice::SluiceArgs;
use backends::Backends;
use cpu::{
    allowed_cpus, cpu_seconds, node_cpu_seconds, pin_process, raise_nofile, worker_cpu_seconds,
    worker_shares,
};
use load::{Bulk, Idle, Rate, bulk_upload, idle, keepalive_load, short_load};
use proxies::{Proxy, start_proxy};
use table::table;

#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// Seconds per measured figure.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Concurrent connections of the short and keep-alive loads.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Idle connections held through each proxy for the memory figure (0:
    /// skip it). Each costs two descriptors here and two in the proxy: the
    /// default fits a descriptor limit of 20,000.
    #[arg(long, default_value_t = 8_000)]
    pub idle: usize,
    /// Paths to measure, in order. `sluice` forwards as it does by default
    /// (copy small reads, splice bulk; one worker per CPU it may use);
    /// `sluice-copy` and `sluice-splice` force one way of forwarding
    /// (SLUICE_FORWARD=copy|splice); `sluice-shared` runs without workers
    /// (SLUICE_WORKERS=0: one listener, the shared runtime).
    /// `sluice-nft` runs sluice with `--intercept nftables`: no listener on
    /// the service addresses, its nftables table redirects them to its
    /// intercept port; `sluice-ct` is `sluice` with connection tracking on
    /// (an empty nat chain), to tell the redirect's cost from conntrack's.
    /// `nft-dnat` is kube-proxy's kernel path: no proxy, an nftables table
    /// in kube-proxy's nftables shape (`table ip kube-proxy`, a
    /// `service-ips` verdict map, `numgen random` to endpoint chains that
    /// DNAT, in the nat output and prerouting hooks; conntrack on) sends
    /// each service address to its backend.
    /// Any of these makes the whole run (every path) happen in a network
    /// namespace of its own (root, `nft`), so that the table touches
    /// nothing else; each table is removed when its path ends. haproxy and
    /// nginx are skipped when not installed.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,sluice,sluice-copy,haproxy,nginx"
    )]
    pub paths: Vec<PathKind>,
    /// Figures to take, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "short,keepalive,bulk,idle"
    )]
    pub figures: Vec<Figure>,
    /// Data-plane workers of the `sluice`, `sluice-copy` and
    /// `sluice-splice` paths (SLUICE_WORKERS); default: sluice's own (one
    /// per CPU it may use: one, pinned to --proxy-cpu). With more than one,
    /// the table says how the short phase's CPU time split between them.
    #[arg(long, value_name = "N")]
    pub sluice_workers: Option<u16>,
    /// Another sluice binary (say, a build of an older commit), measured as
    /// the `baseline` path.
    #[arg(long, value_name = "PATH")]
    pub baseline: Option<PathBuf>,
    /// Measure every path this many times, one after the other (the
    /// spread between rounds shows how noisy the machine is).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// CPU the proxy is pinned to.
    #[arg(long, default_value_t = 0)]
    pub proxy_cpu: usize,
    /// CPU the load generator and the backends are pinned to.
    #[arg(long, default_value_t = 1)]
    pub load_cpu: usize,
    /// Start the backends and the proxies, print their addresses, and keep
    /// them up this long instead of measuring (to measure by hand, e.g.
    /// with wrk or iperf3).
    #[arg(long, value_name = "DURATION")]
    pub serve_for: Option<humantime::Duration>,
    /// With --serve-for: point the proxies' bulk frontends at this server
    /// instead of the built-in sink (e.g. `iperf3 -s`, to cross-check the
    /// bulk figures with iperf3).
    #[arg(long, value_name = "IP:PORT")]
    pub bulk_backend: Option<SocketAddr>,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub sluice: SluiceArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    Direct,
    Sluice,
    SluiceCopy,
    SluiceSplice,
    SluiceShared,
    /// sluice with `--intercept nftables` (in the run's own namespace).
    SluiceNft,
    /// sluice bound, with connection tracking on (in the run's own
    /// namespace).
    SluiceCt,
    /// `sluice-nft` with transparent dials: each backend connection is
    /// bound to the client's address (`--source-ip transparent`, loopback
    /// as the local pod network), its replies steered by the mark and the
    /// policy route (in the run's own namespace).
    SluiceTp,
    /// kube-proxy's nftables DNAT, no proxy (in the run's own namespace).
    NftDnat,
    /// The sluice binary given with --baseline (e.g. an older build).
    Baseline,
    Haproxy,
    Nginx,
}

impl PathKind {
    /// Whether it needs the run's own network namespace (nftables).
    fn needs_netns(self) -> bool {
        matches!(
            self,
            PathKind::SluiceNft | PathKind::SluiceCt | PathKind::SluiceTp | PathKind::NftDnat
        )
    }

    /// Its name on the command line (`sluice-copy`), which the table uses.
    fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map_or_else(String::new, |v| v.get_name().to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Figure {
    Short,
    Keepalive,
    Bulk,
    Idle,
}

// ---------------------------------------------------------------- the run

#[derive(Debug, Clone, Serialize)]
pub struct PathResult {
    pub path: PathKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub short: Option<Rate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<Rate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk: Option<Bulk>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<Idle>,
}

impl PathResult {
    fn new(path: PathKind) -> Self {
        Self {
            path,
            skipped: None,
            short: None,
            keepalive: None,
            bulk: None,
            idle: None,
        }
    }

    fn skipped(path: PathKind, why: String) -> Self {
        Self {
            skipped: Some(why),
            ..Self::new(path)
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    seconds: f64,
    concurrency: usize,
    proxy_cpu: usize,
    load_cpu: usize,
    /// The network namespace the run happened in (sluice-nft, sluice-ct).
    #[serde(skip_serializing_if = "Option::is_none")]
    netns: Option<String>,
    /// One list of paths per round.
    rounds: Vec<Vec<PathResult>>,
}

async fn measure(proxy: &Proxy, args: &CompareArgs, sink: &Backend) -> PathResult {
    let pid = proxy.pid();
    let cpu = || pid.and_then(cpu_seconds);
    // This process: the load and the backends (where a client's connect,
    // and the NAT on its way out, are charged).
    let own = || cpu_seconds(std::process::id());
    let mut out = PathResult::new(proxy.kind);
    for fig in &args.figures {
        match fig {
            Figure::Short => {
                let (c0, l0, n0) = (cpu(), own(), node_cpu_seconds());
                let w0 = pid.map(worker_cpu_seconds).unwrap_or_default();
                let mut r = short_load(proxy.http, args.concurrency, args.seconds).await;
                r.set_proxy_cpu(c0, cpu());
                r.set_load_cpu(l0, own());
                r.set_node_cpu(n0, node_cpu_seconds());
                let w1 = pid.map(worker_cpu_seconds).unwrap_or_default();
                r.worker_cpu_share = worker_shares(&w0, &w1);
                out.short = Some(r);
            }
            Figure::Keepalive => {
                let c0 = cpu();
                let mut r = keepalive_load(proxy.http, args.concurrency, args.seconds).await;
                r.set_proxy_cpu(c0, cpu());
                out.keepalive = Some(r);
            }
            Figure::Bulk => {
                let (c0, n0) = (cpu(), node_cpu_seconds());
                let mut b = bulk_upload(proxy.bulk, args.seconds, sink).await;
                b.set_proxy_cpu(c0, cpu());
                b.set_node_cpu(n0, node_cpu_seconds());
                out.bulk = Some(b);
            }
            Figure::Idle => {
                if let (Some(pid), true) = (pid, args.idle > 0) {
                    out.idle = Some(idle(proxy.http, args.idle, pid).await);
                }
            }
        }
        // Let TIME_WAIT churn and the proxy's queues settle between figures.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    out
}

async fn body(args: CompareArgs, netns: Option<String>) -> Result<ExitCode> {
    check::positive_at_most("--seconds", args.seconds, 60.0)?;
    check::in_range("--concurrency", args.concurrency, 1..=1024)?;
    check::in_range("--idle", args.idle, 0..=100_000)?;
    check::in_range("--rounds", args.rounds, 1..=10)?;
    let cpus = allowed_cpus();
    anyhow::ensure!(
        cpus.contains(&args.proxy_cpu) && cpus.contains(&args.load_cpu),
        "--proxy-cpu {} / --load-cpu {}: allowed CPUs are {cpus:?}",
        args.proxy_cpu,
        args.load_cpu
    );
    if args.proxy_cpu == args.load_cpu {
        eprintln!(
            "compare: proxy and load share CPU {}: figures will be low",
            args.proxy_cpu
        );
    }
    pin_process(args.load_cpu)?;
    let nofile = raise_nofile();
    if args.idle > 0 && (nofile as usize) < 2 * args.idle + 256 {
        bail!(
            "--idle {} needs about {} descriptors; the limit is {nofile}",
            args.idle,
            2 * args.idle + 256
        );
    }

    let backends = Backends::start(args.load_cpu)?;
    let b_http = backends.http;
    let b_sink = backends.bulk.addr();
    let b_bulk = match args.bulk_backend {
        Some(a) => {
            anyhow::ensure!(
                a.ip().is_loopback() && args.serve_for.is_some(),
                "--bulk-backend needs a loopback address and --serve-for"
            );
            a
        }
        None => backends.bulk.addr(),
    };
    let bulk_backend = &backends.bulk;

    if !args.json {
        println!(
            "compare: {}s per figure, {} concurrent connections, proxy on CPU {}, load and backends on CPU {}{}",
            args.seconds,
            args.concurrency,
            args.proxy_cpu,
            args.load_cpu,
            netns
                .as_deref()
                .map_or(String::new(), |n| format!(", in network namespace {n}"))
        );
    }
    let mut rounds: Vec<Vec<PathResult>> = Vec::new();
    let mut proxies = Vec::new();
    let n_rounds = if args.serve_for.is_some() {
        1
    } else {
        args.rounds
    };
    for round in 0..n_rounds {
        let mut results = Vec::new();
        for &kind in &args.paths {
            let started = start_proxy(
                kind,
                args.proxy_cpu,
                args.load_cpu,
                &args,
                b_http,
                b_bulk,
                b_sink,
            )
            .await;
            let mut proxy = match started {
                Ok(Some(p)) => p,
                Ok(None) => {
                    let why = if kind == PathKind::Baseline {
                        "no --baseline binary"
                    } else {
                        "not installed"
                    };
                    results.push(PathResult::skipped(kind, why.into()));
                    continue;
                }
                Err(e) => {
                    results.push(PathResult::skipped(kind, format!("failed to start: {e:#}")));
                    continue;
                }
            };
            if args.serve_for.is_some() {
                println!(
                    "{:<13} http {}  bulk {}  pid {}",
                    kind.name(),
                    proxy.http,
                    proxy.bulk,
                    proxy.pid().map_or("-".into(), |p| p.to_string())
                );
                proxies.push(proxy);
                continue;
            }
            if !args.json {
                eprintln!(
                    "compare: round {} of {n_rounds}: measuring {}",
                    round + 1,
                    kind.name()
                );
            }
            let r = measure(&proxy, &args, bulk_backend).await;
            proxy.stop().await;
            results.push(r);
        }
        rounds.push(results);
    }
    if let Some(d) = args.serve_for {
        println!("backends: http {b_http} (HTTP/1.1), bulk {b_bulk} (SINK/SOURCE); up for {d}");
        tokio::time::sleep(d.into()).await;
        for mut p in proxies {
            p.stop().await;
        }
        return Ok(ExitCode::SUCCESS);
    }

    let errors = rounds.iter().flatten().any(|r| {
        r.short.as_ref().is_some_and(|s| s.errors > 0)
            || r.keepalive.as_ref().is_some_and(|s| s.errors > 0)
            || r.bulk.as_ref().is_some_and(|b| b.error.is_some())
            || r.idle.as_ref().is_some_and(|i| i.failed > 0)
    });
    let report = Report {
        scenario: "compare",
        seconds: args.seconds,
        concurrency: args.concurrency,
        proxy_cpu: args.proxy_cpu,
        load_cpu: args.load_cpu,
        netns,
        rounds,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for (i, paths) in report.rounds.iter().enumerate() {
            if report.rounds.len() > 1 {
                println!("round {} of {}:", i + 1, report.rounds.len());
            }
            print!("{}", table(paths));
        }
        println!(
            "short/s: {c} workers, one Connection: close request each; cpu10k: proxy CPU s (/proc/PID/stat) per 10k connections, or per 10k requests after keep/s;\n\
             keep/s: {c} keep-alive connections; p50/p99: keep-alive request latency; Gbit/s: one upload to a sink; s/GB: proxy CPU s per GB moved;\n\
             KiB/idle: VmRSS growth per idle connection; load cpu10k: this process's CPU s (load and backends) per 10k short connections;\n\
             node10k, nodeGB: CPU s of the whole node (/proc/stat, all CPUs, everything but idle and iowait: proxy, load, backends, softirq, and anything else running) per 10k short connections and per GB of bulk;\n\
             +dir: that minus direct's, the path's price per node; *: the node was at least {sat:.0}% busy over the phase (other work included): a saturated node's figure is bounded by the phase's length, not by the path's cost.",
            sat = cpu::NODE_SATURATED * 100.0,
            c = args.concurrency
        );
    }
    Ok(if errors {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs the comparison in its own single-threaded runtime, on its own
/// thread (pinned to the load CPU). If this future is dropped (Ctrl-C),
/// the thread is told to stop, which drops and so kills every child.
pub async fn run(args: CompareArgs) -> Result<ExitCode> {
    // Declared before the thread's joiner, so removed after the thread
    // (and every child) is gone.
    let netns = if args.paths.iter().any(|p| p.needs_netns()) {
        Some(RunNetns::create()?)
    } else {
        None
    };
    let ns_name = netns.as_ref().map(|n| n.0.clone());
    let (cancel_tx, cancel_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("compare".into())
        .spawn(move || {
            // Everything the run makes (sockets, threads, children) lives
            // in the namespace the thread enters first.
            if let Some(ns) = &ns_name
                && let Err(e) = sluice_testkit::netns::enter(ns)
            {
                let _ = done_tx.send(Err(e));
                return;
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = done_tx.send(Err(anyhow::anyhow!("runtime: {e}")));
                    return;
                }
            };
            let r = rt.block_on(async {
                tokio::select! {
                    r = body(args, ns_name.clone()) => r,
                    _ = cancel_rx => Err(anyhow::anyhow!("interrupted")),
                }
            });
            let _ = done_tx.send(r);
        })
        .context("starting the compare thread")?;
    struct Joiner(
        Option<std::thread::JoinHandle<()>>,
        Option<tokio::sync::oneshot::Sender<()>>,
    );
    impl Drop for Joiner {
        fn drop(&mut self) {
            if let Some(tx) = self.1.take() {
                let _ = tx.send(());
            }
            if let Some(t) = self.0.take() {
                // The children are killed as soon as the body is dropped.
                let _ = t.join();
            }
        }
    }
    let _joiner = Joiner(Some(thread), Some(cancel_tx));
    done_rx
        .await
        .context("compare thread ended without a result")?
}

/// The run's own network namespace (`sb-<pid>-0-compare`, `lo` up),
/// removed on drop with whatever still runs in it; a stale one of a dead
/// run is removed by the next `rollout --netns`.
struct RunNetns(String);

impl RunNetns {
    fn create() -> Result<Self> {
        let name = format!(
            "{}{}-0-compare",
            crate::netns::topo::PREFIX,
            std::process::id()
        );
        sluice_testkit::netns::add(&name).with_context(|| {
            format!("sluice-nft and sluice-ct run in a network namespace of their own ({name}): root and iproute2 needed")
        })?;
        Ok(Self(name))
    }
}

impl Drop for RunNetns {
    fn drop(&mut self) {
        sluice_testkit::netns::remove(&self.0);
    }
}

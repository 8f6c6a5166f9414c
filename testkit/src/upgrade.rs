//! The upgrade scenario of issue 14 on a mini node, shared by
//! `proxy/tests/upgrade.rs` and `sluice-bench upgrade`. Needs root, `ip`,
//! `nft` and `sysctl`.
//!
//! Namespace `node` runs sluice (`--intercept nftables`, a file config) and
//! two echo backends on its loopback; namespace `pod`, on a routed veth, is
//! the client: it reaches the ClusterIP [`VIP`] through the node, where
//! sluice's nftables table redirects it to the intercept port. The load is
//! a steady storm of short connections (each one write, its echo checked,
//! close) plus long-lived streams that carry data both ways (each chunk
//! written is read back and checked, byte for byte) and end with a clean
//! half-close.
//!
//! [`Replace::HandOver`]: sluice A serves, B starts beside it, A gets
//! SIGTERM, the streams end by themselves within A's grace.
//! [`Replace::Kill`]: A gets SIGKILL, B starts right after (as the kubelet
//! restarts a crashed container).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::daemon::{Daemon, Options, Signal};
use crate::netns::{self, Netns};

/// The Service the clients reach.
pub const VIP: &str = "10.96.7.10:80";
/// The service's name in the config.
pub const SERVICE: &str = "default/echo:tcp";
const INTERCEPT_PORT: &str = "10261";
/// Bytes per chunk of a long-lived stream, each way.
pub const CHUNK: usize = 4096;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// How the serving sluice is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Replace {
    /// B starts beside A, then A gets SIGTERM.
    HandOver,
    /// A gets SIGKILL, then B starts.
    Kill,
}

/// One run.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The `sluice` binary.
    pub sluice: PathBuf,
    pub replace: Replace,
    /// Long-lived streams.
    pub streams: usize,
    /// Short-connection clients, each back to back.
    pub clients: u64,
    /// `net.ipv4.tcp_migrate_req` in the node.
    pub migrate_req: bool,
    /// Tells this run's namespaces from others' (a few letters).
    pub tag: String,
    /// The config sluice serves, for the two backends' addresses: YAML of
    /// the file source with service [`SERVICE`] on [`VIP`]; `Err` says
    /// what went wrong.
    pub config: fn(&[SocketAddr]) -> Result<String, String>,
}

/// What a run saw.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub short_ok: usize,
    /// Failed short connections: when (seconds since the run started, the
    /// clock of the other times too) and why.
    pub short_failed: Vec<(f64, String)>,
    /// Per stream: bytes sent and echoed, checked; or what broke it.
    pub streams: Vec<Result<u64, String>>,
    /// When A got its signal.
    pub replaced_at: f64,
    /// When B had its first table live.
    pub new_ready_at: f64,
    /// HandOver: A was still running (draining) 2 s after SIGTERM.
    pub old_drained: bool,
    /// A's exit: 0 for a clean exit.
    pub old_exit_code: Option<i32>,
    /// A logged a connection cut at the end of its grace.
    pub old_cut: bool,
    /// Connections B accepted.
    pub new_accepted: f64,
    /// sluice's nftables table is still in the node afterwards.
    pub table_kept: bool,
    /// A's log, the end of it.
    #[serde(skip)]
    pub old_log: String,
}

impl Report {
    /// The first and last short-connection failure.
    pub fn failure_window(&self) -> Option<(f64, f64)> {
        let first = self.short_failed.first()?.0;
        let last = self.short_failed.last()?.0;
        Some((first, last))
    }

    /// Failed short connections by error.
    pub fn failures_by_kind(&self) -> BTreeMap<&str, usize> {
        let mut kinds = BTreeMap::new();
        for (_, e) in &self.short_failed {
            *kinds.entry(e.as_str()).or_insert(0) += 1;
        }
        kinds
    }

    pub fn broken_streams(&self) -> usize {
        self.streams.iter().filter(|s| s.is_err()).count()
    }
}

fn sysctl(ns: &Netns, key: &str, value: &str) -> Result<()> {
    netns::run(
        "ip",
        &[
            "netns",
            "exec",
            ns.name(),
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ],
        None,
    )
}

/// The node and the pod, on a point-to-point veth (the pod routes through
/// the node). Field order is drop order.
pub struct MiniNode {
    pub node: Netns,
    pub pod: Netns,
}

impl MiniNode {
    /// Namespaces `b-up-TAG-node-PID` and `b-up-TAG-pod-PID`.
    pub fn build(tag: &str, migrate_req: bool) -> Result<MiniNode> {
        let pid = std::process::id();
        let node = Netns::new(format!("b-up-{tag}-node-{pid}"))?;
        let pod = Netns::new(format!("b-up-{tag}-pod-{pid}"))?;
        netns::add_veth(node.name(), "vpod", pod.name(), "eth0")?;
        node.ip(&["addr", "add", "10.245.0.1/24", "dev", "vpod"])?;
        node.ip(&["link", "set", "vpod", "up"])?;
        pod.ip(&["addr", "add", "10.245.0.2/24", "dev", "eth0"])?;
        pod.ip(&["link", "set", "eth0", "up"])?;
        pod.ip(&["route", "add", "default", "via", "10.245.0.1"])?;
        let value = if migrate_req { "1" } else { "0" };
        sysctl(&node, "net.ipv4.tcp_migrate_req", value)?;
        Ok(MiniNode { node, pod })
    }

    /// Whether sluice's nftables table is in the node namespace.
    pub fn has_table(&self) -> bool {
        netns::run(
            "ip",
            &[
                "netns",
                "exec",
                self.node.name(),
                "nft",
                "list",
                "table",
                "inet",
                "sluice",
            ],
            None,
        )
        .is_ok()
    }
}

/// An echo server on the calling thread's loopback, as one of the
/// Service's pods.
pub async fn echo_backend() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// A sluice in the calling thread's namespace, not waited for.
fn spawn_sluice(bin: &PathBuf, config: &str) -> Result<Daemon> {
    let flags = [
        ["--intercept", "nftables"],
        ["--intercept-port", INTERCEPT_PORT],
        ["--workers", "2"],
        // Longer than the streams are kept open after the SIGTERM.
        ["--shutdown-grace", "20s"],
    ];
    Daemon::spawn(Options {
        config: Some(config.to_string()),
        args: flags.concat().iter().map(|f| f.to_string()).collect(),
        log_filter: Some("info".into()),
        ..Options::new(bin)
    })
}

/// Controls of the load running in the pod.
#[derive(Clone, Default)]
struct LoadControl {
    /// The streams write a last chunk, half-close and expect a clean end.
    finish_streams: Arc<AtomicBool>,
    /// The short-connection clients stop.
    stop_short: Arc<AtomicBool>,
}

fn chunk(stream: usize, seq: u64) -> Vec<u8> {
    let mut c = vec![0u8; CHUNK];
    for (i, b) in c.iter_mut().enumerate() {
        *b = (stream as u64 * 131 + seq * 7 + i as u64) as u8;
    }
    c
}

fn vip() -> SocketAddr {
    SocketAddr::from(([10, 96, 7, 10], 80))
}

async fn short_connection(n: u64) -> Result<(), String> {
    let io = async {
        let mut s = TcpStream::connect(vip()).await?;
        let msg = format!("short-{n:016}\n");
        s.write_all(msg.as_bytes()).await?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await?;
        if back != msg.as_bytes() {
            return Err(std::io::Error::other("echo differs"));
        }
        s.shutdown().await?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await?;
        if !rest.is_empty() {
            return Err(std::io::Error::other("bytes after the echo"));
        }
        Ok(())
    };
    match tokio::time::timeout(IO_TIMEOUT, io).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

async fn long_stream(id: usize, finish: Arc<AtomicBool>) -> Result<u64, String> {
    let mut s = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(vip()))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let mut seq = 0u64;
    let mut back = vec![0u8; CHUNK];
    loop {
        let done = finish.load(Ordering::Relaxed);
        let c = chunk(id, seq);
        let step = async {
            s.write_all(&c).await?;
            s.read_exact(&mut back).await?;
            Ok::<_, std::io::Error>(())
        };
        match tokio::time::timeout(IO_TIMEOUT, step).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("chunk {seq}: {e}")),
            Err(_) => return Err(format!("chunk {seq}: timed out")),
        }
        if back != c {
            return Err(format!("chunk {seq}: echo differs"));
        }
        seq += 1;
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let end = async {
        s.shutdown().await?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await?;
        Ok::<_, std::io::Error>(rest)
    };
    match tokio::time::timeout(IO_TIMEOUT, end).await {
        Ok(Ok(rest)) if rest.is_empty() => Ok(seq * CHUNK as u64),
        Ok(Ok(rest)) => Err(format!("{} bytes after the last echo", rest.len())),
        Ok(Err(e)) => Err(format!("closing: {e}")),
        Err(_) => Err("closing: timed out".into()),
    }
}

/// What the load saw.
type LoadOutcome = (usize, Vec<(f64, String)>, Vec<Result<u64, String>>);

/// Starts the load in namespace `pod`, on a thread and runtime of its own;
/// `started` is signalled once the streams had time to connect. The
/// handle yields what the load saw once both controls are set.
fn start_load(
    pod: String,
    s: &Scenario,
    t0: Instant,
    ctl: LoadControl,
    started: std::sync::mpsc::Sender<()>,
) -> std::thread::JoinHandle<Result<LoadOutcome>> {
    let (streams, clients) = (s.streams, s.clients);
    std::thread::spawn(move || {
        netns::enter(&pod)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut tasks = Vec::new();
            for id in 0..streams {
                tasks.push(tokio::spawn(long_stream(id, ctl.finish_streams.clone())));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = started.send(());
            let mut workers = Vec::new();
            for w in 0..clients {
                let stop = ctl.stop_short.clone();
                workers.push(tokio::spawn(async move {
                    let (mut ok, mut failed) = (0, Vec::new());
                    let mut n = w << 40;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        match short_connection(n).await {
                            Ok(()) => ok += 1,
                            Err(e) => failed.push((t0.elapsed().as_secs_f64(), e)),
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    (ok, failed)
                }));
            }
            let mut results = Vec::new();
            for t in tasks {
                results.push(t.await?);
            }
            let (mut short_ok, mut short_failed) = (0, Vec::new());
            for w in workers {
                let (ok, failed) = w.await?;
                short_ok += ok;
                short_failed.extend(failed);
            }
            short_failed.sort_by(|a, b| a.0.total_cmp(&b.0));
            Ok((short_ok, short_failed, results))
        })
    })
}

/// Waits for a std channel without blocking the runtime.
async fn recv(rx: std::sync::mpsc::Receiver<()>) -> Result<()> {
    tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(10)))
        .await?
        .map_err(|_| anyhow!("the load did not start"))
}

/// Runs the scenario; `Err` only when it could not be run (set-up).
pub fn run(s: &Scenario) -> Result<Report> {
    let mini = MiniNode::build(&s.tag, s.migrate_req)?;
    let pod = mini.pod.name().to_string();
    let scenario = s.clone();
    let mut report = mini
        .node
        .block_on(Duration::from_secs(120), move || async move {
            replace(&scenario, pod).await
        })??;
    report.table_kept = mini.has_table();
    Ok(report)
}

/// The run itself, in the node's namespace.
async fn replace(s: &Scenario, pod: String) -> Result<Report> {
    let t0 = Instant::now();
    let since = |t: Instant| t.duration_since(t0).as_secs_f64();
    let backends = [echo_backend().await?, echo_backend().await?];
    let config = (s.config)(&backends).map_err(|e| anyhow!("the config: {e}"))?;
    let mut a = spawn_sluice(&s.sluice, &config)?;
    a.wait_generation(1, Duration::from_secs(15)).await?;
    let ctl = LoadControl::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let load = start_load(pod, s, t0, ctl.clone(), tx);
    recv(rx).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut report = Report::default();
    let mut b = match s.replace {
        Replace::HandOver => {
            // B beside A: ready once its first table is live.
            let mut b = spawn_sluice(&s.sluice, &config)?;
            b.wait_generation(1, Duration::from_secs(15)).await?;
            report.new_ready_at = since(Instant::now());
            tokio::time::sleep(Duration::from_millis(500)).await;
            report.replaced_at = since(Instant::now());
            a.signal(Signal::SIGTERM)?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            report.old_drained = a.running();
            b
        }
        Replace::Kill => {
            a.signal(Signal::SIGKILL)?;
            a.wait_exit(Duration::from_secs(5)).await?;
            report.replaced_at = since(Instant::now());
            let mut b = spawn_sluice(&s.sluice, &config)?;
            b.wait_generation(1, Duration::from_secs(15)).await?;
            report.new_ready_at = since(Instant::now());
            tokio::time::sleep(Duration::from_secs(2)).await;
            b
        }
    };
    // The streams end by themselves, well within A's grace.
    ctl.finish_streams.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    ctl.stop_short.store(true, Ordering::Relaxed);
    let (short_ok, short_failed, streams) = tokio::task::spawn_blocking(move || load.join())
        .await?
        .map_err(|_| anyhow!("the load panicked"))??;
    report.short_ok = short_ok;
    report.short_failed = short_failed;
    report.streams = streams;
    let exit: ExitStatus = a.wait_exit(Duration::from_secs(30)).await?;
    report.old_exit_code = exit.code();
    report.old_log = a.log_tail(200);
    report.old_cut = report.old_log.contains("connection cut");
    let metrics = b.scrape().await.context("scraping B")?;
    let series = format!("sluice_connections_accepted_total{{service=\"{SERVICE}\"}}");
    report.new_accepted = crate::metric(&metrics, &series).unwrap_or(0.0);
    if b.running() {
        b.stop(Duration::from_secs(5)).await;
    } else {
        bail!("B exited during the run\n{}", b.log_tail(30));
    }
    Ok(report)
}

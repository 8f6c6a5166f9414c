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

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

use crate::backend::Backend;
use crate::sluice::{self, BackendCfg, Config, ServiceCfg, Sluice, SluiceArgs};

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
    /// (SLUICE_WORKERS=0: one listener, the shared runtime). haproxy and
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
    /// The sluice binary given with --baseline (e.g. an older build).
    Baseline,
    Haproxy,
    Nginx,
}

impl PathKind {
    fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Sluice => "sluice",
            PathKind::SluiceCopy => "sluice-copy",
            PathKind::SluiceSplice => "sluice-splice",
            PathKind::SluiceShared => "sluice-shared",
            PathKind::Baseline => "baseline",
            PathKind::Haproxy => "haproxy",
            PathKind::Nginx => "nginx",
        }
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

// ---------------------------------------------------------------- pinning

fn cpu_set(cpu: usize) -> Result<CpuSet> {
    let mut set = CpuSet::new();
    set.set(cpu)
        .with_context(|| format!("CPU {cpu} out of range"))?;
    Ok(set)
}

/// Pins the calling thread to `cpu`.
fn pin_thread(cpu: usize) -> Result<()> {
    sched_setaffinity(Pid::from_raw(0), &cpu_set(cpu)?)
        .with_context(|| format!("pinning to CPU {cpu}"))
}

/// Pins every thread of this process to `cpu` (the runtime's idle workers
/// and its blocking threads included).
fn pin_process(cpu: usize) -> Result<()> {
    let set = cpu_set(cpu)?;
    for entry in std::fs::read_dir("/proc/self/task").context("listing /proc/self/task")? {
        let Some(tid) = entry?
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // A thread may have exited since the listing.
        let _ = sched_setaffinity(Pid::from_raw(tid), &set);
    }
    Ok(())
}

fn allowed_cpus() -> Vec<usize> {
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => vec![],
    }
}

/// Lifts this process's descriptor soft limit to the hard one (the idle
/// figure holds two descriptors per connection here; proxies inherit it).
fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    const WANT: u64 = 262_144;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    // Root may raise the hard limit too; others get up to theirs.
    if hard < WANT && setrlimit(Resource::RLIMIT_NOFILE, WANT, WANT).is_ok() {
        return WANT;
    }
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

// ---------------------------------------------------------------- /proc

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_seconds_at(&format!("/proc/{pid}/stat"))
}

/// utime + stime from a stat(5) file (a process's or a thread's).
fn cpu_seconds_at(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // state is field 3 of stat(5), so utime (14) and stime (15) are at 11, 12.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let tck = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Some((utime + stime) as f64 / tck)
}

/// utime + stime of each data-plane worker thread of `pid` (named
/// `sluice-wI`), in seconds, by thread id.
fn worker_cpu_seconds(pid: u32) -> Vec<(String, f64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    let mut out: Vec<(String, f64)> = dir
        .filter_map(|e| {
            let tid = e.ok()?.file_name().to_str()?.parse::<u32>().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
            let comm = comm.trim();
            let worker = comm
                .strip_prefix("sluice-w")
                .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()));
            worker.then(|| {
                let cpu = cpu_seconds_at(&format!("/proc/{pid}/task/{tid}/stat"))?;
                Some((tid.to_string(), cpu))
            })?
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// VmRSS of `pid`, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

// ---------------------------------------------------------------- HTTP

const REQ_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
const REQ_KEEP: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
const RESP_CLOSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nConnection: close\r\n\r\nhello, world\n";
const RESP_KEEP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nhello, world\n";

/// A minimal HTTP/1.1 server (enough for this bench and for wrk): every
/// request gets a 13-byte body; `Connection: close` closes after it.
async fn http_backend(listener: TcpListener, stop: Arc<AtomicBool>) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        if stop.load(Ordering::Relaxed) {
            return;
        }
        tokio::spawn(http_conn(s));
    }
}

async fn http_conn(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = [0u8; 4096];
    let mut len = 0;
    loop {
        match s.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
        // Answer every complete request in the buffer (pipelining).
        let mut out: Vec<u8> = Vec::new();
        let mut close = false;
        let mut start = 0;
        while let Some(end) = find(&buf[start..len], b"\r\n\r\n") {
            let head = &buf[start..start + end];
            if contains_ignore_case(head, b"connection: close") {
                close = true;
                out.extend_from_slice(RESP_CLOSE);
                break;
            }
            out.extend_from_slice(RESP_KEEP);
            start += end + 4;
        }
        buf.copy_within(start..len, 0);
        len -= start;
        if len == buf.len() {
            return; // a request head larger than the buffer
        }
        if !out.is_empty() && s.write_all(&out).await.is_err() {
            return;
        }
        if close {
            return;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn contains_ignore_case(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 100 s, 3 significant digits: constant, valid bounds.
    match Histogram::new_with_bounds(1, 100_000_000, 3) {
        Ok(h) => h,
        Err(e) => unreachable!("constant histogram bounds rejected: {e}"),
    }
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        (h.value_at_quantile(q) as f64 / 1000.0 * 1000.0).round() / 1000.0
    }
}

/// One short connection: connect, request with `Connection: close`, read
/// to EOF, compare.
async fn short_once(target: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(target).await else {
        return false;
    };
    let _ = s.set_nodelay(true);
    if s.write_all(REQ_CLOSE).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 256];
    let mut len = 0;
    loop {
        match s.read(&mut buf[len..]).await {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if len == buf.len() {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    &buf[..len] == RESP_CLOSE
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Rate {
    pub ok: u64,
    pub errors: u64,
    pub elapsed_s: f64,
    pub per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Proxy CPU seconds over the phase (none for direct).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_cpu_s: Option<f64>,
    /// Proxy CPU seconds per 10,000 connections (short) or requests
    /// (keep-alive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_cpu_s_per_10k: Option<f64>,
    /// sluice with several workers: each worker thread's share of the
    /// workers' CPU time over the phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_cpu_share: Option<Vec<f64>>,
}

impl Rate {
    /// Records the proxy's CPU time over the phase, from its CPU seconds
    /// before and after (none when either could not be read).
    fn set_proxy_cpu(&mut self, before: Option<f64>, after: Option<f64>) {
        if let (Some(a), Some(b)) = (before, after) {
            self.proxy_cpu_s = Some(round3(b - a));
            if self.ok > 0 {
                self.proxy_cpu_s_per_10k = Some(round3((b - a) / self.ok as f64 * 1e4));
            }
        }
    }
}

fn rate(ok: u64, errors: u64, elapsed: Duration, h: &Histogram<u64>) -> Rate {
    let secs = elapsed.as_secs_f64();
    Rate {
        ok,
        errors,
        elapsed_s: round3(secs),
        per_s: if secs > 0.0 {
            (ok as f64 / secs).round()
        } else {
            0.0
        },
        p50_ms: ms(h, 0.5),
        p99_ms: ms(h, 0.99),
        proxy_cpu_s: None,
        proxy_cpu_s_per_10k: None,
        worker_cpu_share: None,
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

async fn short_load(target: SocketAddr, concurrency: usize, secs: f64) -> Rate {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        set.spawn(async move {
            let mut h = new_hist();
            let (mut ok, mut err) = (0u64, 0u64);
            while Instant::now() < deadline {
                let t = Instant::now();
                let good = tokio::time::timeout(Duration::from_secs(5), short_once(target))
                    .await
                    .unwrap_or(false);
                if good {
                    ok += 1;
                    h.saturating_record(t.elapsed().as_micros().max(1) as u64);
                } else {
                    err += 1;
                }
            }
            (ok, err, h)
        });
    }
    collect(set, start).await
}

async fn keepalive_load(target: SocketAddr, concurrency: usize, secs: f64) -> Rate {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        set.spawn(async move {
            let mut h = new_hist();
            let (mut ok, mut err) = (0u64, 0u64);
            let Ok(mut s) = TcpStream::connect(target).await else {
                return (0, 1, h);
            };
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; 256];
            while Instant::now() < deadline {
                let t = Instant::now();
                let round = tokio::time::timeout(Duration::from_secs(5), async {
                    s.write_all(REQ_KEEP).await?;
                    s.read_exact(&mut buf[..RESP_KEEP.len()]).await?;
                    Ok::<bool, std::io::Error>(&buf[..RESP_KEEP.len()] == RESP_KEEP)
                })
                .await;
                match round {
                    Ok(Ok(true)) => {
                        ok += 1;
                        h.saturating_record(t.elapsed().as_micros().max(1) as u64);
                    }
                    _ => {
                        err += 1;
                        break;
                    }
                }
            }
            (ok, err, h)
        });
    }
    collect(set, start).await
}

async fn collect(
    mut set: tokio::task::JoinSet<(u64, u64, Histogram<u64>)>,
    start: Instant,
) -> Rate {
    let mut h = new_hist();
    let (mut ok, mut err) = (0, 0);
    while let Some(r) = set.join_next().await {
        match r {
            Ok((o, e, hh)) => {
                ok += o;
                err += e;
                let _ = h.add(&hh);
            }
            Err(_) => err += 1,
        }
    }
    rate(ok, err, start.elapsed(), &h)
}

// ---------------------------------------------------------------- bulk

#[derive(Debug, Clone, Default, Serialize)]
pub struct Bulk {
    pub bytes: u64,
    pub elapsed_s: f64,
    pub gbit_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_cpu_s: Option<f64>,
    /// Proxy CPU seconds per GB (10^9 bytes) moved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_cpu_s_per_gb: Option<f64>,
}

/// One connection streams to the sink for `secs`, then half-closes. The
/// figure counts only bytes the sink received: its counter must grow by
/// exactly what was sent (read from the backend's own counter, as a proxy
/// that does not forward half-closes, like nginx 1.22's `stream`, drops the
/// sink's answer).
async fn bulk_upload(target: SocketAddr, secs: f64, sink: &Backend) -> Bulk {
    let before = sink.stats().sink_bytes.load(Ordering::Relaxed);
    let start = Instant::now();
    let r = async {
        let mut s = TcpStream::connect(target).await?;
        s.write_all(b"SINK\n").await?;
        let chunk = vec![0xa5u8; 256 * 1024];
        let deadline = start + Duration::from_secs_f64(secs);
        let mut sent = 0u64;
        while Instant::now() < deadline {
            s.write_all(&chunk).await?;
            sent += chunk.len() as u64;
        }
        s.shutdown().await?;
        let elapsed = start.elapsed();
        let mut resp = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut resp)).await;
        let wait = Instant::now() + Duration::from_secs(10);
        loop {
            let got = sink.stats().sink_bytes.load(Ordering::Relaxed) - before;
            if got == sent {
                break;
            }
            anyhow::ensure!(
                Instant::now() < wait,
                "sink counted {got} bytes, client sent {sent}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok::<(u64, Duration), anyhow::Error>((sent, elapsed))
    }
    .await;
    match r {
        Ok((bytes, elapsed)) => {
            let secs = elapsed.as_secs_f64();
            Bulk {
                bytes,
                elapsed_s: round3(secs),
                gbit_s: round3(bytes as f64 * 8.0 / secs / 1e9),
                error: None,
                proxy_cpu_s: None,
                proxy_cpu_s_per_gb: None,
            }
        }
        Err(e) => Bulk {
            error: Some(format!("{e:#}")),
            ..Bulk::default()
        },
    }
}

// ---------------------------------------------------------------- idle

#[derive(Debug, Clone, Default, Serialize)]
pub struct Idle {
    pub connections: usize,
    pub failed: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// (after − before) / connections.
    pub kib_per_connection: f64,
}

/// Opens `n` connections through `target`, one keep-alive request on
/// each, holds them, and reads the proxy's RSS growth.
async fn idle(target: SocketAddr, n: usize, pid: u32) -> Idle {
    let before = rss_kib(pid).unwrap_or(0);
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    let mut set = tokio::task::JoinSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut started = 0;
    while (started < n || !set.is_empty()) && Instant::now() < deadline {
        while started < n && set.len() < 256 {
            started += 1;
            set.spawn(async move {
                tokio::time::timeout(Duration::from_secs(10), async {
                    let mut s = TcpStream::connect(target).await?;
                    s.write_all(REQ_KEEP).await?;
                    let mut buf = [0u8; RESP_KEEP.len()];
                    s.read_exact(&mut buf).await?;
                    anyhow::ensure!(buf == RESP_KEEP, "bad response");
                    Ok::<TcpStream, anyhow::Error>(s)
                })
                .await
                .ok()
                .and_then(|r| r.ok())
            });
        }
        match set.join_next().await {
            Some(Ok(Some(s))) => held.push(s),
            Some(_) => failed += 1,
            None => break,
        }
    }
    failed += n - held.len() - failed;
    // Let the proxy settle (pooled buffers returned, tasks parked).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid).unwrap_or(0);
    let connections = held.len();
    drop(held);
    Idle {
        connections,
        failed,
        rss_before_kib: before,
        rss_after_kib: after,
        kib_per_connection: if connections > 0 {
            round3(after.saturating_sub(before) as f64 / connections as f64)
        } else {
            0.0
        },
    }
}

// ---------------------------------------------------------------- proxies

/// A proxy under test: where it listens and its pid.
enum Running {
    Sluice(Sluice),
    Other { child: Child, pid: u32 },
}

struct Proxy {
    kind: PathKind,
    http: SocketAddr,
    bulk: SocketAddr,
    running: Option<Running>,
    _dir: Option<tempfile::TempDir>,
}

impl Proxy {
    fn pid(&self) -> Option<u32> {
        match self.running.as_ref()? {
            Running::Sluice(s) => Some(s.pid().unsigned_abs()),
            Running::Other { pid, .. } => Some(*pid),
        }
    }

    async fn stop(&mut self) {
        match self.running.take() {
            Some(Running::Sluice(mut s)) => {
                let _ = s.stop(Duration::from_secs(5)).await;
            }
            Some(Running::Other { mut child, .. }) => {
                let _ = child.kill().await;
            }
            None => {}
        }
    }
}

fn listen_addr() -> Result<SocketAddr> {
    Ok(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        sluice::free_port(Ipv4Addr::LOCALHOST)?,
    ))
}

fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

fn haproxy_config(
    maxconn: u64,
    http: SocketAddr,
    bulk: SocketAddr,
    b_http: SocketAddr,
    b_bulk: SocketAddr,
) -> String {
    format!(
        "global\n  nbthread 1\n  maxconn {maxconn}\n  maxpipes {HAPROXY_MAXPIPES}\n\n\
         defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 10m\n  timeout server 10m\n  option splice-auto\n\n\
         listen http\n  bind {http}\n  server b1 {b_http}\n\n\
         listen bulk\n  bind {bulk}\n  server b1 {b_bulk}\n"
    )
}

/// Pipes HAProxy may hold for splicing (two descriptors each).
const HAPROXY_MAXPIPES: u64 = 500;

/// HAProxy refuses to start unless it can have 2 × maxconn + 2 × maxpipes
/// and a few more descriptors.
fn haproxy_maxconn() -> u64 {
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    (limit.saturating_sub(2 * HAPROXY_MAXPIPES + 300) / 2).clamp(100, 50_000)
}

fn nginx_config(
    dir: &Path,
    http: SocketAddr,
    bulk: SocketAddr,
    b_http: SocketAddr,
    b_bulk: SocketAddr,
) -> String {
    let module = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
    let load = if module.is_file() {
        format!("load_module {};\n", module.display())
    } else {
        String::new()
    };
    format!(
        "{load}daemon off;\nmaster_process off;\nworker_processes 1;\nworker_rlimit_nofile 100000;\n\
         pid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
         events {{ worker_connections 50000; }}\n\
         stream {{\n  proxy_connect_timeout 1s;\n  proxy_timeout 10m;\n\
           server {{ listen {http} backlog=4096; proxy_pass {b_http}; }}\n\
           server {{ listen {bulk} backlog=4096; proxy_pass {b_bulk}; }}\n}}\n",
        dir = dir.display()
    )
}

async fn wait_listening(addrs: &[SocketAddr], child: &mut Child, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for a in addrs {
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("{what} exited at start ({status})");
            }
            if TcpStream::connect(a).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("{what} does not accept on {a} within 10s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Starts `kind` pinned to `cpu`, in front of the two backends. `None` when
/// that proxy is not installed.
async fn start_proxy(
    kind: PathKind,
    cpu: usize,
    load_cpu: usize,
    args: &CompareArgs,
    b_http: SocketAddr,
    b_bulk: SocketAddr,
    b_sink: SocketAddr,
) -> Result<Option<Proxy>> {
    let http = listen_addr()?;
    let bulk = listen_addr()?;
    match kind {
        PathKind::Direct => Ok(Some(Proxy {
            kind,
            http: b_http,
            bulk: b_bulk,
            running: None,
            _dir: None,
        })),
        PathKind::Sluice
        | PathKind::SluiceCopy
        | PathKind::SluiceSplice
        | PathKind::SluiceShared
        | PathKind::Baseline => {
            let bin = if kind == PathKind::Baseline {
                match &args.baseline {
                    Some(b) => b.clone(),
                    None => return Ok(None),
                }
            } else {
                sluice::locate(args.sluice.sluice.as_deref())?
            };
            let probe = listen_addr()?;
            let cfg = Config {
                services: vec![
                    // The readiness probe of Sluice::start speaks the bench
                    // backend's protocol: it goes to the built-in sink.
                    ServiceCfg::new("probe", probe, vec![BackendCfg::ready(b_sink)]),
                    ServiceCfg::new("bulk", bulk, vec![BackendCfg::ready(b_bulk)]),
                    ServiceCfg::new("http", http, vec![BackendCfg::ready(b_http)]),
                ],
            };
            // No admin endpoints: nothing to measure there, and their
            // default ports may be taken.
            let mut env = vec![
                ("SLUICE_HEALTHZ_BIND_ADDRESS", ""),
                ("SLUICE_METRICS_BIND_ADDRESS", ""),
            ];
            match kind {
                PathKind::SluiceCopy => env.push(("SLUICE_FORWARD", "copy")),
                PathKind::SluiceSplice => env.push(("SLUICE_FORWARD", "splice")),
                PathKind::SluiceShared => env.push(("SLUICE_WORKERS", "0")),
                _ => {}
            }
            let workers = args.sluice_workers.map(|n| n.to_string());
            if let (Some(n), PathKind::Sluice | PathKind::SluiceCopy | PathKind::SluiceSplice) =
                (&workers, kind)
            {
                env.push(("SLUICE_WORKERS", n));
            }
            // The child inherits the spawning thread's affinity: this thread
            // (the only one of the load runtime) moves to the proxy's CPU
            // for the start, then everything moves back.
            pin_thread(cpu)?;
            let s = Sluice::start_with_env(&bin, &args.sluice, &cfg, probe, None, &env).await;
            pin_process(load_cpu)?;
            Ok(Some(Proxy {
                kind,
                http,
                bulk,
                running: Some(Running::Sluice(s?)),
                _dir: None,
            }))
        }
        PathKind::Haproxy | PathKind::Nginx => {
            let name = if kind == PathKind::Haproxy {
                "haproxy"
            } else {
                "nginx"
            };
            let Some(bin) = which(name) else {
                return Ok(None);
            };
            let dir = tempfile::Builder::new()
                .prefix("sluice-bench-compare-")
                .tempdir()?;
            let cfg_path = dir.path().join(format!("{name}.conf"));
            let log = std::fs::File::create(dir.path().join(format!("{name}.log")))?;
            let mut cmd = Command::new(&bin);
            if kind == PathKind::Haproxy {
                std::fs::write(
                    &cfg_path,
                    haproxy_config(haproxy_maxconn(), http, bulk, b_http, b_bulk),
                )?;
                cmd.arg("-db").arg("-f").arg(&cfg_path);
            } else {
                std::fs::write(
                    &cfg_path,
                    nginx_config(dir.path(), http, bulk, b_http, b_bulk),
                )?;
                cmd.arg("-p")
                    .arg(dir.path())
                    .arg("-e")
                    .arg(dir.path().join("error.log"))
                    .arg("-c")
                    .arg(&cfg_path);
            }
            cmd.stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log))
                .kill_on_drop(true);
            pin_thread(cpu)?;
            let spawned = cmd.spawn();
            pin_process(load_cpu)?;
            let mut child = spawned.with_context(|| format!("starting {}", bin.display()))?;
            let pid = child.id().context("no pid")?;
            if let Err(e) = wait_listening(&[http, bulk], &mut child, name).await {
                let log = std::fs::read_to_string(dir.path().join(format!("{name}.log")))
                    .unwrap_or_default();
                bail!("{e:#}\n{log}");
            }
            Ok(Some(Proxy {
                kind,
                http,
                bulk,
                running: Some(Running::Other { child, pid }),
                _dir: Some(dir),
            }))
        }
    }
}

// ---------------------------------------------------------------- backends

/// A listener with a deep accept queue: bursts of connections (the idle
/// figure opens hundreds at once) must not overflow it, or a proxy's short
/// dial timeout turns the dropped SYN into a failed connection.
fn listen_backlog(addr: SocketAddr) -> Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(TcpListener::from_std(s.into())?)
}

/// The backends, in their own single-threaded runtime on their own thread
/// (pinned to the load CPU too): like a separate server process, so data
/// does not go from client to server within one thread's hot cache.
struct Backends {
    http: SocketAddr,
    bulk: Backend,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backends {
    fn start(cpu: usize) -> Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("backends".into())
            .spawn(move || {
                let started = (|| {
                    pin_thread(cpu)?;
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    let (http, bulk) = rt.block_on(async {
                        let l = listen_backlog(SocketAddr::new(sluice::lo_in(5, 1), 0))
                            .context("binding the HTTP backend")?;
                        let http = l.local_addr()?;
                        tokio::spawn(http_backend(l, Arc::new(AtomicBool::new(false))));
                        let bulk =
                            Backend::start("bulk", SocketAddr::new(sluice::lo_in(5, 2), 0)).await?;
                        Ok::<_, anyhow::Error>((http, bulk))
                    })?;
                    Ok::<_, anyhow::Error>((rt, http, bulk))
                })();
                match started {
                    Ok((rt, http, bulk)) => {
                        let _ = ready_tx.send(Ok((http, bulk)));
                        rt.block_on(async {
                            let _ = stop_rx.await;
                        });
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .context("starting the backend thread")?;
        let (http, bulk) = ready_rx
            .recv()
            .context("the backend thread ended at start")??;
        Ok(Self {
            http,
            bulk,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    seconds: f64,
    concurrency: usize,
    proxy_cpu: usize,
    load_cpu: usize,
    /// One list of paths per round.
    rounds: Vec<Vec<PathResult>>,
}

async fn measure(proxy: &Proxy, args: &CompareArgs, sink: &Backend) -> PathResult {
    let pid = proxy.pid();
    let cpu = || pid.and_then(cpu_seconds);
    let mut out = PathResult {
        path: proxy.kind,
        skipped: None,
        short: None,
        keepalive: None,
        bulk: None,
        idle: None,
    };
    for fig in &args.figures {
        match fig {
            Figure::Short => {
                let c0 = cpu();
                let w0 = pid.map(worker_cpu_seconds).unwrap_or_default();
                let mut r = short_load(proxy.http, args.concurrency, args.seconds).await;
                r.set_proxy_cpu(c0, cpu());
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
                let c0 = cpu();
                let mut b = bulk_upload(proxy.bulk, args.seconds, sink).await;
                if let (Some(a), Some(c)) = (c0, cpu()) {
                    b.proxy_cpu_s = Some(round3(c - a));
                    if b.bytes > 0 && b.error.is_none() {
                        b.proxy_cpu_s_per_gb = Some(round3((c - a) / b.bytes as f64 * 1e9));
                    }
                }
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

/// Each worker's share of the CPU time the workers used between two
/// snapshots; `None` with fewer than two workers.
fn worker_shares(before: &[(String, f64)], after: &[(String, f64)]) -> Option<Vec<f64>> {
    if after.len() < 2 {
        return None;
    }
    let used: Vec<f64> = after
        .iter()
        .map(|(name, b)| {
            let a = before.iter().find(|(n, _)| n == name).map_or(0.0, |x| x.1);
            (b - a).max(0.0)
        })
        .collect();
    let total: f64 = used.iter().sum();
    (total > 0.0).then(|| used.iter().map(|u| round3(u / total)).collect())
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a > 0.0 {
        format!("x{:.2}", a / b)
    } else {
        "-".into()
    }
}

fn table(results: &[PathResult]) -> String {
    let get = |k: PathKind| results.iter().find(|r| r.path == k && r.skipped.is_none());
    let direct = get(PathKind::Direct);
    let haproxy = get(PathKind::Haproxy);
    let d_short = direct
        .and_then(|r| r.short.as_ref())
        .map_or(0.0, |s| s.per_s);
    let d_keep = direct
        .and_then(|r| r.keepalive.as_ref())
        .map_or(0.0, |s| s.per_s);
    let d_bulk = direct
        .and_then(|r| r.bulk.as_ref())
        .map_or(0.0, |b| b.gbit_s);
    let h_short = haproxy
        .and_then(|r| r.short.as_ref())
        .map_or(0.0, |s| s.per_s);
    let h_cpu = haproxy
        .and_then(|r| r.short.as_ref())
        .and_then(|s| s.proxy_cpu_s_per_10k)
        .unwrap_or(0.0);
    let h_kcpu = haproxy
        .and_then(|r| r.keepalive.as_ref())
        .and_then(|k| k.proxy_cpu_s_per_10k)
        .unwrap_or(0.0);
    let h_gb = haproxy
        .and_then(|r| r.bulk.as_ref())
        .and_then(|b| b.proxy_cpu_s_per_gb)
        .unwrap_or(0.0);
    let cell = |x: f64| {
        if x > 0.0 {
            format!("{x:.3}")
        } else {
            "-".to_string()
        }
    };
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<13} {:>9} {:>6} {:>6} {:>7} {:>6} | {:>9} {:>6} {:>7} {:>7} {:>7} {:>6} | {:>7} {:>6} {:>6} {:>6} | {:>8}",
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
        "KiB/idle"
    );
    for r in results {
        if let Some(why) = &r.skipped {
            let _ = writeln!(t, "{:<13} skipped: {why}", r.path.name());
            continue;
        }
        let (s, s_err, cpu) = r.short.as_ref().map_or((0.0, 0, 0.0), |s| {
            (s.per_s, s.errors, s.proxy_cpu_s_per_10k.unwrap_or(0.0))
        });
        let (k, k50, k99, k_err, kcpu) =
            r.keepalive.as_ref().map_or((0.0, 0.0, 0.0, 0, 0.0), |k| {
                (
                    k.per_s,
                    k.p50_ms,
                    k.p99_ms,
                    k.errors,
                    k.proxy_cpu_s_per_10k.unwrap_or(0.0),
                )
            });
        let (b, b_err, gb) = r.bulk.as_ref().map_or((0.0, false, 0.0), |b| {
            (
                b.gbit_s,
                b.error.is_some(),
                b.proxy_cpu_s_per_gb.unwrap_or(0.0),
            )
        });
        let idle = r
            .idle
            .as_ref()
            .map_or("-".to_string(), |i| format!("{:.2}", i.kib_per_connection));
        let _ = writeln!(
            t,
            "{:<13} {:>9.0} {:>6} {:>6} {:>7} {:>6} | {:>9.0} {:>6} {:>7.3} {:>7.3} {:>7} {:>6} | {:>7.2} {:>6} {:>6} {:>6} | {:>8}",
            r.path.name(),
            s,
            ratio(s, d_short),
            ratio(s, h_short),
            cell(cpu),
            ratio(cpu, h_cpu),
            k,
            ratio(k, d_keep),
            k50,
            k99,
            cell(kcpu),
            ratio(kcpu, h_kcpu),
            b,
            ratio(b, d_bulk),
            cell(gb),
            ratio(gb, h_gb),
            idle,
        );
        let mut errs = Vec::new();
        if s_err > 0 {
            errs.push(format!("short: {s_err} failed"));
        }
        if k_err > 0 {
            errs.push(format!("keep-alive: {k_err} failed"));
        }
        if b_err {
            errs.push(format!(
                "bulk: {}",
                r.bulk
                    .as_ref()
                    .and_then(|b| b.error.clone())
                    .unwrap_or_default()
            ));
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

async fn body(args: CompareArgs) -> Result<ExitCode> {
    anyhow::ensure!(
        args.seconds > 0.0 && args.seconds <= 60.0,
        "--seconds must be in (0, 60]"
    );
    anyhow::ensure!(
        (1..=1024).contains(&args.concurrency),
        "--concurrency must be in 1..=1024"
    );
    anyhow::ensure!(args.idle <= 100_000, "--idle must be at most 100000");
    anyhow::ensure!(
        (1..=10).contains(&args.rounds),
        "--rounds must be in 1..=10"
    );
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
            "compare: {}s per figure, {} concurrent connections, proxy on CPU {}, load and backends on CPU {}",
            args.seconds, args.concurrency, args.proxy_cpu, args.load_cpu
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
                    results.push(PathResult {
                        path: kind,
                        skipped: Some(if kind == PathKind::Baseline {
                            "no --baseline binary".into()
                        } else {
                            "not installed".into()
                        }),
                        short: None,
                        keepalive: None,
                        bulk: None,
                        idle: None,
                    });
                    continue;
                }
                Err(e) => {
                    results.push(PathResult {
                        path: kind,
                        skipped: Some(format!("failed to start: {e:#}")),
                        short: None,
                        keepalive: None,
                        bulk: None,
                        idle: None,
                    });
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
             KiB/idle: VmRSS growth per idle connection.",
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
    let (cancel_tx, cancel_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("compare".into())
        .spawn(move || {
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
                    r = body(args) => r,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_and_status_of_this_process_parse() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).is_some());
        assert!(rss_kib(pid).unwrap() > 0);
    }

    #[tokio::test]
    async fn http_backend_answers_close_and_keepalive() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(http_backend(l, Arc::new(AtomicBool::new(false))));
        assert!(short_once(addr).await);
        let r = keepalive_load(addr, 2, 0.2).await;
        assert!(r.ok > 0 && r.errors == 0, "{r:?}");
        let r = short_load(addr, 2, 0.2).await;
        assert!(r.ok > 0 && r.errors == 0, "{r:?}");
    }

    #[test]
    fn configs_name_every_address() {
        let a: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:1002".parse().unwrap();
        let c: SocketAddr = "127.0.5.1:2001".parse().unwrap();
        let d: SocketAddr = "127.0.5.2:2002".parse().unwrap();
        let h = haproxy_config(1000, a, b, c, d);
        for x in [a, b, c, d] {
            assert!(h.contains(&x.to_string()), "{h}");
        }
        assert!(h.contains("mode tcp") && h.contains("nbthread 1"));
        let n = nginx_config(Path::new("/tmp/x"), a, b, c, d);
        for x in [a, b, c, d] {
            assert!(n.contains(&x.to_string()), "{n}");
        }
        assert!(n.contains("master_process off") && n.contains("stream {"));
    }
}

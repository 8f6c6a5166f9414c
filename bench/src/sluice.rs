//! Running the real `sluice` daemon: finding (and, under cargo, building)
//! the binary, writing its YAML config atomically, SIGHUP, following its log
//! for `table live generation=N`, SIGTERM at the end, and its log tail when
//! something went wrong.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::workload::{Outcome, request};

/// Options about the daemon shared by every subcommand that runs it.
#[derive(Debug, Clone, clap::Args)]
pub struct SluiceArgs {
    /// The sluice binary. Default: `sluice` next to this executable (built
    /// first with `$CARGO build -p sluice-bench -p sluice --bin sluice` when run by cargo).
    #[arg(long, value_name = "PATH")]
    pub sluice: Option<PathBuf>,
    /// Passed to sluice as --connect-timeout (e.g. 300ms); sluice's default
    /// when absent.
    #[arg(long, value_name = "DURATION")]
    pub connect_timeout: Option<humantime::Duration>,
    /// Passed to sluice as --max-attempts; sluice's default when absent.
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Keep sluice's config and log directory and print its path.
    #[arg(long)]
    pub keep_logs: bool,
}

/// The YAML config file sluice reads (see examples/basic.yaml).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Config {
    pub services: Vec<ServiceCfg>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServiceCfg {
    pub name: String,
    pub listen: SocketAddr,
    pub policy: String,
    pub backends: Vec<BackendCfg>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BackendCfg {
    pub address: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub weight: u32,
}

impl BackendCfg {
    pub fn ready(address: SocketAddr) -> Self {
        Self {
            address,
            ready: true,
            serving: true,
            terminating: false,
            weight: 1,
        }
    }

    /// Terminating but still serving: what Kubernetes shows during a pod's
    /// grace period.
    pub fn terminating(address: SocketAddr) -> Self {
        Self {
            address,
            ready: false,
            serving: true,
            terminating: true,
            weight: 1,
        }
    }
}

impl Config {
    /// One round-robin service.
    pub fn single(name: &str, listen: SocketAddr, backends: Vec<BackendCfg>) -> Self {
        Self {
            services: vec![ServiceCfg {
                name: name.to_string(),
                listen,
                policy: "round-robin".to_string(),
                backends,
            }],
        }
    }
}

/// A loopback port free right now on `ip` (bind :0, read it, close).
pub fn free_port(ip: Ipv4Addr) -> Result<u16> {
    let l = std::net::TcpListener::bind((ip, 0)).with_context(|| format!("bind {ip}:0"))?;
    Ok(l.local_addr()?.port())
}

/// The profile directory of the running executable (`target/<profile>`),
/// skipping `deps/` for test binaries.
fn profile_dir(exe: &Path) -> Option<PathBuf> {
    let mut dir = exe.parent()?.to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent()?.to_path_buf();
    }
    Some(dir)
}

/// Cargo arguments selecting the profile whose output lands in `dir`.
fn profile_args(dir: &Path) -> Vec<String> {
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => vec![],
        Some("release") => vec!["--release".into()],
        Some(other) => vec!["--profile".into(), other.into()],
    }
}

/// Finds the sluice binary: `explicit`, else `sluice` beside this
/// executable. When `CARGO` is set (cargo run / cargo test), builds it first
/// with the matching profile so it is never stale.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        anyhow::ensure!(p.is_file(), "--sluice {}: no such file", p.display());
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("finding the current executable")?;
    let dir =
        profile_dir(&exe).with_context(|| format!("no directory around {}", exe.display()))?;
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let root = manifest_dir.parent().unwrap_or(&manifest_dir).to_path_buf();
    let cargo = std::env::var_os("CARGO").filter(|_| !is_fresh(&dir.join("sluice"), &root));
    if let Some(cargo) = cargo {
        let workspace = root.join("Cargo.toml");
        // Selecting sluice-bench too keeps the feature set of the build
        // that made this executable (sluice-bench depends on the sluice
        // library), so the shared dependencies are not compiled again.
        let mut cmd = std::process::Command::new(&cargo);
        cmd.args([
            "build",
            "-p",
            "sluice-bench",
            "-p",
            "sluice",
            "--manifest-path",
        ])
        .arg(&workspace)
        .args(profile_args(&dir))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        eprintln!("sluice-bench: building sluice: {cmd:?}");
        let status = cmd
            .status()
            .with_context(|| format!("running {}", Path::new(&cargo).display()))?;
        if !status.success() {
            bail!("building sluice failed ({status})");
        }
    }
    let bin = dir.join("sluice");
    anyhow::ensure!(
        bin.is_file(),
        "sluice binary not found at {} (build it with `cargo build -p sluice`, or pass --sluice PATH)",
        bin.display()
    );
    Ok(bin)
}

/// Whether the `sluice` binary at `bin` is newer than every source file of
/// the daemon's crates and the lock file, so the nested build can be
/// skipped. (A nested cargo runs with the environment `cargo run` set up,
/// which build scripts such as ring's see as a change: skipping it when
/// nothing changed avoids recompiling them on every run.)
fn is_fresh(bin: &Path, root: &Path) -> bool {
    fn mtime(p: &Path) -> Option<std::time::SystemTime> {
        std::fs::metadata(p).and_then(|m| m.modified()).ok()
    }
    fn newest(dir: &Path, depth: usize) -> Option<std::time::SystemTime> {
        let mut best = mtime(dir);
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let p = entry.path();
            let t = if p.is_dir() && depth > 0 {
                newest(&p, depth - 1)
            } else {
                mtime(&p)
            };
            best = best.max(t);
        }
        best
    }
    let Some(built) = mtime(bin) else {
        return false;
    };
    let mut inputs = vec![mtime(&root.join("Cargo.lock"))];
    for krate in ["proxy", "control"] {
        inputs.push(newest(&root.join(krate).join("src"), 4));
        inputs.push(mtime(&root.join(krate).join("Cargo.toml")));
    }
    inputs.iter().all(|t| t.is_some_and(|t| t <= built))
}

/// Writes `cfg` to `path` atomically: a temp file in the same directory,
/// then rename.
pub fn write_config_atomic(path: &Path, cfg: &Config) -> Result<()> {
    let yaml = serde_saphyr::to_string(cfg).context("serializing config")?;
    let dir = path.parent().context("config path has no directory")?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".sluice-config-")
        .tempfile_in(dir)
        .with_context(|| format!("temp file in {}", dir.display()))?;
    tmp.write_all(yaml.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("renaming config into {}", path.display()))?;
    Ok(())
}

/// Extracts N from a log line containing `table live generation=N`.
pub fn parse_generation(line: &str) -> Option<u64> {
    let i = line.find("table live generation=")?;
    let rest = &line[i + "table live generation=".len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// A running sluice. Dropping it kills the process (SIGKILL) and removes
/// its directory (unless logs are kept).
pub struct Sluice {
    child: Child,
    pid: Pid,
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    listen: SocketAddr,
    /// Where sluice serves /metrics (set through SLUICE_METRICS_BIND_ADDRESS).
    metrics: Option<SocketAddr>,
    gen_rx: watch::Receiver<u64>,
    seen: Arc<Mutex<Vec<(Instant, u64)>>>,
    follower: JoinHandle<()>,
}

impl Drop for Sluice {
    fn drop(&mut self) {
        self.follower.abort();
        // kill_on_drop sends SIGKILL when `child` drops.
    }
}

/// How sluice ended after SIGTERM.
#[derive(Debug, Clone, Serialize)]
pub struct StopReport {
    /// Exit code, when it exited on its own.
    pub exit_code: Option<i32>,
    /// Seconds from SIGTERM to exit.
    pub stop_s: f64,
    /// True when it had to be killed.
    pub killed: bool,
    pub clean: bool,
}

impl Sluice {
    /// Writes `cfg`, starts sluice on it, waits for its first table and for
    /// a request through `listen` to succeed.
    ///
    /// `log_filter` becomes sluice's RUST_LOG unless RUST_LOG is already set.
    /// Locates sluice and starts it on a free loopback port with one
    /// service named `name` over `backends`, all ready.
    pub async fn start_in_front(
        name: &str,
        args: &SluiceArgs,
        backends: &[SocketAddr],
    ) -> Result<Self> {
        let bin = locate(args.sluice.as_deref())?;
        let listen = SocketAddr::new(lo(1), free_port(Ipv4Addr::LOCALHOST)?);
        let cfg = Config::single(
            name,
            listen,
            backends.iter().map(|a| BackendCfg::ready(*a)).collect(),
        );
        Self::start(&bin, args, &cfg, listen, None).await
    }

    pub async fn start(
        bin: &Path,
        args: &SluiceArgs,
        cfg: &Config,
        listen: SocketAddr,
        log_filter: Option<&str>,
    ) -> Result<Self> {
        Self::start_with(bin, args, &[], cfg, listen, log_filter, &[]).await
    }

    /// [`Sluice::start`], with extra environment variables for sluice.
    pub async fn start_with_env(
        bin: &Path,
        args: &SluiceArgs,
        cfg: &Config,
        listen: SocketAddr,
        log_filter: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::start_with(bin, args, &[], cfg, listen, log_filter, env).await
    }

    /// [`Sluice::start`] with `extra` flags appended to sluice's command
    /// line (e.g. `--vip-interface`, for `rollout --netns`) and extra
    /// environment variables.
    pub async fn start_with(
        bin: &Path,
        args: &SluiceArgs,
        extra: &[String],
        cfg: &Config,
        listen: SocketAddr,
        log_filter: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("sluice-bench-")
            .tempdir()
            .context("creating temp dir")?;
        let dir_path = dir.path().to_path_buf();
        let config_path = dir_path.join("sluice.yaml");
        let log_path = dir_path.join("sluice.log");
        write_config_atomic(&config_path, cfg)?;
        let log = std::fs::File::create(&log_path).context("creating sluice log")?;
        let log2 = log.try_clone()?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(&config_path)
            .args(["--log-format", "text"]);
        if let Some(t) = args.connect_timeout {
            cmd.arg("--connect-timeout").arg(t.to_string());
        }
        if let Some(n) = args.max_attempts {
            cmd.arg("--max-attempts").arg(n.to_string());
        }
        cmd.args(extra);
        if let Some(f) = log_filter
            && std::env::var_os("RUST_LOG").is_none()
        {
            cmd.env("RUST_LOG", f);
        }
        // Admin endpoints on free loopback ports, not the fixed defaults
        // (0.0.0.0:10256, 127.0.0.1:10249) that parallel runs would share.
        // Environment rather than flags: harmless to a sluice without them.
        let mut metrics = None;
        if std::env::var_os("SLUICE_METRICS_BIND_ADDRESS").is_none() {
            let addr = SocketAddr::new(lo(1), free_port(Ipv4Addr::LOCALHOST)?);
            cmd.env("SLUICE_METRICS_BIND_ADDRESS", addr.to_string());
            metrics = Some(addr);
        }
        if std::env::var_os("SLUICE_HEALTHZ_BIND_ADDRESS").is_none() {
            let addr = SocketAddr::new(lo(1), free_port(Ipv4Addr::LOCALHOST)?);
            cmd.env("SLUICE_HEALTHZ_BIND_ADDRESS", addr.to_string());
        }
        cmd.envs(env.iter().copied());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = Pid::from_raw(child.id().context("sluice has no pid")? as i32);
        let (gen_tx, gen_rx) = watch::channel(0);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let follower = tokio::spawn(follow_log(log_path.clone(), gen_tx, seen.clone()));
        let mut s = Self {
            child,
            pid,
            dir: Some(dir),
            dir_path,
            config_path,
            log_path,
            listen,
            metrics,
            gen_rx,
            seen,
            follower,
        };
        if args.keep_logs {
            if let Some(d) = s.dir.take() {
                let _ = d.keep();
            }
            eprintln!(
                "sluice-bench: sluice config and log in {}",
                s.dir_path.display()
            );
        }
        s.wait_ready().await?;
        Ok(s)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("sluice exited at start ({status})\n{}", self.log_tail(30));
            }
            if *self.gen_rx.borrow() >= 1 {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "sluice logged no `table live generation=` within 15s\n{}",
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let local = AtomicU64::new(0);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let o = request(self.listen, 0, None, &local, Duration::from_secs(2)).await;
            if matches!(o, Outcome::Ok(_)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "no request through sluice at {} succeeded within 5s (last: {o:?})\n{}",
                    self.listen,
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Last generation seen in the log.
    pub fn generation(&self) -> u64 {
        *self.gen_rx.borrow()
    }

    /// Every `table live generation=N` line seen, with when it was seen.
    pub fn generations_seen(&self) -> Vec<(Instant, u64)> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Replaces the config atomically and sends SIGHUP.
    pub fn update(&self, cfg: &Config) -> Result<()> {
        write_config_atomic(&self.config_path, cfg)?;
        kill(self.pid, Signal::SIGHUP).context("SIGHUP to sluice")?;
        Ok(())
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then waits up to `timeout` before SIGKILL.
    pub async fn stop(&mut self, timeout: Duration) -> StopReport {
        let t = Instant::now();
        if let Ok(Some(status)) = self.child.try_wait() {
            return report(status, 0.0, false);
        }
        let _ = kill(self.pid, Signal::SIGTERM);
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => report(status, t.elapsed().as_secs_f64(), false),
            _ => {
                let _ = self.child.kill().await;
                StopReport {
                    exit_code: None,
                    stop_s: t.elapsed().as_secs_f64(),
                    killed: true,
                    clean: false,
                }
            }
        }
    }

    /// What sluice's debug log says about dials (zero when not logged).
    pub fn log_counts(&self) -> LogCounts {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        count_log(&text)
    }

    /// sluice's counters from its /metrics endpoint; `None` when it has
    /// none or it did not answer within 2s.
    pub async fn scrape_metrics(&self) -> Option<MetricsSummary> {
        let addr = self.metrics?;
        let text = tokio::time::timeout(Duration::from_secs(2), http_get(addr, "/metrics"))
            .await
            .ok()?
            .ok()?;
        Some(parse_metrics(&text))
    }

    /// The last `n` lines of sluice's log, indented, for error messages;
    /// per-connection "connected" debug lines are left out.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        tail(&text, n, &self.log_path)
    }

    /// The directory holding config and log (kept only with --keep-logs).
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }
}

fn report(status: ExitStatus, stop_s: f64, killed: bool) -> StopReport {
    StopReport {
        exit_code: status.code(),
        stop_s: (stop_s * 1000.0).round() / 1000.0,
        killed,
        clean: status.success(),
    }
}

/// One plain HTTP/1.0 GET; the body of a 200 answer.
async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    (&mut s).take(16 << 20).read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no end of HTTP headers")?;
    let status = head.lines().next().unwrap_or("");
    anyhow::ensure!(
        status.split_whitespace().nth(1) == Some("200"),
        "GET {path}: {status}"
    );
    Ok(body.to_string())
}

/// The counters of sluice's /metrics that tell what the proxy hid.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MetricsSummary {
    pub connections_accepted: u64,
    /// `sluice_connections_closed_total` by reason.
    pub connections_closed: BTreeMap<String, u64>,
    /// `sluice_dial_failures_total` (process-wide, outlives backends) by
    /// reason.
    pub dial_failures: BTreeMap<String, u64>,
    pub dial_failures_total: u64,
    pub dial_retries: u64,
    /// `sluice_ejections_total` (process-wide).
    pub backend_ejections: u64,
}

/// Sums the counters of interest out of Prometheus text.
pub fn parse_metrics(text: &str) -> MetricsSummary {
    let mut m = MetricsSummary::default();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let v = v.max(0.0) as u64;
        let name = series.split('{').next().unwrap_or(series);
        let label = |key: &str| -> String {
            let pat = format!("{key}=\"");
            series
                .find(&pat)
                .map(|i| &series[i + pat.len()..])
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        match name {
            "sluice_connections_accepted_total" => m.connections_accepted += v,
            "sluice_connections_closed_total" => {
                *m.connections_closed.entry(label("reason")).or_insert(0) += v;
            }
            "sluice_dial_failures_total" => {
                *m.dial_failures.entry(label("reason")).or_insert(0) += v;
                m.dial_failures_total += v;
            }
            "sluice_dial_retries_total" => m.dial_retries += v,
            "sluice_ejections_total" => m.backend_ejections += v,
            _ => {}
        }
    }
    m
}

fn is_connected_line(line: &str) -> bool {
    line.contains("DEBUG") && line.contains(" connected ")
}

fn tail(text: &str, n: usize, path: &Path) -> String {
    let all: Vec<&str> = text.lines().collect();
    let lines: Vec<&str> = all
        .iter()
        .copied()
        .filter(|l| !is_connected_line(l))
        .collect();
    let from = lines.len().saturating_sub(n);
    let mut out = format!(
        "--- last {} lines of sluice's log ({}{}) ---\n",
        lines.len() - from,
        path.display(),
        if lines.len() < all.len() {
            format!(
                ", {} per-connection lines left out",
                all.len() - lines.len()
            )
        } else {
            String::new()
        }
    );
    for l in &lines[from..] {
        out.push_str("  ");
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Dial outcomes read from sluice's log (its `sluice_proxy::server` debug
/// lines); all zero when that level is not logged.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LogCounts {
    /// "dial failed; backend ejected" lines: dials sluice retried.
    pub dial_failures: u64,
    /// "connected" lines with attempts > 1: client connections that needed
    /// a retry and were saved by it.
    pub retried_connections: u64,
    /// "connected" lines.
    pub connected: u64,
    /// "no backend left" lines: clients sluice had to reset.
    pub no_backend_left: u64,
}

pub fn count_log(text: &str) -> LogCounts {
    let mut c = LogCounts::default();
    for line in text.lines() {
        if line.contains("dial failed") {
            c.dial_failures += 1;
        } else if line.contains("no backend left") {
            c.no_backend_left += 1;
        } else if is_connected_line(line) {
            c.connected += 1;
            let attempts = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("attempts="))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(1);
            if attempts > 1 {
                c.retried_connections += 1;
            }
        }
    }
    c
}

/// Follows the log file (reading only what was appended), publishing every
/// generation it announces.
async fn follow_log(path: PathBuf, tx: watch::Sender<u64>, seen: Arc<Mutex<Vec<(Instant, u64)>>>) {
    use tokio::io::AsyncReadExt;
    let mut file = None;
    let mut pending: Vec<u8> = Vec::new();
    loop {
        if file.is_none() {
            file = tokio::fs::File::open(&path).await.ok();
        }
        if let Some(f) = file.as_mut()
            && f.read_to_end(&mut pending).await.is_ok()
        {
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                if let Some(g) = parse_generation(&String::from_utf8_lossy(&line)) {
                    let now = Instant::now();
                    if let Ok(mut v) = seen.lock() {
                        v.push((now, g));
                    }
                    tx.send_if_modified(|cur| {
                        let changed = g > *cur;
                        if changed {
                            *cur = g;
                        }
                        changed
                    });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Loopback address 127.0.0.`last`.
pub fn lo(last: u8) -> IpAddr {
    lo_in(0, last as usize)
}

/// Loopback address 127.0.`third`.`last` (`last` taken modulo 254, from 1).
pub fn lo_in(third: u8, last: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        third,
        ((last.max(1) - 1) % 254 + 1) as u8,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_parsed_from_text_and_json_like_lines() {
        assert_eq!(
            parse_generation(
                "2026-01-01T00:00:00Z  INFO sluice: table live generation=12 services=1"
            ),
            Some(12)
        );
        assert_eq!(parse_generation("table live generation=3\n"), Some(3));
        assert_eq!(parse_generation("table live generation="), None);
        assert_eq!(parse_generation("config rejected"), None);
    }

    #[test]
    fn dial_outcomes_are_counted_from_the_log() {
        let log = "\
2026-11-25T18:03:39Z DEBUG sluice_proxy::server: connected client=127.0.0.1:1 listen=127.0.0.1:2/tcp backend=127.0.2.1:3 attempts=1
2026-11-25T18:03:39Z DEBUG sluice_proxy::server: dial failed; backend ejected client=127.0.0.1:1 service=r error=dial 127.0.1.1:3: refused cooldown=1s
2026-11-25T18:03:39Z DEBUG sluice_proxy::server: connected client=127.0.0.1:1 listen=127.0.0.1:2/tcp backend=127.0.2.1:3 attempts=2
2026-11-25T18:03:39Z DEBUG sluice_proxy::server: no backend left: resetting client client=127.0.0.1:5 tried=3
2026-11-25T18:03:39Z  INFO sluice_proxy::server: table live generation=3
";
        assert_eq!(
            count_log(log),
            LogCounts {
                dial_failures: 1,
                retried_connections: 1,
                connected: 2,
                no_backend_left: 1,
            }
        );
    }

    #[test]
    fn log_tail_leaves_out_per_connection_lines() {
        let log = "a INFO listening\nb DEBUG x: connected client=1 attempts=1\nc DEBUG x: dial failed; backend ejected\nd INFO SIGTERM\n";
        let t = tail(log, 2, Path::new("/l"));
        assert!(t.contains("1 per-connection lines left out"), "{t}");
        assert!(t.contains("dial failed") && t.contains("SIGTERM"), "{t}");
        assert!(!t.contains("listening") && !t.contains("attempts=1"), "{t}");
    }

    #[test]
    fn metrics_counters_are_summed_by_reason() {
        let text = r#"# HELP sluice_dial_failures Failed dials, per backend and reason.
# TYPE sluice_dial_failures counter
sluice_dial_failures_total{reason="refused"} 3
sluice_dial_failures_total{reason="timeout"} 4
sluice_backend_dial_failures_total{backend="127.0.1.3:80",reason="timeout"} 4
sluice_dial_retries_total{service="rollout"} 7
sluice_connections_accepted_total{service="rollout"} 1661
sluice_connections_closed_total{service="rollout",reason="done"} 1660
sluice_connections_closed_total{service="rollout",reason="reset"} 1
sluice_ejections_total 2
sluice_backend_ejections_total{backend="127.0.1.1:80"} 2
sluice_table_generation 8
"#;
        let m = parse_metrics(text);
        assert_eq!(m.dial_failures["refused"], 3);
        assert_eq!(m.dial_failures["timeout"], 4);
        assert_eq!(m.dial_failures_total, 7);
        assert_eq!(m.dial_retries, 7);
        assert_eq!(m.connections_accepted, 1661);
        assert_eq!(m.connections_closed["reset"], 1);
        assert_eq!(m.backend_ejections, 2);
    }

    #[test]
    fn profile_is_taken_from_the_exe_dir() {
        let d = profile_dir(Path::new("/x/target/debug/deps/t-123")).unwrap();
        assert_eq!(d, Path::new("/x/target/debug"));
        assert!(profile_args(&d).is_empty());
        let d = profile_dir(Path::new("/x/target/release/sluice-bench")).unwrap();
        assert_eq!(profile_args(&d), vec!["--release".to_string()]);
        let d = profile_dir(Path::new("/x/target/bench-prof/sluice-bench")).unwrap();
        assert_eq!(
            profile_args(&d),
            vec!["--profile".to_string(), "bench-prof".into()]
        );
    }

    #[test]
    fn config_yaml_has_the_file_source_shape() {
        let cfg = Config::single(
            "web",
            "127.0.0.1:8080".parse().unwrap(),
            vec![
                BackendCfg::ready("127.0.0.11:9000".parse().unwrap()),
                BackendCfg::terminating("127.0.0.12:9000".parse().unwrap()),
            ],
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.yaml");
        write_config_atomic(&p, &cfg).unwrap();
        let v: serde_json::Value =
            serde_saphyr::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let svc = &v["services"][0];
        assert_eq!(svc["listen"].as_str(), Some("127.0.0.1:8080"));
        assert_eq!(svc["policy"].as_str(), Some("round-robin"));
        assert_eq!(
            svc["backends"][1]["address"].as_str(),
            Some("127.0.0.12:9000")
        );
        assert_eq!(svc["backends"][1]["ready"].as_bool(), Some(false));
        assert_eq!(svc["backends"][1]["terminating"].as_bool(), Some(true));
        // Only the config itself is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

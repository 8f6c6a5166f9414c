//! The real `sluice` daemon: started with a config file (or flags and
//! environment only), its admin endpoints on free loopback ports, its
//! stdout and stderr in a log file. What it is doing is read from those
//! endpoints, never from its log: `/readyz` answers 200 once the first
//! table is published, and `/debug/generation` (the
//! `sluice_table_generation` gauge, one number) is the generation the data
//! plane has applied (listeners reconciled), so a connection made after it
//! is seen meets that table. The log is only shown, as a tail in failure
//! messages.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
pub use nix::sys::signal::Signal;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use serde::Serialize;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::{free_addr, http};

const CONFIG: &str = "sluice.yaml";
const LOG: &str = "sluice.log";

/// How to start sluice: `Options { config: Some(yaml), ..Options::new(bin) }`.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub bin: PathBuf,
    /// A command sluice runs under, e.g. `ip netns exec NAME`.
    pub prefix: Vec<String>,
    /// Written to `sluice.yaml` in the daemon's directory, passed as
    /// `--config`.
    pub config: Option<String>,
    /// Flags appended to sluice's command line.
    pub args: Vec<String>,
    /// Environment variables for sluice.
    pub env: Vec<(String, String)>,
    /// sluice's RUST_LOG, unless RUST_LOG is already set.
    pub log_filter: Option<String>,
    /// Keep the directory (config, log) after the daemon is gone.
    pub keep_dir: bool,
}

impl Options {
    /// The binary at `bin`, no config file, no extra flag.
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        let bin = bin.into();
        Self {
            bin,
            ..Self::default()
        }
    }

    /// The binary at `bin` on the Kubernetes source of `kubeconfig`, as
    /// node `node-a`, in bind mode with the Service IPs on `lo` (loopback
    /// Service IPs need no device, and this kernel has no dummy driver);
    /// then `extra` flags. Logs at `info`.
    pub fn kube_on_loopback(bin: impl Into<PathBuf>, kubeconfig: &Path, extra: &[&str]) -> Self {
        let kubeconfig = kubeconfig.display().to_string();
        let base = ["--kubeconfig", &kubeconfig, "--node-name", "node-a"];
        let bind = ["--vip-interface", "lo", "--intercept", "bind"];
        Self {
            args: (base.iter().chain(&bind).chain(extra))
                .map(|a| a.to_string())
                .collect(),
            log_filter: Some("info".into()),
            ..Self::new(bin)
        }
    }
}

/// How sluice ended after [`Daemon::stop`].
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

/// A running sluice. Dropping it kills the process (SIGKILL) and removes
/// its directory (unless kept); when dropped during a panic, it prints the
/// tail of its log.
pub struct Daemon {
    child: Child,
    pid: Pid,
    /// Holds `sluice.yaml` and `sluice.log`.
    dir: tempfile::TempDir,
    /// Where `/healthz`, `/livez` and `/readyz` answer.
    pub health: SocketAddr,
    /// Where `/metrics` and `/debug/table` answer.
    pub metrics: SocketAddr,
}

/// The address sluice will use for an admin listener: the one already in
/// the environment (`var`), else a free loopback port passed through `var`.
fn admin_addr(cmd: &mut Command, var: &str) -> Result<SocketAddr> {
    if let Some(addr) = std::env::var(var).ok().and_then(|v| v.parse().ok()) {
        return Ok(addr);
    }
    let addr = free_addr()?;
    cmd.env(var, addr.to_string());
    Ok(addr)
}

impl Daemon {
    /// Starts sluice and waits (15 s at most) until `/readyz` answers 200
    /// and the data plane has applied generation 1.
    pub async fn start(opts: Options) -> Result<Self> {
        let mut d = Self::spawn(opts)?;
        d.wait_generation(1, Duration::from_secs(15)).await?;
        Ok(d)
    }

    /// Starts sluice without waiting for anything.
    pub fn spawn(opts: Options) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("sluice-")
            .disable_cleanup(opts.keep_dir)
            .tempdir()
            .context("creating sluice's directory")?;
        let (config, log) = (dir.path().join(CONFIG), dir.path().join(LOG));
        let mut cmd = match opts.prefix.split_first() {
            Some((wrapper, args)) => {
                let mut cmd = Command::new(wrapper);
                cmd.args(args).arg(&opts.bin);
                cmd
            }
            None => Command::new(&opts.bin),
        };
        if let Some(yaml) = &opts.config {
            write_atomic(&config, yaml)?;
            cmd.arg("--config").arg(&config);
        }
        cmd.args(&opts.args);
        if let Some(f) = &opts.log_filter
            && std::env::var_os("RUST_LOG").is_none()
        {
            cmd.env("RUST_LOG", f);
        }
        // Through the environment rather than flags: harmless to a sluice
        // built before these flags existed.
        let health = admin_addr(&mut cmd, "SLUICE_HEALTHZ_BIND_ADDRESS")?;
        let metrics = admin_addr(&mut cmd, "SLUICE_METRICS_BIND_ADDRESS")?;
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        let out = std::fs::File::create(&log).context("creating sluice's log")?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", opts.bin.display()))?;
        let pid = Pid::from_raw(child.id().context("sluice has no pid")? as i32);
        Ok(Self {
            child,
            pid,
            dir,
            health,
            metrics,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// The directory holding config and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `/metrics`, the whole text.
    pub async fn scrape(&self) -> Result<String> {
        match http::get(self.metrics, "/metrics").await? {
            (200, text) => Ok(text),
            (status, body) => bail!("GET /metrics: {status} {body}"),
        }
    }

    /// The generation of the table the data plane has applied.
    pub async fn generation(&self) -> Result<u64> {
        applied_generation(self.metrics).await
    }

    /// Waits until `/readyz` answers 200 and the data plane has applied
    /// generation `n` or later; fails, with the log's tail, when sluice
    /// exits or `within` passes first. Returns the generation seen.
    pub async fn wait_generation(&mut self, n: u64, within: Duration) -> Result<u64> {
        let deadline = Instant::now() + within;
        let mut last;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("sluice exited ({status})\n{}", self.log_tail(30));
            }
            match http::get(self.health, "/readyz").await {
                Ok((200, _)) => match self.generation().await {
                    Ok(g) if g >= n => return Ok(g),
                    Ok(g) => last = format!("generation {g}"),
                    Err(e) => last = format!("{e:#}"),
                },
                Ok((status, _)) => last = format!("/readyz {status}"),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                bail!(
                    "sluice: table generation {n} not live within {within:?} (last: {last})\n{}",
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Replaces the config file atomically (a temp file renamed over it).
    pub fn write_config(&self, yaml: &str) -> Result<()> {
        write_atomic(&self.dir.path().join(CONFIG), yaml)
    }

    /// [`Daemon::write_config`], then SIGHUP.
    pub fn reload(&self, yaml: &str) -> Result<()> {
        self.write_config(yaml)?;
        self.signal(Signal::SIGHUP)
    }

    /// [`Daemon::reload`], then waits for the next generation to be live.
    pub async fn reload_and_wait(&mut self, yaml: &str) -> Result<u64> {
        let next = self.generation().await? + 1;
        self.reload(yaml)?;
        self.wait_generation(next, Duration::from_secs(10)).await
    }

    pub fn signal(&self, sig: Signal) -> Result<()> {
        kill(self.pid, sig).with_context(|| format!("{sig} to sluice"))
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `within` for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => bail!(
                "sluice did not exit within {within:?}\n{}",
                self.log_tail(30)
            ),
        }
    }

    /// SIGTERM, then waits up to `within` before SIGKILL.
    pub async fn stop(&mut self, within: Duration) -> StopReport {
        let t = Instant::now();
        if self.running() {
            let _ = self.signal(Signal::SIGTERM);
        }
        let status = tokio::time::timeout(within, self.child.wait()).await;
        let status = status.ok().and_then(Result::ok);
        if status.is_none() {
            let _ = self.child.kill().await;
        }
        StopReport {
            exit_code: status.and_then(|s| s.code()),
            stop_s: (t.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
            killed: status.is_none(),
            clean: status.is_some_and(|s| s.success()),
        }
    }

    /// Polls the live generation every `every` in the background,
    /// recording each one seen with when it was seen.
    pub fn follow_generations(&self, every: Duration) -> Generations {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (addr, record) = (self.metrics, seen.clone());
        let task = tokio::spawn(async move {
            let mut last = 0;
            loop {
                // One number, not the whole of /metrics: polled every few
                // ms during a benchmark, it must cost the bench (which also
                // runs the load and the backends) next to nothing.
                if let Ok(g) = applied_generation(addr).await
                    && g > last
                {
                    last = g;
                    if let Ok(mut v) = record.lock() {
                        v.push((Instant::now(), last));
                    }
                }
                tokio::time::sleep(every).await;
            }
        });
        Generations { seen, task }
    }

    /// The last `n` lines of the log, indented, for failure messages;
    /// per-connection "connected" debug lines are left out.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.dir.path().join(LOG);
        tail(&std::fs::read_to_string(&log).unwrap_or_default(), n, &log)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // kill_on_drop sends SIGKILL when `child` drops.
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(50));
        }
    }
}

/// `/debug/generation` on the metrics address `addr`: the generation the
/// data plane has applied (the `sluice_table_generation` gauge), as one
/// number.
async fn applied_generation(addr: SocketAddr) -> Result<u64> {
    match http::get(addr, "/debug/generation").await? {
        (200, text) => text
            .trim()
            .parse()
            .with_context(|| format!("/debug/generation: {text:?}")),
        (status, body) => bail!("GET /debug/generation: {status} {body}"),
    }
}

/// The generations [`Daemon::follow_generations`] saw; stops polling when
/// dropped.
#[derive(Debug)]
pub struct Generations {
    seen: Arc<Mutex<Vec<(Instant, u64)>>>,
    task: JoinHandle<()>,
}

impl Generations {
    /// Every generation seen, in order, with when it was first seen.
    pub fn seen(&self) -> Vec<(Instant, u64)> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Drop for Generations {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes `text` to `path` atomically: a temp file in the same directory,
/// synced, then renamed.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let dir = path.parent().context("config path has no directory")?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".sluice-config-")
        .tempfile_in(dir)
        .with_context(|| format!("temp file in {}", dir.display()))?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("renaming config into {}", path.display()))?;
    Ok(())
}

fn is_connection_line(line: &str) -> bool {
    line.contains("DEBUG") && line.contains(" connected ")
}

fn tail(text: &str, n: usize, path: &Path) -> String {
    let all = text.lines().count();
    let lines: Vec<&str> = text.lines().filter(|l| !is_connection_line(l)).collect();
    let from = lines.len().saturating_sub(n);
    let mut out = format!(
        "--- last {} lines of sluice's log ({}{}) ---\n",
        lines.len() - from,
        path.display(),
        if lines.len() < all {
            format!(", {} per-connection lines left out", all - lines.len())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_leaves_out_per_connection_lines() {
        let log = "a INFO listening\nb DEBUG x: connected client=1 attempts=1\nc DEBUG x: dial failed; backend ejected\nd INFO SIGTERM\n";
        let t = tail(log, 2, Path::new("/l"));
        assert!(t.contains("1 per-connection lines left out"), "{t}");
        assert!(t.contains("dial failed") && t.contains("SIGTERM"), "{t}");
        assert!(!t.contains("listening") && !t.contains("attempts=1"), "{t}");
    }

    #[test]
    fn config_is_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.yaml");
        write_atomic(&p, "a: 1\n").unwrap();
        write_atomic(&p, "a: 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a: 2\n");
        // Only the config itself is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn a_daemon_that_exits_at_once_is_an_error_with_its_log() {
        let args = ["-c", "echo no table here >&2; exit 3"]
            .map(String::from)
            .to_vec();
        let opts = Options {
            args,
            ..Options::new("/bin/sh")
        };
        let err = Daemon::start(opts).await.err().unwrap();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("exited") && msg.contains("no table here"),
            "{msg}"
        );
    }
}

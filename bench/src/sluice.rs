//! Running the real `sluice` daemon for the scenarios: finding (and, under
//! cargo, building) the binary, its config from the schema's documents, and
//! the kit's [`Daemon`] to start it, follow its generations, read its
//! counters and stop it. Nothing is read from its log but its tail in error
//! messages.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sluice_testkit::daemon::{Generations, Signal};
use sluice_testkit::{Daemon, Options};

use crate::workload::{Outcome, request};

/// The config file's documents, under the names the scenarios use.
pub use sluice_control::source::file::{
    BackendDoc as BackendCfg, ConfigDoc as Config, ServiceDoc as ServiceCfg,
};
pub use sluice_testkit::{StopReport, free_port};

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
    /// One more flag for sluice, passed as is (repeat for several), e.g.
    /// `--sluice-arg=--source-ip=transparent`.
    #[arg(long, value_name = "FLAG", allow_hyphen_values = true)]
    pub sluice_arg: Vec<String>,
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

/// A running sluice serving `listen`, with the generations it made live.
/// Dropping it kills the process (SIGKILL) and removes its directory
/// (unless logs are kept).
pub struct Sluice {
    daemon: Daemon,
    listen: SocketAddr,
    /// None when the caller turned the admin endpoints off.
    generations: Option<Generations>,
    /// The dial outcomes of the last [`Sluice::scrape_metrics`].
    scraped: Mutex<LogCounts>,
}

impl Sluice {
    /// Locates sluice and starts it on a free loopback port with one
    /// service named `name` over `backends`, all ready.
    pub async fn start_in_front(
        name: &str,
        args: &SluiceArgs,
        backends: &[SocketAddr],
    ) -> Result<Self> {
        let bin = locate(args.sluice.as_deref())?;
        let listen = SocketAddr::new(lo(1), free_port(Ipv4Addr::LOCALHOST)?);
        let backends = backends.iter().map(|a| BackendCfg::ready(*a)).collect();
        let cfg = ServiceCfg::new(name, listen, backends).into();
        Self::start_with(&bin, args, &[], &cfg, listen, None, &[]).await
    }

    /// Writes `cfg`, starts sluice on it with `extra` flags (e.g.
    /// `--vip-interface`, for `rollout --netns`) and `env`, waits for its
    /// first table and for a request through `listen` to succeed.
    /// `log_filter` becomes sluice's RUST_LOG unless RUST_LOG is already
    /// set. An empty `SLUICE_*_BIND_ADDRESS` in `env`
    /// turns the admin endpoints off: then only the request through
    /// `listen` tells that sluice is up, and it has no generations or
    /// counters to report.
    pub async fn start_with(
        bin: &Path,
        args: &SluiceArgs,
        extra: &[String],
        cfg: &Config,
        listen: SocketAddr,
        log_filter: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut s = Self::start_unprobed(bin, args, extra, cfg, listen, log_filter, env).await?;
        wait_serving(&mut s, listen).await?;
        Ok(s)
    }

    /// [`Sluice::start_with`] without the TCP request through `listen`
    /// (for a UDP Service: the caller probes it its own way).
    pub async fn start_unprobed(
        bin: &Path,
        args: &SluiceArgs,
        extra: &[String],
        cfg: &Config,
        listen: SocketAddr,
        log_filter: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut flags = vec!["--log-format".to_string(), "text".into()];
        if let Some(t) = args.connect_timeout {
            flags.extend(["--connect-timeout".into(), t.to_string()]);
        }
        if let Some(n) = args.max_attempts {
            flags.extend(["--max-attempts".into(), n.to_string()]);
        }
        flags.extend_from_slice(extra);
        flags.extend_from_slice(&args.sluice_arg);
        let admin = !env
            .iter()
            .any(|(k, v)| k.ends_with("_BIND_ADDRESS") && v.is_empty());
        let opts = Options {
            config: Some(cfg.to_yaml().context("writing sluice's config")?),
            args: flags,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log_filter: log_filter.map(String::from),
            keep_dir: args.keep_logs,
            ..Options::new(bin)
        };
        let daemon = if admin {
            Daemon::start(opts).await?
        } else {
            Daemon::spawn(opts)?
        };
        if args.keep_logs {
            eprintln!(
                "sluice-bench: sluice config and log in {}",
                daemon.dir().display()
            );
        }
        Ok(Self {
            generations: admin.then(|| daemon.follow_generations(Duration::from_millis(5))),
            daemon,
            listen,
            scraped: Mutex::default(),
        })
    }

    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Last generation seen live.
    pub fn generation(&self) -> u64 {
        self.generations_seen().last().map_or(0, |g| g.1)
    }

    /// Every generation seen live, with when it was seen.
    pub fn generations_seen(&self) -> Vec<(Instant, u64)> {
        self.generations
            .as_ref()
            .map(Generations::seen)
            .unwrap_or_default()
    }

    /// Replaces the config atomically and sends SIGHUP.
    pub fn update(&self, cfg: &Config) -> Result<()> {
        let yaml = cfg.to_yaml().context("writing sluice's config")?;
        self.daemon.write_config(&yaml)?;
        self.daemon.signal(Signal::SIGHUP)
    }

    /// The dial outcomes of the last [`Sluice::scrape_metrics`] (zeros
    /// before one).
    pub fn log_counts(&self) -> LogCounts {
        self.scraped.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// sluice's counters from its /metrics endpoint; `None` when it has
    /// none or it did not answer.
    pub async fn scrape_metrics(&self) -> Option<MetricsSummary> {
        self.generations.as_ref()?;
        let m = parse_metrics(&self.daemon.scrape().await.ok()?);
        if let Ok(mut s) = self.scraped.lock() {
            *s = LogCounts::from(&m);
        }
        Some(m)
    }
}

/// The kit's [`Daemon`]: pid, running, stop, log tail, directory.
impl std::ops::Deref for Sluice {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.daemon
    }
}

impl std::ops::DerefMut for Sluice {
    fn deref_mut(&mut self) -> &mut Daemon {
        &mut self.daemon
    }
}

/// Waits (5 s at most) until a request through sluice at `listen` succeeds.
async fn wait_serving(daemon: &mut Daemon, listen: SocketAddr) -> Result<()> {
    let local = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let o = request(listen, 0, None, &local, Duration::from_secs(2)).await;
        if matches!(o, Outcome::Ok(_)) {
            return Ok(());
        }
        if !daemon.running() {
            bail!("sluice exited at start\n{}", daemon.log_tail(30));
        }
        if Instant::now() > deadline {
            bail!(
                "no request through sluice at {listen} succeeded within 5s (last: {o:?})\n{}",
                daemon.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

/// Dial outcomes, from sluice's /metrics counters (its debug log is not
/// read): what the reports show as `sluice_log`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LogCounts {
    /// Failed dials (`sluice_dial_failures_total`).
    pub dial_failures: u64,
    /// Dials retried on another backend (`sluice_dial_retries_total`).
    pub retried_connections: u64,
    /// Client connections that got a backend: accepted and not closed for
    /// lack of one.
    pub connected: u64,
    /// Clients reset for lack of a backend
    /// (`sluice_connections_closed_total{reason="no_backend"}`).
    pub no_backend_left: u64,
}

impl From<&MetricsSummary> for LogCounts {
    fn from(m: &MetricsSummary) -> Self {
        let no_backend = m.connections_closed.get("no_backend").copied().unwrap_or(0);
        Self {
            dial_failures: m.dial_failures_total,
            retried_connections: m.dial_retries,
            connected: m.connections_accepted.saturating_sub(no_backend),
            no_backend_left: no_backend,
        }
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
        let c = LogCounts::from(&m);
        assert_eq!((c.dial_failures, c.retried_connections), (7, 7));
        assert_eq!((c.connected, c.no_backend_left), (1661, 0));
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
}

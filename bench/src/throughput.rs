//! Bulk throughput: long connections moving data to a sink backend (up) or
//! from a source backend (down), directly and through sluice in one run.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backend::Backend;
use crate::check;
use crate::sluice::{self, Sluice, SluiceArgs, StopReport};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Client sends, backend discards and confirms the byte count.
    Up,
    /// Backend streams, client reads.
    Down,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ThroughputArgs {
    /// Measure only this address (a sluice or a `sluice-bench serve`).
    #[arg(long, conflicts_with = "direct")]
    pub target: Option<SocketAddr>,
    /// Measure only the built-in backend, without sluice.
    #[arg(long)]
    pub direct: bool,
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Parallel connections.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    #[arg(long, value_enum, default_value_t = Direction::Up)]
    pub direction: Direction,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub sluice: SluiceArgs,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Measured {
    pub bytes: u64,
    pub elapsed_s: f64,
    pub gbit_s: f64,
    pub connections: usize,
    pub failed_connections: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

#[derive(Debug, Serialize)]
struct ThroughputReport {
    scenario: &'static str,
    direction: Direction,
    seconds: f64,
    connections: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    direct: Option<Measured>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sluice: Option<Measured>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<Measured>,
    /// sluice Gbit/s ÷ direct Gbit/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sluice_stop: Option<StopReport>,
}

const CHUNK: usize = 256 * 1024;

async fn upload(target: SocketAddr, deadline: Instant) -> Result<u64> {
    let mut s = TcpStream::connect(target)
        .await
        .with_context(|| format!("connect {target}"))?;
    s.write_all(b"SINK\n").await?;
    let buf = vec![0xa5u8; CHUNK];
    let mut sent = 0u64;
    while Instant::now() < deadline {
        s.write_all(&buf).await.context("sending")?;
        sent += CHUNK as u64;
    }
    s.shutdown().await.context("shutdown")?;
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut resp))
        .await
        .context("no byte count from the sink within 10s")?
        .context("reading the byte count")?;
    let text = String::from_utf8_lossy(&resp);
    let got: u64 = text
        .trim()
        .strip_prefix("OK ")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("bad sink answer {text:?}"))?;
    if got != sent {
        bail!("sink counted {got} bytes, client sent {sent}");
    }
    Ok(sent)
}

async fn download(target: SocketAddr, deadline: Instant) -> Result<u64> {
    let mut s = TcpStream::connect(target)
        .await
        .with_context(|| format!("connect {target}"))?;
    s.write_all(b"SOURCE\n").await?;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while Instant::now() < deadline {
        let k = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .context("source stalled for 5s")?
            .context("reading")?;
        if k == 0 {
            bail!("source closed early after {got} bytes");
        }
        got += k as u64;
    }
    Ok(got)
}

async fn measure(target: SocketAddr, args: &ThroughputArgs) -> Measured {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let dir = args.direction;
        tasks.push(tokio::spawn(async move {
            match dir {
                Direction::Up => upload(target, deadline).await,
                Direction::Down => download(target, deadline).await,
            }
        }));
    }
    let mut bytes = 0;
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(b)) => bytes += b,
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(e) => errors.push(format!("task: {e}")),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    Measured {
        bytes,
        elapsed_s: (elapsed * 1000.0).round() / 1000.0,
        gbit_s: gbit_s(bytes, elapsed),
        connections: args.connections,
        failed_connections: errors.len(),
        errors,
    }
}

/// Bits per second in units of 10^9, rounded to 3 decimals.
pub fn gbit_s(bytes: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    (bytes as f64 * 8.0 / secs / 1e9 * 1000.0).round() / 1000.0
}

fn line(label: &str, m: &Measured) -> String {
    format!(
        "{label}: {:.3} Gbit/s ({} bytes in {:.2}s over {} connections{})",
        m.gbit_s,
        m.bytes,
        m.elapsed_s,
        m.connections,
        if m.failed_connections > 0 {
            format!(", {} FAILED: {}", m.failed_connections, m.errors.join("; "))
        } else {
            String::new()
        }
    )
}

pub async fn run(args: ThroughputArgs) -> Result<ExitCode> {
    check::positive_at_most("--seconds", args.seconds, 120.0)?;
    check::in_range("--connections", args.connections, 1..=256)?;
    let mut out = ThroughputReport {
        scenario: "throughput",
        direction: args.direction,
        seconds: args.seconds,
        connections: args.connections,
        direct: None,
        sluice: None,
        target: None,
        ratio: None,
        sluice_stop: None,
    };
    if let Some(target) = args.target {
        anyhow::ensure!(
            target.ip().is_loopback(),
            "--target must be a loopback address"
        );
        out.target = Some(measure(target, &args).await);
    } else {
        let backend = Backend::start("bulk-1", SocketAddr::new(sluice::lo_in(4, 1), 0)).await?;
        let mut proxy = None;
        if !args.direct {
            proxy =
                Some(Sluice::start_in_front("throughput", &args.sluice, &[backend.addr()]).await?);
        }
        out.direct = Some(measure(backend.addr(), &args).await);
        if let Some(p) = proxy.as_mut() {
            out.sluice = Some(measure(p.listen(), &args).await);
            let stop = p.stop(Duration::from_secs(10)).await;
            if !stop.clean {
                eprint!("{}", p.log_tail(30));
            }
            out.sluice_stop = Some(stop);
        }
        if let (Some(d), Some(s)) = (&out.direct, &out.sluice)
            && d.gbit_s > 0.0
        {
            out.ratio = Some((s.gbit_s / d.gbit_s * 1000.0).round() / 1000.0);
        }
    }
    let failed: usize = [&out.direct, &out.sluice, &out.target]
        .iter()
        .filter_map(|m| m.as_ref())
        .map(|m| m.failed_connections)
        .sum();
    let sluice_clean = out.sluice_stop.as_ref().is_none_or(|s| s.clean);
    if args.json {
        outln!("{}", serde_json::to_string(&out)?);
    } else {
        outln!(
            "throughput ({:?}, {} connections, {}s per phase)",
            args.direction,
            args.connections,
            args.seconds
        );
        for (label, m) in [
            ("direct", &out.direct),
            ("sluice", &out.sluice),
            ("target", &out.target),
        ] {
            if let Some(m) = m {
                outln!("{}", line(label, m));
            }
        }
        if let Some(r) = out.ratio {
            outln!("sluice/direct: x{r:.3}");
        }
    }
    if failed > 0 || !sluice_clean {
        eprintln!("throughput: {failed} connections failed; sluice clean stop: {sluice_clean}");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gbit_per_second() {
        assert_eq!(gbit_s(1_000_000_000, 8.0), 1.0);
        assert_eq!(gbit_s(125_000_000, 1.0), 1.0);
        assert_eq!(gbit_s(5, 0.0), 0.0);
    }

    #[tokio::test]
    async fn up_and_down_against_the_builtin_backend() {
        let b = Backend::start("t", "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        for direction in [Direction::Up, Direction::Down] {
            let args = ThroughputArgs {
                target: Some(b.addr()),
                direct: false,
                seconds: 0.2,
                connections: 2,
                direction,
                json: false,
                sluice: SluiceArgs {
                    sluice: None,
                    connect_timeout: None,
                    max_attempts: None,
                    keep_logs: false,
                    sluice_arg: Vec::new(),
                },
            };
            let m = measure(b.addr(), &args).await;
            assert_eq!(m.failed_connections, 0, "{:?}", m.errors);
            assert!(m.bytes > 0);
            assert!(m.gbit_s > 0.0);
        }
        assert!(
            b.stats()
                .sink_bytes
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        );
    }
}

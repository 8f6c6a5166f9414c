//! The four loads: short connections, keep-alive requests, one bulk
//! upload, idle connections held open; each bounded in time.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::backends::{REQ_CLOSE, REQ_KEEP, RESP_CLOSE, RESP_KEEP};
use super::cpu::{NodeCpu, rss_kib};
use crate::backend::Backend;
use crate::report::{new_hist, q_ms, record, round3};

/// One short connection: connect, request with `Connection: close`, read
/// to EOF, compare.
pub async fn short_once(target: SocketAddr) -> bool {
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
    /// Short phase: this process's CPU seconds (the load and the backends)
    /// per 10,000 connections: a client's connect, and the NAT on its way,
    /// are charged here, not to the proxy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_cpu_s_per_10k: Option<f64>,
    /// Short phase: the whole node's CPU seconds (every CPU, every process,
    /// softirq) per 10,000 connections.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_cpu_s_per_10k: Option<f64>,
    /// The share of the node's CPU time used over the phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_busy: Option<f64>,
}

impl Rate {
    /// Records the proxy's CPU time over the phase, from its CPU seconds
    /// before and after (none when either could not be read).
    pub fn set_proxy_cpu(&mut self, before: Option<f64>, after: Option<f64>) {
        if let (Some(a), Some(b)) = (before, after) {
            self.proxy_cpu_s = Some(round3(b - a));
            if self.ok > 0 {
                self.proxy_cpu_s_per_10k = Some(round3((b - a) / self.ok as f64 * 1e4));
            }
        }
    }

    /// Records this process's CPU time per 10,000 connections over the
    /// phase.
    pub fn set_load_cpu(&mut self, before: Option<f64>, after: Option<f64>) {
        if let (Some(a), Some(b), true) = (before, after, self.ok > 0) {
            self.load_cpu_s_per_10k = Some(round3((b - a) / self.ok as f64 * 1e4));
        }
    }

    /// Records the node's CPU time per 10,000 connections over the phase.
    pub fn set_node_cpu(&mut self, before: Option<NodeCpu>, after: Option<NodeCpu>) {
        if let (Some(a), Some(b), true) = (before, after, self.ok > 0) {
            self.node_cpu_s_per_10k = Some(round3((b.busy - a.busy) / self.ok as f64 * 1e4));
            self.node_busy = a.busy_share(&b).map(round3);
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
        p50_ms: q_ms(h, 0.5),
        p99_ms: q_ms(h, 0.99),
        proxy_cpu_s: None,
        proxy_cpu_s_per_10k: None,
        worker_cpu_share: None,
        load_cpu_s_per_10k: None,
        node_cpu_s_per_10k: None,
        node_busy: None,
    }
}

pub async fn short_load(target: SocketAddr, concurrency: usize, secs: f64) -> Rate {
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
                    record(&mut h, t.elapsed());
                } else {
                    err += 1;
                }
            }
            (ok, err, h)
        });
    }
    collect(set, start).await
}

pub async fn keepalive_load(target: SocketAddr, concurrency: usize, secs: f64) -> Rate {
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
                        record(&mut h, t.elapsed());
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
    /// The whole node's CPU seconds per GB moved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_cpu_s_per_gb: Option<f64>,
    /// The share of the node's CPU time used over the upload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_busy: Option<f64>,
}

impl Bulk {
    /// Records the proxy's CPU time over the upload, from its CPU seconds
    /// before and after (none when either could not be read).
    pub fn set_proxy_cpu(&mut self, before: Option<f64>, after: Option<f64>) {
        if let (Some(a), Some(c)) = (before, after) {
            self.proxy_cpu_s = Some(round3(c - a));
            if self.bytes > 0 && self.error.is_none() {
                self.proxy_cpu_s_per_gb = Some(round3((c - a) / self.bytes as f64 * 1e9));
            }
        }
    }

    /// Records the node's CPU time per GB over the upload.
    pub fn set_node_cpu(&mut self, before: Option<NodeCpu>, after: Option<NodeCpu>) {
        if let (Some(a), Some(c), true) = (before, after, self.bytes > 0 && self.error.is_none()) {
            self.node_cpu_s_per_gb = Some(round3((c.busy - a.busy) / self.bytes as f64 * 1e9));
            self.node_busy = a.busy_share(&c).map(round3);
        }
    }
}

/// One connection streams to the sink for `secs`, then half-closes. The
/// figure counts only bytes the sink received: its counter must grow by
/// exactly what was sent (read from the backend's own counter, as a proxy
/// that does not forward half-closes, like nginx 1.22's `stream`, drops the
/// sink's answer).
pub async fn bulk_upload(target: SocketAddr, secs: f64, sink: &Backend) -> Bulk {
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
                node_cpu_s_per_gb: None,
                node_busy: None,
            }
        }
        Err(e) => Bulk {
            error: Some(format!("{e:#}")),
            ..Bulk::default()
        },
    }
}

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
pub async fn idle(target: SocketAddr, n: usize, pid: u32) -> Idle {
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

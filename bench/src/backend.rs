//! Built-in backend servers: the "pods" of the scenarios.
//!
//! One server speaks three line-started protocols on each connection:
//! - `GET n\n` → replies `<id> n\n` and closes (short-lived connections);
//! - `SINK\n` → reads and discards until EOF, then replies `OK <bytes>\n`;
//! - `SOURCE\n` → streams data until the client goes away.
//!
//! [`Backend::kill`] plays a process dying: the listener closes (new dials
//! are refused, handshakes waiting in the accept queue are reset) and every
//! open connection is aborted with an RST (SO_LINGER 0).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Counters of one backend.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub sink_bytes: AtomicU64,
    pub source_bytes: AtomicU64,
    pub aborted: AtomicU64,
}

/// A running backend. Dropping it kills it.
#[derive(Debug)]
pub struct Backend {
    id: Arc<str>,
    addr: SocketAddr,
    stats: Arc<Stats>,
    kill_tx: watch::Sender<bool>,
}

/// Longest time a SOURCE connection streams, in case a client never closes.
const SOURCE_LIMIT: Duration = Duration::from_secs(600);

impl Backend {
    /// Binds `addr` (port 0 picks one) and serves until killed.
    pub async fn start(id: &str, addr: SocketAddr) -> Result<Self> {
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "backend address {addr} is not a loopback address"
        );
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("backend {id}: bind {addr}"))?;
        let addr = listener.local_addr()?;
        let id: Arc<str> = id.into();
        let stats = Arc::new(Stats::default());
        let (kill_tx, kill_rx) = watch::channel(false);
        tokio::spawn(accept_loop(listener, id.clone(), stats.clone(), kill_rx));
        Ok(Self {
            id,
            addr,
            stats,
            kill_tx,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The process dies: listener closed, open connections reset.
    pub fn kill(&self) {
        let _ = self.kill_tx.send(true);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn accept_loop(
    listener: TcpListener,
    id: Arc<str>,
    stats: Arc<Stats>,
    kill_rx: watch::Receiver<bool>,
) {
    let mut my_kill = kill_rx.clone();
    loop {
        tokio::select! {
            biased;
            () = killed(&mut my_kill) => break,
            r = listener.accept() => match r {
                Ok((s, _)) => {
                    tokio::spawn(serve_conn(s, id.clone(), stats.clone(), kill_rx.clone()));
                }
                // Out of descriptors and the like: don't spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
        }
    }
    drop(listener);
}

/// Resolves once the backend is killed (or its handle is gone).
async fn killed(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|k| *k).await;
}

fn abort(s: TcpStream, stats: &Stats) {
    let _ = s.set_zero_linger();
    stats.aborted.fetch_add(1, Ordering::Relaxed);
    drop(s);
}

async fn serve_conn(
    mut s: TcpStream,
    id: Arc<str>,
    stats: Arc<Stats>,
    mut kill_rx: watch::Receiver<bool>,
) {
    if *kill_rx.borrow() {
        abort(s, &stats);
        return;
    }
    let killed = tokio::select! {
        biased;
        () = killed(&mut kill_rx) => true,
        _ = handle(&mut s, &id, &stats) => false,
    };
    if killed {
        abort(s, &stats);
    }
}

async fn handle(s: &mut TcpStream, id: &str, stats: &Stats) -> std::io::Result<()> {
    let _ = s.set_nodelay(true);
    let mut buf = [0u8; 256];
    let mut len = 0;
    let line_end = loop {
        let k = s.read(&mut buf[len..]).await?;
        if k == 0 {
            return Ok(());
        }
        len += k;
        if let Some(p) = buf[..len].iter().position(|&b| b == b'\n') {
            break p;
        }
        if len == buf.len() {
            s.write_all(b"ERR line too long\n").await?;
            return Ok(());
        }
    };
    let line = std::str::from_utf8(&buf[..line_end]).unwrap_or("");
    let rest = len - line_end - 1;
    if let Some(n) = line.strip_prefix("GET ") {
        stats.requests.fetch_add(1, Ordering::Relaxed);
        s.write_all(format!("{id} {n}\n").as_bytes()).await?;
        // Closing by drop sends FIN: the client read everything it sent.
        Ok(())
    } else if line == "SINK" {
        let mut total = rest as u64;
        let mut big = vec![0u8; 256 * 1024];
        loop {
            let k = s.read(&mut big).await?;
            if k == 0 {
                break;
            }
            total += k as u64;
        }
        stats.sink_bytes.fetch_add(total, Ordering::Relaxed);
        s.write_all(format!("OK {total}\n").as_bytes()).await?;
        Ok(())
    } else if line == "SOURCE" {
        let chunk = vec![0x5au8; 256 * 1024];
        let _ = tokio::time::timeout(SOURCE_LIMIT, async {
            loop {
                s.write_all(&chunk).await?;
                stats
                    .source_bytes
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            #[allow(unreachable_code)]
            Ok::<(), std::io::Error>(())
        })
        .await;
        Ok(())
    } else {
        s.write_all(b"ERR unknown request\n").await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{ErrorKind, Outcome, request};

    #[tokio::test]
    async fn answers_then_refuses_after_kill() {
        let b = Backend::start("b-1", "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let local = AtomicU64::new(0);
        let t = Duration::from_secs(2);
        assert_eq!(
            request(b.addr(), 42, None, &local, t).await,
            Outcome::Ok("b-1".into())
        );
        assert_eq!(b.stats().requests.load(Ordering::Relaxed), 1);
        b.kill();
        // The accept task closes the listener promptly.
        let mut refused = false;
        for _ in 0..100 {
            if request(b.addr(), 1, None, &local, t).await == Outcome::Failed(ErrorKind::Refused) {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(refused, "a killed backend must refuse new dials");
    }

    #[tokio::test]
    async fn kill_resets_open_connections() {
        let b = Backend::start("b-2", "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let mut c = TcpStream::connect(b.addr()).await.unwrap();
        // Half a line: the backend waits for the rest.
        c.write_all(b"GET ").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        b.kill();
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
            .await
            .unwrap();
        let e = r.unwrap_err();
        assert_eq!(crate::workload::classify(&e), ErrorKind::Reset);
    }
}

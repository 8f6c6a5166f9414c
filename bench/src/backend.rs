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
//! [`Backend::kill_blackhole`] plays a pod whose network vanished: the
//! same, but the port then swallows SYNs (a listener with a full accept
//! queue that never accepts), so dials hang until their timeout.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

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
    life: watch::Sender<Life>,
    accept_task: Mutex<Option<JoinHandle<Result<()>>>>,
    /// The black-hole socket and the connection filling its queue, held
    /// until the backend is dropped.
    blackhole: Arc<Mutex<Option<(Socket, std::net::TcpStream)>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    Alive,
    /// Process gone: listener closed.
    Dead,
    /// Network gone: listener closed and replaced by a black hole.
    Vanished,
    /// Graceful shutdown (`rollout --netns` pods on SIGTERM): listener
    /// closed, open connections go on until they end or a kill.
    Draining,
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
        Self::start_unchecked(id, addr).await
    }

    /// Like [`Backend::start`] without the loopback check: for a pod's
    /// address inside a network namespace the bench created itself
    /// (`rollout --netns`).
    pub async fn start_unchecked(id: &str, addr: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("backend {id}: bind {addr}"))?;
        let addr = listener.local_addr()?;
        let id: Arc<str> = id.into();
        let stats = Arc::new(Stats::default());
        let (life, life_rx) = watch::channel(Life::Alive);
        let blackhole = Arc::new(Mutex::new(None));
        let task = tokio::spawn(accept_loop(
            listener,
            id.clone(),
            stats.clone(),
            life_rx,
            blackhole.clone(),
        ));
        Ok(Self {
            id,
            addr,
            stats,
            life,
            accept_task: Mutex::new(Some(task)),
            blackhole,
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
        self.life.send_if_modified(|l| {
            let alive = matches!(*l, Life::Alive | Life::Draining);
            if alive {
                *l = Life::Dead;
            }
            alive
        });
    }

    /// A graceful shutdown's first half: the listener closes (new dials are
    /// refused), open connections go on until they end or [`Backend::kill`].
    pub fn stop_accepting(&self) {
        self.life.send_if_modified(|l| {
            let alive = *l == Life::Alive;
            if alive {
                *l = Life::Draining;
            }
            alive
        });
    }

    /// The pod's network vanishes: open connections reset, and the port
    /// then drops every new SYN (a listen(0) socket whose one queue slot is
    /// taken by a connection of ours and which never accepts), so a dial
    /// hangs until the dialer's timeout, as towards a deleted pod's IP.
    /// The listener is swapped for the black hole in one synchronous step
    /// (microseconds during which a SYN may still be refused).
    pub async fn kill_blackhole(&self) -> Result<()> {
        self.life.send_if_modified(|l| {
            let alive = *l == Life::Alive;
            if alive {
                *l = Life::Vanished;
            }
            alive
        });
        let task = self.accept_task.lock().ok().and_then(|mut t| t.take());
        match task {
            Some(task) => task.await.context("backend accept task")?,
            None => Ok(()),
        }?;
        let holding = self.blackhole.lock().map(|b| b.is_some()).unwrap_or(false);
        anyhow::ensure!(holding, "backend {} was already dead", self.id);
        Ok(())
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Binds a listen(0) socket on `addr` and fills its single queue slot with
/// a connection of our own: every later SYN is dropped by the kernel.
fn make_blackhole(addr: SocketAddr) -> Result<(Socket, std::net::TcpStream)> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())
        .with_context(|| format!("black hole: bind {addr}"))?;
    sock.listen(0)?;
    // Loopback: the handshake completes within this call.
    let filler = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .context("black hole: filling the accept queue")?;
    Ok((sock, filler))
}

async fn accept_loop(
    listener: TcpListener,
    id: Arc<str>,
    stats: Arc<Stats>,
    life: watch::Receiver<Life>,
    blackhole: Arc<Mutex<Option<(Socket, std::net::TcpStream)>>>,
) -> Result<()> {
    let mut my_life = life.clone();
    loop {
        tokio::select! {
            biased;
            () = killed(&mut my_life) => break,
            r = listener.accept() => match r {
                Ok((s, _)) => {
                    tokio::spawn(serve_conn(s, id.clone(), stats.clone(), life.clone()));
                }
                // Out of descriptors and the like: don't spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
        }
    }
    let addr = listener.local_addr()?;
    if *my_life.borrow() == Life::Draining {
        drain_backlog(listener, &id, &stats, &life);
    } else {
        drop(listener);
    }
    if *my_life.borrow() == Life::Vanished {
        let bh = make_blackhole(addr)?;
        if let Ok(mut b) = blackhole.lock() {
            *b = Some(bh);
        }
    }
    Ok(())
}

/// Graceful stop (`rollout --netns` pods): serves the connections whose
/// handshake the kernel already completed, then closes the listener. Only
/// a handshake completing in the microseconds between the last accept and
/// the close is still reset, as with any server that closes its listener.
fn drain_backlog(
    listener: TcpListener,
    id: &Arc<str>,
    stats: &Arc<Stats>,
    life: &watch::Receiver<Life>,
) {
    let Ok(l) = listener.into_std() else {
        return;
    };
    while let Ok((s, _)) = l.accept() {
        if s.set_nonblocking(true).is_err() {
            continue;
        }
        if let Ok(s) = TcpStream::from_std(s) {
            tokio::spawn(serve_conn(s, id.clone(), stats.clone(), life.clone()));
        }
    }
}

/// Resolves once the backend is killed (or its handle is gone).
async fn killed(rx: &mut watch::Receiver<Life>) {
    let _ = rx.wait_for(|l| *l != Life::Alive).await;
}

/// Resolves once open connections must be cut: killed, not draining.
async fn aborted(rx: &mut watch::Receiver<Life>) {
    let _ = rx
        .wait_for(|l| matches!(l, Life::Dead | Life::Vanished))
        .await;
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
    mut kill_rx: watch::Receiver<Life>,
) {
    if matches!(*kill_rx.borrow(), Life::Dead | Life::Vanished) {
        abort(s, &stats);
        return;
    }
    let killed = tokio::select! {
        biased;
        () = aborted(&mut kill_rx) => true,
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
    async fn blackhole_swallows_new_dials() {
        let b = Backend::start("b-3", "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        b.kill_blackhole().await.unwrap();
        let local = AtomicU64::new(0);
        let o = request(b.addr(), 1, None, &local, Duration::from_millis(300)).await;
        assert_eq!(o, Outcome::Failed(ErrorKind::Timeout));
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

//! Named test backends on loopback: each connection is greeted with the
//! backend's name, so a client learns who served it, and every connection
//! reports what it saw.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How a backend treats each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Sends `<name>\n`, then echoes until EOF, then closes its write side.
    Echo,
    /// Sends `bye`, shuts down its write side, then counts what it still
    /// receives until EOF (reported as [`Event::Received`]).
    CloseThenSink,
    /// Reads one chunk, then aborts with a reset.
    ResetAfterRead,
    /// Sends `<name> <peer IP>\n` (the source address it sees), then
    /// echoes as [`Mode::Echo`].
    EchoPeer,
}

/// What a backend observed, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Accepted,
    /// Bytes received before EOF.
    Received(u64),
    /// The connection failed with this error kind.
    Failed(std::io::ErrorKind),
}

/// A TCP backend. Dropping it stops it.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    events: mpsc::UnboundedReceiver<Event>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    /// On a free port of 127.0.0.1.
    pub async fn start(name: &str, mode: Mode) -> Result<Self> {
        Self::start_on(([127, 0, 0, 1], 0).into(), name, mode).await
    }

    /// On `addr` (port 0 picks one).
    pub async fn start_on(addr: SocketAddr, name: &str, mode: Mode) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("backend {name}: bind {addr}"))?;
        let addr = listener.local_addr()?;
        let (tx, events) = mpsc::unbounded_channel();
        let n = name.to_string();
        let task = tokio::spawn(async move {
            while let Ok((sock, peer)) = listener.accept().await {
                let _ = tx.send(Event::Accepted);
                let (tx, n) = (tx.clone(), n.clone());
                let n = match mode {
                    Mode::EchoPeer => format!("{n} {}", peer.ip()),
                    _ => n,
                };
                tokio::spawn(async move {
                    let _ = tx.send(serve(sock, &n, mode).await);
                });
            }
        });
        Ok(Self {
            addr,
            name: name.to_string(),
            events,
            task,
        })
    }

    /// Stops accepting: later dials to it are refused.
    pub fn stop(&self) {
        self.task.abort();
    }

    /// The next event, or an error after `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Result<Event> {
        tokio::time::timeout(timeout, self.events.recv())
            .await
            .with_context(|| format!("no event from backend {} in {timeout:?}", self.name))?
            .context("backend gone")
    }

    /// Connections accepted since the last call (drains the events).
    pub fn accepted_so_far(&mut self) -> usize {
        std::iter::from_fn(|| self.events.try_recv().ok())
            .filter(|e| *e == Event::Accepted)
            .count()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A [`Backend`] serving inside a network namespace, on a thread of its
/// own (the namespace is per thread). Dropping it stops it.
pub struct NetnsBackend {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NetnsBackend {
    /// Starts `Backend::start_on(addr, name, mode)` inside namespace `ns`.
    pub fn start(ns: &str, addr: SocketAddr, name: &str, mode: Mode) -> Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ns, name) = (ns.to_string(), name.to_string());
        let thread = std::thread::spawn(move || {
            let started = (|| -> Result<_> {
                crate::netns::enter(&ns)?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let backend = rt.block_on(Backend::start_on(addr, &name, mode))?;
                Ok((rt, backend))
            })();
            match started {
                Ok((rt, backend)) => {
                    let _ = ready_tx.send(Ok(backend.addr));
                    rt.block_on(async move {
                        let _ = stopped.await;
                        drop(backend);
                    });
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        });
        let addr = ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("backend in a namespace did not start within 5s")??;
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for NetnsBackend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads until EOF, counting; the event that ends it.
async fn sink(sock: &mut TcpStream, buf: &mut [u8], echo: bool) -> Event {
    let mut total = 0u64;
    loop {
        match sock.read(buf).await {
            Ok(0) => return Event::Received(total),
            Ok(n) => {
                total += n as u64;
                if echo && let Err(e) = sock.write_all(&buf[..n]).await {
                    return Event::Failed(e.kind());
                }
            }
            Err(e) => return Event::Failed(e.kind()),
        }
    }
}

async fn serve(mut sock: TcpStream, name: &str, mode: Mode) -> Event {
    let mut buf = vec![0u8; 64 * 1024];
    match mode {
        Mode::Echo | Mode::EchoPeer => {
            if let Err(e) = sock.write_all(format!("{name}\n").as_bytes()).await {
                return Event::Failed(e.kind());
            }
            let ev = sink(&mut sock, &mut buf, true).await;
            let _ = sock.shutdown().await;
            ev
        }
        Mode::CloseThenSink => {
            if let Err(e) = sock.write_all(b"bye").await {
                return Event::Failed(e.kind());
            }
            if let Err(e) = sock.shutdown().await {
                return Event::Failed(e.kind());
            }
            sink(&mut sock, &mut buf, false).await
        }
        Mode::ResetAfterRead => {
            let _ = sock.read(&mut buf).await;
            let _ = sock.set_zero_linger();
            drop(sock);
            Event::Received(0)
        }
    }
}

/// Connects to `addr` and reads the backend's name line.
pub async fn connect_named(addr: SocketAddr) -> Result<(TcpStream, String)> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let name = read_line(&mut s).await?;
    Ok((s, name))
}

/// Reads one `\n`-terminated line (without it), within 5 s.
pub async fn read_line(s: &mut TcpStream) -> Result<String> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .context("no line within 5s")??;
        if n == 0 || b[0] == b'\n' {
            return String::from_utf8(out).context("line is not UTF-8");
        }
        out.push(b[0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn echo_backend_greets_echoes_and_reports() {
        let mut b = Backend::start("a", Mode::Echo).await.unwrap();
        let (mut c, name) = connect_named(b.addr).await.unwrap();
        assert_eq!(name, "a");
        c.write_all(b"ping\n").await.unwrap();
        assert_eq!(read_line(&mut c).await.unwrap(), "ping");
        c.shutdown().await.unwrap();
        let t = Duration::from_secs(2);
        assert_eq!(b.next_event(t).await.unwrap(), Event::Accepted);
        assert_eq!(b.next_event(t).await.unwrap(), Event::Received(5));
        b.stop();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(TcpStream::connect(b.addr).await.is_err());
    }

    #[tokio::test]
    async fn echo_peer_reports_the_source_address() {
        let b = Backend::start("p", Mode::EchoPeer).await.unwrap();
        let (mut c, line) = connect_named(b.addr).await.unwrap();
        assert_eq!(line, "p 127.0.0.1");
        c.write_all(b"ping\n").await.unwrap();
        assert_eq!(read_line(&mut c).await.unwrap(), "ping");
    }
}

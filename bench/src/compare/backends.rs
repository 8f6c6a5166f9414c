//! The backends every path leads to: a minimal HTTP/1.1 server and the
//! bench's bulk sink, on their own pinned thread.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::cpu::pin_thread;
use crate::backend::Backend;
use crate::sluice;

pub const REQ_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
pub const REQ_KEEP: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
pub const RESP_CLOSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nConnection: close\r\n\r\nhello, world\n";
pub const RESP_KEEP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nhello, world\n";

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
pub struct Backends {
    pub http: SocketAddr,
    pub bulk: Backend,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backends {
    pub fn start(cpu: usize) -> Result<Self> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::load::{keepalive_load, short_load, short_once};

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
}

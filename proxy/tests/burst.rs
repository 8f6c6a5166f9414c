//! A burst of new connections against a backend whose accept queue is
//! full (issue 16, docs/reliability.md "bursts"): the backend's kernel
//! drops the SYNs it has no room for and the dialer resends them after
//! 1 s, past sluice's 300 ms `--connect-timeout`. Behind kube-proxy's DNAT
//! those clients are only delayed; through sluice they must be too: no
//! healthy backend ejected, no client reset.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sluice_control::source::file::{BackendDoc, ConfigDoc, ServiceDoc};
use sluice_testkit::{Daemon, Options, free_addr, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Concurrent clients in a burst: 8 against an accept queue of 2 (a
/// backlog of 1) that accepts nothing for [`STALL`]. Straight to the
/// backend they are served within ~1.5 s (the SYN resent after 1 s); 16 or
/// more collide again in the resent wave and take 4–10 s even without
/// sluice.
const BURST: usize = 8;
/// How long the busy backend accepts nothing while the burst arrives.
const STALL: Duration = Duration::from_millis(600);

/// An echo backend with a listen backlog of 1 whose accept loop can be
/// stopped (`stall`) and resumed, as a backend whose event loop is busy.
struct Busy {
    addr: SocketAddr,
    stall: watch::Sender<bool>,
}

async fn busy_backend() -> Busy {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(1).unwrap();
    let addr = l.local_addr().unwrap();
    let (stall, mut stalled) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            if *stalled.borrow_and_update() {
                if stalled.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let s = tokio::select! {
                biased;
                r = stalled.changed() => {
                    if r.is_err() {
                        return;
                    }
                    continue;
                }
                r = l.accept() => match r {
                    Ok((s, _)) => s,
                    Err(_) => return,
                },
            };
            tokio::spawn(async move {
                let mut s = s;
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Busy { addr, stall }
}

/// sluice serving one Service named `name` over `backends`; its address.
async fn start(name: &str, backends: &[SocketAddr]) -> (Daemon, SocketAddr) {
    let listen = free_addr().unwrap();
    let docs = backends.iter().map(|b| BackendDoc::ready(*b)).collect();
    let config = ConfigDoc::from(ServiceDoc::new(name, listen, docs));
    let opts = Options {
        config: Some(config.to_yaml().unwrap()),
        ..Options::new(env!("CARGO_BIN_EXE_sluice"))
    };
    (Daemon::start(opts).await.unwrap(), listen)
}

/// One request/response through `listen`: its latency, or what failed.
async fn exchange(listen: SocketAddr) -> Result<Duration, String> {
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        let mut s = TcpStream::connect(listen).await?;
        s.write_all(b"ping\n").await?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    })
    .await;
    match r {
        Ok(Ok(buf)) if &buf == b"ping\n" => Ok(t0.elapsed()),
        Ok(Ok(buf)) => Err(format!("wrong reply {buf:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no reply within 10 s".into()),
    }
}

/// The kernel's count of connections dropped by full accept queues.
fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap()
}

/// The sum of the series of `name` whose labels contain `with`.
fn sum(text: &str, name: &str, with: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(with))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Stalls `busy`, sends a burst of concurrent exchanges to `target`,
/// resumes `busy` after [`STALL`]. Returns the latencies of the clients
/// served (sorted), the errors of the others, and the accept-queue
/// overflows counted meanwhile (machine-wide).
async fn burst(target: SocketAddr, busy: &Busy) -> (Vec<Duration>, Vec<String>, u64) {
    let overflows0 = listen_overflows();
    busy.stall.send(true).unwrap();
    let clients: Vec<_> = (0..BURST).map(|_| tokio::spawn(exchange(target))).collect();
    tokio::time::sleep(STALL).await;
    busy.stall.send(false).unwrap();
    let mut served = Vec::new();
    let mut failed = Vec::new();
    for c in clients {
        match c.await.unwrap() {
            Ok(d) => served.push(d),
            Err(e) => failed.push(e),
        }
    }
    served.sort();
    (served, failed, listen_overflows() - overflows0)
}

/// A burst through sluice at `listen`: every client must be served and no
/// backend ejected.
async fn burst_is_served(s: &Daemon, listen: SocketAddr, busy: &Busy) {
    exchange(listen).await.unwrap();
    let (served, failed, overflows) = burst(listen, busy).await;
    let text = s.scrape().await.unwrap();
    // The same burst without sluice, as kube-proxy's DNAT would pass it:
    // a reference for the delays, not asserted.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let direct = burst(busy.addr, busy).await;
    let series = |name: &str| metric(&text, name).unwrap_or(0.0);
    println!(
        "burst of {BURST} through sluice: {} served (slowest {:?}), {} failed {:?}; accept-queue overflows {overflows}; \
         sluice: dial timeouts {}, retries {}, no backend {}, ejections {}; \
         straight to the backend: {} served (slowest {:?}), {} failed, overflows {}",
        served.len(),
        served.last(),
        failed.len(),
        failed.first(),
        series("sluice_dial_failures_total{reason=\"timeout\"}"),
        sum(&text, "sluice_dial_retries_total", ""),
        sum(&text, "sluice_connections_closed_total", "no_backend"),
        series("sluice_ejections_total"),
        direct.0.len(),
        direct.0.last(),
        direct.1.len(),
        direct.2,
    );
    // The burst did overflow the backend's accept queue (machine-wide
    // count: other processes can only add to it).
    assert!(overflows > 0, "the burst never filled the accept queue");
    assert!(
        failed.is_empty(),
        "{} clients failed: {failed:?}",
        failed.len()
    );
    assert_eq!(series("sluice_ejections_total"), 0.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_against_the_only_backend_delays_clients_and_ejects_nothing() {
    let busy = busy_backend().await;
    let (s, listen) = start("one", &[busy.addr]).await;
    burst_is_served(&s, listen, &busy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_against_one_busy_backend_of_two_ejects_nothing() {
    let busy = busy_backend().await;
    let other = busy_backend().await;
    let (s, listen) = start("two", &[busy.addr, other.addr]).await;
    burst_is_served(&s, listen, &busy).await;
}

/// The other side of the trade: a backend that completes no handshake at
/// all (its accept queue full and never served: to a dialer, the same
/// black hole as a vanished pod) still costs a client at most one short
/// connect timeout, and is ejected by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_answers_no_handshake_is_still_ejected_after_one_short_timeout() {
    let stuck = busy_backend().await;
    stuck.stall.send(true).unwrap();
    // Fill its accept queue (two with a backlog of 1), straight from here:
    // sluice never saw it complete a handshake.
    let mut fill = Vec::new();
    for _ in 0..2 {
        fill.push(TcpStream::connect(stuck.addr).await.unwrap());
    }
    let good = busy_backend().await;
    let (s, listen) = start("bh", &[stuck.addr, good.addr]).await;
    let mut slowest = Duration::ZERO;
    let t0 = Instant::now();
    for i in 0..20 {
        let took = exchange(listen)
            .await
            .unwrap_or_else(|e| panic!("exchange {i}: {e}"));
        slowest = slowest.max(took);
    }
    let text = s.scrape().await.unwrap();
    let timeouts = metric(&text, "sluice_dial_failures_total{reason=\"timeout\"}").unwrap_or(0.0);
    let ejections = metric(&text, "sluice_ejections_total").unwrap_or(0.0);
    println!(
        "black hole: 20 served, slowest {slowest:?}, dial timeouts {timeouts}, ejections {ejections}"
    );
    // One short timeout (300 ms) and a retry, never the last-chance wait.
    assert!(slowest < Duration::from_secs(2), "{slowest:?}");
    assert!(ejections >= 1.0, "{text}");
    // Ejected by its first timeout: the sequential connections pay it once
    // per 1 s cooldown (a single probe when the cooldown ends).
    let took = t0.elapsed().as_secs_f64();
    assert!(
        (1.0..=1.0 + took.floor()).contains(&timeouts),
        "{timeouts} timeouts in {took:.1} s"
    );
    drop(fill);
}

//! Slow and hostile clients, and memory at scale (issue 16's fault matrix,
//! docs/reliability.md):
//! - 2,000 connections that send nothing: others are served, descriptors
//!   and memory stay proportional;
//! - 2,000 connections that read nothing while their backends write:
//!   sluice's memory does not grow with the bytes written;
//! - a client that resets mid-stream: the backend side is reset promptly,
//!   counted, and the active gauge returns to 0;
//! - idle proxied connections at scale (5,000 by default, 50,000 with
//!   `SLUICE_SCALE_TEST=1`): RSS per connection and per listener.
//!
//! Every test prints its figures (`cargo test ... -- --nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sluice_control::source::file::{BackendDoc, ConfigDoc, ServiceDoc};
use sluice_testkit::{Daemon, Options, free_addr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// What a test backend does with each connection.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Echoes what it reads (so it waits for the client to speak).
    Echo,
    /// Writes `n` bytes (or until a write blocks for 500 ms), then holds
    /// the connection until the client side ends.
    Write(usize),
    /// Writes without end until a write fails; reports when it failed.
    Stream,
}

#[derive(Default)]
struct Stats {
    accepted: AtomicUsize,
    /// Connections done writing (all bytes written or blocked).
    done: AtomicUsize,
    written: AtomicUsize,
}

struct TestBackend {
    addr: SocketAddr,
    stats: Arc<Stats>,
    /// `Stream`: when each connection's write failed, and how.
    failed: mpsc::UnboundedReceiver<(Instant, std::io::ErrorKind)>,
}

async fn backend(b: Behaviour) -> TestBackend {
    // A backlog as deep as the bursts: a SYN dropped by a full accept
    // queue is retransmitted after 1 s, past sluice's 300 ms connect
    // timeout, and the dial fails (docs/reliability.md, "bursts").
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(4096).unwrap();
    let addr = l.local_addr().unwrap();
    let stats = Arc::new(Stats::default());
    let (tx, failed) = mpsc::unbounded_channel();
    let st = stats.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            st.accepted.fetch_add(1, Ordering::Relaxed);
            let st = st.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                match b {
                    Behaviour::Echo => {
                        while let Ok(n @ 1..) = s.read(&mut buf).await {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                    Behaviour::Write(total) => {
                        let mut left = total;
                        while left > 0 {
                            let n = left.min(buf.len());
                            match tokio::time::timeout(
                                Duration::from_millis(500),
                                s.write(&buf[..n]),
                            )
                            .await
                            {
                                Ok(Ok(w @ 1..)) => {
                                    left -= w;
                                    st.written.fetch_add(w, Ordering::Relaxed);
                                }
                                _ => break,
                            }
                        }
                        st.done.fetch_add(1, Ordering::Relaxed);
                        while let Ok(1..) = s.read(&mut buf).await {}
                    }
                    Behaviour::Stream => loop {
                        if let Err(e) = s.write_all(&buf).await {
                            let _ = tx.send((Instant::now(), e.kind()));
                            break;
                        }
                        st.written.fetch_add(buf.len(), Ordering::Relaxed);
                    },
                }
            });
        }
    });
    TestBackend {
        addr,
        stats,
        failed,
    }
}

/// Raises this process's descriptor limit (soft and hard: root may raise
/// the hard one up to `fs.nr_open`); sluice, a child, inherits it. Returns
/// the soft limit in force.
fn raise_nofile(want: u64) -> u64 {
    use rlimit::Resource;
    let (soft, hard) = Resource::NOFILE.get().unwrap();
    if Resource::NOFILE
        .set(want.max(soft), want.max(hard))
        .is_err()
    {
        let _ = Resource::NOFILE.set(hard, hard);
    }
    Resource::NOFILE.get().unwrap().0
}

/// VmRSS in KiB and the number of open descriptors of `pid`.
fn usage(pid: i32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (rss, fds)
}

/// Bytes queued in the TCP sockets matching `filter`: receive queue and
/// send queue (`ss -m`'s `r` and `w`).
fn socket_memory(filter: &str) -> (u64, u64) {
    let out = std::process::Command::new("ss")
        .args(["-Htmn", "state", "established", filter])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |m: &str, f: char| {
        m.split(',')
            .find_map(|x| x.strip_prefix(f)?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    text.split("skmem:(")
        .skip(1)
        .map(|m| m.split(')').next().unwrap_or(""))
        .fold((0, 0), |(r, w), m| (r + field(m, 'r'), w + field(m, 'w')))
}

/// Payload bytes queued in the TCP sockets matching `filter`: unread
/// (`Recv-Q`) and unacknowledged or unsent (`Send-Q`).
fn queued_bytes(filter: &str) -> (u64, u64) {
    let out = std::process::Command::new("ss")
        .args(["-Htn", "state", "established", filter])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(|x| x.parse::<u64>().ok());
            Some((f.next()??, f.next()??))
        })
        .fold((0, 0), |(r, w), (a, b)| (r + a, w + b))
}

/// One field of /proc/meminfo, in KiB.
fn meminfo_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The sum of every series of `name` (all labels).
async fn total(s: &Daemon, name: &str) -> f64 {
    let text = s.scrape().await.unwrap();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn start(services: Vec<ServiceDoc>) -> Daemon {
    let opts = Options {
        config: Some(ConfigDoc { services }.to_yaml().unwrap()),
        args: vec!["--config-poll-interval".into(), "100ms".into()],
        log_filter: Some("warn".into()),
        ..Options::new(env!("CARGO_BIN_EXE_sluice"))
    };
    Daemon::start(opts).await.unwrap()
}

fn service(name: &str, listen: SocketAddr, backend: SocketAddr) -> ServiceDoc {
    ServiceDoc::new(name, listen, vec![BackendDoc::ready(backend)])
}

/// Waits (bounded) until `cond` holds.
async fn until(what: &str, within: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (bounded) until sluice holds no connection.
async fn drained(s: &Daemon, within: Duration) {
    until("the active gauge back to 0", within, async || {
        total(s, "sluice_connections_active").await == 0.0
    })
    .await;
}

/// Opens `n` connections to `listens` (round robin), at most 64
/// handshakes at a time. Every one must succeed.
async fn open(n: usize, listens: &[SocketAddr]) -> Vec<TcpStream> {
    let listens: Arc<[SocketAddr]> = listens.into();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64.min(n) {
        let (next, listens) = (next.clone(), listens.clone());
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return got;
                }
                let to = listens[i % listens.len()];
                let s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(to))
                    .await
                    .unwrap_or_else(|_| panic!("connect {i} to {to} timed out"))
                    .unwrap_or_else(|e| panic!("connect {i} to {to}: {e}"));
                got.push(s);
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// `n` request/response exchanges, one connection each; their latencies
/// (connect to reply). Every one must succeed within `bound`.
async fn exchanges(listen: SocketAddr, n: usize, bound: Duration) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        let r = tokio::time::timeout(bound, async {
            let mut s = TcpStream::connect(listen).await?;
            s.write_all(b"ping\n").await?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        })
        .await;
        match r {
            Ok(Ok(buf)) => assert_eq!(&buf, b"ping\n"),
            other => panic!("exchange {i} failed: {other:?}"),
        }
        lat.push(t0.elapsed());
    }
    lat.sort();
    lat
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn show(lat: &[Duration]) -> String {
    format!(
        "p50 {:.2} ms, p99 {:.2} ms",
        pct(lat, 0.5).as_secs_f64() * 1e3,
        pct(lat, 0.99).as_secs_f64() * 1e3
    )
}

const HOSTILE: usize = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_silent_clients_do_not_starve_others() {
    raise_nofile(4 * HOSTILE as u64 + 1024);
    let echo = backend(Behaviour::Echo).await;
    let listen = free_addr().unwrap();
    let s = start(vec![service("silent", listen, echo.addr)]).await;

    let before_lat = exchanges(listen, 200, Duration::from_secs(5)).await;
    let (rss0, fds0) = usage(s.pid());
    let held = open(HOSTILE, &[listen]).await;
    // Each is accepted by sluice and dialled to the backend.
    until(
        "every silent connection at the backend",
        Duration::from_secs(30),
        async || echo.stats.accepted.load(Ordering::Relaxed) >= 200 + HOSTILE,
    )
    .await;
    until("the active gauge", Duration::from_secs(10), async || {
        total(&s, "sluice_connections_active").await >= HOSTILE as f64
    })
    .await;
    let (rss1, fds1) = usage(s.pid());
    let during_lat = exchanges(listen, 200, Duration::from_secs(5)).await;

    let fd_per = (fds1 as f64 - fds0 as f64) / HOSTILE as f64;
    let kib_per = (rss1 as f64 - rss0 as f64) / HOSTILE as f64;
    println!(
        "silent clients: {HOSTILE} held; sluice descriptors {fds0} -> {fds1} ({fd_per:.2}/conn), \
         RSS {rss0} -> {rss1} KiB ({kib_per:.1} KiB/conn); \
         200 exchanges before: {}; during: {}",
        show(&before_lat),
        show(&during_lat)
    );
    // Two sockets per proxied connection (client, backend); nothing else
    // per connection (a pipe pair for splice would make it 4).
    assert!(
        (1.9..=4.1).contains(&fd_per),
        "{fd_per:.2} descriptors per connection"
    );
    // A task and its state: tens of KiB at most per idle connection.
    assert!(
        kib_per < 64.0,
        "{kib_per:.1} KiB of RSS per idle connection"
    );
    drop(held);
    drained(&s, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_clients_that_never_read_keep_buffers_bounded() {
    raise_nofile(4 * HOSTILE as u64 + 1024);
    const EACH: usize = 1 << 20;
    let writer = backend(Behaviour::Write(EACH)).await;
    let echo = backend(Behaviour::Echo).await;
    let (deaf, other) = (free_addr().unwrap(), free_addr().unwrap());
    let s = start(vec![
        service("deaf", deaf, writer.addr),
        service("other", other, echo.addr),
    ])
    .await;
    exchanges(other, 20, Duration::from_secs(5)).await;
    let (rss0, fds0) = usage(s.pid());
    let held = open(HOSTILE, &[deaf]).await;
    until(
        "every backend done writing or blocked",
        Duration::from_secs(60),
        async || writer.stats.done.load(Ordering::Relaxed) >= HOSTILE,
    )
    .await;
    let (rss1, fds1) = usage(s.pid());
    let written = writer.stats.written.load(Ordering::Relaxed);
    // sluice's client sockets (local port: the listener's) and backend
    // sockets (remote port: the backend's).
    let (client_r, client_w) = socket_memory(&format!("sport = :{}", deaf.port()));
    let (backend_r, backend_w) = socket_memory(&format!("dport = :{}", writer.addr.port()));
    let kernel = client_r + client_w + backend_r + backend_w;
    // Where the bytes written are now, in payload bytes: in the backends'
    // own send queues, sluice's backend-side receive queues, sluice's
    // client-side send queues, the clients' receive queues; the rest is in
    // sluice's splice pipes (and copy buffers, at most 16 KiB each).
    let (_, at_backend) = queued_bytes(&format!("sport = :{}", writer.addr.port()));
    let (in_sluice_r, _) = queued_bytes(&format!("dport = :{}", writer.addr.port()));
    let (_, in_sluice_w) = queued_bytes(&format!("sport = :{}", deaf.port()));
    let (at_client, _) = queued_bytes(&format!("dport = :{}", deaf.port()));
    let total_written = written as u64;
    let in_pipes = total_written.saturating_sub(at_backend + in_sluice_r + in_sluice_w + at_client);
    let lat = exchanges(other, 200, Duration::from_secs(5)).await;
    let kib_per = (rss1 as f64 - rss0 as f64) / HOSTILE as f64;
    let per = |b: u64| b as f64 / 1024.0 / HOSTILE as f64;
    let lowat = std::env::var("SLUICE_NOTSENT_LOWAT").unwrap_or_else(|_| "default".into());
    println!(
        "deaf clients: {HOSTILE}, --notsent-lowat {lowat}, backends wrote {:.1} MiB ({:.0} KiB/conn); \
         sluice RSS {rss0} -> {rss1} KiB ({kib_per:.1} KiB/conn), \
         descriptors {fds0} -> {fds1} (pipes of splice included); queued in sluice's sockets (ss skmem): \
         {:.0} KiB/conn = client side r {:.0} + w {:.0}, backend side r {:.0} + w {:.0}; \
         in its pipes and buffers (the rest of what was written): {:.0} KiB/conn; others: {}",
        written as f64 / (1 << 20) as f64,
        written as f64 / 1024.0 / HOSTILE as f64,
        per(kernel),
        per(client_r),
        per(client_w),
        per(backend_r),
        per(backend_w),
        per(in_pipes),
        show(&lat)
    );
    // What did not fit in socket buffers stays in the backend: sluice holds
    // at most its copy buffer (16 KiB per direction) and its task per
    // connection; the rest waits in kernel socket buffers (not RSS). 64 KiB
    // is four copy buffers; unbounded buffering would show up to the
    // 1 MiB written per connection.
    assert!(
        kib_per < 64.0,
        "{kib_per:.1} KiB of RSS per deaf connection"
    );
    // The kernel's part, bounded by --notsent-lowat (send side: the cap
    // plus one segment in the making) and --receive-buffer (the kernel
    // doubles it), when set; by tcp_wmem[2] and tcp_rmem[2] otherwise.
    let setting = |var: &str, default: u32| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(u64::from(default))
    };
    let defaults = sluice_proxy::forward::Buffers::default();
    let lowat = setting("SLUICE_NOTSENT_LOWAT", defaults.notsent_lowat);
    let receive = setting("SLUICE_RECEIVE_BUFFER", defaults.receive);
    let sysctl = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
            .unwrap()
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
    };
    let send_bound = if lowat > 0 {
        2 * lowat.max(64 << 10)
    } else {
        sysctl("tcp_wmem")
    };
    let receive_bound = if receive > 0 {
        2 * receive
    } else {
        sysctl("tcp_rmem")
    };
    assert!(
        kernel / HOSTILE as u64 <= send_bound + receive_bound,
        "{:.0} KiB per deaf connection in sluice's socket buffers, bound {} KiB",
        per(kernel),
        (send_bound + receive_bound) / 1024
    );
    drop(held);
    drained(&s, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_mid_stream_resets_the_backend_promptly() {
    let mut stream = backend(Behaviour::Stream).await;
    let listen = free_addr().unwrap();
    let s = start(vec![service("big", listen, stream.addr)]).await;
    let resets0 = total(
        &s,
        "sluice_connections_closed_total{service=\"big\",reason=\"reset\"}",
    )
    .await;

    let mut c = TcpStream::connect(listen).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < 4 << 20 {
        got += c.read(&mut buf).await.unwrap();
    }
    // RST: linger 0, then close, mid-transfer.
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    let t0 = Instant::now();
    let (when, kind) = tokio::time::timeout(Duration::from_secs(2), stream.failed.recv())
        .await
        .expect("the backend was still written to 2 s after the client's reset")
        .unwrap();
    let after = when.saturating_duration_since(t0);
    println!(
        "client reset after {got} bytes: the backend's write failed ({kind:?}) after {after:?}"
    );
    assert!(
        matches!(
            kind,
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{kind:?}"
    );
    drained(&s, Duration::from_secs(5)).await;
    let resets = total(
        &s,
        "sluice_connections_closed_total{service=\"big\",reason=\"reset\"}",
    )
    .await;
    assert_eq!(resets - resets0, 1.0, "the reset was not counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_per_idle_connection_and_per_listener() {
    // Each proxied connection costs two descriptors in sluice (client,
    // backend socket) and two in this process (client, test backend).
    // With SLUICE_SCALE_TEST=1: 50,000, or as many as the descriptor limit
    // allows (root without CAP_SYS_RESOURCE cannot raise the hard limit).
    let scale = std::env::var_os("SLUICE_SCALE_TEST").is_some();
    let limit = raise_nofile(if scale {
        2 * 50_000 + 4096
    } else {
        2 * 5_000 + 4096
    });
    let n = if scale {
        (limit.saturating_sub(2048) / 2).min(50_000) as usize
    } else {
        5_000
    };
    if limit < 2 * n as u64 + 1024 {
        eprintln!("SKIPPED: descriptor limit {limit} is too low for {n} connections");
        return;
    }
    // At most 10,000 connections per destination (client -> listener,
    // sluice -> backend), well inside the ephemeral port range.
    let k = n.div_ceil(10_000);
    let mut backends = Vec::new();
    let mut docs = Vec::new();
    let mut listens = Vec::new();
    for i in 0..k {
        let b = backend(Behaviour::Echo).await;
        let l = free_addr().unwrap();
        docs.push(service(&format!("scale-{i}"), l, b.addr));
        listens.push(l);
        backends.push(b);
    }
    let mut s = start(docs.clone()).await;
    let (rss_base, _) = usage(s.pid());

    // 100 more listeners, to the first backend.
    let mut more = docs.clone();
    for i in 0..100u8 {
        // One loopback address each, so no two can pick the same port.
        let ip = std::net::Ipv4Addr::new(127, 0, 1, i + 1);
        let l = SocketAddr::from((ip, sluice_testkit::free_port(ip).unwrap()));
        more.push(service(&format!("extra-{i}"), l, backends[0].addr));
    }
    s.reload_and_wait(&ConfigDoc { services: more }.to_yaml().unwrap())
        .await
        .unwrap();
    let (rss_listeners, _) = usage(s.pid());
    let (_, fds0) = usage(s.pid());

    let slab0 = meminfo_kib("Slab:");
    let t0 = Instant::now();
    let held = open(n, &listens).await;
    until(
        "every connection proxied",
        Duration::from_secs(120),
        async || total(&s, "sluice_connections_active").await >= n as f64,
    )
    .await;
    let took = t0.elapsed();
    let (rss1, fds1) = usage(s.pid());
    // Machine-wide (other processes add noise): four sockets per proxied
    // connection here, two of them sluice's, charged to its cgroup.
    let slab_per_conn = (meminfo_kib("Slab:") as f64 - slab0 as f64) / n as f64;
    println!(
        "scale: kernel slab {slab_per_conn:.1} KiB per proxied connection (4 sockets; half are sluice's)"
    );
    let kib_per_conn = (rss1 as f64 - rss_listeners as f64) / n as f64;
    let kib_per_listener = (rss_listeners as f64 - rss_base as f64) / 100.0;
    println!(
        "scale: {n} idle connections over {k} services (opened in {took:?}), descriptor limit {limit}; \
         sluice RSS {rss_base} KiB with {k} listeners, {rss_listeners} KiB with {} ({kib_per_listener:.1} KiB/listener), \
         {rss1} KiB with the connections ({kib_per_conn:.2} KiB/conn); descriptors {fds0} -> {fds1}",
        k + 100
    );
    // The connections still work.
    let mut c = held.into_iter().next_back().unwrap();
    c.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut one))
        .await
        .unwrap()
        .unwrap();
    assert!(
        kib_per_conn < 32.0,
        "{kib_per_conn:.2} KiB per idle connection"
    );
    assert!(
        kib_per_listener < 256.0,
        "{kib_per_listener:.1} KiB per listener"
    );
}

/// A TCP SYN from `src` to `dst` (IPv4 header included; the kernel fills
/// in the IP checksum and length).
fn syn(src: std::net::SocketAddrV4, dst: std::net::SocketAddrV4, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45; // IPv4, 20-byte header
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64; // TTL
    p[9] = 6; // TCP
    p[12..16].copy_from_slice(&src.ip().octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&src.port().to_be_bytes());
    t[2..4].copy_from_slice(&dst.port().to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4; // data offset: 5 words
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    // Checksum over the pseudo-header and the segment.
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for w in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.ip().octets());
    add(&dst.ip().octets());
    add(&[0, 6, 0, 20]);
    add(&p[20..40]);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[36..38].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p
}

/// `TcpExt` counter `name` of the calling thread's namespace.
fn tcp_ext(name: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (keys, values) = (lines.next().unwrap(), lines.next().unwrap());
    keys.split_whitespace()
        .zip(values.split_whitespace())
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_syn_flood_with_syncookies_leaves_legitimate_clients_served() {
    use sluice_testkit::netns::{self, Netns};
    if let Some(why) = netns::unusable(&["ip", "nft"]) {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let ns = Netns::new(format!("g-syn-{}", std::process::id())).unwrap();
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    // Replies to the spoofed sources go nowhere, as from a real flood.
    ns.ip(&["route", "add", "10.99.0.0/16", "dev", "lo"])
        .unwrap();
    let exec = |args: &[&str], stdin: Option<&str>| {
        let mut all = vec!["netns", "exec", ns.name()];
        all.extend_from_slice(args);
        netns::run("ip", &all, stdin).unwrap();
    };
    exec(&["sysctl", "-qw", "net.ipv4.tcp_syncookies=1"], None);
    exec(
        &["nft", "-f", "-"],
        Some(
            "table ip g_syn {\n chain out {\n  type filter hook output priority 0;\n  ip daddr 10.99.0.0/16 drop\n }\n}\n",
        ),
    );
    let report = ns
        .block_on(Duration::from_secs(60), || async {
            let echo = backend(Behaviour::Echo).await;
            let listen = free_addr().unwrap();
            let s = start(vec![service("flooded", listen, echo.addr)]).await;
            let SocketAddr::V4(dst) = listen else {
                unreachable!()
            };
            let quiet = exchanges(listen, 200, Duration::from_secs(5)).await;
            let cookies0 = tcp_ext("SyncookiesSent");
            let overflow0 = tcp_ext("TCPReqQFullDoCookies");
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let sent = Arc::new(AtomicUsize::new(0));
            // The flood: spoofed sources 10.99.x.y, as fast as one thread
            // sends, until the legitimate clients are done (at most 20 s).
            let flood = {
                let (stop, sent) = (stop.clone(), sent.clone());
                std::thread::spawn(move || {
                    use socket2::{Domain, Protocol, Socket, Type};
                    let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP)).unwrap();
                    raw.set_header_included_v4(true).unwrap();
                    let to = SocketAddr::V4(dst).into();
                    let t0 = Instant::now();
                    let mut i: u32 = 0;
                    while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(20) {
                        i = i.wrapping_add(1);
                        let ip = std::net::Ipv4Addr::new(10, 99, (i >> 8) as u8, i as u8);
                        let src = std::net::SocketAddrV4::new(ip, 1024 + (i % 60000) as u16);
                        if raw
                            .send_to(&syn(src, dst, i.wrapping_mul(2654435761)), &to)
                            .is_ok()
                        {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            };
            // Let the SYN queue fill first.
            while sent.load(Ordering::Relaxed) < 20_000 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let lat = exchanges(listen, 200, Duration::from_secs(5)).await;
            stop.store(true, Ordering::Relaxed);
            flood.join().unwrap();
            let cookies = tcp_ext("SyncookiesSent") - cookies0;
            let overflow = tcp_ext("TCPReqQFullDoCookies") - overflow0;
            let accepted = total(&s, "sluice_connections_accepted_total").await;
            let report = format!(
                "{} SYNs sent; syncookies sent {cookies}, SYN queue full {overflow} times; \
                 200 of 200 legitimate exchanges served (before the flood: {}; during: {}); \
                 sluice accepted {accepted}",
                sent.load(Ordering::Relaxed),
                show(&quiet),
                show(&lat),
            );
            (report, cookies)
        })
        .unwrap();
    let (report, cookies) = report;
    println!("syn flood: {report}");
    // The legitimate exchanges (asserted above) ran while the queue was
    // full: the kernel was answering with cookies.
    assert!(
        cookies > 0,
        "the flood never filled the SYN queue: {report}"
    );
}

//! Kernel-side forwarding with a BPF sockmap (issue 18): `forward` in
//! `Mode::Sockmap` between real sockets on loopback, and the daemon with
//! `--forward sockmap`. Needs root (CAP_BPF, CAP_NET_ADMIN) and a build
//! with clang; a build without clang skips these tests (and says so).
//!
//! The in-process tests run one at a time (`serial`): they read the
//! process-wide counters and map sizes, which other connections would move.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sluice_control::source::file::{BackendDoc, ConfigDoc, ServiceDoc};
use sluice_proxy::forward::{Mode, Outcome, Transferred, forward};
use sluice_proxy::sockmap;
use sluice_testkit::backend::{self, Backend};
use sluice_testkit::{Daemon, Options, free_addr, metric};
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, MutexGuard};
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(20);

/// Whether sockmap forwarding can run here; false only for a build
/// without clang (then the test is skipped). Any other failure fails.
fn available() -> bool {
    match sockmap::init() {
        Ok(()) => true,
        Err(e) if e.contains("without clang") => {
            eprintln!("skipped: sluice was built without clang (no sockmap program)");
            false
        }
        Err(e) => panic!("sockmap forwarding unavailable (run as root): {e}"),
    }
}

static SERIAL: Mutex<()> = Mutex::const_new(());

async fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().await
}

fn entries() -> usize {
    sockmap::entries().unwrap().unwrap()
}

/// Waits until the maps are empty again (a connection's entries leave
/// before its task returns, so this is at once in practice).
async fn assert_maps_empty() {
    let deadline = Instant::now() + T;
    while entries() != 0 {
        assert!(Instant::now() < deadline, "{} map entries left", entries());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A connected pair: (the end a test drives, the end sluice holds).
async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (c, s)
}

type Task = tokio::task::JoinHandle<(Outcome, Transferred)>;

/// client ⇄ [forward, sockmap] ⇄ backend. `before` is written by the
/// client before forwarding starts (bytes queued before the sockets enter
/// the map).
async fn hop(
    cut: CancellationToken,
    idle: Option<Duration>,
    before: &[u8],
) -> (TcpStream, TcpStream, Task) {
    let (mut client, client_side) = pair().await;
    let (backend_side, backend) = pair().await;
    if !before.is_empty() {
        client.write_all(before).await.unwrap();
        // Let the bytes land in sluice's socket before it attaches.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let task =
        tokio::spawn(
            async move { forward(client_side, backend_side, &cut, Mode::Sockmap, idle).await },
        );
    (client, backend, task)
}

/// `len` pseudo-random bytes (xorshift, 8 at a time).
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A checksum over 8-byte words (position-dependent), enough to tell two
/// 64 MiB streams apart.
fn checksum(b: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut words = b.chunks_exact(8);
    for w in &mut words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(a))
            .wrapping_mul(0x100_0000_01b3)
            .rotate_left(5);
    }
    for &x in words.remainder() {
        h = (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

#[tokio::test]
async fn echo_goes_through_the_map_and_leaves_it() {
    let _g = serial().await;
    if !available() {
        return;
    }
    let before = sockmap::stats();
    let (mut client, mut backend, task) = hop(CancellationToken::new(), None, b"").await;
    client.write_all(b"hello").await.unwrap();
    let mut b = [0u8; 5];
    backend.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"hello");
    backend.write_all(b"world!").await.unwrap();
    let mut b = [0u8; 6];
    client.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"world!");
    // While open: two sockets × (PEERS, TARGETS, MOVED).
    assert_eq!(entries(), 6);
    let after = sockmap::stats();
    assert_eq!(
        after.forwarded,
        before.forwarded + 1,
        "not forwarded by the map"
    );
    assert_eq!(after.fallbacks, before.fallbacks);
    client.shutdown().await.unwrap();
    backend.shutdown().await.unwrap();
    let (outcome, moved) = tokio::time::timeout(T, task).await.unwrap().unwrap();
    assert_eq!(outcome, Outcome::Closed);
    assert_eq!(moved.client_to_backend, 5);
    assert_eq!(moved.backend_to_client, 6);
    assert_maps_empty().await;
}

/// Bytes the client sent before the sockets entered the map (a request
/// sent while sluice dialed) are forwarded: the program is kicked for
/// them, no further byte is needed.
#[tokio::test]
async fn bytes_queued_before_attaching_are_forwarded() {
    let _g = serial().await;
    if !available() {
        return;
    }
    let (mut client, mut backend, task) =
        hop(CancellationToken::new(), None, b"early request").await;
    let mut b = [0u8; 13];
    tokio::time::timeout(T, backend.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&b, b"early request");
    backend.write_all(b"reply").await.unwrap();
    let mut b = [0u8; 5];
    tokio::time::timeout(T, client.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&b, b"reply");
    drop((client, backend));
    tokio::time::timeout(T, task).await.unwrap().unwrap();
    assert_maps_empty().await;
}

/// 64 MiB each way with half-close: the client writes everything and
/// shuts its write side; the backend must get every byte and then EOF
/// (no FIN overtakes redirected bytes still queued in the kernel), and
/// its 64 MiB answer, written after, still reaches the client.
#[tokio::test]
async fn large_payloads_with_half_close_arrive_whole() {
    let _g = serial().await;
    if !available() {
        return;
    }
    const LEN: usize = 64 << 20;
    let (client, backend, task) = hop(CancellationToken::new(), None, b"").await;
    let (up, down) = (payload(LEN, 1), payload(LEN, 2));
    let (up_sum, down_sum) = (checksum(&up), checksum(&down));
    let (mut cr, mut cw) = client.into_split();
    let (mut br, mut bw) = backend.into_split();
    let writer = tokio::spawn(async move {
        cw.write_all(&up).await.unwrap();
        cw.shutdown().await.unwrap();
        cw
    });
    let mut got = Vec::with_capacity(LEN);
    tokio::time::timeout(T, br.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), LEN, "upstream length");
    assert_eq!(checksum(&got), up_sum, "upstream bytes differ");
    let _cw = writer.await.unwrap();
    let writer = tokio::spawn(async move {
        bw.write_all(&down).await.unwrap();
        bw.shutdown().await.unwrap();
        bw
    });
    let mut got = Vec::with_capacity(LEN);
    tokio::time::timeout(T, cr.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), LEN, "downstream length");
    assert_eq!(checksum(&got), down_sum, "downstream bytes differ");
    let _bw = writer.await.unwrap();
    let (outcome, moved) = tokio::time::timeout(T, task).await.unwrap().unwrap();
    assert_eq!(outcome, Outcome::Closed);
    assert_eq!(moved.client_to_backend, LEN as u64);
    assert_eq!(moved.backend_to_client, LEN as u64);
    assert_maps_empty().await;
}

/// Both ways at once, each side closing as soon as it has written: every
/// byte arrives, each side sees EOF after the last one.
#[tokio::test]
async fn large_payloads_both_ways_at_once() {
    let _g = serial().await;
    if !available() {
        return;
    }
    const LEN: usize = 64 << 20;
    let (client, backend, task) = hop(CancellationToken::new(), None, b"").await;
    let (up, down) = (payload(LEN, 3), payload(LEN, 4));
    let (up_sum, down_sum) = (checksum(&up), checksum(&down));
    let side = |s: TcpStream, out: Vec<u8>| {
        tokio::spawn(async move {
            let (mut r, mut w) = s.into_split();
            let writer = tokio::spawn(async move {
                w.write_all(&out).await.unwrap();
                w.shutdown().await.unwrap();
                w
            });
            let mut got = Vec::with_capacity(LEN);
            r.read_to_end(&mut got).await.unwrap();
            let _w = writer.await.unwrap();
            got
        })
    };
    let (c, b) = (side(client, up), side(backend, down));
    let at_backend = tokio::time::timeout(T, b).await.unwrap().unwrap();
    let at_client = tokio::time::timeout(T, c).await.unwrap().unwrap();
    assert_eq!((at_backend.len(), checksum(&at_backend)), (LEN, up_sum));
    assert_eq!((at_client.len(), checksum(&at_client)), (LEN, down_sum));
    let (outcome, _) = tokio::time::timeout(T, task).await.unwrap().unwrap();
    assert_eq!(outcome, Outcome::Closed);
    assert_maps_empty().await;
}

#[tokio::test]
async fn backend_reset_resets_the_client() {
    let _g = serial().await;
    if !available() {
        return;
    }
    let (mut client, mut backend, task) = hop(CancellationToken::new(), None, b"").await;
    client.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    backend.read_exact(&mut b).await.unwrap();
    backend.write_all(b"partial").await.unwrap();
    SockRef::from(&backend)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(backend);
    let mut rest = Vec::new();
    let r = tokio::time::timeout(T, client.read_to_end(&mut rest))
        .await
        .unwrap();
    assert_eq!(r.unwrap_err().kind(), ErrorKind::ConnectionReset);
    let (outcome, _) = tokio::time::timeout(T, task).await.unwrap().unwrap();
    assert_eq!(outcome, Outcome::Reset);
    assert_maps_empty().await;
}

#[tokio::test]
async fn a_cut_resets_both_sides() {
    let _g = serial().await;
    if !available() {
        return;
    }
    let cut = CancellationToken::new();
    let (mut client, mut backend, task) = hop(cut.clone(), None, b"").await;
    client.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    backend.read_exact(&mut b).await.unwrap();
    cut.cancel();
    let (outcome, _) = tokio::time::timeout(T, task).await.unwrap().unwrap();
    assert_eq!(outcome, Outcome::Cut);
    for s in [&mut client, &mut backend] {
        let mut rest = Vec::new();
        let r = tokio::time::timeout(T, s.read_to_end(&mut rest))
            .await
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), ErrorKind::ConnectionReset);
    }
    assert_maps_empty().await;
}

/// The idle timeout looks at the program's byte counts: a busy connection
/// stays, an idle one is reset.
#[tokio::test]
async fn the_idle_timeout_closes_only_an_idle_connection() {
    let _g = serial().await;
    if !available() {
        return;
    }
    let idle = Some(Duration::from_millis(300));
    let (mut client, mut backend, task) = hop(CancellationToken::new(), idle, b"").await;
    for i in 0..9u8 {
        let mut b = [0u8; 1];
        if i % 2 == 0 {
            client.write_all(&[i]).await.unwrap();
            backend.read_exact(&mut b).await.unwrap();
        } else {
            backend.write_all(&[i]).await.unwrap();
            client.read_exact(&mut b).await.unwrap();
        }
        assert_eq!(b[0], i);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!task.is_finished(), "a busy connection was closed");
    let (outcome, moved) = tokio::time::timeout(T, task).await.unwrap().unwrap();
    assert_eq!(outcome, Outcome::Idle);
    assert_eq!((moved.client_to_backend, moved.backend_to_client), (5, 4));
    assert_maps_empty().await;
}

/// 200 connections at once, each an exchange of its own bytes: all
/// forwarded by the map, and the maps empty once all have closed.
#[tokio::test]
async fn many_concurrent_connections_leave_the_maps_empty() {
    let _g = serial().await;
    if !available() {
        return;
    }
    const N: usize = 200;
    let before = sockmap::stats();
    let mut hops = Vec::new();
    for _ in 0..N {
        hops.push(hop(CancellationToken::new(), None, b"").await);
    }
    // Each task attaches on its own: wait for all of them.
    let deadline = Instant::now() + T;
    while entries() != 6 * N {
        assert!(
            Instant::now() < deadline,
            "{} map entries, not {}",
            entries(),
            6 * N
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut tasks = Vec::new();
    for (i, (mut client, mut backend, task)) in hops.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let msg = format!("request {i}\n");
            client.write_all(msg.as_bytes()).await.unwrap();
            let mut b = vec![0u8; msg.len()];
            backend.read_exact(&mut b).await.unwrap();
            assert_eq!(b, msg.as_bytes());
            backend.write_all(&b).await.unwrap();
            backend.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, msg.as_bytes());
            drop(client);
            let mut rest = Vec::new();
            backend.read_to_end(&mut rest).await.unwrap();
            task.await.unwrap().0
        }));
    }
    for t in tasks {
        let outcome = tokio::time::timeout(T, t).await.unwrap().unwrap();
        assert_eq!(outcome, Outcome::Closed);
    }
    let after = sockmap::stats();
    assert_eq!(after.forwarded - before.forwarded, N as u64);
    assert_eq!(after.fallbacks, before.fallbacks);
    assert_maps_empty().await;
}

/// A client that has already sent its FIN when sluice attaches cannot
/// enter the map (the kernel takes established sockets only): that
/// connection is spliced instead, and still served whole.
#[tokio::test]
async fn a_client_closed_before_attaching_is_spliced_and_served() {
    let _g = serial().await;
    if !available() {
        return;
    }
    let before = sockmap::stats();
    let (mut client, client_side) = pair().await;
    let (backend_side, mut backend) = pair().await;
    client.write_all(b"all of it").await.unwrap();
    client.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cut = CancellationToken::new();
    let task =
        tokio::spawn(
            async move { forward(client_side, backend_side, &cut, Mode::Sockmap, None).await },
        );
    let mut got = Vec::new();
    tokio::time::timeout(T, backend.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"all of it");
    backend.write_all(b"answer").await.unwrap();
    backend.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(T, client.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"answer");
    let (outcome, _) = tokio::time::timeout(T, task).await.unwrap().unwrap();
    assert_eq!(outcome, Outcome::Closed);
    assert_eq!(sockmap::stats().fallbacks, before.fallbacks + 1);
    assert_maps_empty().await;
}

// The daemon with --forward sockmap.

async fn start(listen: SocketAddr, backends: &[SocketAddr], extra: &[&str]) -> Daemon {
    let args = ["--config-poll-interval", "100ms", "--forward", "sockmap"]
        .iter()
        .chain(extra);
    let opts = Options {
        config: Some(config(listen, backends)),
        args: args.map(|a| a.to_string()).collect(),
        log_filter: Some("info".into()),
        ..Options::new(env!("CARGO_BIN_EXE_sluice"))
    };
    Daemon::start(opts).await.unwrap()
}

fn config(listen: SocketAddr, backends: &[SocketAddr]) -> String {
    let b = backends.iter().map(|a| BackendDoc::ready(*a)).collect();
    ConfigDoc::new(vec![ServiceDoc::new("test", listen, b)])
        .to_yaml()
        .unwrap()
}

async fn series(s: &Daemon, name: &str) -> f64 {
    metric(&s.scrape().await.unwrap(), name).unwrap_or(0.0)
}

#[tokio::test]
async fn the_daemon_forwards_with_the_map_and_says_so() {
    if !available() {
        return;
    }
    let a = Backend::start("a", backend::Mode::Echo).await.unwrap();
    let listen = free_addr().unwrap();
    let s = start(listen, &[a.addr], &[]).await;
    assert_eq!(series(&s, "sluice_forward_sockmap_available").await, 1.0);
    for i in 0..3 {
        // The backend greets first (its name), then echoes.
        let (mut c, name) = backend::connect_named(listen).await.unwrap();
        assert_eq!(name, "a");
        let line = format!("line {i}\n");
        c.write_all(line.as_bytes()).await.unwrap();
        assert_eq!(backend::read_line(&mut c).await.unwrap(), line.trim_end());
    }
    assert_eq!(
        series(&s, "sluice_forward_sockmap_connections_total").await,
        3.0
    );
    assert_eq!(
        series(&s, "sluice_forward_sockmap_fallbacks_total").await,
        0.0
    );
}

/// A removed backend's connection drains and is cut with a reset when the
/// drain timeout ends; until then it still flows both ways.
#[tokio::test]
async fn a_removed_backend_connection_flows_then_is_cut() {
    if !available() {
        return;
    }
    let old = Backend::start("old", backend::Mode::Echo).await.unwrap();
    let new = Backend::start("new", backend::Mode::Echo).await.unwrap();
    let listen = free_addr().unwrap();
    let mut s = start(listen, &[old.addr], &["--drain-timeout", "1s"]).await;
    let (mut established, name) = backend::connect_named(listen).await.unwrap();
    assert_eq!(name, "old");
    s.reload_and_wait(&config(listen, &[new.addr]))
        .await
        .unwrap();
    let (_, name) = backend::connect_named(listen).await.unwrap();
    assert_eq!(name, "new");
    established.write_all(b"still here\n").await.unwrap();
    assert_eq!(
        backend::read_line(&mut established).await.unwrap(),
        "still here"
    );
    let mut rest = Vec::new();
    let r = tokio::time::timeout(T, established.read_to_end(&mut rest))
        .await
        .unwrap();
    assert_eq!(r.unwrap_err().kind(), ErrorKind::ConnectionReset);
    assert!(series(&s, "sluice_forward_sockmap_connections_total").await >= 2.0);
}

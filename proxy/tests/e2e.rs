//! End-to-end tests: the real `sluice` binary between real clients and real
//! backends on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sluice_control::Policy;
use sluice_control::source::file::{BackendDoc, ConfigDoc, ServiceDoc};
use sluice_testkit::backend::{self, Backend, Event, Mode};
use sluice_testkit::daemon::Signal;
use sluice_testkit::{Daemon, Options, free_addr, http, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(5);

fn listen_addr() -> SocketAddr {
    free_addr().unwrap()
}

/// sluice on a file with `config`, with `extra` flags, its first table
/// live.
async fn start(config: impl Into<ConfigDoc>, extra: &[&str]) -> Daemon {
    let args = ["--config-poll-interval", "100ms"].iter().chain(extra);
    let opts = Options {
        config: Some(yaml(config)),
        args: args.map(|a| a.to_string()).collect(),
        log_filter: Some("info".into()),
        ..Options::new(env!("CARGO_BIN_EXE_sluice"))
    };
    Daemon::start(opts).await.unwrap()
}

fn yaml(config: impl Into<ConfigDoc>) -> String {
    config.into().to_yaml().unwrap()
}

/// Replaces the config and waits until its table is live; its generation.
async fn reload(s: &mut Daemon, config: impl Into<ConfigDoc>) -> u64 {
    s.reload_and_wait(&yaml(config)).await.unwrap()
}

async fn connect_named(addr: SocketAddr) -> (TcpStream, String) {
    backend::connect_named(addr).await.unwrap()
}

async fn read_line(s: &mut TcpStream) -> String {
    backend::read_line(s).await.unwrap()
}

/// Service `test` on `listen` over `backends`, each `(addr, state)` where
/// state is one of ready|terminating|terminating-not-serving.
fn config(listen: SocketAddr, backends: &[(SocketAddr, &str)]) -> ServiceDoc {
    let backend = |&(a, state): &(SocketAddr, &str)| match state {
        "ready" => BackendDoc::ready(a),
        "terminating" => BackendDoc::terminating(a),
        "terminating-not-serving" => BackendDoc {
            serving: Some(false),
            ..BackendDoc::terminating(a)
        },
        other => panic!("unknown state {other}"),
    };
    ServiceDoc::new("test", listen, backends.iter().map(backend).collect())
}

/// Services `test` on `first` and `second` on `second`, both over `backend`.
fn two(first: SocketAddr, second: SocketAddr, backend: SocketAddr) -> ConfigDoc {
    let one = |name, listen| ServiceDoc::new(name, listen, vec![BackendDoc::ready(backend)]);
    ConfigDoc::new(vec![one("test", first), one("second", second)])
}

/// Reads until EOF; `Err(kind)` if the connection fails instead.
async fn read_to_end(s: &mut TcpStream) -> Result<Vec<u8>, ErrorKind> {
    let mut out = Vec::new();
    match tokio::time::timeout(T, s.read_to_end(&mut out)).await {
        Ok(Ok(_)) => Ok(out),
        Ok(Err(e)) => Err(e.kind()),
        Err(_) => Err(ErrorKind::TimedOut),
    }
}

/// Waits until the series `series` of /metrics reaches `min`.
async fn wait_metric(s: &Daemon, series: &str, min: f64) {
    let deadline = Instant::now() + T;
    loop {
        let text = s.scrape().await.unwrap();
        if metric(&text, series).is_some_and(|v| v >= min) {
            return;
        }
        assert!(Instant::now() < deadline, "{series} < {min}:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A connection that sluice resets at once (no backend): EOF or reset
/// before any byte.
async fn assert_refused_by_proxy(listen: SocketAddr) {
    let mut s = match TcpStream::connect(listen).await {
        Ok(s) => s,
        // The reset can overtake the end of the handshake on loopback.
        Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
        Err(e) => panic!("connect to sluice: {e}"),
    };
    let mut b = [0u8; 1];
    match tokio::time::timeout(T, s.read(&mut b)).await.unwrap() {
        Ok(0) => {}
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
        Ok(n) => panic!("expected no data, got {n} bytes"),
    }
}

#[tokio::test]
async fn forwards_both_ways_and_balances_round_robin() {
    let a = Backend::start("a", Mode::Echo).await.unwrap();
    let b = Backend::start("b", Mode::Echo).await.unwrap();
    let listen = listen_addr();
    let _s = start(config(listen, &[(a.addr, "ready"), (b.addr, "ready")]), &[]).await;
    let mut seen = Vec::new();
    for i in 0..4 {
        let (mut c, name) = connect_named(listen).await;
        let msg = format!("hello {i}");
        c.write_all(msg.as_bytes()).await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut c).await.unwrap(), msg.as_bytes());
        seen.push(name);
    }
    assert_eq!(seen.iter().filter(|n| *n == "a").count(), 2, "{seen:?}");
    assert_eq!(seen.iter().filter(|n| *n == "b").count(), 2, "{seen:?}");
}

#[tokio::test]
async fn large_payload_is_forwarded_byte_for_byte() {
    let a = Backend::start("a", Mode::Echo).await.unwrap();
    let listen = listen_addr();
    let _s = start(config(listen, &[(a.addr, "ready")]), &[]).await;
    let (c, name) = connect_named(listen).await;
    assert_eq!(name, "a");
    let payload: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (mut r, mut w) = c.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::with_capacity(payload.len());
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "payload differs");
}

#[tokio::test]
async fn client_half_close_reaches_backend_and_reply_still_flows() {
    let mut a = Backend::start("a", Mode::Echo).await.unwrap();
    let listen = listen_addr();
    let _s = start(config(listen, &[(a.addr, "ready")]), &[]).await;
    let (mut c, _) = connect_named(listen).await;
    c.write_all(b"request").await.unwrap();
    c.shutdown().await.unwrap(); // FIN towards sluice
    // The echo backend only closes after it saw EOF: reading the echo and
    // then EOF proves the FIN crossed and the other direction stayed open.
    assert_eq!(read_to_end(&mut c).await.unwrap(), b"request");
    assert_eq!(a.next_event(T).await.unwrap(), Event::Accepted);
    assert_eq!(a.next_event(T).await.unwrap(), Event::Received(7));
}

#[tokio::test]
async fn backend_half_close_reaches_client_and_client_can_still_send() {
    let mut a = Backend::start("a", Mode::CloseThenSink).await.unwrap();
    let listen = listen_addr();
    let _s = start(config(listen, &[(a.addr, "ready")]), &[]).await;
    let mut c = TcpStream::connect(listen).await.unwrap();
    let mut bye = [0u8; 3];
    c.read_exact(&mut bye).await.unwrap();
    assert_eq!(&bye, b"bye");
    let mut b = [0u8; 1];
    assert_eq!(c.read(&mut b).await.unwrap(), 0, "EOF from the backend");
    c.write_all(&[7u8; 5000]).await.unwrap();
    c.shutdown().await.unwrap();
    assert_eq!(a.next_event(T).await.unwrap(), Event::Accepted);
    assert_eq!(a.next_event(T).await.unwrap(), Event::Received(5000));
}

#[tokio::test]
async fn backend_reset_reaches_client_as_reset() {
    let a = Backend::start("a", Mode::ResetAfterRead).await.unwrap();
    let listen = listen_addr();
    let _s = start(config(listen, &[(a.addr, "ready")]), &[]).await;
    let mut c = TcpStream::connect(listen).await.unwrap();
    c.write_all(b"x").await.unwrap();
    assert_eq!(read_to_end(&mut c).await, Err(ErrorKind::ConnectionReset));
}

#[tokio::test]
async fn client_reset_reaches_backend_as_reset() {
    let mut a = Backend::start("a", Mode::Echo).await.unwrap();
    let listen = listen_addr();
    let _s = start(config(listen, &[(a.addr, "ready")]), &[]).await;
    let (c, _) = connect_named(listen).await;
    assert_eq!(a.next_event(T).await.unwrap(), Event::Accepted);
    c.set_zero_linger().unwrap();
    drop(c);
    assert_eq!(
        a.next_event(T).await.unwrap(),
        Event::Failed(ErrorKind::ConnectionReset)
    );
}

#[tokio::test]
async fn refused_backend_is_retried_on_another_and_ejected() {
    let dead = listen_addr();
    let mut live = Backend::start("live", Mode::Echo).await.unwrap();
    let listen = listen_addr();
    let s = start(
        config(listen, &[(dead, "ready"), (live.addr, "ready")]),
        &["--log-format", "text"],
    )
    .await;
    for _ in 0..20 {
        let (mut c, name) = connect_named(listen).await;
        assert_eq!(name, "live");
        c.shutdown().await.unwrap();
        read_to_end(&mut c).await.unwrap();
    }
    assert_eq!(live.accepted_so_far(), 20);
    drop(s);

    // With only the dead backend, the client is reset at once.
    let listen = listen_addr();
    let _s = start(config(listen, &[(dead, "ready")]), &[]).await;
    let started = Instant::now();
    assert_refused_by_proxy(listen).await;
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn terminating_backend_gets_no_new_connection_but_keeps_its_own_until_drain_timeout() {
    let old = Backend::start("old", Mode::Echo).await.unwrap();
    let new = Backend::start("new", Mode::Echo).await.unwrap();
    let listen = listen_addr();
    let mut s = start(
        config(listen, &[(old.addr, "ready")]),
        &["--drain-timeout", "2s"],
    )
    .await;
    let (mut established, name) = connect_named(listen).await;
    assert_eq!(name, "old");

    reload(
        &mut s,
        config(listen, &[(old.addr, "terminating"), (new.addr, "ready")]),
    )
    .await;
    for _ in 0..10 {
        let (_, name) = connect_named(listen).await;
        assert_eq!(name, "new", "a terminating backend got a new connection");
    }
    // The established connection still flows both ways.
    established.write_all(b"still here\n").await.unwrap();
    assert_eq!(read_line(&mut established).await, "still here");

    // Then the drain timeout cuts it with a reset.
    let cut_at = Instant::now();
    let r = read_to_end(&mut established).await;
    assert_eq!(r, Err(ErrorKind::ConnectionReset));
    assert!(cut_at.elapsed() < Duration::from_secs(4));
    wait_metric(&s, "sluice_drain_cut_connections_total", 1.0).await;
}

#[tokio::test]
async fn removed_backend_drains_established_connection() {
    let old = Backend::start("old", Mode::Echo).await.unwrap();
    let new = Backend::start("new", Mode::Echo).await.unwrap();
    let listen = listen_addr();
    let mut s = start(config(listen, &[(old.addr, "ready")]), &[]).await;
    let (mut established, _) = connect_named(listen).await;
    reload(&mut s, config(listen, &[(new.addr, "ready")])).await;
    let (_, name) = connect_named(listen).await;
    assert_eq!(name, "new");
    established.write_all(b"ping\n").await.unwrap();
    assert_eq!(read_line(&mut established).await, "ping");
    established.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut established).await, Ok(vec![]));
}

#[tokio::test]
async fn terminating_fallback_serves_when_nothing_is_ready() {
    let a = Backend::start("a", Mode::Echo).await.unwrap();
    let b = Backend::start("b", Mode::Echo).await.unwrap();
    let listen = listen_addr();
    let mut s = start(
        config(
            listen,
            &[(a.addr, "terminating"), (b.addr, "terminating-not-serving")],
        ),
        &[],
    )
    .await;
    for _ in 0..6 {
        let (_, name) = connect_named(listen).await;
        assert_eq!(name, "a", "only the serving terminating backend");
    }
    reload(
        &mut s,
        config(listen, &[(b.addr, "terminating-not-serving")]),
    )
    .await;
    assert_refused_by_proxy(listen).await;
}

#[tokio::test]
async fn broken_config_keeps_the_last_good_table_serving() {
    let a = Backend::start("a", Mode::Echo).await.unwrap();
    let b = Backend::start("b", Mode::Echo).await.unwrap();
    let listen = listen_addr();
    let mut s = start(config(listen, &[(a.addr, "ready")]), &[]).await;
    s.reload("services:\n  - name: test\n    listen: not-an-address\n")
        .unwrap();
    // SIGHUP makes sluice read it at once; the error (with its line) is
    // the file source's, tested in sluice-control.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.generation().await.unwrap(),
        1,
        "a broken file made a table"
    );
    for _ in 0..3 {
        let (_, name) = connect_named(listen).await;
        assert_eq!(name, "a");
    }
    // A later good file applies.
    assert_eq!(
        reload(&mut s, config(listen, &[(b.addr, "ready")])).await,
        2
    );
    let (_, name) = connect_named(listen).await;
    assert_eq!(name, "b");
}

#[tokio::test]
async fn listeners_follow_services_added_and_removed() {
    let a = Backend::start("a", Mode::Echo).await.unwrap();
    let first = listen_addr();
    let second = listen_addr();
    let mut s = start(config(first, &[(a.addr, "ready")]), &[]).await;
    assert!(TcpStream::connect(second).await.is_err());
    reload(&mut s, two(first, second, a.addr)).await;
    let (_, name) = connect_named(second).await;
    assert_eq!(name, "a");
    reload(&mut s, config(second, &[(a.addr, "ready")])).await;
    let deadline = Instant::now() + T;
    while TcpStream::connect(first).await.is_ok() {
        assert!(Instant::now() < deadline, "removed service still accepts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The Service added above is removed in turn, and the first key,
    // removed before, is bound again.
    reload(&mut s, config(first, &[(a.addr, "ready")])).await;
    let (_, name) = connect_named(first).await;
    assert_eq!(name, "a");
    let deadline = Instant::now() + T;
    while TcpStream::connect(second).await.is_ok() {
        assert!(Instant::now() < deadline, "removed service still accepts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_listen_address_held_elsewhere_is_bound_once_it_comes_free() {
    let a = Backend::start("a", Mode::Echo).await.unwrap();
    let listen = listen_addr();
    // Held without SO_REUSEPORT: sluice's bind fails until it is closed.
    let holder = tokio::net::TcpListener::bind(listen).await.unwrap();
    let s = start(config(listen, &[(a.addr, "ready")]), &[]).await;
    let _client = TcpStream::connect(listen).await.unwrap();
    let accepted = tokio::time::timeout(T, holder.accept()).await;
    assert!(
        accepted.is_ok(),
        "the holder, not sluice, took the connection"
    );
    drop(holder);
    // The reconciler retries the bind (every second) with no new table.
    let deadline = Instant::now() + T;
    loop {
        match backend::connect_named(listen).await {
            Ok((_, name)) if name == "a" => break,
            _ => {
                assert!(
                    Instant::now() < deadline,
                    "never bound after the port came free"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(s);
}

#[tokio::test]
async fn sigterm_stops_accepting_and_drains_open_connections() {
    let a = Backend::start("a", Mode::Echo).await.unwrap();
    let listen = listen_addr();
    let mut s = start(config(listen, &[(a.addr, "ready")]), &[]).await;
    let (mut open, _) = connect_named(listen).await;
    s.signal(Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + T;
    while TcpStream::connect(listen).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    open.write_all(b"after term\n").await.unwrap();
    assert_eq!(read_line(&mut open).await, "after term");
    open.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut open).await, Ok(vec![]));
    // Drained, not cut: the open connection ended with a clean EOF.
    assert_eq!(s.wait_exit(T).await.unwrap().code(), Some(0));
}

#[tokio::test]
async fn sigterm_cuts_what_outlives_the_grace_period() {
    let a = Backend::start("a", Mode::Echo).await.unwrap();
    let listen = listen_addr();
    let mut s = start(
        config(listen, &[(a.addr, "ready")]),
        &["--shutdown-grace", "1s"],
    )
    .await;
    let (mut idle, _) = connect_named(listen).await;
    let term = Instant::now();
    s.signal(Signal::SIGTERM).unwrap();
    assert_eq!(s.wait_exit(T).await.unwrap().code(), Some(0));
    assert_eq!(
        read_to_end(&mut idle).await,
        Err(ErrorKind::ConnectionReset)
    );
    // Cut by the grace period's end, not by SIGTERM itself.
    assert!(
        term.elapsed() >= Duration::from_millis(900),
        "{:?}",
        term.elapsed()
    );
}

#[tokio::test]
async fn least_connections_avoids_the_busy_backend() {
    let a = Backend::start("a", Mode::Echo).await.unwrap();
    let b = Backend::start("b", Mode::Echo).await.unwrap();
    let listen = listen_addr();
    let config = config(listen, &[(a.addr, "ready"), (b.addr, "ready")]);
    let _s = start(config.with_policy(Policy::LeastConnections), &[]).await;
    // Hold connections open; least-connections must keep them even.
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(connect_named(listen).await);
    }
    let on_a = held.iter().filter(|(_, n)| n == "a").count();
    assert!((7..=13).contains(&on_a), "uneven spread: {on_a}/20 on a");
}

#[tokio::test]
async fn client_ip_affinity_sticks() {
    let a = Backend::start("a", Mode::Echo).await.unwrap();
    let b = Backend::start("b", Mode::Echo).await.unwrap();
    let listen = listen_addr();
    let config = config(listen, &[(a.addr, "ready"), (b.addr, "ready")]);
    let _s = start(config.with_affinity(60), &[]).await;
    let names: HashSet<String> = {
        let mut names = HashSet::new();
        for _ in 0..6 {
            names.insert(connect_named(listen).await.1);
        }
        names
    };
    assert_eq!(names.len(), 1, "affinity broke: {names:?}");
}

#[tokio::test]
async fn bad_flag_exits_64_with_one_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--config", "/nonexistent.yaml", "--connect-timeout", "soon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--config", "/nonexistent/sluice.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/sluice.yaml"), "{err}");
}

/// `--detect-local-mode BridgeInterface` without `--pod-bridge-interface`
/// while transparent dials are asked for: exit 64 with the one line that
/// names the missing flag, before serving anything.
#[test]
fn a_detect_local_mode_without_its_flag_exits_64_naming_it() {
    let path = std::env::temp_dir().join(format!("d-sluice-detect-{}.yaml", std::process::id()));
    std::fs::write(&path, yaml(config(listen_addr(), &[]))).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--config")
        .arg(&path)
        .args([
            "--source-ip",
            "transparent",
            "--detect-local-mode",
            "BridgeInterface",
        ])
        .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    for _ in 0..100 {
        status = child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_file(&path);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(64), "{err}");
    assert!(
        err.contains(
            "sluice: --detect-local-mode BridgeInterface needs --pod-bridge-interface NAME \
             (the pod interface to match)"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn admin_endpoints_report_health_metrics_and_the_live_table() {
    let a = Backend::start("a", Mode::Echo).await.unwrap();
    let listen = listen_addr();
    let s = start(config(listen, &[(a.addr, "ready")]), &[]).await;
    assert_eq!(http::get(s.health, "/readyz").await.unwrap().0, 200);
    let (status, body) = http::get(s.health, "/healthz").await.unwrap();
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        health["lastUpdated"].is_string() && health["currentTime"].is_string(),
        "{body}"
    );
    assert_eq!(http::get(s.health, "/livez").await.unwrap().0, 200);
    assert_eq!(
        http::get(s.health, "/metrics").await.unwrap().0,
        404,
        "metrics only on the metrics address"
    );

    let (open, _) = connect_named(listen).await;
    let (_, table) = http::get(s.metrics, "/debug/table").await.unwrap();
    let table: serde_json::Value = serde_json::from_str(&table).unwrap();
    let backend = &table["services"][0]["backends"][0];
    assert_eq!(backend["address"], a.addr.to_string());
    assert_eq!(backend["active"], 1, "{table}");
    assert_eq!(backend["state"], "ready");

    let (status, metrics) = http::get(s.metrics, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains("sluice_connections_accepted_total{service=\"test\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_connections_active{service=\"test\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "sluice_backend_connections_active{{backend=\"{}\"}} 1",
            a.addr
        )),
        "{metrics}"
    );
    drop(open);
}

/// Listening TCP sockets on `port` in this network namespace (from
/// /proc/net/tcp: local address, state 0A = LISTEN).
fn listeners_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let want = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
        })
        .count()
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn every_worker_listens_and_serves() {
    let a = Backend::start("a", Mode::Echo).await.unwrap();
    for (workers, listeners) in [("3", 3), ("0", 1)] {
        let listen = listen_addr();
        let _s = start(
            config(listen, &[(a.addr, "ready")]),
            &["--workers", workers],
        )
        .await;
        assert_eq!(
            listeners_on(listen.port()),
            listeners,
            "--workers {workers}"
        );
        // Clients come from distinct ports, so the kernel hashes them over
        // the group; every one must be served whichever listener took it.
        for _ in 0..24 {
            let (_, name) = connect_named(listen).await;
            assert_eq!(name, "a", "--workers {workers}");
        }
    }
}

/// `--max-connections` bounds connections being served, over all services
/// and workers: at the limit a new client waits (accepted, not yet dialed)
/// until a connection ends. Idle accept loops (4 workers × 2 services
/// here) hold no share of the limit.
#[tokio::test]
async fn connection_limit_is_shared_by_all_workers_and_services() {
    let a = Backend::start("a", Mode::Echo).await.unwrap();
    let first = listen_addr();
    let second = listen_addr();
    let _s = start(
        two(first, second, a.addr),
        &["--workers", "4", "--max-connections", "2"],
    )
    .await;
    // Every listener of both services serves, one connection at a time
    // (clients from distinct ports land on different listeners).
    for listen in [first, second] {
        for _ in 0..12 {
            let (_, name) = connect_named(listen).await;
            assert_eq!(name, "a");
        }
    }
    // Two connections held: the limit is reached.
    let (held, _) = connect_named(first).await;
    let (_held2, _) = connect_named(second).await;
    let mut third = TcpStream::connect(second).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), read_line(&mut third))
            .await
            .is_err(),
        "a third connection was served beyond --max-connections 2"
    );
    drop(held);
    assert_eq!(read_line(&mut third).await, "a", "served once a slot freed");
}

#[tokio::test]
async fn a_service_on_the_metrics_address_is_refused_and_metrics_keep_answering() {
    let backend = Backend::start("a", Mode::Echo).await.unwrap();
    let listen = listen_addr();
    let mut s = start(config(listen, &[(backend.addr, "ready")]), &[]).await;
    // Every listener is SO_REUSEPORT: without the check a Service on the
    // metrics address binds too and takes part of /metrics' connections.
    let metrics = s.metrics;
    reload(&mut s, two(listen, metrics, backend.addr)).await;
    for _ in 0..20 {
        let text = s.scrape().await.unwrap();
        assert!(metric(&text, "sluice_table_generation").is_some(), "{text}");
    }
    let log = s.log_tail(200);
    assert!(
        log.contains("would share the port of sluice's own admin endpoint"),
        "{log}"
    );
    // The other Service is still served.
    let (_c, name) = connect_named(listen).await;
    assert_eq!(name, "a");
}

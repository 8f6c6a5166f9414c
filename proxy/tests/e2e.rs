//! End-to-end tests: the real `sluice` binary between real clients and real
//! backends on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::{Backend, Event, Mode, Sluice, config, connect_named, free_port, read_line};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(5);

fn listen_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
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
    let a = Backend::start("a", Mode::Echo).await;
    let b = Backend::start("b", Mode::Echo).await;
    let listen = listen_addr();
    let _s = Sluice::start(
        &config(listen, &[(a.addr, "ready"), (b.addr, "ready")]),
        &[],
    );
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
    let a = Backend::start("a", Mode::Echo).await;
    let listen = listen_addr();
    let _s = Sluice::start(&config(listen, &[(a.addr, "ready")]), &[]);
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
    let mut a = Backend::start("a", Mode::Echo).await;
    let listen = listen_addr();
    let _s = Sluice::start(&config(listen, &[(a.addr, "ready")]), &[]);
    let (mut c, _) = connect_named(listen).await;
    c.write_all(b"request").await.unwrap();
    c.shutdown().await.unwrap(); // FIN towards sluice
    // The echo backend only closes after it saw EOF: reading the echo and
    // then EOF proves the FIN crossed and the other direction stayed open.
    assert_eq!(read_to_end(&mut c).await.unwrap(), b"request");
    assert_eq!(a.next_event(T).await, Event::Accepted);
    assert_eq!(a.next_event(T).await, Event::Received(7));
}

#[tokio::test]
async fn backend_half_close_reaches_client_and_client_can_still_send() {
    let mut a = Backend::start("a", Mode::CloseThenSink).await;
    let listen = listen_addr();
    let _s = Sluice::start(&config(listen, &[(a.addr, "ready")]), &[]);
    let mut c = TcpStream::connect(listen).await.unwrap();
    let mut bye = [0u8; 3];
    c.read_exact(&mut bye).await.unwrap();
    assert_eq!(&bye, b"bye");
    let mut b = [0u8; 1];
    assert_eq!(c.read(&mut b).await.unwrap(), 0, "EOF from the backend");
    c.write_all(&[7u8; 5000]).await.unwrap();
    c.shutdown().await.unwrap();
    assert_eq!(a.next_event(T).await, Event::Accepted);
    assert_eq!(a.next_event(T).await, Event::Received(5000));
}

#[tokio::test]
async fn backend_reset_reaches_client_as_reset() {
    let a = Backend::start("a", Mode::ResetAfterRead).await;
    let listen = listen_addr();
    let _s = Sluice::start(&config(listen, &[(a.addr, "ready")]), &[]);
    let mut c = TcpStream::connect(listen).await.unwrap();
    c.write_all(b"x").await.unwrap();
    assert_eq!(read_to_end(&mut c).await, Err(ErrorKind::ConnectionReset));
}

#[tokio::test]
async fn client_reset_reaches_backend_as_reset() {
    let mut a = Backend::start("a", Mode::Echo).await;
    let listen = listen_addr();
    let _s = Sluice::start(&config(listen, &[(a.addr, "ready")]), &[]);
    let (c, _) = connect_named(listen).await;
    assert_eq!(a.next_event(T).await, Event::Accepted);
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    assert_eq!(
        a.next_event(T).await,
        Event::Failed(ErrorKind::ConnectionReset)
    );
}

#[tokio::test]
async fn refused_backend_is_retried_on_another_and_ejected() {
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut live = Backend::start("live", Mode::Echo).await;
    let listen = listen_addr();
    let s = Sluice::start(
        &config(listen, &[(dead, "ready"), (live.addr, "ready")]),
        &["--log-format", "text"],
    );
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
    let _s = Sluice::start(&config(listen, &[(dead, "ready")]), &[]);
    let started = Instant::now();
    assert_refused_by_proxy(listen).await;
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn terminating_backend_gets_no_new_connection_but_keeps_its_own_until_drain_timeout() {
    let old = Backend::start("old", Mode::Echo).await;
    let new = Backend::start("new", Mode::Echo).await;
    let listen = listen_addr();
    let s = Sluice::start(
        &config(listen, &[(old.addr, "ready")]),
        &["--drain-timeout", "2s"],
    );
    let (mut established, name) = connect_named(listen).await;
    assert_eq!(name, "old");

    s.reload(&config(
        listen,
        &[(old.addr, "terminating"), (new.addr, "ready")],
    ));
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
    s.wait_log("drain timeout", T);
}

#[tokio::test]
async fn removed_backend_drains_established_connection() {
    let old = Backend::start("old", Mode::Echo).await;
    let new = Backend::start("new", Mode::Echo).await;
    let listen = listen_addr();
    let s = Sluice::start(&config(listen, &[(old.addr, "ready")]), &[]);
    let (mut established, _) = connect_named(listen).await;
    s.reload(&config(listen, &[(new.addr, "ready")]));
    let (_, name) = connect_named(listen).await;
    assert_eq!(name, "new");
    established.write_all(b"ping\n").await.unwrap();
    assert_eq!(read_line(&mut established).await, "ping");
    established.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut established).await, Ok(vec![]));
}

#[tokio::test]
async fn terminating_fallback_serves_when_nothing_is_ready() {
    let a = Backend::start("a", Mode::Echo).await;
    let b = Backend::start("b", Mode::Echo).await;
    let listen = listen_addr();
    let s = Sluice::start(
        &config(
            listen,
            &[(a.addr, "terminating"), (b.addr, "terminating-not-serving")],
        ),
        &[],
    );
    for _ in 0..6 {
        let (_, name) = connect_named(listen).await;
        assert_eq!(name, "a", "only the serving terminating backend");
    }
    s.reload(&config(listen, &[(b.addr, "terminating-not-serving")]));
    assert_refused_by_proxy(listen).await;
}

#[tokio::test]
async fn broken_config_keeps_the_last_good_table_serving() {
    let a = Backend::start("a", Mode::Echo).await;
    let b = Backend::start("b", Mode::Echo).await;
    let listen = listen_addr();
    let s = Sluice::start(&config(listen, &[(a.addr, "ready")]), &[]);
    s.write_config("services:\n  - name: test\n    listen: not-an-address\n");
    s.wait_log("sluice.yaml:3", T);
    for _ in 0..3 {
        let (_, name) = connect_named(listen).await;
        assert_eq!(name, "a");
    }
    // A later good file applies.
    s.reload(&config(listen, &[(b.addr, "ready")]));
    let (_, name) = connect_named(listen).await;
    assert_eq!(name, "b");
}

#[tokio::test]
async fn listeners_follow_services_added_and_removed() {
    let a = Backend::start("a", Mode::Echo).await;
    let first = listen_addr();
    let second = listen_addr();
    let s = Sluice::start(&config(first, &[(a.addr, "ready")]), &[]);
    assert!(TcpStream::connect(second).await.is_err());
    let both = format!(
        "{}  - name: second\n    listen: {second}\n    backends:\n      - address: {}\n",
        config(first, &[(a.addr, "ready")]),
        a.addr
    );
    s.reload(&both);
    let (_, name) = connect_named(second).await;
    assert_eq!(name, "a");
    s.reload(&config(second, &[(a.addr, "ready")]));
    s.wait_log(&format!("listen={first}/tcp"), T);
    let deadline = Instant::now() + T;
    while TcpStream::connect(first).await.is_ok() {
        assert!(Instant::now() < deadline, "removed service still accepts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sigterm_stops_accepting_and_drains_open_connections() {
    let a = Backend::start("a", Mode::Echo).await;
    let listen = listen_addr();
    let mut s = Sluice::start(&config(listen, &[(a.addr, "ready")]), &[]);
    let (mut open, _) = connect_named(listen).await;
    s.signal(libc::SIGTERM);
    s.wait_log("stopped accepting", T);
    assert!(
        TcpStream::connect(listen).await.is_err(),
        "still accepting after SIGTERM"
    );
    open.write_all(b"after term\n").await.unwrap();
    assert_eq!(read_line(&mut open).await, "after term");
    open.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut open).await, Ok(vec![]));
    assert_eq!(s.wait_exit(T), Some(0));
    assert!(s.log_contains("cut=0"), "{}", s.log_text());
}

#[tokio::test]
async fn sigterm_cuts_what_outlives_the_grace_period() {
    let a = Backend::start("a", Mode::Echo).await;
    let listen = listen_addr();
    let mut s = Sluice::start(
        &config(listen, &[(a.addr, "ready")]),
        &["--shutdown-grace", "1s"],
    );
    let (mut idle, _) = connect_named(listen).await;
    s.signal(libc::SIGTERM);
    assert_eq!(s.wait_exit(T), Some(0));
    assert_eq!(
        read_to_end(&mut idle).await,
        Err(ErrorKind::ConnectionReset)
    );
    assert!(s.log_contains("cutting connections"), "{}", s.log_text());
}

#[tokio::test]
async fn least_connections_avoids_the_busy_backend() {
    let a = Backend::start("a", Mode::Echo).await;
    let b = Backend::start("b", Mode::Echo).await;
    let listen = listen_addr();
    let yaml = config(listen, &[(a.addr, "ready"), (b.addr, "ready")]).replace(
        "    backends:",
        "    policy: least-connections\n    backends:",
    );
    let _s = Sluice::start(&yaml, &[]);
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
    let a = Backend::start("a", Mode::Echo).await;
    let b = Backend::start("b", Mode::Echo).await;
    let listen = listen_addr();
    let yaml = config(listen, &[(a.addr, "ready"), (b.addr, "ready")]).replace(
        "    backends:",
        "    affinity:\n      timeoutSeconds: 60\n    backends:",
    );
    let _s = Sluice::start(&yaml, &[]);
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

#[tokio::test]
async fn admin_endpoints_report_health_metrics_and_the_live_table() {
    let a = Backend::start("a", Mode::Echo).await;
    let listen = listen_addr();
    let s = Sluice::start(&config(listen, &[(a.addr, "ready")]), &[]);
    let wait_bound = Instant::now() + T;
    while TcpStream::connect(s.health).await.is_err() || TcpStream::connect(s.admin).await.is_err()
    {
        assert!(Instant::now() < wait_bound, "admin endpoints never bound");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(support::http_get(s.health, "/readyz").await.0, 200);
    let (status, body) = support::http_get(s.health, "/healthz").await;
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        health["lastUpdated"].is_string() && health["currentTime"].is_string(),
        "{body}"
    );
    assert_eq!(support::http_get(s.health, "/livez").await.0, 200);
    assert_eq!(
        support::http_get(s.health, "/metrics").await.0,
        404,
        "metrics only on the metrics address"
    );

    let (open, _) = connect_named(listen).await;
    let (_, table) = support::http_get(s.admin, "/debug/table").await;
    let table: serde_json::Value = serde_json::from_str(&table).unwrap();
    let backend = &table["services"][0]["backends"][0];
    assert_eq!(backend["address"], a.addr.to_string());
    assert_eq!(backend["active"], 1, "{table}");
    assert_eq!(backend["state"], "ready");

    let (status, metrics) = support::http_get(s.admin, "/metrics").await;
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
    let a = Backend::start("a", Mode::Echo).await;
    for (workers, listeners) in [("3", 3), ("0", 1)] {
        let listen = listen_addr();
        let _s = Sluice::start(
            &config(listen, &[(a.addr, "ready")]),
            &["--workers", workers],
        );
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
    let a = Backend::start("a", Mode::Echo).await;
    let first = listen_addr();
    let second = listen_addr();
    let yaml = format!(
        "{}  - name: second\n    listen: {second}\n    backends:\n      - address: {}\n",
        config(first, &[(a.addr, "ready")]),
        a.addr
    );
    let _s = Sluice::start(&yaml, &["--workers", "4", "--max-connections", "2"]);
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

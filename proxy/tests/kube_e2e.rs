//! End to end with Kubernetes: the fixture apiserver (real list/watch HTTP),
//! the real `sluice` binary pointed at it with a kubeconfig, real backends
//! on loopback addresses. Traffic follows every change; a terminating
//! endpoint gets no new connection while its established one flows; a watch
//! outage with a deletion during it is healed by the relist.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use sluice_apiserver_fixture::builders::{slice, svc, with_port};
use sluice_apiserver_fixture::{ApiServer, Kind};
use sluice_testkit::backend::{Backend, Mode};
use sluice_testkit::{Daemon, Options, metric};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

const WAIT: Duration = Duration::from_secs(20);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A backend on `addr` that greets each connection with its name, then
/// echoes.
async fn backend(addr: SocketAddr, name: &str) -> Backend {
    Backend::start_on(addr, name, Mode::Echo).await.unwrap()
}

/// Connects through sluice and returns the backend's name (None: refused,
/// reset or silent).
async fn hit(addr: SocketAddr) -> Option<String> {
    let (name, _) = open(addr).await?;
    Some(name)
}

async fn open(addr: SocketAddr) -> Option<(String, BufReader<TcpStream>)> {
    let s = timeout(Duration::from_secs(3), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let n = timeout(Duration::from_secs(3), r.read_line(&mut line))
        .await
        .ok()?
        .ok()?;
    (n > 0).then(|| (line.trim().to_owned(), r))
}

/// Waits until `n` consecutive connections all satisfy `f`.
async fn until_all(addr: SocketAddr, what: &str, n: usize, f: impl Fn(&Option<String>) -> bool) {
    let deadline = Instant::now() + WAIT;
    let mut streak = 0;
    let mut last = None;
    while streak < n {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} at {addr}; last answer {last:?}"
        );
        let got = hit(addr).await;
        if f(&got) {
            streak += 1;
        } else {
            streak = 0;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        last = got;
    }
}

fn common_port(addrs: &[&str]) -> u16 {
    let ips: Vec<IpAddr> = addrs.iter().map(|a| ip(a)).collect();
    sluice_testkit::common_port(&ips).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_follows_the_apiserver() {
    // Backends A, B, C on one port of three loopback addresses (a slice has
    // one port number for all its endpoints).
    let bport = common_port(&["127.0.0.2", "127.0.0.3", "127.0.0.4"]);
    let _a = backend(SocketAddr::new(ip("127.0.0.2"), bport), "A").await;
    let _b = backend(SocketAddr::new(ip("127.0.0.3"), bport), "B").await;
    let _c = backend(SocketAddr::new(ip("127.0.0.4"), bport), "C").await;
    // Two Services with loopback cluster IPs sluice can bind.
    let vport = common_port(&["127.0.0.50", "127.0.0.51"]);
    let web = SocketAddr::new(ip("127.0.0.50"), vport);
    let other = SocketAddr::new(ip("127.0.0.51"), vport);

    let api = ApiServer::start().await.unwrap();
    // Web's endpoints `(ip, ready, terminating)`, all on `bport`.
    let web_eps = |eps: &[(&str, bool, bool)]| with_port(slice("web-1", "web", eps), bport);
    api.apply_json(with_port(svc("web", "127.0.0.50"), vport))
        .unwrap();
    api.apply_json(web_eps(&[("127.0.0.2", true, false)]))
        .unwrap();
    api.apply_json(with_port(svc("other", "127.0.0.51"), vport))
        .unwrap();
    let other_eps = slice("other-1", "other", &[("127.0.0.4", true, false)]);
    api.apply_json(with_port(other_eps, bport)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let extra = ["--connect-timeout", "300ms"];
    let opts = Options {
        log_filter: Some("info,sluice_control=debug".into()),
        ..Options::kube_on_loopback(env!("CARGO_BIN_EXE_sluice"), &kubeconfig, &extra)
    };
    let daemon = Daemon::start(opts).await.unwrap();

    // 1. The first lists make the first table: both Services answer.
    until_all(web, "web served by A", 3, |g| g.as_deref() == Some("A")).await;
    until_all(other, "other served by C", 3, |g| g.as_deref() == Some("C")).await;

    // 2. Scale up: A and B both get connections.
    api.apply_json(web_eps(&[
        ("127.0.0.2", true, false),
        ("127.0.0.3", true, false),
    ]))
    .unwrap();
    let deadline = Instant::now() + WAIT;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        assert!(Instant::now() < deadline, "only saw {seen:?}");
        if let Some(n) = hit(web).await {
            seen.insert(n);
        }
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec!["A", "B"]);

    // 3. A removed: only B.
    api.apply_json(web_eps(&[("127.0.0.3", true, false)]))
        .unwrap();
    until_all(web, "only B", 10, |g| g.as_deref() == Some("B")).await;

    // 4. B terminating (still serving), C ready: new connections go to C
    //    only, while an established connection to B keeps flowing.
    let (name, mut established) = open(web).await.unwrap();
    assert_eq!(name, "B");
    api.apply_json(web_eps(&[
        ("127.0.0.3", false, true),
        ("127.0.0.4", true, false),
    ]))
    .unwrap();
    until_all(web, "C takes new connections", 1, |g| {
        g.as_deref() == Some("C")
    })
    .await;
    for _ in 0..20 {
        assert_eq!(
            hit(web).await.as_deref(),
            Some("C"),
            "terminating B got a new connection"
        );
    }
    established
        .get_mut()
        .write_all(b"still here\n")
        .await
        .unwrap();
    let mut echo = String::new();
    timeout(Duration::from_secs(3), established.read_line(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        echo, "still here\n",
        "the established connection to B flows"
    );

    // 5. Outage: the apiserver answers 503 and drops its watches; meanwhile
    //    'other' is deleted and web moves to A. No watch event can carry
    //    that: only the relist (after ERROR 410) does.
    let lists_before = api.list_count(Kind::Service);
    api.set_unavailable(true);
    api.kill_connections();
    api.delete(Kind::EndpointSlice, "default", "other-1")
        .unwrap();
    api.delete(Kind::Service, "default", "other").unwrap();
    api.apply_json(web_eps(&[("127.0.0.2", true, false)]))
        .unwrap();
    api.compact();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The last table keeps serving during the outage.
    assert_eq!(hit(web).await.as_deref(), Some("C"));
    assert_eq!(hit(other).await.as_deref(), Some("C"));
    api.set_unavailable(false);
    until_all(web, "web moved to A after the relist", 5, |g| {
        g.as_deref() == Some("A")
    })
    .await;
    // 'other' itself is gone (not merely without endpoints): its listener
    // closes, connections are refused.
    let deadline = Instant::now() + WAIT;
    loop {
        match TcpStream::connect(other).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "'other' still listening after the relist"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        api.list_count(Kind::Service) > lists_before,
        "the heal came from a relist; requests: {:#?}",
        api.requests()
            .iter()
            .map(|r| format!("{} {:?}", r.path, r.query))
            .collect::<Vec<_>>()
    );
    // The source's counters reach /metrics: the first lists and the relist
    // after the outage (3 kinds, then at least one), and the outage's watch
    // errors.
    let metrics = daemon.scrape().await.unwrap();
    let counter = |name: &str| -> f64 {
        metric(&metrics, name).unwrap_or_else(|| panic!("{name} missing from /metrics:\n{metrics}"))
    };
    assert!(counter("sluice_kube_relists_total") >= 4.0, "{metrics}");
    assert!(
        counter("sluice_kube_watch_errors_total") >= 1.0,
        "{metrics}"
    );
    assert!(
        counter("sluice_kube_table_publishes_total") >= 3.0,
        "{metrics}"
    );
    drop(daemon);
}

#[test]
fn unreadable_kubeconfig_exits_64_naming_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--kubeconfig", "/nonexistent/kubeconfig"])
        .args(["--vip-interface", "lo", "--intercept", "bind"])
        .arg("--healthz-bind-address=")
        .arg("--metrics-bind-address=")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/kubeconfig"), "{err}");
}

#[test]
fn config_and_kubeconfig_conflict() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--config", "/x.yaml", "--kubeconfig", "/y"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

/// GET / on a health-check port; the status and body, None when refused.
async fn health(port: u16) -> Option<(u16, String)> {
    sluice_testkit::http::get(([127, 0, 0, 1], port).into(), "/")
        .await
        .ok()
}

/// Polls the health-check port until `f` holds (bounded).
async fn health_until(port: u16, what: &str, f: impl Fn(&Option<(u16, String)>) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = health(port).await;
        if f(&got) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} on health port {port}; last answer {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_s_health_check_node_port_follows_the_table() {
    // The responders are fed by the daemon's reconciler from the published
    // table (not by the Kubernetes source): 200 with a local endpoint, 503
    // without, closed once the Service is gone.
    let hport = sluice_testkit::free_port([0, 0, 0, 0]).unwrap();
    let vport = common_port(&["127.0.0.60"]);
    let api = ApiServer::start().await.unwrap();
    let mut lb = with_port(svc("lb", "127.0.0.60"), vport);
    lb["spec"]["type"] = serde_json::json!("LoadBalancer");
    lb["spec"]["externalTrafficPolicy"] = serde_json::json!("Local");
    lb["spec"]["healthCheckNodePort"] = serde_json::json!(hport);
    api.apply_json(lb).unwrap();
    let on_node = |node: &str| {
        let mut s = slice("lb-1", "lb", &[("127.0.0.2", true, false)]);
        s["endpoints"][0]["nodeName"] = serde_json::json!(node);
        s
    };
    api.apply_json(on_node("node-a")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let opts = Options::kube_on_loopback(env!("CARGO_BIN_EXE_sluice"), &kubeconfig, &[]);
    let _daemon = Daemon::start(opts).await.unwrap();
    health_until(hport, "200 with one local endpoint", |g| {
        g.as_ref()
            .is_some_and(|(code, body)| *code == 200 && body.contains("\"localEndpoints\":1"))
    })
    .await;
    // The endpoint moves to another node: the table's health check says 0.
    api.apply_json(on_node("node-b")).unwrap();
    health_until(hport, "503", |g| {
        g.as_ref().is_some_and(|(code, _)| *code == 503)
    })
    .await;
    api.delete(Kind::Service, "default", "lb").unwrap();
    health_until(hport, "the port closed", |g| g.is_none()).await;
}

//! Faults that a node proxy must survive without turning them into wrong
//! routing decisions (issue 16's fault matrix; docs/reliability.md):
//! - an unready (not terminating) backend keeps its established streams
//!   past the drain timeout;
//! - descriptor exhaustion ejects no backend, the admin endpoints still
//!   answer, and service resumes once connections close;
//! - this node's Node being removed turns `/healthz` (not `/livez`) 503;
//! - a Service at its own connection limit resets new connections at once
//!   while another Service on the same sluice is still served;
//! - the idle timeout closes an idle connection and not a busy one;
//! - reaching `--max-connections` is counted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_apiserver_fixture::ApiServer;
use sluice_control::source::file::{BackendDoc, ConfigDoc, ServiceDoc};
use sluice_testkit::backend::{self, Backend, Mode};
use sluice_testkit::{Daemon, Options, free_addr, http, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

async fn start(config: ConfigDoc, prefix: &[&str], extra: &[&str]) -> Daemon {
    let opts = Options {
        prefix: prefix.iter().map(|a| a.to_string()).collect(),
        config: Some(config.to_yaml().unwrap()),
        args: ["--config-poll-interval", "100ms"]
            .iter()
            .chain(extra)
            .map(|a| a.to_string())
            .collect(),
        log_filter: Some("info".into()),
        ..Options::new(env!("CARGO_BIN_EXE_sluice"))
    };
    Daemon::start(opts).await.unwrap()
}

async fn counter(s: &Daemon, series: &str) -> f64 {
    metric(&s.scrape().await.unwrap(), series).unwrap_or(0.0)
}

/// A connection through sluice that got its backend's greeting.
async fn named(listen: SocketAddr) -> Option<(TcpStream, String)> {
    tokio::time::timeout(Duration::from_secs(1), backend::connect_named(listen))
        .await
        .ok()?
        .ok()
}

#[tokio::test]
async fn an_unready_backend_keeps_its_stream_past_the_drain_timeout() {
    let a = Backend::start("a", Mode::Echo).await.unwrap();
    let b = Backend::start("b", Mode::Echo).await.unwrap();
    let listen = free_addr().unwrap();
    let svc = |backends| ConfigDoc::from(ServiceDoc::new("web", listen, backends));
    let mut s = start(
        svc(vec![BackendDoc::ready(a.addr)]),
        &[],
        &["--drain-timeout", "300ms"],
    )
    .await;
    let (mut stream, name) = named(listen).await.unwrap();
    assert_eq!(name, "a");

    // a's readiness probe fails: not ready, not terminating.
    s.reload_and_wait(
        &svc(vec![
            BackendDoc::not_ready(a.addr),
            BackendDoc::ready(b.addr),
        ])
        .to_yaml()
        .unwrap(),
    )
    .await
    .unwrap();
    for _ in 0..5 {
        let (_, name) = named(listen).await.unwrap();
        assert_eq!(name, "b", "an unready backend got a new connection");
    }
    // Well past the drain timeout, the stream still flows both ways.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    stream.write_all(b"still here\n").await.unwrap();
    assert_eq!(backend::read_line(&mut stream).await.unwrap(), "still here");
    assert_eq!(counter(&s, "sluice_drain_cut_connections_total").await, 0.0);

    // Once a terminates, the drain timeout applies.
    s.reload_and_wait(
        &svc(vec![
            BackendDoc::terminating(a.addr),
            BackendDoc::ready(b.addr),
        ])
        .to_yaml()
        .unwrap(),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + T;
    while counter(&s, "sluice_drain_cut_connections_total").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the terminating backend was never cut"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn root() -> bool {
    use std::os::unix::fs::MetadataExt;
    let is_root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !is_root {
        eprintln!("SKIPPED: needs root to lower the hard descriptor limit of a child with prlimit");
    }
    is_root
}

#[tokio::test]
async fn descriptor_exhaustion_ejects_no_backend_and_service_resumes() {
    if !root() {
        return;
    }
    let a = Backend::start("a", Mode::Echo).await.unwrap();
    let b = Backend::start("b", Mode::Echo).await.unwrap();
    let listen = free_addr().unwrap();
    let config = ConfigDoc::from(ServiceDoc::new(
        "web",
        listen,
        vec![BackendDoc::ready(a.addr), BackendDoc::ready(b.addr)],
    ));
    // 64 descriptors in all (soft and hard, so sluice cannot raise it).
    let s = start(
        config,
        &["prlimit", "--nofile=64:64", "--"],
        &["--workers", "1"],
    )
    .await;

    // Hold proxied connections until a new one is no longer served.
    let mut held = Vec::new();
    let exhausted = loop {
        assert!(held.len() < 60, "64 descriptors never ran out");
        match named(listen).await {
            Some((stream, _)) => held.push(stream),
            None => break held.len(),
        }
    };
    assert!(exhausted > 5, "served only {exhausted} before running out");

    // The admin endpoints still answer, and no backend was blamed.
    let text = s.scrape().await.unwrap();
    assert_eq!(metric(&text, "sluice_ejections_total"), Some(0.0), "{text}");
    let local = metric(&text, "sluice_local_dial_errors_total").unwrap_or(0.0)
        + metric(&text, "sluice_accept_errors_total").unwrap_or(0.0);
    assert!(local > 0.0, "exhaustion not counted:\n{text}");
    let (status, _) = http::get(s.health, "/healthz").await.unwrap();
    assert_eq!(status, 200, "/healthz must answer (saturation is young)");

    // Connections close: service resumes, on both backends.
    drop(held);
    let deadline = Instant::now() + T;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "service did not resume: {seen:?}"
        );
        if let Some((_, name)) = named(listen).await {
            seen.insert(name);
        }
    }
    assert_eq!(counter(&s, "sluice_ejections_total").await, 0.0);
}

#[tokio::test]
async fn a_node_being_removed_fails_healthz_but_not_livez() {
    let api = ApiServer::start().await.unwrap();
    let node = |taints: Value| {
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": "node-a"},
               "spec": {"taints": taints},
               "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]}})
    };
    api.apply_json(node(json!([]))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let opts = Options::kube_on_loopback(env!("CARGO_BIN_EXE_sluice"), &kubeconfig, &[]);
    let s = Daemon::start(opts).await.unwrap();
    let healthz = |path: &'static str| {
        let addr = s.health;
        async move {
            let (status, body) = http::get(addr, path).await.unwrap();
            (
                status,
                serde_json::from_str::<Value>(&body).unwrap_or_default(),
            )
        }
    };
    let (status, body) = healthz("/healthz").await;
    assert_eq!(
        (status, &body["nodeEligible"]),
        (200, &json!(true)),
        "{body}"
    );
    // kube-proxy's metric names and the process series, for existing
    // dashboards.
    let text = s.scrape().await.unwrap();
    for series in [
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_network_programming_duration_seconds_count",
        "process_open_fds",
        "process_resident_memory_bytes",
    ] {
        assert!(metric(&text, series).is_some(), "{series} missing:\n{text}");
    }

    // The cluster autoscaler marks the node for removal.
    api.apply_json(node(json!([
        {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}
    ])))
    .unwrap();
    let deadline = Instant::now() + T;
    loop {
        let (status, body) = healthz("/healthz").await;
        if status == 503 {
            assert_eq!(body["nodeEligible"], json!(false), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz stayed {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = healthz("/livez").await;
    assert_eq!(status, 200, "/livez ignores the Node: {body}");

    // The taint goes (scale-down cancelled): eligible again.
    api.apply_json(node(json!([]))).unwrap();
    let deadline = Instant::now() + T;
    while healthz("/healthz").await.0 != 200 {
        assert!(Instant::now() < deadline, "/healthz never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A connection that sluice resets at once (before any backend greeting):
/// the reset arrives within a second, not a wait.
async fn reset_at_once(listen: SocketAddr) {
    let started = Instant::now();
    let read = async {
        // The reset may come before connect(2) reports the handshake.
        let mut stream = TcpStream::connect(listen).await?;
        let mut buf = [0u8; 64];
        stream.read(&mut buf).await
    };
    let r = tokio::time::timeout(Duration::from_secs(1), read)
        .await
        .expect("the connection waited instead of being reset");
    match r {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("read {n} bytes instead of a reset"),
    }
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn a_service_at_its_limit_resets_while_another_is_served() {
    let a = Backend::start("a", Mode::Echo).await.unwrap();
    let b = Backend::start("b", Mode::Echo).await.unwrap();
    let (limited, other) = (free_addr().unwrap(), free_addr().unwrap());
    let config = ConfigDoc::new(vec![
        ServiceDoc::new("limited", limited, vec![BackendDoc::ready(a.addr)])
            .with_max_connections(2),
        // No field: the node default applies.
        ServiceDoc::new("other", other, vec![BackendDoc::ready(b.addr)]),
    ]);
    let s = start(
        config,
        &[],
        &["--workers", "2", "--service-max-connections", "4"],
    )
    .await;
    let rejected =
        |name: &str| format!("sluice_service_limit_rejected_total{{service=\"{name}\"}}");

    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(named(limited).await.unwrap().0);
    }
    reset_at_once(limited).await;
    reset_at_once(limited).await;
    // The other Service is served meanwhile, up to its own (default) limit.
    let mut others = Vec::new();
    for _ in 0..4 {
        let (stream, name) = named(other).await.unwrap();
        assert_eq!(name, "b");
        others.push(stream);
    }
    reset_at_once(other).await;
    let text = s.scrape().await.unwrap();
    assert_eq!(metric(&text, &rejected("limited")), Some(2.0), "{text}");
    assert_eq!(metric(&text, &rejected("other")), Some(1.0), "{text}");
    // Rejected connections are not counted as served ones.
    assert_eq!(
        metric(
            &text,
            r#"sluice_connections_accepted_total{service="limited"}"#
        ),
        Some(2.0),
        "{text}"
    );

    // A held connection ends: the limited Service serves again.
    drop(held.pop());
    let deadline = Instant::now() + T;
    loop {
        if let Some((_, name)) = named(limited).await {
            assert_eq!(name, "a");
            break;
        }
        assert!(Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The held streams still work.
    let stream = &mut held[0];
    stream.write_all(b"ping\n").await.unwrap();
    assert_eq!(backend::read_line(stream).await.unwrap(), "ping");
}

#[tokio::test]
async fn the_idle_timeout_closes_an_idle_connection_and_not_a_busy_one() {
    let a = Backend::start("a", Mode::Echo).await.unwrap();
    let listen = free_addr().unwrap();
    let config = ConfigDoc::from(
        ServiceDoc::new("web", listen, vec![BackendDoc::ready(a.addr)]).with_idle_timeout("1s"),
    );
    let s = start(config, &[], &[]).await;
    let (mut idle, _) = named(listen).await.unwrap();
    let (mut busy, _) = named(listen).await.unwrap();
    let started = Instant::now();
    // The busy one exchanges a line every 300 ms for 2.5 s.
    while started.elapsed() < Duration::from_millis(2500) {
        busy.write_all(b"tick\n").await.unwrap();
        assert_eq!(backend::read_line(&mut busy).await.unwrap(), "tick");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The idle one was reset meanwhile (at 1 s to 1.125 s).
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(T, idle.read(&mut buf)).await.unwrap();
    assert_eq!(
        r.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionReset,
        "the idle connection was not reset"
    );
    let idle_closed = r#"sluice_connections_closed_total{service="web",reason="idle_timeout"}"#;
    assert_eq!(counter(&s, idle_closed).await, 1.0);
    busy.write_all(b"still\n").await.unwrap();
    assert_eq!(backend::read_line(&mut busy).await.unwrap(), "still");
}

#[tokio::test]
async fn reaching_the_global_limit_is_counted() {
    let a = Backend::start("a", Mode::Echo).await.unwrap();
    let listen = free_addr().unwrap();
    let config = ConfigDoc::from(ServiceDoc::new(
        "web",
        listen,
        vec![BackendDoc::ready(a.addr)],
    ));
    let s = start(config, &[], &["--workers", "1", "--max-connections", "1"]).await;
    let waits = "sluice_connection_limit_waits_total";
    assert_eq!(counter(&s, waits).await, 0.0);
    let (held, _) = named(listen).await.unwrap();
    // The second waits (not reset) until the first ends.
    let mut second = TcpStream::connect(listen).await.unwrap();
    let deadline = Instant::now() + T;
    while counter(&s, waits).await < 1.0 {
        assert!(Instant::now() < deadline, "the wait was not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(held);
    assert_eq!(backend::read_line(&mut second).await.unwrap(), "a");
    assert_eq!(counter(&s, waits).await, 1.0);
}

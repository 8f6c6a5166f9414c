//! Faults that a node proxy must survive without turning them into wrong
//! routing decisions (issue 16's fault matrix; docs/reliability.md):
//! - an unready (not terminating) backend keeps its established streams
//!   past the drain timeout;
//! - descriptor exhaustion ejects no backend, the admin endpoints still
//!   answer, and service resumes once connections close;
//! - this node's Node being removed turns `/healthz` (not `/livez`) 503.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_apiserver_fixture::ApiServer;
use sluice_control::source::file::{BackendDoc, ConfigDoc, ServiceDoc};
use sluice_testkit::backend::{self, Backend, Mode};
use sluice_testkit::{Daemon, Options, free_addr, http, metric};
use tokio::io::AsyncWriteExt;
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
    let opts = Options {
        args: [
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--node-name",
            "node-a",
            "--vip-interface",
            "lo",
            "--intercept",
            "bind",
        ]
        .map(String::from)
        .to_vec(),
        log_filter: Some("info".into()),
        ..Options::new(env!("CARGO_BIN_EXE_sluice"))
    };
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

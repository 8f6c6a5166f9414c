//! The Kubernetes source against the fixture apiserver: kube's real watcher,
//! real HTTP, the real list/watch protocol.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use sluice_apiserver_fixture::builders::{slice, svc};
use sluice_apiserver_fixture::{ApiServer, Kind};
use sluice_control::source::kube::{KubeOptions, KubeStats, run};
use sluice_control::{ListenKey, Publisher, Table};

const WAIT: Duration = Duration::from_secs(15);

fn key(s: &str) -> ListenKey {
    ListenKey::tcp(s.parse().unwrap())
}

fn backends(t: &Table, k: &str) -> Option<Vec<String>> {
    t.get(&key(k)).map(|s| {
        let mut v: Vec<String> = s.eligible_iter().map(|b| b.addr.to_string()).collect();
        v.sort();
        v
    })
}

struct Harness {
    api: ApiServer,
    publisher: Arc<Publisher>,
    stats: Arc<KubeStats>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(api: ApiServer, node: Option<&str>, coalesce: Duration) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    api.write_kubeconfig(&path).unwrap();
    let publisher = Arc::new(Publisher::new());
    let stats = Arc::new(KubeStats::default());
    let opts = KubeOptions {
        kubeconfig: Some(path),
        node_name: node.map(str::to_owned),
        node_addresses: vec![],
        coalesce,
        stats: stats.clone(),
        ..KubeOptions::default()
    };
    let p = publisher.clone();
    let task = tokio::spawn(async move {
        run(opts, p).await.unwrap();
    });
    Harness {
        api,
        publisher,
        stats,
        task,
        _dir: dir,
    }
}

impl Harness {
    /// Waits (bounded) until the live table satisfies `f`.
    async fn wait_for(&self, what: &str, f: impl Fn(&Table) -> bool) -> Arc<Table> {
        let mut rx = self.publisher.subscribe();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let snap = self.publisher.snapshot();
            if snap.generation > 0 && f(&snap.table) {
                return snap.table.clone();
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                panic!(
                    "timed out waiting for: {what}; live table (generation {}): {:?}",
                    snap.generation,
                    snap.table.keys().collect::<Vec<_>>()
                );
            }
        }
    }

    fn publishes(&self) -> u64 {
        self.stats.publishes.load(Ordering::Relaxed)
    }
}

async fn fixture_with_web() -> ApiServer {
    let api = ApiServer::start().await.unwrap();
    api.apply_json(svc("web", "10.96.0.10")).unwrap();
    api.apply_json(slice("web-1", "web", &[("10.0.0.1", true, false)]))
        .unwrap();
    api
}

#[tokio::test]
async fn lists_then_follows_every_watch_event() {
    let h = start(fixture_with_web().await, None, Duration::from_millis(20)).await;
    h.wait_for("web listed", |t| {
        backends(t, "10.96.0.10:80") == Some(vec!["10.0.0.1:8080".into()])
    })
    .await;
    assert_eq!(
        h.publisher.snapshot().generation,
        1,
        "first table is generation 1"
    );
    assert_eq!(h.api.list_count(Kind::Service), 1);
    assert_eq!(h.api.list_count(Kind::EndpointSlice), 1);
    assert_eq!(
        h.api.list_count(Kind::Node),
        0,
        "no node name: no Node watch"
    );

    // MODIFIED: a new pod, the old one terminating.
    h.api
        .apply_json(slice(
            "web-1",
            "web",
            &[("10.0.0.1", false, true), ("10.0.0.2", true, false)],
        ))
        .unwrap();
    h.wait_for("rolled", |t| {
        backends(t, "10.96.0.10:80") == Some(vec!["10.0.0.2:8080".into()])
    })
    .await;
    // ADDED: a second Service.
    h.api.apply_json(svc("api", "10.96.0.11")).unwrap();
    h.api
        .apply_json(slice("api-1", "api", &[("10.0.1.1", true, false)]))
        .unwrap();
    h.wait_for("api added", |t| {
        backends(t, "10.96.0.11:80").is_some_and(|b| b.len() == 1)
    })
    .await;
    // DELETED.
    h.api.delete(Kind::Service, "default", "web").unwrap();
    h.wait_for("web deleted", |t| t.get(&key("10.96.0.10:80")).is_none())
        .await;
    assert_eq!(h.api.list_count(Kind::Service), 1, "no relist was needed");
}

#[tokio::test]
async fn not_ready_until_every_kind_is_listed() {
    let api = fixture_with_web().await;
    api.set_unavailable(true);
    let h = start(api, Some("node-a"), Duration::from_millis(20)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        h.publisher.snapshot().generation,
        0,
        "nothing published while unavailable"
    );
    assert!(
        h.api.list_count(Kind::Service) >= 1,
        "the source did try (and got 503)"
    );
    h.api.set_unavailable(false);
    h.wait_for("ready", |t| t.get(&key("10.96.0.10:80")).is_some())
        .await;
    // The Node was listed too, by name.
    let node_lists: Vec<_> = h
        .api
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/v1/nodes")
        .collect();
    assert!(!node_lists.is_empty());
    assert_eq!(
        node_lists[0].query.get("fieldSelector").map(String::as_str),
        Some("metadata.name=node-a")
    );
}

#[tokio::test]
async fn dropped_watch_resumes_from_its_resource_version() {
    let h = start(fixture_with_web().await, None, Duration::from_millis(20)).await;
    h.wait_for("ready", |t| t.get(&key("10.96.0.10:80")).is_some())
        .await;
    for round in 0..2 {
        if round == 0 {
            h.api.drop_watches();
        } else {
            h.api.kill_connections();
        }
        let ip = format!("10.0.0.{}", 10 + round);
        h.api
            .apply_json(slice("web-1", "web", &[(ip.as_str(), true, false)]))
            .unwrap();
        let want = vec![format!("{ip}:8080")];
        h.wait_for("change after drop", |t| {
            backends(t, "10.96.0.10:80").as_ref() == Some(&want)
        })
        .await;
    }
    assert_eq!(
        h.api.list_count(Kind::EndpointSlice),
        1,
        "resumed from the last resourceVersion, no relist"
    );
}

#[tokio::test]
async fn deletion_during_outage_is_healed_by_the_relist() {
    let api = fixture_with_web().await;
    api.apply_json(svc("gone", "10.96.0.20")).unwrap();
    api.apply_json(slice("gone-1", "gone", &[("10.0.2.1", true, false)]))
        .unwrap();
    let h = start(api, None, Duration::from_millis(20)).await;
    let before = h
        .wait_for("both", |t| t.get(&key("10.96.0.20:80")).is_some())
        .await;
    let gen_before = h.publisher.snapshot().generation;

    h.api.set_unavailable(true);
    h.api
        .delete(Kind::EndpointSlice, "default", "gone-1")
        .unwrap();
    h.api.delete(Kind::Service, "default", "gone").unwrap();
    h.api
        .apply_json(slice("web-1", "web", &[("10.0.0.7", true, false)]))
        .unwrap();
    h.api.compact();
    tokio::time::sleep(Duration::from_millis(800)).await;
    // During the outage the last table keeps serving.
    assert_eq!(h.publisher.snapshot().generation, gen_before);
    assert!(Arc::ptr_eq(&h.publisher.load(), &before));

    h.api.set_unavailable(false);
    h.wait_for("relist removed 'gone' and saw the change", |t| {
        t.get(&key("10.96.0.20:80")).is_none()
            && backends(t, "10.96.0.10:80") == Some(vec!["10.0.0.7:8080".into()])
    })
    .await;
    assert!(h.api.list_count(Kind::Service) >= 2, "a relist happened");
}

#[tokio::test]
async fn expired_resource_version_error_410_triggers_relist() {
    let h = start(fixture_with_web().await, None, Duration::from_millis(20)).await;
    h.wait_for("ready", |t| t.get(&key("10.96.0.10:80")).is_some())
        .await;
    // The watch resumes from an rv the server no longer has.
    h.api.kill_connections();
    h.api.delete(Kind::Service, "default", "web").unwrap();
    h.api.compact();
    h.wait_for("relisted", |t| t.get(&key("10.96.0.10:80")).is_none())
        .await;
    assert!(h.api.list_count(Kind::Service) >= 2);
    assert!(h.stats.relists.load(Ordering::Relaxed) >= 3);
}

#[tokio::test]
async fn bookmark_moves_the_resume_point() {
    let h = start(fixture_with_web().await, None, Duration::from_millis(20)).await;
    h.wait_for("ready", |t| t.get(&key("10.96.0.10:80")).is_some())
        .await;
    // Unrelated churn moves the server's rv on; a bookmark tells the client.
    for i in 0..3 {
        h.api
            .apply_json(svc(&format!("other{i}"), &format!("10.96.1.{i}")))
            .unwrap();
    }
    h.wait_for("others", |t| t.get(&key("10.96.1.2:80")).is_some())
        .await;
    let rv = h.api.resource_version();
    h.api.bookmark();
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.api.drop_watches();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let resumed = h.api.requests().into_iter().any(|r| {
            r.is_watch()
                && r.path == "/apis/discovery.k8s.io/v1/endpointslices"
                && r.query.get("resourceVersion") == Some(&rv.to_string())
        });
        if resumed {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slice watch never resumed at bookmark rv {rv}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn malformed_object_is_skipped_and_the_rest_updates() {
    let h = start(fixture_with_web().await, None, Duration::from_millis(20)).await;
    h.wait_for("ready", |t| t.get(&key("10.96.0.10:80")).is_some())
        .await;
    // Malformed as a whole (a bad field alone is skipped: kube_parity.rs).
    let mut bad = svc("web", "10.96.0.10");
    bad["spec"]["sessionAffinity"] = json!("ClientIP");
    bad["spec"]["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 0}});
    h.api.apply_json(bad).unwrap();
    h.api.apply_json(svc("api", "10.96.0.11")).unwrap();
    h.wait_for("api added", |t| t.get(&key("10.96.0.11:80")).is_some())
        .await;
    let t = h.publisher.load();
    assert!(t.get(&key("10.96.0.10:80")).unwrap().affinity.is_none());
    assert_eq!(
        backends(&t, "10.96.0.10:80"),
        Some(vec!["10.0.0.1:8080".into()]),
        "last good version of web kept"
    );
    assert!(h.stats.malformed.load(Ordering::Relaxed) >= 1);
}

#[tokio::test]
async fn bursts_are_coalesced() {
    let h = start(fixture_with_web().await, None, Duration::from_millis(300)).await;
    h.wait_for("ready", |t| t.get(&key("10.96.0.10:80")).is_some())
        .await;
    let before = h.publishes();
    for i in 1..=30 {
        let ip = format!("10.0.3.{i}");
        h.api
            .apply_json(slice("web-1", "web", &[(ip.as_str(), true, false)]))
            .unwrap();
    }
    h.wait_for("last of the burst", |t| {
        backends(t, "10.96.0.10:80") == Some(vec!["10.0.3.30:8080".into()])
    })
    .await;
    let n = h.publishes() - before;
    assert!((1..=4).contains(&n), "30 changes made {n} publishes");
}

#[tokio::test]
async fn node_object_gives_node_port_addresses() {
    let api = fixture_with_web().await;
    api.apply_json(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z1"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.2"}]},
    }))
    .unwrap();
    api.apply_json(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-b"},
        "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.3"}]},
    }))
    .unwrap();
    let mut np = svc("np", "10.96.0.30");
    np["spec"]["type"] = json!("NodePort");
    np["spec"]["ports"][0]["nodePort"] = json!(30080);
    api.apply_json(np).unwrap();
    let h = start(api, Some("node-a"), Duration::from_millis(20)).await;
    let t = h
        .wait_for("node port", |t| t.get(&key("127.0.0.2:30080")).is_some())
        .await;
    assert!(
        t.get(&key("127.0.0.3:30080")).is_none(),
        "other node ignored"
    );
    // The Node's address changes: the node port moves.
    h.api
        .apply_json(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.4"}]},
        }))
        .unwrap();
    h.wait_for("moved", |t| {
        t.get(&key("127.0.0.4:30080")).is_some() && t.get(&key("127.0.0.2:30080")).is_none()
    })
    .await;
}

#[tokio::test]
async fn programming_latency_is_measured_from_the_trigger_time() {
    let h = start(fixture_with_web().await, None, Duration::from_millis(20)).await;
    h.wait_for("ready", |t| t.get(&key("10.96.0.10:80")).is_some())
        .await;
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 2;
    let stamp = k8s_openapi::jiff::Timestamp::from_second(i64::try_from(secs).unwrap())
        .unwrap()
        .to_string();
    let mut s = slice("web-1", "web", &[("10.0.0.5", true, false)]);
    s["metadata"]["annotations"] =
        json!({"endpoints.kubernetes.io/last-change-trigger-time": stamp});
    h.api.apply_json(s).unwrap();
    h.wait_for("changed", |t| {
        backends(t, "10.96.0.10:80") == Some(vec!["10.0.0.5:8080".into()])
    })
    .await;
    let us = h.stats.last_programming_latency_us.load(Ordering::Relaxed);
    assert!((1_000_000..10_000_000).contains(&us), "latency {us} µs");
    // The histogram exported on /metrics saw that change, in seconds.
    let mut reg = prometheus_client::registry::Registry::default();
    reg.register("npl", "", h.stats.programming_latency.clone());
    reg.register("build", "", h.stats.build_duration.clone());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    let count = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_count ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(count("npl"), 1, "{text}");
    assert!(count("build") >= 2, "{text}");
    let sum: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("npl_sum "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!((1.0..10.0).contains(&sum), "{text}");
}

#[tokio::test]
async fn unreadable_kubeconfig_is_a_clear_error() {
    let opts = KubeOptions {
        kubeconfig: Some("/nonexistent/kubeconfig".into()),
        ..KubeOptions::default()
    };
    let err = run(opts, Arc::new(Publisher::new())).await.unwrap_err();
    assert!(err.to_string().contains("/nonexistent/kubeconfig"), "{err}");
}

/// GET / on 127.0.0.1:port; the status code, or None when refused.
async fn http_status(port: u16) -> Option<(u16, String)> {
    sluice_testkit::http::get(([127, 0, 0, 1], port).into(), "/")
        .await
        .ok()
}

#[tokio::test]
async fn health_check_node_port_answers_with_local_endpoints() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let api = ApiServer::start().await.unwrap();
    let mut lb = svc("lb", "10.96.0.40");
    lb["spec"]["type"] = json!("LoadBalancer");
    lb["spec"]["externalTrafficPolicy"] = json!("Local");
    lb["spec"]["healthCheckNodePort"] = json!(port);
    api.apply_json(lb).unwrap();
    let mut s = slice(
        "lb-1",
        "lb",
        &[("10.0.0.1", true, false), ("10.0.0.2", true, false)],
    );
    s["endpoints"][0]["nodeName"] = json!("node-a");
    s["endpoints"][1]["nodeName"] = json!("node-b");
    api.apply_json(s.clone()).unwrap();
    let h = start(api, Some("node-a"), Duration::from_millis(20)).await;
    // The responders follow the published tables (in the daemon, its
    // reconciler does this).
    let publisher = h.publisher.clone();
    let mut changes = publisher.subscribe();
    let follower = tokio::spawn(async move {
        let mut responders = sluice_control::source::healthcheck::HealthResponders::new(
            [127, 0, 0, 1].into(),
            Arc::new(|| true),
        );
        loop {
            responders.follow(&publisher.load()).await;
            if changes.changed().await.is_err() {
                return;
            }
        }
    });
    h.wait_for("ready", |t| t.get(&key("10.96.0.40:80")).is_some())
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let ok = loop {
        if let Some(r) = http_status(port).await {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "responder never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ok.0, 200, "{ok:?}");
    assert!(ok.1.contains("\"localEndpoints\":1"), "{ok:?}");
    assert!(ok.1.contains("\"name\":\"lb\""), "{ok:?}");
    // The local endpoint moves away: 503.
    s["endpoints"][0]["nodeName"] = json!("node-c");
    h.api.apply_json(s).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if http_status(port).await.map(|r| r.0) == Some(503) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never turned 503");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The Service goes: the port closes.
    h.api.delete(Kind::Service, "default", "lb").unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while http_status(port).await.is_some() {
        assert!(tokio::time::Instant::now() < deadline, "port never closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    follower.abort();
}

#[tokio::test]
async fn undecodable_objects_are_skipped_in_lists_and_watches() {
    let api = fixture_with_web().await;
    // JSON that no Service decodes from: a port that is not a number.
    let mut broken = svc("broken", "10.96.0.66");
    broken["spec"]["ports"][0]["port"] = json!("eighty");
    api.apply_json(broken).unwrap();
    let h = start(api, None, Duration::from_millis(20)).await;
    // The list with the broken object still makes a table.
    h.wait_for("ready despite the broken Service", |t| {
        backends(t, "10.96.0.10:80") == Some(vec!["10.0.0.1:8080".into()])
    })
    .await;
    assert_eq!(h.publisher.load().len(), 1);
    assert!(h.stats.malformed.load(Ordering::Relaxed) >= 1);

    // A watch event that does not decode: skipped, web-1's last good
    // version kept, later events still flow.
    let mut bad = slice("web-1", "web", &[("10.0.0.2", true, false)]);
    bad["endpoints"] = json!("not a list");
    h.api.apply_json(bad).unwrap();
    h.api.apply_json(svc("api", "10.96.0.11")).unwrap();
    h.wait_for("api added", |t| t.get(&key("10.96.0.11:80")).is_some())
        .await;
    assert_eq!(
        backends(&h.publisher.load(), "10.96.0.10:80"),
        Some(vec!["10.0.0.1:8080".into()])
    );
    let malformed = h.stats.malformed.load(Ordering::Relaxed);
    assert!(malformed >= 2, "{malformed}");

    // A relist that still carries the undecodable slice keeps its last
    // good version rather than deleting it.
    h.api.kill_connections();
    h.api.compact();
    h.api.apply_json(svc("api2", "10.96.0.12")).unwrap();
    h.api
        .apply_json(slice("api2-1", "api2", &[("10.0.9.9", true, false)]))
        .unwrap();
    // The slice watcher's resourceVersion expired: it relists, and the new
    // slice arrives in or after that relist.
    h.wait_for("relisted", |t| {
        backends(t, "10.96.0.12:80") == Some(vec!["10.0.9.9:8080".into()])
    })
    .await;
    assert!(
        h.api.list_count(Kind::EndpointSlice) >= 2,
        "slices relisted"
    );
    assert_eq!(
        backends(&h.publisher.load(), "10.96.0.10:80"),
        Some(vec!["10.0.0.1:8080".into()])
    );
}

#[tokio::test]
async fn input_that_changes_nothing_does_not_stay_pending() {
    let h = start(
        fixture_with_web().await,
        Some("node-a"),
        Duration::from_millis(20),
    )
    .await;
    h.wait_for("ready", |t| t.get(&key("10.96.0.10:80")).is_some())
        .await;
    let generation = h.publisher.snapshot().generation;
    // Same content, new resourceVersion: a MODIFIED event that changes
    // nothing; and a Node of another name the index ignores.
    h.api
        .apply_json(slice("web-1", "web", &[("10.0.0.1", true, false)]))
        .unwrap();
    h.api
        .apply_json(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}))
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    // Wait for the events to be seen (pending set), then cleared.
    while h.stats.builds.load(Ordering::Relaxed) < 2 && h.publisher.pending_since().is_some() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.publisher.pending_since(),
        None,
        "pending mark left behind"
    );
    assert_eq!(
        h.publisher.snapshot().generation,
        generation,
        "nothing published"
    );
}

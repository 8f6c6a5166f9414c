//! kube-proxy parity (issue 15) through the whole Kubernetes source: kube's
//! real watcher against the fixture apiserver, checked on the published
//! table. One test per difference that was fixed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};
use sluice_apiserver_fixture::{ApiServer, Kind};
use sluice_control::source::kube::{KubeOptions, KubeStats, run};
use sluice_control::{ListenKey, Publisher, Table};

/// A ClusterIP Service `default/<name>` with one TCP port `http` 80.
fn service(name: &str, cluster_ips: &[&str]) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": name},
        "spec": {
            "clusterIP": cluster_ips.first(), "clusterIPs": cluster_ips,
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        },
    })
}

/// An endpoint at `ip` with the given conditions.
fn endpoint(ip: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
    })
}

/// An IPv4 slice `default/<name>` of Service `svc`, port `http` 8080.
fn endpoint_slice(name: &str, svc: &str, endpoints: Vec<Value>) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "namespace": "default", "name": name,
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// The source running against `api` as node `node-a`.
struct Running {
    api: ApiServer,
    publisher: Arc<Publisher>,
    stats: Arc<KubeStats>,
    task: tokio::task::JoinHandle<()>,
    _kubeconfig: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Running {
    /// A fixture apiserver holding `objects`, and the source watching it.
    async fn start(objects: Vec<Value>) -> Self {
        let api = ApiServer::start().await.unwrap();
        for obj in objects {
            api.apply_json(obj).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("config");
        api.write_kubeconfig(&kubeconfig).unwrap();
        let (publisher, stats) = (Arc::new(Publisher::new()), Arc::new(KubeStats::default()));
        let opts = KubeOptions {
            kubeconfig: Some(kubeconfig),
            node_name: Some("node-a".into()),
            coalesce: Duration::from_millis(10),
            stats: stats.clone(),
            ..KubeOptions::default()
        };
        let p = publisher.clone();
        let task = tokio::spawn(async move { run(opts, p).await.unwrap() });
        Self {
            api,
            publisher,
            stats,
            task,
            _kubeconfig: dir,
        }
    }

    /// Polls the published table until `ok` holds (at most 15 s).
    async fn until(&self, what: &str, ok: impl Fn(&Table) -> bool) -> Arc<Table> {
        for _ in 0..750 {
            let now = self.publisher.snapshot();
            if now.generation > 0 && ok(&now.table) {
                return now.table.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let keys: Vec<_> = self.publisher.load().keys().copied().collect();
        panic!("never happened: {what}; table keys: {keys:?}");
    }

    /// Waits until the backends eligible at `addr` are `want` (sorted).
    async fn until_eligible(&self, what: &str, addr: &str, want: &[&str]) -> Arc<Table> {
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        self.until(what, |t| eligible(t, addr).as_ref() == Some(&want))
            .await
    }
}

/// The eligible backends at `addr`, sorted; `None` without an entry.
fn eligible(t: &Table, addr: &str) -> Option<Vec<String>> {
    let svc = t.get(&ListenKey::tcp(addr.parse().unwrap()))?;
    let mut v: Vec<String> = svc.eligible_iter().map(|b| b.addr.to_string()).collect();
    v.sort();
    Some(v)
}

#[tokio::test]
async fn reused_ip_of_a_terminating_pod_takes_new_connections() {
    let old_pod = endpoint("10.0.0.9", false, true, true);
    let eps = vec![endpoint("10.0.0.1", true, true, false), old_pod];
    let web = vec![
        service("web", &["10.96.0.10"]),
        endpoint_slice("web-a", "web", eps),
    ];
    let run = Running::start(web).await;
    run.until_eligible("old pod draining", "10.96.0.10:80", &["10.0.0.1:8080"])
        .await;
    // A new pod gets 10.0.0.9 and lands in a slice sorting after web-a.
    run.api
        .apply_json(endpoint_slice(
            "web-b",
            "web",
            vec![endpoint("10.0.0.9", true, true, false)],
        ))
        .unwrap();
    let both = ["10.0.0.1:8080", "10.0.0.9:8080"];
    run.until_eligible("the new pod on the reused IP", "10.96.0.10:80", &both)
        .await;
}

#[tokio::test]
async fn one_bad_field_is_skipped_and_the_rest_of_the_object_served() {
    let mut web = service("web", &["10.96.0.10"]);
    web["spec"]["externalIPs"] = json!(["not-an-ip", "127.0.0.20"]);
    let ready = ["10.0.0.1", "10.0.0.999", "010.000.000.002"];
    let eps = ready.map(|ip| endpoint(ip, true, true, false)).to_vec();
    let run = Running::start(vec![web, endpoint_slice("web-a", "web", eps)]).await;
    let both = ["10.0.0.1:8080", "10.0.0.2:8080"];
    let t = run
        .until_eligible("web served with its good fields", "10.96.0.10:80", &both)
        .await;
    assert_eq!(eligible(&t, "127.0.0.20:80").unwrap(), both);
    assert_eq!(t.len(), 2);
    assert_eq!(run.stats.skipped_fields.load(Ordering::Relaxed), 2);
    assert_eq!(run.stats.malformed.load(Ordering::Relaxed), 0);
}

/// This node, `node-a`, in zone `z1` at 127.0.0.2.
fn this_node() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z1"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.2"}]},
    })
}

/// `endpoint(ip)` ready, with `hints` (e.g. `{"forZones": [{"name": "z1"}]}`).
fn hinted(ip: &str, hints: Value) -> Value {
    let mut ep = endpoint(ip, true, true, false);
    ep["hints"] = hints;
    ep
}

#[tokio::test]
async fn node_ports_stay_when_the_node_is_deleted_or_missing_from_a_relist() {
    let mut np = service("np", &["10.96.0.30"]);
    np["spec"]["type"] = json!("NodePort");
    np["spec"]["ports"][0]["nodePort"] = json!(30080);
    // Zone hints show when the Node is gone: without its zone they are unused.
    let eps = vec![
        hinted("10.0.0.1", json!({"forZones": [{"name": "z1"}]})),
        hinted("10.0.0.2", json!({"forZones": [{"name": "z2"}]})),
    ];
    let run = Running::start(vec![this_node(), np, endpoint_slice("np-a", "np", eps)]).await;
    let hints_used = |t: &Table| eligible(t, "127.0.0.2:30080").is_some_and(|e| e.len() == 1);
    let hints_unused = |t: &Table| eligible(t, "10.96.0.30:80").is_some_and(|e| e.len() == 2);
    run.until("node port on the Node's address", hints_used)
        .await;
    // Deleted, watch live.
    run.api.delete(Kind::Node, "", "node-a").unwrap();
    let t = run.until("Node deletion seen", hints_unused).await;
    assert!(
        eligible(&t, "127.0.0.2:30080").is_some(),
        "node port kept on the last known address"
    );
    // Back, then deleted while the watch is down: the relist misses it.
    run.api.apply_json(this_node()).unwrap();
    run.until("Node back", hints_used).await;
    run.api.kill_connections();
    run.api.delete(Kind::Node, "", "node-a").unwrap();
    run.api.compact();
    let t = run.until("relist without the Node", hints_unused).await;
    assert!(eligible(&t, "127.0.0.2:30080").is_some());
    assert!(run.api.list_count(Kind::Node) >= 2, "a relist happened");
}

#[tokio::test]
async fn prefer_same_node_uses_the_endpoints_hinted_for_this_node() {
    let mut web = service("web", &["10.96.0.10"]);
    web["spec"]["trafficDistribution"] = json!("PreferSameNode");
    let for_node = |node: &str| json!({"forNodes": [{"name": node}], "forZones": [{"name": "z1"}]});
    let eps = vec![
        hinted("10.0.0.1", for_node("node-a")),
        hinted("10.0.0.2", for_node("node-b")),
    ];
    let run = Running::start(vec![web, endpoint_slice("web-a", "web", eps)]).await;
    run.until_eligible(
        "only this node's endpoint",
        "10.96.0.10:80",
        &["10.0.0.1:8080"],
    )
    .await;
    // This node's endpoint goes: no endpoint is hinted for it, so hints
    // are unused and the rest of the cluster serves.
    run.api
        .apply_json(endpoint_slice(
            "web-a",
            "web",
            vec![
                hinted("10.0.0.2", for_node("node-b")),
                hinted("10.0.0.3", for_node("node-c")),
            ],
        ))
        .unwrap();
    let rest = ["10.0.0.2:8080", "10.0.0.3:8080"];
    run.until_eligible("fallback to every endpoint", "10.96.0.10:80", &rest)
        .await;
}

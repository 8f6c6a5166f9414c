//! kube-proxy parity through the apiserver fixture and real connections
//! (issue 15): the real `sluice` binary, kube's watcher, named echo
//! backends on loopback addresses.
//! - an address in two slices: the ready copy wins over a terminating one;
//! - one bad field (an external IP, an endpoint without address) is
//!   skipped and the rest of the object served;
//! - node ports stay when this node's Node is deleted;
//! - `hints.forNodes` (PreferSameNode) keeps traffic on this node.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::{Value, json};
use sluice_apiserver_fixture::builders::{slice, svc, with_port};
use sluice_apiserver_fixture::{ApiServer, Kind};
use sluice_testkit::backend::{self, Backend, Mode};
use sluice_testkit::{Daemon, Options};
use tokio::time::{Instant, timeout};

const WAIT: Duration = Duration::from_secs(20);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn common_port(addrs: &[&str]) -> u16 {
    let ips: Vec<IpAddr> = addrs.iter().map(|a| ip(a)).collect();
    sluice_testkit::common_port(&ips).unwrap()
}

async fn hit(addr: SocketAddr) -> Option<String> {
    let (_, name) = timeout(Duration::from_secs(2), backend::connect_named(addr))
        .await
        .ok()?
        .ok()?;
    Some(name)
}

/// Backend names seen at `addr` once `want` have all answered (bounded).
async fn until_seen(addr: SocketAddr, want: &[&str]) -> BTreeSet<String> {
    let deadline = Instant::now() + WAIT;
    let mut seen = BTreeSet::new();
    while !want.iter().all(|w| seen.contains(*w)) {
        assert!(
            Instant::now() < deadline,
            "{addr}: saw {seen:?}, want {want:?}"
        );
        match hit(addr).await {
            Some(name) => {
                seen.insert(name);
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    seen
}

fn endpoint(addr: &str, ready: bool, term: bool, node_hint: Option<&str>) -> Value {
    let mut ep = json!({"addresses": [addr],
                        "conditions": {"ready": ready, "serving": true, "terminating": term}});
    if let Some(n) = node_hint {
        ep["hints"] = json!({"forNodes": [{"name": n}]});
    }
    ep
}

fn slice_of(name: &str, service: &str, port: u16, endpoints: Vec<Value>) -> Value {
    let mut s = with_port(slice(name, service, &[]), port);
    s["endpoints"] = json!(endpoints);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_rules_hold_on_real_connections() {
    let (a, b, c) = ("127.0.1.2", "127.0.1.3", "127.0.1.4");
    let bport = common_port(&[a, b, c]);
    let _a = Backend::start_on(SocketAddr::new(ip(a), bport), "A", Mode::Echo)
        .await
        .unwrap();
    let _b = Backend::start_on(SocketAddr::new(ip(b), bport), "B", Mode::Echo)
        .await
        .unwrap();
    let _c = Backend::start_on(SocketAddr::new(ip(c), bport), "C", Mode::Echo)
        .await
        .unwrap();
    let (dup_ip, bad_ip, bad_ext, np_ip, near_ip, node_ip) = (
        "127.0.1.50",
        "127.0.1.51",
        "127.0.1.52",
        "127.0.1.53",
        "127.0.1.54",
        "127.0.1.60",
    );
    let vport = common_port(&[dup_ip, bad_ip, bad_ext, np_ip, near_ip]);
    let node_port = common_port(&[node_ip]);
    let at = |s: &str, port| SocketAddr::new(ip(s), port);

    let api = ApiServer::start().await.unwrap();
    // 1. A new pod reuses the IP of a terminating one: slice "a-old" (sorts
    //    first) still lists it terminating, "b-new" lists it ready.
    api.apply_json(with_port(svc("dup", dup_ip), vport))
        .unwrap();
    api.apply_json(slice_of(
        "a-old",
        "dup",
        bport,
        vec![endpoint(a, false, true, None)],
    ))
    .unwrap();
    let ready_ab = vec![
        endpoint(a, true, false, None),
        endpoint(b, true, false, None),
    ];
    api.apply_json(slice_of("b-new", "dup", bport, ready_ab))
        .unwrap();
    // 2. One bad external IP and one endpoint without an address.
    let mut bad = with_port(svc("bad", bad_ip), vport);
    bad["spec"]["externalIPs"] = json!(["not-an-ip", bad_ext]);
    api.apply_json(bad).unwrap();
    let mut bad_eps = slice_of("bad-1", "bad", bport, vec![endpoint(c, true, false, None)]);
    bad_eps["endpoints"]
        .as_array_mut()
        .unwrap()
        .insert(0, json!({"addresses": [], "conditions": {"ready": true}}));
    api.apply_json(bad_eps).unwrap();
    // 4. A NodePort Service on this node's address.
    let mut np = with_port(svc("np", np_ip), vport);
    np["spec"]["type"] = json!("NodePort");
    np["spec"]["ports"][0]["nodePort"] = json!(node_port);
    api.apply_json(np).unwrap();
    api.apply_json(slice_of(
        "np-1",
        "np",
        bport,
        vec![endpoint(c, true, false, None)],
    ))
    .unwrap();
    api.apply_json(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
        "status": {"addresses": [{"type": "InternalIP", "address": node_ip}]},
    }))
    .unwrap();
    // 7. PreferSameNode: A is hinted for this node, B for another.
    let mut near = with_port(svc("near", near_ip), vport);
    near["spec"]["trafficDistribution"] = json!("PreferSameNode");
    api.apply_json(near).unwrap();
    let hinted = vec![
        endpoint(a, true, false, Some("node-a")),
        endpoint(b, true, false, Some("node-b")),
    ];
    api.apply_json(slice_of("near-1", "near", bport, hinted))
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let opts = Options::kube_on_loopback(env!("CARGO_BIN_EXE_sluice"), &kubeconfig, &[]);
    let _daemon = Daemon::start(opts).await.unwrap();

    // 1. The ready copy of A counts: A and B both serve.
    until_seen(at(dup_ip, vport), &["A", "B"]).await;
    // 2. The cluster IP and the good external IP are served by C.
    until_seen(at(bad_ip, vport), &["C"]).await;
    until_seen(at(bad_ext, vport), &["C"]).await;
    // 7. Only the endpoint hinted for this node gets connections.
    for _ in 0..10 {
        assert_eq!(hit(at(near_ip, vport)).await.as_deref(), Some("A"));
    }
    // 4. The node port answers, and still does after the Node is deleted.
    until_seen(at(node_ip, node_port), &["C"]).await;
    api.delete(Kind::Node, "", "node-a").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..5 {
        assert_eq!(
            hit(at(node_ip, node_port)).await.as_deref(),
            Some("C"),
            "the node port went with the Node"
        );
    }
}

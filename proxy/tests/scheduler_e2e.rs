//! Per-Service scheduling end to end (issue 15 item 8): the fixture
//! apiserver (real list/watch), the real `sluice` binary, real backends and
//! clients on loopback. A Service annotated `sluice.io/scheduler: maglev`
//! sends each client IP to one backend on every connection: the one the
//! Maglev table of `sluice_control` names, as any other node would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use sluice_apiserver_fixture::ApiServer;
use sluice_control::table::client_hash;
use sluice_control::{Backend, Conditions, Policy, Service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::time::{Instant, timeout};

/// Backends: 127.0.0.2..=4 on one port (a slice has one port number).
const BACKENDS: [[u8; 4]; 3] = [[127, 0, 0, 2], [127, 0, 0, 3], [127, 0, 0, 4]];
const CLUSTER_IP: [u8; 4] = [127, 0, 0, 60];

/// A port free on every address given.
fn free_port_on(ips: &[[u8; 4]]) -> u16 {
    (0..50)
        .find_map(|_| {
            let probe = std::net::TcpListener::bind((IpAddr::from(ips[0]), 0)).ok()?;
            let port = probe.local_addr().ok()?.port();
            let held: Option<Vec<_>> = (ips[1..].iter())
                .map(|ip| std::net::TcpListener::bind((IpAddr::from(*ip), port)).ok())
                .collect();
            held.map(|_| port)
        })
        .expect("a port free on every address")
}

/// Answers each connection with its own address, then closes.
async fn named_backend(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(format!("{addr}\n").as_bytes()).await;
        }
    })
}

/// Connects from `client` (port chosen by the kernel) to `to` and returns
/// the backend's answer, or `None` when the connection failed or was empty.
async fn ask_from(client: IpAddr, to: SocketAddr) -> Option<String> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(client, 0)).ok()?;
    let mut s = timeout(Duration::from_secs(3), socket.connect(to))
        .await
        .ok()?
        .ok()?;
    let mut answer = String::new();
    timeout(Duration::from_secs(3), s.read_to_string(&mut answer))
        .await
        .ok()?
        .ok()?;
    Some(answer.trim().to_owned()).filter(|a| !a.is_empty())
}

/// The `sluice` child, killed on drop (its log shown if the test failed).
struct Daemon(Child, std::path::PathBuf);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.1).unwrap_or_default();
            eprintln!("--- sluice log ---\n{log}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maglev_sends_a_client_ip_to_one_backend_every_time() {
    let bport = free_port_on(&BACKENDS);
    let backends: Vec<SocketAddr> = (BACKENDS.iter())
        .map(|ip| SocketAddr::new(IpAddr::from(*ip), bport))
        .collect();
    let mut tasks = Vec::new();
    for addr in &backends {
        tasks.push(named_backend(*addr).await);
    }
    let vport = free_port_on(&[CLUSTER_IP]);
    let vip = SocketAddr::new(IpAddr::from(CLUSTER_IP), vport);

    let api = ApiServer::start().await.unwrap();
    api.apply_json(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": "web",
                     "annotations": {"sluice.io/scheduler": "maglev"}},
        "spec": {"clusterIP": vip.ip().to_string(), "clusterIPs": [vip.ip().to_string()],
                 "ports": [{"name": "tcp", "port": vport, "protocol": "TCP"}]},
    }))
    .unwrap();
    let endpoints: Vec<_> = (backends.iter())
        .map(|b| json!({"addresses": [b.ip().to_string()], "conditions": {"ready": true}}))
        .collect();
    api.apply_json(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "default", "name": "web-1",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "port": bport, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let log = dir.path().join("sluice.log");
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--node-name", "node-a", "--vip-interface", "lo"])
        .args(["--healthz-bind-address=", "--metrics-bind-address="])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _daemon = Daemon(child, log);

    // What any node computes for these backends, with no sluice running.
    let table = Service::new(
        "web",
        Policy::Maglev,
        None,
        backends
            .iter()
            .map(|a| Backend::new(*a, Conditions::READY))
            .collect(),
    );
    let expected = |client: IpAddr| {
        let first = table.hash_order(client_hash(client)).next().unwrap();
        table.eligible(first).unwrap().addr.to_string()
    };

    // Served once the first table is live (a Service with endpoints answers).
    let deadline = Instant::now() + Duration::from_secs(20);
    let first_client = IpAddr::from([127, 0, 0, 100]);
    while ask_from(first_client, vip).await.is_none() {
        assert!(Instant::now() < deadline, "{vip} never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut used = BTreeSet::new();
    for last in 100..110 {
        let client = IpAddr::from([127, 0, 0, last]);
        let want = expected(client);
        for round in 0..5 {
            let got = ask_from(client, vip).await;
            assert_eq!(
                got.as_ref(),
                Some(&want),
                "client {client}, connection {round}"
            );
        }
        used.insert(want);
    }
    assert!(used.len() >= 2, "ten clients all on {used:?}");
}

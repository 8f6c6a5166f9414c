//! Per-Service scheduling end to end (issue 15 item 8): the fixture
//! apiserver (real list/watch), the real `sluice` binary, real backends and
//! clients on loopback. A Service annotated `sluice.io/scheduler: maglev`
//! sends each client IP to one backend on every connection: the one the
//! Maglev table of `sluice_control` names, as any other node would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::json;
use sluice_apiserver_fixture::ApiServer;
use sluice_apiserver_fixture::builders::{slice, svc, with_port};
use sluice_control::table::client_hash;
use sluice_control::{Backend, Conditions, Policy, Service};
use sluice_testkit::backend::{self, Mode};
use sluice_testkit::{Daemon, Options};
use tokio::net::TcpSocket;
use tokio::time::{Instant, timeout};

/// Backends: 127.0.0.2..=4 on one port (a slice has one port number).
const BACKENDS: [&str; 3] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];

/// A port free on every address given.
fn free_port_on(ips: &[IpAddr]) -> u16 {
    (0..50)
        .find_map(|_| {
            let port = sluice_testkit::free_port(ips[0]).ok()?;
            let held: Option<Vec<_>> = (ips[1..].iter())
                .map(|ip| std::net::TcpListener::bind((*ip, port)).ok())
                .collect();
            held.map(|_| port)
        })
        .expect("a port free on every address")
}

/// Connects from `client` (port chosen by the kernel) to `to` and returns
/// the backend's name, or `None` when the connection failed or was empty.
async fn ask_from(client: IpAddr, to: SocketAddr) -> Option<String> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(client, 0)).ok()?;
    let mut s = timeout(Duration::from_secs(3), socket.connect(to))
        .await
        .ok()?
        .ok()?;
    backend::read_line(&mut s)
        .await
        .ok()
        .filter(|n| !n.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maglev_sends_a_client_ip_to_one_backend_every_time() {
    let ips: Vec<IpAddr> = BACKENDS.iter().map(|ip| ip.parse().unwrap()).collect();
    let bport = free_port_on(&ips);
    let backends: Vec<SocketAddr> = ips.iter().map(|ip| SocketAddr::new(*ip, bport)).collect();
    let mut running = Vec::new();
    for addr in &backends {
        let name = addr.to_string();
        running.push(
            backend::Backend::start_on(*addr, &name, Mode::Echo)
                .await
                .unwrap(),
        );
    }
    let cluster_ip: IpAddr = "127.0.0.60".parse().unwrap();
    let vip = SocketAddr::new(cluster_ip, free_port_on(&[cluster_ip]));

    let api = ApiServer::start().await.unwrap();
    let mut web = with_port(svc("web", "127.0.0.60"), vip.port());
    web["metadata"]["annotations"] = json!({"sluice.io/scheduler": "maglev"});
    api.apply_json(web).unwrap();
    let eps: Vec<(&str, bool, bool)> = BACKENDS.iter().map(|ip| (*ip, true, false)).collect();
    api.apply_json(with_port(slice("web-1", "web", &eps), bport))
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let opts = Options::kube_on_loopback(env!("CARGO_BIN_EXE_sluice"), &kubeconfig, &[]);
    let _daemon = Daemon::start(opts).await.unwrap();

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

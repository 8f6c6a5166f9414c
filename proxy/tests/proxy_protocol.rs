//! PROXY protocol v2 per Service end to end (issue 13): the real `sluice`
//! binary, real clients and backends on loopback. A backend that reads the
//! header (parsed with the `ppp` crate, an implementation independent of
//! sluice's encoder) reports the source and destination it carries; a
//! Service without the setting sends the client's bytes unchanged; a bad
//! annotation value leaves its Service served without a header, counted and
//! logged; with `--intercept nftables` in a network namespace, the
//! destination is the Service address the pod dialled (`SO_ORIGINAL_DST`),
//! not sluice's intercept port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::json;
use sluice_apiserver_fixture::ApiServer;
use sluice_apiserver_fixture::builders::{slice, svc, with_port};
use sluice_control::ProxyProtocol;
use sluice_control::source::file::{BackendDoc, ConfigDoc, ServiceDoc};
use sluice_testkit::{Daemon, Options, metric, netns};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

const T: Duration = Duration::from_secs(5);
/// What every client sends first: 16 bytes, as long as the header's fixed
/// part, so a backend can tell a header from a client's own bytes.
const HELLO: &[u8; 16] = b"0123456789abcdef";
const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A backend that reads the first 16 bytes of each connection. A PROXY v2
/// header: it reads the rest of it, parses it with `ppp` and answers
/// `PROXY <source> <destination>`; anything else: `RAW` and those 16 bytes.
/// Then it echoes.
struct ReportingBackend {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for ReportingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ReportingBackend {
    async fn start(addr: SocketAddr) -> Self {
        Self::serve_on(TcpListener::bind(addr).await.unwrap())
    }

    /// On `listener` (which may live in another network namespace).
    fn serve_on(listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn));
            }
        });
        Self { addr, task }
    }
}

async fn serve(mut conn: TcpStream) {
    let mut first = [0u8; 16];
    if conn.read_exact(&mut first).await.is_err() {
        return;
    }
    if first[..12] == SIGNATURE[..] {
        let len = usize::from(u16::from_be_bytes([first[14], first[15]]));
        let mut header = first.to_vec();
        header.resize(16 + len, 0);
        if conn.read_exact(&mut header[16..]).await.is_err() {
            return;
        }
        let line = match ppp::v2::Header::try_from(&header[..]) {
            Ok(h) => match (h.command, h.protocol, h.addresses) {
                (ppp::v2::Command::Proxy, ppp::v2::Protocol::Stream, a) => match a {
                    ppp::v2::Addresses::IPv4(a) => format!(
                        "PROXY {} {}\n",
                        SocketAddr::from((a.source_address, a.source_port)),
                        SocketAddr::from((a.destination_address, a.destination_port))
                    ),
                    ppp::v2::Addresses::IPv6(a) => format!(
                        "PROXY {} {}\n",
                        SocketAddr::from((a.source_address, a.source_port)),
                        SocketAddr::from((a.destination_address, a.destination_port))
                    ),
                    other => format!("BAD addresses {other:?}\n"),
                },
                (c, p, _) => format!("BAD {c:?} {p:?}\n"),
            },
            Err(e) => format!("BAD {e}\n"),
        };
        if conn.write_all(line.as_bytes()).await.is_err() {
            return;
        }
    } else {
        let mut out = b"RAW\n".to_vec();
        out.extend_from_slice(&first);
        if conn.write_all(&out).await.is_err() {
            return;
        }
    }
    let (mut r, mut w) = conn.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
}

/// What the backend saw on one connection through `to` from `client` (an
/// address of the client's family, port chosen by the kernel): the client's
/// own address and the backend's first line; then checks the echo after it.
/// `None` when the connection failed.
async fn ask(client: IpAddr, to: SocketAddr) -> Option<(SocketAddr, String)> {
    let socket = match client {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .ok()?;
    socket.bind(SocketAddr::new(client, 0)).ok()?;
    let s = timeout(T, socket.connect(to)).await.ok()?.ok()?;
    let me = s.local_addr().ok()?;
    let mut s = BufReader::new(s);
    s.get_mut().write_all(HELLO).await.ok()?;
    let mut line = String::new();
    timeout(T, s.read_line(&mut line)).await.ok()?.ok()?;
    if line.is_empty() {
        return None;
    }
    let line = line.trim_end().to_owned();
    // The echo: the client's bytes (after the header, or the raw 16 the
    // backend quoted back), then more of them, unchanged.
    let mut echo = [0u8; 16];
    timeout(T, s.read_exact(&mut echo)).await.ok()?.ok()?;
    assert_eq!(&echo, HELLO, "after {line:?}");
    s.get_mut().write_all(b"ping").await.ok()?;
    let mut pong = [0u8; 4];
    timeout(T, s.read_exact(&mut pong)).await.ok()?.ok()?;
    assert_eq!(&pong, b"ping");
    Some((me, line))
}

/// Waits until `to` answers through `client`; the first answer.
async fn first_answer(client: IpAddr, to: SocketAddr) -> (SocketAddr, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(got) = ask(client, to).await {
            return got;
        }
        assert!(Instant::now() < deadline, "{to} never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start_file(config: ConfigDoc) -> Daemon {
    let opts = Options {
        config: Some(config.to_yaml().unwrap()),
        args: vec!["--config-poll-interval".into(), "100ms".into()],
        log_filter: Some("info".into()),
        ..Options::new(env!("CARGO_BIN_EXE_sluice"))
    };
    Daemon::start(opts).await.unwrap()
}

/// File source: `proxyProtocol: v2` on one Service (IPv4, IPv6, and a
/// wildcard listen address), none on another over the same backend; then
/// the setting moves by a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_carries_the_client_and_the_service_address() {
    let backend4 = ReportingBackend::start("127.0.0.1:0".parse().unwrap()).await;
    let backend6 = ReportingBackend::start("[::1]:0".parse().unwrap()).await;
    let listen = |ip: &str| {
        SocketAddr::new(
            self::ip(ip),
            sluice_testkit::free_port(self::ip(ip)).unwrap(),
        )
    };
    let (with4, plain4, with6) = (listen("127.0.81.1"), listen("127.0.81.2"), listen("::1"));
    let wild = listen("0.0.0.0");
    let service = |name, at, backend: &ReportingBackend| {
        ServiceDoc::new(name, at, vec![BackendDoc::ready(backend.addr)])
    };
    let config = |pp: bool| {
        let with = |s: ServiceDoc| {
            if pp {
                s.with_proxy_protocol(ProxyProtocol::V2)
            } else {
                s
            }
        };
        ConfigDoc::new(vec![
            with(service("with", with4, &backend4)),
            service("plain", plain4, &backend4),
            with(service("with6", with6, &backend6)),
            with(service("wild", wild, &backend4)),
        ])
    };
    let mut daemon = start_file(config(true)).await;

    let client = ip("127.0.81.100");
    for round in 0..3 {
        let (me, line) = first_answer(client, with4).await;
        assert_eq!(line, format!("PROXY {me} {with4}"), "round {round}");
    }
    let (_, line) = first_answer(client, plain4).await;
    assert_eq!(line, "RAW", "no header without the setting");
    let (me, line) = first_answer(ip("::1"), with6).await;
    assert_eq!(line, format!("PROXY {me} {with6}"));
    // A wildcard listen address: the address the client dialled.
    let dialled = SocketAddr::new(ip("127.0.81.3"), wild.port());
    let (me, line) = first_answer(client, dialled).await;
    assert_eq!(line, format!("PROXY {me} {dialled}"));

    // Turned off by a reload: new connections get no header.
    daemon
        .reload_and_wait(&config(false).to_yaml().unwrap())
        .await
        .unwrap();
    let (_, line) = first_answer(client, with4).await;
    assert_eq!(line, "RAW");
    let (_, line) = first_answer(ip("::1"), with6).await;
    assert_eq!(line, "RAW");
}

/// Kubernetes source: `sluice.io/proxy-protocol: v2` gives the header with
/// the cluster IP as destination; a bad value (`v1`) leaves its Service
/// served without one, counted in `sluice_kube_skipped_fields_total` and
/// logged with the annotation's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_annotation_turns_it_on_and_a_bad_value_is_reported() {
    let backend_ip = ip("127.0.82.2");
    let bport = sluice_testkit::free_port(backend_ip).unwrap();
    let backend = ReportingBackend::start(SocketAddr::new(backend_ip, bport)).await;
    let (good_ip, bad_ip) = (ip("127.0.82.50"), ip("127.0.82.51"));
    let vport = sluice_testkit::common_port(&[good_ip, bad_ip]).unwrap();
    let (good, bad) = (
        SocketAddr::new(good_ip, vport),
        SocketAddr::new(bad_ip, vport),
    );

    let api = ApiServer::start().await.unwrap();
    for (name, cluster_ip, value) in [("good", "127.0.82.50", "v2"), ("bad", "127.0.82.51", "v1")] {
        let mut s = with_port(svc(name, cluster_ip), vport);
        s["metadata"]["annotations"] = json!({"sluice.io/proxy-protocol": value});
        api.apply_json(s).unwrap();
        let eps = slice(&format!("{name}-1"), name, &[("127.0.82.2", true, false)]);
        api.apply_json(with_port(eps, backend.addr.port())).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let opts = Options::kube_on_loopback(env!("CARGO_BIN_EXE_sluice"), &kubeconfig, &[]);
    let daemon = Daemon::start(opts).await.unwrap();

    let client = ip("127.0.82.100");
    let (me, line) = first_answer(client, good).await;
    assert_eq!(line, format!("PROXY {me} {good}"));
    let (_, line) = first_answer(client, bad).await;
    assert_eq!(line, "RAW", "a bad value: served without a header");

    let metrics = daemon.scrape().await.unwrap();
    let skipped = metric(&metrics, "sluice_kube_skipped_fields_total");
    assert_eq!(skipped, Some(1.0), "{metrics}");
    let log = daemon.log_tail(200);
    assert!(
        log.contains("sluice.io/proxy-protocol") && log.contains("v1") && log.contains("bad"),
        "the log names the Service, the annotation and the value:\n{log}"
    );
}

/// `--intercept nftables` in a namespace "node" with a pod on a veth: the
/// pod dials a Service IP, sluice's nftables table redirects it to the
/// intercept port, and the header names the pod's address as source and
/// the Service address (`SO_ORIGINAL_DST`) as destination. Needs root,
/// `ip` and `nft`; skipped with a message otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_intercept_mode_the_destination_is_the_original_one() {
    if let Some(why) = netns::unusable(&["ip", "nft"]) {
        eprintln!("skipped: {why}");
        return;
    }
    let id = std::process::id();
    let node = netns::Netns::new(format!("p-pp-node-{id}")).unwrap();
    let pod = netns::Netns::new(format!("p-pp-pod-{id}")).unwrap();
    netns::add_veth(node.name(), "vpod", pod.name(), "eth0").unwrap();
    node.ip(&["addr", "add", "10.244.9.1/24", "dev", "vpod"])
        .unwrap();
    node.ip(&["link", "set", "vpod", "up"]).unwrap();
    pod.ip(&["addr", "add", "10.244.9.10/24", "dev", "eth0"])
        .unwrap();
    pod.ip(&["link", "set", "eth0", "up"]).unwrap();
    pod.ip(&["route", "add", "default", "via", "10.244.9.1"])
        .unwrap();

    // The backend listens in the node namespace; served from here.
    let backend_addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let listener = netns::in_netns(node.name(), move || {
        let l = std::net::TcpListener::bind(backend_addr)?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .unwrap();
    let _backend = ReportingBackend::serve_on(TcpListener::from_std(listener).unwrap());

    let vip: SocketAddr = "10.96.9.10:80".parse().unwrap();
    let config = ConfigDoc::from(
        ServiceDoc::new(
            "default/pp:http",
            vip,
            vec![BackendDoc::ready(backend_addr)],
        )
        .with_proxy_protocol(ProxyProtocol::V2),
    );
    let flags = ["--intercept", "nftables", "--intercept-port", "10291"];
    let opts = Options {
        prefix: ["ip", "netns", "exec", node.name()]
            .map(String::from)
            .to_vec(),
        config: Some(config.to_yaml().unwrap()),
        args: flags.map(String::from).to_vec(),
        log_filter: Some("info".into()),
        ..Options::new(env!("CARGO_BIN_EXE_sluice"))
    };
    let _sluice = Daemon::spawn(opts).unwrap();

    let pod_ip = ip("10.244.9.10");
    let (me, line) = pod
        .block_on(Duration::from_secs(30), move || first_answer(pod_ip, vip))
        .unwrap();
    assert_eq!(me.ip(), pod_ip);
    assert_eq!(line, format!("PROXY {me} {vip}"));
}

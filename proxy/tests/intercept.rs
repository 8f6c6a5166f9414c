//! `--intercept nftables` in a mini node: the `sluice` binary runs in a
//! "node" network namespace whose pods sit on a Linux bridge with
//! br_netfilter on (`bridge-nf-call-iptables=1`, as kubeadm requires), and
//! sluice's own nftables table redirects Service traffic to its intercept
//! port. Needs root, `ip` and `nft`; skipped with a message otherwise.
//!
//! ```text
//!   ext 192.168.50.1 --veth-- node: eth0 192.168.50.10
//!                                   br0 10.244.0.1/24, fd00:244::1/64
//!                                    |-- client pod 10.244.0.10, fd00:244::10
//!                                    '-- backend pod 10.244.0.20, fd00:244::20 (:8080)
//!                                   vrouted 10.244.1.1/24 (no bridge)
//!                                    '-- routed client pod 10.244.1.10
//! ```
//!
//! Every namespace, process and thread made here is removed on drop, also
//! when an assertion fails; every wait is bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sluice_control::source::file::{BackendDoc, ConfigDoc, ServiceDoc};
use sluice_control::{NoEndpoints, NodePortAddress};
use sluice_testkit::daemon::Signal;
use sluice_testkit::{Daemon, Options, http, metric, netns};

const VIP: &str = "10.96.0.10:80";
const VIP_OTHER: &str = "10.96.0.11:8443";
const NODE_PORT: &str = "192.168.50.10:30080";
const BACKEND: &str = "10.244.0.20:8080";
const VIP6: &str = "[fd00:96::10]:80";
const BACKEND6: &str = "[fd00:244::20]:8080";
const INTERCEPT_PORT: u16 = 10261;
use sluice_testkit::netns::BRIDGE_NF_CALL_IPTABLES;

fn skip_reason() -> Option<String> {
    netns::unusable(&["ip", "nft"])
}

/// [`skip_reason`], or br_netfilter not loaded (the bridged node needs it).
fn bridged_skip_reason() -> Option<String> {
    skip_reason().or_else(|| {
        let loaded = std::fs::metadata(BRIDGE_NF_CALL_IPTABLES).is_ok();
        (!loaded).then(|| "br_netfilter is not loaded (modprobe br_netfilter)".into())
    })
}

/// A network namespace; deleted (with what runs in it) on drop.
struct Netns(netns::Netns);

impl Netns {
    fn new(tag: &str) -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("sluice-icpt-{tag}-{}-{n}", std::process::id());
        Netns(netns::Netns::new(name).unwrap())
    }

    fn name(&self) -> &str {
        self.0.name()
    }

    fn ip(&self, args: &[&str]) {
        self.0.ip(args).unwrap();
    }

    /// Runs a command inside the namespace; its output, which must be a
    /// success.
    fn exec(&self, cmd: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", self.name()])
            .args(cmd)
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sets a sysctl of this namespace (`/proc/sys/net` is the opener's
    /// namespace's).
    fn set_sysctl(&self, path: &'static str, value: &'static str) {
        self.on(move || std::fs::write(path, value).unwrap());
    }

    fn sysctl(&self, path: &'static str) -> String {
        self.on(move || std::fs::read_to_string(path).unwrap().trim().to_owned())
    }

    /// Runs `f` on a thread inside the namespace (its sockets are the
    /// namespace's).
    fn on<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        netns::in_netns(self.name(), move || Ok(f())).unwrap()
    }

    /// Connects to `addr` from inside the namespace and reads the reply.
    fn fetch(&self, addr: &str) -> std::io::Result<String> {
        let addr: SocketAddr = addr.parse().unwrap();
        self.on(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
    }

    /// `fetch` until it answers `want`, for at most `within`.
    fn fetch_until(&self, addr: &str, want: &str, within: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let got = self.fetch(addr);
            if matches!(&got, Ok(s) if s == want) {
                return Ok(());
            }
            if start.elapsed() > within {
                return Err(format!(
                    "{addr} from {} never answered {want:?} within {within:?}; last: {got:?}",
                    self.name()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A veth pair: `dev` in `a`, `peer` in `b`.
fn veth(a: &Netns, dev: &str, b: &Netns, peer: &str) {
    netns::add_veth(a.name(), dev, b.name(), peer).unwrap();
}

/// A TCP server on a thread inside a namespace: answers every connection
/// with `reply` and closes. Stopped on drop.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// On a thread inside `ns`: `bind` once, then `serve` (which must not
    /// block for long) in a loop until drop.
    fn spawn<T: 'static>(
        ns: &Netns,
        bind: impl FnOnce() -> T + Send + 'static,
        mut serve: impl FnMut(&T) + Send + 'static,
    ) -> Server {
        let name = ns.name().to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            netns::enter(&name).unwrap();
            let bound = bind();
            ready_tx.send(()).unwrap();
            while !stopping.load(Ordering::Relaxed) {
                serve(&bound);
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        Server {
            stop,
            thread: Some(thread),
        }
    }

    fn start(ns: &Netns, addr: &str, reply: &'static str) -> Server {
        let addr: SocketAddr = addr.parse().unwrap();
        let bind = move || {
            let listener = TcpListener::bind(addr).unwrap();
            listener.set_nonblocking(true).unwrap();
            listener
        };
        Self::spawn(ns, bind, move |listener| match listener.accept() {
            Ok((mut s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.write_all(reply.as_bytes());
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        })
    }

    /// A UDP server: answers every datagram with `<reply>:<datagram>`.
    fn udp(ns: &Netns, addr: &str, reply: &'static str) -> Server {
        let addr: SocketAddr = addr.parse().unwrap();
        let bind = move || {
            let socket = std::net::UdpSocket::bind(addr).unwrap();
            let wait = Some(Duration::from_millis(50));
            socket.set_read_timeout(wait).unwrap();
            socket
        };
        Self::spawn(ns, bind, move |socket| {
            let mut buf = [0u8; 2048];
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                let mut out = format!("{reply}:").into_bytes();
                out.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&out, from);
            }
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The `sluice` binary running in the node namespace on `config`; killed
/// on drop (its log is printed if the test is failing).
fn start_sluice(node: &Netns, config: &ConfigDoc) -> Daemon {
    let flags = [
        ["--intercept", "nftables"],
        ["--intercept-port", &INTERCEPT_PORT.to_string()],
        ["--workers", "2"],
    ];
    let opts = Options {
        prefix: node.0.exec_prefix(),
        config: Some(config.to_yaml().unwrap()),
        args: flags.concat().iter().map(|f| f.to_string()).collect(),
        log_filter: Some("sluice=debug,sluice_proxy=debug,info".into()),
        ..Options::new(env!("CARGO_BIN_EXE_sluice"))
    };
    Daemon::spawn(opts).unwrap()
}

/// SIGKILL, and wait for the process to be gone.
async fn kill(sluice: &mut Daemon) {
    sluice.signal(Signal::SIGKILL).unwrap();
    sluice.wait_exit(Duration::from_secs(5)).await.unwrap();
}

/// The mini node. Field order is drop order: processes and threads first,
/// then the namespaces.
struct Node {
    node: Netns,
    client: Netns,
    backend: Netns,
    ext: Netns,
    /// A pod on a point-to-point veth, routed by the node (no bridge).
    routed: Netns,
}

impl Node {
    fn build() -> Node {
        let node = Netns::new("node");
        let client = Netns::new("pod");
        let backend = Netns::new("be");
        let ext = Netns::new("ext");
        let routed = Netns::new("routed");
        // br_netfilter: bridged pod traffic goes through the IP hooks.
        node.set_sysctl(BRIDGE_NF_CALL_IPTABLES, "1");
        node.ip(&["link", "add", "br0", "type", "bridge"]);
        node.ip(&["addr", "add", "10.244.0.1/24", "dev", "br0"]);
        node.ip(&["addr", "add", "fd00:244::1/64", "dev", "br0", "nodad"]);
        node.ip(&["link", "set", "br0", "up"]);
        for (pod, host_end, ip, ip6) in [
            (&client, "vclient", "10.244.0.10/24", "fd00:244::10/64"),
            (&backend, "vbackend", "10.244.0.20/24", "fd00:244::20/64"),
        ] {
            veth(&node, host_end, pod, "eth0");
            node.ip(&["link", "set", host_end, "master", "br0", "up"]);
            pod.ip(&["addr", "add", ip, "dev", "eth0"]);
            pod.ip(&["link", "set", "eth0", "up"]);
            pod.ip(&["addr", "add", ip6, "dev", "eth0", "nodad"]);
            pod.ip(&["route", "add", "default", "via", "10.244.0.1"]);
            pod.ip(&["-6", "route", "add", "default", "via", "fd00:244::1"]);
        }
        veth(&node, "vrouted", &routed, "eth0");
        node.ip(&["addr", "add", "10.244.1.1/24", "dev", "vrouted"]);
        node.ip(&["link", "set", "vrouted", "up"]);
        routed.ip(&["addr", "add", "10.244.1.10/24", "dev", "eth0"]);
        routed.ip(&["link", "set", "eth0", "up"]);
        routed.ip(&["route", "add", "default", "via", "10.244.1.1"]);
        veth(&node, "eth0", &ext, "eth0");
        node.ip(&["addr", "add", "192.168.50.10/24", "dev", "eth0"]);
        node.ip(&["link", "set", "eth0", "up"]);
        node.ip(&["addr", "add", "fd00:50::10/64", "dev", "eth0", "nodad"]);
        node.ip(&["route", "add", "default", "via", "192.168.50.1"]);
        node.ip(&["-6", "route", "add", "default", "via", "fd00:50::1"]);
        ext.ip(&["addr", "add", "192.168.50.1/24", "dev", "eth0"]);
        ext.ip(&["addr", "add", "fd00:50::1/64", "dev", "eth0", "nodad"]);
        ext.ip(&["link", "set", "eth0", "up"]);
        Node {
            node,
            client,
            backend,
            ext,
            routed,
        }
    }

    /// `nft list table inet sluice` in the node (`None`: no such table).
    fn nft_table(&self, handles: bool) -> Option<String> {
        let mut args = vec!["netns", "exec", self.node.name(), "nft"];
        if handles {
            args.push("-a");
        }
        args.extend(["list", "table", "inet", "sluice"]);
        let out = Command::new("ip").args(&args).output().unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `/metrics` of `sluice`, which runs in the node.
    fn metrics(&self, sluice: &Daemon) -> String {
        let addr = sluice.metrics;
        let got = self
            .node
            .0
            .block_on(Duration::from_secs(5), move || async move {
                http::get(addr, "/metrics").await
            });
        got.unwrap().unwrap().1
    }
}

/// Whether the connection is reset or closed before any byte arrives.
fn refused_or_reset(got: &std::io::Result<String>) -> bool {
    match got {
        Ok(s) => s.is_empty(),
        Err(e) => matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
        ),
    }
}

/// Four services, all to the backend pod.
fn config() -> ConfigDoc {
    let service = |name, listen: &str, backend: &str| {
        let backend = BackendDoc::ready(backend.parse().unwrap());
        ServiceDoc::new(name, listen.parse().unwrap(), vec![backend])
    };
    ConfigDoc::new(vec![
        service("default/web:http", VIP, BACKEND),
        service("default/web:https", VIP_OTHER, BACKEND),
        service("default/web:nodeport", NODE_PORT, BACKEND),
        service("default/web6:http", VIP6, BACKEND6),
    ])
}

#[tokio::test]
async fn nftables_intercept_in_a_bridged_node_with_br_netfilter() {
    if let Some(why) = bridged_skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let net = Node::build();
    assert_eq!(net.node.sysctl(BRIDGE_NF_CALL_IPTABLES), "1");
    let _backend = Server::start(&net.backend, BACKEND, "backend\n");
    let _backend6 = Server::start(&net.backend, BACKEND6, "backend6\n");
    // (c) A hostNetwork process on 0.0.0.0:80, the port of a Service.
    let _host = Server::start(&net.node, "0.0.0.0:80", "host\n");
    let mut sluice = start_sluice(&net.node, &config());
    let ready = Duration::from_secs(10);

    // (a) A pod reaches the ClusterIP through sluice, and the NodePort.
    net.client.fetch_until(VIP, "backend\n", ready).unwrap();
    net.client
        .fetch_until(VIP_OTHER, "backend\n", ready)
        .unwrap();
    net.client
        .fetch_until(NODE_PORT, "backend\n", ready)
        .unwrap();
    // (b) So does the node itself (output hook), and an outside client
    // reaches the NodePort.
    net.node.fetch_until(VIP, "backend\n", ready).unwrap();
    net.node.fetch_until(NODE_PORT, "backend\n", ready).unwrap();
    net.ext.fetch_until(NODE_PORT, "backend\n", ready).unwrap();
    // A pod on a routed (point-to-point) veth, not on the bridge.
    net.routed.fetch_until(VIP, "backend\n", ready).unwrap();
    net.routed
        .fetch_until(NODE_PORT, "backend\n", ready)
        .unwrap();
    // IPv6: IP6T_SO_ORIGINAL_DST, from a pod and from the node.
    net.client.fetch_until(VIP6, "backend6\n", ready).unwrap();
    net.node.fetch_until(VIP6, "backend6\n", ready).unwrap();
    // (c) The hostNetwork listener on port 80 keeps serving its own
    // addresses, from the node and from pods.
    assert_eq!(net.node.fetch("127.0.0.1:80").unwrap(), "host\n");
    assert_eq!(net.node.fetch("10.244.0.1:80").unwrap(), "host\n");
    assert_eq!(net.client.fetch("10.244.0.1:80").unwrap(), "host\n");
    assert_eq!(net.client.fetch(VIP).unwrap(), "backend\n");

    // (d) No Service IP on any device of the node.
    let addrs = net.node.exec(&["ip", "-o", "address", "show"]);
    for vip in ["10.96.0.10", "10.96.0.11", "fd00:96::10"] {
        assert!(!addrs.contains(vip), "{vip} is on a device:\n{addrs}");
    }
    let table = net.nft_table(false).expect("sluice's table exists");
    assert!(table.contains("10.96.0.10 . tcp . 80"), "{table}");
    assert!(table.contains("192.168.50.10 . tcp . 30080"), "{table}");
    assert!(table.contains("fd00:96::10 . tcp . 80"), "{table}");

    // (e) The intercept port itself serves nothing: direct connections,
    // from a pod and from the node, are reset without a byte.
    let direct = format!("10.244.0.1:{INTERCEPT_PORT}");
    let got = net.client.fetch(&direct);
    assert!(refused_or_reset(&got), "direct from a pod: {got:?}");
    let got = net.node.fetch(&format!("127.0.0.1:{INTERCEPT_PORT}"));
    assert!(refused_or_reset(&got), "direct from the node: {got:?}");
    let metrics = net.metrics(&sluice);
    let rejected = "sluice_intercept_rejected_connections_total{reason=\"direct\"}";
    let count = metric(&metrics, rejected);
    assert!(count.is_some_and(|c| c >= 2.0), "{rejected}:\n{metrics}");

    // (f) SIGKILL leaves the table in place; while no sluice listens the
    // redirected connect is refused; a restart adopts the same table (same
    // handle: flushed and refilled, never deleted) and serves again.
    let before = net.nft_table(true).unwrap();
    kill(&mut sluice).await;
    let after_kill = net.nft_table(true).expect("table survives SIGKILL");
    assert_eq!(first_line(&after_kill), first_line(&before));
    assert!(after_kill.contains("10.96.0.10 . tcp . 80"));
    let got = net.client.fetch(VIP);
    assert!(
        matches!(&got, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
        "with no sluice: {got:?}"
    );
    let mut sluice = start_sluice(&net.node, &config());
    net.client.fetch_until(VIP, "backend\n", ready).unwrap();
    net.node.fetch_until(VIP, "backend\n", ready).unwrap();
    let adopted = net.nft_table(true).unwrap();
    assert_eq!(
        first_line(&adopted),
        first_line(&before),
        "the table was recreated, not adopted:\n{adopted}"
    );

    // `sluice --cleanup` removes the table and exits 0.
    kill(&mut sluice).await;
    let cleanup = Command::new("ip")
        .args([
            "netns",
            "exec",
            net.node.name(),
            env!("CARGO_BIN_EXE_sluice"),
        ])
        .arg("--cleanup")
        .output()
        .unwrap();
    assert!(cleanup.status.success(), "{cleanup:?}");
    assert!(net.nft_table(false).is_none(), "table left after --cleanup");
    // Without the table a Service address is just an unrouted address again.
    let got = net.client.fetch(VIP);
    assert!(got.is_err(), "{got:?}");
}

/// `table inet sluice { # handle N`: names the table instance.
fn first_line(listing: &str) -> &str {
    listing.lines().next().unwrap_or_default()
}

#[test]
fn nftables_mode_without_nft_exits_64_naming_the_package() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, config().to_yaml().unwrap()).unwrap();
    // A PATH without nft; the node namespace is not even needed.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--config")
        .arg(&path)
        .args(["--intercept", "nftables"])
        .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
        .env("PATH", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`nftables`"), "{stderr}");
}

/// A Service without endpoints (ClusterIP, IPv6 ClusterIP, NodePort).
const VIP_EMPTY: &str = "10.96.0.20:80";
const VIP6_EMPTY: &str = "[fd00:96::20]:80";
const NODE_PORT_EMPTY: &str = "192.168.50.10:30081";
/// An `externalTrafficPolicy: Local` NodePort on a node without a local
/// endpoint (the file source's `noEndpoints: drop`).
const NODE_PORT_LOCAL: &str = "192.168.50.10:30090";
/// A LoadBalancer IP whose `loadBalancerSourceRanges` admit only the
/// bridged client pod, and the same Service's NodePort (never filtered).
const LB: &str = "192.168.60.1:80";
const LB_RANGE: &str = "10.244.0.10/32";
const LB_NODE_PORT: &str = "192.168.50.10:30100";

/// The served ClusterIP (to know sluice is up), the Services above, and
/// `empty_backend` as the backend of `VIP_EMPTY` when given.
fn rules_config(empty_backend: Option<&str>) -> ConfigDoc {
    let ready = |b: &str| vec![BackendDoc::ready(b.parse().unwrap())];
    let service =
        |name, listen: &str, backends| ServiceDoc::new(name, listen.parse().unwrap(), backends);
    ConfigDoc::new(vec![
        service("default/web:http", VIP, ready(BACKEND)),
        service(
            "default/empty:http",
            VIP_EMPTY,
            empty_backend.map(ready).unwrap_or_default(),
        ),
        service("default/empty6:http", VIP6_EMPTY, vec![]),
        service("default/empty:nodeport", NODE_PORT_EMPTY, vec![]),
        service("default/local:nodeport", NODE_PORT_LOCAL, vec![])
            .with_no_endpoints(NoEndpoints::Drop),
        service("default/lb:lb", LB, ready(BACKEND))
            .with_source_ranges(vec![LB_RANGE.parse().unwrap()]),
        service("default/lb:nodeport", LB_NODE_PORT, ready(BACKEND)),
    ])
}

/// One connect from inside `ns` with a `timeout`: how it ended and how long
/// it took.
fn connect(ns: &Netns, addr: &str, timeout: Duration) -> (std::io::Result<()>, Duration) {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.on(move || {
        let start = Instant::now();
        let got = TcpStream::connect_timeout(&addr, timeout).map(drop);
        (got, start.elapsed())
    })
}

/// Asserts ECONNREFUSED within 100 ms (a reset at the SYN, not a handshake).
fn assert_refused_at_once(ns: &Netns, addr: &str) {
    let (got, took) = connect(ns, addr, Duration::from_secs(2));
    assert!(
        matches!(&got, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
        "{addr} from {}: {got:?}",
        ns.name()
    );
    assert!(
        took < Duration::from_millis(100),
        "{addr} refused after {took:?}"
    );
}

/// Asserts no SYN-ACK within a second: the connect times out.
fn assert_no_answer(ns: &Netns, addr: &str) {
    let (got, took) = connect(ns, addr, Duration::from_secs(1));
    assert!(
        matches!(&got, Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock)),
        "{addr} from {} answered: {got:?} after {took:?}",
        ns.name()
    );
}

/// Connections sluice accepted, over every Service.
fn accepted_total(metrics: &str) -> f64 {
    let series = "sluice_connections_accepted_total{";
    (metrics.lines())
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn nftables_rules_reject_drop_and_filter_sources() {
    if let Some(why) = bridged_skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let net = Node::build();
    // A node forwards (kubeadm requires it): traffic to a Service IP that
    // is not redirected meets the forward hook, as on a real node.
    net.node.set_sysctl("/proc/sys/net/ipv4/ip_forward", "1");
    net.node
        .set_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1");
    // The outside client reaches the load-balancer IP through the node.
    net.ext
        .ip(&["route", "add", "192.168.60.0/24", "via", "192.168.50.10"]);
    let _backend = Server::start(&net.backend, BACKEND, "backend\n");
    let sluice = start_sluice(&net.node, &rules_config(None));
    let ready = Duration::from_secs(10);
    net.client.fetch_until(VIP, "backend\n", ready).unwrap();
    let before = accepted_total(&net.metrics(&sluice));

    // No endpoints: reset at the SYN, from a pod (forward hook), from the
    // node itself (output hook), from outside to a NodePort (input hook),
    // and over IPv6.
    assert_refused_at_once(&net.client, VIP_EMPTY);
    assert_refused_at_once(&net.routed, VIP_EMPTY);
    assert_refused_at_once(&net.node, VIP_EMPTY);
    assert_refused_at_once(&net.ext, NODE_PORT_EMPTY);
    assert_refused_at_once(&net.client, VIP6_EMPTY);
    // eTP=Local without a local endpoint: no SYN-ACK at all.
    assert_no_answer(&net.ext, NODE_PORT_LOCAL);
    assert_no_answer(&net.client, NODE_PORT_LOCAL);
    // sluice never accepted any of them.
    let metrics = net.metrics(&sluice);
    assert_eq!(accepted_total(&metrics), before, "{metrics}");

    // loadBalancerSourceRanges: the pod inside the range reaches the LB IP,
    // the routed pod and the outside client do not; the Service's NodePort
    // stays open to all three.
    net.client.fetch_until(LB, "backend\n", ready).unwrap();
    assert_no_answer(&net.routed, LB);
    assert_no_answer(&net.ext, LB);
    for ns in [&net.client, &net.routed, &net.ext] {
        ns.fetch_until(LB_NODE_PORT, "backend\n", ready).unwrap();
    }
    let table = net.nft_table(false).unwrap();
    assert!(
        table.contains("192.168.60.1 . tcp . 80 . 10.244.0.10"),
        "{table}"
    );

    // Endpoints come: the key moves from reject to redirect; they go: back.
    sluice
        .reload(&rules_config(Some(BACKEND)).to_yaml().unwrap())
        .unwrap();
    net.client
        .fetch_until(VIP_EMPTY, "backend\n", ready)
        .unwrap();
    sluice
        .reload(&rules_config(None).to_yaml().unwrap())
        .unwrap();
    let start = Instant::now();
    loop {
        let (got, _) = connect(&net.client, VIP_EMPTY, Duration::from_secs(2));
        if matches!(&got, Err(e) if e.kind() == ErrorKind::ConnectionRefused) {
            break;
        }
        assert!(start.elapsed() < ready, "still not refused: {got:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_refused_at_once(&net.client, VIP_EMPTY);
}

#[test]
fn nodeport_addresses_select_the_nodes_interface_addresses() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let net = Node::build();
    let local = net
        .node
        .0
        .block_on(Duration::from_secs(5), || async {
            sluice_proxy::nft::local_addresses().await
        })
        .unwrap()
        .unwrap();
    for ip in [
        "127.0.0.1",
        "192.168.50.10",
        "10.244.0.1",
        "10.244.1.1",
        "fd00:50::10",
    ] {
        assert!(
            local.contains(&ip.parse().unwrap()),
            "{ip} not in {local:?}"
        );
    }
    let flag: Vec<NodePortAddress> = ["192.168.50.0/24", "fd00:50::/64"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let chosen = sluice_control::cidr::nodeport_addresses(&flag, &local).unwrap();
    let chosen: Vec<String> = chosen.unwrap().iter().map(|a| a.to_string()).collect();
    assert_eq!(chosen, ["192.168.50.10", "fd00:50::10"]);
}

#[test]
fn bad_nodeport_addresses_exit_64_naming_the_flag() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    for (value, says) in [
        ("10.0.0.0/33", "is not a CIDR"),
        ("primary,10.0.0.0/8", "`primary` cannot be combined"),
        ("203.0.113.0/24", "no interface address"),
    ] {
        // Checked before any apiserver is contacted.
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["--nodeport-addresses", value])
            .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
            .env("KUBECONFIG", "/nonexistent")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{value}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--nodeport-addresses"), "{value}: {stderr}");
        assert!(stderr.contains(says), "{value}: {stderr}");
    }
}

/// The Kubernetes source end to end: the fixture apiserver runs in the
/// node namespace (its listener bound there, served by this test's
/// runtime), sluice watches it with `--intercept nftables` and
/// `--nodeport-addresses`, and the same three rules hold for Services as
/// the index makes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_services_get_the_same_rules() {
    use serde_json::json;
    use sluice_apiserver_fixture::ApiServer;
    use sluice_apiserver_fixture::builders::{slice, svc, with_port};
    if let Some(why) = bridged_skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let net = Node::build();
    net.node.set_sysctl("/proc/sys/net/ipv4/ip_forward", "1");
    net.ext
        .ip(&["route", "add", "192.168.60.0/24", "via", "192.168.50.10"]);
    let _backend = Server::start(&net.backend, BACKEND, "backend\n");
    let runtime = tokio::runtime::Handle::current();
    let api = netns::in_netns(net.node.name(), move || {
        Ok(runtime.block_on(ApiServer::start())?)
    })
    .unwrap();

    // No endpoints at all.
    api.apply_json(svc("empty", "10.96.0.20")).unwrap();
    // eTP=Local NodePort whose only endpoint is on another node.
    let mut local = svc("local", "10.96.0.21");
    local["spec"]["type"] = json!("NodePort");
    local["spec"]["externalTrafficPolicy"] = json!("Local");
    local["spec"]["ports"][0]["nodePort"] = json!(30090);
    api.apply_json(local).unwrap();
    let mut local_eps = with_port(
        slice("local-1", "local", &[("10.244.0.20", true, false)]),
        8080,
    );
    local_eps["endpoints"][0]["nodeName"] = json!("node-b");
    api.apply_json(local_eps).unwrap();
    // A LoadBalancer whose source ranges admit the bridged client pod (one
    // range is bad: skipped, the rest kept).
    let mut lb = svc("lb", "10.96.0.22");
    lb["spec"]["type"] = json!("LoadBalancer");
    lb["spec"]["ports"][0]["nodePort"] = json!(30100);
    lb["spec"]["loadBalancerSourceRanges"] = json!([" 10.244.0.10/32 ", "bogus"]);
    lb["status"] = json!({"loadBalancer": {"ingress": [{"ip": "192.168.60.1"}]}});
    api.apply_json(lb).unwrap();
    api.apply_json(with_port(
        slice("lb-1", "lb", &[("10.244.0.20", true, false)]),
        8080,
    ))
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let kubeconfig = kubeconfig.display().to_string();
    let flags = [
        ["--kubeconfig", &kubeconfig],
        ["--node-name", "node-a"],
        ["--nodeport-addresses", "192.168.50.0/24"],
        ["--intercept", "nftables"],
        ["--intercept-port", &INTERCEPT_PORT.to_string()],
        ["--workers", "2"],
    ];
    let opts = Options {
        prefix: net.node.0.exec_prefix(),
        args: flags.concat().iter().map(|f| f.to_string()).collect(),
        log_filter: Some("sluice=debug,sluice_proxy=debug,info".into()),
        ..Options::new(env!("CARGO_BIN_EXE_sluice"))
    };
    let sluice = Daemon::spawn(opts).unwrap();
    let ready = Duration::from_secs(20);

    // The LB IP from inside its ranges (and so the table is there).
    net.client
        .fetch_until("192.168.60.1:80", "backend\n", ready)
        .unwrap();
    let before = accepted_total(&net.metrics(&sluice));
    assert_refused_at_once(&net.client, "10.96.0.20:80");
    assert_refused_at_once(&net.node, "10.96.0.20:80");
    // Local NodePort without a local endpoint: dropped; its cluster IP
    // (internalTrafficPolicy Cluster) is served.
    assert_no_answer(&net.ext, "192.168.50.10:30090");
    net.client
        .fetch_until("10.96.0.21:80", "backend\n", ready)
        .unwrap();
    // Source ranges: others cannot reach the LB IP; its NodePort is open.
    assert_no_answer(&net.routed, "192.168.60.1:80");
    assert_no_answer(&net.ext, "192.168.60.1:80");
    net.ext
        .fetch_until("192.168.50.10:30100", "backend\n", ready)
        .unwrap();
    net.routed
        .fetch_until("192.168.50.10:30100", "backend\n", ready)
        .unwrap();
    // --nodeport-addresses: the fixture has no Node object, so the node
    // ports above are served only because the flag chose 192.168.50.10
    // (and only it).
    let table = net.nft_table(false).unwrap();
    assert!(!table.contains("10.244.0.1 . tcp . 30100"), "{table}");
    let metrics = net.metrics(&sluice);
    let skipped = metric(&metrics, "sluice_kube_skipped_fields_total");
    assert_eq!(skipped, Some(1.0), "{metrics}");
    // Accepted: the fetches above (the reject and drops never reached sluice).
    let accepted = accepted_total(&metrics) - before;
    assert!(accepted >= 3.0, "{accepted}");

    // Endpoints appear for `empty`: the same key is now served.
    api.apply_json(with_port(
        slice("empty-1", "empty", &[("10.244.0.20", true, false)]),
        8080,
    ))
    .unwrap();
    net.client
        .fetch_until("10.96.0.20:80", "backend\n", ready)
        .unwrap();
}

const UDP_VIP: &str = "10.96.0.30:53";
const UDP_VIP6: &str = "[fd00:96::30]:53";
const UDP_VIP_EMPTY: &str = "10.96.0.31:53";
const UDP_BACKEND: &str = "10.244.0.20:5353";
const UDP_BACKEND6: &str = "[fd00:244::20]:5353";

impl Netns {
    /// Sends `payload` to `addr` from an unconnected socket inside the
    /// namespace and waits up to `wait` for one datagram: its text and the
    /// address it came from.
    fn ask_udp(
        &self,
        addr: &str,
        payload: &'static str,
        wait: Duration,
    ) -> std::io::Result<(String, SocketAddr)> {
        let addr: SocketAddr = addr.parse().unwrap();
        self.on(move || {
            let any: SocketAddr = match addr {
                SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
                SocketAddr::V6(_) => "[::]:0".parse().unwrap(),
            };
            let s = std::net::UdpSocket::bind(any)?;
            s.set_read_timeout(Some(wait))?;
            s.send_to(payload.as_bytes(), addr)?;
            let mut buf = [0u8; 2048];
            let (n, from) = s.recv_from(&mut buf)?;
            Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
        })
    }

    /// `ask_udp` until it answers `want` (from anywhere), for at most
    /// `within`; the address the answer came from.
    fn ask_udp_until(&self, addr: &str, want: &str, within: Duration) -> SocketAddr {
        let start = Instant::now();
        loop {
            let got = self.ask_udp(addr, "q", Duration::from_millis(500));
            if let Ok((text, from)) = &got
                && text == want
            {
                return *from;
            }
            assert!(
                start.elapsed() < within,
                "{addr} from {} never answered {want:?} within {within:?}; last: {got:?}",
                self.name()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The local port sluice's table redirects `vip` (`a.b.c.d:port`) to.
fn udp_local_port(table: &str, vip: &str) -> u16 {
    let (ip, port) = vip.rsplit_once(':').unwrap();
    let element = format!("{ip} . {port} : ");
    let at = table
        .find(&element)
        .unwrap_or_else(|| panic!("{element:?} not in:\n{table}"));
    let rest = &table[at + element.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap()
}

#[tokio::test]
async fn udp_services_through_nftables_answer_from_the_service_address() {
    if let Some(why) = bridged_skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let net = Node::build();
    // A node forwards: a datagram to a Service without endpoints meets
    // the reject in the forward hook.
    net.node.set_sysctl("/proc/sys/net/ipv4/ip_forward", "1");
    let _udp = Server::udp(&net.backend, UDP_BACKEND, "be");
    let _udp6 = Server::udp(&net.backend, UDP_BACKEND6, "be6");
    let _tcp = Server::start(&net.backend, BACKEND, "backend\n");
    let service = |name, listen: &str, backends: &[&str]| {
        let backends = (backends.iter())
            .map(|b| BackendDoc::ready(b.parse().unwrap()))
            .collect();
        ServiceDoc::new(name, listen.parse().unwrap(), backends)
    };
    let config = ConfigDoc::new(vec![
        service("kube-system/dns:udp", UDP_VIP, &[UDP_BACKEND]).udp(),
        service("kube-system/dns6:udp", UDP_VIP6, &[UDP_BACKEND6]).udp(),
        service("kube-system/empty:udp", UDP_VIP_EMPTY, &[]).udp(),
        // TCP on the same address and port number as the UDP Service.
        service("kube-system/dns:tcp", "10.96.0.30:53", &[BACKEND]),
    ]);
    let sluice = start_sluice(&net.node, &config);
    let ready = Duration::from_secs(10);
    let vip: SocketAddr = UDP_VIP.parse().unwrap();
    let vip6: SocketAddr = UDP_VIP6.parse().unwrap();

    // From a bridged pod (prerouting with br_netfilter), a routed pod and
    // the node itself (output hook: redirected to 127.0.0.1, answered from
    // there by IP_PKTINFO): every answer comes from the Service address.
    for (who, ns) in [
        ("pod", &net.client),
        ("routed pod", &net.routed),
        ("node", &net.node),
    ] {
        let from = ns.ask_udp_until(UDP_VIP, "be:q", ready);
        assert_eq!(from, vip, "answer to the {who} came from {from}");
    }
    for (who, ns) in [("pod", &net.client), ("node", &net.node)] {
        let from = ns.ask_udp_until(UDP_VIP6, "be6:q", ready);
        assert_eq!(from, vip6, "IPv6 answer to the {who} came from {from}");
    }
    // TCP on the same address and port number still goes its own way.
    net.client
        .fetch_until("10.96.0.30:53", "backend\n", ready)
        .unwrap();

    let table = net.nft_table(false).expect("sluice's table exists");
    let port = udp_local_port(&table, UDP_VIP);
    assert!((20000..=29999).contains(&port), "{port}:\n{table}");
    assert!(table.contains("ct status ! dnat drop"), "{table}");
    // No endpoints: in the reject verdict map, not redirected; the client
    // gets ICMP port unreachable (ECONNREFUSED on a connected socket).
    assert!(
        table.contains("10.96.0.31 . udp . 53 : goto reject-chain"),
        "{table}"
    );
    let refused = net.client.on(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(UDP_VIP_EMPTY).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.send(b"q").unwrap();
        s.recv(&mut [0u8; 16]).map(|_| ())
    });
    assert!(
        matches!(&refused, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
        "no endpoints: {refused:?}"
    );
    // The local port takes redirected datagrams only: sent to it directly
    // (from a pod, to the node's address) it gets no answer.
    let direct = format!("10.244.0.1:{port}");
    let got = net.client.ask_udp(&direct, "q", Duration::from_secs(1));
    assert!(got.is_err(), "direct to the local port answered: {got:?}");

    let metrics = net.metrics(&sluice);
    let up = r#"sluice_udp_datagrams_total{service="kube-system/dns:udp",direction="client_to_backend"}"#;
    assert!(
        metric(&metrics, up).is_some_and(|n| n >= 3.0),
        "{up}:\n{metrics}"
    );
}

//! Backends see the client's own IP (issue 13): the `sluice` binary on the
//! Kubernetes source (the fixture apiserver) in a mini node with a pod
//! bridge (br_netfilter on) and a second node routed through it, dialing
//! transparently. Every backend answers with the source address it sees
//! (testkit's `Mode::EchoPeer`), then echoes. Needs root, `ip`, `nft` and
//! br_netfilter; skipped with a message otherwise.
//!
//! ```text
//!   ext 192.168.50.1 --veth-- node-a: eth0 192.168.50.10
//!                               br0 10.244.0.1/24 (bridge-nf-call-iptables=1)
//!                                |-- client pod 10.244.0.10 (also a backend: hairpin)
//!                                '-- backend pod 10.244.0.20:8080
//!                               vn2 192.168.60.10 -- node-b 192.168.60.20
//!                                                    '-- pod 10.244.2.20:8080
//! ```
//!
//! Namespaces are prefixed `s-sip-`; all are removed on drop.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_apiserver_fixture::ApiServer;
use sluice_apiserver_fixture::builders::{slice, svc, with_port};
use sluice_testkit::backend::{Mode, NetnsBackend};
use sluice_testkit::daemon::Signal;
use sluice_testkit::{Daemon, Options, http, metric, netns};

use sluice_testkit::netns::BRIDGE_NF_CALL_IPTABLES;
const BRIDGE_NF_CALL_IP6TABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-ip6tables";
const INTERCEPT_PORT: u16 = 10261;
/// The defaults of --transparent-mark and --transparent-route-table.
const TABLE: &str = "2626";

fn skip_reason() -> Option<String> {
    netns::unusable(&["ip", "nft"]).or_else(|| {
        let loaded = std::fs::metadata(BRIDGE_NF_CALL_IPTABLES).is_ok();
        (!loaded).then(|| "br_netfilter is not loaded (modprobe br_netfilter)".into())
    })
}

fn ns(tag: &str) -> netns::Netns {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    netns::Netns::new(format!("s-sip-{tag}-{}-{n}", std::process::id())).unwrap()
}

fn sysctl(ns: &netns::Netns, path: &'static str, value: &'static str) {
    netns::in_netns(ns.name(), move || Ok(std::fs::write(path, value)?)).unwrap();
}

/// `ip netns exec NS CMD...`: status and stdout.
fn exec(ns: &netns::Netns, cmd: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .args(cmd)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Connects from inside `ns` to `addr`, reads the backend's line
/// (`<name> <peer>`), checks an echo round trip, and returns the peer
/// address the backend saw.
fn ask(ns: &netns::Netns, addr: &str) -> Result<String, String> {
    let addr: SocketAddr = addr.parse().unwrap();
    netns::in_netns(ns.name(), move || {
        let run = || -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut r = BufReader::new(s.try_clone()?);
            let mut line = String::new();
            r.read_line(&mut line)?;
            s.write_all(b"ping\n")?;
            let mut echo = String::new();
            r.read_line(&mut echo)?;
            if echo != "ping\n" {
                return Err(std::io::Error::other(format!("echo: {echo:?}")));
            }
            let peer = line.trim().split(' ').nth(1).unwrap_or("").to_string();
            Ok(peer)
        };
        Ok(run().map_err(|e| format!("{addr}: {e}")))
    })
    .unwrap()
}

/// [`ask`] until it succeeds, for at most 20 s (the first table).
fn ask_until(ns: &netns::Netns, addr: &str) -> String {
    let start = Instant::now();
    loop {
        match ask(ns, addr) {
            Ok(peer) => return peer,
            Err(e) if start.elapsed() > Duration::from_secs(20) => {
                panic!("{addr} from {} never answered: {e}", ns.name())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Two nodes and four pods. Field order is drop order.
struct Net {
    _backends: Vec<NetnsBackend>,
    node: netns::Netns,
    node_b: netns::Netns,
    client: netns::Netns,
    backend: netns::Netns,
    remote: netns::Netns,
    ext: netns::Netns,
}

impl Net {
    fn build() -> Net {
        let (node, node_b) = (ns("node"), ns("nodeb"));
        let (client, backend, remote, ext) = (ns("pod"), ns("be"), ns("remote"), ns("ext"));
        sysctl(&node, BRIDGE_NF_CALL_IPTABLES, "1");
        sysctl(&node, BRIDGE_NF_CALL_IP6TABLES, "1");
        sysctl(&node, "/proc/sys/net/ipv6/conf/all/forwarding", "1");
        for n in [&node, &node_b] {
            sysctl(n, "/proc/sys/net/ipv4/ip_forward", "1");
        }
        node.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
        node.ip(&["addr", "add", "10.244.0.1/24", "dev", "br0"])
            .unwrap();
        node.ip(&["addr", "add", "fd00:244::1/64", "dev", "br0", "nodad"])
            .unwrap();
        node.ip(&["link", "set", "br0", "up"]).unwrap();
        for (pod, host_end, ip, ip6) in [
            (&client, "vclient", "10.244.0.10/24", "fd00:244::10/64"),
            (&backend, "vbackend", "10.244.0.20/24", "fd00:244::20/64"),
        ] {
            netns::add_veth(node.name(), host_end, pod.name(), "eth0").unwrap();
            node.ip(&["link", "set", host_end, "master", "br0", "up"])
                .unwrap();
            pod.ip(&["addr", "add", ip, "dev", "eth0"]).unwrap();
            pod.ip(&["addr", "add", ip6, "dev", "eth0", "nodad"])
                .unwrap();
            pod.ip(&["link", "set", "eth0", "up"]).unwrap();
            pod.ip(&["route", "add", "default", "via", "10.244.0.1"])
                .unwrap();
            pod.ip(&["-6", "route", "add", "default", "via", "fd00:244::1"])
                .unwrap();
        }
        // Outside client: no route to the pods, replies come via the node.
        netns::add_veth(node.name(), "eth0", ext.name(), "eth0").unwrap();
        node.ip(&["addr", "add", "192.168.50.10/24", "dev", "eth0"])
            .unwrap();
        node.ip(&["link", "set", "eth0", "up"]).unwrap();
        ext.ip(&["addr", "add", "192.168.50.1/24", "dev", "eth0"])
            .unwrap();
        ext.ip(&["link", "set", "eth0", "up"]).unwrap();
        // node-b and its pod; pod networks routed between the nodes, no
        // route back to the outside client (as a real node-b would send
        // it out its own uplink).
        netns::add_veth(node.name(), "vn2", node_b.name(), "eth0").unwrap();
        node.ip(&["addr", "add", "192.168.60.10/24", "dev", "vn2"])
            .unwrap();
        node.ip(&["link", "set", "vn2", "up"]).unwrap();
        node_b
            .ip(&["addr", "add", "192.168.60.20/24", "dev", "eth0"])
            .unwrap();
        node_b.ip(&["link", "set", "eth0", "up"]).unwrap();
        netns::add_veth(node_b.name(), "vb2", remote.name(), "eth0").unwrap();
        node_b
            .ip(&["addr", "add", "10.244.2.1/24", "dev", "vb2"])
            .unwrap();
        node_b.ip(&["link", "set", "vb2", "up"]).unwrap();
        remote
            .ip(&["addr", "add", "10.244.2.20/24", "dev", "eth0"])
            .unwrap();
        remote.ip(&["link", "set", "eth0", "up"]).unwrap();
        remote
            .ip(&["route", "add", "default", "via", "10.244.2.1"])
            .unwrap();
        node.ip(&["route", "add", "10.244.2.0/24", "via", "192.168.60.20"])
            .unwrap();
        node_b
            .ip(&["route", "add", "10.244.0.0/16", "via", "192.168.60.10"])
            .unwrap();
        let backends = [
            (&backend, "10.244.0.20:8080", "backend"),
            (&remote, "10.244.2.20:8080", "remote"),
            (&client, "10.244.0.10:8080", "client"),
            (&backend, "[fd00:244::20]:8080", "backend6"),
        ]
        .map(|(n, addr, name)| {
            NetnsBackend::start(n.name(), addr.parse().unwrap(), name, Mode::EchoPeer).unwrap()
        });
        Net {
            _backends: backends.into(),
            node,
            node_b,
            client,
            backend,
            remote,
            ext,
        }
    }

    /// Until no IPv6 address of the node or a bridged pod is tentative
    /// (link-local DAD, about a second after a link comes up: until then
    /// neighbour discovery, and so the first IPv6 dials, stall).
    fn wait_ipv6_settled(&self) {
        let start = Instant::now();
        for n in [&self.node, &self.client, &self.backend] {
            while !exec(n, &["ip", "-6", "addr", "show", "tentative"])
                .1
                .is_empty()
            {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "IPv6 DAD never ended"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Whether the node has sluice's ip rule, route table and bridge table.
    fn routing(&self) -> (bool, bool, bool) {
        let rule = exec(&self.node, &["ip", "rule"]).1;
        let route = exec(&self.node, &["ip", "route", "show", "table", TABLE]).1;
        let bridge = exec(&self.node, &["nft", "list", "table", "bridge", "sluice"]).0;
        (
            rule.contains(&format!("lookup {TABLE}")),
            route.contains("local default dev lo"),
            bridge,
        )
    }

    async fn metrics(&self, sluice: &Daemon) -> String {
        let addr = sluice.metrics;
        self.node
            .block_on(Duration::from_secs(5), move || async move {
                http::get(addr, "/metrics").await
            })
            .unwrap()
            .unwrap()
            .1
    }

    async fn healthz(&self, sluice: &Daemon) -> String {
        let addr = sluice.health;
        self.node
            .block_on(Duration::from_secs(5), move || async move {
                http::get(addr, "/healthz").await
            })
            .unwrap()
            .unwrap()
            .1
    }
}

/// The Services: a ClusterIP per path and two NodePorts (eTP Local and
/// Cluster); Node node-a with its pod CIDR.
fn fill(api: &ApiServer) {
    let endpoint = |name: &str, svc: &str, ip: &str, node: &str| {
        let mut s = with_port(slice(name, svc, &[(ip, true, false)]), 8080);
        s["endpoints"][0]["nodeName"] = json!(node);
        s
    };
    for (name, ip, ep, node) in [
        ("same", "10.96.0.1", "10.244.0.20", "node-a"),
        ("remote", "10.96.0.2", "10.244.2.20", "node-b"),
        ("hairpin", "10.96.0.4", "10.244.0.10", "node-a"),
    ] {
        api.apply_json(svc(name, ip)).unwrap();
        api.apply_json(endpoint(&format!("{name}-1"), name, ep, node))
            .unwrap();
    }
    for (name, ip, port, policy, ep, node) in [
        (
            "np-local",
            "10.96.0.5",
            30080,
            "Local",
            "10.244.0.20",
            "node-a",
        ),
        (
            "np-cluster",
            "10.96.0.6",
            30081,
            "Cluster",
            "10.244.2.20",
            "node-b",
        ),
    ] {
        let mut s = svc(name, ip);
        s["spec"]["type"] = json!("NodePort");
        s["spec"]["externalTrafficPolicy"] = json!(policy);
        s["spec"]["ports"][0]["nodePort"] = json!(port);
        api.apply_json(s).unwrap();
        api.apply_json(endpoint(&format!("{name}-1"), name, ep, node))
            .unwrap();
    }
    // IPv6: a Service on the bridged backend.
    api.apply_json(svc("same6", "fd00:96::1")).unwrap();
    let mut s6 = endpoint("same6-1", "same6", "fd00:244::20", "node-a");
    s6["addressType"] = json!("IPv6");
    api.apply_json(s6).unwrap();
    api.apply_json(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a"},
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24", "fd00:244::/64"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.10"}]},
    }))
    .unwrap();
}

/// The fixture apiserver in the node namespace (served by the calling
/// test's runtime), filled; its kubeconfig's directory and path.
fn apiserver(net: &Net) -> (ApiServer, tempfile::TempDir, String) {
    let runtime = tokio::runtime::Handle::current();
    let api = netns::in_netns(net.node.name(), move || {
        Ok(runtime.block_on(ApiServer::start())?)
    })
    .unwrap();
    fill(&api);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let kubeconfig = kubeconfig.display().to_string();
    (api, dir, kubeconfig)
}

fn start(net: &Net, kubeconfig: &str, extra: &[&str]) -> Daemon {
    let port = INTERCEPT_PORT.to_string();
    let mut args = vec![
        "--kubeconfig",
        kubeconfig,
        "--node-name",
        "node-a",
        "--nodeport-addresses",
        "192.168.50.0/24",
        "--intercept",
        "nftables",
        "--intercept-port",
        &port,
        "--workers",
        "1",
        "--shutdown-grace",
        "1s",
    ];
    args.extend(extra);
    let opts = Options {
        prefix: net.node.exec_prefix(),
        args: args.iter().map(|a| a.to_string()).collect(),
        log_filter: Some("sluice=debug,sluice_proxy=debug,info".into()),
        ..Options::new(env!("CARGO_BIN_EXE_sluice"))
    };
    Daemon::spawn(opts).unwrap()
}

/// A NetworkPolicy-like filter in the backend pod: only the client pod
/// may connect to :8080.
fn admit_only_the_client(net: &Net) {
    let rules = "table inet s-netpol { chain input { type filter hook input priority 0; policy accept; \
                 tcp dport 8080 ip saddr != 10.244.0.10 counter drop; }; }\n";
    netns::in_netns(net.backend.name(), move || {
        netns::run("nft", &["-f", "-"], Some(rules))
    })
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_see_the_clients_own_ip() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let net = Net::build();
    let (api, _dir, kubeconfig) = apiserver(&net);

    net.wait_ipv6_settled();
    let mut sluice = start(&net, &kubeconfig, &[]);
    // (a) A backend on the same bridge (br_netfilter on).
    assert_eq!(ask_until(&net.client, "10.96.0.1:80"), "10.244.0.10");
    // (b) A backend on the other node, routed via this one.
    assert_eq!(ask_until(&net.client, "10.96.0.2:80"), "10.244.0.10");
    // (a) in IPv6 (bridge-nf-call-ip6tables=1).
    assert_eq!(ask_until(&net.client, "[fd00:96::1]:80"), "fd00:244::10");
    // (c) An outside client to an eTP=Local NodePort keeps its IP.
    assert_eq!(ask_until(&net.ext, "192.168.50.10:30080"), "192.168.50.1");
    // (d) eTP=Cluster: the node's address (towards node-b).
    assert_eq!(ask_until(&net.ext, "192.168.50.10:30081"), "192.168.60.10");
    // (e) Hairpin: the node's address on the bridge.
    assert_eq!(ask_until(&net.client, "10.96.0.4:80"), "10.244.0.1");
    // (f) Behind a filter admitting only the client pod, the Service
    // traffic passes.
    admit_only_the_client(&net);
    assert_eq!(ask(&net.client, "10.96.0.1:80"), Ok("10.244.0.10".into()));
    let m = net.metrics(&sluice).await;
    let node_reason = |r: &str| {
        metric(
            &m,
            &format!("sluice_source_ip_node_total{{reason=\"{r}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(node_reason("hairpin") >= 1.0, "{m}");
    assert!(node_reason("not_local") >= 1.0, "{m}");
    assert_eq!(node_reason("disabled"), 0.0);
    assert_eq!(
        metric(&m, "sluice_transparent_dial_failures_total"),
        Some(0.0),
        "{}",
        sluice.log_tail(60)
    );
    let health = net.healthz(&sluice).await;
    assert!(health.contains("\"warnings\":[]"), "{health}");
    assert_eq!(net.routing(), (true, true, true));
    let (_, steer) = exec(
        &net.node,
        &["nft", "list", "chain", "inet", "sluice", "steer-replies"],
    );
    assert!(steer.contains("socket transparent 1"), "{steer}");

    // (g) SIGKILL leaves the routing; --cleanup removes it.
    sluice.signal(Signal::SIGKILL).unwrap();
    sluice.wait_exit(Duration::from_secs(5)).await.unwrap();
    assert_eq!(net.routing(), (true, true, true));
    let cleanup = Command::new("ip")
        .args(["netns", "exec", net.node.name()])
        .arg(env!("CARGO_BIN_EXE_sluice"))
        .arg("--cleanup")
        .output()
        .unwrap();
    assert!(cleanup.status.success(), "{cleanup:?}");
    assert_eq!(net.routing(), (false, false, false));

    // (g) A clean exit removes it too.
    let mut sluice = start(&net, &kubeconfig, &[]);
    assert_eq!(ask_until(&net.client, "10.96.0.1:80"), "10.244.0.10");
    assert_eq!(net.routing(), (true, true, true));
    let report = sluice.stop(Duration::from_secs(10)).await;
    assert!(report.clean, "{report:?}\n{}", sluice.log_tail(30));
    assert_eq!(net.routing(), (false, false, false));

    // (f) The motivating failure: from the node's address, the filter
    // drops the connection; other paths still work.
    let sluice = start(&net, &kubeconfig, &["--source-ip", "node"]);
    assert_eq!(ask_until(&net.client, "10.96.0.2:80"), "192.168.60.10");
    let blocked = ask(&net.client, "10.96.0.1:80");
    assert!(blocked.is_err(), "{blocked:?}");
    let m = net.metrics(&sluice).await;
    assert!(
        metric(&m, "sluice_source_ip_node_total{reason=\"disabled\"}").unwrap_or(0.0) >= 2.0,
        "{m}"
    );
    assert_eq!(net.routing(), (false, false, false));
    drop(sluice);
    drop(api);
    let _ = (&net.node_b, &net.remote);
}

/// `bridge-nf-call-iptables=0`: replies within one bridge cannot be
/// steered; sluice dials those from the node's address and counts it,
/// every other path stays transparent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsteerable_bridge_falls_back_to_the_node_address() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let net = Net::build();
    sysctl(&net.node, BRIDGE_NF_CALL_IPTABLES, "0");
    let (api, _dir, kubeconfig) = apiserver(&net);
    let sluice = start(&net, &kubeconfig, &[]);
    assert_eq!(ask_until(&net.client, "10.96.0.2:80"), "10.244.0.10");
    // The bridge follower has read the sysctl by the time the table is
    // live; give it one resync at most.
    let start = Instant::now();
    let seen = loop {
        let seen = ask_until(&net.client, "10.96.0.1:80");
        if seen == "10.244.0.1" || start.elapsed() > Duration::from_secs(12) {
            break seen;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(seen, "10.244.0.1");
    let m = net.metrics(&sluice).await;
    assert!(
        metric(
            &m,
            "sluice_source_ip_node_total{reason=\"bridge_unsteered\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
    drop(sluice);
    drop(api);
}

/// [`ask_until`] until the peer seen is `want`, for at most 12 s (the
/// routes over the pod interfaces are read when the bridge follower
/// starts, then with each table publish and every 10 s); the last seen.
fn ask_until_seen(ns: &netns::Netns, addr: &str, want: &str) -> String {
    let start = Instant::now();
    loop {
        let seen = ask_until(ns, addr);
        if seen == want || start.elapsed() > Duration::from_secs(12) {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `--detect-local-mode BridgeInterface` / `InterfaceNamePrefix`: the
/// client pod is local because node-a routes its network over br0 (the
/// bridge, not its ports: a port's name matches no route).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interface_detectors_follow_the_routes_over_the_pod_interfaces() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let net = Net::build();
    let (api, _dir, kubeconfig) = apiserver(&net);
    for mode in [
        [
            "--detect-local-mode",
            "BridgeInterface",
            "--pod-bridge-interface",
            "br0",
        ],
        [
            "--detect-local-mode",
            "InterfaceNamePrefix",
            "--pod-interface-name-prefix",
            "br",
        ],
    ] {
        let mut sluice = start(&net, &kubeconfig, &mode);
        // Same bridge and the other node: the client's own IP.
        assert_eq!(
            ask_until_seen(&net.client, "10.96.0.1:80", "10.244.0.10"),
            "10.244.0.10",
            "{mode:?}\n{}",
            sluice.log_tail(40)
        );
        assert_eq!(ask(&net.client, "10.96.0.2:80"), Ok("10.244.0.10".into()));
        let report = sluice.stop(Duration::from_secs(10)).await;
        assert!(report.clean, "{report:?}");
    }
    // A bridge port carries no route: nothing is local, the node dials.
    let sluice = start(
        &net,
        &kubeconfig,
        &[
            "--detect-local-mode",
            "BridgeInterface",
            "--pod-bridge-interface",
            "vclient",
        ],
    );
    assert_eq!(ask_until(&net.client, "10.96.0.2:80"), "192.168.60.10");
    let m = net.metrics(&sluice).await;
    assert!(
        metric(&m, "sluice_source_ip_node_total{reason=\"not_local\"}").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
    drop(sluice);
    drop(api);
    let _ = (&net.node_b, &net.remote, &net.ext, &net.backend);
}

/// Asked for but unavailable (here: `--intercept bind`): every dial from
/// the node's address, the reason on /healthz, each dial counted as
/// `disabled`. Loopback only, no root needed.
#[tokio::test]
async fn an_unavailable_transparent_mode_falls_back_and_says_why() {
    use sluice_control::source::file::{BackendDoc, ConfigDoc, ServiceDoc};
    use sluice_testkit::backend::Backend;
    let backend = Backend::start("b", Mode::EchoPeer).await.unwrap();
    let listen = SocketAddr::from((
        [127, 0, 0, 1],
        sluice_testkit::free_port([127, 0, 0, 1]).unwrap(),
    ));
    let config = ConfigDoc::from(ServiceDoc::new(
        "web",
        listen,
        vec![BackendDoc::ready(backend.addr)],
    ));
    let opts = Options {
        config: Some(config.to_yaml().unwrap()),
        args: ["--source-ip", "transparent"].map(String::from).to_vec(),
        ..Options::new(env!("CARGO_BIN_EXE_sluice"))
    };
    let sluice = Daemon::start(opts).await.unwrap();
    let (mut c, line) = sluice_testkit::backend::connect_named(listen)
        .await
        .unwrap();
    assert_eq!(line, "b 127.0.0.1");
    tokio::io::AsyncWriteExt::write_all(&mut c, b"ping\n")
        .await
        .unwrap();
    assert_eq!(
        sluice_testkit::backend::read_line(&mut c).await.unwrap(),
        "ping"
    );
    let (_, health) = http::get(sluice.health, "/healthz").await.unwrap();
    assert!(
        health.contains("transparent dials unavailable")
            && health.contains("needs --intercept nftables"),
        "{health}"
    );
    let m = sluice.scrape().await.unwrap();
    assert_eq!(
        metric(&m, "sluice_source_ip_node_total{reason=\"disabled\"}"),
        Some(1.0),
        "{m}"
    );
}

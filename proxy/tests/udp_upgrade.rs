//! UDP Services across a hand-over and a crash restart, with
//! `--intercept nftables` (issue 12): root, `ip`, `nft`, `dnsmasq`.
//!
//! ```text
//!   node: br0 10.244.0.1/24 (br_netfilter on when loaded); sluice
//!    |-- client pod 10.244.0.10  (4 resolvers, each keeping its source port)
//!    '-- dns pod    10.244.0.20  (dnsmasq: who.test -> 10.0.0.1)
//! ```
//!
//! `10.96.0.10:53/udp` is redirected by sluice's table to a local port of
//! the `udp-ports` map. The clients ask `who.test` back to back, each from
//! one connected socket (a fixed source port, as glibc's resolver), so
//! conntrack keeps steering each of them to the local port its first query
//! was redirected to.
//!
//! Every namespace and process made here is removed on drop, also when an
//! assertion fails; every wait is bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::ErrorKind;
use std::net::UdpSocket;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sluice_control::source::file::{BackendDoc, ConfigDoc, ServiceDoc};
use sluice_testkit::daemon::Signal;
use sluice_testkit::{Daemon, Options, netns};

const DNS_VIP: &str = "10.96.0.10:53";
const INTERCEPT_PORT: u16 = 10271;
/// Resolvers in the client pod (each its own source port: the
/// SO_REUSEPORT hash spreads them over the sockets of the group).
const RESOLVERS: usize = 4;

fn skip_reason() -> Option<String> {
    netns::unusable(&["ip", "nft", "dnsmasq"])
}

fn ns(tag: &str) -> netns::Netns {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    netns::Netns::new(format!("u-udpup-{tag}-{}-{n}", std::process::id())).unwrap()
}

/// A DNS query for `who.test` (type A) with `id`.
fn query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(b"\x03who\x04test\x00\x00\x01\x00\x01");
    q
}

/// What became of one query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Answered,
    /// ICMP port unreachable (no socket on the local port).
    Refused,
    /// No answer within 1 s.
    Lost,
}

/// Resolvers asking back to back until dropped: each query's send time
/// and outcome.
struct Resolvers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<(Instant, Outcome)>>>,
}

impl Resolvers {
    fn start(client: &netns::Netns, n: usize) -> Resolvers {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|i| {
                let name = client.name().to_owned();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    netns::enter(&name).unwrap();
                    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                    s.connect(DNS_VIP).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(100)))
                        .unwrap();
                    let mut out = Vec::new();
                    let mut id = (i as u16) << 12;
                    while !stop.load(Ordering::Relaxed) {
                        id = id.wrapping_add(1);
                        let sent = Instant::now();
                        let outcome = ask(&s, id);
                        out.push((sent, outcome));
                        // Back to back, with a pause only after a failure:
                        // a query is in flight almost always, so the old
                        // sluice has some when it stops.
                        if outcome != Outcome::Answered {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                    out
                })
            })
            .collect();
        Resolvers { stop, threads }
    }

    /// Stops them: every query's outcome, in send order.
    fn finish(mut self) -> Vec<(Instant, Outcome)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: Vec<_> = (self.threads.drain(..))
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort_by_key(|(at, _)| *at);
        all
    }
}

impl Drop for Resolvers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Sends query `id` on `s` and waits up to 1 s for its answer.
fn ask(s: &UdpSocket, id: u16) -> Outcome {
    if s.send(&query(id)).is_err() {
        return Outcome::Refused;
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        match s.recv(&mut buf) {
            Ok(n) if n >= 4 && buf[..2] == id.to_be_bytes() && buf[2] & 0x80 != 0 => {
                return Outcome::Answered;
            }
            Ok(_) => {} // an earlier query's late answer
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Outcome::Refused,
            Err(_) => {}
        }
    }
    Outcome::Lost
}

/// One query from a fresh socket, until answered (at most `within`).
fn until_answered(client: &netns::Netns, within: Duration) {
    let name = client.name().to_owned();
    let answered = netns::in_netns(&name, move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(DNS_VIP)?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        let start = Instant::now();
        let mut id = 0u16;
        while start.elapsed() < within {
            id += 1;
            if ask(&s, id) == Outcome::Answered {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(false)
    });
    assert!(
        answered.unwrap(),
        "{DNS_VIP} never answered within {within:?}"
    );
}

/// The local port the node's `udp-ports-v4` map has for the DNS VIP.
fn mapped_port(node: &netns::Netns) -> Option<u16> {
    let out = Command::new("ip")
        .args(["netns", "exec", node.name(), "nft", "list", "map"])
        .args(["inet", "sluice", "udp-ports-v4"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.find("10.96.0.10 . 53 : ")? + "10.96.0.10 . 53 : ".len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// UDP sockets bound on local `port` in `node` (`/proc/net/udp` of a
/// thread inside it: `/proc/net` is the process's namespace).
fn sockets_on(node: &netns::Netns, port: u16) -> usize {
    let name = node.name().to_owned();
    let text = netns::in_netns(&name, || {
        Ok(std::fs::read_to_string("/proc/thread-self/net/udp")?)
    })
    .unwrap();
    let want = format!(":{port:04X}");
    (text.lines().skip(1))
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|a| a.ends_with(&want))
        })
        .count()
}

/// Until `n` sockets are bound on `port` in `node` (at most 15 s; the
/// last sluice started, `by`, failed to bind it otherwise).
fn wait_sockets(node: &netns::Netns, port: u16, n: usize, by: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while sockets_on(node, port) < n {
        assert!(
            Instant::now() < deadline,
            "the new sluice never bound the port of the map ({port}); its log:\n{}",
            by.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start_sluice(node: &netns::Netns, config: &ConfigDoc) -> Daemon {
    let flags = [
        ["--intercept", "nftables"],
        ["--intercept-port", &INTERCEPT_PORT.to_string()],
        ["--workers", "1"],
    ];
    let opts = Options {
        prefix: node.exec_prefix(),
        config: Some(config.to_yaml().unwrap()),
        args: flags.concat().iter().map(|f| f.to_string()).collect(),
        log_filter: Some("sluice=debug,sluice_proxy=debug,info".into()),
        ..Options::new(env!("CARGO_BIN_EXE_sluice"))
    };
    Daemon::spawn(opts).unwrap()
}

/// Counts of each outcome.
fn count(outcomes: &[(Instant, Outcome)], which: Outcome) -> usize {
    outcomes.iter().filter(|(_, o)| *o == which).count()
}

#[tokio::test]
async fn the_udp_port_survives_a_hand_over_and_a_crash_restart() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let node = ns("node");
    let client = ns("client");
    let pod = ns("dns");
    node.bridge_pods(
        "10.244.0.1/24",
        &[(&client, "10.244.0.10"), (&pod, "10.244.0.20")],
        "vu",
    )
    .unwrap();
    let _dns = netns::Dnsmasq::start(&pod, "10.244.0.20", "who.test", "10.0.0.1").unwrap();
    let config = ConfigDoc::new(vec![
        ServiceDoc::new(
            "kube-system/kube-dns:dns",
            DNS_VIP.parse().unwrap(),
            vec![BackendDoc::ready("10.244.0.20:53".parse().unwrap())],
        )
        .udp(),
    ]);

    // A serves.
    let mut a = start_sluice(&node, &config);
    until_answered(&client, Duration::from_secs(15));
    let port = mapped_port(&node).expect("the DNS VIP is in udp-ports-v4");
    assert_eq!(sockets_on(&node, port), 1);

    // Hand-over: B starts with the same flags beside A, then A gets
    // SIGTERM, all under a steady query stream.
    let stream = Resolvers::start(&client, RESOLVERS);
    std::thread::sleep(Duration::from_millis(500));
    let b_started = Instant::now();
    let mut b = start_sluice(&node, &config);
    wait_sockets(&node, port, 2, &b);
    let b_bound = b_started.elapsed();
    // B's first nftables sync (a full one) has run too.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(mapped_port(&node), Some(port), "B rewrote the map");
    let term = b_started.elapsed();
    a.signal(Signal::SIGTERM).unwrap();
    let status = a.wait_exit(Duration::from_secs(15)).await.unwrap();
    let exited = b_started.elapsed();
    assert!(status.success(), "A's exit: {status:?}\n{}", a.log_tail(40));
    std::thread::sleep(Duration::from_millis(1000));
    let outcomes = stream.finish();
    let (answered, refused, lost) = (
        count(&outcomes, Outcome::Answered),
        count(&outcomes, Outcome::Refused),
        count(&outcomes, Outcome::Lost),
    );
    eprintln!("hand-over: {answered} queries answered, {refused} refused, {lost} lost");
    let failed: Vec<_> = (outcomes.iter())
        .filter(|(_, o)| *o != Outcome::Answered)
        .map(|(at, o)| (at.saturating_duration_since(b_started), o))
        .collect();
    eprintln!(
        "  from B's start: B bound the port at {b_bound:?}, A got SIGTERM at {term:?}, \
         exited at {exited:?}; failures sent at {failed:?}"
    );
    assert!(answered > 100, "the stream ran: {answered}");
    assert_eq!(
        (refused, lost),
        (0, 0),
        "queries failed across the hand-over; A's log:\n{}",
        a.log_tail(40)
    );
    assert_eq!(mapped_port(&node), Some(port), "the map element moved");
    assert_eq!(sockets_on(&node, port), 1, "A's socket is gone, B's stays");
    // A took its port out of the group and drained, rather than closing it.
    let log = a.log_tail(200);
    assert!(log.contains("UDP port handed over"), "A's log:\n{log}");

    // Crash: B is killed, C starts (as the kubelet restarts a container).
    let stream = Resolvers::start(&client, RESOLVERS);
    std::thread::sleep(Duration::from_millis(500));
    b.signal(Signal::SIGKILL).unwrap();
    b.wait_exit(Duration::from_secs(5)).await.unwrap();
    let killed = Instant::now();
    let c = start_sluice(&node, &config);
    wait_sockets(&node, port, 1, &c);
    let bound = killed.elapsed();
    std::thread::sleep(Duration::from_millis(1500));
    let outcomes = stream.finish();
    let failed: Vec<_> = (outcomes.iter())
        .filter(|(_, o)| *o != Outcome::Answered)
        .collect();
    let after = |at: Instant| at.saturating_duration_since(killed);
    let back = (outcomes.iter())
        .find(|(at, o)| *at > killed && *o == Outcome::Answered)
        .map(|(at, _)| after(*at));
    eprintln!(
        "crash restart: C bound the port {bound:?} after the kill; first answer {back:?} after; \
         {} failed ({} refused, {} lost), the last sent {:?} after the kill",
        failed.len(),
        count(&outcomes, Outcome::Refused),
        count(&outcomes, Outcome::Lost),
        failed.last().map(|(at, _)| after(*at)),
    );
    let back = back.expect("queries are answered again after the restart");
    assert!(back < Duration::from_secs(10), "{back:?}");
    // Nothing fails once C serves the port (a query sent before it bound
    // may still be refused).
    let late: Vec<_> = (failed.iter())
        .filter(|(at, _)| after(*at) > bound + Duration::from_millis(100))
        .collect();
    assert!(late.is_empty(), "failures after C bound the port: {late:?}");
    assert_eq!(mapped_port(&node), Some(port), "C moved the map element");
}

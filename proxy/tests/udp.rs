//! UDP Services end to end: the real `sluice` binary on a file config,
//! between real UDP clients and backends on loopback (no root needed), and
//! a netns mini node where `dig` asks two `dnsmasq` "pods" through sluice
//! (root, `ip`, `dnsmasq` and `dig`; skipped with a message otherwise).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sluice_control::source::file::{BackendDoc, ConfigDoc, ServiceDoc};
use sluice_testkit::{Daemon, Options, metric};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

const T: Duration = Duration::from_secs(5);

/// A free UDP port on 127.0.0.1 (bound, then released).
fn free_udp() -> SocketAddr {
    StdUdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A UDP backend named `name`: answers each datagram with `name:` and the
/// payload (or, for payloads over 65,000 bytes, the payload alone, so that
/// the largest datagram fits back), unless `silent`. Counts what it got.
struct UdpBackend {
    addr: SocketAddr,
    received: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl UdpBackend {
    async fn start(name: &'static str, silent: bool) -> UdpBackend {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let count = received.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                count.fetch_add(1, Ordering::Relaxed);
                if silent {
                    continue;
                }
                let reply = if n > 65_000 {
                    buf[..n].to_vec()
                } else {
                    [format!("{name}:").as_bytes(), &buf[..n]].concat()
                };
                let _ = socket.send_to(&reply, from).await;
            }
        });
        UdpBackend {
            addr,
            received,
            task,
        }
    }

    fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A UDP Service `dns` on `listen` over `backends`.
fn service(listen: SocketAddr, backends: &[SocketAddr]) -> ServiceDoc {
    let backends = backends.iter().map(|a| BackendDoc::ready(*a)).collect();
    ServiceDoc::new("dns", listen, backends).udp()
}

async fn start(config: impl Into<ConfigDoc>, extra: &[&str]) -> Daemon {
    let args = ["--config-poll-interval", "100ms"].iter().chain(extra);
    let opts = Options {
        config: Some(config.into().to_yaml().unwrap()),
        args: args.map(|a| a.to_string()).collect(),
        log_filter: Some("info".into()),
        ..Options::new(env!("CARGO_BIN_EXE_sluice"))
    };
    Daemon::start(opts).await.unwrap()
}

/// Replaces the config and waits until its table is live.
async fn reload(s: &mut Daemon, config: impl Into<ConfigDoc>) {
    s.reload_and_wait(&config.into().to_yaml().unwrap())
        .await
        .unwrap();
}

async fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

/// Sends `payload` to `to` and waits (at most `within`) for one datagram:
/// its payload and where it came from.
async fn ask(
    c: &UdpSocket,
    to: SocketAddr,
    payload: &[u8],
    within: Duration,
) -> Option<(Vec<u8>, SocketAddr)> {
    c.send_to(payload, to).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    match tokio::time::timeout(within, c.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => Some((buf[..n].to_vec(), from)),
        _ => None,
    }
}

/// `ask` until an answer comes (the UDP socket is bound shortly after the
/// table goes live); the answer as text.
async fn ask_until_answered(c: &UdpSocket, to: SocketAddr, payload: &str) -> String {
    let deadline = Instant::now() + T;
    loop {
        if let Some((got, from)) = ask(c, to, payload.as_bytes(), Duration::from_millis(200)).await
        {
            assert_eq!(from, to, "the reply must come from the Service address");
            return String::from_utf8(got).unwrap();
        }
        assert!(Instant::now() < deadline, "{to} never answered");
    }
}

/// Waits until `series` satisfies `ok`; the metrics text.
async fn wait_metric(s: &Daemon, series: &str, ok: impl Fn(f64) -> bool) -> String {
    let deadline = Instant::now() + T;
    loop {
        let text = s.scrape().await.unwrap();
        if ok(metric(&text, series).unwrap_or(0.0)) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never reached the expected value:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn name_of(answer: &str) -> &str {
    answer.split(':').next().unwrap()
}

#[tokio::test]
async fn forwards_both_ways_from_the_service_address() {
    let a = UdpBackend::start("a", false).await;
    let b = UdpBackend::start("b", false).await;
    let listen = free_udp();
    let s = start(service(listen, &[a.addr, b.addr]), &[]).await;
    let c1 = client().await;
    let first = ask_until_answered(&c1, listen, "q1").await;
    assert!(first.ends_with(":q1"), "{first}");
    // A flow sticks to its backend.
    for i in 0..5 {
        let got = ask(&c1, listen, format!("x{i}").as_bytes(), T)
            .await
            .unwrap();
        assert_eq!(got.1, listen);
        let got = String::from_utf8(got.0).unwrap();
        assert_eq!(name_of(&got), name_of(&first), "{got}");
    }
    // Other clients are spread over both backends (round robin).
    let mut names = HashSet::new();
    for _ in 0..4 {
        let c = client().await;
        let got = ask(&c, listen, b"hi", T).await.unwrap();
        names.insert(String::from_utf8(got.0).unwrap());
    }
    assert_eq!(names, HashSet::from(["a:hi".into(), "b:hi".into()]));
    let text = wait_metric(&s, r#"sluice_udp_flows{service="dns"}"#, |v| v == 5.0).await;
    let up = r#"sluice_udp_datagrams_total{service="dns",direction="client_to_backend"}"#;
    let down = r#"sluice_udp_datagrams_total{service="dns",direction="backend_to_client"}"#;
    assert!(metric(&text, up).unwrap() >= 10.0, "{text}");
    assert!(metric(&text, down).unwrap() >= 10.0, "{text}");
    let bytes = r#"sluice_udp_bytes_total{service="dns",direction="client_to_backend"}"#;
    assert!(metric(&text, bytes).unwrap() >= 20.0, "{text}");
}

#[tokio::test]
async fn idle_flows_expire_at_the_service_timeout() {
    let a = UdpBackend::start("a", false).await;
    let listen = free_udp();
    let s = start(service(listen, &[a.addr]).with_udp_timeout(1), &[]).await;
    let c = client().await;
    ask_until_answered(&c, listen, "q").await;
    wait_metric(&s, r#"sluice_udp_flows{service="dns"}"#, |v| v == 1.0).await;
    let start = Instant::now();
    let idle = r#"sluice_udp_flows_ended_total{service="dns",reason="idle"}"#;
    let text = wait_metric(&s, idle, |v| v == 1.0).await;
    assert!(
        start.elapsed() >= Duration::from_millis(700),
        "expired too early"
    );
    assert_eq!(
        metric(&text, r#"sluice_udp_flows{service="dns"}"#),
        Some(0.0)
    );
    // The client is served again, by a new flow.
    assert_eq!(ask_until_answered(&c, listen, "again").await, "a:again");
}

#[tokio::test]
async fn a_source_port_flood_is_bounded_and_counted() {
    let a = UdpBackend::start("a", false).await;
    let listen = free_udp();
    let s = start(service(listen, &[a.addr]), &["--udp-max-flows", "40"]).await;
    let kept = client().await;
    ask_until_answered(&kept, listen, "first").await;
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", s.pid()))
            .unwrap()
            .count()
    };
    let before = fds();
    // 200 new source ports, one datagram each.
    let mut flood = Vec::new();
    for _ in 0..200 {
        let c = client().await;
        c.send_to(b"flood", listen).await.unwrap();
        flood.push(c);
    }
    let dropped = r#"sluice_udp_dropped_datagrams_total{service="dns",reason="flow_limit"}"#;
    let text = wait_metric(&s, dropped, |v| v >= 160.0).await;
    assert_eq!(
        metric(&text, r#"sluice_udp_flows{service="dns"}"#),
        Some(40.0)
    );
    assert!(
        fds() <= before + 40,
        "descriptors grew past the bound: {before} -> {}",
        fds()
    );
    // The existing flow is still served, and sluice is alive.
    let got = ask(&kept, listen, b"still", T).await.unwrap();
    assert_eq!(got.0, b"a:still");
}

#[tokio::test]
async fn a_removed_backend_closes_its_flows() {
    let a = UdpBackend::start("a", false).await;
    let b = UdpBackend::start("b", false).await;
    let listen = free_udp();
    let mut s = start(service(listen, &[a.addr]), &[]).await;
    let c = client().await;
    assert_eq!(ask_until_answered(&c, listen, "q").await, "a:q");
    reload(&mut s, service(listen, &[b.addr])).await;
    let gone = r#"sluice_udp_flows_ended_total{service="dns",reason="backend_gone"}"#;
    wait_metric(&s, gone, |v| v == 1.0).await;
    // The same client's next datagram goes to the backend that is left.
    assert_eq!(ask(&c, listen, b"q2", T).await.unwrap().0, b"b:q2");
}

#[tokio::test]
async fn an_unanswered_datagram_follows_its_backend_leaving() {
    // The backend takes the query and vanishes from the table before it
    // answers: the query is re-sent to the backend that is left, and the
    // client gets its answer without sending again.
    let silent = UdpBackend::start("silent", true).await;
    let b = UdpBackend::start("b", false).await;
    let listen = free_udp();
    let mut s = start(service(listen, &[silent.addr]), &[]).await;
    let c = client().await;
    let deadline = Instant::now() + T;
    while silent.received() == 0 {
        c.send_to(b"warmup", listen).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            Instant::now() < deadline,
            "the query never reached the backend"
        );
    }
    let c = client().await;
    c.send_to(b"q", listen).await.unwrap();
    let deadline = Instant::now() + T;
    while silent.received() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(Instant::now() < deadline);
    }
    reload(&mut s, service(listen, &[b.addr])).await;
    let mut buf = [0u8; 64];
    let (n, from) = tokio::time::timeout(T, c.recv_from(&mut buf))
        .await
        .expect("the query was lost with its backend")
        .unwrap();
    assert_eq!((&buf[..n], from), (&b"b:q"[..], listen));
    let resent = r#"sluice_udp_resent_datagrams_total{service="dns"}"#;
    wait_metric(&s, resent, |v| v >= 1.0).await;
}

#[tokio::test]
async fn icmp_unreachable_is_retried_on_another_backend() {
    let a = UdpBackend::start("a", false).await;
    // Nothing listens there: the kernel answers ICMP port unreachable.
    let dead = free_udp();
    let listen = free_udp();
    // Round robin puts every other new flow on the dead backend first.
    let s = start(service(listen, &[dead, a.addr]), &[]).await;
    let warm = client().await;
    ask_until_answered(&warm, listen, "w").await;
    for i in 0..6 {
        let c = client().await;
        let q = format!("q{i}");
        let got = ask(&c, listen, q.as_bytes(), T)
            .await
            .unwrap_or_else(|| panic!("query {q} got no answer"));
        assert_eq!(got, (format!("a:{q}").into_bytes(), listen));
    }
    let text = wait_metric(
        &s,
        r#"sluice_udp_resent_datagrams_total{service="dns"}"#,
        |v| v >= 1.0,
    )
    .await;
    let ejected = format!(r#"sluice_backend_ejections_total{{backend="{dead}"}}"#);
    assert_eq!(metric(&text, &ejected), Some(1.0), "{text}");
}

#[tokio::test]
async fn flows_pinned_to_an_ejected_backend_move_before_their_next_datagram() {
    // Backend a on a port this test can take again: first an echo server,
    // then closed (ICMP port unreachable), then a black hole (a socket that
    // never reads: no answer and no ICMP, like a deleted pod).
    let a_addr = free_udp();
    let a = UdpSocket::bind(a_addr).await.unwrap();
    let a_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = a.recv_from(&mut buf).await {
            let _ = a.send_to(&[b"a:", &buf[..n]].concat(), from).await;
        }
    });
    let b = UdpBackend::start("b", false).await;
    let listen = free_udp();
    let s = start(
        service(listen, &[a_addr, b.addr]),
        &["--eject-cooldown", "30s"],
    )
    .await;
    // Round robin: every other new flow is pinned to a.
    let mut on_a = Vec::new();
    for i in 0..4 {
        let c = client().await;
        if name_of(&ask_until_answered(&c, listen, &format!("w{i}")).await) == "a" {
            on_a.push(c);
        }
    }
    assert!(on_a.len() >= 2, "expected two flows pinned to a");
    a_task.abort();
    let _ = a_task.await; // the echo socket is closed
    // The first flow finds a unreachable: a is ejected, the datagram re-sent.
    let got = ask(&on_a[0], listen, b"x", T)
        .await
        .expect("x got no answer");
    assert_eq!(got, (b"b:x".to_vec(), listen));
    let ejected = format!(r#"sluice_backend_ejections_total{{backend="{a_addr}"}}"#);
    wait_metric(&s, &ejected, |v| v == 1.0).await;
    // a's address now swallows datagrams. The second flow, still pinned to
    // a, must move to b at its next datagram rather than send it there.
    let hole = StdUdpSocket::bind(a_addr).unwrap();
    hole.set_nonblocking(true).unwrap();
    let got = ask(&on_a[1], listen, b"y", T)
        .await
        .expect("y was sent into the black hole");
    assert_eq!(got, (b"b:y".to_vec(), listen));
    let mut buf = [0u8; 64];
    assert!(
        hole.recv_from(&mut buf).is_err(),
        "a datagram reached the ejected backend"
    );
    // Only x was sent twice; y went to b first.
    let text = s.scrape().await.unwrap();
    let resent = r#"sluice_udp_resent_datagrams_total{service="dns"}"#;
    assert_eq!(metric(&text, resent), Some(1.0), "{text}");
}

/// Asks from new client sockets until `want` of them are answered by the
/// backend named `name` (round robin spreads new flows); those clients.
/// A client that gets no answer within 500 ms is passed over (it may be
/// pinned to a silent backend, or sluice not serving yet).
async fn clients_on(listen: SocketAddr, name: &str, want: usize) -> Vec<UdpSocket> {
    let mut on = Vec::new();
    let deadline = Instant::now() + T;
    for i in 0.. {
        assert!(
            Instant::now() < deadline,
            "fewer than {want} new flows went to {name}"
        );
        let c = client().await;
        let wait = Duration::from_millis(500);
        let Some((got, from)) = ask(&c, listen, format!("w{i}").as_bytes(), wait).await else {
            continue;
        };
        assert_eq!(from, listen, "the reply must come from the Service address");
        if name_of(&String::from_utf8(got).unwrap()) == name {
            on.push(c);
            if on.len() == want {
                break;
            }
        }
    }
    on
}

#[tokio::test]
async fn a_silent_backend_is_answered_around_within_the_resend_deadline() {
    // A black hole (takes datagrams, never answers, no ICMP: a deleted
    // pod) next to a live backend, on a Service with re-send on. Every
    // query must be answered within a 1 s client timeout (far below a
    // resolver's 5 s retry) although the table never changes.
    let silent = UdpBackend::start("silent", true).await;
    let b = UdpBackend::start("b", false).await;
    let listen = free_udp();
    let s = start(
        service(listen, &[silent.addr, b.addr]).with_udp_resend(true),
        &["--udp-resend-after", "200ms", "--eject-cooldown", "30s"],
    )
    .await;
    ask_until_answered(&client().await, listen, "warm").await;
    for i in 0..6 {
        let c = client().await;
        let q = format!("q{i}");
        let got = ask(&c, listen, q.as_bytes(), Duration::from_secs(1))
            .await
            .unwrap_or_else(|| panic!("query {q} was lost in the black hole"));
        assert_eq!(got, (format!("b:{q}").into_bytes(), listen));
    }
    assert!(silent.received() >= 2, "no flow was sent to the black hole");
    let resent = r#"sluice_udp_resent_datagrams_total{service="dns"}"#;
    let ejected = format!(
        r#"sluice_backend_ejections_total{{backend="{}"}}"#,
        silent.addr
    );
    let text = wait_metric(&s, &ejected, |v| v == 1.0).await;
    assert!(metric(&text, resent).unwrap() >= 2.0, "{text}");
    // Ejected: new flows no longer go there, and are answered at once.
    let before = silent.received();
    for i in 0..4 {
        let c = client().await;
        let got = ask(
            &c,
            listen,
            format!("n{i}").as_bytes(),
            Duration::from_secs(1),
        )
        .await;
        assert_eq!(got.unwrap().0, format!("b:n{i}").into_bytes());
    }
    assert_eq!(
        silent.received(),
        before,
        "a new flow went to the ejected backend"
    );
}

#[tokio::test]
async fn a_slow_answer_is_resent_but_a_backend_that_answers_others_is_not_ejected() {
    // Backend a answers `slow*` after 1.5 s and the rest at once (a
    // resolver forwarding one name upstream); b answers everything.
    let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let a_addr = a.local_addr().unwrap();
    let a = Arc::new(a);
    let a_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = a.recv_from(&mut buf).await {
            let reply = [b"a:", &buf[..n]].concat();
            let a = a.clone();
            let delay = if reply.starts_with(b"a:slow") {
                1500
            } else {
                0
            };
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let _ = a.send_to(&reply, from).await;
            });
        }
    });
    let b = UdpBackend::start("b", false).await;
    let listen = free_udp();
    let s = start(
        service(listen, &[a_addr, b.addr]).with_udp_resend(true),
        &["--udp-resend-after", "300ms"],
    )
    .await;
    let on_a = clients_on(listen, "a", 3).await;
    // Two slow queries (two misses for a), then a fast one a answers at
    // once: a is alive, only slow.
    on_a[0].send_to(b"slow1", listen).await.unwrap();
    on_a[1].send_to(b"slow2", listen).await.unwrap();
    let fast = ask(&on_a[2], listen, b"fast", T).await.unwrap();
    assert_eq!(fast.0, b"a:fast");
    // Both slow queries are answered by b after the re-send deadline.
    for (c, q) in [(&on_a[0], "slow1"), (&on_a[1], "slow2")] {
        let mut buf = [0u8; 64];
        let (n, from) = tokio::time::timeout(Duration::from_secs(1), c.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{q} was not re-sent"))
            .unwrap();
        assert_eq!((&buf[..n], from), (format!("b:{q}").as_bytes(), listen));
    }
    let text = wait_metric(
        &s,
        r#"sluice_udp_resent_datagrams_total{service="dns"}"#,
        |v| v == 2.0,
    )
    .await;
    let ejected = format!(r#"sluice_backend_ejections_total{{backend="{a_addr}"}}"#);
    assert_eq!(metric(&text, &ejected).unwrap_or(0.0), 0.0, "{text}");
    a_task.abort();
}

#[tokio::test]
async fn a_service_without_resend_gets_no_duplicates() {
    // Not port 53 and no `udpResend`: re-send is off, so a datagram the
    // backend leaves unanswered is sent exactly once (a UDP protocol that
    // is not idempotent, statsd say, must not see it twice).
    let silent = UdpBackend::start("silent", true).await;
    let b = UdpBackend::start("b", false).await;
    let listen = free_udp();
    let s = start(
        service(listen, &[silent.addr, b.addr]),
        &["--udp-resend-after", "100ms"],
    )
    .await;
    // Served yet? (A new client each try: one pinned to the silent
    // backend would never be answered.)
    clients_on(listen, "b", 1).await;
    let (before_silent, before_b) = (silent.received(), b.received());
    let mut lost = 0;
    for i in 0..6 {
        let c = client().await;
        if ask(
            &c,
            listen,
            format!("q{i}").as_bytes(),
            Duration::from_millis(500),
        )
        .await
        .is_none()
        {
            lost += 1;
        }
    }
    // Round robin: half the new flows went to the silent backend and their
    // queries were lost; none was sent twice.
    assert!(lost >= 2, "expected queries lost in the black hole: {lost}");
    assert_eq!(silent.received() - before_silent, lost);
    assert_eq!(b.received() - before_b, 6 - lost);
    let text = s.scrape().await.unwrap();
    let resent = r#"sluice_udp_resent_datagrams_total{service="dns"}"#;
    assert_eq!(metric(&text, resent).unwrap_or(0.0), 0.0, "{text}");
}

#[tokio::test]
async fn empty_odd_and_largest_datagrams_pass_without_harm() {
    let a = UdpBackend::start("a", false).await;
    let listen = free_udp();
    let s = start(service(listen, &[a.addr]), &[]).await;
    let c = client().await;
    ask_until_answered(&c, listen, "hello").await;
    // Zero-length, binary junk, the largest IPv4 UDP payload.
    let got = ask(&c, listen, b"", T).await.unwrap();
    assert_eq!(got.0, b"a:");
    let junk: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let got = ask(&c, listen, &junk, T).await.unwrap();
    assert_eq!(got.0, [&b"a:"[..], &junk].concat());
    let largest: Vec<u8> = (0..65_507u32).map(|i| (i % 251) as u8).collect();
    let got = ask(&c, listen, &largest, T).await.unwrap();
    assert_eq!(got.0.len(), 65_507);
    assert_eq!(got.0, largest);
    // A datagram over the limit cannot even be sent; sluice is unaffected.
    let too_big = vec![0u8; 65_508];
    assert!(c.send_to(&too_big, listen).await.is_err());
    assert_eq!(ask(&c, listen, b"after", T).await.unwrap().0, b"a:after");
    let text = s.scrape().await.unwrap();
    let bytes = r#"sluice_udp_bytes_total{service="dns",direction="backend_to_client"}"#;
    assert!(metric(&text, bytes).unwrap() >= 65_507.0, "{text}");
}

#[tokio::test]
async fn a_burst_of_new_and_known_flows_and_largest_datagrams_is_all_answered() {
    // sluice reads queued datagrams with recvmmsg batches and sends
    // replies with sendmmsg: a burst sent at once mixes, within batches,
    // datagrams of a known flow, of new flows and of the largest size.
    // Every one is answered, by the known flow's backend for the known
    // flow, and nothing is counted as dropped.
    let a = UdpBackend::start("a", false).await;
    let b = UdpBackend::start("b", false).await;
    let listen = free_udp();
    let s = start(service(listen, &[a.addr, b.addr]), &[]).await;
    let known = client().await;
    let first = ask_until_answered(&known, listen, "q").await;
    let pinned = name_of(&first).to_string();
    // What the known flow's first exchange counted (one datagram each way,
    // or more if `ask_until_answered` had to ask again).
    let up = r#"sluice_udp_datagrams_total{service="dns",direction="client_to_backend"}"#;
    let down = r#"sluice_udp_datagrams_total{service="dns",direction="backend_to_client"}"#;
    let text = wait_metric(&s, down, |v| v >= 1.0).await;
    let (up0, down0) = (metric(&text, up).unwrap(), metric(&text, down).unwrap());
    let largest: Vec<u8> = (0..65_507u32).map(|i| (i % 251) as u8).collect();
    let new: Vec<UdpSocket> = futures_util::future::join_all((0..8).map(|_| client())).await;
    for round in 0..3 {
        for (i, c) in new.iter().enumerate() {
            // One largest datagram in the middle of the burst (more could
            // overflow a default socket buffer on the way, sluice's or not).
            let payload = match (round, i) {
                (1, 0) => largest.clone(),
                _ => format!("n{round}.{i}").into_bytes(),
            };
            c.send_to(&payload, listen).await.unwrap();
            known
                .send_to(format!("k{round}.{i}").as_bytes(), listen)
                .await
                .unwrap();
        }
    }
    let mut buf = vec![0u8; 65_536];
    for round in 0..3 {
        for i in 0..new.len() {
            let (n, from) = tokio::time::timeout(T, known.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(from, listen);
            let got = String::from_utf8(buf[..n].to_vec()).unwrap();
            assert_eq!(
                got,
                format!("{pinned}:k{round}.{i}"),
                "a known flow stays on its backend"
            );
        }
    }
    for (i, c) in new.iter().enumerate() {
        for round in 0..3 {
            let (n, from) = tokio::time::timeout(T, c.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(from, listen);
            if (round, i) == (1, 0) {
                assert_eq!(&buf[..n], &largest[..]);
            } else {
                let got = std::str::from_utf8(&buf[..n]).unwrap();
                assert!(got.ends_with(&format!(":n{round}.{i}")), "{got}");
            }
        }
    }
    let text = wait_metric(&s, r#"sluice_udp_flows{service="dns"}"#, |v| v == 9.0).await;
    assert_eq!(metric(&text, up), Some(up0 + 48.0), "{text}");
    assert_eq!(metric(&text, down), Some(down0 + 48.0), "{text}");
    assert!(
        !text.contains("sluice_udp_dropped_datagrams_total{"),
        "{text}"
    );
}

#[tokio::test]
async fn tcp_and_udp_share_a_port() {
    use sluice_testkit::backend::{Backend, Mode, connect_named};
    let tcp = Backend::start("t", Mode::Echo).await.unwrap();
    let udp = UdpBackend::start("u", false).await;
    let listen = SocketAddr::new(
        [127, 0, 0, 1].into(),
        sluice_testkit::free_port([127, 0, 0, 1]).unwrap(),
    );
    let tcp_svc = ServiceDoc::new("dns-tcp", listen, vec![BackendDoc::ready(tcp.addr)]);
    let config = ConfigDoc::new(vec![service(listen, &[udp.addr]), tcp_svc]);
    let _s = start(config, &[]).await;
    let c = client().await;
    assert_eq!(ask_until_answered(&c, listen, "q").await, "u:q");
    let (_stream, name) = connect_named(listen).await.unwrap();
    assert_eq!(name, "t");
}

/// The netns mini node for cluster DNS:
///
/// ```text
///   node: br0 10.244.0.1/24 (br_netfilter on when loaded), 10.96.0.10/32 on lo
///    |-- client pod 10.244.0.10  (dig)
///    |-- dns pod a  10.244.0.20  (dnsmasq: who.test -> 10.0.0.1)
///    '-- dns pod b  10.244.0.21  (dnsmasq: who.test -> 10.0.0.2)
/// ```
///
/// sluice runs in the node with the file source: `10.96.0.10:53` over UDP
/// and over TCP, both to the two pods.
mod dns {
    use std::os::unix::fs::MetadataExt as _;
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use sluice_control::source::file::{BackendDoc, ConfigDoc, ServiceDoc};
    use sluice_testkit::{Daemon, Options, netns};

    const DNS_VIP: &str = "10.96.0.10";

    fn skip_reason() -> Option<String> {
        if !std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
            return Some("not root".into());
        }
        for (tool, arg) in [("ip", "-V"), ("dnsmasq", "--version"), ("dig", "-v")] {
            let found = Command::new(tool)
                .arg(arg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok();
            if !found {
                return Some(format!(
                    "`{tool}` is not installed (apt-get install dnsmasq-base bind9-dnsutils)"
                ));
            }
        }
        None
    }

    fn ns(tag: &str) -> netns::Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        netns::Netns::new(format!("sluice-c-dns-{tag}-{}-{n}", std::process::id())).unwrap()
    }

    /// `dig @VIP who.test` from `client` (over TCP with `tcp`): the answer
    /// (`None`: no answer within 1 s).
    fn dig(client: &netns::Netns, tcp: bool) -> Option<String> {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            client.name(),
            "dig",
            "+short",
            "+time=1",
            "+tries=1",
        ]);
        if tcp {
            cmd.arg("+tcp");
        }
        let out = cmd
            .arg(format!("@{DNS_VIP}"))
            .arg("who.test")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !text.is_empty() && !text.starts_with(';')).then_some(text)
    }

    #[tokio::test]
    async fn dig_through_sluice_over_udp_and_tcp_and_a_dns_pod_going_away() {
        if let Some(why) = skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
        let node = ns("node");
        let client = ns("client");
        let pod_a = ns("a");
        let pod_b = ns("b");
        node.bridge_pods(
            "10.244.0.1/24",
            &[
                (&client, "10.244.0.10"),
                (&pod_a, "10.244.0.20"),
                (&pod_b, "10.244.0.21"),
            ],
            "vc",
        )
        .unwrap();
        node.ip(&["addr", "add", &format!("{DNS_VIP}/32"), "dev", "lo"])
            .unwrap();
        let mut a =
            Some(netns::Dnsmasq::start(&pod_a, "10.244.0.20", "who.test", "10.0.0.1").unwrap());
        let _b = netns::Dnsmasq::start(&pod_b, "10.244.0.21", "who.test", "10.0.0.2").unwrap();
        let listen = format!("{DNS_VIP}:53").parse().unwrap();
        let backends = || {
            ["10.244.0.20:53", "10.244.0.21:53"]
                .map(|a| BackendDoc::ready(a.parse().unwrap()))
                .to_vec()
        };
        let config = ConfigDoc::new(vec![
            ServiceDoc::new("kube-system/kube-dns:dns", listen, backends()).udp(),
            ServiceDoc::new("kube-system/kube-dns:dns-tcp", listen, backends()),
        ]);
        let opts = Options {
            prefix: node.exec_prefix(),
            config: Some(config.to_yaml().unwrap()),
            log_filter: Some("sluice_proxy=debug,info".into()),
            ..Options::new(env!("CARGO_BIN_EXE_sluice"))
        };
        let _sluice = Daemon::spawn(opts).unwrap();
        // Until sluice and both dnsmasq answer (bounded).
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = std::collections::HashSet::new();
        while seen.len() < 2 {
            assert!(
                Instant::now() < deadline,
                "dig over UDP through sluice: answers seen so far {seen:?}"
            );
            if let Some(answer) = dig(&client, false) {
                seen.insert(answer);
            }
        }
        assert_eq!(seen, ["10.0.0.1", "10.0.0.2"].map(String::from).into());
        // Over TCP, the same Service IP and port.
        let deadline = Instant::now() + Duration::from_secs(10);
        let answer = loop {
            if let Some(answer) = dig(&client, true) {
                break answer;
            }
            assert!(
                Instant::now() < deadline,
                "dig +tcp through sluice never answered"
            );
        };
        assert!(answer == "10.0.0.1" || answer == "10.0.0.2", "{answer}");
        // Pod a's dnsmasq dies (its namespace lives: ICMP port unreachable),
        // the table still lists it: every query is still answered, by b.
        drop(a.take());
        for i in 0..10 {
            assert_eq!(
                dig(&client, false).as_deref(),
                Some("10.0.0.2"),
                "query {i} after pod a's server died"
            );
        }
        drop((pod_a, pod_b, client, node));
    }
}

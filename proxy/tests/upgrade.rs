//! Upgrading or restarting sluice (issue 14), root and network namespaces.
//!
//! The first two run `sluice_testkit::upgrade` (also `sluice-bench
//! upgrade`): a mini node whose pod reaches a ClusterIP through sluice's
//! nftables table, a storm of short connections plus [`STREAMS`] long-lived
//! streams carrying data both ways, every byte checked.
//!
//! - `sigterm_hands_over_without_a_client_error`: sluice A serves, B starts
//!   beside it, A gets SIGTERM: no short connection fails, every stream
//!   ends cleanly with every byte checked, A exits once its streams end.
//! - `sigkill_costs_connections_until_the_next_sluice_listens`: the
//!   comparison: A is killed, B starts after it (as the kubelet restarts a
//!   crashed container): what fails, and for how long.
//! - `a_closed_listener_hands_its_queue_over_only_with_tcp_migrate_req`:
//!   the kernel mechanism the hand-over relies on, measured both ways.
//! - `bind_mode_keeps_service_ips_until_the_first_table`: a restart in bind
//!   mode leaves the Service IPs on their device while the source has not
//!   answered yet.
//! - `a_connection_outliving_the_grace_is_cut_counted_and_logged`: what a
//!   connection open past `--shutdown-grace` sees (a reset) and what the
//!   operator sees (a log line with its age; no namespace needed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_control::source::file::{BackendDoc, ConfigDoc, ServiceDoc};
use sluice_testkit::daemon::{Daemon, Options, Signal};
use sluice_testkit::metric;
use sluice_testkit::netns::{self, Netns};
use sluice_testkit::upgrade::{self, CHUNK, MiniNode, Replace, Report, Scenario, echo_backend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const STREAMS: usize = 24;

fn skip_reason() -> Option<String> {
    netns::unusable(&["ip", "nft", "sysctl"])
}

fn config(backends: &[SocketAddr]) -> Result<String, String> {
    let backends = backends.iter().map(|a| BackendDoc::ready(*a)).collect();
    let vip = upgrade::VIP.parse().map_err(|e| format!("{e}"))?;
    let doc: ConfigDoc = ServiceDoc::new(upgrade::SERVICE, vip, backends).into();
    doc.to_yaml().map_err(|e| e.to_string())
}

fn scenario(tag: &str, replace: Replace, migrate_req: bool) -> Report {
    upgrade::run(&Scenario {
        sluice: env!("CARGO_BIN_EXE_sluice").into(),
        replace,
        streams: STREAMS,
        clients: 4,
        migrate_req,
        tag: tag.into(),
        config,
    })
    .unwrap()
}

#[test]
fn sigterm_hands_over_without_a_client_error() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let report = scenario("term", Replace::HandOver, true);
    eprintln!(
        "hand-over: {} short connections ok, {} failed {:?}; streams {:?}",
        report.short_ok,
        report.short_failed.len(),
        report.short_failed.iter().take(5).collect::<Vec<_>>(),
        report.streams
    );
    let log = &report.old_log;
    assert!(report.short_ok > 100, "the storm ran: {}", report.short_ok);
    assert!(
        report.short_failed.is_empty(),
        "short connections failed across the hand-over: {:?}",
        report.short_failed
    );
    assert_eq!(report.streams.len(), STREAMS);
    for (i, s) in report.streams.iter().enumerate() {
        let bytes = s.as_ref().unwrap_or_else(|e| panic!("stream {i}: {e}"));
        assert!(
            *bytes >= 10 * CHUNK as u64,
            "stream {i} carried {bytes} bytes"
        );
    }
    assert!(
        report.old_drained,
        "A drains its streams, it does not exit at once\n{log}"
    );
    assert_eq!(report.old_exit_code, Some(0), "A's exit\n{log}");
    assert!(!report.old_cut, "A cut connections:\n{log}");
    assert!(report.new_accepted > 0.0, "B took the new connections");
    assert!(report.table_kept, "A left the nftables table to B");
}

#[test]
fn sigkill_costs_connections_until_the_next_sluice_listens() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let report = scenario("kill", Replace::Kill, true);
    let window = report.failure_window();
    let (killed_at, ready_at) = (report.replaced_at, report.new_ready_at);
    eprintln!(
        "crash: killed at {killed_at:.3}s, next sluice ready at {ready_at:.3}s; \
         {} short connections ok, {} failed, failures from {:?} to {:?}; \
         {} of {STREAMS} streams broken; failures by kind {:?}",
        report.short_ok,
        report.short_failed.len(),
        window.map(|w| w.0),
        window.map(|w| w.1),
        report.broken_streams(),
        report.failures_by_kind(),
    );
    // A userspace proxy's connections die with it.
    assert_eq!(report.broken_streams(), STREAMS, "{:?}", report.streams);
    // What fails is the crash window, nothing after the next sluice is
    // ready (the table stayed; it adopts it).
    let late: Vec<_> = report
        .short_failed
        .iter()
        .filter(|f| f.0 > ready_at + 0.2 || f.0 + 0.2 < killed_at)
        .collect();
    assert!(
        late.is_empty(),
        "failures outside the crash window: {late:?}"
    );
    assert!(report.short_ok > 100, "the storm ran: {}", report.short_ok);
    assert!(report.table_kept, "the nftables table survived the crash");
}

/// Two listeners in one SO_REUSEPORT group (as an old and a new sluice),
/// `CONNECTIONS` connections queued (handshake done, none accepted), the
/// first listener closed: how many of them the second one gets.
fn queued_connections_after_close(migrate_req: bool) -> (usize, usize) {
    const CONNECTIONS: usize = 64;
    let tag = if migrate_req { "mig1" } else { "mig0" };
    let mini = MiniNode::build(tag, migrate_req).unwrap();
    mini.node
        .block_on(Duration::from_secs(30), || async {
            let old = sluice_proxy::listener::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = old.local_addr().unwrap();
            let new = sluice_proxy::listener::bind_tcp(addr).unwrap();
            let mut clients = Vec::new();
            for _ in 0..CONNECTIONS {
                clients.push(TcpStream::connect(addr).await.unwrap());
            }
            drop(old);
            let mut accepted = 0;
            while let Ok(Ok((mut s, _))) =
                tokio::time::timeout(Duration::from_millis(300), new.accept()).await
            {
                s.write_all(b"x").await.unwrap();
                accepted += 1;
            }
            let mut served = 0;
            for mut c in clients {
                let mut b = [0u8; 1];
                if let Ok(Ok(1)) =
                    tokio::time::timeout(Duration::from_millis(300), c.read(&mut b)).await
                {
                    served += 1;
                }
            }
            (accepted, served)
        })
        .unwrap()
}

#[test]
fn a_closed_listener_hands_its_queue_over_only_with_tcp_migrate_req() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let (accepted, served) = queued_connections_after_close(true);
    eprintln!(
        "tcp_migrate_req=1: {accepted} of 64 queued connections accepted by the new listener, {served} served"
    );
    assert_eq!((accepted, served), (64, 64));
    let (accepted, served) = queued_connections_after_close(false);
    eprintln!(
        "tcp_migrate_req=0: {accepted} of 64 queued connections accepted by the new listener, {served} served"
    );
    // About half were queued on the closed listener: reset.
    assert!(served < 64, "without migration some are lost");
    assert_eq!(accepted, served);
}

#[test]
fn bind_mode_keeps_service_ips_until_the_first_table() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let mini = MiniNode::build("vip", true).unwrap();
    // A Service IP a previous sluice left on the device, with its mark.
    mini.node
        .block_on(Duration::from_secs(10), || async {
            let mut lo = sluice_proxy::vip::VipDevice::open(Some("lo"))
                .await
                .unwrap();
            let want = ["10.96.9.9".parse().unwrap()].into_iter().collect();
            assert!(lo.sync(&want).await.unwrap().is_complete());
        })
        .unwrap();
    let has_vip = |node: &Netns| {
        let out = Command::new("ip")
            .args(["-n", node.name(), "-4", "addr", "show", "dev", "lo"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("10.96.9.9/32")
    };
    assert!(has_vip(&mini.node));
    let started = mini
        .node
        .block_on(Duration::from_secs(30), || async {
            // An apiserver that never answers: no table, ever.
            let dir = tempfile::tempdir().unwrap();
            let kubeconfig = dir.path().join("kubeconfig");
            std::fs::write(
                &kubeconfig,
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:9\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user: {}\n",
            )
            .unwrap();
            let opts = Options::kube_on_loopback(env!("CARGO_BIN_EXE_sluice"), &kubeconfig, &[]);
            let mut d = Daemon::spawn(opts).unwrap();
            // Up, answering, no table.
            let mut up = false;
            for _ in 0..100 {
                if let Ok((503, _)) = sluice_testkit::http::get(d.health, "/readyz").await {
                    up = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let running = d.running();
            drop(d);
            drop(dir);
            up && running
        })
        .unwrap();
    assert!(started, "sluice did not come up without a table");
    assert!(
        has_vip(&mini.node),
        "the Service IP was removed before the first table"
    );
}

/// No namespace needed: bind mode on loopback.
#[tokio::test]
async fn a_connection_outliving_the_grace_is_cut_counted_and_logged() {
    let backend = echo_backend().await.unwrap();
    let listen = sluice_testkit::free_addr().unwrap();
    let config: ConfigDoc =
        ServiceDoc::new("default/echo:tcp", listen, vec![BackendDoc::ready(backend)]).into();
    let opts = Options {
        config: Some(config.to_yaml().unwrap()),
        args: ["--shutdown-grace", "1s"].map(String::from).to_vec(),
        log_filter: Some("info".into()),
        ..Options::new(env!("CARGO_BIN_EXE_sluice"))
    };
    let mut sluice = Daemon::start(opts).await.unwrap();
    let metrics = sluice.scrape().await.unwrap();
    assert_eq!(
        metric(&metrics, "sluice_shutdown_cut_connections_total"),
        Some(0.0),
        "{metrics}"
    );
    let mut s = TcpStream::connect(listen).await.unwrap();
    s.write_all(b"hello\n").await.unwrap();
    let mut back = [0u8; 6];
    s.read_exact(&mut back).await.unwrap();
    let opened = Instant::now();
    sluice.signal(Signal::SIGTERM).unwrap();
    // The connection outlives the grace: cut with a reset.
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .unwrap();
    let cut_after = opened.elapsed();
    assert!(end.is_err(), "a cut connection is reset: {end:?}");
    assert!(
        cut_after >= Duration::from_millis(900),
        "cut at {cut_after:?}"
    );
    assert!(
        sluice
            .wait_exit(Duration::from_secs(10))
            .await
            .unwrap()
            .success()
    );
    let log = sluice.log_tail(50);
    let line = log
        .lines()
        .find(|l| l.contains("still open at the end of the shutdown grace"))
        .unwrap_or_else(|| panic!("no cut logged:\n{log}"));
    assert!(line.contains("age="), "{line}");
    assert!(line.contains(&backend.to_string()), "{line}");
}

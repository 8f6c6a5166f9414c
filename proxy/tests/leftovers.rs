//! kube-proxy leftovers, detected for real inside network namespaces made
//! here: a `kube-ipvs0` device (a bridge: no dummy driver on this kernel),
//! kube-proxy's nftables table and an iptables-nft `KUBE-SERVICES` chain;
//! and a clean namespace. Also through the daemon: `/healthz` warnings and
//! `sluice_leftover_rules`. Needs root, `ip` and `nft`; skipped with a
//! message otherwise. No kernel here has IPVS, so `/proc/net/ip_vs` is
//! absent: its parser is tested on text (src/leftovers.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sluice_control::source::file::{BackendDoc, ConfigDoc, ServiceDoc};
use sluice_proxy::leftovers::{self, Kind};
use sluice_testkit::{Daemon, Options, http, metric, netns};

fn skip_reason() -> Option<String> {
    netns::unusable(&["ip", "nft"])
}

macro_rules! require_root {
    () => {
        if let Some(why) = skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

fn netns() -> netns::Netns {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    netns::Netns::new(format!("e-left-{}-{n}", std::process::id())).unwrap()
}

/// What kube-proxy in IPVS mode and in nftables mode leave behind, plus
/// kubelet's own chain (not a leftover).
fn leave_kube_proxy_state(ns: &netns::Netns) {
    ns.ip(&["link", "add", leftovers::IPVS_DEVICE, "type", "bridge"])
        .unwrap();
    ns.ip(&["addr", "add", "10.96.0.10/32", "dev", "kube-ipvs0"])
        .unwrap();
    let rules = "table ip kube-proxy {\n  chain services {\n  }\n}\n\
                 table ip nat {\n  chain KUBE-SERVICES {\n  }\n  chain KUBE-KUBELET-CANARY {\n  }\n}\n";
    netns::run(
        "ip",
        &["netns", "exec", ns.name(), "nft", "-f", "-"],
        Some(rules),
    )
    .unwrap();
}

fn detect_in(ns: &netns::Netns) -> leftovers::Report {
    ns.block_on(Duration::from_secs(10), leftovers::detect)
        .unwrap()
}

fn names(report: &leftovers::Report, kind: Kind) -> Vec<String> {
    report
        .checked
        .iter()
        .find(|f| f.kind == kind)
        .unwrap_or_else(|| panic!("{kind:?} not checked: {report:?}"))
        .names
        .clone()
}

#[test]
fn leftovers_of_ipvs_iptables_and_nftables_modes_are_found() {
    require_root!();
    let ns = netns();
    leave_kube_proxy_state(&ns);
    let report = detect_in(&ns);
    assert!(report.unchecked.is_empty(), "{report:?}");
    assert_eq!(names(&report, Kind::IpvsDevice), vec!["kube-ipvs0"]);
    assert_eq!(
        names(&report, Kind::IptablesChains),
        vec!["ip nat KUBE-SERVICES"]
    );
    assert_eq!(names(&report, Kind::NftablesTables), vec!["ip kube-proxy"]);
    // No IPVS module here: no /proc/net/ip_vs, so no virtual server.
    assert!(names(&report, Kind::IpvsVirtualServers).is_empty());
    let warnings = report.warnings();
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("ip link del kube-ipvs0")),
        "{warnings:?}"
    );
}

#[test]
fn a_clean_node_has_no_leftover() {
    require_root!();
    let ns = netns();
    let report = detect_in(&ns);
    assert!(report.unchecked.is_empty(), "{report:?}");
    assert_eq!(report.checked.len(), 4, "{report:?}");
    assert_eq!(report.found().count(), 0, "{report:?}");
    assert!(report.warnings().is_empty());
}

#[tokio::test]
async fn the_daemon_lists_leftovers_in_healthz_and_metrics() {
    require_root!();
    let ns = netns();
    leave_kube_proxy_state(&ns);
    let config = ConfigDoc::new(vec![ServiceDoc::new(
        "web",
        "10.96.0.20:80".parse().unwrap(),
        vec![BackendDoc::ready("127.0.0.1:9".parse().unwrap())],
    )]);
    let opts = Options {
        prefix: ["ip", "netns", "exec", ns.name()]
            .map(String::from)
            .to_vec(),
        config: Some(config.to_yaml().unwrap()),
        args: ["--intercept", "nftables", "--intercept-port", "10261"]
            .map(String::from)
            .to_vec(),
        ..Options::new(env!("CARGO_BIN_EXE_sluice"))
    };
    let sluice = Daemon::spawn(opts).unwrap();
    let (health, metrics) = (sluice.health, sluice.metrics);
    let (healthz, text) = ns
        .block_on(Duration::from_secs(20), move || async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let (Ok((200, body)), Ok((200, text))) = (
                    http::get(health, "/healthz").await,
                    http::get(metrics, "/metrics").await,
                ) {
                    return (body, text);
                }
                assert!(Instant::now() < deadline, "sluice did not answer");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&healthz).unwrap();
    let warnings: Vec<&str> = v["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w.as_str())
        .collect();
    assert_eq!(warnings.len(), 3, "{healthz}");
    assert!(
        warnings.iter().any(|w| w.contains("kube-ipvs0")),
        "{healthz}"
    );
    for (kind, n) in [
        ("kube_ipvs0", 1.0),
        ("iptables_kube_chains", 1.0),
        ("kube_proxy_nftables", 1.0),
        ("ipvs_virtual_servers", 0.0),
    ] {
        let series = format!("sluice_leftover_rules{{kind=\"{kind}\"}}");
        assert_eq!(metric(&text, &series), Some(n), "{series}\n{text}");
    }
}

//! `rollout --netns --proto udp` for real: dnsmasq pods replaced under a
//! DNS query load, through sluice (bound VIP) and kube-proxy-shaped
//! nftables DNAT with its UDP conntrack cleanup. Needs root, iproute2,
//! nftables, dnsmasq and conntrack (skipped with a message otherwise).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use sluice_testkit::netns::unusable;

use serde_json::Value;

/// Time of the first event whose text contains all of `parts`.
fn event_at(run: &Value, parts: &[&str]) -> Option<f64> {
    run["events"].as_array()?.iter().find_map(|e| {
        let what = e["what"].as_str()?;
        parts
            .iter()
            .all(|p| what.contains(p))
            .then(|| e["t_s"].as_f64())
            .flatten()
    })
}

#[test]
fn dns_rollout_loses_no_query_through_sluice() {
    if let Some(why) = unusable(&["ip", "nft", "dnsmasq", "conntrack"]) {
        eprintln!("SKIPPED: rollout --netns --proto udp {why}");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args([
            "rollout",
            "--netns",
            "--proto",
            "udp",
            "--json",
            "--allow-errors",
            "--via",
            "sluice,nft",
            "--intercept",
            "bind",
            "--arp",
            "fresh",
            "--backends",
            "1",
            "--lag",
            "2s",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    let ctx = format!("{v:#}\nstderr:\n{stderr}");
    assert_eq!(v["vip"], "10.96.0.10:53", "{ctx}");
    assert_eq!(v["client_timeout_s"], 1.0, "{ctx}");
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{ctx}");
    let sluice = runs.iter().find(|r| r["via"] == "sluice").unwrap();
    let nft = runs.iter().find(|r| r["via"] == "nft").unwrap();
    for r in [sluice, nft] {
        assert!(r["attempted"].as_u64().unwrap() >= 500, "{ctx}");
        assert_eq!(r["not_started"], 0, "{ctx}");
    }

    // sluice: the dead pod's ICMP port unreachable makes sluice re-send
    // the query elsewhere, so no client ever sees a refusal.
    let errors = &sluice["errors"];
    for kind in ["refused", "unreachable", "reset", "other"] {
        assert_eq!(
            errors[kind].as_u64(),
            Some(0),
            "sluice errors.{kind}: {ctx}"
        );
    }
    assert!(
        sluice["sluice_stop"]["clean"].as_bool().unwrap(),
        "sluice did not stop cleanly: {ctx}"
    );
    // The black hole (namespace gone, no ICMP, table not caught up yet):
    // sluice re-sends each query its backend leaves unanswered for
    // --udp-resend-after (300 ms, on for port 53) to the new pod, and
    // ejects the silent one, so no query is lost (docs/rollout-netns.md).
    let hole_opens = event_at(sluice, &["old-1 netns deleted"]).unwrap();
    let table_catches_up = event_at(sluice, &["table: old-1 terminating"]).unwrap();
    assert!(hole_opens < table_catches_up, "{ctx}");
    assert_eq!(
        errors["timeout"].as_u64(),
        Some(0),
        "sluice lost queries: {ctx}"
    );
    for s in sluice["timeline"].as_array().unwrap() {
        assert_eq!(
            s["errors"], 0,
            "sluice lost queries in second {}: {ctx}",
            s["t"]
        );
    }
    let silent = &sluice["sluice_metrics"]["dial_failures"]["timeout"];
    assert!(
        silent.as_u64().unwrap_or(0) >= 1,
        "the black hole was never found silent (was there one?): {ctx}"
    );

    // nft: kube-proxy's conntrack cleanup ran when the table dropped the
    // dead pod, and found entries to delete.
    let flushed = nft["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["what"].as_str())
        .filter_map(|w| w.split("; ").nth(1)?.split(' ').next()?.parse::<u64>().ok())
        .sum::<u64>();
    assert!(flushed > 0, "no UDP conntrack entry flushed: {ctx}");
}

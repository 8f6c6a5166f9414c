//! `dns --netns` for real: a dnsmasq pod in the netns mini node queried
//! from a client pod directly, through sluice (nftables intercept) and
//! through kube-proxy-shaped nftables DNAT. Needs root, iproute2, nftables
//! and dnsmasq (skipped with a message otherwise).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use serde_json::Value;
use sluice_testkit::netns::{self, unusable};

/// The namespaces `dns --netns` run `pid` makes that still exist.
fn left_over(pid: u32) -> Vec<String> {
    ["node", "client", "old-1"]
        .iter()
        .map(|n| format!("sb-{pid}-0-{n}"))
        .filter(|n| netns::exists(n))
        .collect()
}

#[test]
fn dns_netns_answers_every_query_on_every_path_and_cleans_up() {
    if let Some(why) = unusable(&["ip", "nft", "dnsmasq"]) {
        eprintln!("SKIPPED: dns --netns {why}");
        return;
    }
    let child = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(["dns", "--netns", "--via-nft", "--json"])
        .args(["--seconds", "1", "--rounds", "2", "--clients", "8"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(left_over(pid), Vec::<String>::new(), "namespaces left");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    let ctx = format!("{v:#}\nstderr:\n{stderr}");
    assert_eq!(v["scenario"], "dns", "{ctx}");
    assert_eq!(v["netns"], true, "{ctx}");
    assert_eq!(v["backend"], "dnsmasq-pod", "{ctx}");
    assert_eq!(v["vip"], "10.96.0.10:53", "{ctx}");
    assert_eq!(v["nft_vip"], "10.96.0.11:53", "{ctx}");
    let rounds = v["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{ctx}");
    for r in rounds.iter().chain([&v]) {
        for phase in ["direct", "sluice", "nft"] {
            let m = &r[phase];
            assert!(m["answered"].as_u64().unwrap() > 0, "{phase}: {ctx}");
            // Nothing is lost on an idle path; allow a stray one on a
            // machine busy with other builds (1 s without an answer).
            assert!(m["lost"].as_u64().unwrap() <= 2, "{phase} lost: {ctx}");
        }
        for ratio in ["ratio", "nft_ratio"] {
            let x = r[ratio].as_f64().unwrap();
            assert!(x > 0.0 && x < 2.0, "{ratio} {x}: {ctx}");
        }
        // Both processes did work for the queries they answered.
        for cpu in ["sluice_cpu_us_per_query", "dnsmasq_cpu_us_per_query"] {
            let x = r[cpu].as_f64().unwrap();
            assert!(x > 0.0, "{cpu} {x}: {ctx}");
        }
    }
}

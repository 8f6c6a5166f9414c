//! `dns --netns` for real: a dnsmasq pod in the netns mini node queried
//! from a client pod directly, through sluice (nftables intercept) and
//! through kube-proxy-shaped nftables DNAT. Needs root, iproute2, nftables
//! and dnsmasq (skipped with a message otherwise).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_testkit::netns::{self, unusable};
use sluice_testkit::process::{children, is_live};

/// The namespaces `dns --netns` run `pid` makes that still exist.
fn left_over(pid: u32) -> Vec<String> {
    ["node", "client", "old-1"]
        .iter()
        .map(|n| format!("sb-{pid}-0-{n}"))
        .filter(|n| netns::exists(n))
        .collect()
}

/// One run at a time: the measured one should not share the cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// `sluice-bench dns --netns --json ARGS`, stdout and stderr piped, once
/// the tools are there (None: skipped) and no other run of this file is
/// going; the guard holds that.
fn start(args: &[&str]) -> Option<(std::process::Child, std::sync::MutexGuard<'static, ()>)> {
    if let Some(why) = unusable(&["ip", "nft", "dnsmasq"]) {
        eprintln!("SKIPPED: dns --netns {why}");
        return None;
    }
    let one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let child = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(["dns", "--netns", "--json"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Some((child, one))
}

/// `dns --netns --json ARGS` to its end (None: skipped): it must succeed
/// and leave no namespace; (its JSON, context for messages).
fn run_to_the_end(args: &[&str]) -> Option<(Value, String)> {
    let (child, _one) = start(args)?;
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(left_over(pid), Vec::<String>::new(), "namespaces left");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    let ctx = format!("{v:#}\nstderr:\n{stderr}");
    Some((v, ctx))
}

#[test]
fn sigterm_mid_run_stops_sluice_and_dnsmasq_and_removes_namespaces() {
    let Some((mut child, _one)) = start(&["--seconds", "30", "--clients", "1"]) else {
        return;
    };
    let pid = child.id();
    // Until sluice and dnsmasq both run (sluice may be built first).
    let deadline = Instant::now() + Duration::from_secs(400);
    let running = loop {
        let c = children(pid);
        let has = |name: &str| c.iter().any(|p| p.comm == name);
        if has("sluice") && has("dnsmasq") {
            break c;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!(
                "sluice and dnsmasq never both ran: {:?}",
                child.wait_with_output()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Into the phases: the client runs.
    std::thread::sleep(Duration::from_millis(1500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("interrupted by SIGTERM"), "{stderr}");
    assert_eq!(left_over(pid), Vec::<String>::new(), "namespaces left");
    // Killed before the bench exited; init reaps them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while running.iter().any(|p| is_live(p.pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<_> = running.iter().filter(|p| is_live(p.pid)).collect();
    assert!(left.is_empty(), "still running: {left:?}");
}

#[test]
fn dns_netns_answers_every_query_on_every_path_and_cleans_up() {
    let args = [
        "--via-nft",
        "--seconds",
        "1",
        "--rounds",
        "2",
        "--clients",
        "8",
    ];
    let Some((v, ctx)) = run_to_the_end(&args) else {
        return;
    };
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
        let cpu = [
            ("sluice", &r["sluice_us_per_query"]),
            ("dnsmasq direct", &r["backend_us_per_query"]["direct"]),
            (
                "dnsmasq through sluice",
                &r["backend_us_per_query"]["sluice"],
            ),
        ];
        for (what, x) in cpu {
            assert!(x.as_f64().unwrap() > 0.0, "{what} µs/query {x}: {ctx}");
        }
    }
}

#[test]
fn dnsperf_in_the_client_pod_is_answered_directly_and_through_sluice() {
    if let Some(why) = unusable(&["dnsperf"]) {
        eprintln!("SKIPPED: dns --netns --client dnsperf {why}");
        return;
    }
    let args = [
        "--client",
        "dnsperf",
        "--seconds",
        "1",
        "--clients",
        "4",
        "--outstanding",
        "16",
    ];
    let Some((v, ctx)) = run_to_the_end(&args) else {
        return;
    };
    assert_eq!(v["client"], "dnsperf", "{ctx}");
    for phase in ["direct", "sluice"] {
        let m = &v[phase];
        assert!(m["answered"].as_u64().unwrap() > 0, "{phase}: {ctx}");
        // dnsperf counts what is still in flight at its time limit as lost.
        assert!(m["lost"].as_u64().unwrap() <= 16, "{phase} lost: {ctx}");
    }
    // Answered from the pod through sluice: dnsperf sent its queries from
    // the client pod's namespace, where only the VIP leads to sluice.
    assert!(v["sluice_us_per_query"].as_f64().unwrap() > 0.0, "{ctx}");
}

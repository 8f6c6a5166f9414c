//! `sluice-bench dns` for real: the real `sluice` binary (built by
//! sluice-bench itself through `$CARGO build -p sluice`), with the bench's
//! own clients and with `dnsperf` against `dnsmasq` (skipped with a
//! message when either is not installed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

/// One measuring run at a time: they share 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// The first of `tools` that is not on PATH.
fn missing(tools: &[&'static str]) -> Option<&'static str> {
    tools
        .iter()
        .copied()
        .find(|t| sluice_testkit::on_path(t).is_none())
}

/// Runs `sluice-bench dns ARGS --json`, which must succeed: (the JSON,
/// context for messages).
fn dns(args: &[&str]) -> (Value, String) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .arg("dns")
        .args(args)
        .arg("--json")
        .output()
        .expect("running sluice-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let ctx = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(out.status.success(), "{ctx}");
    let v: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {ctx}"));
    (v, ctx)
}

/// Both phases of the one round answered, lost at most `max_lost`, and
/// sluice's CPU per query counted.
fn check_round(v: &Value, max_lost: u64, ctx: &str) {
    let rounds = v["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 1, "{ctx}");
    for phase in ["direct", "sluice"] {
        let m = &rounds[0][phase];
        assert!(m["answered"].as_u64().unwrap() > 0, "{phase}: {ctx}");
        assert!(m["lost"].as_u64().unwrap() <= max_lost, "{phase}: {ctx}");
        assert!(m["queries_per_s"].as_f64().unwrap() > 0.0, "{phase}: {ctx}");
    }
    assert!(v["ratio"].as_f64().unwrap() > 0.0, "{ctx}");
    assert!(
        rounds[0]["sluice_us_per_query"].as_f64().unwrap() > 0.0,
        "{ctx}"
    );
    assert_eq!(v["sluice_us_per_query"], rounds[0]["sluice_us_per_query"]);
}

#[test]
fn dnsperf_through_sluice_and_direct_to_dnsmasq() {
    if let Some(tool) = missing(&["dnsperf", "dnsmasq"]) {
        eprintln!("SKIPPED: dns --client dnsperf: `{tool}` is not installed");
        return;
    }
    let (v, ctx) = dns(&[
        "--backend",
        "dnsmasq",
        "--client",
        "dnsperf",
        "--seconds",
        "1",
        "--clients",
        "4",
        "--outstanding",
        "20",
    ]);
    assert_eq!(v["client"], "dnsperf", "{ctx}");
    assert_eq!(v["outstanding"], 20, "{ctx}");
    // dnsperf counts what is in flight at its time limit as lost.
    check_round(&v, 20, &ctx);
    // dnsmasq's own CPU, in both phases.
    for phase in ["direct", "sluice"] {
        let us = v["rounds"][0]["backend_us_per_query"][phase].as_f64();
        assert!(us.is_some_and(|us| us > 0.0), "dnsmasq, {phase}: {ctx}");
    }
}

#[test]
fn builtin_clients_through_sluice_and_direct() {
    let (v, ctx) = dns(&["--seconds", "1", "--clients", "4"]);
    assert_eq!(v["client"], "builtin", "{ctx}");
    assert!(v.get("outstanding").is_none(), "{ctx}");
    // The builtin responder runs in the bench: no backend CPU figure.
    assert!(v.get("backend_us_per_query").is_none(), "{ctx}");
    // A query unanswered for 1 s counts as lost (none expected on
    // loopback; at most one per client tolerated on a loaded machine).
    check_round(&v, 4, &ctx);
}

#[test]
fn dnsperf_needs_a_real_dns_server() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(["dns", "--client", "dnsperf", "--seconds", "1", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(stderr.contains("--backend dnsmasq"), "{stderr}");
}

#[test]
fn nginx_is_a_third_phase_with_its_own_ratio_and_cpu() {
    if std::fs::metadata("/usr/sbin/nginx").is_err() && missing(&["nginx"]).is_some() {
        eprintln!("SKIPPED: nginx is not installed");
        return;
    }
    if !std::path::Path::new("/usr/lib/nginx/modules/ngx_stream_module.so").is_file() {
        eprintln!("SKIPPED: nginx has no stream module (libnginx-mod-stream)");
        return;
    }
    let (v, ctx) = dns(&["--nginx", "--seconds", "1", "--clients", "4"]);
    check_round(&v, 4, &ctx);
    let n = &v["nginx"];
    let round = &n["rounds"][0];
    assert!(round["measured"]["answered"].as_u64().unwrap() > 0, "{ctx}");
    assert!(round["measured"]["lost"].as_u64().unwrap() <= 4, "{ctx}");
    // Answered through nginx, which did the work: its CPU was counted.
    assert!(round["us_per_query"].as_f64().unwrap() > 0.0, "{ctx}");
    assert!(n["ratio"].as_f64().unwrap() > 0.0, "{ctx}");
    assert_eq!(n["ratio"], round["ratio"], "{ctx}");
    // nginx's master and workers are gone with the run: nothing holds its
    // port (a worker left behind would, in its reuseport group).
    // SIGKILL takes effect as the processes next run: allow them 2 s.
    let addr: std::net::SocketAddr = n["addr"].as_str().unwrap().parse().unwrap();
    let freed = (0..100).any(|_| {
        let free = std::net::UdpSocket::bind(addr).is_ok();
        if !free {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        free
    });
    assert!(freed, "{addr} still held 2 s after the run: {ctx}");
}

//! The scenarios against the real `sluice` binary (built by sluice-bench
//! itself through `$CARGO build -p sluice`, which cargo test provides).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

/// One scenario at a time: they time things and share 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn bench(args: &[&str]) -> (i32, Value, String) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(args)
        .output()
        .expect("running sluice-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "--json must print exactly one line\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let v: Value = serde_json::from_str(lines[0])
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {stdout}\nstderr:\n{stderr}"));
    (out.status.code().unwrap_or(-1), v, stderr)
}

/// sluice must hide every failed dial. The one error it cannot hide is a
/// connection that was open at an old backend when it died (aborted with
/// RST mid-response; rare at these rates): client errors are tolerated
/// only as resets/empties matched by the backends' own abort count.
/// Returns (client errors, aborted connections).
fn errors_explained(v: &Value, ctx: &str) -> (u64, u64) {
    let aborted = v["aborted_by_dying_backends"].as_u64().unwrap();
    for (kind, n) in v["errors"].as_object().unwrap() {
        if kind != "reset" && kind != "empty" {
            assert_eq!(n.as_u64(), Some(0), "errors.{kind}: {ctx}");
        }
    }
    let error_total = v["error_total"].as_u64().unwrap();
    assert!(
        error_total <= aborted,
        "{error_total} client errors, only {aborted} explained by a dying backend: {ctx}"
    );
    (error_total, aborted)
}

#[test]
fn rollout_through_sluice_has_no_client_visible_error() {
    let (code, v, stderr) = bench(&[
        "rollout",
        "--json",
        "--backends",
        "2",
        "--lag",
        "1s",
        "--grace",
        "300ms",
    ]);
    let ctx = format!("{v:#}\nstderr:\n{stderr}");
    let attempted = v["attempted"].as_u64().unwrap();
    assert!(attempted >= 800, "only {attempted} attempts: {ctx}");
    let (error_total, aborted) = errors_explained(&v, &ctx);
    assert_eq!(
        v["succeeded"].as_u64().unwrap() + error_total,
        attempted,
        "{ctx}"
    );
    assert!(v["p99_ms"].as_f64().unwrap() > 0.0);
    assert!(v["max_ms"].as_f64().unwrap() >= v["p99_ms"].as_f64().unwrap());
    // Traffic really moved from the old backends to the new ones.
    let served = v["served_by"].as_object().unwrap();
    for id in ["old-1", "old-2", "new-1", "new-2"] {
        assert!(
            served.get(id).and_then(Value::as_u64).unwrap_or(0) > 0,
            "{id} got nothing: {ctx}"
        );
    }
    // The scenario really made sluice retry: a dead backend was still
    // listed ready (counted from sluice's own debug log).
    assert!(
        v["sluice_log"]["dial_failures"].as_u64().unwrap() > 0,
        "no failed dial in sluice's log: the rollout did not exercise the retry: {ctx}"
    );
    assert_eq!(v["sluice_log"]["no_backend_left"], 0, "{ctx}");
    // sluice's own counters agree: dials retried, no client reset.
    let m = &v["sluice_metrics"];
    assert!(m["dial_retries"].as_u64().unwrap() > 0, "{ctx}");
    assert!(
        m["connections_accepted"].as_u64().unwrap() >= attempted,
        "{ctx}"
    );
    assert_eq!(m["connections_closed"]["no_backend"], 0, "{ctx}");
    assert_eq!(m["connections_closed"]["cut"], 0, "{ctx}");
    assert!(
        m["connections_closed"]["reset"].as_u64().unwrap_or(0) <= aborted,
        "{ctx}"
    );
    // Every table write went live, and sluice left cleanly on SIGTERM.
    assert_eq!(v["table_writes"], v["generations_live"], "{ctx}");
    assert_eq!(v["sluice_stop"]["exit_code"], 0, "{ctx}");
    assert_eq!(v["pass"], error_total == 0, "{ctx}");
    assert_eq!(code, if error_total == 0 { 0 } else { 1 }, "{ctx}");
}

/// A backend whose network vanishes (SYNs dropped): sluice's connect
/// timeout and retry must hide it; the connections that met it pay about
/// one connect timeout.
#[test]
fn rollout_with_blackholed_backend_has_no_client_visible_error() {
    let (code, v, stderr) = bench(&[
        "rollout",
        "--json",
        "--backends",
        "1",
        "--lag",
        "1s",
        "--death",
        "blackhole",
        "--connect-timeout",
        "200ms",
    ]);
    let ctx = format!("{v:#}\nstderr:\n{stderr}");
    let (error_total, _) = errors_explained(&v, &ctx);
    assert!(v["attempted"].as_u64().unwrap() >= 800, "{ctx}");
    assert!(
        v["sluice_log"]["dial_failures"].as_u64().unwrap() > 0,
        "{ctx}"
    );
    let max = v["max_ms"].as_f64().unwrap();
    assert!(
        (200.0..2000.0).contains(&max),
        "max latency {max} ms: expected about one 200ms connect timeout: {ctx}"
    );
    assert_eq!(code, if error_total == 0 { 0 } else { 1 }, "{ctx}");
}

/// Negative control: with a single dial per connection sluice cannot hide
/// the dead backend, and the bench must see it and fail.
#[test]
fn rollout_without_retry_reports_client_errors_and_fails() {
    let (code, v, stderr) = bench(&[
        "rollout",
        "--json",
        "--backends",
        "2",
        "--lag",
        "1s",
        "--max-attempts",
        "1",
    ]);
    let ctx = format!("{v:#}\nstderr:\n{stderr}");
    assert!(v["error_total"].as_u64().unwrap() >= 1, "{ctx}");
    let errs = v["errors"].as_object().unwrap();
    let sum: u64 = errs.values().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(sum, v["error_total"].as_u64().unwrap(), "{ctx}");
    assert_eq!(
        v["succeeded"].as_u64().unwrap() + sum,
        v["attempted"].as_u64().unwrap()
    );
    assert_eq!(v["pass"], false, "{ctx}");
    assert_eq!(code, 1, "{ctx}");
    assert!(stderr.contains("rollout FAILED"), "{stderr}");
    assert!(
        stderr.contains("sluice's log"),
        "log tail missing: {stderr}"
    );
}

#[test]
fn rollout_rejects_a_lag_under_one_second() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(["rollout", "--lag", "500ms", "--sluice", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--lag must be >= 1s"));
}

#[test]
fn churn_measures_direct_and_through_sluice_in_one_run() {
    let (code, v, stderr) = bench(&["churn", "--json", "--rate", "300", "--seconds", "1"]);
    let ctx = format!("{v:#}\nstderr:\n{stderr}");
    assert_eq!(code, 0, "{ctx}");
    for phase in ["direct", "sluice"] {
        assert_eq!(v[phase]["attempted"], 300, "{ctx}");
        assert_eq!(v[phase]["error_total"], 0, "{ctx}");
    }
    assert!(
        v["comparison"]["conn_per_s_ratio"].as_f64().unwrap() > 0.9,
        "{ctx}"
    );
    assert!(v["comparison"]["p99_added_ms"].is_number(), "{ctx}");
}

#[test]
fn throughput_moves_bytes_direct_and_through_sluice() {
    let (code, v, stderr) = bench(&["throughput", "--json", "--seconds", "0.5"]);
    let ctx = format!("{v:#}\nstderr:\n{stderr}");
    assert_eq!(code, 0, "{ctx}");
    for phase in ["direct", "sluice"] {
        assert!(v[phase]["bytes"].as_u64().unwrap() > 0, "{ctx}");
        assert_eq!(v[phase]["failed_connections"], 0, "{ctx}");
    }
    assert!(v["ratio"].as_f64().unwrap() > 0.0, "{ctx}");
}

#[test]
fn compare_measures_every_figure_on_each_path() {
    // The proxy and the load each get a CPU of their own: the first two
    // this process may use.
    use nix::sched::{CpuSet, sched_getaffinity};
    use nix::unistd::Pid;
    let set = sched_getaffinity(Pid::from_raw(0)).unwrap();
    let cpus: Vec<String> = (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .map(|c| c.to_string())
        .collect();
    if cpus.len() < 2 {
        eprintln!("skipped: compare needs two CPUs, this process may use {cpus:?}");
        return;
    }
    let (code, v, stderr) = bench(&[
        "compare",
        "--json",
        "--seconds",
        "0.5",
        "--idle",
        "200",
        "--paths",
        "direct,sluice,sluice-shared",
        "--proxy-cpu",
        &cpus[0],
        "--load-cpu",
        &cpus[1],
    ]);
    let ctx = format!("{v:#}\nstderr:\n{stderr}");
    assert_eq!(code, 0, "{ctx}");
    let round = v["rounds"][0].as_array().unwrap();
    let names: Vec<&str> = round.iter().map(|p| p["path"].as_str().unwrap()).collect();
    assert_eq!(names, ["direct", "sluice", "sluice-shared"], "{ctx}");
    for p in round {
        for fig in ["short", "keepalive"] {
            assert!(p[fig]["ok"].as_u64().unwrap() > 0, "{fig}: {ctx}");
            assert_eq!(p[fig]["errors"], 0, "{fig}: {ctx}");
        }
        assert!(p["bulk"]["bytes"].as_u64().unwrap() > 0, "{ctx}");
        assert!(p["bulk"]["error"].is_null(), "{ctx}");
        if p["path"] != "direct" {
            // CPU figures come from the proxy's /proc/PID/stat.
            assert!(
                p["short"]["proxy_cpu_s_per_10k"].as_f64().unwrap() > 0.0,
                "{ctx}"
            );
            assert!(
                p["bulk"]["proxy_cpu_s_per_gb"].as_f64().unwrap() > 0.0,
                "{ctx}"
            );
            assert_eq!(p["idle"]["connections"], 200, "{ctx}");
            assert_eq!(p["idle"]["failed"], 0, "{ctx}");
        }
    }
}

#[test]
fn ctrl_c_kills_sluice_and_removes_its_dir() {
    use std::io::{BufRead, BufReader};
    use std::time::{Duration, Instant};

    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(["rollout", "--backends", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // "sluice: PATH (pid N) listening on ADDR, config and log in DIR"
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.starts_with("sluice: "))
        .expect("no sluice line");
    let pid: i32 = line
        .split("(pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"));
    let dir = line.rsplit(" in ").next().unwrap().to_string();
    assert!(std::path::Path::new(&dir).is_dir(), "{dir}");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());

    std::thread::sleep(Duration::from_millis(500));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "sluice-bench ignored SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(2), "interrupted runs exit 2");
    assert!(!std::path::Path::new(&dir).exists(), "{dir} left behind");
    // Gone, or at most a zombie waiting for its new parent to reap it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(") ").next().map(|r| r.chars().next()))
            .flatten();
        if matches!(state, None | Some('Z')) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sluice {pid} still running: {state:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

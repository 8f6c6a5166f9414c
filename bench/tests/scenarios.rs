//! The scenarios against the real `sluice` binary (built by sluice-bench
//! itself through `$CARGO build -p sluice`, which cargo test provides).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> (i32, Value, String) {
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
    assert_eq!(v["succeeded"].as_u64().unwrap(), attempted, "{ctx}");
    for (kind, n) in v["errors"].as_object().unwrap() {
        assert_eq!(n.as_u64(), Some(0), "errors.{kind}: {ctx}");
    }
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
    // Every table write went live, and sluice left cleanly on SIGTERM.
    assert_eq!(v["table_writes"], v["generations_live"], "{ctx}");
    assert_eq!(v["sluice_stop"]["exit_code"], 0, "{ctx}");
    assert_eq!(v["pass"], true, "{ctx}");
    assert_eq!(code, 0, "{ctx}");
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

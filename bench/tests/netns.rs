//! `rollout --netns` for real: a mini node in network namespaces, pods that
//! vanish, sluice against kube-proxy-shaped nftables DNAT. Needs root
//! (skipped with a message otherwise), iproute2 and nftables.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt as _;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// One run at a time: they time things and share 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn root() -> bool {
    let is_root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    if !is_root {
        eprintln!(
            "SKIPPED: rollout --netns needs root (network namespaces); run the tests as root"
        );
    }
    is_root
}

/// Namespaces of the sluice-bench process `pid`.
fn namespaces_of(pid: u32) -> Vec<String> {
    let prefix = format!("sb-{pid}-");
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

fn dead_pid() -> u32 {
    (4_000_000..4_100_000)
        .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .unwrap()
}

#[test]
fn sluice_hides_vanishing_pods_that_the_kernel_path_shows() {
    if !root() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A leftover of a run that was killed hard: removed at the next start.
    let stale = format!("sb-{}-0-node", dead_pid());
    let made = Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .unwrap();
    assert!(made.success());

    let child = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args([
            "rollout",
            "--netns",
            "--json",
            "--via",
            "sluice,nft",
            "--intercept",
            "bind,nftables",
            "--arp",
            "fresh,failed",
            "--backends",
            "1",
            "--lag",
            "2s",
            "--connect-timeout",
            "300ms",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "--json prints one line\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let v: Value = serde_json::from_str(lines[0]).unwrap();
    let ctx = format!("{v:#}\nstderr:\n{stderr}");

    assert!(
        !std::path::Path::new(&format!("/run/netns/{stale}")).exists(),
        "{ctx}"
    );
    assert!(
        stderr.contains(&stale),
        "the stale namespace is named: {stderr}"
    );
    assert_eq!(v["scenario"], "rollout-netns");
    assert_eq!(v["lag_s"], 2.0);
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 6, "{ctx}");
    // sluice through its nftables redirect (no VIP on any device) as well
    // as through a bound VIP: both must hide the vanishing pods.
    let through = |i: &str| {
        runs.iter()
            .filter(|r| r["via"] == "sluice" && r["intercept"] == i)
            .count()
    };
    assert_eq!((through("bind"), through("nftables")), (2, 2), "{ctx}");

    for r in runs.iter().filter(|r| r["via"] == "sluice") {
        let arp = format!("{} {}", r["intercept"], r["arp"]);
        let attempted = r["attempted"].as_u64().unwrap();
        assert!(attempted >= 1000, "{arp}: only {attempted} attempts: {ctx}");
        assert_eq!(r["succeeded"].as_u64().unwrap(), attempted, "{arp}: {ctx}");
        assert_eq!(r["not_started"], 0, "{arp}: {ctx}");
        for (kind, n) in r["errors"].as_object().unwrap() {
            assert_eq!(n.as_u64(), Some(0), "{arp}: errors.{kind}: {ctx}");
        }
        // The dead pod was still listed: sluice's dials to it failed and
        // were retried, each costing at most the connect timeout.
        assert!(
            r["sluice_log"]["dial_failures"].as_u64().unwrap() > 0,
            "{arp}: {ctx}"
        );
        assert!(
            r["slow_100ms"].as_u64().unwrap() > 0,
            "{arp}: no retry slowed anything: {ctx}"
        );
        let max = r["max_ms"].as_f64().unwrap();
        assert!(
            (300.0..600.0).contains(&max),
            "{arp}: max {max} ms not bounded by one 300 ms connect timeout: {ctx}"
        );
        assert_eq!(r["sluice_log"]["no_backend_left"], 0, "{arp}: {ctx}");
        assert_eq!(r["sluice_stop"]["exit_code"], 0, "{arp}: {ctx}");
        let served = r["served_by"].as_object().unwrap();
        for id in ["old-1", "new-1"] {
            assert!(
                served.get(id).and_then(Value::as_u64).unwrap_or(0) > 0,
                "{arp}: {id}: {ctx}"
            );
        }
        assert_eq!(r["pass"], true, "{arp}: {ctx}");
    }
    // The kernel path, same schedule: connections land on the dead pod.
    let fresh = runs
        .iter()
        .find(|r| r["via"] == "nft" && r["arp"] == "fresh")
        .unwrap();
    let e = &fresh["errors"];
    assert!(
        e["refused"].as_u64().unwrap() > 0,
        "refused while the pod's netns lived: {ctx}"
    );
    assert!(
        e["timeout"].as_u64().unwrap() > 0,
        "black hole once it was gone: {ctx}"
    );
    assert!(
        fresh["conntrack_to_dead_pods"].as_u64().unwrap() > 0,
        "{ctx}"
    );
    let failed = runs
        .iter()
        .find(|r| r["via"] == "nft" && r["arp"] == "failed")
        .unwrap();
    assert!(
        failed["error_total"].as_u64().unwrap() + failed["slow_100ms"].as_u64().unwrap() > 0,
        "ARP resolution toward the dead pod delays or fails connections: {ctx}"
    );

    assert_eq!(v["pass"], true, "{ctx}");
    assert_eq!(out.status.code(), Some(0), "{ctx}");
    assert!(
        namespaces_of(pid).is_empty(),
        "left behind: {:?}",
        namespaces_of(pid)
    );
}

#[test]
fn sigterm_mid_run_removes_namespaces_and_processes() {
    if !root() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args([
            "rollout",
            "--netns",
            "--json",
            "--backends",
            "1",
            "--arp",
            "fresh",
        ])
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stderr = || std::fs::read_to_string(log.path()).unwrap_or_default();
    // Wait until the load runs (the new pod's namespace exists). The run
    // may first build sluice (a nested cargo build, minutes on 2 cores).
    let deadline = Instant::now() + Duration::from_secs(400);
    while !namespaces_of(pid).iter().any(|n| n.ends_with("-new-1")) {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("the run never got to its new pod; stderr:\n{}", stderr());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // What runs inside: sluice in the node, the pods' processes.
    let mut pids = Vec::new();
    for ns in namespaces_of(pid) {
        let out = Command::new("ip")
            .args(["netns", "pids", &ns])
            .output()
            .unwrap();
        pids.extend(
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(|p| p.parse::<u32>().unwrap()),
        );
    }
    assert!(
        pids.len() >= 2,
        "sluice and a pod run in the namespaces: {pids:?}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(2), "{}", stderr());
    assert!(stderr().contains("interrupted by SIGTERM"), "{}", stderr());
    assert!(
        namespaces_of(pid).is_empty(),
        "left behind: {:?}",
        namespaces_of(pid)
    );
    // Killed processes are reaped by init once their parent is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    let alive = |p: &u32| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    };
    while pids.iter().any(alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<&u32> = pids.iter().filter(|p| alive(p)).collect();
    assert!(left.is_empty(), "processes left: {left:?}");
}

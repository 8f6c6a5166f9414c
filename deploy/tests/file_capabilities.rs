#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The Dockerfile's `setcap` and the DaemonSet's securityContext, tried on
//! this machine's kernel with real processes.
//!
//! A stand-in binary (a copy of `cat`) gets the Dockerfile's file
//! capabilities, then runs the way the container runtime would start sluice:
//! as the DaemonSet's runAsUser/runAsGroup, with the bounding set reduced to
//! the DaemonSet's `capabilities.add`, and with `no_new_privs` when
//! `allowPrivilegeEscalation` is false. It prints its own /proc/self/status,
//! and the test reads its capability sets.
//!
//! `setpriv` keeps the caller's permitted capabilities across the uid change,
//! as runc does with the capabilities the runtime asks for. A runtime that
//! empties the permitted set of non-root processes (dockerd:
//! moby/moby#45491) leaves sluice with none under `no_new_privs`; that case
//! is in deploy/README.md, not here.
//!
//! Needs root, `setcap` (libcap2-bin) and `setpriv` (util-linux).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use k8s_openapi::api::apps::v1::DaemonSet;

fn deploy_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Linux capability numbers (include/uapi/linux/capability.h) of the names
/// sluice might use.
fn cap_number(name: &str) -> u32 {
    match name {
        "CHOWN" => 0,
        "DAC_OVERRIDE" => 1,
        "NET_BIND_SERVICE" => 10,
        "NET_BROADCAST" => 11,
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "SYS_ADMIN" => 21,
        other => panic!("capability {other} is not in this test's table: add it"),
    }
}

/// The `setcap SPEC PATH` of the Dockerfile's runtime stage (not `setcap -v`).
fn dockerfile_setcap() -> String {
    let text = std::fs::read_to_string(deploy_dir().join("../Dockerfile")).unwrap();
    let runtime = text
        .rsplit_once("\nFROM ")
        .expect("a multi-stage Dockerfile")
        .1;
    let words: Vec<&str> = runtime.split_whitespace().collect();
    let at = words
        .windows(2)
        .position(|w| w[0] == "setcap" && !w[1].starts_with('-'))
        .expect("the runtime stage runs setcap");
    words[at + 1].to_owned()
}

struct Pod {
    uid: i64,
    gid: i64,
    caps: Vec<String>,
    no_new_privs: bool,
}

fn daemonset_pod() -> Pod {
    let text = std::fs::read_to_string(deploy_dir().join("daemonset.yaml")).unwrap();
    let ds: DaemonSet = serde_saphyr::from_str(&text).unwrap();
    let pod = ds.spec.template.spec.unwrap();
    let sc = pod.containers[0].security_context.clone().unwrap();
    let pod_sc = pod.security_context.unwrap_or_default();
    Pod {
        uid: sc.run_as_user.or(pod_sc.run_as_user).unwrap(),
        gid: sc.run_as_group.or(pod_sc.run_as_group).unwrap(),
        caps: sc.capabilities.and_then(|c| c.add).unwrap(),
        no_new_privs: sc.allow_privilege_escalation == Some(false),
    }
}

fn require_tools() {
    let uid = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|u| u.split_whitespace().next().unwrap().to_owned())
        })
        .unwrap();
    assert_eq!(
        uid, "0",
        "this test sets file capabilities and changes uid: run it as root"
    );
    for tool in ["setcap", "setpriv"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap()
            .status
            .success();
        assert!(
            found,
            "`{tool}` not found: apt-get install libcap2-bin util-linux"
        );
    }
}

/// A world-executable copy of `cat` in a fresh directory, with `setcap` if given.
fn stand_in(dir: &Path, setcap: Option<&str>) -> String {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join("sluice");
    std::fs::copy("/bin/cat", &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    if let Some(spec) = setcap {
        let out = Command::new("setcap")
            .arg(spec)
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "setcap {spec}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    path.to_string_lossy().into_owned()
}

/// Runs `binary /proc/self/status` as the pod would run sluice, with this
/// bounding set.
fn run_as_pod(pod: &Pod, bounding: &[String], binary: &str) -> Output {
    let bounding: Vec<String> = bounding
        .iter()
        .map(|c| format!("+{}", c.to_ascii_lowercase()))
        .collect();
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={}", pod.uid))
        .arg(format!("--regid={}", pod.gid))
        .arg("--clear-groups")
        .arg("--inh-caps=-all")
        .arg(format!("--bounding-set=-all,{}", bounding.join(",")));
    if pod.no_new_privs {
        cmd.arg("--no-new-privs");
    }
    cmd.arg(binary).arg("/proc/self/status");
    cmd.output().unwrap()
}

/// The capability numbers in a `CapXxx:` line of /proc/<pid>/status.
fn cap_set(status: &str, field: &str) -> BTreeSet<u32> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in:\n{status}"))
        .trim();
    let bits = u64::from_str_radix(hex, 16).unwrap();
    (0..64).filter(|b| bits & (1 << b) != 0).collect()
}

#[test]
fn the_image_binary_gets_exactly_the_daemonset_capabilities() {
    require_tools();
    let pod = daemonset_pod();
    assert!(pod.uid > 0, "the pod runs as root: nothing to check");
    let want: BTreeSet<u32> = pod.caps.iter().map(|c| cap_number(c)).collect();
    let dir = tempfile::tempdir().unwrap();
    let binary = stand_in(dir.path(), Some(&dockerfile_setcap()));

    let out = run_as_pod(&pod, &pod.caps, &binary);
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(status.contains(&format!("Uid:\t{}\t", pod.uid)), "{status}");
    if pod.no_new_privs {
        assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    }
    assert_eq!(cap_set(&status, "CapEff:"), want, "effective capabilities");
    assert_eq!(cap_set(&status, "CapPrm:"), want, "permitted capabilities");
    assert_eq!(cap_set(&status, "CapBnd:"), want, "bounding set");
}

#[test]
fn without_file_capabilities_a_non_root_process_has_none() {
    // Why the Dockerfile runs setcap at all.
    require_tools();
    let pod = daemonset_pod();
    let dir = tempfile::tempdir().unwrap();
    let binary = stand_in(dir.path(), None);
    let out = run_as_pod(&pod, &pod.caps, &binary);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = String::from_utf8_lossy(&out.stdout);
    assert_eq!(cap_set(&status, "CapEff:"), BTreeSet::new());
    assert_eq!(cap_set(&status, "CapPrm:"), BTreeSet::new());
}

#[test]
fn file_capabilities_beyond_the_daemonset_ones_refuse_to_exec() {
    // Why the Dockerfile's capabilities must not exceed the DaemonSet's: drop
    // one from the pod's set and the kernel refuses to run the binary.
    require_tools();
    let pod = daemonset_pod();
    assert!(pod.caps.len() >= 2, "{:?}", pod.caps);
    let dir = tempfile::tempdir().unwrap();
    let binary = stand_in(dir.path(), Some(&dockerfile_setcap()));
    let fewer = &pod.caps[1..];
    let out = run_as_pod(&pod, fewer, &binary);
    assert!(
        !out.status.success(),
        "exec succeeded with bounding set {fewer:?}:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

//! How sluice reaches the apiserver, checked at start. Given only the
//! in-cluster environment (KUBERNETES_SERVICE_HOST/PORT pointing at the
//! apiserver fixture, a ServiceAccount token and CA where the kubelet mounts
//! them), sluice would reach the apiserver only through the `kubernetes`
//! Service's address, which it serves itself: it warns at start and on
//! `/healthz`, or with `--require-direct-apiserver` refuses to start (exit
//! 64). When the kubelet's `KUBERNETES_PORT` shows that the in-cluster
//! address was overridden (the `sluice-apiserver` ConfigMap), it does not.
//!
//! Needs root: the ServiceAccount files live in a private mount namespace
//! (`unshare --mount`), never on the host's /run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice_apiserver_fixture::ApiServer;
use sluice_testkit::{free_addr, http};

const WAIT: Duration = Duration::from_secs(20);

fn root() -> bool {
    let is_root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !is_root {
        eprintln!("SKIPPED: needs root (a private mount namespace for the ServiceAccount files)");
    }
    is_root
}

/// A ServiceAccount directory as the kubelet mounts it: token, namespace
/// and a real CA certificate (kube parses it).
fn service_account(dir: &Path) {
    std::fs::write(dir.join("token"), "test-token").unwrap();
    std::fs::write(dir.join("namespace"), "kube-system").unwrap();
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=sluice-test-ca", "-keyout"])
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(dir.join("ca.crt"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl (Debian package openssl) makes the test CA");
    assert!(status.success(), "openssl req failed");
}

/// `sluice` in Kubernetes mode with nothing but the in-cluster environment
/// (plus `extra_env`), in a mount namespace whose /run holds the
/// ServiceAccount files, its stderr in `log`, /healthz on `health`.
struct InCluster {
    child: Child,
    log: std::path::PathBuf,
    health: std::net::SocketAddr,
    _api: ApiServer,
    _dir: tempfile::TempDir,
}

impl InCluster {
    async fn start(args: &[&str], extra_env: &[(&str, &str)]) -> InCluster {
        const SCRIPT: &str = r#"set -e
mount -t tmpfs sluice-test /run
mkdir -p /run/secrets/kubernetes.io/serviceaccount
cp "$SA_DIR/token" "$SA_DIR/ca.crt" "$SA_DIR/namespace" /run/secrets/kubernetes.io/serviceaccount/
exec "$@""#;
        let api = ApiServer::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sa = dir.path().join("sa");
        std::fs::create_dir_all(&sa).unwrap();
        service_account(&sa);
        let log = dir.path().join("sluice.log");
        let health = free_addr().unwrap();
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                SCRIPT,
            ])
            .arg("sh")
            .arg(env!("CARGO_BIN_EXE_sluice"))
            .args(["--node-name", "node-a", "--vip-interface", "lo"])
            .args(["--intercept", "bind"])
            .arg(format!("--healthz-bind-address={health}"))
            .arg("--metrics-bind-address=")
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            // No ~/.kube/config, no KUBECONFIG: the in-cluster config it is.
            .env("HOME", dir.path())
            .env("SA_DIR", &sa)
            .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            .env("KUBERNETES_SERVICE_PORT", api.addr().port().to_string())
            .envs(extra_env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        InCluster {
            child,
            log,
            health,
            _api: api,
            _dir: dir,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `/healthz` until it answers, returning its JSON body.
    async fn healthz_body(&self) -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok((_, body)) = http::get(self.health, "/healthz").await
                && let Ok(v) = serde_json::from_str(&body)
            {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no /healthz within {WAIT:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded) for the process to exit on its own.
    async fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "still running after {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for InCluster {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn in_cluster_service_address_is_a_warning_at_start_and_on_healthz() {
    if !root() {
        return;
    }
    let sluice = InCluster::start(&[], &[]).await;
    let body = sluice.healthz_body().await;
    let warnings = body["warnings"].as_array().cloned().unwrap_or_default();
    assert_eq!(warnings.len(), 1, "{body}");
    let w = warnings[0].as_str().unwrap_or_default();
    assert!(w.contains("KUBERNETES_SERVICE_HOST"), "{w}");
    assert!(w.contains("sluice-apiserver"), "names the fix: {w}");
    let text = sluice.log_text();
    let line = text
        .lines()
        .find(|l| l.contains("KUBERNETES_SERVICE_HOST"))
        .unwrap_or_else(|| panic!("no warning in the log:\n{text}"));
    assert!(line.contains("WARN"), "logged at warn: {line}");
}

#[tokio::test]
async fn an_overridden_in_cluster_address_is_no_warning() {
    if !root() {
        return;
    }
    // The kubelet's record of the `kubernetes` Service names another
    // address: KUBERNETES_SERVICE_HOST/PORT were overridden with the
    // apiserver's own, as the sluice-apiserver ConfigMap does.
    let sluice = InCluster::start(
        &["--require-direct-apiserver"],
        &[("KUBERNETES_PORT", "tcp://10.96.0.1:443")],
    )
    .await;
    let body = sluice.healthz_body().await;
    assert_eq!(body["warnings"], serde_json::json!([]), "{body}");
}

#[tokio::test]
async fn require_direct_apiserver_refuses_to_start_with_exit_64() {
    if !root() {
        return;
    }
    let mut sluice = InCluster::start(&["--require-direct-apiserver"], &[]).await;
    let code = sluice.exit_code().await;
    let text = sluice.log_text();
    assert_eq!(code, Some(64), "{text}");
    assert!(text.contains("--require-direct-apiserver"), "{text}");
    assert!(text.contains("KUBERNETES_SERVICE_HOST"), "{text}");
    assert!(text.contains("sluice-apiserver"), "{text}");
}

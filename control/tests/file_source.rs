//! The file source through its public API: the examples, `load`, and the
//! watch loop against real files in a temporary directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sluice_control::source::file::{self, ConfigError, FileStatus, FileWatcher};
use sluice_control::{Affinity, ListenKey, Policy, Publisher, Table};
use tokio::sync::{Notify, watch};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn eligible(table: &Table, listen: &str) -> Vec<SocketAddr> {
    let svc = table.get(&ListenKey::tcp(addr(listen))).unwrap();
    svc.eligible_iter().map(|b| b.addr).collect()
}

#[test]
fn every_example_loads() {
    let mut loaded = Vec::new();
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            match file::load(&path) {
                Ok(table) => assert!(!table.is_empty(), "{}: no services", path.display()),
                Err(e) => panic!("{e}"),
            }
            loaded.push(path);
        }
    }
    assert!(
        loaded.iter().any(|p| p.ends_with("basic.yaml")),
        "{loaded:?}"
    );
    assert!(loaded.len() >= 2, "{loaded:?}");
}

#[test]
fn basic_example_means_what_its_comments_say() {
    let t = file::load(examples_dir().join("basic.yaml")).unwrap();
    assert_eq!(t.len(), 2);
    let web = t.get(&ListenKey::tcp(addr("127.0.0.1:8080"))).unwrap();
    assert_eq!(web.name, "web");
    assert_eq!(web.policy, Policy::RoundRobin);
    assert_eq!(web.backends().len(), 3);
    assert_eq!(
        eligible(&t, "127.0.0.1:8080"),
        [addr("127.0.0.2:9000"), addr("127.0.0.3:9000")]
    );
    let api = t.get(&ListenKey::tcp(addr("127.0.0.1:8081"))).unwrap();
    assert_eq!(api.policy, Policy::LeastConnections);
    assert_eq!(
        api.affinity,
        Some(Affinity {
            timeout: Duration::from_secs(600)
        })
    );
    assert_eq!(eligible(&t, "127.0.0.1:8081"), [addr("127.0.0.2:9001")]);
}

#[test]
fn rollout_example_routes_as_during_a_rollout() {
    let t = file::load(examples_dir().join("rollout.yaml")).unwrap();
    // Mid-rollout: only the ready new pod.
    assert_eq!(eligible(&t, "127.0.0.1:8080"), [addr("127.0.0.2:9000")]);
    // All terminating: the one still serving.
    assert_eq!(eligible(&t, "[::1]:8443"), [addr("[::1]:9443")]);
    let cart = t.get(&ListenKey::tcp(addr("[::1]:8443"))).unwrap();
    assert_eq!(
        cart.affinity.map(|a| a.timeout),
        Some(Affinity::DEFAULT_TIMEOUT)
    );
}

#[test]
fn load_error_is_one_line_with_file_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.yaml");
    std::fs::write(
        &path,
        "services:\n  - name: api\n    listen: 127.0.0.1:81\n    backends:\n      - address: 10.0.0.1:99999\n",
    )
    .unwrap();
    let e = file::load(&path).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}:5:18: services[0] \"api\": backends[0]: address: invalid socket address \
             \"10.0.0.1:99999\" (expected IP:port (IPv6 quoted: \"[::1]:80\"))",
            path.display()
        )
    );
    assert!(matches!(e, ConfigError::Invalid { .. }));
}

// ---- the watch loop ----

const V1: &str = "services:
  - name: web
    listen: 127.0.0.1:8080
    backends: [{ address: 127.0.0.2:9000 }]
";

const V2: &str = "services:
  - name: web
    listen: 127.0.0.1:8080
    backends: [{ address: 127.0.0.2:9000 }, { address: 127.0.0.3:9000 }]
  - name: api
    listen: 127.0.0.1:8081
    backends: []
";

/// Broken at line 4: a backend without an address.
const BROKEN: &str = "services:
  - name: web
    listen: 127.0.0.1:8080
    backends: [{ weight: 1 }]
";

/// Replaces the file atomically, as editors and `kubectl cp` do.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

const WAIT: Duration = Duration::from_secs(10);

async fn status_until(rx: &mut watch::Receiver<FileStatus>, f: impl FnMut(&FileStatus) -> bool) {
    tokio::time::timeout(WAIT, rx.wait_for(f))
        .await
        .expect("watch loop did not get there in time")
        .unwrap();
}

async fn generation_until(publisher: &Publisher, generation: u64) {
    let mut rx = publisher.subscribe();
    tokio::time::timeout(WAIT, rx.wait_for(|g| *g >= generation))
        .await
        .expect("no new generation in time")
        .unwrap();
}

struct Running {
    publisher: Arc<Publisher>,
    reload: Arc<Notify>,
    status: watch::Receiver<FileStatus>,
    task: tokio::task::JoinHandle<std::convert::Infallible>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Loads `path` as the daemon does at start-up, then starts the loop.
fn start(path: &Path, poll: Duration) -> Running {
    let publisher = Arc::new(Publisher::new());
    assert_eq!(publisher.publish(file::load(path).unwrap()), Some(1));
    let reload = Arc::new(Notify::new());
    let watcher = FileWatcher::new(path, poll, publisher.clone(), reload.clone());
    let status = watcher.status();
    let task = tokio::spawn(watcher.run());
    Running {
        publisher,
        reload,
        status,
        task,
    }
}

#[tokio::test]
async fn broken_file_keeps_the_last_good_table_and_a_fix_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, V1).unwrap();
    let mut w = start(&path, Duration::from_millis(20));
    let v1 = w.publisher.load();

    // The first checks read what load() read: nothing new.
    status_until(&mut w.status, |s| s.checks >= 2).await;
    assert_eq!(w.publisher.snapshot().generation, 1);
    assert_eq!(w.status.borrow().error, None);

    replace(&path, BROKEN);
    status_until(&mut w.status, |s| s.error.is_some()).await;
    let error = w.status.borrow().error.clone().unwrap();
    assert!(
        error.starts_with(&format!("{}:4:", path.display())),
        "{error}"
    );
    assert!(error.contains("missing field \"address\""), "{error}");
    // Several more polls of the broken file: still the first table.
    let checks = w.status.borrow().checks;
    status_until(&mut w.status, |s| s.checks >= checks + 3).await;
    let snap = w.publisher.snapshot();
    assert_eq!(snap.generation, 1);
    assert_eq!(*snap.table, *v1);
    assert_eq!(w.status.borrow().error.as_deref(), Some(&error[..]));

    replace(&path, V2);
    generation_until(&w.publisher, 2).await;
    let snap = w.publisher.snapshot();
    assert_eq!(snap.generation, 2);
    assert_eq!(*snap.table, file::parse("v2", V2).unwrap());
    status_until(&mut w.status, |s| s.error.is_none()).await;
}

#[tokio::test]
async fn notify_reloads_without_waiting_for_the_poll() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, V1).unwrap();
    // A poll interval no test waits for: only the Notify can reload.
    let mut w = start(&path, Duration::from_secs(3600));
    status_until(&mut w.status, |s| s.checks >= 1).await;

    replace(&path, V2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(w.publisher.snapshot().generation, 1, "polled too early");
    assert_eq!(w.status.borrow().checks, 1);

    w.reload.notify_one();
    generation_until(&w.publisher, 2).await;
    assert_eq!(*w.publisher.load(), file::parse("v2", V2).unwrap());
    status_until(&mut w.status, |s| s.checks >= 2).await;
}

#[tokio::test]
async fn configmap_symlink_swap_is_seen() {
    // The layout kubelet gives a ConfigMap volume:
    //   sluice.yaml -> ..data/sluice.yaml, ..data -> ..<timestamp>/
    // and an update swaps `..data` atomically.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("..2026_01")).unwrap();
    std::fs::write(root.join("..2026_01/sluice.yaml"), V1).unwrap();
    std::os::unix::fs::symlink("..2026_01", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/sluice.yaml", root.join("sluice.yaml")).unwrap();
    let path = root.join("sluice.yaml");
    let mut w = start(&path, Duration::from_millis(20));
    status_until(&mut w.status, |s| s.checks >= 1).await;

    std::fs::create_dir(root.join("..2026_02")).unwrap();
    std::fs::write(root.join("..2026_02/sluice.yaml"), V2).unwrap();
    std::os::unix::fs::symlink("..2026_02", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2026_01")).unwrap();

    generation_until(&w.publisher, 2).await;
    assert_eq!(*w.publisher.load(), file::parse("v2", V2).unwrap());
}

#[tokio::test]
async fn missing_file_keeps_the_table_until_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, V1).unwrap();
    let mut w = start(&path, Duration::from_millis(20));
    status_until(&mut w.status, |s| s.checks >= 1).await;

    std::fs::remove_file(&path).unwrap();
    status_until(&mut w.status, |s| s.error.is_some()).await;
    let error = w.status.borrow().error.clone().unwrap();
    assert!(
        error.starts_with(&format!("{}: cannot read: ", path.display())),
        "{error}"
    );
    let checks = w.status.borrow().checks;
    status_until(&mut w.status, |s| s.checks >= checks + 3).await;
    assert_eq!(w.publisher.snapshot().generation, 1);
    assert_eq!(w.publisher.load().len(), 1);

    replace(&path, V2);
    generation_until(&w.publisher, 2).await;
    assert_eq!(w.publisher.load().len(), 2);
    status_until(&mut w.status, |s| s.error.is_none()).await;
}

#[tokio::test]
async fn without_a_start_up_load_the_first_check_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, "services: []\n").unwrap();
    let publisher = Arc::new(Publisher::new());
    let task = tokio::spawn(file::watch(
        path.clone(),
        Duration::ZERO, // raised to the minimum, not a panic
        publisher.clone(),
        Arc::new(Notify::new()),
    ));
    generation_until(&publisher, 1).await;
    assert!(publisher.load().is_empty());
    task.abort();
}

//! Test harness: the real `sluice` binary, real backends, real sockets on
//! loopback.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A free port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Lines sluice wrote to stderr, shared with a reader thread.
#[derive(Default)]
struct Log {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

/// A running `sluice` process with a file config.
pub struct Sluice {
    child: Option<Child>,
    /// Where /healthz, /livez, /readyz answer.
    pub health: SocketAddr,
    /// Where /metrics and /debug/table answer.
    pub admin: SocketAddr,
    pub config: PathBuf,
    _dir: tempfile::TempDir,
    log: Arc<Log>,
}

impl Sluice {
    pub fn start(config_yaml: &str, extra: &[&str]) -> Sluice {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("sluice.yaml");
        std::fs::write(&config, config_yaml).unwrap();
        let health = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("--config")
            .arg(&config)
            .arg(format!("--healthz-bind-address={health}"))
            .arg(format!("--metrics-bind-address={admin}"))
            .args(["--config-poll-interval", "100ms"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Log::default());
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("SLUICE_TEST_LOG").is_some() {
                    eprintln!("sluice| {line}");
                }
                sink.lines.lock().unwrap().push(line);
                sink.grew.notify_all();
            }
        });
        let s = Sluice {
            child: Some(child),
            health,
            admin,
            config,
            _dir: dir,
            log,
        };
        s.wait_log("table live generation=1", Duration::from_secs(10));
        s
    }

    /// Waits until a stderr line contains `needle`; panics with the log
    /// after `timeout`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "no log line containing {needle:?} within {timeout:?}; log:\n{}",
                    lines.join("\n")
                );
            }
            lines = self.log.grew.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }

    pub fn log_text(&self) -> String {
        self.log.lines.lock().unwrap().join("\n")
    }

    fn generation(&self) -> u64 {
        self.log
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.split("table live generation=").nth(1))
            .filter_map(|rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|d| d.parse().ok())
            })
            .max()
            .unwrap_or(0)
    }

    /// Replaces the config atomically and signals a reload.
    pub fn write_config(&self, yaml: &str) {
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
        self.signal(libc::SIGHUP);
    }

    /// Replaces the config and waits until the new table is live.
    pub fn reload(&self, yaml: &str) {
        let next = self.generation() + 1;
        self.write_config(yaml);
        self.wait_log(
            &format!("table live generation={next}"),
            Duration::from_secs(10),
        );
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({sig})");
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            if Instant::now() >= deadline {
                panic!("sluice did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `GET path` over HTTP/1.0; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: sluice\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// How a test backend treats each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Sends `<name>\n`, then echoes until EOF, then closes its write side.
    Echo,
    /// Sends `bye`, shuts down its write side, then counts what it still
    /// receives until EOF (reported as [`Event::Received`]).
    CloseThenSink,
    /// Reads one chunk, then aborts with a reset.
    ResetAfterRead,
}

/// What a backend observed, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Accepted,
    /// Bytes received before EOF.
    Received(u64),
    /// The connection failed with this error kind.
    Failed(std::io::ErrorKind),
}

/// A real TCP backend on loopback.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    events: mpsc::UnboundedReceiver<Event>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str, mode: Mode) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        let n = name.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let _ = tx.send(Event::Accepted);
                let tx = tx.clone();
                let n = n.clone();
                tokio::spawn(async move {
                    let ev = serve(sock, &n, mode).await;
                    let _ = tx.send(ev);
                });
            }
        });
        Backend {
            addr,
            name: name.to_string(),
            events,
            task,
        }
    }

    /// Stops accepting: later dials to it are refused.
    pub fn stop(&self) {
        self.task.abort();
    }

    /// The next event, or panics after `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Event {
        tokio::time::timeout(timeout, self.events.recv())
            .await
            .expect("backend event")
            .expect("backend alive")
    }

    /// Number of accepted connections reported so far (drains events).
    pub fn accepted_so_far(&mut self) -> usize {
        let mut n = 0;
        while let Ok(ev) = self.events.try_recv() {
            if ev == Event::Accepted {
                n += 1;
            }
        }
        n
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut sock: TcpStream, name: &str, mode: Mode) -> Event {
    let mut buf = vec![0u8; 64 * 1024];
    match mode {
        Mode::Echo => {
            if let Err(e) = sock.write_all(format!("{name}\n").as_bytes()).await {
                return Event::Failed(e.kind());
            }
            let mut total = 0u64;
            loop {
                match sock.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        total += n as u64;
                        if let Err(e) = sock.write_all(&buf[..n]).await {
                            return Event::Failed(e.kind());
                        }
                    }
                    Err(e) => return Event::Failed(e.kind()),
                }
            }
            let _ = sock.shutdown().await;
            Event::Received(total)
        }
        Mode::CloseThenSink => {
            if let Err(e) = sock.write_all(b"bye").await {
                return Event::Failed(e.kind());
            }
            if let Err(e) = sock.shutdown().await {
                return Event::Failed(e.kind());
            }
            let mut total = 0u64;
            loop {
                match sock.read(&mut buf).await {
                    Ok(0) => return Event::Received(total),
                    Ok(n) => total += n as u64,
                    Err(e) => return Event::Failed(e.kind()),
                }
            }
        }
        Mode::ResetAfterRead => {
            let _ = sock.read(&mut buf).await;
            let _ = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO));
            drop(sock);
            Event::Received(0)
        }
    }
}

/// Connects to sluice and reads the backend's name line.
pub async fn connect_named(addr: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let name = read_line(&mut s).await;
    (s, name)
}

/// Reads one `\n`-terminated line (without it).
pub async fn read_line(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("line in time")
            .expect("read");
        if n == 0 || b[0] == b'\n' {
            return String::from_utf8(out).unwrap();
        }
        out.push(b[0]);
    }
}

/// A YAML config with one service on `listen` and the given backends,
/// each `(addr, state)` where state is one of ready|terminating|
/// terminating-not-serving|not-ready.
pub fn config(listen: SocketAddr, backends: &[(SocketAddr, &str)]) -> String {
    if backends.is_empty() {
        return format!("services:\n  - name: test\n    listen: {listen}\n    backends: []\n");
    }
    let mut y = format!("services:\n  - name: test\n    listen: {listen}\n    backends:\n");
    for (a, state) in backends {
        y.push_str(&format!("      - address: {a}\n"));
        match *state {
            "ready" => {}
            "terminating" => y.push_str(
                "        ready: false\n        serving: true\n        terminating: true\n",
            ),
            "terminating-not-serving" => y.push_str(
                "        ready: false\n        serving: false\n        terminating: true\n",
            ),
            "not-ready" => y.push_str("        ready: false\n"),
            other => panic!("unknown state {other}"),
        }
    }
    y
}

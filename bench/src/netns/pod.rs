//! A pod: the built-in backend in its own process inside the pod's network
//! namespace (`ip netns exec NS sluice-bench netns-pod …`).
//!
//! A separate process rather than a thread that entered the namespace, so
//! that "the process dies" is a real process death: the kernel closes
//! whatever sockets it still holds, and the namespace
//! is freed once deleted, as with a container. On SIGTERM it shuts down
//! like a well-behaved application (listener closed, requests in flight
//! finish, exit). The pod also exits when its stdin closes, so it never
//! outlives the bench.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use crate::backend::Backend;

#[derive(Debug, Clone, clap::Args)]
pub struct PodArgs {
    /// Pod address to listen on (10.244.0.0/24, inside a pod namespace).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Id the backend answers with.
    #[arg(long)]
    pub id: String,
}

/// After SIGTERM: how long requests in flight may finish (they take ~1 ms).
const DRAIN: Duration = Duration::from_millis(200);

/// Longest a pod lives, whatever happens.
const POD_LIMIT: Duration = Duration::from_secs(15 * 60);

fn netns_ino(path: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Inside the pod: serve until killed, stdin closed, or [`POD_LIMIT`].
pub async fn run(a: PodArgs) -> Result<ExitCode> {
    let ip = match a.listen {
        SocketAddr::V4(v4) => *v4.ip(),
        SocketAddr::V6(_) => bail!("netns-pod: {} is not IPv4", a.listen),
    };
    anyhow::ensure!(
        super::topo::is_pod_cidr(ip),
        "netns-pod: {ip} is outside 10.244.0.0/24"
    );
    anyhow::ensure!(
        netns_ino("/proc/self/ns/net") != netns_ino("/proc/1/ns/net"),
        "netns-pod must run inside a pod's network namespace (ip netns exec)"
    );
    let b = Backend::start_unchecked(&a.id, a.listen).await?;
    println!("ready {}", b.addr());
    // stdin closes when the bench goes away (tokio's async stdin is not
    // enabled in this workspace: a blocking read on a plain thread, which
    // does not hold the runtime's shutdown up).
    let (closed_tx, stdin_closed) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        use std::io::Read as _;
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while let Ok(k) = stdin.read(&mut buf) {
            if k == 0 {
                break;
            }
        }
        let _ = closed_tx.send(());
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("netns-pod: SIGTERM handler")?;
    tokio::select! {
        _ = tokio::time::timeout(POD_LIMIT, stdin_closed) => {}
        _ = term.recv() => {
            // Graceful, as an application does on the kubelet's SIGTERM:
            // stop accepting (new dials are refused), let the requests in
            // flight finish, exit.
            b.stop_accepting();
            tokio::time::sleep(DRAIN).await;
        }
    }
    drop(b);
    Ok(ExitCode::SUCCESS)
}

/// A running pod process. Dropping it kills the process.
#[derive(Debug)]
pub struct Pod {
    pub id: String,
    pub addr: SocketAddr,
    child: Child,
    _stdin: Option<ChildStdin>,
}

impl Pod {
    /// Starts `exe netns-pod` in namespace `ns` and waits for it to listen.
    pub async fn start(exe: &Path, ns: &str, id: &str, addr: SocketAddr) -> Result<Self> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(exe)
            .args(["netns-pod", "--listen", &addr.to_string(), "--id", id])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting pod {id} in {ns}"))?;
        let stdin = child.stdin.take();
        let out = child.stdout.take().context("pod stdout")?;
        let mut line = String::new();
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            BufReader::new(out).read_line(&mut line),
        )
        .await;
        match read {
            Ok(Ok(_)) if line.starts_with("ready ") => {}
            other => bail!("pod {id} in {ns} did not come up ({other:?}, line {line:?})"),
        }
        Ok(Self {
            id: id.to_string(),
            addr,
            child,
            _stdin: stdin,
        })
    }

    /// SIGTERM: the pod stops accepting, lets the requests in flight
    /// finish and exits.
    pub fn terminate(&mut self) {
        sigterm(&self.child);
    }

    /// Waits for the process to exit, up to `patience`, then SIGKILLs it.
    /// Returns whether it had exited on its own.
    pub async fn reap(&mut self, patience: Duration) -> Result<bool> {
        let what = format!("pod {}", self.id);
        reap_child(&mut self.child, patience, &what).await
    }
}

/// Sends SIGTERM to `child` (if it still runs).
pub(super) fn sigterm(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

/// Waits up to `patience` for `child` (named `what` in errors) to exit,
/// then SIGKILLs it. Returns whether it had exited on its own.
pub(super) async fn reap_child(child: &mut Child, patience: Duration, what: &str) -> Result<bool> {
    if let Ok(r) = tokio::time::timeout(patience, child.wait()).await {
        r?;
        return Ok(true);
    }
    let _ = child.start_kill();
    tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .with_context(|| format!("{what} did not die within 5s of SIGKILL"))??;
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{ErrorKind, Outcome, request};
    use std::sync::atomic::AtomicU64;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn graceful_stop_refuses_new_dials_and_finishes_open_ones() {
        let b = Backend::start("p-1", "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        // Half a request in flight.
        let mut c = tokio::net::TcpStream::connect(b.addr()).await.unwrap();
        c.write_all(b"GET ").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        b.stop_accepting();
        let local = AtomicU64::new(0);
        let mut refused = false;
        for _ in 0..100 {
            let o = request(b.addr(), 1, None, &local, Duration::from_secs(2)).await;
            if o == Outcome::Failed(ErrorKind::Refused) {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(refused, "a draining backend must refuse new dials");
        // The open connection still gets its answer.
        c.write_all(b"7\n").await.unwrap();
        let mut resp = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut resp))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp, b"p-1 7\n");
    }
}

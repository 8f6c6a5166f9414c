//! `--nginx`: nginx's `stream` UDP proxy (Debian's `nginx` with
//! `libnginx-mod-stream`) in front of the same backend, as a third phase
//! of each round: what another userspace proxy gets on the same machine,
//! with the same clients and the same server.
//!
//! Configured as an operator would for DNS: `worker_processes auto` (one
//! per CPU), the UDP listener in a `reuseport` group so every worker
//! receives, `proxy_responses 1` (one answer per query, so a session ends
//! at its answer), and a timeout above the clients' own. Its CPU per query
//! is that of its master and workers together.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

use super::{Backend, probe};

/// A running nginx; killed (with its workers) on drop.
pub struct Nginx {
    pub addr: SocketAddr,
    /// The master's pid, also its process group's id.
    pid: u32,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// nginx on a free loopback UDP port, proxying to `backend` (which
    /// answers as `kind` does). The port is free when picked; if another
    /// program takes it first, nginx exits at start and another port is
    /// tried, up to 3 times.
    pub async fn start(backend: SocketAddr, kind: Backend) -> Result<Self> {
        let bin = crate::compare::proxies::which("nginx")
            .context("--nginx: `nginx` is not on PATH (apt-get install nginx)")?;
        let mut failure = None;
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("sluice-bench-dns-nginx-")
                .tempdir()?;
            let addr = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?;
            let conf = dir.path().join("nginx.conf");
            std::fs::write(&conf, config(dir.path(), addr, backend))?;
            let log = std::fs::File::create(dir.path().join("nginx.log"))?;
            let mut child = Command::new(&bin)
                .arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log))
                // Its own process group, master and workers: killed together.
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            let pid = child.id().context("nginx has no pid")?;
            match probe(addr, kind).await {
                Ok(()) => {
                    return Ok(Self {
                        addr,
                        pid,
                        child,
                        _dir: dir,
                    });
                }
                Err(e) => {
                    let exited = child.try_wait()?.is_some();
                    kill_group(pid);
                    let _ = child.start_kill();
                    let read =
                        |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
                    let why = format!(
                        "nginx never answered on {addr} (UDP): {e:#}\n{}{}",
                        read("nginx.log"),
                        read("error.log")
                    );
                    if !exited {
                        bail!(why);
                    }
                    failure = Some(why);
                }
            }
        }
        bail!(failure.unwrap_or_else(|| "nginx did not start".to_string()))
    }

    /// utime + stime of the master and its workers, in seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let own = crate::compare::cpu::cpu_seconds(self.pid)?;
        let workers: f64 = sluice_testkit::process::children(self.pid)
            .into_iter()
            .filter_map(|w| crate::compare::cpu::cpu_seconds(w.pid))
            .sum();
        Some(own + workers)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // Workers outlive a killed master: the whole group goes at once.
        kill_group(self.pid);
        let _ = self.child.start_kill();
    }
}

/// SIGKILL to the process group `pgid` leads (nginx's master and workers).
fn kill_group(pgid: u32) {
    if let Ok(pgid) = i32::try_from(pgid) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The configuration: see the module doc.
fn config(dir: &Path, listen: SocketAddr, backend: SocketAddr) -> String {
    let load = crate::compare::proxies::nginx_stream_module();
    format!(
        "{load}daemon off;\nworker_processes auto;\nworker_rlimit_nofile 100000;\n\
         pid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
         events {{ worker_connections 50000; }}\n\
         stream {{\n  server {{\n    listen {listen} udp reuseport;\n    proxy_pass {backend};\n\
             proxy_responses 1;\n    proxy_timeout 10s;\n  }}\n}}\n",
        dir = dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_proxies_udp_from_every_worker_one_answer_per_query() {
        let c = config(
            Path::new("/tmp/x"),
            "127.0.0.1:5300".parse().unwrap(),
            "127.0.0.1:5301".parse().unwrap(),
        );
        assert!(c.contains("listen 127.0.0.1:5300 udp reuseport;"), "{c}");
        assert!(c.contains("proxy_pass 127.0.0.1:5301;"), "{c}");
        assert!(c.contains("proxy_responses 1;"), "{c}");
        assert!(c.contains("worker_processes auto;"), "{c}");
        assert!(c.contains("pid /tmp/x/nginx.pid;"), "{c}");
    }
}

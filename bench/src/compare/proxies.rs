//! The paths under test: direct, sluice (and its variants and a baseline
//! binary), HAProxy and nginx, each started pinned to the proxy CPU with an
//! equivalent configuration.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use super::cpu::{pin_process, pin_thread};
use super::{CompareArgs, PathKind};
use crate::sluice::{self, BackendCfg, Config, ServiceCfg, Sluice};

/// A proxy under test: where it listens and its pid.
enum Running {
    Sluice(Sluice),
    Other { child: Child, pid: u32 },
}

pub struct Proxy {
    pub kind: PathKind,
    pub http: SocketAddr,
    pub bulk: SocketAddr,
    running: Option<Running>,
    _dir: Option<tempfile::TempDir>,
    /// An nftables table of this path, deleted when it stops, so that the
    /// next path runs without it (and without conntrack).
    nft_table: Option<&'static str>,
}

impl Proxy {
    pub fn pid(&self) -> Option<u32> {
        match self.running.as_ref()? {
            Running::Sluice(s) => Some(s.pid().unsigned_abs()),
            Running::Other { pid, .. } => Some(*pid),
        }
    }

    pub async fn stop(&mut self) {
        match self.running.take() {
            Some(Running::Sluice(mut s)) => {
                let _ = s.stop(Duration::from_secs(5)).await;
            }
            Some(Running::Other { mut child, .. }) => {
                let _ = child.kill().await;
            }
            None => {}
        }
        if let Some(table) = self.nft_table.take()
            && let Err(e) = nft(&format!("delete table {table}\n"))
        {
            eprintln!("compare: {e:#}");
        }
    }
}

/// sluice's table with `--intercept nftables`.
const SLUICE_TABLE: &str = "inet sluice";

/// The `sluice-ct` path's table: one empty nat chain, which is enough to
/// turn connection tracking (and NAT lookups) on for every connection.
const CT_TABLE: &str = "inet sluice-bench-ct";

/// The `nft-dnat` path's table: kube-proxy's nftables shape
/// ([`crate::netns::nft`]).
const DNAT_TABLE: &str = "ip kube-proxy";

/// Runs `nft -f -` with `script` in the calling thread's namespace (a
/// short blocking call, outside any measured phase).
fn nft(script: &str) -> Result<()> {
    sluice_testkit::netns::run("nft", &["-f", "-"], Some(script))
}

fn listen_addr() -> Result<SocketAddr> {
    Ok(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        sluice::free_port(Ipv4Addr::LOCALHOST)?,
    ))
}

/// Where a server binary is: on PATH, or in an sbin directory that a
/// non-root PATH often lacks (Debian puts nginx and haproxy in /usr/sbin).
pub(crate) fn which(bin: &str) -> Option<PathBuf> {
    sluice_testkit::on_path(bin).or_else(|| {
        ["/usr/sbin", "/usr/local/sbin", "/sbin"]
            .iter()
            .map(|d| Path::new(d).join(bin))
            .find(|p| p.is_file())
    })
}

fn haproxy_config(
    maxconn: u64,
    http: SocketAddr,
    bulk: SocketAddr,
    b_http: SocketAddr,
    b_bulk: SocketAddr,
) -> String {
    format!(
        "global\n  nbthread 1\n  maxconn {maxconn}\n  maxpipes {HAPROXY_MAXPIPES}\n\n\
         defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 10m\n  timeout server 10m\n  option splice-auto\n\n\
         listen http\n  bind {http}\n  server b1 {b_http}\n\n\
         listen bulk\n  bind {bulk}\n  server b1 {b_bulk}\n"
    )
}

/// Pipes HAProxy may hold for splicing (two descriptors each).
const HAPROXY_MAXPIPES: u64 = 500;

/// HAProxy refuses to start unless it can have 2 × maxconn + 2 × maxpipes
/// and a few more descriptors.
fn haproxy_maxconn() -> u64 {
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    (limit.saturating_sub(2 * HAPROXY_MAXPIPES + 300) / 2).clamp(100, 50_000)
}

/// The `load_module` line for nginx's `stream` module where Debian's
/// `libnginx-mod-stream` put it (empty when nginx has it built in).
pub(crate) fn nginx_stream_module() -> String {
    let module = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
    if module.is_file() {
        format!("load_module {};\n", module.display())
    } else {
        String::new()
    }
}

fn nginx_config(
    dir: &Path,
    http: SocketAddr,
    bulk: SocketAddr,
    b_http: SocketAddr,
    b_bulk: SocketAddr,
) -> String {
    let load = nginx_stream_module();
    format!(
        "{load}daemon off;\nmaster_process off;\nworker_processes 1;\nworker_rlimit_nofile 100000;\n\
         pid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
         events {{ worker_connections 50000; }}\n\
         stream {{\n  proxy_connect_timeout 1s;\n  proxy_timeout 10m;\n\
           server {{ listen {http} backlog=4096; proxy_pass {b_http}; }}\n\
           server {{ listen {bulk} backlog=4096; proxy_pass {b_bulk}; }}\n}}\n",
        dir = dir.display()
    )
}

async fn wait_listening(addrs: &[SocketAddr], child: &mut Child, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for a in addrs {
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("{what} exited at start ({status})");
            }
            if TcpStream::connect(a).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("{what} does not accept on {a} within 10s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Starts `kind` pinned to `cpu`, in front of the two backends. `None` when
/// that proxy is not installed.
pub async fn start_proxy(
    kind: PathKind,
    cpu: usize,
    load_cpu: usize,
    args: &CompareArgs,
    b_http: SocketAddr,
    b_bulk: SocketAddr,
    b_sink: SocketAddr,
) -> Result<Option<Proxy>> {
    let http = listen_addr()?;
    let bulk = listen_addr()?;
    match kind {
        PathKind::Direct => Ok(Some(Proxy {
            kind,
            http: b_http,
            bulk: b_bulk,
            running: None,
            _dir: None,
            nft_table: None,
        })),
        PathKind::NftDnat => {
            // The service addresses are the free loopback ports picked
            // above, with nothing listening: the output hook's DNAT sends
            // each connection to its backend, as kube-proxy's nftables mode
            // does with a ClusterIP (conntrack undoes it on the replies).
            let v4 = |a: SocketAddr| match a {
                SocketAddr::V4(a) => Ok(a),
                SocketAddr::V6(_) => bail!("nft-dnat: {a} is not IPv4"),
            };
            let rules = crate::netns::nft::ruleset_services(&[
                ("http", "tcp", v4(http)?, &[v4(b_http)?]),
                ("bulk", "tcp", v4(bulk)?, &[v4(b_bulk)?]),
            ])?;
            nft(&rules)?;
            Ok(Some(Proxy {
                kind,
                http,
                bulk,
                running: None,
                _dir: None,
                nft_table: Some(DNAT_TABLE),
            }))
        }
        PathKind::Sluice
        | PathKind::SluiceCopy
        | PathKind::SluiceSplice
        | PathKind::SluiceShared
        | PathKind::SluiceNft
        | PathKind::SluiceCt
        | PathKind::SluiceTp
        | PathKind::Baseline => {
            let bin = if kind == PathKind::Baseline {
                match &args.baseline {
                    Some(b) => b.clone(),
                    None => return Ok(None),
                }
            } else {
                sluice::locate(args.sluice.sluice.as_deref())?
            };
            let probe = listen_addr()?;
            let cfg = Config {
                services: vec![
                    // The readiness probe of Sluice::start_with speaks the bench
                    // backend's protocol: it goes to the built-in sink.
                    ServiceCfg::new("probe", probe, vec![BackendCfg::ready(b_sink)]),
                    ServiceCfg::new("bulk", bulk, vec![BackendCfg::ready(b_bulk)]),
                    ServiceCfg::new("http", http, vec![BackendCfg::ready(b_http)]),
                ],
            };
            // No admin endpoints: nothing to measure there, and their
            // default ports may be taken.
            let mut env = vec![
                ("SLUICE_HEALTHZ_BIND_ADDRESS", ""),
                ("SLUICE_METRICS_BIND_ADDRESS", ""),
            ];
            match kind {
                PathKind::SluiceCopy => env.push(("SLUICE_FORWARD", "copy")),
                PathKind::SluiceSplice => env.push(("SLUICE_FORWARD", "splice")),
                PathKind::SluiceShared => env.push(("SLUICE_WORKERS", "0")),
                _ => {}
            }
            let workers = args.sluice_workers.map(|n| n.to_string());
            if let (Some(n), PathKind::Sluice | PathKind::SluiceCopy | PathKind::SluiceSplice) =
                (&workers, kind)
            {
                env.push(("SLUICE_WORKERS", n));
            }
            let mut extra = Vec::new();
            let nft_table = match kind {
                PathKind::SluiceNft | PathKind::SluiceTp => {
                    let port = sluice::free_port(Ipv4Addr::UNSPECIFIED)?.to_string();
                    extra = ["--intercept", "nftables", "--intercept-port", &port]
                        .map(String::from)
                        .to_vec();
                    if kind == PathKind::SluiceTp {
                        // The load's address (127.0.0.1) counts as a local
                        // pod: every dial is transparent.
                        extra.extend(
                            [
                                "--source-ip",
                                "transparent",
                                "--detect-local-mode",
                                "ClusterCIDR",
                                "--cluster-cidr",
                                "127.0.0.0/8",
                            ]
                            .map(String::from),
                        );
                    }
                    Some(SLUICE_TABLE)
                }
                PathKind::SluiceCt => {
                    nft(&format!(
                        "table {CT_TABLE} {{\n  chain output {{\n    type nat hook output priority -100; policy accept;\n  }}\n}}\n"
                    ))?;
                    Some(CT_TABLE)
                }
                _ => None,
            };
            // The child inherits the spawning thread's affinity: this thread
            // (the only one of the load runtime) moves to the proxy's CPU
            // for the start, then everything moves back.
            pin_thread(cpu)?;
            let s = Sluice::start_with(&bin, &args.sluice, &extra, &cfg, probe, None, &env).await;
            pin_process(load_cpu)?;
            let mut proxy = Proxy {
                kind,
                http,
                bulk,
                running: None,
                _dir: None,
                nft_table,
            };
            match s {
                Ok(s) => {
                    proxy.running = Some(Running::Sluice(s));
                    Ok(Some(proxy))
                }
                Err(e) => {
                    proxy.stop().await; // removes the table
                    Err(e)
                }
            }
        }
        PathKind::Haproxy | PathKind::Nginx => {
            let name = if kind == PathKind::Haproxy {
                "haproxy"
            } else {
                "nginx"
            };
            let Some(bin) = which(name) else {
                return Ok(None);
            };
            let dir = tempfile::Builder::new()
                .prefix("sluice-bench-compare-")
                .tempdir()?;
            let cfg_path = dir.path().join(format!("{name}.conf"));
            let log = std::fs::File::create(dir.path().join(format!("{name}.log")))?;
            let mut cmd = Command::new(&bin);
            if kind == PathKind::Haproxy {
                std::fs::write(
                    &cfg_path,
                    haproxy_config(haproxy_maxconn(), http, bulk, b_http, b_bulk),
                )?;
                cmd.arg("-db").arg("-f").arg(&cfg_path);
            } else {
                std::fs::write(
                    &cfg_path,
                    nginx_config(dir.path(), http, bulk, b_http, b_bulk),
                )?;
                cmd.arg("-p")
                    .arg(dir.path())
                    .arg("-e")
                    .arg(dir.path().join("error.log"))
                    .arg("-c")
                    .arg(&cfg_path);
            }
            cmd.stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log))
                .kill_on_drop(true);
            pin_thread(cpu)?;
            let spawned = cmd.spawn();
            pin_process(load_cpu)?;
            let mut child = spawned.with_context(|| format!("starting {}", bin.display()))?;
            let pid = child.id().context("no pid")?;
            if let Err(e) = wait_listening(&[http, bulk], &mut child, name).await {
                let log = std::fs::read_to_string(dir.path().join(format!("{name}.log")))
                    .unwrap_or_default();
                bail!("{e:#}\n{log}");
            }
            Ok(Some(Proxy {
                kind,
                http,
                bulk,
                running: Some(Running::Other { child, pid }),
                _dir: Some(dir),
                nft_table: None,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_name_every_address() {
        let a: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:1002".parse().unwrap();
        let c: SocketAddr = "127.0.5.1:2001".parse().unwrap();
        let d: SocketAddr = "127.0.5.2:2002".parse().unwrap();
        let h = haproxy_config(1000, a, b, c, d);
        for x in [a, b, c, d] {
            assert!(h.contains(&x.to_string()), "{h}");
        }
        assert!(h.contains("mode tcp") && h.contains("nbthread 1"));
        let n = nginx_config(Path::new("/tmp/x"), a, b, c, d);
        for x in [a, b, c, d] {
            assert!(n.contains(&x.to_string()), "{n}");
        }
        assert!(n.contains("master_process off") && n.contains("stream {"));
    }
}

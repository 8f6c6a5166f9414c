//! Network namespaces driven through `ip` (iproute2): create and delete
//! them, veth pairs between them, and code run inside one from a thread of
//! its own (so every socket and child process it makes lives there).
//! Needs root.

use std::fs::File;
use std::future::Future;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

/// Runs `prog ARGS` with `stdin` fed in; an error names the command and
/// quotes its stderr.
pub fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
    use std::io::Write as _;
    let mut child = Command::new(prog)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{prog}` (is it installed?)"))?;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(text.as_bytes())
            .with_context(|| format!("writing to `{prog}`"))?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{prog} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Why a test that needs root and `tools` cannot run here: `Some` when
/// this process is not root or a tool is not on `PATH`. Such tests print
/// the reason and return (CI installs every tool, see `.ci/run`).
pub fn unusable(tools: &[&str]) -> Option<String> {
    if !std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        return Some("not root".into());
    }
    (tools.iter().find(|t| crate::on_path(t).is_none()))
        .map(|tool| format!("`{tool}` is not installed"))
}

/// Runs `ip ARGS`.
pub fn ip(args: &[&str]) -> Result<()> {
    run("ip", args, None)
}

fn path(name: &str) -> String {
    format!("/run/netns/{name}")
}

pub fn exists(name: &str) -> bool {
    Path::new(&path(name)).exists()
}

/// Creates namespace `name` with `lo` up (local delivery, also to
/// addresses on a down device, goes through it).
pub fn add(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])
}

/// A veth pair: `dev` in namespace `ns`, its peer `peer` in `peer_ns`.
pub fn add_veth(ns: &str, dev: &str, peer_ns: &str, peer: &str) -> Result<()> {
    ip(&[
        "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", peer, "netns", peer_ns,
    ])
}

/// Kills every process in namespace `name`, then deletes it. Quiet and
/// idempotent: for cleanup paths.
pub fn remove(name: &str) {
    if !exists(name) {
        return;
    }
    if let Ok(out) = Command::new("ip")
        .args(["netns", "pids", name])
        .stderr(Stdio::null())
        .output()
    {
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Moves the calling thread into namespace `name`, and checks it is there.
/// Sockets and child processes the thread creates afterwards live there.
pub fn enter(name: &str) -> Result<()> {
    let path = path(name);
    let f = File::open(&path).with_context(|| format!("opening {path}"))?;
    setns(&f, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns({path})"))?;
    let want = std::fs::metadata(&path)?.ino();
    let have = std::fs::metadata("/proc/thread-self/ns/net")?.ino();
    anyhow::ensure!(
        want == have,
        "after setns({path}) the thread is in netns inode {have}, not {want}"
    );
    Ok(())
}

/// Runs `f` on a fresh thread inside namespace `name`.
pub fn in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let owned = name.to_string();
    std::thread::spawn(move || {
        enter(&owned)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in netns {name} panicked"))?
}

/// dnsmasq in a pod namespace, listening on `ip` port 53 and answering
/// `name` (type A) with `answer` from its own records (no upstream);
/// killed on drop. Needs Debian's `dnsmasq-base`.
#[derive(Debug)]
pub struct Dnsmasq(std::process::Child);

impl Dnsmasq {
    pub fn start(pod: &Netns, ip: &str, name: &str, answer: &str) -> Result<Self> {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                pod.name(),
                "dnsmasq",
                "--keep-in-foreground",
            ])
            .args(["--conf-file=/dev/null", "--no-resolv", "--no-hosts"])
            .args([
                "--bind-interfaces",
                "--pid-file=",
                "--user=root",
                "--port=53",
            ])
            .arg(format!("--listen-address={ip}"))
            .arg(format!("--host-record={name},{answer}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting dnsmasq in {}", pod.name()))?;
        Ok(Self(child))
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// br_netfilter's switch: whether bridged IPv4 goes through the IP hooks
/// (present only while the module is loaded).
pub const BRIDGE_NF_CALL_IPTABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// A namespace of one's own, deleted (with what runs in it) on drop, also
/// on panic.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` ([`add`]).
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let ns = Self { name: name.into() };
        add(&ns.name)?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        ip(&[&["-n", self.name.as_str()], args].concat())
    }

    /// `ip netns exec NAME`: the prefix that runs a program inside (e.g.
    /// `daemon::Options::prefix`).
    pub fn exec_prefix(&self) -> Vec<String> {
        ["ip", "netns", "exec", self.name.as_str()]
            .map(String::from)
            .to_vec()
    }

    /// Writes a sysctl file of this namespace (a `/proc/sys/net` file
    /// belongs to the namespace of the thread that opens it).
    pub fn write_sysctl(&self, path: &'static str, value: &'static str) -> Result<()> {
        in_netns(&self.name, move || {
            std::fs::write(path, value).with_context(|| format!("writing {path}"))
        })
    }

    /// A mini node's pod network in this (node) namespace: bridge `br0`
    /// with address `gateway` (`IP/LEN`), and each `(pod, ip)` on it by a
    /// veth (`{veth_prefix}{i}` here, `eth0` in the pod) with `ip/LEN` and a
    /// default route via the gateway. With br_netfilter loaded, bridged
    /// traffic goes through the IP hooks (`bridge-nf-call-iptables=1`, as
    /// kubeadm requires).
    pub fn bridge_pods(
        &self,
        gateway: &str,
        pods: &[(&Netns, &str)],
        veth_prefix: &str,
    ) -> Result<()> {
        let (gw_ip, len) = gateway
            .split_once('/')
            .with_context(|| format!("gateway {gateway}: not IP/LEN"))?;
        if std::path::Path::new(BRIDGE_NF_CALL_IPTABLES).exists() {
            self.write_sysctl(BRIDGE_NF_CALL_IPTABLES, "1")?;
        }
        self.ip(&["link", "add", "br0", "type", "bridge"])?;
        self.ip(&["addr", "add", gateway, "dev", "br0"])?;
        self.ip(&["link", "set", "br0", "up"])?;
        for (i, (pod, ip)) in pods.iter().enumerate() {
            let host_end = format!("{veth_prefix}{i}");
            add_veth(&self.name, &host_end, pod.name(), "eth0")?;
            self.ip(&["link", "set", &host_end, "master", "br0", "up"])?;
            pod.ip(&["addr", "add", &format!("{ip}/{len}"), "dev", "eth0"])?;
            pod.ip(&["link", "set", "eth0", "up"])?;
            pod.ip(&["route", "add", "default", "via", gw_ip])?;
        }
        Ok(())
    }

    /// Runs the future `f` makes inside the namespace, on a current-thread
    /// runtime of its own, for at most `within`.
    pub fn block_on<T, F, Fut>(&self, within: Duration, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        let name = self.name.clone();
        in_netns(&self.name, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move { tokio::time::timeout(within, f()).await })
                .with_context(|| format!("timed out after {within:?} in netns {name}"))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_runs_inside_and_the_namespace_goes_on_drop() {
        let ns = Netns::new(format!("sluice-kit-{}", std::process::id())).unwrap();
        let name = ns.name().to_string();
        let links = ns
            .block_on(Duration::from_secs(5), || async {
                std::fs::read_to_string("/proc/thread-self/net/dev").unwrap()
            })
            .unwrap();
        // Only `lo` lives in a fresh namespace.
        assert_eq!(links.lines().skip(2).count(), 1, "{links}");
        assert!(links.contains("lo:"), "{links}");
        drop(ns);
        assert!(!exists(&name));
    }
}

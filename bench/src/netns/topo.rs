//! The mini node: network namespaces, veth pairs, the bridge, the VIP
//! device, entering a namespace from a thread, and removing it all.
//!
//! Layout of one run (`<p>` = `sb-<pid>-<run>`):
//! - `<p>-node`: bridge `sb-br0` 10.244.0.1/24 (the pod CIDR gateway, as a
//!   bridge CNI has it), `bridge-nf-call-iptables=1`, `ip_forward=1`, and an
//!   `ifb` device `sb-vip0` left down for the Service IPs (no dummy driver
//!   on this kernel). No default route: nothing is routed anywhere else.
//! - `<p>-client`: `eth0` 10.244.0.2/24, default route via the bridge.
//! - `<p>-old-<i>` / `<p>-new-<i>`: a pod, `eth0` with its own IP, default
//!   route via the bridge, and a backend process started in it.
//!
//! Every address exists only inside these namespaces, which have no link to
//! the host's interfaces.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use sluice_testkit::netns;

/// Every namespace the bench creates starts with this.
pub const PREFIX: &str = "sb-";
/// The node's bridge (the CNI bridge).
pub const BRIDGE: &str = "sb-br0";
/// The bridge's own MAC (locally administered).
pub const BRIDGE_MAC: &str = "02:00:0a:f4:00:01";
/// The node's device for Service IPs (`--vip-interface`), left down.
pub const VIP_DEV: &str = "sb-vip0";
/// The bridge's address: the pods' gateway.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
/// The Service VIP and port.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const VIP_PORT: u16 = 80;
/// The port every pod's backend listens on.
pub const POD_PORT: u16 = 8080;
/// Most pods of one generation (old or new).
pub const MAX_PODS: usize = 80;

/// Old or new generation of the Deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gen {
    Old,
    New,
}

impl Gen {
    pub fn as_str(self) -> &'static str {
        match self {
            Gen::Old => "old",
            Gen::New => "new",
        }
    }
}

/// A pod's IP: old-i at 10.244.0.(10+i), new-i at 10.244.0.(100+i).
pub fn pod_ip(g: Gen, i: usize) -> Ipv4Addr {
    let base = match g {
        Gen::Old => 10,
        Gen::New => 100,
    };
    Ipv4Addr::new(10, 244, 0, (base + i.min(MAX_PODS - 1)) as u8)
}

/// Whether `ip` is one of the addresses this module hands out (pod CIDR).
pub fn is_pod_cidr(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 10 && o[1] == 244 && o[2] == 0
}

/// The namespace names of one run.
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// `sb-<pid>-<run>`.
    pub fn new(pid: u32, run: usize) -> Self {
        Self {
            prefix: format!("{PREFIX}{pid}-{run}"),
        }
    }

    pub fn node(&self) -> String {
        format!("{}-node", self.prefix)
    }

    pub fn client(&self) -> String {
        format!("{}-client", self.prefix)
    }

    pub fn pod(&self, g: Gen, i: usize) -> String {
        format!("{}-{}-{}", self.prefix, g.as_str(), i + 1)
    }

    /// Every name this run may create, pods first.
    pub fn all(&self, n: usize) -> Vec<String> {
        let mut v = Vec::with_capacity(2 * n + 2);
        for i in 0..n {
            v.push(self.pod(Gen::Old, i));
            v.push(self.pod(Gen::New, i));
        }
        v.push(self.client());
        v.push(self.node());
        v
    }
}

pub use sluice_testkit::netns::{enter, in_netns, ip, remove, run};

/// Writes a sysctl inside namespace `ns` (no dependency on `sysctl`).
fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let v = value.to_string();
    in_netns(ns, move || {
        std::fs::write(&path, &v).with_context(|| format!("writing {v} to {path}"))
    })
    .with_context(|| format!("sysctl {key}={value} in {ns}"))
}

/// The node and client namespaces of one run; dropping it deletes every
/// namespace of the run (pods included) after killing what runs in them.
#[derive(Debug)]
pub struct Topology {
    names: Names,
    all: Vec<String>,
}

impl Topology {
    /// Creates the node (bridge, VIP device, sysctls) and the client.
    pub fn create(names: &Names, n: usize) -> Result<Self> {
        let topo = Self {
            names: names.clone(),
            all: names.all(n),
        };
        let node = names.node();
        let client = names.client();
        let node_cidr = format!("{NODE_IP}/24");
        netns::add(&node)?;
        // A fixed MAC, as CNI bridges set it: otherwise the bridge takes the
        // lowest MAC of its ports and changes it when that port's pod goes,
        // and every pod's ARP entry for the gateway turns into a black hole.
        ip(&[
            "-n", &node, "link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge",
        ])?;
        ip(&["-n", &node, "addr", "add", &node_cidr, "dev", BRIDGE])?;
        ip(&["-n", &node, "link", "set", BRIDGE, "up"])?;
        ip(&["-n", &node, "link", "add", VIP_DEV, "type", "ifb"])
            .context("creating the ifb device for the Service IPs")?;
        sysctl(&node, "net.ipv4.ip_forward", "1")?;
        sysctl(&node, "net.bridge.bridge-nf-call-iptables", "1")
            .context("br_netfilter is needed (modprobe br_netfilter)")?;
        attach(names, &client, "vc", CLIENT_IP)?;
        Ok(topo)
    }

    pub fn names(&self) -> &Names {
        &self.names
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in &self.all {
            remove(ns);
        }
    }
}

/// Creates namespace `ns` with `eth0` at `addr` on the node's bridge
/// (node-side end `veth_name`), default route via the bridge.
pub fn attach(names: &Names, ns: &str, veth_name: &str, addr: Ipv4Addr) -> Result<()> {
    anyhow::ensure!(is_pod_cidr(addr), "{addr} is outside 10.244.0.0/24");
    let node = names.node();
    let cidr = format!("{addr}/24");
    let gw = NODE_IP.to_string();
    netns::add(ns)?;
    netns::add_veth(ns, "eth0", &node, veth_name)?;
    ip(&[
        "-n", &node, "link", "set", veth_name, "master", BRIDGE, "up",
    ])?;
    ip(&["-n", ns, "addr", "add", &cidr, "dev", "eth0"])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    ip(&["-n", ns, "route", "add", "default", "via", &gw])?;
    Ok(())
}

/// The pid in a name `sb-<pid>-<run>-...` (None for any other name,
/// which this module never touches).
pub fn owner_pid(name: &str) -> Option<u32> {
    let mut parts = name.strip_prefix(PREFIX)?.split('-');
    let pid = parts.next()?.parse().ok()?;
    parts.next()?.parse::<usize>().ok()?;
    parts.next()?;
    Some(pid)
}

/// Whether `pid` is a live sluice-bench process.
fn bench_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim() == "sluice-bench")
        .unwrap_or(false)
}

/// Removes `sb-*` namespaces whose sluice-bench is gone (a run that was
/// killed hard). Returns their names.
pub fn remove_stale() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let me = std::process::id();
    let mut removed = Vec::new();
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with(PREFIX) {
            continue;
        }
        let stale = match owner_pid(&name) {
            Some(pid) => pid == me || !bench_alive(pid),
            None => false,
        };
        if stale {
            remove(&name);
            removed.push(name);
        }
    }
    removed.sort();
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix_and_the_pid() {
        let n = Names::new(4242, 3);
        assert_eq!(n.node(), "sb-4242-3-node");
        assert_eq!(n.pod(Gen::New, 0), "sb-4242-3-new-1");
        let all = n.all(2);
        assert_eq!(all.len(), 6);
        assert!(all.iter().all(|x| owner_pid(x) == Some(4242)));
        // The node goes last: pods and client first.
        assert_eq!(all.last().unwrap(), "sb-4242-3-node");
        assert_eq!(owner_pid("sb-x-node"), None);
        assert_eq!(owner_pid("sb-12-node"), None);
        assert_eq!(owner_pid("sb-12-3"), None);
        assert_eq!(owner_pid("other"), None);
    }

    #[test]
    fn pod_ips_stay_in_the_pod_cidr_and_do_not_collide() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..MAX_PODS {
            for g in [Gen::Old, Gen::New] {
                let a = pod_ip(g, i);
                assert!(is_pod_cidr(a));
                assert!(a != NODE_IP && a != CLIENT_IP);
                assert!(seen.insert(a), "{a} twice");
            }
        }
        assert!(!is_pod_cidr(VIP));
        assert!(!is_pod_cidr(Ipv4Addr::new(10, 244, 1, 1)));
    }
}

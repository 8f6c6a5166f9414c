//! Pinning to one CPU, the descriptor limit, and what /proc says a process
//! used: CPU time (the whole process or its data-plane workers) and VmRSS.

use anyhow::{Context, Result};
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

use crate::report::round3;

fn cpu_set(cpu: usize) -> Result<CpuSet> {
    let mut set = CpuSet::new();
    set.set(cpu)
        .with_context(|| format!("CPU {cpu} out of range"))?;
    Ok(set)
}

/// Pins the calling thread to `cpu`.
pub fn pin_thread(cpu: usize) -> Result<()> {
    sched_setaffinity(Pid::from_raw(0), &cpu_set(cpu)?)
        .with_context(|| format!("pinning to CPU {cpu}"))
}

/// Pins every thread of this process to `cpu` (the runtime's idle workers
/// and its blocking threads included).
pub fn pin_process(cpu: usize) -> Result<()> {
    let set = cpu_set(cpu)?;
    for entry in std::fs::read_dir("/proc/self/task").context("listing /proc/self/task")? {
        let Some(tid) = entry?
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // A thread may have exited since the listing.
        let _ = sched_setaffinity(Pid::from_raw(tid), &set);
    }
    Ok(())
}

pub fn allowed_cpus() -> Vec<usize> {
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => vec![],
    }
}

/// Lifts this process's descriptor soft limit to the hard one (the idle
/// figure holds two descriptors per connection here; proxies inherit it).
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    const WANT: u64 = 262_144;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    // Root may raise the hard limit too; others get up to theirs.
    if hard < WANT && setrlimit(Resource::RLIMIT_NOFILE, WANT, WANT).is_ok() {
        return WANT;
    }
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// utime + stime of `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_seconds_at(&format!("/proc/{pid}/stat"))
}

/// utime + stime from a stat(5) file (a process's or a thread's).
fn cpu_seconds_at(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // state is field 3 of stat(5), so utime (14) and stime (15) are at 11, 12.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let tck = clk_tck();
    Some((utime + stime) as f64 / tck)
}

/// utime + stime of each data-plane worker thread of `pid` (named
/// `sluice-wI`), in seconds, by thread id.
pub fn worker_cpu_seconds(pid: u32) -> Vec<(String, f64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    let mut out: Vec<(String, f64)> = dir
        .filter_map(|e| {
            let tid = e.ok()?.file_name().to_str()?.parse::<u32>().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
            let comm = comm.trim();
            let worker = comm
                .strip_prefix("sluice-w")
                .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()));
            worker.then(|| {
                let cpu = cpu_seconds_at(&format!("/proc/{pid}/task/{tid}/stat"))?;
                Some((tid.to_string(), cpu))
            })?
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The whole node's CPU time, summed over all CPUs, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeCpu {
    /// user + nice + system + irq + softirq + steal: everything but idle
    /// and iowait (guest time is already in user).
    pub busy: f64,
    /// busy + idle + iowait: what the CPUs had.
    pub all: f64,
}

impl NodeCpu {
    /// The share of the node's CPU time used between `self` and `later`.
    pub fn busy_share(&self, later: &NodeCpu) -> Option<f64> {
        let all = later.all - self.all;
        (all > 0.0).then(|| ((later.busy - self.busy) / all).clamp(0.0, 1.0))
    }
}

/// Above this share of the node's CPU time used over a phase, the node
/// figure of that phase is marked: a saturated node's CPU time is bounded
/// by the phase's length, not by the path's cost.
pub const NODE_SATURATED: f64 = 0.9;

/// The `cpu` line of /proc/stat. Not namespaced: it counts every process
/// on the machine.
pub fn node_cpu_seconds() -> Option<NodeCpu> {
    node_cpu_seconds_in(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn node_cpu_seconds_in(stat: &str) -> Option<NodeCpu> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...
    let sum = |fields: &[usize]| {
        fields
            .iter()
            .map(|&i| f.get(i).copied().unwrap_or(0))
            .sum::<u64>()
    };
    let busy = sum(&[0, 1, 2, 5, 6, 7]);
    let all = busy + sum(&[3, 4]);
    let tck = clk_tck();
    Some(NodeCpu {
        busy: busy as f64 / tck,
        all: all as f64 / tck,
    })
}

/// VmRSS of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Each worker's share of the CPU time the workers used between two
/// snapshots; `None` with fewer than two workers.
pub fn worker_shares(before: &[(String, f64)], after: &[(String, f64)]) -> Option<Vec<f64>> {
    if after.len() < 2 {
        return None;
    }
    let used: Vec<f64> = after
        .iter()
        .map(|(name, b)| {
            let a = before.iter().find(|(n, _)| n == name).map_or(0.0, |x| x.1);
            (b - a).max(0.0)
        })
        .collect();
    let total: f64 = used.iter().sum();
    (total > 0.0).then(|| used.iter().map(|u| round3(u / total)).collect())
}

/// Clock ticks per second, the unit of /proc's CPU times (100 if the
/// system does not say).
fn clk_tck() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_and_status_of_this_process_parse() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).is_some());
        assert!(rss_kib(pid).unwrap() > 0);
        assert!(node_cpu_seconds().unwrap().busy > 0.0);
    }

    #[test]
    fn node_cpu_counts_all_but_idle_and_iowait() {
        let tck = clk_tck();
        // user nice system idle iowait irq softirq steal guest guest_nice
        let stat = "cpu  100 2 30 9999 777 4 5 6 50 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        let s = node_cpu_seconds_in(stat).unwrap();
        assert!((s.busy - 147.0 / tck).abs() < 1e-9, "{s:?}");
        assert!(
            (s.all - (147.0 + 9999.0 + 777.0) / tck).abs() < 1e-9,
            "{s:?}"
        );
        let later = NodeCpu {
            busy: s.busy + 3.0,
            all: s.all + 4.0,
        };
        assert_eq!(s.busy_share(&later), Some(0.75));
        assert_eq!(s.busy_share(&s), None);
        assert_eq!(node_cpu_seconds_in("intr 1 2\n"), None);
    }
}

//! One run of the rolling update on the mini node, for one data path
//! (sluice or nftables DNAT) and one ARP variant. Runs on a thread inside
//! the node's namespace, so that sluice (a child process) and the `nft`
//! rules live there; the client runs on its own thread inside the client
//! pod's namespace.
//!
//! For pod i (times from the start of the load; `lag` = control-plane lag):
//! - world `a_i`: new-i's namespace and process start
//! - table `a_i + lag`: new-i added, ready
//! - world `b_i = a_i + lag`: old-i terminating (still serving)
//! - world `c_i = b_i + grace`: old-i's process dies (SIGTERM: it stops
//!   accepting, lets its requests in flight finish, exits)
//! - world `c_i + ns_delay`: old-i's namespace deleted (its veth goes);
//!   `--arp failed`: the node's ARP entry for old-i is set to FAILED too
//!   (each new packet then waits for 3 ARP probes, ~3 s, and fails with
//!   EHOSTUNREACH; measured: a flushed entry behaves the same)
//! - table `b_i + lag`: old-i terminating (sluice: no new connection; nft:
//!   dropped from the service's endpoint chains, as kube-proxy does)
//! - table `c_i + lag`: old-i removed
//!
//! Between `c_i` and `b_i + lag` the table still sends new connections to a
//! dead pod: refused while its namespace lives, then a black hole (fresh
//! ARP entry) or ~3 s of ARP resolution ending in `No route to host`.

use std::future::Future;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::{oneshot, watch};

use super::nft;
use super::pod::Pod;
use super::topo::{self, BRIDGE, CLIENT_IP, Gen, Names, POD_PORT, VIP, VIP_DEV, VIP_PORT};
use crate::plan::{Action, Arp, Intercept, Proto, SLUICE_LOG, Via, plan};
use crate::report::Event;
use crate::sluice::{
    BackendCfg, Config, LogCounts, MetricsSummary, Sluice, SluiceArgs, StopReport,
};
use crate::workload::{LoadResult, LoadSpec, Outcome, PortPool, open_loop, request};

/// The service's name in sluice's config and in the nft chain names.
pub const SERVICE: &str = "rollout";

/// Everything one run needs.
#[derive(Debug, Clone)]
pub struct Spec {
    pub via: Via,
    /// How sluice receives the traffic (via sluice).
    pub intercept: Intercept,
    pub arp: Arp,
    pub rate: f64,
    pub duration: Duration,
    pub warmup: Duration,
    pub lag: Duration,
    pub grace: Duration,
    pub ns_delay: Duration,
    pub n: usize,
    pub client_timeout: Duration,
    pub source_ports: u16,
    pub source_port_base: u16,
    /// This executable, re-run inside each pod's namespace.
    pub exe: PathBuf,
    /// The sluice binary (via sluice only).
    pub sluice_bin: Option<PathBuf>,
    pub sluice_args: SluiceArgs,
    /// tcp: this module's run; udp: [`super::dnsroll`]'s.
    pub proto: Proto,
}

/// One step of the scenario: the loopback rollout's, plus the deletion of
/// a dead pod's namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Rollout(Action),
    DeleteNs(usize),
}

impl Step {
    fn is_table(self) -> bool {
        matches!(self, Step::Rollout(a) if a.is_table())
    }
}

/// The schedule, sorted by time; world steps before table steps at equal
/// times.
pub fn steps(
    n: usize,
    warmup: Duration,
    lag: Duration,
    grace: Duration,
    ns_delay: Duration,
) -> Vec<(Duration, Step)> {
    let mut v: Vec<(Duration, Step)> = Vec::with_capacity(n * 7);
    for p in plan(n, warmup, lag, grace) {
        v.push((p.at, Step::Rollout(p.action)));
        if let Action::Kill(i) = p.action {
            v.push((p.at + ns_delay, Step::DeleteNs(i)));
        }
    }
    v.sort_by_key(|(at, s)| (*at, s.is_table()));
    v
}

/// What sluice did during a run.
#[derive(Debug, Clone)]
pub struct SluiceOutcome {
    pub log: LogCounts,
    /// sluice's /metrics counters, scraped before SIGTERM.
    pub metrics: Option<MetricsSummary>,
    pub stop: StopReport,
    pub ran_throughout: bool,
    pub log_tail: String,
}

/// What one run produced.
#[derive(Debug)]
pub struct RunResult {
    pub load: LoadResult,
    pub events: Vec<Event>,
    pub sluice: Option<SluiceOutcome>,
    /// Entries in the node's conntrack table whose reply comes from a dead
    /// pod, at the end of the run.
    pub conntrack_to_dead_pods: u64,
}

/// Runs the future made by `make` on a new thread inside namespace `ns`
/// (current-thread runtime), until it ends or `cancel` turns true.
pub fn spawn_in<T, F, Fut>(
    ns: &str,
    cancel: watch::Receiver<bool>,
    make: F,
) -> (oneshot::Receiver<Result<T>>, std::thread::JoinHandle<()>)
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    let (tx, rx) = oneshot::channel();
    let ns = ns.to_string();
    let h = std::thread::spawn(move || {
        let r = (|| -> Result<T> {
            topo::enter(&ns)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("runtime for a namespace thread")?;
            let mut cancel = cancel;
            rt.block_on(async move {
                tokio::select! {
                    r = make() => r,
                    _ = cancel.wait_for(|c| *c) => Err(anyhow::anyhow!("cancelled")),
                }
            })
        })();
        let _ = tx.send(r);
    });
    (rx, h)
}

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, VIP_PORT)
}

fn pod_addr(g: Gen, i: usize) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(topo::pod_ip(g, i), POD_PORT))
}

fn pod_id(g: Gen, i: usize) -> String {
    format!("{}-{}", g.as_str(), i + 1)
}

/// The node-side end of pod `g`-`i`'s veth.
pub(super) fn veth_name(g: Gen, i: usize) -> String {
    format!("v{}{}", &g.as_str()[..1], i + 1)
}

/// Longest wait for a deleted pod's veth to go (the kernel frees a
/// namespace asynchronously; until then its stack still answers).
const VETH_GONE_WAIT: Duration = Duration::from_millis(1500);

/// Waits until link `dev` is gone from namespace `node`; returns how long
/// that took, or None if it is still there after [`VETH_GONE_WAIT`].
pub(super) async fn wait_link_gone(node: &str, dev: &str) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < VETH_GONE_WAIT {
        let present = std::process::Command::new("ip")
            .args(["-n", node, "link", "show", "dev", dev])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map(|st| st.success())
            .unwrap_or(false);
        if !present {
            return Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Creates pod `g`-`i`'s namespace and starts its process.
async fn start_pod(spec: &Spec, names: &Names, g: Gen, i: usize) -> Result<Pod> {
    let ns = names.pod(g, i);
    let addr = pod_addr(g, i);
    topo::attach(names, &ns, &veth_name(g, i), topo::pod_ip(g, i))?;
    Pod::start(&spec.exe, &ns, &pod_id(g, i), addr).await
}

/// The endpoints kube-proxy would program: the ready ones, or the
/// serving-and-terminating ones when none is ready.
pub(super) fn nft_endpoints(table: &[BackendCfg]) -> Vec<SocketAddrV4> {
    let v4 = |b: &BackendCfg| match b.address {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(_) => None,
    };
    let ready: Vec<SocketAddrV4> = table.iter().filter(|b| b.ready).filter_map(v4).collect();
    if !ready.is_empty() {
        return ready;
    }
    table
        .iter()
        .filter(|b| b.serving.unwrap_or(b.ready) && b.terminating)
        .filter_map(v4)
        .collect()
}

/// One request through the VIP from the client's namespace succeeds
/// within 5 s.
async fn probe_from_client(names: &Names, cancel: watch::Receiver<bool>) -> Result<()> {
    let (rx, _h) = spawn_in(&names.client(), cancel, || async {
        let local = AtomicU64::new(0);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let o = request(
                SocketAddr::V4(vip()),
                0,
                None,
                &local,
                Duration::from_secs(1),
            )
            .await;
            if matches!(o, Outcome::Ok(_)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "no request to {} from the client pod succeeded in 5s (last: {o:?})",
                    vip()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    rx.await.context("probe thread died")?
}

pub(super) fn count_conntrack_to(ips: &[std::net::Ipv4Addr]) -> u64 {
    // /proc/thread-self: this thread's namespace (the node's).
    let text = std::fs::read_to_string("/proc/thread-self/net/nf_conntrack").unwrap_or_default();
    text.lines()
        .filter(|l| {
            ips.iter()
                .any(|ip| l.contains(&format!("src={ip} dst={CLIENT_IP}")))
        })
        .count() as u64
}

/// sluice's flags for `intercept`, always explicit (sluice's own default
/// may be either). nftables: no VIP on any device, so the node needs a
/// route for the Service range for its own connects to reach the output
/// hook (a real node's default route; this node has none).
pub(super) fn sluice_flags(node: &str, intercept: Intercept) -> Result<Vec<String>> {
    let mut flags = vec!["--intercept".to_string(), intercept.as_str().to_string()];
    match intercept {
        Intercept::Bind => flags.extend(["--vip-interface".to_string(), VIP_DEV.to_string()]),
        Intercept::Nftables => {
            topo::ip(&["-n", node, "route", "add", SERVICE_RANGE, "dev", BRIDGE])
                .context("routing the Service range for --intercept nftables")?;
        }
    }
    Ok(flags)
}

/// The Service range routed on the node with `--intercept nftables`.
const SERVICE_RANGE: &str = "10.96.0.0/12";

/// Deletes old pod `i`'s namespace (its process already reaped:
/// `on_its_own` when it exited without a SIGKILL), waits for its veth to
/// go and, with `--arp failed`, sets the node's ARP entry to FAILED.
/// Pushes the deletion as an event; returns the text of the next one.
pub(super) async fn delete_old_ns(
    spec: &Spec,
    names: &Names,
    i: usize,
    on_its_own: bool,
    t0: Instant,
    events: &mut Vec<Event>,
) -> Result<String> {
    let node = names.node();
    topo::ip(&["netns", "del", &names.pod(Gen::Old, i)])?;
    let w = format!(
        "world: old-{} netns deleted{}",
        i + 1,
        if on_its_own {
            ""
        } else {
            " (process SIGKILLed first)"
        }
    );
    events.push(Event::new(t0.elapsed(), w));
    // Until the kernel has freed the namespace, the pod's
    // stack still answers (RST); an ARP entry set to FAILED
    // before that would be refreshed by its reply.
    let mut w = match wait_link_gone(&node, &veth_name(Gen::Old, i)).await {
        Some(d) => format!(
            "world: old-{}'s veth gone, {} ms after netns del",
            i + 1,
            d.as_millis()
        ),
        None => format!(
            "world: old-{}'s veth still there {} ms after netns del",
            i + 1,
            VETH_GONE_WAIT.as_millis()
        ),
    };
    if spec.arp == Arp::Failed {
        let ip = topo::pod_ip(Gen::Old, i).to_string();
        topo::ip(&[
            "-n", &node, "neigh", "replace", &ip, "dev", BRIDGE, "nud", "failed",
        ])?;
        w.push_str("; node ARP entry set to FAILED");
    }
    Ok(w)
}

/// Applies table step `action` of the pod at `addr` (the new pod for
/// `TableAdd`, the old one otherwise) to `table`; returns its event text.
pub(super) fn table_step(table: &mut Vec<BackendCfg>, action: Action, addr: SocketAddr) -> String {
    match action {
        Action::TableAdd(i) => {
            table.push(BackendCfg::ready(addr));
            format!("table: +new-{}", i + 1)
        }
        Action::TableTerminating(i) => {
            for b in table.iter_mut().filter(|b| b.address == addr) {
                *b = BackendCfg::terminating(addr);
            }
            format!("table: old-{} terminating", i + 1)
        }
        Action::TableRemove(i) => {
            table.retain(|b| b.address != addr);
            format!("table: -old-{}", i + 1)
        }
        other => format!("{other:?} is not a table step"),
    }
}

/// After the load: sluice's generations as events, its counters, its stop.
pub(super) async fn finish(s: &mut Sluice, t0: Instant, events: &mut Vec<Event>) -> SluiceOutcome {
    tokio::time::sleep(Duration::from_millis(50)).await;
    for (t, g) in s.generations_seen() {
        if t >= t0 {
            events.push(Event::new(
                t.duration_since(t0),
                format!("sluice: table live generation={g}"),
            ));
        }
    }
    let ran_throughout = s.running();
    let metrics = s.scrape_metrics().await;
    let stop = s.stop(Duration::from_secs(10)).await;
    SluiceOutcome {
        log: s.log_counts(),
        metrics,
        stop,
        ran_throughout,
        log_tail: s.log_tail(30),
    }
}

/// The run itself. Must be called on a thread inside the node's namespace.
pub async fn run(spec: Spec, names: Names, cancel: watch::Receiver<bool>) -> Result<RunResult> {
    let node = names.node();
    let vip_sa = SocketAddr::V4(vip());
    let n = spec.n;

    let mut olds = Vec::with_capacity(n);
    for i in 0..n {
        olds.push(start_pod(&spec, &names, Gen::Old, i).await?);
    }
    let mut table: Vec<BackendCfg> = olds.iter().map(|p| BackendCfg::ready(p.addr)).collect();
    let mut sluice = match spec.via {
        Via::Sluice => {
            let bin = spec.sluice_bin.as_deref().context("no sluice binary")?;
            // Admin endpoints: sluice::Sluice picks loopback ports, here
            // the node namespace's own loopback.
            let extra = sluice_flags(&node, spec.intercept)?;
            Some(
                Sluice::start_with(
                    bin,
                    &spec.sluice_args,
                    &extra,
                    &Config::from(crate::sluice::ServiceCfg::new(
                        SERVICE,
                        vip_sa,
                        table.clone(),
                    )),
                    vip_sa,
                    Some(SLUICE_LOG),
                    &[],
                )
                .await?,
            )
        }
        Via::Nft => {
            nft::apply(
                &node,
                &nft::ruleset(SERVICE, vip(), &nft_endpoints(&table))?,
            )?;
            None
        }
    };
    probe_from_client(&names, cancel.clone()).await?;

    let pool = PortPool::new_on(CLIENT_IP, spec.source_port_base, spec.source_ports)?;
    let load_spec = Arc::new(LoadSpec {
        targets: vec![vip_sa],
        pool: Some(pool),
        timeout: spec.client_timeout,
        max_inflight: 10_000,
    });
    let t0 = Instant::now() + Duration::from_millis(50);
    let (rate, duration) = (spec.rate, spec.duration);
    let (load, _client) = spawn_in(&names.client(), cancel.clone(), move || async move {
        Ok(open_loop(load_spec, rate, duration, t0).await)
    });

    let schedule = steps(n, spec.warmup, spec.lag, spec.grace, spec.ns_delay);
    let mut events = Vec::new();
    let mut news: Vec<Option<Pod>> = (0..n).map(|_| None).collect();
    let mut dead = Vec::new();
    let mut k = 0;
    while k < schedule.len() {
        let at = schedule[k].0;
        tokio::time::sleep_until((t0 + at).into()).await;
        let mut dirty = false;
        while k < schedule.len() && schedule[k].0 == at {
            let step = schedule[k].1;
            k += 1;
            let what = match step {
                Step::Rollout(Action::StartNew(i)) => {
                    let p = start_pod(&spec, &names, Gen::New, i).await?;
                    let w = format!("world: new-{} up at {}", i + 1, p.addr.ip());
                    news[i] = Some(p);
                    w
                }
                Step::Rollout(Action::WorldTerminating(i)) => {
                    format!("world: old-{} terminating", i + 1)
                }
                Step::Rollout(Action::Kill(i)) => {
                    olds[i].terminate();
                    dead.push(topo::pod_ip(Gen::Old, i));
                    format!("world: old-{} process killed (SIGTERM)", i + 1)
                }
                Step::DeleteNs(i) => {
                    // The process exits within its drain (200 ms); a pod
                    // that hangs is SIGKILLed before its netns goes.
                    let on_its_own = olds[i].reap(Duration::from_millis(100)).await?;
                    delete_old_ns(&spec, &names, i, on_its_own, t0, &mut events).await?
                }
                Step::Rollout(Action::TableAdd(i)) => {
                    let p = news[i].as_ref().context("new pod missing")?;
                    dirty = true;
                    table_step(&mut table, Action::TableAdd(i), p.addr)
                }
                Step::Rollout(a @ (Action::TableTerminating(i) | Action::TableRemove(i))) => {
                    dirty = true;
                    table_step(&mut table, a, olds[i].addr)
                }
            };
            events.push(Event::new(t0.elapsed(), what));
        }
        if dirty {
            match &sluice {
                Some(s) => s
                    .update(&Config::from(crate::sluice::ServiceCfg::new(
                        SERVICE,
                        vip_sa,
                        table.clone(),
                    )))
                    .with_context(|| format!("updating sluice's config\n{}", s.log_tail(20)))?,
                None => {
                    let eps = nft_endpoints(&table);
                    nft::apply(&node, &nft::ruleset(SERVICE, vip(), &eps)?)?;
                    events.push(Event::new(
                        t0.elapsed(),
                        format!("nft: table replaced, {} endpoints", eps.len()),
                    ));
                }
            }
        }
    }
    wrap_up(load, &dead, sluice.as_mut(), t0, events).await
}

/// The end of a run: the client's records, the node's conntrack entries
/// to the `dead` pods, sluice's outcome ([`finish`]), the events sorted.
pub(super) async fn wrap_up(
    load: oneshot::Receiver<Result<LoadResult>>,
    dead: &[std::net::Ipv4Addr],
    sluice: Option<&mut Sluice>,
    t0: Instant,
    mut events: Vec<Event>,
) -> Result<RunResult> {
    let load = load.await.context("client thread died")??;
    let conntrack_to_dead_pods = count_conntrack_to(dead);
    let sluice = match sluice {
        Some(s) => Some(finish(s, t0, &mut events).await),
        None => None,
    };
    events.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    Ok(RunResult {
        load,
        events,
        sluice,
        conntrack_to_dead_pods,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_goes_after_the_kill_and_before_the_table_catches_up() {
        let s = Duration::from_secs_f64;
        let v = steps(2, s(1.0), s(3.0), s(0.3), s(0.5));
        assert_eq!(v.len(), 14);
        assert!(v.windows(2).all(|w| w[0].0 <= w[1].0));
        let at = |x: Step| v.iter().find(|(_, y)| *y == x).unwrap().0;
        for i in 0..2 {
            let kill = at(Step::Rollout(Action::Kill(i)));
            let del = at(Step::DeleteNs(i));
            assert_eq!(del, kill + s(0.5));
            assert!(del < at(Step::Rollout(Action::TableTerminating(i))));
            assert!(del < at(Step::Rollout(Action::TableRemove(i))));
        }
    }

    #[test]
    fn kube_proxy_programs_ready_endpoints_else_terminating_ones() {
        let a: SocketAddr = "10.244.0.10:8080".parse().unwrap();
        let b: SocketAddr = "10.244.0.100:8080".parse().unwrap();
        let t = vec![BackendCfg::terminating(a), BackendCfg::ready(b)];
        assert_eq!(
            nft_endpoints(&t),
            vec!["10.244.0.100:8080".parse().unwrap()]
        );
        let t = vec![BackendCfg::terminating(a)];
        assert_eq!(nft_endpoints(&t), vec!["10.244.0.10:8080".parse().unwrap()]);
    }
}

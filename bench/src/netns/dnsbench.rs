//! `sluice-bench dns --netns` (root): DNS queries/s in the netns mini node
//! ([`super::topo`]), as issue 12 asks: a real DNS server run as a pod,
//! queried from a client pod, directly and through sluice, in one run.
//!
//! One dnsmasq pod ([`super::dnsroll`]'s, answering `rollout.test`), sluice
//! in the node's namespace intercepting the Service `VIP:53` with its own
//! nftables table (`--intercept nftables`, as `rollout --netns --proto udp
//! --via sluice --intercept nftables`), and the closed-loop client of
//! [`crate::dns`] on a multi-thread runtime inside the client pod's
//! namespace ([`load`]). Phases:
//! - `direct`: client pod -> the pod's IP:53, bridged, no Service;
//! - `sluice`: client pod -> `VIP:53`, redirected to sluice, which sends it
//!   on to the pod;
//! - `nft` (`--via-nft`): client pod -> [`NFT_VIP`]`:53`, DNATed to the pod
//!   by kube-proxy's nftables shape ([`super::nft::ruleset_proto`]). A
//!   second VIP, so that both paths stay live side by side and every round
//!   has all of its phases: sluice's table only matches its own Service
//!   keys and kube-proxy's only its own (each packet does one more set
//!   lookup that misses in the other table than on a real node).
//!
//! Rounds rotate the phase order (each phase first in turn, as `dns` on
//! loopback), ratios are the median of the
//! rounds'. sluice's CPU per answered query (utime + stime of its process
//! over the sluice phase) and dnsmasq's (over the direct and the sluice
//! phase: the server's own cost per query) are reported per round, under
//! the names `dns` on loopback uses.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::sync::watch;

use super::dnsroll::{self, DNS_PORT, DnsPod};
use super::scenario::{SERVICE, sluice_flags, spawn_in};
use super::topo::{self, Gen, Names, VIP};
use super::{RunGuard, is_root, nft, remove_stale_runs};
use crate::compare::cpu::cpu_seconds;
use crate::dns::dnsperf::{self, QueryFile};
use crate::dns::{
    Backend, Client, DnsArgs, Measured, PerPhase, Round, Summary, line, median_of, probe, ratio,
    rotated, total, us_per_query,
};
use crate::plan::Intercept;
use crate::sluice::{BackendCfg, Config, ServiceCfg, Sluice, locate};

/// The second Service VIP, for the kube-proxy-shaped nftables path.
pub const NFT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

/// `dns`'s options for the mini node.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NetnsArgs {
    /// Run in the netns mini node (root): the client in a pod namespace,
    /// one dnsmasq pod, sluice in the node namespace intercepting the
    /// Service VIP:53 with its nftables table (--backend is ignored).
    #[arg(long)]
    pub netns: bool,
    /// With --netns: also measure kube-proxy's nftables DNAT path (on a
    /// second VIP to the same pod).
    #[arg(long, requires = "netns")]
    pub via_nft: bool,
}

/// One measured phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Direct,
    Sluice,
    Nft,
}

/// The phases of round `i` (0-based) in order: direct, sluice (and nft)
/// rotated by `i`, so each comes first in turn.
fn order(i: usize, nft: bool) -> Vec<Phase> {
    let mut v = vec![Phase::Direct, Phase::Sluice];
    if nft {
        v.push(Phase::Nft);
    }
    rotated(v, i)
}

/// One round: dns's direct and sluice phases (with sluice's CPU per query
/// and dnsmasq's in each), plus the nftables one.
#[derive(Debug, Serialize)]
struct NetnsRound {
    #[serde(flatten)]
    base: Round,
    #[serde(skip_serializing_if = "Option::is_none")]
    nft: Option<Measured>,
    /// nft queries/s ÷ direct queries/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    nft_ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
struct NetnsDnsReport {
    scenario: &'static str,
    netns: bool,
    backend: Backend,
    intercept: Intercept,
    seconds: f64,
    client: Client,
    clients: usize,
    /// dnsperf's `-q` and `-T` (`--client dnsperf` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    outstanding: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dnsperf_threads: Option<usize>,
    /// The pod's address, the sluice VIP and the nft VIP.
    pod: String,
    vip: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    nft_vip: Option<String>,
    /// The direct and sluice phases added up, the medians of the rounds'
    /// ratios and CPU figures (µs per answered query; dnsmasq's in the
    /// direct and the sluice phase).
    #[serde(flatten)]
    summary: Summary,
    /// The nft phases added up, and the median of their ratios.
    #[serde(skip_serializing_if = "Option::is_none")]
    nft: Option<Measured>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nft_ratio: Option<f64>,
    rounds: Vec<NetnsRound>,
}

/// dnsmasq's CPU figures of round `r` (none when absent).
fn dnsmasq_of(r: &NetnsRound) -> PerPhase {
    r.base.backend_us_per_query.unwrap_or_default()
}

/// The client load of one phase: [`crate::dns`]'s closed-loop client
/// (`--clients` sockets, one query in flight each, 1 s without an answer =
/// lost) for `--seconds`, to `target`, on a multi-thread runtime (one
/// worker per CPU, as `dns` on loopback runs it) whose threads are all in
/// `client_ns` (they are started by a thread that entered it); or, with
/// `--client dnsperf` (`queries` given), dnsperf run in `client_ns`.
async fn load(
    client_ns: &str,
    target: SocketAddr,
    args: &DnsArgs,
    queries: Option<&QueryFile>,
    mut cancel: watch::Receiver<bool>,
) -> Result<Measured> {
    if let Some(queries) = queries {
        return tokio::select! {
            r = dnsperf::measure(target, args, queries, Some(client_ns)) => r,
            _ = cancel.wait_for(|c| *c) => anyhow::bail!("cancelled"),
        };
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (ns, args) = (client_ns.to_string(), args.clone());
    // Ends by itself at the phase's deadline (at most 1 s later).
    std::thread::spawn(move || {
        let measured = topo::enter(&ns).and_then(|()| {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("the client's runtime")?
                .block_on(crate::dns::measure(target, &args))
        });
        let _ = tx.send(measured);
    });
    tokio::select! {
        r = rx => r.context("the client thread died")?,
        _ = cancel.wait_for(|c| *c) => anyhow::bail!("cancelled"),
    }
}

/// Waits (at most 5 s) until `target` answers a query from `client_ns`.
async fn probe_from(
    client_ns: &str,
    target: SocketAddr,
    cancel: watch::Receiver<bool>,
) -> Result<()> {
    let (rx, _thread) = spawn_in(client_ns, cancel, move || async move {
        probe(target, Backend::DnsmasqPod).await
    });
    rx.await.context("the probe thread died")?
}

/// The run, on a thread inside the node's namespace: the pod, sluice, the
/// nft rules, then the rounds.
async fn run_in_node(
    args: DnsArgs,
    names: Names,
    bin: std::path::PathBuf,
    cancel: watch::Receiver<bool>,
) -> Result<NetnsDnsReport> {
    let node = names.node();
    let client = names.client();
    let pod = DnsPod::start(&names, Gen::Old, 0).await?;
    let SocketAddr::V4(pod_v4) = pod.addr else {
        anyhow::bail!("the pod's address {} is not IPv4", pod.addr);
    };
    let vip = SocketAddr::from((VIP, DNS_PORT));
    let nft_vip = SocketAddr::from((NFT_VIP, DNS_PORT));
    let cfg = Config::from(ServiceCfg::new(SERVICE, vip, vec![BackendCfg::ready(pod.addr)]).udp());
    let extra = sluice_flags(&node, Intercept::Nftables)?;
    let mut sluice =
        Sluice::start_unprobed(&bin, &args.sluice, &extra, &cfg, vip, None, &[]).await?;
    let nft_on = args.netns.via_nft;
    if nft_on {
        let rules = nft::ruleset_proto(
            SERVICE,
            "udp",
            SocketAddrV4::new(NFT_VIP, DNS_PORT),
            &[pod_v4],
        )?;
        nft::apply(&node, &rules)?;
    }
    for (label, target, on) in [
        ("the pod", pod.addr, true),
        ("sluice's VIP", vip, true),
        ("the nft VIP", nft_vip, nft_on),
    ] {
        if on && let Err(e) = probe_from(&client, target, cancel.clone()).await {
            anyhow::bail!(
                "{label} {target} never answered the client pod: {e:#}\n{}",
                sluice.log_tail(30)
            );
        }
    }
    let queries = match args.client {
        Client::Dnsperf => Some(QueryFile::new(dnsroll::NAME)?),
        Client::Builtin => None,
    };
    let sluice_pid = u32::try_from(sluice.pid()).ok();
    let dnsmasq_pid = pod.pid();
    let cpu = |pid: Option<u32>| pid.and_then(cpu_seconds);

    let mut rounds = Vec::with_capacity(args.rounds);
    for i in 0..args.rounds {
        let (mut direct, mut through, mut kernel) = (None, None, None);
        let (mut sluice_us, mut dnsmasq_us) = (None, PerPhase::default());
        for phase in order(i, nft_on) {
            let target = match phase {
                Phase::Direct => pod.addr,
                Phase::Sluice => vip,
                Phase::Nft => nft_vip,
            };
            let (s0, d0) = (cpu(sluice_pid), cpu(dnsmasq_pid));
            let m = load(&client, target, &args, queries.as_ref(), cancel.clone()).await?;
            let dnsmasq = us_per_query(d0, cpu(dnsmasq_pid), m.answered);
            match phase {
                Phase::Direct => (direct, dnsmasq_us.direct) = (Some(m), dnsmasq),
                Phase::Sluice => {
                    sluice_us = us_per_query(s0, cpu(sluice_pid), m.answered);
                    (through, dnsmasq_us.sluice) = (Some(m), dnsmasq);
                }
                Phase::Nft => kernel = Some(m),
            }
        }
        let (Some(direct), Some(through)) = (direct, through) else {
            anyhow::bail!("round {} missed a phase", i + 1);
        };
        let r = NetnsRound {
            nft_ratio: kernel.as_ref().map(|k| ratio(k, &direct)),
            base: Round {
                ratio: ratio(&through, &direct),
                direct,
                sluice: through,
                sluice_us_per_query: sluice_us,
                backend_us_per_query: Some(dnsmasq_us),
            },
            nft: kernel,
        };
        if !args.json {
            outln!("{}", round_line(i, &r));
        }
        rounds.push(r);
    }
    anyhow::ensure!(
        sluice.running(),
        "sluice exited during the run\n{}",
        sluice.log_tail(30)
    );
    let _ = sluice.stop(Duration::from_secs(5)).await;
    Ok(NetnsDnsReport {
        scenario: "dns",
        netns: true,
        backend: Backend::DnsmasqPod,
        intercept: Intercept::Nftables,
        seconds: args.seconds,
        client: args.client,
        clients: args.clients,
        outstanding: (args.client == Client::Dnsperf).then_some(args.outstanding),
        dnsperf_threads: (args.client == Client::Dnsperf).then_some(args.dnsperf_threads),
        pod: pod.addr.to_string(),
        vip: vip.to_string(),
        nft_vip: nft_on.then(|| nft_vip.to_string()),
        summary: Summary::of(rounds.iter().map(|r| &r.base)),
        nft: nft_on.then(|| total(rounds.iter().filter_map(|r| r.nft.clone()))),
        nft_ratio: median_of(rounds.iter().map(|r| r.nft_ratio)),
        rounds,
    })
}

/// `µs/query` of an optional figure, `?` without one.
fn us(v: Option<f64>) -> String {
    v.map_or("?".into(), |v| format!("{v:.1}"))
}

fn round_line(i: usize, r: &NetnsRound) -> String {
    let mut s = format!(
        "round {}: direct {:.0} (dnsmasq {} µs/query), sluice {:.0} queries/s (sluice {} + dnsmasq {} µs/query), ratio {:.3}",
        i + 1,
        r.base.direct.queries_per_s,
        us(dnsmasq_of(r).direct),
        r.base.sluice.queries_per_s,
        us(r.base.sluice_us_per_query),
        us(dnsmasq_of(r).sluice),
        r.base.ratio
    );
    if let (Some(k), Some(kr)) = (&r.nft, r.nft_ratio) {
        s.push_str(&format!(
            "; nft {:.0} queries/s, ratio {kr:.3}",
            k.queries_per_s
        ));
    }
    s
}

/// `dns --netns`: builds the mini node, runs the rounds on a thread in its
/// node namespace, removes everything whatever happens (Ctrl-C included:
/// the run's thread is cancelled and joined, then the namespaces go).
pub async fn run(args: DnsArgs) -> Result<ExitCode> {
    anyhow::ensure!(
        is_root(),
        "dns --netns needs root (network namespaces, veth, bridge, nftables)"
    );
    topo::run("ip", &["-V"], None).context("dns --netns needs `ip` (iproute2)")?;
    topo::run("nft", &["--version"], None)
        .context("dns --netns needs `nft` (apt-get install nftables)")?;
    topo::run("dnsmasq", &["--version"], None)
        .context("dns --netns needs `dnsmasq` (apt-get install dnsmasq-base)")?;
    remove_stale_runs();
    if args.client == Client::Dnsperf {
        dnsperf::installed()?;
    }
    let bin = locate(args.sluice.sluice.as_deref())?;
    let args = DnsArgs {
        backend: Backend::DnsmasqPod,
        ..args
    };
    let json = args.json;
    if !json {
        outln!(
            "dns --netns: {} clients ({}), {} rounds of {:.1}s phases; dnsmasq pod {}, sluice (nftables intercept) on {VIP}:{DNS_PORT}{}",
            args.clients,
            match args.client {
                Client::Builtin => "closed loop, 1 s timeout".to_string(),
                Client::Dnsperf => format!("dnsperf, {} in flight", args.outstanding),
            },
            args.rounds,
            args.seconds,
            topo::pod_ip(Gen::Old, 0),
            if args.netns.via_nft {
                format!(", kube-proxy nftables DNAT on {NFT_VIP}:{DNS_PORT}")
            } else {
                String::new()
            }
        );
    }
    let names = Names::new(std::process::id(), 0);
    // Declared first, dropped last: after the thread is gone.
    let topo = topo::Topology::create(&names, 1)
        .with_context(|| format!("building the mini node {}", names.node()))?;
    let (cancel, cancel_rx) = watch::channel(false);
    let node_names = names.clone();
    let (rx, thread) = spawn_in(&names.node(), cancel_rx.clone(), move || {
        run_in_node(args, node_names, bin, cancel_rx)
    });
    let guard = RunGuard {
        cancel,
        thread: Some(thread),
    };
    let report = rx.await.context("the run's thread died");
    drop(guard);
    drop(topo);
    let report = report??;
    if json {
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        let summary = &report.summary;
        outln!("{}", line("direct", &summary.direct));
        outln!("{}", line("sluice", &summary.sluice));
        if let Some(k) = &report.nft {
            outln!("{}", line("nft", k));
        }
        outln!(
            "ratio (sluice / direct, median of rounds): {:.3}",
            summary.ratio
        );
        if let Some(kr) = report.nft_ratio {
            outln!("ratio (nft / direct, median of rounds): {kr:.3}");
        }
        outln!(
            "CPU per query (median of rounds): sluice {} µs; dnsmasq {} µs direct, {} µs through sluice",
            us(summary.sluice_us_per_query),
            us(summary.backend_us_per_query.unwrap_or_default().direct),
            us(summary.backend_us_per_query.unwrap_or_default().sluice)
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_phase_comes_first_in_turn() {
        use Phase::*;
        assert_eq!(order(0, false), vec![Direct, Sluice]);
        assert_eq!(order(1, false), vec![Sluice, Direct]);
        assert_eq!(order(2, false), vec![Direct, Sluice]);
        assert_eq!(order(0, true), vec![Direct, Sluice, Nft]);
        assert_eq!(order(1, true), vec![Sluice, Nft, Direct]);
        assert_eq!(order(2, true), vec![Nft, Direct, Sluice]);
        assert_eq!(order(3, true), order(0, true));
    }
}

//! UDP request/response throughput (DNS-sized datagrams), directly to a
//! UDP server (a built-in responder or dnsmasq) and through sluice's UDP
//! data path, in one run.
//!
//! Closed loop: each client has its own socket (so its own flow through
//! sluice), sends a query (40 bytes to the builtin responder, a real A
//! query to dnsmasq), waits for its answer (80 bytes from the builtin
//! responder; at most 1 s, a timeout is counted as lost), and sends the
//! next. sluice is the real binary on a file config with one UDP Service,
//! on loopback.
//!
//! `--backend` chooses what answers: `builtin` (default), a responder on
//! the bench's runtime that echoes the query id in an 80-byte datagram,
//! the cheapest possible server, which makes the proxy's share of the
//! work as large as it can be; or `dnsmasq`, a real DNS server (Debian's
//! `dnsmasq-base`, one process, on a loopback port) answering real A
//! queries for one name, as issue 12 asks for: a real server's own cost
//! per query is what sluice's is weighed against on a node.
//!
//! `--rounds N` runs the phases N times, each phase first in turn (with
//! two phases: direct first in odd rounds, sluice first in even ones), so
//! that load from other processes on a shared machine weighs on all alike;
//! the ratio reported is the median of the rounds' ratios, and each round
//! is in the JSON. `--nginx` adds nginx's UDP proxy as a third phase.
//!
//! `--client` chooses the load: `builtin` (default), the closed-loop
//! clients above, or `dnsperf`, the real `dnsperf` binary once per phase
//! (`-c --clients`, `-q --outstanding` queries in flight in all, `-T
//! --dnsperf-threads`; see [`dnsperf`]), which needs `--backend dnsmasq`.
//!
//! CPU per query: sluice's utime + stime (from /proc) before and after
//! each sluice phase, divided by the queries answered in it
//! (`sluice_us_per_query`), and, with `--backend dnsmasq`, dnsmasq's over
//! both phases (`backend_us_per_query`: whether the server's own cost
//! changes when sluice is in front). /proc counts in clock ticks (10 ms
//! here), so phases under ~2 s give coarse figures.

pub(crate) mod dnsperf;
mod nginx;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sluice_control::source::file::{BackendDoc, ConfigDoc, ServiceDoc};
use sluice_testkit::{Daemon, Options};
use tokio::net::UdpSocket;
use tokio::process::{Child, Command};

use crate::check;
use crate::sluice::{SluiceArgs, locate};

const QUERY: usize = 40;
const ANSWER: usize = 80;

#[derive(Debug, Clone, clap::Args)]
pub struct DnsArgs {
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Concurrent clients (closed loop, one socket each); with `--client
    /// dnsperf`, dnsperf's `-c` (its sockets).
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// The load: `builtin` (the bench's closed-loop clients, one query in
    /// flight each) or `dnsperf` (the `dnsperf` binary; needs `--backend
    /// dnsmasq`).
    #[arg(long, value_enum, default_value_t = Client::Builtin)]
    pub client: Client,
    /// `--client dnsperf` only: queries in flight in all (dnsperf's `-q`).
    #[arg(long, default_value_t = 100)]
    pub outstanding: usize,
    /// `--client dnsperf` only: dnsperf's threads (`-T`).
    #[arg(long, default_value_t = 1)]
    pub dnsperf_threads: usize,
    /// Direct and sluice phases measured this many times each, interleaved.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// What answers the queries: `builtin` (an id-echoing responder in
    /// the bench) or `dnsmasq` (a real DNS server on a loopback port).
    #[arg(long, value_enum, default_value_t = Backend::Builtin)]
    pub backend: Backend,
    /// Also measure nginx's `stream` UDP proxy (one worker per CPU) in
    /// front of the same backend, as a third phase of each round.
    #[arg(long)]
    pub nginx: bool,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub sluice: SluiceArgs,
    #[command(flatten)]
    pub netns: crate::netns::dnsbench::NetnsArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Builtin,
    Dnsmasq,
    /// The dnsmasq pod of the netns mini node (`--netns`), answering
    /// `rollout.test`: not a `--backend` choice.
    #[value(skip)]
    #[serde(rename = "dnsmasq-pod")]
    DnsmasqPod,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Client {
    Builtin,
    Dnsperf,
}

/// The name dnsmasq answers, and its address.
const NAME: &str = "bench.sluice.test";
const NAME_ADDR: Ipv4Addr = Ipv4Addr::new(10, 53, 0, 1);

impl Backend {
    /// Query `id`, as this backend expects it.
    fn query(self, id: u16) -> Vec<u8> {
        match self {
            Backend::Builtin => {
                let mut q = vec![0x11u8; QUERY];
                q[..2].copy_from_slice(&id.to_be_bytes());
                q
            }
            Backend::Dnsmasq => crate::netns::dnsroll::query_for(NAME, id),
            Backend::DnsmasqPod => crate::netns::dnsroll::query(id),
        }
    }

    /// Whether `buf` answers query `id`.
    fn answers(self, buf: &[u8], id: u16) -> bool {
        match self {
            Backend::Builtin => buf.len() == ANSWER && buf[..2] == id.to_be_bytes(),
            Backend::Dnsmasq => crate::netns::dnsroll::answer(buf, id) == Some(NAME_ADDR),
            Backend::DnsmasqPod => crate::netns::dnsroll::answer(buf, id).is_some(),
        }
    }
}

/// The server the queries go to; dropping it stops it.
struct Server {
    addr: SocketAddr,
    /// dnsmasq's process (killed on drop); None for the builtin responder.
    child: Option<Child>,
}

impl Server {
    async fn start(backend: Backend) -> Result<Self> {
        match backend {
            Backend::Builtin => Ok(Self {
                addr: responder().await?,
                child: None,
            }),
            Backend::Dnsmasq => dnsmasq().await,
            Backend::DnsmasqPod => bail!("the dnsmasq pod runs only with --netns"),
        }
    }

    /// The server's own process (dnsmasq), whose CPU time can be read.
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }
}

/// dnsmasq on a free loopback port, answering [`NAME`] with [`NAME_ADDR`]
/// from its own configuration (no upstream, no cache misses, no log). The
/// port is free for UDP when picked, but dnsmasq binds TCP too, and
/// another program (a parallel test) may take either in between: dnsmasq
/// then exits at once ("Address already in use") and another port is
/// tried, up to 5 times.
async fn dnsmasq() -> Result<Server> {
    let mut last_exit = None;
    for _ in 0..5 {
        let port = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let mut child = Command::new("dnsmasq")
            .args(["--keep-in-foreground", "--conf-file=/dev/null"])
            .args([
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--pid-file",
            ])
            .args(["--listen-address=127.0.0.1", "--dns-forward-max=1024"])
            .arg(format!("--port={port}"))
            .arg(format!("--address=/{NAME}/{NAME_ADDR}"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting dnsmasq (apt-get install dnsmasq-base)")?;
        // It binds before it goes to work: a bind failure ends it at once.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(status) = child.try_wait()? {
            last_exit = Some(status);
            continue;
        }
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        if let Err(e) = probe(addr, Backend::Dnsmasq).await {
            // Exited meanwhile (a bind failure noticed late, on a busy
            // machine): another port; else it is there but deaf.
            if let Some(status) = child.try_wait()? {
                last_exit = Some(status);
                continue;
            }
            return Err(e.context("dnsmasq never answered"));
        }
        return Ok(Server {
            addr,
            child: Some(child),
        });
    }
    bail!("dnsmasq exited at start 5 times (last: {last_exit:?}); its ports were taken?")
}

/// Waits (at most 5 s) until `addr` answers a query as `backend` does.
pub(crate) async fn probe(addr: SocketAddr, backend: Backend) -> Result<()> {
    let probe = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    let mut buf = [0u8; 512];
    for id in 0..50u16 {
        probe.send_to(&backend.query(id), addr).await?;
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(100), probe.recv_from(&mut buf)).await
            && backend.answers(&buf[..n], id)
        {
            return Ok(());
        }
    }
    bail!("no answer from {addr} within 5s")
}

#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub answered: u64,
    pub lost: u64,
    pub elapsed_s: f64,
    pub queries_per_s: f64,
}

#[derive(Debug, Serialize)]
struct DnsReport {
    scenario: &'static str,
    backend: Backend,
    client: Client,
    seconds: f64,
    clients: usize,
    /// dnsperf's `-q` and `-T` (`--client dnsperf` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    outstanding: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dnsperf_threads: Option<usize>,
    #[serde(flatten)]
    summary: Summary,
    rounds: Vec<Round>,
    /// `--nginx`: the same through nginx's UDP proxy.
    #[serde(skip_serializing_if = "Option::is_none")]
    nginx: Option<NginxReport>,
}

/// nginx's phases (`--nginx`): added up, the median of the rounds' ratios
/// to direct and of its CPU per query, and each round's.
#[derive(Debug, Serialize)]
struct NginxReport {
    /// Where it listened.
    addr: SocketAddr,
    total: Measured,
    ratio: f64,
    us_per_query: Option<f64>,
    rounds: Vec<NginxPhase>,
}

/// One round's nginx phase.
#[derive(Debug, Serialize)]
struct NginxPhase {
    measured: Measured,
    /// nginx queries/s ÷ this round's direct queries/s.
    ratio: f64,
    /// nginx's CPU µs (master and workers) per query answered.
    us_per_query: Option<f64>,
}

/// The phases of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Direct,
    Sluice,
    Nginx,
}

/// Round `i`'s phases: the list rotated by `i`, so each comes first in
/// turn, and load from other processes weighs on all alike.
fn order(i: usize, nginx: bool) -> Vec<Phase> {
    let mut phases = vec![Phase::Direct, Phase::Sluice];
    if nginx {
        phases.push(Phase::Nginx);
    }
    rotated(phases, i)
}

/// `phases` rotated left by `i` (modulo their count): round `i`'s order.
pub(crate) fn rotated<T>(mut phases: Vec<T>, i: usize) -> Vec<T> {
    if !phases.is_empty() {
        let n = phases.len();
        phases.rotate_left(i % n);
    }
    phases
}

/// One direct phase and one sluice phase, back to back.
#[derive(Debug, Serialize)]
pub(crate) struct Round {
    pub(crate) direct: Measured,
    pub(crate) sluice: Measured,
    pub(crate) ratio: f64,
    /// sluice's CPU µs per query answered in this round's sluice phase.
    pub(crate) sluice_us_per_query: Option<f64>,
    /// dnsmasq's CPU µs per query answered, in each phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) backend_us_per_query: Option<PerPhase>,
}

/// A CPU figure for each phase.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct PerPhase {
    pub(crate) direct: Option<f64>,
    pub(crate) sluice: Option<f64>,
}

/// What a run's rounds come to: each path's phases added up, and the
/// medians of the rounds' ratios and CPU figures. Both `dns` reports (on
/// loopback and `--netns`) carry it flattened.
#[derive(Debug, Serialize)]
pub(crate) struct Summary {
    /// All rounds added up.
    pub(crate) direct: Measured,
    pub(crate) sluice: Measured,
    /// The median of the rounds' sluice queries/s ÷ direct queries/s.
    pub(crate) ratio: f64,
    /// The median of the rounds' sluice CPU µs per query answered in the
    /// sluice phase (null if /proc could not be read).
    pub(crate) sluice_us_per_query: Option<f64>,
    /// The medians of the rounds' dnsmasq CPU µs per query, per phase
    /// (with dnsmasq only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) backend_us_per_query: Option<PerPhase>,
}

impl Summary {
    pub(crate) fn of<'a>(rounds: impl Iterator<Item = &'a Round> + Clone) -> Summary {
        let backend = |f: fn(&PerPhase) -> Option<f64>| {
            median_of(
                rounds
                    .clone()
                    .map(|r| r.backend_us_per_query.as_ref().and_then(f)),
            )
        };
        Summary {
            direct: total(rounds.clone().map(|r| r.direct.clone())),
            sluice: total(rounds.clone().map(|r| r.sluice.clone())),
            ratio: median(rounds.clone().map(|r| r.ratio).collect()),
            sluice_us_per_query: median_of(rounds.clone().map(|r| r.sluice_us_per_query)),
            backend_us_per_query: rounds
                .clone()
                .any(|r| r.backend_us_per_query.is_some())
                .then(|| PerPhase {
                    direct: backend(|b| b.direct),
                    sluice: backend(|b| b.sluice),
                }),
        }
    }
}

/// CPU µs per answered query from CPU seconds read before and after a
/// phase, to 2 decimals; None if either read failed or nothing was answered.
pub(crate) fn us_per_query(before: Option<f64>, after: Option<f64>, answered: u64) -> Option<f64> {
    let used = after? - before?;
    (answered > 0 && used >= 0.0).then(|| (used * 1e6 / answered as f64 * 100.0).round() / 100.0)
}

/// One phase against `target`, with the CPU per query of sluice (if
/// `sluice` is its process) and of the backend over it.
async fn phase(
    target: SocketAddr,
    args: &DnsArgs,
    load: &Load,
    sluice: Option<u32>,
    backend: Option<u32>,
) -> Result<(Measured, Option<f64>, Option<f64>)> {
    let read = |pid: Option<u32>| pid.and_then(crate::compare::cpu::cpu_seconds);
    let (s0, b0) = (read(sluice), read(backend));
    let m = match load {
        Load::Builtin => measure(target, args).await?,
        Load::Dnsperf(queries) => dnsperf::measure(target, args, queries, None).await?,
    };
    let (s1, b1) = (read(sluice), read(backend));
    let sluice_us = us_per_query(s0, s1, m.answered);
    let backend_us = us_per_query(b0, b1, m.answered);
    Ok((m, sluice_us, backend_us))
}

/// The load of a run: the builtin clients, or dnsperf and its query file.
enum Load {
    Builtin,
    Dnsperf(dnsperf::QueryFile),
}

/// `a` ÷ `b`, to 3 decimals (0 when `b` is 0).
pub(crate) fn ratio(a: &Measured, b: &Measured) -> f64 {
    if b.queries_per_s > 0.0 {
        (a.queries_per_s / b.queries_per_s * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}

/// The rounds' phases added up.
pub(crate) fn total(phases: impl Iterator<Item = Measured>) -> Measured {
    let (mut answered, mut lost, mut elapsed) = (0, 0, 0.0);
    for m in phases {
        answered += m.answered;
        lost += m.lost;
        elapsed += m.elapsed_s;
    }
    Measured {
        answered,
        lost,
        elapsed_s: (elapsed * 1000.0).round() / 1000.0,
        queries_per_s: if elapsed > 0.0 {
            (answered as f64 / elapsed).round()
        } else {
            0.0
        },
    }
}

/// The median of `values` (the mean of the middle two for an even count).
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => ((values[n / 2 - 1] + values[n / 2]) / 2.0 * 1000.0).round() / 1000.0,
    }
}

/// The median of the values present (None when there are none).
pub(crate) fn median_of(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = values.flatten().collect();
    (!v.is_empty()).then(|| median(v))
}

/// Answers every datagram with [`ANSWER`] bytes, the query's first 2
/// bytes (its id) first.
async fn responder() -> Result<SocketAddr> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = socket.local_addr()?;
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        let mut answer = [0x5au8; ANSWER];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                continue;
            };
            if n >= 2 {
                answer[..2].copy_from_slice(&buf[..2]);
            }
            let _ = socket.send_to(&answer, from).await;
        }
    });
    Ok(addr)
}

async fn client(target: SocketAddr, backend: Backend, deadline: Instant) -> Result<(u64, u64)> {
    // Any local address: the route to `target` picks it (loopback here, the
    // pod's own address in a netns client).
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    socket.connect(target).await?;
    let mut query = backend.query(0);
    let mut buf = [0u8; 512];
    let (mut answered, mut lost) = (0u64, 0u64);
    let mut id: u16 = 0;
    while Instant::now() < deadline {
        id = id.wrapping_add(1);
        query[..2].copy_from_slice(&id.to_be_bytes());
        socket.send(&query).await.context("send")?;
        let wait = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                let n = socket.recv(&mut buf).await?;
                // A late answer to an earlier (lost) query is skipped.
                if backend.answers(&buf[..n], id) {
                    return Ok::<_, std::io::Error>(());
                }
            }
        });
        match wait.await {
            Ok(Ok(())) => answered += 1,
            Ok(Err(e)) => bail!("receive: {e}"),
            Err(_) => lost += 1,
        }
    }
    Ok((answered, lost))
}

pub(crate) async fn measure(target: SocketAddr, args: &DnsArgs) -> Result<Measured> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let tasks: Vec<_> = (0..args.clients)
        .map(|_| tokio::spawn(client(target, args.backend, deadline)))
        .collect();
    let (mut answered, mut lost) = (0, 0);
    for t in tasks {
        let (a, l) = t.await.context("client task")??;
        answered += a;
        lost += l;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(Measured {
        answered,
        lost,
        elapsed_s: (elapsed * 1000.0).round() / 1000.0,
        queries_per_s: (answered as f64 / elapsed).round(),
    })
}

/// sluice with one UDP Service over `backend`, answering through `listen`.
async fn start_sluice(
    args: &SluiceArgs,
    backend: SocketAddr,
    kind: Backend,
) -> Result<(Daemon, SocketAddr)> {
    let bin = locate(args.sluice.as_deref())?;
    let listen = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?;
    // Re-send on, as sluice has it for a Service on port 53 (the listen
    // port here is a free one): cluster DNS pays for its deadlines too.
    let cfg: ConfigDoc = ServiceDoc::new("dns", listen, vec![BackendDoc::ready(backend)])
        .udp()
        .with_udp_resend(true)
        .into();
    let opts = Options {
        config: Some(cfg.to_yaml().context("writing sluice's config")?),
        args: vec!["--log-format".into(), "text".into()],
        keep_dir: args.keep_logs,
        ..Options::new(bin)
    };
    let daemon = Daemon::start(opts).await?;
    // The UDP socket is bound just after the table goes live.
    probe(listen, kind)
        .await
        .with_context(|| format!("sluice never answered on {listen} (UDP)"))?;
    Ok((daemon, listen))
}

pub(crate) fn line(label: &str, m: &Measured) -> String {
    format!(
        "{label}: {:.0} queries/s ({} answered, {} lost, {:.2}s)",
        m.queries_per_s, m.answered, m.lost, m.elapsed_s
    )
}

pub async fn run(args: DnsArgs) -> Result<ExitCode> {
    check::positive_at_most("--seconds", args.seconds, 120.0)?;
    check::in_range("--clients", args.clients, 1..=1024)?;
    check::in_range("--rounds", args.rounds, 1..=100)?;
    if args.client == Client::Dnsperf {
        check::in_range("--outstanding", args.outstanding, 1..=65_535)?;
        check::in_range("--dnsperf-threads", args.dnsperf_threads, 1..=64)?;
    }
    if args.netns.netns {
        if args.nginx {
            bail!("--nginx runs on loopback only: not with --netns");
        }
        return crate::netns::dnsbench::run(args).await;
    }
    let load = match args.client {
        Client::Builtin => Load::Builtin,
        Client::Dnsperf => {
            if args.backend != Backend::Dnsmasq {
                bail!(
                    "--client dnsperf sends real DNS queries, which only --backend dnsmasq \
                     answers (the builtin responder echoes an id): add --backend dnsmasq"
                );
            }
            dnsperf::installed()?;
            Load::Dnsperf(dnsperf::QueryFile::new(NAME)?)
        }
    };
    let server = Server::start(args.backend).await?;
    let backend = server.addr;
    let (daemon, listen) = start_sluice(&args.sluice, backend, args.backend).await?;
    let sluice_pid = u32::try_from(daemon.pid()).context("sluice's pid")?;
    let backend_pid = server.pid();
    let nginx = match args.nginx {
        true => Some(nginx::Nginx::start(backend, args.backend).await?),
        false => None,
    };
    let mut rounds = Vec::new();
    let mut nginx_rounds = Vec::new();
    for i in 0..args.rounds {
        let (mut direct, mut through, mut via_nginx) = (None, None, None);
        for p in order(i, nginx.is_some()) {
            match (p, &nginx) {
                (Phase::Direct, _) => {
                    direct = Some(phase(backend, &args, &load, None, backend_pid).await?)
                }
                (Phase::Sluice, _) => {
                    let cpu = Some(sluice_pid);
                    through = Some(phase(listen, &args, &load, cpu, backend_pid).await?)
                }
                (Phase::Nginx, Some(n)) => {
                    let c0 = n.cpu_seconds();
                    let m = phase(n.addr, &args, &load, None, None).await?.0;
                    let us = us_per_query(c0, n.cpu_seconds(), m.answered);
                    via_nginx = Some((m, us));
                }
                (Phase::Nginx, None) => {}
            }
        }
        let (Some((direct, _, backend_direct)), Some((through, sluice_us, backend_sluice))) =
            (direct, through)
        else {
            bail!("round {} missed a phase", i + 1);
        };
        let ratio = ratio(&through, &direct);
        let backend_us = backend_pid.map(|_| PerPhase {
            direct: backend_direct,
            sluice: backend_sluice,
        });
        let nginx_phase = via_nginx.map(|(m, us)| NginxPhase {
            ratio: self::ratio(&m, &direct),
            measured: m,
            us_per_query: us,
        });
        if !args.json && args.rounds > 1 {
            let nginx_part = nginx_phase.as_ref().map_or(String::new(), |n| {
                format!(
                    "; nginx {:.0} queries/s, ratio {:.3}, nginx {} µs/query",
                    n.measured.queries_per_s,
                    n.ratio,
                    n.us_per_query
                        .map_or("?".to_string(), |v| format!("{v:.2}"))
                )
            });
            outln!(
                "round {}: direct {:.0}, sluice {:.0} queries/s, ratio {ratio:.3}; {}{nginx_part}",
                i + 1,
                direct.queries_per_s,
                through.queries_per_s,
                cpu_line(sluice_us, backend_us)
            );
        }
        nginx_rounds.extend(nginx_phase);
        rounds.push(Round {
            direct,
            sluice: through,
            ratio,
            sluice_us_per_query: sluice_us,
            backend_us_per_query: backend_us,
        });
    }
    // Each Nginx is dropped (stopped) once its report is made.
    let nginx = nginx.map(|n| {
        let us: Vec<f64> = nginx_rounds.iter().filter_map(|r| r.us_per_query).collect();
        NginxReport {
            addr: n.addr,
            total: total(nginx_rounds.iter().map(|r| r.measured.clone())),
            ratio: median(nginx_rounds.iter().map(|r| r.ratio).collect()),
            us_per_query: (!us.is_empty()).then(|| median(us)),
            rounds: nginx_rounds,
        }
    });
    drop(daemon);
    drop(server);
    drop(load);
    let summary = Summary::of(rounds.iter());
    if args.json {
        let dnsperf = args.client == Client::Dnsperf;
        let report = DnsReport {
            scenario: "dns",
            backend: args.backend,
            client: args.client,
            seconds: args.seconds,
            clients: args.clients,
            outstanding: dnsperf.then_some(args.outstanding),
            dnsperf_threads: dnsperf.then_some(args.dnsperf_threads),
            summary,
            rounds,
            nginx,
        };
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        outln!("{}", line("direct", &summary.direct));
        outln!("{}", line("sluice", &summary.sluice));
        outln!(
            "ratio (sluice / direct, median of rounds): {:.3}",
            summary.ratio
        );
        outln!(
            "CPU per query (median of rounds): {}",
            cpu_line(summary.sluice_us_per_query, summary.backend_us_per_query)
        );
        if let Some(n) = &nginx {
            outln!("{}", line("nginx", &n.total));
            outln!(
                "ratio (nginx / direct, median of rounds): {:.3}; nginx {} µs/query",
                n.ratio,
                n.us_per_query
                    .map_or("?".to_string(), |v| format!("{v:.2}"))
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `sluice 8.10 µs/query` and, with dnsmasq, its figure in each phase.
fn cpu_line(sluice: Option<f64>, backend: Option<PerPhase>) -> String {
    let us = |v: Option<f64>| v.map_or("?".to_string(), |v| format!("{v:.2}"));
    let mut s = format!("sluice {} µs/query", us(sluice));
    if let Some(b) = backend {
        s += &format!(
            ", dnsmasq {} direct / {} through sluice µs/query",
            us(b.direct),
            us(b.sluice)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(answered: u64, elapsed_s: f64) -> Measured {
        Measured {
            answered,
            lost: 0,
            elapsed_s,
            queries_per_s: answered as f64 / elapsed_s,
        }
    }

    #[test]
    fn each_backend_knows_its_own_answer_and_no_other() {
        let q = Backend::Builtin.query(7);
        assert_eq!((q.len(), &q[..2]), (QUERY, &[0u8, 7][..]));
        let mut a = [0x5au8; ANSWER];
        a[..2].copy_from_slice(&7u16.to_be_bytes());
        assert!(Backend::Builtin.answers(&a, 7));
        assert!(!Backend::Builtin.answers(&a, 8));
        assert!(!Backend::Builtin.answers(&a[..ANSWER - 1], 7));

        // dnsmasq's answer: the query with QR and RA set, one answer, the
        // A record (a pointer to the question's name) last.
        let q = Backend::Dnsmasq.query(9);
        let mut r = q.clone();
        r[2] |= 0x80;
        r[3] = 0x80;
        r[7] = 1;
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4]);
        r.extend_from_slice(&NAME_ADDR.octets());
        assert!(Backend::Dnsmasq.answers(&r, 9));
        assert!(!Backend::Dnsmasq.answers(&r, 10));
        // Not a response (the query itself), or another address.
        assert!(!Backend::Dnsmasq.answers(&q, 9));
        let n = r.len();
        r[n - 1] ^= 1;
        assert!(!Backend::Dnsmasq.answers(&r, 9));
    }

    #[test]
    fn each_phase_comes_first_in_turn() {
        use Phase::*;
        assert_eq!(order(0, false), [Direct, Sluice]);
        assert_eq!(order(1, false), [Sluice, Direct]);
        assert_eq!(order(0, true), [Direct, Sluice, Nginx]);
        assert_eq!(order(1, true), [Sluice, Nginx, Direct]);
        assert_eq!(order(2, true), [Nginx, Direct, Sluice]);
        assert_eq!(order(3, true), [Direct, Sluice, Nginx]);
    }

    #[test]
    fn rounds_add_up_and_the_ratio_is_their_median() {
        let t = total([m(100, 1.0), m(300, 1.0)].into_iter());
        assert_eq!((t.answered, t.queries_per_s), (400, 200.0));
        assert_eq!(ratio(&m(50, 1.0), &m(100, 1.0)), 0.5);
        assert_eq!(ratio(&m(50, 1.0), &m(0, 1.0)), 0.0);
        assert_eq!(median(vec![0.9, 0.1, 0.5]), 0.5);
        assert_eq!(median(vec![0.4, 0.6, 0.1, 0.9]), 0.5);
        // CPU figures: the missing ones are skipped, none gives none.
        assert_eq!(
            median_of([Some(1.0), None, Some(3.0)].into_iter()),
            Some(2.0)
        );
        assert_eq!(median_of([None, None].into_iter()), None);
        assert_eq!(rotated(Vec::<u8>::new(), 3), Vec::<u8>::new());
    }

    #[test]
    fn the_summary_has_dnsmasq_figures_only_when_the_rounds_do() {
        let round = |ratio, sluice_us, backend: Option<PerPhase>| Round {
            direct: m(100, 1.0),
            sluice: m(50, 1.0),
            ratio,
            sluice_us_per_query: sluice_us,
            backend_us_per_query: backend,
        };
        let builtin = [round(0.5, Some(8.0), None), round(0.7, None, None)];
        let s = Summary::of(builtin.iter());
        assert_eq!((s.direct.answered, s.sluice.answered), (200, 100));
        assert_eq!((s.ratio, s.sluice_us_per_query), (0.6, Some(8.0)));
        assert!(s.backend_us_per_query.is_none());
        let pd = |direct, sluice| Some(PerPhase { direct, sluice });
        let dnsmasq = [
            round(0.5, Some(8.0), pd(Some(5.0), None)),
            round(0.6, Some(6.0), pd(Some(7.0), Some(4.0))),
        ];
        let b = Summary::of(dnsmasq.iter()).backend_us_per_query.unwrap();
        assert_eq!((b.direct, b.sluice), (Some(6.0), Some(4.0)));
    }

    #[test]
    fn cpu_per_query_needs_both_reads_and_an_answer() {
        // 0.5 s of CPU over 62,500 queries: 8 µs each.
        assert_eq!(us_per_query(Some(10.0), Some(10.5), 62_500), Some(8.0));
        assert_eq!(us_per_query(Some(1.0), Some(1.01), 3), Some(3333.33));
        assert_eq!(us_per_query(None, Some(10.5), 62_500), None);
        assert_eq!(us_per_query(Some(10.0), None, 62_500), None);
        assert_eq!(us_per_query(Some(10.0), Some(10.5), 0), None);
        // A process that was replaced in between (its clock went back).
        assert_eq!(us_per_query(Some(10.0), Some(2.0), 100), None);
        let both = Some(PerPhase {
            direct: Some(4.0),
            sluice: None,
        });
        assert_eq!(
            cpu_line(Some(8.1), both),
            "sluice 8.10 µs/query, dnsmasq 4.00 direct / ? through sluice µs/query"
        );
        assert_eq!(cpu_line(None, None), "sluice ? µs/query");
    }
}

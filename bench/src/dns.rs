//! UDP request/response throughput (DNS-sized datagrams), directly to a
//! built-in UDP responder and through sluice's UDP data path, in one run.
//!
//! Closed loop: each client has its own socket (so its own flow through
//! sluice), sends a 40-byte query, waits for the 80-byte answer (at most
//! 1 s; a timeout is counted as lost), and sends the next. sluice is the
//! real binary on a file config with one UDP Service, on loopback.
//!
//! `--backend` chooses what answers: `builtin` (default), a responder on
//! the bench's runtime that echoes the query id in an 80-byte datagram,
//! the cheapest possible server, which makes the proxy's share of the
//! work as large as it can be; or `dnsmasq`, a real DNS server (Debian's
//! `dnsmasq-base`, one process, on a loopback port) answering real A
//! queries for one name, as issue 12 asks for: a real server's own cost
//! per query is what sluice's is weighed against on a node.
//!
//! `--rounds N` alternates the two phases N times (direct first in odd
//! rounds, sluice first in even ones), so that load from other processes
//! on a shared machine weighs on both alike; the ratio reported is the
//! median of the rounds' ratios, and each round is in the JSON.

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
    /// Concurrent clients (closed loop, one socket each).
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Direct and sluice phases measured this many times each, interleaved.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// What answers the queries: `builtin` (an id-echoing responder in
    /// the bench) or `dnsmasq` (a real DNS server on a loopback port).
    #[arg(long, value_enum, default_value_t = Backend::Builtin)]
    pub backend: Backend,
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
    _child: Option<Child>,
}

impl Server {
    async fn start(backend: Backend) -> Result<Self> {
        match backend {
            Backend::Builtin => Ok(Self {
                addr: responder().await?,
                _child: None,
            }),
            Backend::Dnsmasq => dnsmasq().await,
            Backend::DnsmasqPod => bail!("the dnsmasq pod runs only with --netns"),
        }
    }
}

/// dnsmasq on a free loopback port, answering [`NAME`] with [`NAME_ADDR`]
/// from its own configuration (no upstream, no cache misses, no log).
async fn dnsmasq() -> Result<Server> {
    let port = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    let child = Command::new("dnsmasq")
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
    let server = Server {
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        _child: Some(child),
    };
    probe(server.addr, Backend::Dnsmasq)
        .await
        .context("dnsmasq never answered")?;
    Ok(server)
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
    seconds: f64,
    clients: usize,
    /// All rounds added up.
    direct: Measured,
    sluice: Measured,
    /// The median of the rounds' sluice queries/s ÷ direct queries/s.
    ratio: f64,
    rounds: Vec<Round>,
}

/// One direct phase and one sluice phase, back to back.
#[derive(Debug, Serialize)]
pub(crate) struct Round {
    pub(crate) direct: Measured,
    pub(crate) sluice: Measured,
    pub(crate) ratio: f64,
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

pub(crate) async fn client(
    target: SocketAddr,
    backend: Backend,
    deadline: Instant,
) -> Result<(u64, u64)> {
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
    let cfg: ConfigDoc = ServiceDoc::new("dns", listen, vec![BackendDoc::ready(backend)])
        .udp()
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

fn line(label: &str, m: &Measured) -> String {
    format!(
        "{label}: {:.0} queries/s ({} answered, {} lost, {:.2}s)",
        m.queries_per_s, m.answered, m.lost, m.elapsed_s
    )
}

pub async fn run(args: DnsArgs) -> Result<ExitCode> {
    check::positive_at_most("--seconds", args.seconds, 120.0)?;
    check::in_range("--clients", args.clients, 1..=1024)?;
    check::in_range("--rounds", args.rounds, 1..=100)?;
    if args.netns.netns {
        return crate::netns::dnsbench::run(args).await;
    }
    let server = Server::start(args.backend).await?;
    let backend = server.addr;
    let (daemon, listen) = start_sluice(&args.sluice, backend, args.backend).await?;
    let mut rounds = Vec::new();
    for i in 0..args.rounds {
        let (direct, through) = if i % 2 == 0 {
            let d = measure(backend, &args).await?;
            (d, measure(listen, &args).await?)
        } else {
            let t = measure(listen, &args).await?;
            (measure(backend, &args).await?, t)
        };
        let ratio = ratio(&through, &direct);
        if !args.json && args.rounds > 1 {
            outln!(
                "round {}: direct {:.0}, sluice {:.0} queries/s, ratio {ratio:.3}",
                i + 1,
                direct.queries_per_s,
                through.queries_per_s
            );
        }
        rounds.push(Round {
            direct,
            sluice: through,
            ratio,
        });
    }
    drop(daemon);
    drop(server);
    let direct = total(rounds.iter().map(|r| r.direct.clone()));
    let through = total(rounds.iter().map(|r| r.sluice.clone()));
    let ratio = median(rounds.iter().map(|r| r.ratio).collect());
    if args.json {
        let report = DnsReport {
            scenario: "dns",
            backend: args.backend,
            seconds: args.seconds,
            clients: args.clients,
            direct,
            sluice: through,
            ratio,
            rounds,
        };
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        outln!("{}", line("direct", &direct));
        outln!("{}", line("sluice", &through));
        outln!("ratio (sluice / direct, median of rounds): {ratio:.3}");
    }
    Ok(ExitCode::SUCCESS)
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
    fn rounds_add_up_and_the_ratio_is_their_median() {
        let t = total([m(100, 1.0), m(300, 1.0)].into_iter());
        assert_eq!((t.answered, t.queries_per_s), (400, 200.0));
        assert_eq!(ratio(&m(50, 1.0), &m(100, 1.0)), 0.5);
        assert_eq!(ratio(&m(50, 1.0), &m(0, 1.0)), 0.0);
        assert_eq!(median(vec![0.9, 0.1, 0.5]), 0.5);
        assert_eq!(median(vec![0.4, 0.6, 0.1, 0.9]), 0.5);
    }
}

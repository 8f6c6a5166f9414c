//! `rollout --netns --proto udp`: the same rolling update as
//! [`super::scenario`], with DNS pods (one `dnsmasq` per pod namespace,
//! answering `rollout.test` with an address naming the pod) and an
//! open-loop query load on UDP port 53 instead of new TCP connections.
//!
//! The client sends one query every `1/rate` s, each from the next port of
//! a pool of `--source-ports` ports on the client pod's address (as a
//! resolver picks a port per query, but reused, so that the node's
//! conntrack sees the same 5-tuple again a few seconds later), on a socket
//! connected to the VIP (so an ICMP port unreachable comes back as
//! ECONNREFUSED). A query is answered (right id, NOERROR, one answer),
//! refused, unreachable, or timed out after `--client-timeout` (a resolver
//! then waits 5 s in glibc before its next try: each is a lost query).
//!
//! The kernel path (`--via nft`): kube-proxy's nftables shape with `udp`
//! ([`nft::ruleset_proto`]), plus kube-proxy's UDP conntrack cleanup
//! (pkg/proxy/conntrack, `CleanStaleEntries`): after each sync, the UDP
//! entries to the Service whose DNAT target is no longer an endpoint of
//! the programmed table are deleted (`conntrack -D -p udp --orig-dst VIP
//! --orig-port-dst 53 --reply-src IP`, one per gone endpoint). Like
//! kube-proxy, it only runs when the table changes, so it comes `lag`
//! after the pod died.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::net::UdpSocket;
use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::nft;
use super::scenario::{RunResult, SERVICE, Spec, Step, spawn_in, steps};
use super::topo::{self, CLIENT_IP, Gen, Names, VIP};
use crate::plan::{Action, SLUICE_LOG, Via};
use crate::report::Event;
use crate::sluice::{BackendCfg, Config, ServiceCfg, Sluice};
use crate::workload::{ErrorKind, LoadResult, Outcome, Record};

/// The Service's UDP port, and the pods'.
pub const DNS_PORT: u16 = 53;
/// The name every pod answers.
pub const NAME: &str = "rollout.test";

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, DNS_PORT)
}

/// The address pod `g`-`i` answers for [`NAME`]: 10.1.{0 old, 1 new}.{i+1}.
fn answer_of(g: Gen, i: usize) -> Ipv4Addr {
    let third = match g {
        Gen::Old => 0,
        Gen::New => 1,
    };
    Ipv4Addr::new(10, 1, third, (i + 1) as u8)
}

/// The pod id for an answer address (`old-2`), if it is one of ours.
fn pod_of_answer(a: Ipv4Addr) -> Option<String> {
    let [10, 1, g, i] = a.octets() else {
        return None;
    };
    let g = match g {
        0 => "old",
        1 => "new",
        _ => return None,
    };
    Some(format!("{g}-{i}"))
}

/// A DNS query for `NAME`, type A, class IN, recursion desired.
pub fn query(id: u16) -> Vec<u8> {
    query_for(NAME, id)
}

/// A DNS query for `name` (dotted, labels under 64 bytes), type A, class
/// IN, recursion desired.
pub fn query_for(name: &str, id: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(32);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The A address in an answer to [`query`]`(id)`: None unless it is a
/// response with that id, NOERROR, at least one answer, and its last 4
/// bytes are the A record's data (dnsmasq's answer to our one question:
/// the question, then one A record).
pub fn answer(buf: &[u8], id: u16) -> Option<Ipv4Addr> {
    if buf.len() < 12 + 4 || buf[..2] != id.to_be_bytes() {
        return None;
    }
    let is_response = buf[2] & 0x80 != 0;
    let rcode = buf[3] & 0x0f;
    let ancount = u16::from_be_bytes([buf[6], buf[7]]);
    if !is_response || rcode != 0 || ancount == 0 {
        return None;
    }
    let n = buf.len();
    Some(Ipv4Addr::new(
        buf[n - 4],
        buf[n - 3],
        buf[n - 2],
        buf[n - 1],
    ))
}

/// A DNS pod: dnsmasq in the pod's namespace. Dropping it kills it.
pub(super) struct DnsPod {
    pub(super) addr: SocketAddr,
    child: Child,
}

impl DnsPod {
    /// Must be called on a thread inside the node's namespace.
    pub(super) async fn start(names: &Names, g: Gen, i: usize) -> Result<Self> {
        let ns = names.pod(g, i);
        let ip = topo::pod_ip(g, i);
        topo::attach(names, &ns, &super::scenario::veth_name(g, i), ip)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "dnsmasq", "--keep-in-foreground"])
            .args(["--conf-file=/dev/null", "--no-resolv", "--no-hosts"])
            .args(["--bind-interfaces", "--pid-file", "--user=root"])
            .arg(format!("--listen-address={ip}"))
            .arg(format!("--address=/{NAME}/{}", answer_of(g, i)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting dnsmasq in {ns} (apt-get install dnsmasq-base)"))?;
        let addr = SocketAddr::new(ip.into(), DNS_PORT);
        let pod = Self { addr, child };
        // Ready when it answers (from the node, which is on the bridge).
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
        let mut buf = [0u8; 512];
        for k in 0..100u16 {
            sock.send_to(&query(k), addr).await?;
            if let Ok(Ok((n, _))) =
                tokio::time::timeout(Duration::from_millis(50), sock.recv_from(&mut buf)).await
                && answer(&buf[..n], k) == Some(answer_of(g, i))
            {
                return Ok(pod);
            }
        }
        bail!("dnsmasq in {ns} did not answer at {addr} within 5s")
    }

    /// dnsmasq's pid (`ip netns exec` execs it), None once reaped.
    pub(super) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGTERM: dnsmasq exits at once.
    fn terminate(&mut self) {
        super::pod::sigterm(&self.child);
    }

    /// Waits up to `patience` for the exit, then SIGKILLs. Whether it
    /// exited on its own.
    async fn reap(&mut self, patience: Duration) -> Result<bool> {
        super::pod::reap_child(&mut self.child, patience, "dnsmasq").await
    }
}

/// One query from `port` (0: any), `id`.
async fn one_query(port: u16, id: u16, timeout: Duration) -> std::result::Result<Outcome, ()> {
    let Ok(sock) = UdpSocket::bind((CLIENT_IP, port)).await else {
        return Err(());
    };
    if sock.connect(SocketAddr::V4(vip())).await.is_err() {
        return Err(());
    }
    if let Err(e) = sock.send(&query(id)).await {
        return Ok(Outcome::Failed(kind_of(&e)));
    }
    let mut buf = [0u8; 512];
    let wait = tokio::time::timeout(timeout, async {
        loop {
            let n = sock.recv(&mut buf).await?;
            if let Some(a) = answer(&buf[..n], id) {
                return Ok::<_, std::io::Error>(a);
            }
        }
    });
    Ok(match wait.await {
        Ok(Ok(a)) => Outcome::Ok(pod_of_answer(a).unwrap_or_else(|| a.to_string()).into()),
        Ok(Err(e)) => Outcome::Failed(kind_of(&e)),
        Err(_) => Outcome::Failed(ErrorKind::Timeout),
    })
}

fn kind_of(e: &std::io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => ErrorKind::Refused,
        Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => ErrorKind::Unreachable,
        _ => ErrorKind::Other,
    }
}

/// The open-loop query load (on the client pod's thread).
async fn query_load(
    rate: f64,
    duration: Duration,
    t0: Instant,
    timeout: Duration,
    base: u16,
    ports: u16,
) -> LoadResult {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = (duration.as_secs_f64() * rate).floor() as u64;
    let bind_failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(total as usize);
    for k in 0..total {
        let at = interval.mul_f64(k as f64);
        tokio::time::sleep_until((t0 + at).into()).await;
        let late = t0.elapsed().saturating_sub(at);
        let failures = bind_failures.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut outcome = Outcome::NotStarted;
            // A port still held by a query in flight: the next one.
            for j in 0..ports.min(8) {
                let port = base + ((k + u64::from(j)) % u64::from(ports)) as u16;
                match one_query(port, k as u16, timeout).await {
                    Ok(o) => {
                        outcome = o;
                        break;
                    }
                    Err(()) => {
                        failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            Record {
                start: at,
                latency: started.elapsed(),
                late,
                outcome,
            }
        }));
    }
    let mut records = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(r) = t.await {
            records.push(r);
        }
    }
    LoadResult {
        records,
        local_bind_failures: bind_failures.load(std::sync::atomic::Ordering::Relaxed),
        elapsed: t0.elapsed(),
    }
}

/// A query from the client pod is answered within 5 s.
async fn probe_from_client(names: &Names, cancel: watch::Receiver<bool>) -> Result<()> {
    let (rx, _h) = spawn_in(&names.client(), cancel, || async {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut id = 0u16;
        loop {
            id = id.wrapping_add(1);
            let o = one_query(0, id, Duration::from_millis(200)).await;
            if matches!(o, Ok(Outcome::Ok(_))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "no DNS query to {} from the client pod was answered in 5s (last: {o:?})",
                    vip()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    rx.await.context("probe thread died")?
}

fn service(table: &[BackendCfg]) -> Config {
    Config::from(ServiceCfg::new(SERVICE, SocketAddr::V4(vip()), table.to_vec()).udp())
}

/// kube-proxy's UDP conntrack cleanup: deletes the entries to the VIP
/// whose reply source is one of `gone`. Returns how many were deleted.
fn flush_conntrack(node: &str, gone: &[Ipv4Addr]) -> Result<u64> {
    let mut deleted = 0;
    for ip in gone {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", node, "conntrack", "-D", "-p", "udp"])
            .args(["--orig-dst", &VIP.to_string(), "--orig-port-dst", "53"])
            .args(["--reply-src", &ip.to_string()])
            .output()
            .context("running conntrack -D (apt-get install conntrack)")?;
        deleted += deleted_count(&String::from_utf8_lossy(&out.stderr));
    }
    Ok(deleted)
}

/// N in conntrack's "conntrack v1.4.7 (conntrack-tools): N flow entries
/// have been deleted." (0 when absent).
fn deleted_count(stderr: &str) -> u64 {
    let words: Vec<&str> = stderr.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[1] == "flow")
        .and_then(|w| w[0].parse().ok())
        .unwrap_or(0)
}

/// The run itself, on a thread inside the node's namespace.
pub async fn run(spec: Spec, names: Names, cancel: watch::Receiver<bool>) -> Result<RunResult> {
    let node = names.node();
    let vip_sa = SocketAddr::V4(vip());
    let n = spec.n;
    let mut olds = Vec::with_capacity(n);
    for i in 0..n {
        olds.push(DnsPod::start(&names, Gen::Old, i).await?);
    }
    let mut table: Vec<BackendCfg> = olds.iter().map(|p| BackendCfg::ready(p.addr)).collect();
    let mut programmed: Vec<SocketAddrV4> = Vec::new();
    let mut sluice = match spec.via {
        Via::Sluice => {
            let bin = spec.sluice_bin.as_deref().context("no sluice binary")?;
            let extra = super::scenario::sluice_flags(&node, spec.intercept)?;
            Some(
                Sluice::start_unprobed(
                    bin,
                    &spec.sluice_args,
                    &extra,
                    &service(&table),
                    vip_sa,
                    Some(SLUICE_LOG),
                    &[],
                )
                .await?,
            )
        }
        Via::Nft => {
            programmed = super::scenario::nft_endpoints(&table);
            nft::apply(
                &node,
                &nft::ruleset_proto(SERVICE, "udp", vip(), &programmed)?,
            )?;
            None
        }
    };
    if let Err(e) = probe_from_client(&names, cancel.clone()).await {
        let tail = sluice.as_ref().map(|s| s.log_tail(30)).unwrap_or_default();
        bail!("{e:#}\n{tail}");
    }

    let t0 = Instant::now() + Duration::from_millis(50);
    let (rate, duration, timeout) = (spec.rate, spec.duration, spec.client_timeout);
    let (base, ports) = (spec.source_port_base, spec.source_ports);
    let (load, _client) = spawn_in(&names.client(), cancel.clone(), move || async move {
        Ok(query_load(rate, duration, t0, timeout, base, ports).await)
    });

    let schedule = steps(n, spec.warmup, spec.lag, spec.grace, spec.ns_delay);
    let mut events = Vec::new();
    let mut news: Vec<Option<DnsPod>> = (0..n).map(|_| None).collect();
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
                    let p = DnsPod::start(&names, Gen::New, i).await?;
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
                    format!("world: old-{} dnsmasq killed (SIGTERM)", i + 1)
                }
                Step::DeleteNs(i) => {
                    let on_its_own = olds[i].reap(Duration::from_millis(100)).await?;
                    super::scenario::delete_old_ns(&spec, &names, i, on_its_own, t0, &mut events)
                        .await?
                }
                Step::Rollout(Action::TableAdd(i)) => {
                    let p = news[i].as_ref().context("new pod missing")?;
                    dirty = true;
                    super::scenario::table_step(&mut table, Action::TableAdd(i), p.addr)
                }
                Step::Rollout(a @ (Action::TableTerminating(i) | Action::TableRemove(i))) => {
                    dirty = true;
                    super::scenario::table_step(&mut table, a, olds[i].addr)
                }
            };
            events.push(Event::new(t0.elapsed(), what));
        }
        if dirty {
            match &sluice {
                Some(s) => s
                    .update(&service(&table))
                    .with_context(|| format!("updating sluice's config\n{}", s.log_tail(20)))?,
                None => {
                    let eps = super::scenario::nft_endpoints(&table);
                    nft::apply(&node, &nft::ruleset_proto(SERVICE, "udp", vip(), &eps)?)?;
                    let gone: Vec<Ipv4Addr> = programmed
                        .iter()
                        .filter(|e| !eps.contains(e))
                        .map(|e| *e.ip())
                        .collect();
                    let flushed = flush_conntrack(&node, &gone)?;
                    events.push(Event::new(
                        t0.elapsed(),
                        format!(
                            "nft: table replaced, {} endpoints; {flushed} UDP conntrack entries flushed",
                            eps.len()
                        ),
                    ));
                    programmed = eps;
                }
            }
        }
    }
    super::scenario::wrap_up(load, &dead, sluice.as_mut(), t0, events).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_answer_round_trip() {
        let q = query(0x1234);
        assert_eq!(&q[..2], &[0x12, 0x34]);
        assert_eq!(&q[12..26], b"\x07rollout\x04test\x00");
        // A response: the query with QR set, ancount 1, plus an A record.
        let mut r = q.clone();
        r[2] |= 0x80;
        r[7] = 1;
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4, 10, 1, 1, 3]);
        let a = answer(&r, 0x1234).unwrap();
        assert_eq!(a, answer_of(Gen::New, 2));
        assert_eq!(pod_of_answer(a).as_deref(), Some("new-3"));
        assert_eq!(answer(&r, 0x1235), None, "another query's id");
        let mut refused = r.clone();
        refused[3] |= 5;
        assert_eq!(answer(&refused, 0x1234), None, "REFUSED is no answer");
        assert_eq!(answer(&q, 0x1234), None, "a query is no answer");
        assert_eq!(answer(&r[..10], 0x1234), None);
    }

    #[test]
    fn conntrack_delete_count_is_parsed() {
        assert_eq!(
            deleted_count(
                "conntrack v1.4.7 (conntrack-tools): 5 flow entries have been deleted.\n"
            ),
            5
        );
        assert_eq!(deleted_count(""), 0);
    }
}

//! UDP Services: one socket per UDP listen key, a flow table per Service,
//! and the re-send that hides a backend going away.
//!
//! This module owns everything UDP in the data plane:
//! - [`UdpProxy::run`] follows the table and, in bind mode, binds one socket
//!   per UDP [`ListenKey`] (on the Service address: loopback for the file
//!   source, the VIPs on `sluice0` for the Kubernetes source) and serves it;
//! - [`UdpProxy::serve`] serves one socket for one listen key. It does not
//!   care how datagrams reach the socket: the bind-mode socket and the
//!   local port an nftables `redirect` sends one UDP Service port to
//!   ([`UdpProxy::serve_intercepted`], [`crate::udp_intercept`]; see
//!   docs/architecture.md, "UDP") plug in the same way. On an intercepted
//!   port each flow remembers the local address its datagrams were
//!   redirected to (`IP_PKTINFO`) and its replies leave from it, so that
//!   conntrack undoes the redirect (from the node itself, the redirect
//!   goes to 127.0.0.1, which routing would not pick for the reply).
//!
//! A *flow* is one client address (IP and port) of one Service. Each flow
//! has its own socket *connected* to the backend it picked, so the kernel
//! matches the backend's replies to the flow, and an ICMP port or host
//! unreachable for it comes back as `ECONNREFUSED`/`EHOSTUNREACH` on that
//! socket. Replies are sent to the client from the Service's socket, so
//! they come from the Service address and port (resolvers check this).
//!
//! Failures: a flow keeps the last datagram its client sent. When its
//! backend answers with ICMP unreachable, or leaves the table (or stops
//! being eligible) while that datagram is unanswered, the datagram is sent
//! once more to another eligible backend and the flow is re-pinned there;
//! the unreachable backend is ejected through the [`Tracker`], as a failed
//! TCP dial is. Flows of a backend that leaves are closed (kube-proxy
//! flushes the UDP conntrack entries of removed endpoints).
//!
//! Bounds: flows idle for their timeout are closed (kube-proxy's conntrack
//! defaults: 30 s unreplied, 120 s once replied; per Service
//! [`sluice_control::Settings::udp_timeout`]); at most
//! [`UdpConfig::max_flows`] flows are open over all Services, and a
//! datagram that would need one more is dropped and counted. A flow costs
//! one descriptor, an entry in its port's epoll set and a copy of its
//! last datagram; no task and no receive buffer of its own (the port's task
//! reads every flow's replies, [`Port::on_replies`], into one buffer).
//!
//! Silent backends: on a Service with re-send on (port 53 by default,
//! [`sluice_control::Settings::udp_resend`]), a datagram still unanswered
//! [`UdpConfig::resend_after`] after it was sent is sent once more to
//! another backend, and a backend that leaves [`SUSPECT_AFTER`] datagrams
//! unanswered with no reply to any flow in between is ejected
//! ([`Port::on_deadlines`]): a deleted pod sends no ICMP.
//!
//! The backend pick is [`crate::balance::pick`] (policy, affinity,
//! ejection), with the flow standing in for a connection. UDP flows take
//! no [`crate::tracker::ConnGuard`]: least-connections does not count
//! them, and the tracker's probe state (set by a guard, ended by a dial
//! result) is not used, so an ejected backend comes back when its cooldown
//! ends; its first reply ends the ejection at once.
//!
//! UDP serving runs on the main runtime, one task per listen key (not on
//! the data-plane workers).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use sluice_control::{ListenKey, Protocol, Publisher, Service};
use socket2::{Domain, SockRef, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::balance::{PickContext, ServiceRuntime, pick};
use crate::connect::DialErrorKind;
use crate::metrics::{Metrics, UdpDrop, UdpFlowEnd, UdpServiceMetrics};
use crate::tracker::Tracker;

/// Default of `--udp-max-flows`: see docs/operations.md for its cost.
pub const DEFAULT_MAX_FLOWS: usize = 16_384;

/// Idle timeout of a flow whose backend has not replied
/// (`nf_conntrack_udp_timeout`).
pub const UNREPLIED_TIMEOUT: Duration = Duration::from_secs(30);

/// Idle timeout of a flow whose backend replied
/// (`nf_conntrack_udp_timeout_stream`).
pub const REPLIED_TIMEOUT: Duration = Duration::from_secs(120);

/// Default of `--udp-resend-after`: far below a resolver's own retry
/// (glibc: 5 s), well above a cluster DNS server's answer time.
pub const DEFAULT_RESEND_AFTER: Duration = Duration::from_millis(300);

/// A backend that leaves this many datagrams unanswered for
/// `--udp-resend-after`, with no reply to anything in between, is ejected
/// (one slow answer is not enough: a resolver forwarding upstream may take
/// longer than the deadline; a dead pod misses them all).
const SUSPECT_AFTER: u32 = 2;

/// Most re-send deadlines a served socket keeps; past it a datagram gets
/// none (it is still forwarded, but not re-sent if unanswered). Bounds the
/// queue under a flood: one entry per datagram sent in the last
/// `--udp-resend-after`.
const MAX_DEADLINES: usize = 65_536;

/// Datagrams a served socket reads in one go when they are queued.
const BATCH: usize = 64;

/// How often idle flows are looked for.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// Largest UDP payload (IPv6 jumbograms aside): 65,535 − 8 (UDP header).
/// IPv4 allows 65,507; a buffer of this size never truncates.
const MAX_DATAGRAM: usize = 65_536;

/// UDP settings (from the command line).
#[derive(Debug, Clone, Copy)]
pub struct UdpConfig {
    /// Open flows over all UDP Services (`--udp-max-flows`).
    pub max_flows: usize,
    /// A client datagram of a Service with re-send on
    /// ([`sluice_control::Settings::udp_resend`]) still unanswered this
    /// long after it was sent is sent once more to another backend
    /// (`--udp-resend-after`; zero: never).
    pub resend_after: Duration,
}

impl Default for UdpConfig {
    fn default() -> Self {
        Self {
            max_flows: DEFAULT_MAX_FLOWS,
            resend_after: DEFAULT_RESEND_AFTER,
        }
    }
}

/// UDP Services of one sluice.
pub struct UdpProxy {
    config: UdpConfig,
    publisher: Arc<Publisher>,
    tracker: Arc<Tracker>,
    metrics: Arc<Metrics>,
    /// Open flows over all Services.
    open: Arc<AtomicUsize>,
}

/// A bound UDP socket being served.
struct Serving {
    service: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl UdpProxy {
    pub fn new(
        config: UdpConfig,
        publisher: Arc<Publisher>,
        tracker: Arc<Tracker>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            publisher,
            tracker,
            metrics,
            open: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Open flows over all Services.
    pub fn open_flows(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Bind mode: follows the table until `stop`, binding a socket for
    /// every UDP listen key and closing those of keys that left (or now
    /// lead to another Service). A key whose bind fails is retried every
    /// second.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut changes = self.publisher.subscribe();
        let mut serving: HashMap<ListenKey, Serving> = HashMap::new();
        let mut warned: HashMap<ListenKey, ()> = HashMap::new();
        let mut retry = tokio::time::interval(Duration::from_secs(1));
        loop {
            let table = self.publisher.load();
            serving.retain(|key, s| {
                let keep = table.get(key).is_some_and(|svc| svc.name == s.service);
                if !keep {
                    info!(listen = %key, service = %s.service, "UDP service removed: socket closed");
                    s.stop.cancel();
                }
                keep
            });
            warned.retain(|key, _| table.get(key).is_some());
            let mut failed = false;
            for (key, service) in table.iter() {
                if key.protocol != Protocol::Udp || serving.contains_key(key) {
                    continue;
                }
                match bind_udp(key.addr) {
                    Ok(socket) => {
                        warned.remove(key);
                        info!(listen = %key, service = %service.name, "listening (UDP)");
                        let stop = CancellationToken::new();
                        let task = tokio::spawn(self.clone().serve(*key, socket, stop.clone()));
                        let service = service.name.clone();
                        serving.insert(
                            *key,
                            Serving {
                                service,
                                stop,
                                task,
                            },
                        );
                    }
                    Err(e) => {
                        failed = true;
                        if warned.insert(*key, ()).is_none() {
                            warn!(listen = %key, service = %service.name, error = %e, "cannot bind UDP socket; retrying every second");
                        }
                    }
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = retry.tick(), if failed => {}
                _ = stop.cancelled() => break,
            }
        }
        for (_, s) in serving {
            s.stop.cancel();
            let _ = s.task.await;
        }
    }

    /// Serves `socket`, which receives the datagrams of the Service at
    /// `key`, until `stop` fires or `key` leaves the table. Every flow is
    /// closed on return.
    pub async fn serve(
        self: Arc<Self>,
        key: ListenKey,
        socket: UdpSocket,
        stop: CancellationToken,
    ) {
        self.serve_with(key, socket, stop, false, None).await
    }

    /// [`Self::serve`] for a local port that `redirect` steers the key's
    /// datagrams to: `socket` has `IP_PKTINFO`/`IPV6_RECVPKTINFO` on
    /// ([`set_pktinfo`]) and replies leave from the address each datagram
    /// was redirected to.
    pub async fn serve_intercepted(
        self: Arc<Self>,
        key: ListenKey,
        socket: UdpSocket,
        stop: CancellationToken,
    ) {
        self.serve_with(key, socket, stop, true, None).await
    }

    /// [`Self::serve_intercepted`] for a port shared with another sluice
    /// during a hand-over ([`crate::udp_intercept`]): when `drain` fires,
    /// the socket leaves its SO_REUSEPORT group
    /// ([`crate::listener::leave_udp_group`]), so new datagrams go to the
    /// sluice that takes over, and this one reads what was already queued
    /// and answers its flows until none awaits a reply, or for at most
    /// `limit`. `stop` still ends it at once (the key left the table).
    pub async fn serve_intercepted_with_drain(
        self: Arc<Self>,
        key: ListenKey,
        socket: UdpSocket,
        stop: CancellationToken,
        drain: CancellationToken,
        limit: Duration,
    ) {
        self.serve_with(key, socket, stop, true, Some((drain, limit)))
            .await
    }

    async fn serve_with(
        self: Arc<Self>,
        key: ListenKey,
        socket: UdpSocket,
        stop: CancellationToken,
        pktinfo: bool,
        drain: Option<(CancellationToken, Duration)>,
    ) {
        let Some(service) = self.publisher.load().get(&key).cloned() else {
            return;
        };
        // Every flow socket of this port is in one epoll set, itself
        // watched by the runtime: replies are read by this task, with no
        // task (and no wake-up) per flow.
        let poller = match Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC) {
            Ok(epoll) => Arc::new(Poller(epoll)),
            Err(e) => {
                warn!(listen = %key, error = %e, "cannot create an epoll set for UDP flows: not served");
                return;
            }
        };
        // The safe constructor is deprecated for types whose `as_raw_fd`
        // might change or close the descriptor; `Poller` owns its epoll
        // descriptor and always returns it, and the crate has no `unsafe`.
        #[allow(deprecated)]
        let watched = AsyncFd::with_interest(poller.clone(), Interest::READABLE);
        let replies = match watched {
            Ok(fd) => fd,
            Err(e) => {
                warn!(listen = %key, error = %e, "cannot watch the UDP flows' epoll set: not served");
                return;
            }
        };
        let metrics = self.metrics.udp.service(&service.name);
        let mut port = Port {
            proxy: self.clone(),
            key,
            socket: Arc::new(socket),
            flows: HashMap::new(),
            runtime: ServiceRuntime::default(),
            metrics,
            poller,
            by_id: HashMap::new(),
            reply_buf: vec![0; MAX_DATAGRAM],
            next_id: 0,
            resend_after: self.resend_after(&key, &service),
            deadlines: VecDeque::new(),
            heard: HashMap::new(),
        };
        let mut changes = self.publisher.subscribe();
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut backoff = Duration::from_millis(5);
        // Draining (a hand-over): out of the group since, serving until.
        let mut draining: Option<Instant> = None;
        loop {
            if let Some(until) = draining
                && (Instant::now() >= until || !port.awaiting_replies())
                && read_queued(&mut port, &mut buf, pktinfo) == 0
            {
                break;
            }
            let drain_now = async {
                match (&drain, draining) {
                    (Some((drain, _)), None) => drain.cancelled().await,
                    _ => std::future::pending().await,
                }
            };
            let next_deadline = port.deadlines.front().map(|d| d.at);
            let deadline = tokio::time::sleep_until(next_deadline.unwrap_or(far_future()).into());
            tokio::select! {
                r = recv(&port.socket, &mut buf, pktinfo) => match r {
                    Ok((n, client, local)) => {
                        backoff = Duration::from_millis(5);
                        port.on_datagram(client, local, &buf[..n]);
                        // Whatever else is queued, before the other
                        // branches are polled again (bounded: fairness).
                        for _ in 1..BATCH {
                            let Ok((n, client, local)) = try_recv(&port.socket, &mut buf, pktinfo) else {
                                break;
                            };
                            port.on_datagram(client, local, &buf[..n]);
                        }
                    }
                    Err(e) => {
                        // Nothing a client sends makes recv_from fail on an
                        // unconnected socket; back off rather than spin.
                        warn!(listen = %key, error = %e, ?backoff, "UDP receive failed; backing off");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = stop.cancelled() => break,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                },
                ready = replies.readable() => match ready {
                    Ok(mut guard) => {
                        if !port.on_replies() {
                            guard.clear_ready();
                        }
                    }
                    Err(e) => {
                        warn!(listen = %key, error = %e, "UDP flows' epoll set failed: not served");
                        break;
                    }
                },
                changed = changes.changed() => {
                    if changed.is_err() || !port.on_table() {
                        break;
                    }
                }
                _ = sweep.tick() => port.expire(Instant::now()),
                _ = deadline, if next_deadline.is_some() => port.on_deadlines(Instant::now()),
                () = drain_now => {
                    let limit = drain.as_ref().map_or(Duration::ZERO, |(_, l)| *l);
                    if let Err(e) = crate::listener::leave_udp_group(&SockRef::from(&*port.socket)) {
                        warn!(listen = %key, error = %e, "cannot hand the UDP port over: closing it");
                        break;
                    }
                    draining = Some(Instant::now() + limit);
                    // What was queued before the socket left the group.
                    read_queued(&mut port, &mut buf, pktinfo);
                    debug!(listen = %key, flows = port.flows.len(), "UDP port handed over: draining its flows");
                }
                _ = stop.cancelled() => break,
            }
        }
        let name = port.metrics.name.clone();
        drop(port);
        self.metrics.udp.forget_service(&name);
    }
}

impl UdpProxy {
    /// The re-send deadline of the Service at `key`: `None` when re-send is
    /// off for it (its setting, else on for port 53 only) or for all
    /// (`--udp-resend-after 0`).
    fn resend_after(&self, key: &ListenKey, service: &Service) -> Option<Duration> {
        resend_after(
            service.settings.udp_resend,
            key.addr.port(),
            self.config.resend_after,
        )
    }
}

/// [`UdpProxy::resend_after`]: the Service's setting, else on for port 53
/// (DNS) only; `after` zero turns it off everywhere.
fn resend_after(setting: Option<bool>, port: u16, after: Duration) -> Option<Duration> {
    let on = setting.unwrap_or(port == 53);
    (on && !after.is_zero()).then_some(after)
}

/// Reads and handles every datagram queued on `port`'s socket now, with
/// the syscall itself rather than the runtime's readiness (which may not
/// have seen the last arrivals yet): a draining port must not close on a
/// datagram that is already queued. How many were read.
fn read_queued(port: &mut Port, buf: &mut [u8], pktinfo: bool) -> usize {
    let mut read = 0;
    loop {
        let got = if pktinfo {
            recv_local(&port.socket, buf)
        } else {
            try_recv(&port.socket, buf, false)
        };
        let Ok((n, client, local)) = got else {
            return read;
        };
        port.on_datagram(client, local, &buf[..n]);
        read += 1;
    }
}

/// An instant no deadline reaches (a disabled timer branch's target).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

/// Binds a shareable UDP socket on `addr` (SO_REUSEADDR, SO_REUSEPORT and
/// IP_FREEBIND, like the TCP listeners of [`crate::listener`]).
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket =
        crate::listener::shareable_socket(addr, Type::DGRAM, crate::listener::Kind::Service)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Turns on `IP_PKTINFO` (IPv4) or `IPV6_RECVPKTINFO` (IPv6) on `socket`:
/// every datagram received says which local address it was sent to.
pub fn set_pktinfo(socket: &Socket, v6: bool) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    match v6 {
        false => setsockopt(socket, sockopt::Ipv4PacketInfo, &true),
        true => setsockopt(socket, sockopt::Ipv6RecvPacketInfo, &true),
    }
    .map_err(io::Error::from)
}

/// Receives one datagram: its length, sender, and (with `pktinfo`) the
/// local address it was sent to.
async fn recv(
    socket: &UdpSocket,
    buf: &mut [u8],
    pktinfo: bool,
) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    if !pktinfo {
        let (n, client) = socket.recv_from(buf).await?;
        return Ok((n, client, None));
    }
    socket
        .async_io(Interest::READABLE, || recv_local(socket, buf))
        .await
}

/// [`recv`] without waiting (`WouldBlock` when nothing is queued).
fn try_recv(
    socket: &UdpSocket,
    buf: &mut [u8],
    pktinfo: bool,
) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    if !pktinfo {
        let (n, client) = socket.try_recv_from(buf)?;
        return Ok((n, client, None));
    }
    socket.try_io(Interest::READABLE, || recv_local(socket, buf))
}

/// recvmsg(2) with the `IP_PKTINFO`/`IPV6_PKTINFO` control message: the
/// header's destination address is where the datagram was redirected to.
fn recv_local(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrLike, SockaddrStorage, recvmsg};
    let mut iov = [io::IoSliceMut::new(buf)];
    // Room for one in6_pktinfo message (40 bytes on 64-bit Linux).
    let mut control = [0u8; 64];
    let msg = recvmsg::<SockaddrStorage>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut control[..]),
        MsgFlags::empty(),
    )?;
    let client = msg.address.and_then(|a| {
        match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
            (Some(v4), _) => Some(SocketAddr::V4((*v4).into())),
            (_, Some(v6)) => Some(SocketAddr::V6((*v6).into())),
            _ => None,
        }
        .filter(|_| a.len() > 0)
    });
    let Some(client) = client else {
        return Err(io::Error::other("datagram without an IP source address"));
    };
    let mut local = None;
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::Ipv4PacketInfo(i) => {
                local = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(i.ipi_addr.s_addr))));
            }
            ControlMessageOwned::Ipv6PacketInfo(i) => {
                local = Some(IpAddr::V6(Ipv6Addr::from(i.ipi6_addr.s6_addr)));
            }
            _ => {}
        }
    }
    Ok((msg.bytes, client, local))
}

/// Sends `payload` to `client` from `service`, from the local address
/// `local` when given (`IP_PKTINFO`/`IPV6_PKTINFO`), else from whatever
/// address routing picks (a socket bound on the Service address).
fn send_reply(
    service: &UdpSocket,
    payload: &[u8],
    client: SocketAddr,
    local: Option<IpAddr>,
) -> io::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrIn, SockaddrIn6, sendmsg};
    let iov = [io::IoSlice::new(payload)];
    let fd = service.as_raw_fd();
    let sent = match (client, local) {
        (SocketAddr::V4(c), Some(IpAddr::V4(l))) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from(l).to_be(),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            let cmsg = [ControlMessage::Ipv4PacketInfo(&info)];
            sendmsg(
                fd,
                &iov,
                &cmsg,
                MsgFlags::empty(),
                Some(&SockaddrIn::from(c)),
            )
        }
        (SocketAddr::V6(c), Some(IpAddr::V6(l))) => {
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: l.octets(),
                },
                ipi6_ifindex: 0,
            };
            let cmsg = [ControlMessage::Ipv6PacketInfo(&info)];
            sendmsg(
                fd,
                &iov,
                &cmsg,
                MsgFlags::empty(),
                Some(&SockaddrIn6::from(c)),
            )
        }
        _ => return SockRef::from(service).send_to(payload, &client.into()),
    };
    sent.map_err(io::Error::from)
}

/// A non-blocking UDP socket connected to `backend`, for one flow (read
/// through its port's epoll set, not the runtime).
fn connect_udp(backend: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(backend), Type::DGRAM, None)?;
    socket.set_nonblocking(true)?;
    socket.connect(&backend.into())?;
    Ok(socket.into())
}

/// The epoll set of one port's flow sockets (level-triggered, keyed by
/// flow id). A flow socket leaves it when it is closed.
struct Poller(Epoll);

impl AsRawFd for Poller {
    fn as_raw_fd(&self) -> RawFd {
        self.0.0.as_raw_fd()
    }
}

/// Flow sockets read per epoll round, and rounds per wake-up (fairness
/// with the port's other work).
const REPLY_EVENTS: usize = 64;
const REPLY_ROUNDS: usize = 4;

/// Whether a socket error says the backend cannot be reached (an ICMP
/// error came back for what was sent to it), and how the tracker counts it.
fn unreachable_kind(e: &io::Error) -> Option<DialErrorKind> {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Some(DialErrorKind::Refused),
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            Some(DialErrorKind::Unreachable)
        }
        _ => None,
    }
}

/// Milliseconds since a process-wide origin (flow and backend timestamps).
fn millis(at: Instant) -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(at.saturating_duration_since(origin).as_millis()).unwrap_or(u64::MAX)
}

/// When a flow's backend replied.
#[derive(Debug, Default)]
struct Replies {
    /// The backend replied at least once.
    replied: bool,
    /// When the backend last replied ([`millis`]).
    last_reply: u64,
}

/// A flow's backend is unreachable (an ICMP error on its socket).
struct Failure {
    client: SocketAddr,
    /// The flow's socket generation (a re-pinned flow ignores failures of
    /// its previous socket).
    id: u64,
    kind: DialErrorKind,
}

/// Why a flow moves to another backend ([`Port::repin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repin {
    /// Its last datagram went to the old backend and is sent again (once:
    /// counted in `sluice_udp_resent_datagrams_total`).
    Resend,
    /// A new datagram of the client, not sent to the old backend (ejected
    /// or gone): sent to the new one for the first time.
    Move,
}

/// One client address of one Service.
struct Flow {
    backend: SocketAddr,
    /// Where the client's datagrams were redirected to (intercepted ports
    /// only): the replies' source.
    local: Option<IpAddr>,
    /// Connected to `backend`; in the port's epoll set under `id`.
    socket: std::net::UdpSocket,
    id: u64,
    replies: Replies,
    /// The last datagram from the client, kept to be re-sent once.
    last: Vec<u8>,
    /// When the client last sent.
    last_sent: Instant,
    /// `last` was already re-sent (after its first backend failed).
    resent: bool,
    /// No reply came since the client's last datagram (exact, where
    /// [`Flow::awaiting_reply`] compares milliseconds): a draining port
    /// waits for these ([`Port::awaiting_replies`]).
    unanswered: bool,
    /// Datagrams the client sent on this flow before `last` (tells a
    /// deadline for `last` from one for an earlier datagram).
    seq: u64,
    /// Counts the flow in the bound and the gauge while it lives.
    _slot: Slot,
}

impl Flow {
    /// Whether the client's last datagram is still unanswered.
    fn awaiting_reply(&self) -> bool {
        self.replies.last_reply < millis(self.last_sent) || !self.replies.replied
    }
}

/// A flow's place in the global bound and the open-flows gauge.
struct Slot {
    open: Arc<AtomicUsize>,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

/// The state of one served socket: its flows and how to reach them.
struct Port {
    proxy: Arc<UdpProxy>,
    key: ListenKey,
    socket: Arc<UdpSocket>,
    flows: HashMap<SocketAddr, Flow>,
    runtime: ServiceRuntime,
    metrics: UdpServiceMetrics,
    /// The flow sockets' epoll set.
    poller: Arc<Poller>,
    /// Flow id → client, for the epoll events (stale ids are dropped at
    /// the next idle sweep).
    by_id: HashMap<u64, SocketAddr>,
    /// Replies are read here.
    reply_buf: Vec<u8>,
    next_id: u64,
    /// `Some`: unanswered datagrams are re-sent after this long
    /// ([`UdpProxy::resend_after`]).
    resend_after: Option<Duration>,
    /// Datagrams sent with re-send on, oldest first (one deadline each, all
    /// `resend_after` long, so the queue is in deadline order).
    deadlines: VecDeque<Deadline>,
    /// When each backend of this Service last answered any flow, and its
    /// unanswered datagrams since: how a silent backend is told from a slow
    /// answer.
    heard: HashMap<SocketAddr, Heard>,
}

/// A datagram sent to a backend that must be answered by `at`.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    /// When it was sent to the flow's current backend.
    sent: Instant,
    client: SocketAddr,
    /// The flow's socket generation and datagram number when it was sent:
    /// a later datagram or a re-pin makes the deadline stale.
    id: u64,
    seq: u64,
}

/// What a served socket knows of one backend's answers.
#[derive(Debug, Default)]
struct Heard {
    /// Its last reply to any flow ([`millis`]).
    last_reply: u64,
    /// `last_reply` when `misses` started counting.
    seen: u64,
    /// Datagrams left unanswered past their deadline since `seen`.
    misses: u32,
}

impl Port {
    /// Whether some flow's last datagram is still unanswered.
    fn awaiting_replies(&self) -> bool {
        self.flows.values().any(|f| f.unanswered)
    }

    fn service(&self) -> Option<Arc<Service>> {
        self.proxy.publisher.load().get(&self.key).cloned()
    }

    /// A datagram from `client`.
    fn on_datagram(&mut self, client: SocketAddr, local: Option<IpAddr>, data: &[u8]) {
        let Some(service) = self.service() else {
            return; // the key just left the table: the socket closes soon
        };
        let now = Instant::now();
        if let Some(flow) = self.flows.get_mut(&client) {
            flow.last.clear();
            flow.last.extend_from_slice(data);
            flow.last_sent = now;
            flow.unanswered = true;
            flow.resent = false;
            flow.seq += 1;
            let backend = flow.backend;
            if service.is_eligible(backend) && !self.proxy.tracker.is_ejected(backend, now) {
                self.send(client);
                return;
            }
            // Its backend left (the table change is not handled yet), or
            // another flow found it unreachable and it is ejected: this
            // datagram goes to another backend at once instead of into what
            // may already be a black hole (a deleted pod sends no ICMP).
            self.repin(&service, client, backend, None, Repin::Move);
            return;
        }
        if self.proxy.open.load(Ordering::Relaxed) >= self.proxy.config.max_flows {
            self.proxy
                .metrics
                .udp
                .dropped(&service.name, UdpDrop::FlowLimit);
            debug!(client = %client, listen = %self.key, "UDP flow limit reached: datagram dropped");
            return;
        }
        let ctx = PickContext {
            health: &*self.proxy.tracker,
            client_ip: client.ip(),
            exclude: &[],
            now,
        };
        let Some(backend) = pick(&service, &self.runtime, &ctx) else {
            self.proxy
                .metrics
                .udp
                .dropped(&service.name, UdpDrop::NoBackend);
            return;
        };
        let Some(flow) = self.open_flow(client, local, backend, data.to_vec(), now) else {
            return;
        };
        debug!(client = %client, listen = %self.key, backend = %backend, "UDP flow opened");
        self.flows.insert(client, flow);
        self.send(client);
    }

    /// A new flow (or a flow's new socket) from `client` to `backend`;
    /// `None` when sluice cannot open a socket (counted).
    fn open_flow(
        &mut self,
        client: SocketAddr,
        local: Option<IpAddr>,
        backend: SocketAddr,
        last: Vec<u8>,
        now: Instant,
    ) -> Option<Flow> {
        self.next_id += 1;
        let id = self.next_id;
        let opened = connect_udp(backend).and_then(|s| {
            let event = EpollEvent::new(EpollFlags::EPOLLIN, id);
            self.poller.0.add(&s, event)?;
            Ok(s)
        });
        let socket = match opened {
            Ok(s) => s,
            Err(e) => {
                if let Some(what) = crate::saturation::local_resource(&e) {
                    self.proxy.metrics.saturation.record(now, what);
                }
                self.proxy
                    .metrics
                    .udp
                    .dropped(&self.metrics.name, UdpDrop::Local);
                debug!(client = %client, backend = %backend, error = %e, "cannot open a UDP flow socket");
                return None;
            }
        };
        self.heard.entry(backend).or_default();
        self.by_id.insert(id, client);
        self.proxy.open.fetch_add(1, Ordering::Relaxed);
        self.metrics.flows.inc();
        Some(Flow {
            backend,
            local,
            socket,
            id,
            replies: Replies::default(),
            last,
            last_sent: now,
            resent: false,
            unanswered: true,
            seq: 0,
            _slot: Slot {
                open: self.proxy.open.clone(),
                gauge: self.metrics.flows.clone(),
            },
        })
    }

    /// Sends the flow's last datagram to its backend.
    fn send(&mut self, client: SocketAddr) {
        let Some(flow) = self.flows.get(&client) else {
            return;
        };
        // A direct send(2): tokio's `try_send` reports WouldBlock until the
        // reactor has seen the new socket writable.
        match flow.socket.send(&flow.last) {
            Ok(n) => {
                self.metrics.datagrams_up.inc();
                self.metrics.bytes_up.inc_by(n as u64);
                if let Some(after) = self.resend_after
                    && self.deadlines.len() < MAX_DEADLINES
                {
                    let sent = Instant::now();
                    self.deadlines.push_back(Deadline {
                        at: sent + after,
                        sent,
                        client,
                        id: flow.id,
                        seq: flow.seq,
                    });
                }
            }
            Err(e) => match unreachable_kind(&e) {
                // An ICMP error for an earlier datagram was pending.
                Some(kind) => {
                    let id = flow.id;
                    self.on_failure(Failure { client, id, kind });
                }
                None => {
                    self.proxy
                        .metrics
                        .udp
                        .dropped(&self.metrics.name, UdpDrop::SendFailed);
                    debug!(client = %client, backend = %flow.backend, error = %e, "UDP send failed: datagram dropped");
                }
            },
        }
    }

    /// A flow's backend is unreachable: eject it, and re-send the last
    /// datagram once to another backend.
    fn on_failure(&mut self, failure: Failure) {
        let Failure { client, id, kind } = failure;
        let Some(flow) = self.flows.get(&client).filter(|f| f.id == id) else {
            return; // the flow ended or moved meanwhile
        };
        let (backend, resent) = (flow.backend, flow.resent);
        let cooldown = self
            .proxy
            .tracker
            .dial_failed(backend, kind, flow.last_sent);
        debug!(client = %client, backend = %backend, reason = kind.as_str(), ?cooldown, "UDP backend unreachable; ejected");
        match self.service() {
            Some(service) if !resent => {
                self.repin(&service, client, backend, Some(kind), Repin::Resend)
            }
            _ => {
                self.flows.remove(&client);
                self.proxy
                    .metrics
                    .udp
                    .flow_ended(&self.metrics.name, UdpFlowEnd::Unreachable);
            }
        }
    }

    /// Moves the flow of `client` off `from` to another eligible backend
    /// and sends its last datagram there; closes the flow when there is
    /// none. `unreachable`: why `from` failed (`None`: it left the table or
    /// is ejected). `how`: whether that datagram already went to `from`.
    fn repin(
        &mut self,
        service: &Service,
        client: SocketAddr,
        from: SocketAddr,
        unreachable: Option<DialErrorKind>,
        how: Repin,
    ) {
        let end = match unreachable {
            Some(_) => UdpFlowEnd::Unreachable,
            None => UdpFlowEnd::BackendGone,
        };
        let Some(backend) = self.pick_other(service, client, from) else {
            if self.flows.remove(&client).is_some() {
                self.proxy.metrics.udp.flow_ended(&self.metrics.name, end);
                self.proxy
                    .metrics
                    .udp
                    .dropped(&self.metrics.name, UdpDrop::NoBackend);
            }
            return;
        };
        self.repin_to(client, from, backend, end, how);
    }

    /// Another backend than `from` for `client`, if one is eligible.
    fn pick_other(
        &self,
        service: &Service,
        client: SocketAddr,
        from: SocketAddr,
    ) -> Option<SocketAddr> {
        let ctx = PickContext {
            health: &*self.proxy.tracker,
            client_ip: client.ip(),
            exclude: &[from],
            now: Instant::now(),
        };
        pick(service, &self.runtime, &ctx)
    }

    /// [`Self::repin`] to `backend`, picked already.
    fn repin_to(
        &mut self,
        client: SocketAddr,
        from: SocketAddr,
        backend: SocketAddr,
        end: UdpFlowEnd,
        how: Repin,
    ) {
        let Some(old) = self.flows.remove(&client) else {
            return;
        };
        let now = Instant::now();
        let (last_sent, seq) = (old.last_sent, old.seq);
        let last = old.last.clone();
        let local = old.local;
        // The old socket and its slot go before the new ones are taken.
        drop(old);
        let Some(mut flow) = self.open_flow(client, local, backend, last, now) else {
            self.proxy.metrics.udp.flow_ended(&self.metrics.name, end);
            return;
        };
        flow.last_sent = last_sent;
        flow.seq = seq;
        if how == Repin::Resend {
            flow.resent = true;
            self.metrics.resent.inc();
        }
        debug!(client = %client, from = %from, to = %backend, ?how, "UDP flow re-pinned");
        self.flows.insert(client, flow);
        self.send(client);
    }

    /// A new table: flows whose backend is no longer eligible are closed,
    /// or re-pinned when their last datagram is unanswered. Returns false
    /// when the key left the table.
    fn on_table(&mut self) -> bool {
        let Some(service) = self.service() else {
            return false;
        };
        self.resend_after = self.proxy.resend_after(&self.key, &service);
        if self.resend_after.is_none() {
            self.deadlines.clear();
        }
        (self.heard).retain(|addr, _| service.backends().iter().any(|b| b.addr == *addr));
        let moved: Vec<(SocketAddr, SocketAddr, bool)> = (self.flows.iter())
            .filter(|(_, f)| !service.is_eligible(f.backend))
            .map(|(c, f)| (*c, f.backend, f.awaiting_reply() && !f.resent))
            .collect();
        for (client, backend, resend) in moved {
            if resend {
                self.repin(&service, client, backend, None, Repin::Resend);
            } else {
                self.flows.remove(&client);
                self.proxy
                    .metrics
                    .udp
                    .flow_ended(&self.metrics.name, UdpFlowEnd::BackendGone);
            }
        }
        true
    }

    /// Datagrams whose deadline passed unanswered: each is re-sent once to
    /// another eligible backend (the flow moves there), and a backend that
    /// answered nothing at all since is ejected when it has missed
    /// [`SUSPECT_AFTER`] in a row, so that new flows avoid it and flows
    /// pinned to it move at their next datagram. With no other backend the
    /// flow stays (a slow answer may still come).
    fn on_deadlines(&mut self, now: Instant) {
        while let Some(d) = self.deadlines.front().copied() {
            if d.at > now {
                break;
            }
            self.deadlines.pop_front();
            let Some(flow) = (self.flows.get_mut(&d.client))
                .filter(|f| f.id == d.id && f.seq == d.seq && f.awaiting_reply())
            else {
                continue; // answered, superseded, moved or closed
            };
            let (backend, resent) = (flow.backend, flow.resent);
            // At most once per datagram, whatever happens below.
            flow.resent = true;
            // Counted (`sluice_dial_failures_total{reason="timeout"}`) when
            // it ejects, not for every datagram missed while ejected.
            if self.missed(backend, d.sent) && !self.proxy.tracker.is_ejected(backend, now) {
                let cooldown =
                    (self.proxy.tracker).dial_failed(backend, DialErrorKind::Timeout, d.sent);
                debug!(backend = %backend, ?cooldown, "UDP backend answers nothing; ejected");
            }
            if resent {
                continue;
            }
            let Some(service) = self.service() else {
                return;
            };
            let Some(to) = self.pick_other(&service, d.client, backend) else {
                continue;
            };
            debug!(client = %d.client, from = %backend, to = %to, "UDP datagram unanswered; re-sent");
            self.repin_to(
                d.client,
                backend,
                to,
                UdpFlowEnd::Unreachable,
                Repin::Resend,
            );
        }
    }

    /// Counts a datagram `backend` left unanswered (sent at `sent`);
    /// whether the backend now looks dead: it has answered no flow since
    /// that datagram was sent, and missed [`SUSPECT_AFTER`] in a row.
    fn missed(&mut self, backend: SocketAddr, sent: Instant) -> bool {
        let Some(h) = self.heard.get_mut(&backend) else {
            return false;
        };
        let last = h.last_reply;
        if last >= millis(sent) {
            // It answers others: a slow answer, not a dead backend.
            (h.seen, h.misses) = (last, 0);
            return false;
        }
        if last != h.seen {
            (h.seen, h.misses) = (last, 0);
        }
        h.misses = h.misses.saturating_add(1);
        h.misses >= SUSPECT_AFTER
    }

    /// Closes flows idle for their timeout.
    fn expire(&mut self, now: Instant) {
        let Some(service) = self.service() else {
            return;
        };
        if let Some(affinity) = service.affinity {
            self.runtime.expire_affinity(affinity.timeout, now);
        }
        let configured = service.settings.udp_timeout;
        let now_ms = millis(now);
        let before = self.flows.len();
        self.flows.retain(|_, f| {
            let replied = f.replies.replied;
            let timeout = configured.unwrap_or(if replied {
                REPLIED_TIMEOUT
            } else {
                UNREPLIED_TIMEOUT
            });
            let last = millis(f.last_sent).max(f.replies.last_reply);
            u128::from(now_ms.saturating_sub(last)) < timeout.as_millis()
        });
        for _ in self.flows.len()..before {
            self.proxy
                .metrics
                .udp
                .flow_ended(&self.metrics.name, UdpFlowEnd::Idle);
        }
        let flows = &self.flows;
        (self.by_id).retain(|id, client| flows.get(client).is_some_and(|f| f.id == *id));
    }
}

impl Port {
    /// Reads the replies waiting on flow sockets (one datagram per ready
    /// socket per round: the set is level-triggered) and forwards them;
    /// handles ICMP errors. Returns true when there may be more (the
    /// rounds ran out), false when the set had nothing ready.
    fn on_replies(&mut self) -> bool {
        let mut events = [EpollEvent::empty(); REPLY_EVENTS];
        let mut failures = Vec::new();
        let mut more = true;
        for _ in 0..REPLY_ROUNDS {
            let n = match self.poller.0.wait(&mut events, EpollTimeout::ZERO) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    debug!(listen = %self.key, error = %e, "epoll_wait on UDP flows failed");
                    0
                }
            };
            if n == 0 {
                more = false;
                break;
            }
            for ev in events.iter().take(n) {
                self.on_reply(ev.data(), ev.events(), &mut failures);
            }
        }
        for failure in failures {
            self.on_failure(failure);
        }
        more
    }

    /// The flow socket of flow `id` is ready (`flags`): forwards one reply
    /// to the client from the Service's socket, or notes an ICMP error.
    fn on_reply(&mut self, id: u64, flags: EpollFlags, failures: &mut Vec<Failure>) {
        let Some(&client) = self.by_id.get(&id) else {
            return;
        };
        let Some(flow) = self.flows.get_mut(&client).filter(|f| f.id == id) else {
            self.by_id.remove(&id);
            return;
        };
        if flags.contains(EpollFlags::EPOLLERR) {
            // ICMP port or host unreachable for what was sent.
            match flow.socket.take_error() {
                Ok(Some(e)) if let Some(kind) = unreachable_kind(&e) => {
                    failures.push(Failure { client, id, kind });
                    return;
                }
                Ok(Some(e)) => {
                    debug!(backend = %flow.backend, error = %e, "UDP flow socket error");
                }
                _ => {}
            }
            if !flags.contains(EpollFlags::EPOLLIN) {
                return;
            }
        }
        let n = match flow.socket.recv(&mut self.reply_buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                if let Some(kind) = unreachable_kind(&e) {
                    failures.push(Failure { client, id, kind });
                } else {
                    debug!(backend = %flow.backend, error = %e, "UDP receive from backend failed");
                }
                return;
            }
        };
        if !std::mem::replace(&mut flow.replies.replied, true)
            && self.proxy.tracker.dial_succeeded(flow.backend)
        {
            info!(backend = %flow.backend, "backend answers again");
        }
        let at = millis(Instant::now());
        flow.replies.last_reply = at;
        flow.unanswered = false;
        if let Some(heard) = self.heard.get_mut(&flow.backend) {
            heard.last_reply = at;
        }
        let payload = self.reply_buf.get(..n).unwrap_or_default();
        // A full send buffer drops the reply, as the network would.
        match send_reply(&self.socket, payload, client, flow.local) {
            Ok(_) => {
                self.metrics.datagrams_down.inc();
                self.metrics.bytes_down.inc_by(n as u64);
            }
            Err(e) => {
                debug!(client = %client, error = %e, "UDP reply to client not sent");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_errors_are_classified() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(unreachable_kind(&refused), Some(DialErrorKind::Refused));
        let host = io::Error::from_raw_os_error(libc::EHOSTUNREACH);
        assert_eq!(unreachable_kind(&host), Some(DialErrorKind::Unreachable));
        let other = io::Error::from(io::ErrorKind::WouldBlock);
        assert_eq!(unreachable_kind(&other), None);
    }

    #[test]
    fn resend_is_on_for_dns_by_default_and_as_set_otherwise() {
        let after = DEFAULT_RESEND_AFTER;
        assert_eq!(resend_after(None, 53, after), Some(after));
        assert_eq!(resend_after(None, 514, after), None);
        assert_eq!(resend_after(Some(false), 53, after), None);
        assert_eq!(resend_after(Some(true), 514, after), Some(after));
        assert_eq!(resend_after(Some(true), 53, Duration::ZERO), None);
    }

    #[tokio::test]
    async fn a_connected_socket_reports_icmp_port_unreachable() {
        // Nothing listens on this port (bound then closed).
        let gone = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = gone.local_addr().unwrap();
        drop(gone);
        let s = UdpSocket::from_std(connect_udp(addr).unwrap()).unwrap();
        s.send(b"x").await.unwrap();
        let mut buf = [0u8; 16];
        let e = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(unreachable_kind(&e), Some(DialErrorKind::Refused));
    }
}

//! UDP Services: one socket per UDP listen key, a flow table per Service,
//! and the re-send that hides a backend going away.
//!
//! This module owns everything UDP in the data plane:
//! - [`UdpFollower`] ([`UdpProxy::follower`]), in bind mode, follows the
//!   table in the reconcile loop and binds one socket per UDP
//!   [`ListenKey`] (on the Service address: loopback for the file source,
//!   the VIPs on `sluice0` for the Kubernetes source) and serves it;
//! - [`UdpProxy::serve`] serves one socket for one listen key. It does not
//!   care how datagrams reach the socket: the bind-mode socket and the
//!   local port an nftables `redirect` sends one UDP Service port to
//!   ([`UdpProxy::serve_intercepted_with_drain`], [`crate::udp_intercept`]; see
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

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use sluice_control::{ListenKey, Protocol, Publisher, Service, Table, TableDiff};
use socket2::{Domain, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::balance::{PickContext, ServiceRuntime, pick};
use crate::connect::DialErrorKind;
use crate::metrics::{Metrics, UdpDrop, UdpFlowEnd, UdpServiceMetrics};
use crate::reconcile::Follower;
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

/// Datagrams a served socket reads with one `recvmmsg` when they are
/// queued (each into a slot of [`MAX_DATAGRAM`] bytes: the port's receive
/// buffer is this many slots, resident only as far as datagrams filled
/// them).
const RECV_BATCH: usize = 32;

/// Replies a served socket keeps before it sends them with one `sendmmsg`
/// (at the end of each epoll round, or sooner when its buffer is full).
const SEND_BATCH: usize = 64;

/// The replies' buffer: replies are read into it back to back, and one
/// more is read only while [`MAX_DATAGRAM`] bytes are left.
const OUTBOX_BYTES: usize = 4 * MAX_DATAGRAM;

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

/// Bind mode's UDP sockets, kept equal to the table's UDP listen keys by
/// the reconcile loop ([`UdpProxy::follower`]). Only the keys of the diff
/// are looked at, and the keys whose bind failed (warned once, retried at
/// every apply: the loop calls an incomplete follower again after its
/// retry delay). Dropping it (the loop stops) closes every socket.
pub struct UdpFollower {
    proxy: Arc<UdpProxy>,
    serving: HashMap<ListenKey, Serving>,
    /// Keys whose socket could not be bound.
    failed: HashSet<ListenKey>,
}

impl UdpFollower {
    fn sync(&mut self, diff: &TableDiff, table: &Table) -> bool {
        let changed = diff.changed.iter().map(|(k, _)| k);
        let keys: Vec<ListenKey> = (diff.added.iter().chain(&diff.removed).chain(changed))
            .chain(&self.failed)
            .filter(|k| k.protocol == Protocol::Udp)
            .copied()
            .collect();
        for key in keys {
            self.sync_key(key, table);
        }
        self.failed.is_empty()
    }

    /// Serves `key` as the table has it: closes its socket when the key
    /// left or leads to another Service, binds one when it has none.
    fn sync_key(&mut self, key: ListenKey, table: &Table) {
        let want = table.get(&key);
        if let Some(s) = self.serving.get(&key) {
            // A task that ended on its own (its epoll set failed) is
            // replaced.
            if want.is_some_and(|svc| svc.name == s.service) && !s.task.is_finished() {
                return;
            }
            info!(listen = %key, service = %s.service, "UDP service removed: socket closed");
            s.stop.cancel();
            self.serving.remove(&key);
        }
        let Some(service) = want else {
            self.failed.remove(&key);
            return;
        };
        match bind_udp(key.addr) {
            Ok(socket) => {
                self.failed.remove(&key);
                info!(listen = %key, service = %service.name, "listening (UDP)");
                let stop = CancellationToken::new();
                let task = tokio::spawn((self.proxy.clone()).serve(key, socket, stop.clone()));
                let service = service.name.clone();
                (self.serving).insert(
                    key,
                    Serving {
                        service,
                        stop,
                        task,
                    },
                );
            }
            Err(e) => {
                if self.failed.insert(key) {
                    warn!(listen = %key, service = %service.name, error = %e, "cannot bind UDP socket; retrying");
                }
            }
        }
    }
}

impl Follower for UdpFollower {
    fn apply<'a>(&'a mut self, diff: &'a TableDiff, table: &'a Table) -> BoxFuture<'a, bool> {
        let complete = self.sync(diff, table);
        Box::pin(std::future::ready(complete))
    }

    /// As the TCP listeners: a port held by the process being replaced
    /// comes free soon.
    fn retry_after(&self) -> Duration {
        crate::server::BIND_RETRY
    }
}

impl Drop for UdpFollower {
    fn drop(&mut self) {
        for s in self.serving.values() {
            s.stop.cancel();
        }
    }
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

    /// Bind mode: the [`crate::reconcile::Follower`] that binds a socket
    /// for every UDP listen key of the table and serves it, and closes
    /// those of keys that left (or now lead to another Service).
    pub fn follower(self: &Arc<Self>) -> UdpFollower {
        UdpFollower {
            proxy: self.clone(),
            serving: HashMap::new(),
            failed: HashSet::new(),
        }
    }

    /// Serves `socket`, which receives the datagrams of the Service at
    /// `key`, until `stop` fires (its follower saw the key leave the table,
    /// or the process stops); while the key is out of the table it has no
    /// backend. Every flow is closed on return.
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
    /// was redirected to. The port is shared with another sluice during a
    /// hand-over ([`crate::udp_intercept`]): when `drain` fires,
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
        // Subscribed before the first read: a publish in between is seen.
        let mut changes = self.publisher.subscribe();
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
            service: service.clone(),
            socket: Arc::new(socket),
            flows: FlowMap::default(),
            runtime: ServiceRuntime::default(),
            metrics,
            poller,
            by_id: FlowMap::default(),
            outbox: Outbox::new(),
            next_id: 0,
            resend_after: self.resend_after(&key, &service),
            deadlines: VecDeque::new(),
            heard: FlowMap::default(),
        };
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        // The oldest re-send deadline's timer, kept across loop passes and
        // moved only when that deadline changes (not re-registered with
        // the runtime's timer for every batch).
        let deadline = tokio::time::sleep_until(far_future().into());
        tokio::pin!(deadline);
        let mut armed: Option<Instant> = None;
        let mut inbox = Inbox::new();
        let mut backoff = Duration::from_millis(5);
        // Draining (a hand-over): out of the group since, serving until.
        let mut draining: Option<Instant> = None;
        loop {
            if let Some(until) = draining
                && (Instant::now() >= until || !port.awaiting_replies())
                && read_queued(&mut port, &mut inbox, pktinfo) == 0
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
            if next_deadline != armed {
                if let Some(at) = next_deadline {
                    deadline.as_mut().reset(at.into());
                }
                armed = next_deadline;
            }
            tokio::select! {
                r = recv(&port.socket, &mut inbox, pktinfo) => match r {
                    Ok(()) => {
                        backoff = Duration::from_millis(5);
                        // Up to RECV_BATCH datagrams from one recvmmsg,
                        // before the other branches are polled again
                        // (bounded: fairness).
                        on_inbox(&mut port, &inbox);
                    }
                    Err(e) => {
                        // Nothing a client sends makes recvmmsg fail on an
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
                    if changed.is_err() {
                        break;
                    }
                    port.on_table();
                }
                _ = sweep.tick() => port.expire(Instant::now()),
                _ = &mut deadline, if armed.is_some() => {
                    // Re-armed at the next pass, whatever the queue holds
                    // (an elapsed timer polled again is ready at once).
                    armed = None;
                    port.on_deadlines(Instant::now());
                }
                () = drain_now => {
                    let limit = drain.as_ref().map_or(Duration::ZERO, |(_, l)| *l);
                    if let Err(e) = crate::listener::leave_udp_group(&socket2::SockRef::from(&*port.socket)) {
                        warn!(listen = %key, error = %e, "cannot hand the UDP port over: closing it");
                        break;
                    }
                    draining = Some(Instant::now() + limit);
                    // What was queued before the socket left the group.
                    read_queued(&mut port, &mut inbox, pktinfo);
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
fn read_queued(port: &mut Port, inbox: &mut Inbox, pktinfo: bool) -> usize {
    let mut read = 0;
    while recv_batch(&port.socket, inbox, pktinfo).is_ok() && !inbox.got.is_empty() {
        read += inbox.got.len();
        on_inbox(port, inbox);
    }
    read
}

/// Handles the datagrams of one `recvmmsg` (at most [`RECV_BATCH`]).
fn on_inbox(port: &mut Port, inbox: &Inbox) {
    // One clock read for the batch: its datagrams arrived together.
    let now = Instant::now();
    for (i, got) in inbox.got.iter().enumerate() {
        match got.client {
            Some(client) if !got.truncated => {
                port.on_datagram(client, got.local, inbox.datagram(i, got.len), now);
            }
            // Never with full-size slots and an IP socket; counted if a
            // kernel ever does it.
            _ => (port.proxy.metrics.udp).dropped(&port.metrics.name, UdpDrop::Truncated),
        }
    }
}

/// An instant no deadline reaches (a disabled timer branch's target).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

/// Binds a shareable UDP socket on `addr` (SO_REUSEPORT and IP_FREEBIND,
/// like the TCP listeners of [`crate::listener`]; no SO_REUSEADDR on UDP).
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

/// A datagram [`recv`] took, its payload in the [`Inbox`] slot of the same
/// index.
#[derive(Debug, Clone, Copy)]
struct Received {
    len: usize,
    /// None: no IP source address (not possible on an IP socket).
    client: Option<SocketAddr>,
    /// Where it was sent to (with `pktinfo`).
    local: Option<IpAddr>,
    /// The kernel cut it to its slot (`MSG_TRUNC`).
    truncated: bool,
}

/// What a served socket reads into: [`RECV_BATCH`] slots of
/// [`MAX_DATAGRAM`] bytes and what each holds. The `recvmmsg` headers are
/// made per call (nix's hold raw pointers: not `Send`, so not kept across
/// an await).
struct Inbox {
    slots: Vec<u8>,
    got: Vec<Received>,
}

impl Inbox {
    fn new() -> Self {
        Self {
            // Zeroed by the allocator (untouched pages stay unmapped).
            slots: vec![0; RECV_BATCH * MAX_DATAGRAM],
            got: Vec::with_capacity(RECV_BATCH),
        }
    }

    /// The payload of datagram `i`, `len` bytes long.
    fn datagram(&self, i: usize, len: usize) -> &[u8] {
        let start = i * MAX_DATAGRAM;
        self.slots
            .get(start..start + len.min(MAX_DATAGRAM))
            .unwrap_or_default()
    }
}

/// Receives the datagrams queued on `socket`, at least one (waits for it),
/// at most [`RECV_BATCH`], into `inbox`.
///
/// A batch shorter than [`RECV_BATCH`] emptied the queue: the socket's
/// readiness is cleared then, as a `WouldBlock` would clear it, so the
/// next call waits for the next datagram instead of making a `recvmmsg`
/// that can only fail (that call cost as much as the batch at low rates).
/// Tokio clears readiness only if no event came since it was read, before
/// the syscall: a datagram that arrives after the queue emptied still
/// wakes the task.
async fn recv(socket: &UdpSocket, inbox: &mut Inbox, pktinfo: bool) -> io::Result<()> {
    loop {
        socket.readable().await?;
        // Not read by this pass unless the closure runs and reads.
        inbox.got.clear();
        let read = socket.try_io(Interest::READABLE, || {
            recv_batch(socket, inbox, pktinfo)?;
            match inbox.got.len() < RECV_BATCH {
                true => Err(io::ErrorKind::WouldBlock.into()),
                false => Ok(()),
            }
        });
        match read {
            Ok(()) => return Ok(()),
            // The queue emptied (readiness cleared): what was read, if any.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !inbox.got.is_empty() {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// recvmmsg(2) without waiting (`WouldBlock` when nothing is queued), with
/// the `IP_PKTINFO`/`IPV6_PKTINFO` control message when `pktinfo`: the
/// header's destination address is where the datagram was redirected to.
fn recv_batch(socket: &UdpSocket, inbox: &mut Inbox, pktinfo: bool) -> io::Result<()> {
    use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};
    // Empty unless this call reads something.
    inbox.got.clear();
    // Room for one in6_pktinfo message (the larger of the two).
    let control = pktinfo.then(|| nix::cmsg_space!(libc::in6_pktinfo));
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(RECV_BATCH, control);
    let mut iovs: Vec<[io::IoSliceMut<'_>; 1]> = (inbox.slots.chunks_mut(MAX_DATAGRAM))
        .map(|slot| [io::IoSliceMut::new(slot)])
        .collect();
    let received = recvmmsg(
        socket.as_raw_fd(),
        &mut headers,
        iovs.iter_mut(),
        MsgFlags::MSG_DONTWAIT,
        None,
    )?;
    for msg in received {
        let client = msg.address.as_ref().and_then(socket_addr);
        let local = match msg.cmsgs() {
            Ok(cmsgs) => local_address(cmsgs),
            Err(_) => None,
        };
        inbox.got.push(Received {
            len: msg.bytes,
            client,
            local,
            truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
        });
    }
    Ok(())
}

/// The IP address and port of a received datagram's source.
fn socket_addr(a: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    use nix::sys::socket::SockaddrLike;
    if a.len() == 0 {
        return None;
    }
    match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
        (Some(v4), _) => Some(SocketAddr::V4((*v4).into())),
        (_, Some(v6)) => Some(SocketAddr::V6((*v6).into())),
        _ => None,
    }
}

/// The local address an `IP_PKTINFO`/`IPV6_PKTINFO` control message names.
fn local_address(cmsgs: nix::sys::socket::CmsgIterator<'_>) -> Option<IpAddr> {
    use nix::sys::socket::ControlMessageOwned;
    let mut local = None;
    for c in cmsgs {
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
    local
}

/// Replies read from flow sockets and not sent to their clients yet:
/// read back to back into one buffer, sent with `sendmmsg` by
/// [`Port::flush`].
struct Outbox {
    buf: Vec<u8>,
    used: usize,
    replies: Vec<Reply>,
}

/// One reply in the [`Outbox`].
#[derive(Debug, Clone, Copy)]
struct Reply {
    start: usize,
    len: usize,
    client: SocketAddr,
    /// The local address to send it from (`IP_PKTINFO`), else routing's.
    local: Option<IpAddr>,
}

impl Outbox {
    fn new() -> Self {
        Self {
            // Zeroed by the allocator (untouched pages stay unmapped).
            buf: vec![0; OUTBOX_BYTES],
            used: 0,
            replies: Vec::with_capacity(SEND_BATCH),
        }
    }

    /// Where the next reply is read: [`MAX_DATAGRAM`] bytes, so it is never
    /// cut. None when full ([`Port::flush`] first).
    fn room(&mut self) -> Option<&mut [u8]> {
        if self.replies.len() >= SEND_BATCH {
            return None;
        }
        self.buf.get_mut(self.used..self.used + MAX_DATAGRAM)
    }

    /// The reply just read into [`Self::room`], `len` bytes.
    fn push(&mut self, len: usize, client: SocketAddr, local: Option<IpAddr>) {
        let len = len.min(MAX_DATAGRAM);
        // A local address of the other family cannot be the source.
        let local = local.filter(|l| l.is_ipv4() == client.is_ipv4());
        (self.replies).push(Reply {
            start: self.used,
            len,
            client,
            local,
        });
        self.used += len;
    }

    fn payload(&self, r: &Reply) -> &[u8] {
        self.buf.get(r.start..r.start + r.len).unwrap_or_default()
    }

    fn clear(&mut self) {
        self.replies.clear();
        self.used = 0;
    }
}

/// Sends `replies` (all to be sent from `local`) from `service` with one
/// sendmmsg(2): from `local` when given (`IP_PKTINFO`/`IPV6_PKTINFO`),
/// else from whatever address routing picks (a socket bound on the
/// Service address). Returns how many were sent, from the first; an error
/// is the first one's.
fn send_replies(
    service: &UdpSocket,
    outbox: &Outbox,
    replies: &[Reply],
    local: Option<IpAddr>,
) -> io::Result<usize> {
    use nix::sys::socket::{
        ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, sendmmsg, sendmsg,
    };
    let info4 = match local {
        Some(IpAddr::V4(l)) => Some(libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: libc::in_addr {
                s_addr: u32::from(l).to_be(),
            },
            ipi_addr: libc::in_addr { s_addr: 0 },
        }),
        _ => None,
    };
    let info6 = match local {
        Some(IpAddr::V6(l)) => Some(libc::in6_pktinfo {
            ipi6_addr: libc::in6_addr {
                s6_addr: l.octets(),
            },
            ipi6_ifindex: 0,
        }),
        _ => None,
    };
    let one: [ControlMessage<'_>; 1];
    let (cmsg, space): (&[ControlMessage<'_>], _) = match (&info4, &info6) {
        (Some(i), _) => {
            one = [ControlMessage::Ipv4PacketInfo(i)];
            (&one, Some(nix::cmsg_space!(libc::in_pktinfo)))
        }
        (_, Some(i)) => {
            one = [ControlMessage::Ipv6PacketInfo(i)];
            (&one, Some(nix::cmsg_space!(libc::in6_pktinfo)))
        }
        _ => (&[], None),
    };
    let fd = service.as_raw_fd();
    let flags = MsgFlags::MSG_DONTWAIT;
    // One reply (the usual case below saturation): sendmsg, with nothing
    // allocated.
    if let [only] = replies {
        let iov = [io::IoSlice::new(outbox.payload(only))];
        let to = SockaddrStorage::from(only.client);
        return (sendmsg(fd, &iov, cmsg, flags, Some(&to)).map(|_| 1)).map_err(io::Error::from);
    }
    let iovs: Vec<[io::IoSlice<'_>; 1]> = (replies.iter())
        .map(|r| [io::IoSlice::new(outbox.payload(r))])
        .collect();
    let addrs: Vec<Option<SockaddrStorage>> = (replies.iter())
        .map(|r| Some(SockaddrStorage::from(r.client)))
        .collect();
    let mut headers = MultiHeaders::preallocate(replies.len(), space);
    let sent = sendmmsg(fd, &mut headers, &iovs, &addrs, cmsg, flags).map(Iterator::count);
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
    /// No reply came since the client's last datagram: re-pinned or
    /// re-sent while set, and a draining port waits for these
    /// ([`Port::awaiting_replies`]).
    unanswered: bool,
    /// Datagrams the client sent on this flow before `last` (tells a
    /// deadline for `last` from one for an earlier datagram).
    seq: u64,
    /// Counts the flow in the bound and the gauge while it lives.
    _slot: Slot,
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
    /// The Service at `key`, as of the last table change the port handled
    /// (read once per datagram: no table lookup on the data path).
    service: Arc<Service>,
    socket: Arc<UdpSocket>,
    /// Keyed by client addresses, which a flood chooses: seeded per
    /// process ([`FlowMap`]), and bounded by `--udp-max-flows`.
    flows: FlowMap<SocketAddr, Flow>,
    runtime: ServiceRuntime,
    metrics: UdpServiceMetrics,
    /// The flow sockets' epoll set.
    poller: Arc<Poller>,
    /// Flow id → client, for the epoll events (an id leaves with its flow,
    /// [`Port::take_flow`]).
    by_id: FlowMap<u64, SocketAddr>,
    /// Replies are read here, and sent from here in batches.
    outbox: Outbox,
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
    heard: FlowMap<SocketAddr, Heard>,
}

/// The data path's maps: std's `HashMap` with foldhash's seeded hasher
/// (SipHash was ~1.3 % of a served port's CPU in a `perf record` under
/// load, in 4 lookups per query). foldhash is only minimally resistant to
/// chosen keys; what a flood of client addresses can make is bounded by
/// `--udp-max-flows` anyway.
type FlowMap<K, V> = foldhash::HashMap<K, V>;

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

    /// The Service at this port's key in the published table (None: the
    /// key left it). The data path reads [`Port::service`], the copy taken
    /// at the last table change ([`Self::on_table`]).
    fn service(&self) -> Option<Arc<Service>> {
        self.proxy.publisher.load().get(&self.key).cloned()
    }

    /// A datagram from `client`.
    fn on_datagram(
        &mut self,
        client: SocketAddr,
        local: Option<IpAddr>,
        data: &[u8],
        now: Instant,
    ) {
        // The Service as of the last table change this port handled: a
        // datagram read in the same pass as a newer publish is served by
        // it (the change branch runs next and moves or ends the flows).
        let service = self.service.clone();
        if let Some(flow) = self.flows.get_mut(&client) {
            flow.last.clear();
            flow.last.extend_from_slice(data);
            flow.last_sent = now;
            flow.unanswered = true;
            flow.resent = false;
            flow.seq += 1;
            let backend = flow.backend;
            if service.is_eligible(backend) && !self.proxy.tracker.is_ejected(backend, now) {
                self.send(client, now);
                return;
            }
            // Another flow found its backend unreachable and it is ejected
            // (or it is no longer eligible in the port's Service): this
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
        self.send(client, now);
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

    /// Sends the flow's last datagram to its backend; `now`: when (its
    /// re-send deadline counts from it).
    fn send(&mut self, client: SocketAddr, now: Instant) {
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
                    self.deadlines.push_back(Deadline {
                        at: now + after,
                        sent: now,
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
        match resent {
            false => {
                let service = self.service.clone();
                self.repin(&service, client, backend, Some(kind), Repin::Resend)
            }
            true => self.end_flow(client, UdpFlowEnd::Unreachable),
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
            if self.flows.contains_key(&client) {
                self.end_flow(client, end);
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
        let Some(mut old) = self.take_flow(client) else {
            return;
        };
        let now = Instant::now();
        let (last_sent, seq) = (old.last_sent, old.seq);
        let last = std::mem::take(&mut old.last);
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
        self.send(client, now);
    }

    /// A new table: flows whose backend is no longer eligible are closed,
    /// or re-pinned when their last datagram is unanswered.
    ///
    /// When the key left the table, the port serves it as a Service with
    /// no backend (its flows end, new datagrams are dropped as
    /// `no_backend`) until the follower that started this task stops it.
    /// The task does not end by itself: a removal and a re-add can reach
    /// the follower as one diff, or as none, and the port must then still
    /// be served.
    fn on_table(&mut self) {
        let service = self.service().unwrap_or_else(|| {
            let old = &self.service;
            Arc::new(Service::new(old.name.clone(), old.policy, None, Vec::new()))
        });
        self.service = service.clone();
        self.resend_after = self.proxy.resend_after(&self.key, &service);
        if self.resend_after.is_none() {
            self.deadlines.clear();
        }
        (self.heard).retain(|addr, _| service.backends().iter().any(|b| b.addr == *addr));
        let moved: Vec<(SocketAddr, SocketAddr, bool)> = (self.flows.iter())
            .filter(|(_, f)| !service.is_eligible(f.backend))
            .map(|(c, f)| (*c, f.backend, f.unanswered && !f.resent))
            .collect();
        for (client, backend, resend) in moved {
            if resend {
                self.repin(&service, client, backend, None, Repin::Resend);
            } else {
                self.end_flow(client, UdpFlowEnd::BackendGone);
            }
        }
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
                .filter(|f| f.id == d.id && f.seq == d.seq && f.unanswered)
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
            let Some(to) = self.pick_other(&self.service, d.client, backend) else {
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
        let service = &self.service;
        if let Some(affinity) = service.affinity {
            self.runtime.expire_affinity(affinity.timeout, now);
        }
        let configured = service.settings.udp_timeout;
        let now_ms = millis(now);
        let idle: Vec<SocketAddr> = (self.flows.iter())
            .filter(|(_, f)| {
                let replied = f.replies.replied;
                let timeout = configured.unwrap_or(if replied {
                    REPLIED_TIMEOUT
                } else {
                    UNREPLIED_TIMEOUT
                });
                let last = millis(f.last_sent).max(f.replies.last_reply);
                u128::from(now_ms.saturating_sub(last)) >= timeout.as_millis()
            })
            .map(|(client, _)| *client)
            .collect();
        for client in idle {
            self.end_flow(client, UdpFlowEnd::Idle);
        }
    }

    /// Takes the flow of `client` out of the port (its reply id with it);
    /// dropping it closes its socket, which leaves the epoll set.
    fn take_flow(&mut self, client: SocketAddr) -> Option<Flow> {
        let flow = self.flows.remove(&client)?;
        self.by_id.remove(&flow.id);
        Some(flow)
    }

    /// Closes the flow of `client`, if any, counted as ended for `why`.
    fn end_flow(&mut self, client: SocketAddr, why: UdpFlowEnd) {
        if self.take_flow(client).is_some() {
            self.proxy.metrics.udp.flow_ended(&self.metrics.name, why);
        }
    }
}

impl Port {
    /// Reads the replies waiting on flow sockets (one datagram per ready
    /// socket per round: the set is level-triggered) and forwards them;
    /// handles ICMP errors. Returns true when there may be more (the
    /// rounds ran out), false when the set had nothing ready.
    fn on_replies(&mut self) -> bool {
        // One clock read per wake-up: replies read together arrived together.
        let at = millis(Instant::now());
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
                self.on_reply(ev.data(), ev.events(), at, &mut failures);
            }
        }
        self.flush();
        for failure in failures {
            self.on_failure(failure);
        }
        more
    }

    /// The flow socket of flow `id` is ready (`flags`): reads one reply
    /// into the outbox (sent to the client from the Service's socket by
    /// [`Self::flush`]), or notes an ICMP error.
    fn on_reply(&mut self, id: u64, flags: EpollFlags, at: u64, failures: &mut Vec<Failure>) {
        let Some(&client) = self.by_id.get(&id) else {
            return;
        };
        if self.outbox.room().is_none() {
            self.flush();
        }
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
        let Some(room) = self.outbox.room() else {
            return; // not after a flush
        };
        let n = match flow.socket.recv(room) {
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
        flow.replies.last_reply = at;
        flow.unanswered = false;
        if let Some(heard) = self.heard.get_mut(&flow.backend) {
            heard.last_reply = at;
        }
        self.outbox.push(n, client, flow.local);
    }

    /// Sends the replies in the outbox to their clients, one sendmmsg per
    /// run of replies from the same local address. A reply that cannot be
    /// sent (a full send buffer) is dropped, as the network would.
    fn flush(&mut self) {
        let replies = &self.outbox.replies;
        let mut i = 0;
        // Each round sends at least one reply or drops one: bounded.
        while let Some(first) = replies.get(i) {
            let local = first.local;
            let run = replies[i..].iter().take_while(|r| r.local == local).count();
            match send_replies(&self.socket, &self.outbox, &replies[i..i + run], local) {
                Ok(n) if n > 0 => {
                    let bytes: usize = replies[i..i + n].iter().map(|r| r.len).sum();
                    self.metrics.datagrams_down.inc_by(n as u64);
                    self.metrics.bytes_down.inc_by(bytes as u64);
                    i += n;
                }
                Ok(_) => i += 1,
                Err(e) => {
                    debug!(client = %first.client, error = %e, "UDP reply to client not sent");
                    i += 1;
                }
            }
        }
        self.outbox.clear();
    }
}

/// A UDP proxy for unit tests: default settings, its own tracker and
/// metrics, following `publisher`.
#[cfg(test)]
pub(crate) fn test_proxy(publisher: Arc<Publisher>) -> Arc<UdpProxy> {
    use crate::tracker::TrackerConfig;
    let metrics = Arc::new(Metrics::new());
    let config = TrackerConfig {
        eject_base: Duration::from_secs(1),
        eject_max: Duration::from_secs(1),
        drain_timeout: Duration::from_secs(1),
    };
    let tracker = Tracker::new(config, CancellationToken::new(), metrics.clone());
    UdpProxy::new(UdpConfig::default(), publisher, Arc::new(tracker), metrics)
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
    async fn a_port_whose_key_leaves_and_comes_back_is_served_again() {
        // A removal and a re-add can reach the follower as one diff (or
        // none): the port's task must not end by itself on the removal.
        use sluice_control::{Backend, Conditions, Policy};
        let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        echo.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        });
        let served = tokio_socket(false).await;
        let key = ListenKey {
            addr: served.local_addr().unwrap(),
            protocol: Protocol::Udp,
        };
        let with_key = || {
            let mut t = Table::new();
            let b = Backend::new(echo_addr, Conditions::READY);
            let svc = Service::new("echo", Policy::RoundRobin, None, vec![b]);
            t.insert(key, Arc::new(svc));
            t
        };
        let publisher = Arc::new(Publisher::new());
        publisher.publish(with_key());
        let proxy = test_proxy(publisher.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn(proxy.serve(key, served, stop.clone()));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let ask = |payload: &'static [u8]| {
            let client = &client;
            async move {
                client.send_to(payload, key.addr).await.unwrap();
                let mut buf = [0u8; 64];
                let got = tokio::time::timeout(Duration::from_millis(500), client.recv(&mut buf));
                got.await.ok().map(|r| buf[..r.unwrap()].to_vec())
            }
        };
        assert_eq!(ask(b"one").await.as_deref(), Some(&b"one"[..]));
        // The key leaves: no backend, the datagram is dropped.
        publisher.publish(Table::new());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(ask(b"two").await, None);
        assert!(!task.is_finished(), "the port's task ended by itself");
        // Back, with nothing else (no follower) doing anything: served.
        publisher.publish(with_key());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(ask(b"three").await.as_deref(), Some(&b"three"[..]));
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    /// A nonblocking std socket on 127.0.0.1, as tokio's.
    async fn tokio_socket(pktinfo: bool) -> UdpSocket {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        if pktinfo {
            set_pktinfo(&s, false).unwrap();
        }
        s.set_nonblocking(true).unwrap();
        let any: SocketAddr = if pktinfo { "0.0.0.0:0" } else { "127.0.0.1:0" }
            .parse()
            .unwrap();
        s.bind(&any.into()).unwrap();
        UdpSocket::from_std(s.into()).unwrap()
    }

    #[tokio::test]
    async fn one_recvmmsg_takes_every_queued_datagram_with_its_source_and_destination() {
        let served = tokio_socket(true).await;
        let port = served.local_addr().unwrap().port();
        let to: SocketAddr = ([127, 0, 0, 3], port).into();
        let small = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let big = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let largest: Vec<u8> = (0..65_507u32).map(|i| (i % 251) as u8).collect();
        small.send_to(b"one", to).unwrap();
        big.send_to(&largest, to).unwrap();
        small.send_to(b"", to).unwrap();
        let mut inbox = Inbox::new();
        tokio::time::timeout(Duration::from_secs(5), recv(&served, &mut inbox, true))
            .await
            .unwrap()
            .unwrap();
        let got: Vec<_> = (inbox.got.iter().enumerate())
            .map(|(i, r)| {
                (
                    r.client.unwrap(),
                    r.local,
                    r.truncated,
                    inbox.datagram(i, r.len).to_vec(),
                )
            })
            .collect();
        let local = Some(IpAddr::from([127, 0, 0, 3]));
        let want = vec![
            (small.local_addr().unwrap(), local, false, b"one".to_vec()),
            (big.local_addr().unwrap(), local, false, largest),
            (small.local_addr().unwrap(), local, false, Vec::new()),
        ];
        assert_eq!(got, want);
        // Nothing left: WouldBlock, not an empty batch.
        let e = recv_batch(&served, &mut inbox, true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[tokio::test]
    async fn one_sendmmsg_answers_several_clients_from_the_given_local_address() {
        let served = tokio_socket(true).await;
        let port = served.local_addr().unwrap().port();
        let clients: Vec<_> = (0..3)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let mut outbox = Outbox::new();
        let local = Some(IpAddr::from([127, 0, 0, 7]));
        for (i, c) in clients.iter().enumerate() {
            let room = outbox.room().unwrap();
            room[..2].copy_from_slice(&[b'r', b'0' + i as u8]);
            outbox.push(2, c.local_addr().unwrap(), local);
        }
        let sent = send_replies(&served, &outbox, &outbox.replies, local).unwrap();
        assert_eq!(sent, 3);
        for (i, c) in clients.iter().enumerate() {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 16];
            let (n, from) = c.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[b'r', b'0' + i as u8]);
            // IP_PKTINFO: from the address given, not routing's 127.0.0.1.
            assert_eq!(from, SocketAddr::from(([127, 0, 0, 7], port)));
        }
    }

    #[tokio::test]
    async fn recv_after_a_short_batch_still_wakes_for_the_next_datagram() {
        // A short batch clears the socket's readiness without a failing
        // recvmmsg: each later datagram must wake the receiver all the same.
        let served = tokio_socket(false).await;
        let to = served.local_addr().unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut inbox = Inbox::new();
        for i in 0..50u8 {
            client.send_to(&[i], to).unwrap();
            let got =
                tokio::time::timeout(Duration::from_secs(5), recv(&served, &mut inbox, false))
                    .await;
            assert!(matches!(got, Ok(Ok(()))), "datagram {i}: {got:?}");
            assert_eq!(inbox.got.len(), 1, "datagram {i}");
            assert_eq!(inbox.datagram(0, inbox.got[0].len), [i]);
        }
        // More than a batch queued: a full batch, then the rest.
        for i in 0..(RECV_BATCH + 5) {
            client.send_to(&[i as u8], to).unwrap();
        }
        let mut seen = 0;
        while seen < RECV_BATCH + 5 {
            let got =
                tokio::time::timeout(Duration::from_secs(5), recv(&served, &mut inbox, false))
                    .await;
            assert!(matches!(got, Ok(Ok(()))), "after {seen}: {got:?}");
            assert!(!inbox.got.is_empty() && inbox.got.len() <= RECV_BATCH);
            seen += inbox.got.len();
        }
        assert_eq!(seen, RECV_BATCH + 5);
    }

    #[tokio::test]
    async fn a_single_reply_leaves_from_the_given_local_address_or_routings() {
        // The one-reply path (sendmsg), for each kind of source.
        let served = tokio_socket(true).await;
        let port = served.local_addr().unwrap().port();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        for (local, from) in [
            (Some(IpAddr::from([127, 0, 0, 9])), [127, 0, 0, 9]),
            (None, [127, 0, 0, 1]),
        ] {
            let mut outbox = Outbox::new();
            outbox.room().unwrap()[..3].copy_from_slice(b"one");
            outbox.push(3, client.local_addr().unwrap(), local);
            let sent = send_replies(&served, &outbox, &outbox.replies, local).unwrap();
            assert_eq!(sent, 1);
            let mut buf = [0u8; 16];
            let (n, got_from) = client.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"one");
            assert_eq!(got_from, SocketAddr::from((from, port)), "{local:?}");
        }
    }

    #[tokio::test]
    async fn a_reply_that_cannot_be_sent_stops_its_batch_and_fails_alone() {
        // What Port::flush relies on: sendmmsg sends up to the failing
        // message and says how many; sent again from there, the failing
        // one gets the error.
        let served = tokio_socket(false).await;
        let ok = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut outbox = Outbox::new();
        let bad: SocketAddr = "[::1]:9".parse().unwrap();
        for to in [ok.local_addr().unwrap(), bad, ok.local_addr().unwrap()] {
            outbox.room().unwrap()[0] = b'x';
            outbox.push(1, to, None);
        }
        let replies = outbox.replies.clone();
        assert_eq!(send_replies(&served, &outbox, &replies, None).unwrap(), 1);
        assert!(send_replies(&served, &outbox, &replies[1..], None).is_err());
        assert_eq!(
            send_replies(&served, &outbox, &replies[2..], None).unwrap(),
            1
        );
    }

    #[test]
    fn the_outbox_never_hands_out_less_than_a_whole_datagram() {
        let mut outbox = Outbox::new();
        let client: SocketAddr = "127.0.0.1:9".parse().unwrap();
        // The largest replies: room for four, then full.
        for _ in 0..4 {
            assert_eq!(outbox.room().unwrap().len(), MAX_DATAGRAM);
            outbox.push(65_507, client, None);
        }
        assert!(outbox.room().is_none());
        outbox.clear();
        // Small ones: SEND_BATCH, then full.
        for _ in 0..SEND_BATCH {
            assert!(outbox.room().is_some());
            outbox.push(80, client, Some(IpAddr::from([10, 0, 0, 1])));
        }
        assert!(outbox.room().is_none());
        // A local address of the other family is not used.
        outbox.clear();
        outbox.push(1, client, Some("::1".parse().unwrap()));
        assert_eq!(outbox.replies[0].local, None);
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

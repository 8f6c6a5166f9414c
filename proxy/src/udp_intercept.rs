//! UDP Services through `--intercept nftables`: one local port per UDP
//! listen key, bound here and served by [`UdpProxy::serve`], and the
//! assignment `key → local port` that [`crate::nft::Ruleset::with_udp`]
//! turns into the `udp-ports` maps (a redirected datagram does not say
//! which Service it was sent to, so one shared port cannot tell Services
//! apart: docs/architecture.md, "UDP").
//!
//! [`UdpPorts`] is the pure part. The kernel's `udp-ports` maps are the
//! shared record of which key is on which port: a sluice that starts
//! (a restart after a crash, or the new process of a hand-over) reads them
//! ([`crate::nft::read_udp_ports`]) and binds the SAME ports, so a client
//! that keeps its source port (a resolver) is steered to the same place
//! before and after. The sockets are in a SO_REUSEPORT group
//! ([`crate::listener::udp_group_socket`]): during a hand-over the old and
//! the new sluice both hold the port; when the old one stops it leaves the
//! group without closing its socket ([`UdpProxy::serve_intercepted_with_drain`]),
//! so new datagrams go to the new one while its own flows get their
//! replies.
//!
//! A key that is not in the kernel's map gets the lowest port of the range
//! that no key maps to in the kernel and none holds here (a port this
//! process freed in the last [`COOL`] only if nothing else is free: its
//! old socket may still be closing elsewhere). The rule depends on the
//! kernel's map, so two sluices that run side by side and see the same
//! new key in the same table pick the same port, bind it together
//! (SO_REUSEPORT) and write the same element: neither overwrites the
//! other's. One that already wrote it is simply adopted by the other.
//! The exception is the cooling: a port that one of them freed in the
//! last [`COOL`] is passed over by that one only, so the two can then
//! pick different ports and the last element written wins (the other's
//! port is served but not steered until the key changes again). Until
//! the map can be read, no new key is given a port at all
//! ([`UdpIntercept`]'s `holding`). A port is given only if its bind
//! succeeds (a port another program holds without SO_REUSEPORT is
//! skipped).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use sluice_control::{ListenKey, Protocol, Table, TableDiff};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::reconcile::Follower;
use crate::udp::UdpProxy;

/// A port this process freed is given again only when no other port is
/// free for this long (another sluice may still serve it for the key that
/// left, until it sees the table without it).
pub const COOL: Duration = Duration::from_secs(60);

/// At a hand-over (SIGTERM), how long the old sluice keeps answering the
/// flows it has after its UDP ports left their groups (a DNS answer takes
/// milliseconds; a resolver waits 5 s).
pub const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Default `--udp-intercept-ports`: below Kubernetes' NodePort range
/// (30000-32767) and Linux's ephemeral ports (32768-60999).
pub const DEFAULT_RANGE: (u16, u16) = (20000, 29999);

/// Parses `FIRST-LAST` (`--udp-intercept-ports`).
pub fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let (first, last) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected FIRST-LAST, e.g. 20000-29999"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|e| format!("{s:?}: {p:?} is not a port: {e}"))
    };
    let (first, last) = (port(first)?, port(last)?);
    if first == 0 || first > last {
        return Err(format!("{s:?}: expected 1 <= FIRST <= LAST"));
    }
    Ok((first, last))
}

/// Which local port each UDP key is served on.
#[derive(Debug)]
pub struct UdpPorts {
    first: u16,
    last: u16,
    assigned: BTreeMap<ListenKey, u16>,
    /// Ports this process freed, and when.
    freed: BTreeMap<u16, Instant>,
}

impl UdpPorts {
    pub fn new((first, last): (u16, u16)) -> Self {
        Self {
            first,
            last,
            assigned: BTreeMap::new(),
            freed: BTreeMap::new(),
        }
    }

    /// The current assignment.
    pub fn assigned(&self) -> &BTreeMap<ListenKey, u16> {
        &self.assigned
    }

    /// Follows `keys` (the UDP keys of the table): forgets the keys that
    /// are not among them (returned with their ports, to be closed) and
    /// gives every new key, in key order, the port `kernel` (the kernel's
    /// `udp-ports` maps) has for it if `bind` accepts it, else the lowest
    /// port that `kernel` gives no key, no key holds here and `bind`
    /// accepts (one freed here in the last [`COOL`] last). A key for which
    /// every port is taken or refused gets none (in `unassigned`) and is
    /// tried again at the next update.
    pub fn update<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a ListenKey>,
        kernel: &BTreeMap<ListenKey, u16>,
        now: Instant,
        mut bind: impl FnMut(&ListenKey, u16) -> bool,
    ) -> Update {
        let wanted: BTreeSet<&ListenKey> = keys.into_iter().collect();
        let mut update = Update::default();
        let freed = &mut self.freed;
        self.assigned.retain(|k, p| {
            let keep = wanted.contains(k);
            if !keep {
                update.removed.push((*k, *p));
                freed.insert(*p, now);
            }
            keep
        });
        freed.retain(|_, at| now.saturating_duration_since(*at) < COOL);
        let mapped: BTreeSet<u16> = kernel.values().copied().collect();
        for key in wanted {
            if self.assigned.contains_key(key) {
                continue;
            }
            let used: BTreeSet<u16> = self.assigned.values().copied().collect();
            let in_range = |p: &u16| (self.first..=self.last).contains(p);
            let adopt = (kernel.get(key).copied())
                .filter(|p| in_range(p) && !used.contains(p))
                .filter(|p| bind(key, *p));
            if let Some(port) = adopt {
                self.assigned.insert(*key, port);
                update.added.push((*key, port));
                update.adopted.push(*key);
                continue;
            }
            let free =
                (self.first..=self.last).filter(|p| !used.contains(p) && !mapped.contains(p));
            let (fresh, cooling): (Vec<u16>, Vec<u16>) =
                free.partition(|p| !self.freed.contains_key(p));
            match fresh.into_iter().chain(cooling).find(|p| bind(key, *p)) {
                Some(port) => {
                    self.assigned.insert(*key, port);
                    update.added.push((*key, port));
                }
                None => update.unassigned.push(*key),
            }
        }
        update
    }
}

/// What an [`UdpPorts::update`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Update {
    pub added: Vec<(ListenKey, u16)>,
    /// Those of `added` whose port is the one the kernel's map had.
    pub adopted: Vec<ListenKey>,
    pub removed: Vec<(ListenKey, u16)>,
    /// Keys left without a port (the range is full or every bind failed).
    pub unassigned: Vec<ListenKey>,
}

/// The assignment the nftables follower ([`crate::reconcile::NftFollower`])
/// steers: only ports that are bound and served. Shared with the
/// [`UdpIntercept`] that runs before it in the same reconcile pass (listen
/// first, then steer).
#[derive(Debug, Clone)]
pub struct UdpSteering {
    range: (u16, u16),
    ports: Arc<Mutex<BTreeMap<ListenKey, u16>>>,
    /// Some UDP key has no port yet ([`UdpIntercept::complete`] is false).
    waiting: Arc<std::sync::atomic::AtomicBool>,
}

impl UdpSteering {
    /// The local port range (`--udp-intercept-ports`).
    pub fn range(&self) -> (u16, u16) {
        self.range
    }

    /// The current assignment (a copy: one entry per UDP key).
    pub fn ports(&self) -> BTreeMap<ListenKey, u16> {
        self.ports.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Some UDP key is still without a port: the [`UdpIntercept`] follower
    /// is retried, and may bind one at a retry that brings no table change.
    /// The nftables follower then stays incomplete too, so that it is
    /// retried on its own clock and steers the new port (a follower that
    /// reports complete is called again only at the next table change).
    pub fn waiting(&self) -> bool {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The intercepted UDP keys of one sluice: their ports and the tasks
/// serving them. A [`Follower`]: it binds and serves the ports of new keys
/// and closes those of keys that left; [`UdpSteering`] hands the result
/// to the nftables follower.
pub struct UdpIntercept {
    proxy: Arc<UdpProxy>,
    ports: UdpPorts,
    steering: UdpSteering,
    serving: HashMap<ListenKey, CancellationToken>,
    /// The process is stopping: every port leaves its group and drains.
    drain: CancellationToken,
    /// The serving tasks, for the shutdown to wait for their drain.
    tasks: TaskTracker,
    /// The kernel's map could not be read at the last apply: keys not
    /// served yet wait for a read that works (retried on the follower's
    /// clock).
    holding: bool,
    /// Keys warned about (no port), so the warning is logged once.
    warned: usize,
}

impl UdpIntercept {
    /// `drain`: the process's stop (SIGTERM): the ports leave their groups
    /// and their flows drain for at most [`DRAIN_LIMIT`].
    pub fn new(proxy: Arc<UdpProxy>, range: (u16, u16), drain: CancellationToken) -> Self {
        Self {
            proxy,
            ports: UdpPorts::new(range),
            steering: UdpSteering {
                range,
                ports: Arc::default(),
                waiting: Arc::default(),
            },
            serving: HashMap::new(),
            drain,
            tasks: TaskTracker::new(),
            holding: false,
            warned: 0,
        }
    }

    /// What the nftables follower steers.
    pub fn steering(&self) -> UdpSteering {
        self.steering.clone()
    }

    /// The serving tasks: after the stop, `close()` then `wait()` returns
    /// once every port has drained.
    pub fn tasks(&self) -> TaskTracker {
        self.tasks.clone()
    }

    /// Binds and serves a local port for every UDP key of `table` that has
    /// none (the port `kernel`, the kernel's map, has for it when there is
    /// one), closes those of keys that left, and returns the assignment to
    /// steer (only ports that are bound and served). Must run inside a
    /// Tokio runtime.
    pub fn follow(
        &mut self,
        table: &Table,
        kernel: &BTreeMap<ListenKey, u16>,
    ) -> &BTreeMap<ListenKey, u16> {
        let keys: Vec<ListenKey> = (table.iter().map(|(k, _)| *k))
            .filter(|k| k.protocol == Protocol::Udp)
            .filter(|k| !self.holding || self.ports.assigned().contains_key(k))
            .collect();
        let proxy = &self.proxy;
        let serving = &mut self.serving;
        let (drain, tasks) = (&self.drain, &self.tasks);
        let now = Instant::now();
        let update = self
            .ports
            .update(&keys, kernel, now, |key, port| match bind_local(key, port) {
                Ok(socket) => {
                    let stop = CancellationToken::new();
                    let serve = proxy.clone().serve_intercepted_with_drain(
                        *key,
                        socket,
                        stop.clone(),
                        drain.clone(),
                        DRAIN_LIMIT,
                    );
                    tasks.spawn(serve);
                    serving.insert(*key, stop);
                    true
                }
                Err(e) => {
                    // Held by another program: the next port is tried.
                    tracing::debug!(listen = %key, port, error = %e, "UDP intercept port not bound");
                    false
                }
            });
        for (key, port) in &update.added {
            if update.adopted.contains(key) {
                info!(listen = %key, port, "UDP service intercepted on the local port the nftables map had (adopted)");
            } else {
                info!(listen = %key, port, "UDP service intercepted on a local port");
            }
        }
        for (key, port) in &update.removed {
            if let Some(stop) = self.serving.remove(key) {
                stop.cancel();
            }
            info!(listen = %key, port, "UDP service removed: local port closed");
        }
        if update.unassigned.len() != self.warned {
            self.warned = update.unassigned.len();
            if let Some(key) = update.unassigned.first() {
                warn!(
                    listen = %key,
                    keys = update.unassigned.len(),
                    "no free port in --udp-intercept-ports for UDP services: not steered"
                );
            }
        }
        *self
            .steering
            .ports
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = self.ports.assigned().clone();
        (self.steering.waiting).store(!self.complete(), std::sync::atomic::Ordering::Relaxed);
        self.ports.assigned()
    }

    /// The first diff is against an empty table, so every UDP key of the
    /// first table is in `added`: a table without UDP changes needs no
    /// pass unless a key waits for a port.
    async fn sync(&mut self, diff: &TableDiff, table: &Table) -> bool {
        let touched = (diff.added.iter().chain(&diff.removed)).any(|k| k.protocol == Protocol::Udp);
        if !touched && self.complete() {
            return true;
        }
        let kernel = match crate::nft::read_udp_ports().await {
            Ok((ports, 0)) => Some(ports),
            Ok((ports, skipped)) => {
                warn!(skipped, "udp-ports map elements not understood: skipped");
                Some(ports)
            }
            Err(e) => {
                warn!(
                    "cannot read the udp-ports maps: UDP services not served yet wait for the next try: {e}"
                );
                None
            }
        };
        // Without the map a new key could be given a port that another
        // sluice serves for another key (the bind joins its SO_REUSEPORT
        // group and the two keys' datagrams mix): keys already served
        // stay, keys that left go, new ones wait.
        self.holding = kernel.is_none();
        self.follow(table, &kernel.unwrap_or_default());
        self.complete()
    }

    /// Every UDP key of the last [`Self::follow`] has a port, and the
    /// kernel's map was read (see `holding`). When not,
    /// the follower reports itself incomplete and the reconcile loop calls
    /// it again after its retry delay: a port that comes free (another
    /// program closed it, a key left) is taken then, not only at the next
    /// table change.
    fn complete(&self) -> bool {
        self.warned == 0 && !self.holding
    }
}

impl Follower for UdpIntercept {
    fn apply<'a>(&'a mut self, diff: &'a TableDiff, table: &'a Table) -> BoxFuture<'a, bool> {
        Box::pin(self.sync(diff, table))
    }
}

impl Drop for UdpIntercept {
    fn drop(&mut self) {
        // Stopping: the serving tasks drain on their own.
        if self.drain.is_cancelled() {
            return;
        }
        for stop in self.serving.values() {
            stop.cancel();
        }
    }
}

/// A UDP socket on the wildcard address of `key`'s family at `port`, in
/// the port's SO_REUSEPORT group (shared with another sluice during a
/// hand-over; a port another program holds without it fails to bind),
/// with `IP_PKTINFO`/`IPV6_RECVPKTINFO` on: replies leave from the address
/// a datagram was redirected to, which conntrack needs to undo the
/// redirect for traffic from the node itself (docs/architecture.md, "UDP").
fn bind_local(key: &ListenKey, port: u16) -> io::Result<UdpSocket> {
    let addr = match key.addr {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
    };
    let socket = crate::listener::udp_group_socket(addr)?;
    crate::udp::set_pktinfo(&socket, addr.is_ipv6())?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ListenKey {
        ListenKey {
            addr: s.parse().unwrap(),
            protocol: Protocol::Udp,
        }
    }

    #[test]
    fn ranges_parse_and_bad_ones_say_why() {
        assert_eq!(parse_range("20000-29999"), Ok((20000, 29999)));
        assert_eq!(parse_range("7-7"), Ok((7, 7)));
        for bad in ["20000", "3-2", "0-10", "a-10", "1-70000"] {
            let e = parse_range(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    fn none() -> BTreeMap<ListenKey, u16> {
        BTreeMap::new()
    }

    #[test]
    fn a_key_keeps_its_port_and_a_freed_port_is_given_last() {
        let mut p = UdpPorts::new((100, 102));
        let t0 = Instant::now();
        let (a, b, c) = (
            key("10.96.0.10:53"),
            key("10.96.0.11:53"),
            key("10.96.0.12:53"),
        );
        let u = p.update([&b, &a], &none(), t0, |_, _| true);
        // Key order, lowest port first.
        assert_eq!(u.added, [(a, 100), (b, 101)]);
        assert!(u.adopted.is_empty());
        // Same keys: nothing changes.
        assert_eq!(
            p.update([&b, &a], &none(), t0, |_, _| true),
            Update::default()
        );
        // b leaves, c comes: c takes 102, not b's freed 101.
        let u = p.update([&a, &c], &none(), t0, |_, _| true);
        assert_eq!(u.removed, [(b, 101)]);
        assert_eq!(u.added, [(c, 102)]);
        // b comes back: only 101 is left, freed or not.
        let u = p.update([&a, &b, &c], &none(), t0, |_, _| true);
        assert_eq!(u.added, [(b, 101)]);
        // Once COOL has passed, a freed port is the lowest free again.
        let mut p = UdpPorts::new((100, 102));
        p.update([&a, &b], &none(), t0, |_, _| true);
        p.update([&b], &none(), t0, |_, _| true);
        let u = p.update([&b, &c], &none(), t0 + COOL, |_, _| true);
        assert_eq!(u.added, [(c, 100)]);
    }

    #[test]
    fn the_kernels_port_is_adopted_and_its_other_ports_are_left_alone() {
        let t0 = Instant::now();
        let (a, b, c) = (
            key("10.96.0.10:53"),
            key("10.96.0.11:53"),
            key("10.96.0.12:53"),
        );
        // The map a previous sluice left: a on 105, a key gone on 100.
        let kernel = BTreeMap::from([(a, 105), (key("10.96.0.99:53"), 100)]);
        let mut p = UdpPorts::new((100, 109));
        let u = p.update([&a, &b], &kernel, t0, |_, _| true);
        assert_eq!(u.added, [(a, 105), (b, 101)]);
        assert_eq!(u.adopted, [a]);
        // A second sluice with the same map and table decides the same,
        // and a key the first one already wrote is adopted.
        let mut q = UdpPorts::new((100, 109));
        let mut kernel2 = kernel.clone();
        kernel2.insert(b, 101);
        let u2 = q.update([&b, &a, &c], &kernel2, t0, |_, _| true);
        assert_eq!(u2.added, [(a, 105), (b, 101), (c, 102)]);
        assert_eq!(u2.adopted, [a, b]);
        let u = p.update([&a, &b, &c], &kernel2, t0, |_, _| true);
        assert_eq!(u.added, [(c, 102)]);
        // A mapped port out of the range, or refused, is not adopted.
        let mut r = UdpPorts::new((100, 109));
        let odd = BTreeMap::from([(a, 5000), (b, 103)]);
        let u = r.update([&a, &b], &odd, t0, |_, port| port != 103);
        assert_eq!(u.added, [(a, 100), (b, 101)]);
        assert!(u.adopted.is_empty());
    }

    #[test]
    fn a_refused_bind_is_skipped_and_a_full_range_leaves_keys_unassigned() {
        let t0 = Instant::now();
        let mut p = UdpPorts::new((100, 101));
        let (a, b, c) = (
            key("10.96.0.10:53"),
            key("10.96.0.11:53"),
            key("[fd00::1]:53"),
        );
        // 100 is held by another program.
        let u = p.update([&a, &b, &c], &none(), t0, |_, port| port != 100);
        assert_eq!(u.added, [(a, 101)]);
        assert_eq!(u.unassigned, [b, c]);
        // Freed: tried again at the next update.
        let u = p.update([&a, &b], &none(), t0, |_, _| true);
        assert_eq!(u.added, [(b, 100)]);
        assert!(u.unassigned.is_empty());
    }

    fn intercept(range: (u16, u16)) -> UdpIntercept {
        let proxy = crate::udp::test_proxy(Arc::new(sluice_control::Publisher::new()));
        UdpIntercept::new(proxy, range, CancellationToken::new())
    }

    #[tokio::test]
    async fn a_key_without_a_port_keeps_the_follower_incomplete_until_one_frees() {
        // The one port of the range, held by another program.
        let held = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let k = key("10.96.0.10:53");
        let mut table = Table::new();
        let svc =
            sluice_control::Service::new("dns", sluice_control::Policy::RoundRobin, None, vec![]);
        table.insert(k, Arc::new(svc));
        let mut udp = intercept((port, port));
        let steering = udp.steering();
        assert!(udp.follow(&table, &none()).is_empty());
        assert!(!udp.complete(), "a key without a port must be retried");
        // ... and the nftables follower with it, to steer what the retry binds.
        assert!(steering.waiting());
        drop(held);
        // The loop's retry: the same table, the port free now.
        assert_eq!(udp.follow(&table, &none()).get(&k), Some(&port));
        assert!(udp.complete());
        assert_eq!(steering.ports().get(&k), Some(&port));
        assert!(!steering.waiting());
    }

    #[tokio::test]
    async fn without_the_kernels_map_new_keys_wait_and_left_ones_go() {
        let port = std::net::UdpSocket::bind("0.0.0.0:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (a, b) = (key("10.96.0.10:53"), key("10.96.0.11:53"));
        let only = |k: ListenKey| {
            let mut t = Table::new();
            let svc = sluice_control::Service::new(
                "dns",
                sluice_control::Policy::RoundRobin,
                None,
                vec![],
            );
            t.insert(k, Arc::new(svc));
            t
        };
        let mut udp = intercept((port, port));
        let steering = udp.steering();
        assert_eq!(udp.follow(&only(a), &none()).get(&a), Some(&port));
        // The map could not be read: a leaves, b must not take a port that
        // may be another sluice's; the follower and nftables retry.
        udp.holding = true;
        assert!(udp.follow(&only(b), &none()).is_empty());
        assert!(!udp.complete());
        assert!(steering.waiting());
        // Read again: b is served.
        udp.holding = false;
        assert_eq!(udp.follow(&only(b), &none()).get(&b), Some(&port));
        assert!(udp.complete() && !steering.waiting());
    }

    #[tokio::test]
    async fn a_port_held_elsewhere_does_not_bind() {
        let held = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = held.local_addr().unwrap().port();
        assert!(bind_local(&key("10.96.0.10:53"), port).is_err());
        drop(held);
        let first = bind_local(&key("10.96.0.10:53"), port).unwrap();
        // A second sluice joins the group.
        let second = bind_local(&key("10.96.0.10:53"), port).unwrap();
        assert_eq!(second.local_addr().unwrap(), first.local_addr().unwrap());
    }
}

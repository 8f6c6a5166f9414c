//! UDP Services through `--intercept nftables`: one local port per UDP
//! listen key, bound here and served by [`UdpProxy::serve`], and the
//! assignment `key → local port` that [`crate::nft::Ruleset::with_udp`]
//! turns into the `udp-ports` maps (a redirected datagram does not say
//! which Service it was sent to, so one shared port cannot tell Services
//! apart: docs/architecture.md, "UDP").
//!
//! [`UdpPorts`] is the pure part: a key keeps its port while it stays in
//! the table; a new key takes the next port after the last one given
//! (wrapping in the range), so a port freed by a key that left is not given
//! again at once (its old socket may still be closing). A port is given
//! only if its bind succeeds: the sockets are bound without `SO_REUSEADDR`
//! and `SO_REUSEPORT`, so a port another process holds (another program, or
//! the sluice being replaced during an upgrade, whose keys may sit on other
//! ports) is skipped instead of shared.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use sluice_control::{ListenKey, Protocol, Table};
use socket2::{Domain, Socket, Type};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::udp::UdpProxy;

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
    /// Where the search for the next free port starts.
    next: u16,
    assigned: BTreeMap<ListenKey, u16>,
}

impl UdpPorts {
    pub fn new((first, last): (u16, u16)) -> Self {
        Self {
            first,
            last,
            next: first,
            assigned: BTreeMap::new(),
        }
    }

    /// The current assignment.
    pub fn assigned(&self) -> &BTreeMap<ListenKey, u16> {
        &self.assigned
    }

    /// Follows `keys` (the UDP keys of the table): forgets the keys that
    /// are not among them (returned with their ports, to be closed) and
    /// gives every new key a port that no key holds and `bind` accepts.
    /// A key for which every port is taken or refused gets none (in
    /// `unassigned`) and is tried again at the next update.
    pub fn update<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a ListenKey>,
        mut bind: impl FnMut(&ListenKey, u16) -> bool,
    ) -> Update {
        let keys: Vec<&ListenKey> = keys.into_iter().collect();
        let wanted: std::collections::BTreeSet<&ListenKey> = keys.iter().copied().collect();
        let mut update = Update::default();
        self.assigned.retain(|k, p| {
            let keep = wanted.contains(k);
            if !keep {
                update.removed.push((*k, *p));
            }
            keep
        });
        let size = u32::from(self.last - self.first) + 1;
        for key in keys {
            if self.assigned.contains_key(key) {
                continue;
            }
            let used: std::collections::BTreeSet<u16> = self.assigned.values().copied().collect();
            let mut given = None;
            for _ in 0..size {
                let port = self.next;
                self.next = if port >= self.last {
                    self.first
                } else {
                    port + 1
                };
                if !used.contains(&port) && bind(key, port) {
                    given = Some(port);
                    break;
                }
            }
            match given {
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
    pub removed: Vec<(ListenKey, u16)>,
    /// Keys left without a port (the range is full or every bind failed).
    pub unassigned: Vec<ListenKey>,
}

/// The intercepted UDP keys of one sluice: their ports and the tasks
/// serving them.
pub struct UdpIntercept {
    proxy: Arc<UdpProxy>,
    ports: UdpPorts,
    serving: HashMap<ListenKey, CancellationToken>,
    /// Keys warned about (no port), so the warning is logged once.
    warned: usize,
}

impl UdpIntercept {
    pub fn new(proxy: Arc<UdpProxy>, range: (u16, u16)) -> Self {
        Self {
            proxy,
            ports: UdpPorts::new(range),
            serving: HashMap::new(),
            warned: 0,
        }
    }

    /// The local port range.
    pub fn range(&self) -> (u16, u16) {
        (self.ports.first, self.ports.last)
    }

    /// Binds and serves a local port for every UDP key of `table` that has
    /// none, closes those of keys that left, and returns the assignment to
    /// steer (only ports that are bound and served). Must run inside a
    /// Tokio runtime.
    pub fn follow(&mut self, table: &Table) -> &BTreeMap<ListenKey, u16> {
        let keys = (table.iter().map(|(k, _)| k)).filter(|k| k.protocol == Protocol::Udp);
        let proxy = &self.proxy;
        let serving = &mut self.serving;
        let update = self.ports.update(keys, |key, port| match bind_local(key, port) {
            Ok(socket) => {
                let stop = CancellationToken::new();
                tokio::spawn(proxy.clone().serve_intercepted(*key, socket, stop.clone()));
                serving.insert(*key, stop);
                true
            }
            Err(e) => {
                // Held by another process: the next port is tried.
                tracing::debug!(listen = %key, port, error = %e, "UDP intercept port not bound");
                false
            }
        });
        for (key, port) in &update.added {
            info!(listen = %key, port, "UDP service intercepted on a local port");
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
        self.ports.assigned()
    }
}

impl Drop for UdpIntercept {
    fn drop(&mut self) {
        for stop in self.serving.values() {
            stop.cancel();
        }
    }
}

/// A UDP socket on the wildcard address of `key`'s family at `port`, not
/// shareable (so a port another process holds fails to bind), with
/// `IP_PKTINFO`/`IPV6_RECVPKTINFO` on: replies leave from the address a
/// datagram was redirected to, which conntrack needs to undo the redirect
/// for traffic from the node itself (docs/architecture.md, "UDP").
fn bind_local(key: &ListenKey, port: u16) -> io::Result<UdpSocket> {
    let addr = match key.addr {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
    };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    crate::udp::set_pktinfo(&socket, addr.is_ipv6())?;
    socket.set_nonblocking(true)?;
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

    #[test]
    fn a_key_keeps_its_port_and_a_freed_port_is_not_given_at_once() {
        let mut p = UdpPorts::new((100, 102));
        let (a, b, c) = (
            key("10.96.0.10:53"),
            key("10.96.0.11:53"),
            key("10.96.0.12:53"),
        );
        let u = p.update([&a, &b], |_, _| true);
        assert_eq!(u.added, [(a, 100), (b, 101)]);
        // Same keys: nothing changes.
        assert_eq!(p.update([&b, &a], |_, _| true), Update::default());
        // b leaves, c comes: c takes 102, not b's 101.
        let u = p.update([&a, &c], |_, _| true);
        assert_eq!(u.removed, [(b, 101)]);
        assert_eq!(u.added, [(c, 102)]);
        // b comes back: the search wraps and finds 101 free.
        let u = p.update([&a, &b, &c], |_, _| true);
        assert_eq!(u.added, [(b, 101)]);
        assert_eq!(p.assigned().len(), 3);
    }

    #[test]
    fn a_refused_bind_is_skipped_and_a_full_range_leaves_keys_unassigned() {
        let mut p = UdpPorts::new((100, 101));
        let (a, b, c) = (
            key("10.96.0.10:53"),
            key("10.96.0.11:53"),
            key("[fd00::1]:53"),
        );
        // 100 is held by another process.
        let u = p.update([&a, &b, &c], |_, port| port != 100);
        assert_eq!(u.added, [(a, 101)]);
        assert_eq!(u.unassigned, [b, c]);
        // Freed: tried again at the next update.
        let u = p.update([&a, &b], |_, _| true);
        assert_eq!(u.added, [(b, 100)]);
        assert!(u.unassigned.is_empty());
    }

    #[tokio::test]
    async fn a_port_held_elsewhere_does_not_bind() {
        let held = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = held.local_addr().unwrap().port();
        assert!(bind_local(&key("10.96.0.10:53"), port).is_err());
        drop(held);
        assert!(bind_local(&key("10.96.0.10:53"), port).is_ok());
    }
}

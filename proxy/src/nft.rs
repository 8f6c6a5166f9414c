//! sluice's own nftables table: Service traffic steered to the intercept
//! port by `redirect`, instead of sockets bound on Service IPs.
//!
//! # The table
//! One `table inet sluice` (one family, so one transaction and one
//! `nft list table inet sluice` cover IPv4 and IPv6; nat chains in the
//! `inet` family need Linux 5.2, older than any kernel Kubernetes
//! supports). kube-proxy's nftables mode uses `ip kube-proxy` and
//! `ip6 kube-proxy` only to support older kernels. Its chains mirror
//! kube-proxy's hooks and priorities:
//!
//! ```text
//! table inet sluice {
//!   set service-ips-v4 { type ipv4_addr . inet_proto . inet_service; elements = { 10.96.0.10 . tcp . 80, ... } }
//!   map no-endpoint-services-v4 { type ipv4_addr . inet_proto . inet_service : verdict;
//!                                 elements = { 10.96.0.20 . tcp . 80 : goto reject-chain, 192.168.1.10 . tcp . 30090 : drop } }
//!   set firewall-ips-v4 { type ipv4_addr . inet_proto . inet_service; elements = { 203.0.113.8 . tcp . 80 } }
//!   set firewall-allow-v4 { type ipv4_addr . inet_proto . inet_service . ipv4_addr; flags interval;
//!                           elements = { 203.0.113.8 . tcp . 80 . 198.51.100.0/24 } }
//!   map udp-ports-v4 { type ipv4_addr . inet_service : inet_service; elements = { 10.96.0.10 . 53 : 20000 } }
//!   (and the same five for IPv6, `-v6`)
//!   chain reject-chain { meta l4proto tcp reject with tcp reset; reject }
//!   chain endpoints-check { ip daddr . meta l4proto . th dport vmap @no-endpoint-services-v4; ip6 ... }
//!   chain firewall-check { ip daddr . meta l4proto . th dport @firewall-ips-v4
//!                          ip daddr . meta l4proto . th dport . ip saddr != @firewall-allow-v4 drop; ip6 ... }
//!   chain filter-prerouting { type filter hook prerouting priority -110; ct state new jump firewall-check }
//!   chain filter-input      { type filter hook input priority -110;      ct state new jump endpoints-check
//!                             meta l4proto udp udp dport 20000-29999 ct status & dnat == 0 drop }
//!   chain filter-forward    { type filter hook forward priority -110;    ct state new jump endpoints-check }
//!   chain filter-output     { type filter hook output priority -110;     ct state new jump firewall-check
//!                                                                        ct state new jump endpoints-check }
//!   chain nat-prerouting { type nat hook prerouting priority dstnat; ...   # traffic from pods and outside
//!     meta l4proto tcp ip daddr . meta l4proto . th dport @service-ips-v4 redirect to :PORT
//!     meta l4proto tcp ip6 daddr . meta l4proto . th dport @service-ips-v6 redirect to :PORT
//!     meta l4proto udp redirect to ip daddr . udp dport map @udp-ports-v4
//!     meta l4proto udp redirect to ip6 daddr . udp dport map @udp-ports-v6 }
//!   chain nat-output { type nat hook output priority -100; ...           # node-originated traffic
//!     (the same four rules) }
//! }
//! ```
//!
//! The rules never change with the Services: a Service is a set element
//! (`address . protocol . port`, every listen key of the live table:
//! ClusterIPs, external IPs, LoadBalancer IPs and node ports on the node
//! addresses), so 10,000 Services are nineteen rules (twenty with the UDP
//! port range) and a change of one is one element added or removed. A UDP
//! key is redirected to a local port of its own (`udp-ports`, assigned by
//! [`crate::udp_intercept`]): a redirected datagram carries no trace of
//! the Service it was for, and `SO_ORIGINAL_DST` is TCP only. Those ports
//! serve redirected datagrams only: one sent to them directly has no
//! `dnat` in its conntrack status and is dropped in input. A key is in exactly one of
//! `service-ips` (it has an eligible backend: redirected to sluice) and
//! `no-endpoint-services` (it has none: the kernel answers), so endpoints
//! coming or going are one element deleted and one added, in one
//! transaction.
//!
//! # kube-proxy's packet-level rules (pkg/proxy/nftables/proxier.go)
//! - **No endpoints** (`no-endpoint-services`): a Service without endpoints
//!   anywhere is rejected at the SYN (TCP reset, so the client gets
//!   ECONNREFUSED at once; ICMP port unreachable for other protocols); one
//!   with endpoints elsewhere but none its `Local` traffic policy may use is
//!   dropped (no SYN-ACK). The verdict comes from the table
//!   ([`sluice_control::Settings::no_endpoints`]). Hooks as kube-proxy's:
//!   input, forward and output at `dstnat - 10`, new connections only. The
//!   key is not redirected, so in prerouting it keeps its Service address
//!   and meets the check in forward (pods, outside: the node routes it on,
//!   as kube-proxy's rules assume), input (node ports) or output (the node
//!   itself, before `nat-output`). kube-proxy keeps node ports in a separate
//!   `no-endpoint-nodeports` map (port only, any local address); here a node
//!   port is a key per node address like the others.
//! - **loadBalancerSourceRanges** (`firewall-ips` + `firewall-allow`): new
//!   connections to a filtered `LB IP . protocol . port` from a source
//!   outside its ranges are dropped, in prerouting and output at
//!   `dstnat - 10`, before the redirect, as kube-proxy's `firewall-check`.
//!   kube-proxy uses one chain per Service (`ip saddr != { ranges } drop`);
//!   here the ranges are data too: one concatenated interval set keyed by
//!   `LB IP . protocol . port . source network`, nested ranges folded into
//!   the widest (the kernel rejects overlapping intervals). NodePorts,
//!   cluster IPs and external IPs are never filtered (kube-proxy: "for
//!   better or for worse, nodeports are not subject to
//!   loadBalancerSourceRanges"). Ranges of the other family are ignored
//!   (kube-proxy's per-family proxiers): a key whose ranges are all of the
//!   other family is not filtered.
//!
//! Not matched: kube-proxy short-circuits traffic from pods and from the
//! node itself to an external address of an `externalTrafficPolicy: Local`
//! Service to the cluster-wide endpoints; sluice picks by destination only,
//! so such traffic sees the `Local` entry (dropped when it has no local
//! endpoint).
//!
//! # Pure and thin
//! [`Ruleset`] is the desired content computed from a [`Table`];
//! [`Ruleset::full_sync_script`], [`Ruleset::replace_script`] and
//! [`Ruleset::update_script`] render `nft -f` scripts as text (unit-tested
//! as text). [`apply`] runs `nft -f -` with a script on stdin, and
//! [`Programmer`] keeps what it applied last so that an update is a diff.
//! An update's element changes ([`Ruleset::element_ops`], data) go to the
//! kernel as one nf_tables netlink batch ([`crate::nft_netlink`]), without
//! forking `nft`; the structure (table, chains, sets, rules) and full syncs
//! stay `nft -f` scripts.
//!
//! # Atomicity (measured on Linux 6.18, nft 1.0.6)
//! One `nft -f` run is one netlink batch, committed as one transaction: a
//! script whose last line fails leaves the table exactly as it was, even
//! after a `delete table` earlier in the same script. An update only adds
//! and deletes elements. A full sync (start, adoption of the table a
//! previous sluice left, recovery after a failed update) declares the table,
//! its chains and sets (`add` is a no-op for what exists), flushes the
//! chains and sets and refills them, all in one transaction: the hooks stay
//! registered throughout, so a restarting sluice adopts the table with no
//! moment where traffic is unsteered. If that fails (a table of another
//! sluice version whose chain declarations differ), the table is deleted and
//! recreated, again in one transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::process::Stdio;

use sluice_control::{Cidr, ListenKey, NoEndpoints, Protocol, Service, Table, TableDiff};
use tokio::io::AsyncWriteExt;

/// The family and name of sluice's table.
pub const TABLE: &str = "inet sluice";

/// Elements per `add element`/`delete element` statement (keeps lines short).
const CHUNK: usize = 1000;

/// One set element: `address . protocol . port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    pub addr: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl From<&ListenKey> for Element {
    fn from(key: &ListenKey) -> Self {
        Self {
            addr: key.addr.ip(),
            protocol: key.protocol,
            port: key.addr.port(),
        }
    }
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} . {} . {}", self.addr, self.protocol, self.port)
    }
}

/// One element of one of sluice's sets and maps, as data (see the module
/// docs for the sets): what an update adds or deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetItem {
    /// `service-ips`: a steered TCP key.
    Redirect(Element),
    /// `no-endpoint-services`: a key and its verdict.
    NoEndpoints(Element, NoEndpoints),
    /// `firewall-ips`: a key with source ranges.
    Firewall(Element),
    /// `firewall-allow`: a key and one source network allowed to reach it
    /// (an interval element: `key . first address` to `key . last`).
    Allow(Element, Cidr),
    /// `udp-ports`: a UDP key (`address . port`) and the local port it is
    /// redirected to.
    UdpPort(Element, u16),
}

impl SetItem {
    /// The set's name without its family suffix (`service-ips`).
    pub fn set(&self) -> &'static str {
        match self {
            SetItem::Redirect(_) => "service-ips",
            SetItem::NoEndpoints(..) => "no-endpoint-services",
            SetItem::Firewall(_) => "firewall-ips",
            SetItem::Allow(..) => "firewall-allow",
            SetItem::UdpPort(..) => "udp-ports",
        }
    }

    /// The key's element (address, protocol, port).
    pub fn element(&self) -> Element {
        match self {
            SetItem::Redirect(e)
            | SetItem::NoEndpoints(e, _)
            | SetItem::Firewall(e)
            | SetItem::Allow(e, _)
            | SetItem::UdpPort(e, _) => *e,
        }
    }

    /// Whether it goes in the `-v4` set (else `-v6`).
    pub fn is_ipv4(&self) -> bool {
        self.element().addr.is_ipv4()
    }

    /// The set's full name (`service-ips-v4`).
    pub fn set_name(&self) -> String {
        let family = if self.is_ipv4() { "v4" } else { "v6" };
        format!("{}-{family}", self.set())
    }

    /// The element as `nft` reads it after `verb element ... {`: a delete
    /// names the key only (a map's value is left out).
    fn text(&self, verb: &str) -> String {
        let add = verb != "delete";
        match self {
            SetItem::Redirect(e) | SetItem::Firewall(e) => e.to_string(),
            SetItem::NoEndpoints(e, v) if add => format!("{e} : {}", verdict(*v)),
            SetItem::NoEndpoints(e, _) => e.to_string(),
            SetItem::Allow(e, c) => format!("{e} . {c}"),
            SetItem::UdpPort(e, p) if add => format!("{} . {} : {p}", e.addr, e.port),
            SetItem::UdpPort(e, _) => format!("{} . {}", e.addr, e.port),
        }
    }
}

/// One element added to or deleted from a set or map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElementOp {
    /// Added (else deleted).
    pub add: bool,
    pub item: SetItem,
}

/// The order sets are written in a script (and batched over netlink).
const SET_ORDER: [&str; 5] = [
    "service-ips",
    "no-endpoint-services",
    "firewall-ips",
    "firewall-allow",
    "udp-ports",
];

/// The desired content of sluice's table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Where redirected connections go (sluice's intercept listeners).
    pub port: u16,
    /// Every steered `address . protocol . port` (a Service with an
    /// eligible backend), both families.
    pub elements: BTreeSet<Element>,
    /// Keys without an eligible backend, and what the kernel does with a
    /// new connection to them (kube-proxy's `no-endpoint-services`). Never
    /// also in `elements`.
    pub no_endpoints: BTreeMap<Element, NoEndpoints>,
    /// Keys with `loadBalancerSourceRanges`: the networks (of the key's
    /// family, none inside another) whose new connections are let through;
    /// others are dropped.
    pub firewall: BTreeMap<Element, BTreeSet<Cidr>>,
    /// UDP keys with an eligible backend and the local port sluice serves
    /// each on (`udp-ports` maps: one port per key, because a redirected
    /// datagram does not say where it was going; docs/architecture.md,
    /// "UDP"). Never also in `no_endpoints`.
    pub udp_ports: BTreeMap<Element, u16>,
    /// The local ports reserved for UDP keys (`--udp-intercept-ports`):
    /// a datagram sent to one of them directly (not redirected) is
    /// dropped in input, so they serve only Service traffic. `None`: no
    /// such rule (UDP not steered).
    pub udp_range: Option<(u16, u16)>,
    /// Transparent dials on: the fwmark bit the `steer-replies` chain
    /// sets on packets of a transparent socket (the backend's replies),
    /// which the policy route ([`crate::policy_route`]) delivers locally.
    /// `None`: no such chain is declared.
    pub steer_mark: Option<u32>,
}

impl Ruleset {
    /// The ruleset for `table`, steering to `port`: every TCP key with an
    /// eligible backend is redirected; UDP keys are redirected only once
    /// given their local ports ([`Self::with_udp`]). A key
    /// of either protocol without an eligible backend gets its
    /// [`NoEndpoints`] verdict, and one with source ranges its firewall.
    pub fn from_table(table: &Table, port: u16) -> Self {
        let mut r = Self {
            port,
            ..Self::default()
        };
        for (key, svc) in table.iter() {
            r.set_key(key, Some(svc));
        }
        r
    }

    /// Puts `key` in the sets `svc` calls for (out of every set when
    /// `None`: the key left the table). UDP ports are not touched (see
    /// [`Self::set_udp_ports`]).
    fn set_key(&mut self, key: &ListenKey, svc: Option<&Service>) {
        let e = Element::from(key);
        self.elements.remove(&e);
        self.no_endpoints.remove(&e);
        self.firewall.remove(&e);
        let Some(svc) = svc else { return };
        if svc.eligible_len() == 0 {
            self.no_endpoints.insert(e, svc.settings.no_endpoints);
        } else if key.protocol == Protocol::Tcp {
            self.elements.insert(e);
        }
        let ranges: Vec<Cidr> = (svc.settings.source_ranges.iter())
            .filter(|c| c.is_ipv4() == e.addr.is_ipv4())
            .copied()
            .collect();
        let outermost: BTreeSet<Cidr> = (ranges.iter())
            .filter(|c| !ranges.iter().any(|o| o != *c && o.covers(c)))
            .copied()
            .collect();
        if !outermost.is_empty() {
            self.firewall.insert(e, outermost);
        }
    }

    /// Brings the entries of `keys` (a [`sluice_control::TableDiff`]'s
    /// added, removed and changed keys) up to date with `table`, without
    /// walking the rest: the same result as [`Self::from_table`] when every
    /// key that differs between the previous table and `table` is in
    /// `keys`. UDP ports are not touched (see [`Self::set_udp_ports`]).
    pub fn update_keys<'a>(
        &mut self,
        table: &Table,
        keys: impl IntoIterator<Item = &'a ListenKey>,
    ) {
        for key in keys {
            self.set_key(key, table.get(key).map(|s| &**s));
        }
    }

    /// Replaces the UDP keys' local ports with those of `ports` that have
    /// an eligible backend (as [`Self::with_udp`], range unchanged). Walks
    /// the UDP keys only.
    pub fn set_udp_ports(&mut self, ports: &BTreeMap<ListenKey, u16>) {
        self.udp_ports.clear();
        for (key, port) in ports {
            let e = Element::from(key);
            if key.protocol == Protocol::Udp && !self.no_endpoints.contains_key(&e) {
                self.udp_ports.insert(e, *port);
            }
        }
    }

    /// Every element of `self`'s sets and maps that is about `e` (its key,
    /// in whichever set; its firewall ranges; its UDP port).
    fn items_of(&self, e: &Element) -> Vec<SetItem> {
        let mut out = Vec::new();
        if self.elements.contains(e) {
            out.push(SetItem::Redirect(*e));
        }
        if let Some(v) = self.no_endpoints.get(e) {
            out.push(SetItem::NoEndpoints(*e, *v));
        }
        if let Some(ranges) = self.firewall.get(e) {
            out.push(SetItem::Firewall(*e));
            out.extend(ranges.iter().map(|c| SetItem::Allow(*e, *c)));
        }
        if let Some(p) = self.udp_ports.get(e) {
            out.push(SetItem::UdpPort(*e, *p));
        }
        out
    }

    /// [`Self::element_ops`] restricted to the elements of `keys` (plus
    /// every UDP port, a short map): O(keys), not O(table). Correct when
    /// `self` and `old` differ only there, as after
    /// [`Self::update_keys`]`(keys)` and [`Self::set_udp_ports`]. Deletes
    /// first, grouped by set. `None` when the rules change (full sync).
    pub fn key_ops<'a>(
        &self,
        old: &Ruleset,
        keys: impl IntoIterator<Item = &'a ListenKey>,
    ) -> Option<Vec<ElementOp>> {
        if self.port != old.port || self.udp_range != old.udp_range {
            return None;
        }
        let mut ops = Vec::new();
        let mut seen = BTreeSet::new();
        for key in keys {
            let e = Element::from(key);
            if !seen.insert(e) {
                continue;
            }
            let (mine, theirs) = (self.items_of(&e), old.items_of(&e));
            // UDP ports are compared below, over the whole map.
            let keyed = |i: &&SetItem| !matches!(i, SetItem::UdpPort(..));
            let gone = theirs.iter().filter(keyed).filter(|i| !mine.contains(i));
            ops.extend(gone.map(|i| ElementOp {
                add: false,
                item: *i,
            }));
            let new = mine.iter().filter(keyed).filter(|i| !theirs.contains(i));
            ops.extend(new.map(|i| ElementOp {
                add: true,
                item: *i,
            }));
        }
        let udp = |a: &Ruleset, b: &Ruleset, add: bool| {
            (a.udp_ports.iter())
                .filter(|(e, p)| b.udp_ports.get(e) != Some(p))
                .map(move |(e, p)| ElementOp {
                    add,
                    item: SetItem::UdpPort(*e, *p),
                })
                .collect::<Vec<_>>()
        };
        ops.extend(udp(old, self, false));
        ops.extend(udp(self, old, true));
        ops.sort_by_key(|o| (o.add, o.item.set(), !o.item.is_ipv4(), o.item));
        Some(ops)
    }

    /// Applies `ops` to this ruleset (what the kernel now holds after they
    /// were applied to it).
    pub fn apply_ops(&mut self, ops: &[ElementOp]) {
        for op in ops {
            match (op.add, op.item) {
                (true, SetItem::Redirect(e)) => {
                    self.elements.insert(e);
                }
                (false, SetItem::Redirect(e)) => {
                    self.elements.remove(&e);
                }
                (true, SetItem::NoEndpoints(e, v)) => {
                    self.no_endpoints.insert(e, v);
                }
                (false, SetItem::NoEndpoints(e, _)) => {
                    self.no_endpoints.remove(&e);
                }
                (true, SetItem::Firewall(e)) => {
                    self.firewall.entry(e).or_default();
                }
                (false, SetItem::Firewall(e)) => {
                    self.firewall.remove(&e);
                }
                (true, SetItem::Allow(e, c)) => {
                    self.firewall.entry(e).or_default().insert(c);
                }
                (false, SetItem::Allow(e, c)) => {
                    if let Some(ranges) = self.firewall.get_mut(&e) {
                        ranges.remove(&c);
                    }
                }
                (true, SetItem::UdpPort(e, p)) => {
                    self.udp_ports.insert(e, p);
                }
                (false, SetItem::UdpPort(e, _)) => {
                    self.udp_ports.remove(&e);
                }
            }
        }
    }

    /// Adds the UDP keys of `ports` (a local port each, all in `range`) that
    /// have an eligible backend: a key in `no_endpoints` keeps its verdict
    /// (ICMP port unreachable or drop, as kube-proxy) and is not
    /// redirected. TCP keys in `ports` are ignored.
    pub fn with_udp<'a>(
        mut self,
        ports: impl IntoIterator<Item = (&'a ListenKey, u16)>,
        range: (u16, u16),
    ) -> Self {
        for (key, port) in ports {
            let e = Element::from(key);
            if key.protocol == Protocol::Udp && !self.no_endpoints.contains_key(&e) {
                self.udp_ports.insert(e, port);
            }
        }
        self.udp_range = Some(range);
        self
    }

    /// Declares the table, its sets, maps and chains (a no-op for what
    /// exists), empties them and fills them with this ruleset: one
    /// transaction that never unhooks the chains.
    pub fn full_sync_script(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "add table {TABLE}");
        for (set, ty) in SETS {
            let _ = writeln!(s, "add set {TABLE} {set} {{ {ty}; }}");
            let _ = writeln!(s, "flush set {TABLE} {set}");
        }
        for (map, ty) in MAPS {
            let _ = writeln!(s, "add map {TABLE} {map} {{ {ty}; }}");
            let _ = writeln!(s, "flush map {TABLE} {map}");
        }
        for (chain, hook) in CHAINS {
            if hook.is_empty() {
                let _ = writeln!(s, "add chain {TABLE} {chain}");
            } else {
                let _ = writeln!(s, "add chain {TABLE} {chain} {{ {hook}; policy accept; }}");
            }
            let _ = writeln!(s, "flush chain {TABLE} {chain}");
        }
        for (chain, _) in CHAINS {
            for rule in self.rules(chain) {
                let _ = writeln!(s, "add rule {TABLE} {chain} {rule}");
            }
        }
        self.write_all(&mut s, "add", &Ruleset::default());
        self.write_steer(&mut s);
        s
    }

    /// Steers the replies of transparent dials (see [`Self::steer_mark`]).
    pub fn with_steer_mark(mut self, mark: Option<u32>) -> Self {
        self.steer_mark = mark;
        self
    }

    /// The `steer-replies` chain, when [`Self::steer_mark`] is set: at
    /// `mangle` (-150), before routing decides where the reply goes. When
    /// it is not, the chain is deleted: a sluice that dialed transparently
    /// before this one (a restart with another `--source-ip`) leaves no
    /// mark behind (declared and emptied first, so the delete succeeds
    /// whether or not it was there).
    fn write_steer(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "add chain {TABLE} {STEER_CHAIN} {{ type filter hook prerouting priority mangle; policy accept; }}"
        );
        let _ = writeln!(s, "flush chain {TABLE} {STEER_CHAIN}");
        let Some(mark) = self.steer_mark else {
            let _ = writeln!(s, "delete chain {TABLE} {STEER_CHAIN}");
            return;
        };
        let _ = writeln!(
            s,
            "add rule {TABLE} {STEER_CHAIN} meta l4proto tcp socket transparent 1 counter meta mark set meta mark | {mark:#x}"
        );
    }

    /// Deletes the table whatever it holds and creates it anew with this
    /// ruleset, in one transaction (`add table` first, so that the delete
    /// succeeds when there is no table).
    pub fn replace_script(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "add table {TABLE}");
        let _ = writeln!(s, "delete table {TABLE}");
        s.push_str(&self.full_sync_script());
        s
    }

    /// The script that turns `old` (applied) into `self`: element adds and
    /// deletes only, every delete before every add (so a key moving from
    /// redirect to reject, or between reject and drop, is a delete and an
    /// add in the same transaction). `None` when there is nothing to do. A
    /// changed port changes the rules: that is a full sync.
    pub fn update_script(&self, old: &Ruleset) -> Option<String> {
        if self.port != old.port
            || self.udp_range != old.udp_range
            || self.steer_mark != old.steer_mark
        {
            return Some(self.full_sync_script());
        }
        let mut s = String::new();
        old.write_all(&mut s, "delete", self);
        self.write_all(&mut s, "add", old);
        (!s.is_empty()).then_some(s)
    }

    /// Elements added and deleted, over every set and map, from `old`.
    pub fn changes(&self, old: &Ruleset) -> (usize, usize) {
        (self.items_not_in(old).len(), old.items_not_in(self).len())
    }

    /// `verb` (add/delete) every element of `self` that `other` lacks, in
    /// every set and map.
    fn write_all(&self, s: &mut String, verb: &str, other: &Ruleset) {
        let items = self.items_not_in(other);
        for set in SET_ORDER {
            let items = items.iter().filter(|i| i.set() == set);
            write_elements(s, verb, set, items.map(|i| (i.is_ipv4(), i.text(verb))));
        }
    }

    /// Every element of every set and map of `self` that `other` lacks
    /// (a changed verdict or local port counts as lacking), in
    /// [`SET_ORDER`]. Walks both rulesets, without copying them.
    pub fn items_not_in(&self, other: &Ruleset) -> Vec<SetItem> {
        let mut out = Vec::new();
        let redirect = self.elements.difference(&other.elements);
        out.extend(redirect.map(|e| SetItem::Redirect(*e)));
        let verdicts =
            (self.no_endpoints.iter()).filter(|(e, v)| other.no_endpoints.get(e) != Some(v));
        out.extend(verdicts.map(|(e, v)| SetItem::NoEndpoints(*e, *v)));
        let keys = (self.firewall.keys()).filter(|k| !other.firewall.contains_key(k));
        out.extend(keys.map(|e| SetItem::Firewall(*e)));
        for (e, ranges) in &self.firewall {
            let theirs = other.firewall.get(e);
            let new = ranges
                .iter()
                .filter(|c| !theirs.is_some_and(|t| t.contains(c)));
            out.extend(new.map(|c| SetItem::Allow(*e, *c)));
        }
        let udp = (self.udp_ports.iter()).filter(|(e, p)| other.udp_ports.get(e) != Some(p));
        out.extend(udp.map(|(e, p)| SetItem::UdpPort(*e, *p)));
        out
    }

    /// The element operations that turn `old` (applied) into `self`, every
    /// delete before every add (a moved key or a changed verdict or port is
    /// a delete and an add): the data behind [`Self::update_script`], and
    /// what [`crate::nft_netlink`] sends as one netlink batch. `None` when
    /// the rules change too (port or UDP range): that is a full sync.
    pub fn element_ops(&self, old: &Ruleset) -> Option<Vec<ElementOp>> {
        if self.port != old.port || self.udp_range != old.udp_range {
            return None;
        }
        let deletes = old.items_not_in(self).into_iter();
        let deletes = deletes.map(|item| ElementOp { add: false, item });
        let adds = self.items_not_in(old).into_iter();
        let adds = adds.map(|item| ElementOp { add: true, item });
        Some(deletes.chain(adds).collect())
    }

    /// The rules of `chain` (see the module docs).
    fn rules(&self, chain: &str) -> Vec<String> {
        let port = self.port;
        let families = [("ip", "v4"), ("ip6", "v6")];
        match chain {
            "nat-prerouting" | "nat-output" => (families.iter())
                .map(|(ip, v)| {
                    format!(
                        "meta l4proto tcp {ip} daddr . meta l4proto . th dport @service-ips-{v} redirect to :{port}"
                    )
                })
                .chain(families.iter().map(|(ip, v)| {
                    format!("meta l4proto udp redirect to {ip} daddr . udp dport map @udp-ports-{v}")
                }))
                .collect(),
            "filter-prerouting" => vec!["ct state new jump firewall-check".into()],
            "filter-input" => {
                let mut rules = vec!["ct state new jump endpoints-check".to_string()];
                // Sluice's UDP ports take redirected datagrams only (the
                // redirect left `dnat` in the conntrack status).
                if let Some((first, last)) = self.udp_range {
                    rules.push(format!(
                        "meta l4proto udp udp dport {first}-{last} ct status & dnat == 0 drop"
                    ));
                }
                rules
            }
            "filter-forward" => vec!["ct state new jump endpoints-check".into()],
            "filter-output" => vec![
                "ct state new jump firewall-check".into(),
                "ct state new jump endpoints-check".into(),
            ],
            "endpoints-check" => families
                .map(|(ip, v)| {
                    format!(
                        "{ip} daddr . meta l4proto . th dport vmap @no-endpoint-services-{v}"
                    )
                })
                .to_vec(),
            "firewall-check" => families
                .map(|(ip, v)| {
                    format!(
                        "{ip} daddr . meta l4proto . th dport @firewall-ips-{v} \
                         {ip} daddr . meta l4proto . th dport . {ip} saddr != @firewall-allow-{v} drop"
                    )
                })
                .to_vec(),
            "reject-chain" => vec!["meta l4proto tcp reject with tcp reset".into(), "reject".into()],
            _ => Vec::new(),
        }
    }
}

/// Every key a [`TableDiff`] names (added, removed, changed): what
/// [`Ruleset::update_keys`] and [`Programmer::sync_keys`] take.
pub fn diff_keys(diff: &TableDiff) -> Vec<ListenKey> {
    (diff.added.iter().chain(&diff.removed))
        .chain(diff.changed.iter().map(|(k, _)| k))
        .copied()
        .collect()
}

/// The verdict of a `no-endpoint-services` element.
fn verdict(v: NoEndpoints) -> &'static str {
    match v {
        NoEndpoints::Reject => "goto reject-chain",
        NoEndpoints::Drop => "drop",
    }
}

/// `verb element` statements for `items` (`(is IPv4, element text)`), into
/// `{set}-v4` and `{set}-v6`, at most [`CHUNK`] elements a statement.
fn write_elements(
    s: &mut String,
    verb: &str,
    set: &str,
    items: impl Iterator<Item = (bool, String)>,
) {
    let mut v4: Vec<String> = Vec::new();
    let mut v6: Vec<String> = Vec::new();
    for (is_v4, text) in items {
        if is_v4 { v4.push(text) } else { v6.push(text) }
    }
    for (group, family) in [(v4, "v4"), (v6, "v6")] {
        for chunk in group.chunks(CHUNK) {
            let _ = write!(s, "{verb} element {TABLE} {set}-{family} {{ ");
            for (i, text) in chunk.iter().enumerate() {
                if i > 0 {
                    s.push_str(", ");
                }
                s.push_str(text);
            }
            s.push_str(" }\n");
        }
    }
}

/// Sluice's sets: name and declaration.
const SETS: [(&str, &str); 6] = [
    (
        "service-ips-v4",
        "type ipv4_addr . inet_proto . inet_service",
    ),
    (
        "service-ips-v6",
        "type ipv6_addr . inet_proto . inet_service",
    ),
    (
        "firewall-ips-v4",
        "type ipv4_addr . inet_proto . inet_service",
    ),
    (
        "firewall-ips-v6",
        "type ipv6_addr . inet_proto . inet_service",
    ),
    (
        "firewall-allow-v4",
        "type ipv4_addr . inet_proto . inet_service . ipv4_addr; flags interval",
    ),
    (
        "firewall-allow-v6",
        "type ipv6_addr . inet_proto . inet_service . ipv6_addr; flags interval",
    ),
];

/// Sluice's maps: name and declaration.
const MAPS: [(&str, &str); 4] = [
    (
        "no-endpoint-services-v4",
        "type ipv4_addr . inet_proto . inet_service : verdict",
    ),
    (
        "no-endpoint-services-v6",
        "type ipv6_addr . inet_proto . inet_service : verdict",
    ),
    (
        "udp-ports-v4",
        "type ipv4_addr . inet_service : inet_service",
    ),
    (
        "udp-ports-v6",
        "type ipv6_addr . inet_service : inet_service",
    ),
];

/// Sluice's chains: name and declaration (empty for a regular chain),
/// kube-proxy's hooks and priorities: the filter chains at `dstnat - 10`
/// (-110), before the nat chains at `dstnat` (-100), so that they see the
/// Service address, not the redirected one (nft before 1.0.7 accepts the
/// `dstnat` keyword only in prerouting, so the others spell the number).
/// Regular chains come first: base chains jump to them.
const CHAINS: [(&str, &str); 9] = [
    ("reject-chain", ""),
    ("endpoints-check", ""),
    ("firewall-check", ""),
    (
        "filter-prerouting",
        "type filter hook prerouting priority -110",
    ),
    ("filter-input", "type filter hook input priority -110"),
    ("filter-forward", "type filter hook forward priority -110"),
    ("filter-output", "type filter hook output priority -110"),
    ("nat-prerouting", "type nat hook prerouting priority dstnat"),
    ("nat-output", "type nat hook output priority -100"),
];

/// The chain of `table inet sluice` that marks replies of transparent
/// dials.
pub const STEER_CHAIN: &str = "steer-replies";

/// The table that steers replies of transparent dials within one pod
/// bridge (br_netfilter on).
pub const BRIDGE_TABLE: &str = "bridge sluice";

/// `table bridge sluice`, replaced whole in one transaction: for each pod
/// bridge and family, a frame to the bridge's subnet that the ip hooks
/// marked `mark` (the reply of a transparent dial: br_netfilter runs them
/// at bridge priority 0, the `steer-replies` chain sets the mark) gets the
/// bridge's own MAC and is passed up to the host instead of being bridged
/// to the client pod. Ordinary pod-to-pod frames carry no mark and stay
/// bridged. Measured in docs/source-ip.md (`BRIDGE=after`). No bridge: the
/// table is deleted.
pub fn bridge_script(mark: u32, bridges: &[crate::policy_route::Bridge]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "add table {BRIDGE_TABLE}");
    let _ = writeln!(s, "delete table {BRIDGE_TABLE}");
    if bridges.is_empty() {
        return s;
    }
    let _ = writeln!(s, "add table {BRIDGE_TABLE}");
    let _ = writeln!(
        s,
        "add chain {BRIDGE_TABLE} prerouting {{ type filter hook prerouting priority 10; policy accept; }}"
    );
    for b in bridges {
        let m = b.mac;
        let mac = format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        );
        for subnet in &b.subnets {
            let ip = if subnet.is_ipv4() { "ip" } else { "ip6" };
            let _ = writeln!(
                s,
                "add rule {BRIDGE_TABLE} prerouting {ip} daddr {subnet} meta mark & {mark:#x} == {mark:#x} counter ether daddr set {mac} meta pkttype set host comment \"{}\"",
                b.name
            );
        }
    }
    s
}

/// Removes `table bridge sluice` if there is one.
pub fn bridge_cleanup_script() -> String {
    bridge_script(0, &[])
}

/// Removes sluice's table if there is one (`sluice --cleanup`).
pub fn cleanup_script() -> String {
    format!("add table {TABLE}\ndelete table {TABLE}\n")
}

/// Why an `nft` run failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error(
        "the `nft` command was not found (install the Debian package `nftables`); it is needed by --intercept nftables and --cleanup"
    )]
    NotInstalled,
    #[error("cannot run `nft`: {0}")]
    Io(#[from] std::io::Error),
    #[error("`nft -f -` failed ({status}): {stderr}")]
    Failed { status: String, stderr: String },
    #[error(
        "`nft` did not finish within {0:?}: killed (a batch it was given may or may not be applied: a sync that times out is followed by a full one)"
    )]
    TimedOut(std::time::Duration),
}

/// How long one `nft` run may take before it is killed. A full sync of
/// 10,000 Services takes about a second; a run that hangs (a wedged
/// netlink socket, a stuck lock) must not stop the reconcile loop, whose
/// follower then retries as after any failed run.
const NFT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether `nft` is installed and may read the ruleset (permissions): run
/// at start so that a missing `nft` stops sluice with a clear message.
pub async fn check() -> Result<(), NftError> {
    apply("list tables\n").await
}

/// Runs `nft -f -` with `script` on stdin: one transaction.
pub async fn apply(script: &str) -> Result<(), NftError> {
    apply_with("nft", script, NFT_TIMEOUT).await
}

async fn apply_with(
    program: &str,
    script: &str,
    limit: std::time::Duration,
) -> Result<(), NftError> {
    let out = run(program, &["-f", "-"], Some(script), limit).await?;
    if out.status.success() {
        return Ok(());
    }
    Err(NftError::Failed {
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// Runs `program ARGS` (`nft`, or a stand-in in tests) with `stdin` (or
/// nothing) on its standard input, for at most `limit`: its output, or
/// [`NftError::NotInstalled`] / [`NftError::TimedOut`] (the process is
/// killed: `kill_on_drop`).
pub(crate) async fn run(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
    limit: std::time::Duration,
) -> Result<std::process::Output, NftError> {
    let mut child = match tokio::process::Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(NftError::NotInstalled),
        Err(e) => return Err(e.into()),
    };
    let pipe = child.stdin.take();
    let run = async move {
        if let (Some(mut pipe), Some(input)) = (pipe, stdin) {
            // A write error (nft exited early) shows up in its status and stderr.
            let _ = pipe.write_all(input.as_bytes()).await;
            drop(pipe);
        }
        child.wait_with_output().await
    };
    // On timeout the child is dropped with the future: killed.
    Ok(tokio::time::timeout(limit, run)
        .await
        .map_err(|_| NftError::TimedOut(limit))??)
}

/// The `udp-ports` maps of sluice's table as the kernel holds them now
/// (`nft -j list map`): which local port each UDP key is redirected to, as
/// a previous sluice (a restart) or the one running beside this one (a
/// hand-over) left them, for [`crate::udp_intercept`] to adopt. No table
/// or no map: empty. An element that cannot be read is skipped (counted
/// in the second value) and the rest kept.
pub async fn read_udp_ports() -> Result<(BTreeMap<ListenKey, u16>, usize), NftError> {
    let mut ports = BTreeMap::new();
    let mut skipped = 0;
    for map in ["udp-ports-v4", "udp-ports-v6"] {
        let args = ["-j", "list", "map", "inet", "sluice", map];
        let out = run("nft", &args, None, NFT_TIMEOUT).await?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            // No table or no map yet (the first sluice on this node).
            if stderr.contains("No such file or directory") {
                continue;
            }
            return Err(NftError::Failed {
                status: out.status.to_string(),
                stderr,
            });
        }
        let (read, bad) = parse_udp_ports(&String::from_utf8_lossy(&out.stdout));
        ports.extend(read);
        skipped += bad;
    }
    Ok((ports, skipped))
}

/// The elements of a `udp-ports` map in `nft -j list map` output
/// (`[{"concat": [address, port]}, local port]`), and how many elements
/// were not of that shape (skipped). Output that is not JSON: none read,
/// one skipped.
fn parse_udp_ports(json: &str) -> (Vec<(ListenKey, u16)>, usize) {
    use serde_json::Value;
    let Ok(doc) = serde_json::from_str::<Value>(json) else {
        return (Vec::new(), 1);
    };
    let port = |v: &Value| -> Option<u16> {
        match v {
            Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
    };
    let element = |e: &Value| -> Option<(ListenKey, u16)> {
        let [key, local] = e.as_array()?.as_slice() else {
            return None;
        };
        let [addr, service] = key.get("concat")?.as_array()?.as_slice() else {
            return None;
        };
        let addr: IpAddr = addr.as_str()?.parse().ok()?;
        let key = ListenKey {
            addr: (addr, port(service)?).into(),
            protocol: Protocol::Udp,
        };
        Some((key, port(local)?))
    };
    let (mut read, mut skipped) = (Vec::new(), 0);
    let items = doc.get("nftables").and_then(Value::as_array);
    for item in items.into_iter().flatten() {
        let elems = item.get("map").and_then(|m| m.get("elem"));
        for e in elems.and_then(Value::as_array).into_iter().flatten() {
            match element(e) {
                Some(kp) => read.push(kp),
                None => skipped += 1,
            }
        }
    }
    (read, skipped)
}

/// Every address on the node's interfaces (netlink), for
/// `--nodeport-addresses` CIDRs to match (see
/// [`sluice_control::cidr::nodeport_addresses`]). Must run inside a Tokio
/// runtime.
pub async fn local_addresses() -> std::io::Result<Vec<IpAddr>> {
    use futures_util::TryStreamExt;
    use rtnetlink::packet_route::address::AddressAttribute;
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let connection = tokio::spawn(connection);
    let mut stream = handle.address().get().execute();
    let mut found = Vec::new();
    let listed = loop {
        match stream.try_next().await {
            Ok(Some(message)) => {
                let mut local = None;
                let mut address = None;
                for attribute in &message.attributes {
                    match attribute {
                        AddressAttribute::Local(ip) => local = Some(*ip),
                        AddressAttribute::Address(ip) => address = Some(*ip),
                        _ => {}
                    }
                }
                // IFA_LOCAL is the address itself (IFA_ADDRESS is the peer
                // on point-to-point links, and the only one for IPv6).
                found.extend(local.or(address));
            }
            Ok(None) => break Ok(found),
            Err(e) => break Err(std::io::Error::other(format!("cannot list addresses: {e}"))),
        }
    };
    connection.abort();
    listed
}

/// How a [`Programmer::sync`] reached the desired state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synced {
    /// Nothing to change.
    Unchanged,
    /// Elements added/deleted.
    Updated { added: usize, deleted: usize },
    /// The table's content replaced (first sync, or recovery).
    Full,
}

/// Keeps sluice's table equal to a desired [`Ruleset`].
#[derive(Debug, Default)]
pub struct Programmer {
    /// What the kernel holds, as far as this process knows; `None` before
    /// the first successful sync and after a failed one.
    applied: Option<Ruleset>,
    /// Element changes go through `nft -f` only (no netlink).
    script_only: bool,
    /// A netlink failure has been logged (once per programmer).
    netlink_warned: bool,
    /// The nf_tables netlink socket, kept open (closing one costs ~10 ms);
    /// `None` before the first update and after a socket error.
    conn: Option<crate::nft_netlink::Conn>,
}

impl Programmer {
    pub fn new() -> Self {
        Self::default()
    }

    /// A programmer that applies element changes with `nft -f` too, never
    /// over netlink (for comparison in `sluice-bench control`).
    pub fn script_only() -> Self {
        Self {
            script_only: true,
            ..Self::default()
        }
    }

    /// Makes the table hold `want`: element changes from what was applied
    /// last, as one netlink batch ([`crate::nft_netlink`]; `nft -f` if
    /// netlink fails, logged once), else a full sync with `nft -f` (and if
    /// even that fails, a delete-and-recreate). Compares the whole
    /// rulesets: O(table).
    pub async fn sync(&mut self, want: &Ruleset) -> Result<Synced, NftError> {
        let ops = self.applied.as_ref().and_then(|a| want.element_ops(a));
        self.sync_ops(want, ops).await
    }

    /// [`Self::sync`] when `want` differs from what was last synced only at
    /// `keys` (a [`sluice_control::TableDiff`]'s keys, `want` kept up to
    /// date with [`Ruleset::update_keys`]): O(keys), the path of one
    /// Service change at 10,000 Services. The first sync, and the one after
    /// a failure, is a full sync all the same.
    pub async fn sync_keys(
        &mut self,
        want: &Ruleset,
        keys: &[ListenKey],
    ) -> Result<Synced, NftError> {
        let ops = self.applied.as_ref().and_then(|a| want.key_ops(a, keys));
        self.sync_ops(want, ops).await
    }

    /// Applies `ops` (from what was applied to `want`; `None`: a full sync).
    async fn sync_ops(
        &mut self,
        want: &Ruleset,
        ops: Option<Vec<ElementOp>>,
    ) -> Result<Synced, NftError> {
        let (Some(ops), Some(applied)) = (ops, self.applied.as_mut()) else {
            return self.full_sync(want).await;
        };
        if ops.is_empty() {
            return Ok(Synced::Unchanged);
        }
        let deleted = ops.iter().filter(|o| !o.add).count();
        let updated = Synced::Updated {
            added: ops.len() - deleted,
            deleted,
        };
        if !self.script_only {
            use crate::nft_netlink::{Conn, NetlinkError};
            let conn = self.conn.take();
            // Off the runtime's threads; the socket and the batch come back
            // with the result.
            let sent = tokio::task::spawn_blocking(move || {
                let conn = match conn {
                    Some(c) => Ok(c),
                    None => Conn::open(),
                };
                match conn {
                    Ok(mut c) => {
                        let r = c.apply(&ops);
                        (r, Some(c), ops)
                    }
                    Err(e) => (Err(e), None, ops),
                }
            })
            .await;
            let result = match sent {
                Ok((r, conn, ops)) => {
                    // A socket that failed or lost track of answers is
                    // not reused.
                    let healthy = matches!(r, Ok(()) | Err(NetlinkError::Refused { .. }));
                    self.conn = conn.filter(|_| healthy);
                    if r.is_ok() {
                        applied.apply_ops(&ops);
                        return Ok(updated);
                    }
                    r
                }
                Err(e) => Err(NetlinkError::Io(std::io::Error::other(e.to_string()))),
            };
            match result {
                Err(NetlinkError::TooLarge(_)) | Ok(()) => {}
                Err(e) if !self.netlink_warned => {
                    self.netlink_warned = true;
                    tracing::warn!(
                        table = TABLE,
                        "nftables element update over netlink failed, applying it with \
                         `nft -f` (logged once): {e}"
                    );
                }
                Err(_) => {}
            }
        }
        if let Some(script) = want.update_script(applied) {
            match apply(&script).await {
                Ok(()) => {
                    self.applied = Some(want.clone());
                    return Ok(updated);
                }
                // A hung nft says nothing about the table: the next try
                // (the follower's retry) starts from a full sync.
                Err(e @ NftError::TimedOut(_)) => {
                    self.applied = None;
                    return Err(e);
                }
                Err(_) => {}
            }
        }
        // Someone changed the table under us: resync it whole.
        self.full_sync(want).await
    }

    /// Declares, flushes and refills the table with `nft -f` (one
    /// transaction); if that fails, deletes and recreates it.
    async fn full_sync(&mut self, want: &Ruleset) -> Result<Synced, NftError> {
        self.applied = None;
        if let Err(first) = apply(&want.full_sync_script()).await {
            // Neither says the table is in the way: not replaced (and a hung
            // nft is not waited for a second time in this pass).
            if matches!(first, NftError::NotInstalled | NftError::TimedOut(_)) {
                return Err(first);
            }
            apply(&want.replace_script()).await?;
        }
        self.applied = Some(want.clone());
        Ok(Synced::Full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_control::{Backend, Conditions, Policy, Service, Settings, TableDiff};
    use std::sync::Arc;

    fn listen_key(k: &str) -> ListenKey {
        let (addr, proto) = k.split_once('/').unwrap_or((k, "tcp"));
        ListenKey {
            addr: addr.parse().unwrap(),
            protocol: if proto == "udp" {
                Protocol::Udp
            } else {
                Protocol::Tcp
            },
        }
    }

    /// A service with one ready backend, or none, with `settings`.
    fn service(name: &str, served: bool, settings: Settings) -> Arc<Service> {
        let ready = Conditions {
            ready: true,
            serving: true,
            terminating: false,
        };
        let backends = match served {
            true => vec![Backend::new("10.244.0.20:8080".parse().unwrap(), ready)],
            false => Vec::new(),
        };
        Arc::new(Service::new(name, Policy::RoundRobin, None, backends).with_settings(settings))
    }

    /// Each key served by one ready backend.
    fn table(keys: &[&str]) -> Table {
        let mut t = Table::new();
        for k in keys {
            t.insert(listen_key(k), service(k, true, Settings::default()));
        }
        t
    }

    fn cidrs(v: &[&str]) -> Vec<Cidr> {
        v.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn ruleset_has_every_tcp_key_and_no_udp() {
        let r = Ruleset::from_table(
            &table(&["10.96.0.10:53/udp", "10.96.0.10:53", "[fd00::1]:443"]),
            10261,
        );
        let shown: Vec<String> = r.elements.iter().map(|e| e.to_string()).collect();
        assert_eq!(shown, ["10.96.0.10 . tcp . 53", "fd00::1 . tcp . 443"]);
    }

    #[test]
    fn full_sync_declares_flushes_and_fills_in_one_script() {
        let r = Ruleset::from_table(
            &table(&["10.96.0.10:80", "192.168.1.10:31000", "[fd00::1]:443"]),
            10261,
        );
        let expected = "\
add table inet sluice
add set inet sluice service-ips-v4 { type ipv4_addr . inet_proto . inet_service; }
flush set inet sluice service-ips-v4
add set inet sluice service-ips-v6 { type ipv6_addr . inet_proto . inet_service; }
flush set inet sluice service-ips-v6
add set inet sluice firewall-ips-v4 { type ipv4_addr . inet_proto . inet_service; }
flush set inet sluice firewall-ips-v4
add set inet sluice firewall-ips-v6 { type ipv6_addr . inet_proto . inet_service; }
flush set inet sluice firewall-ips-v6
add set inet sluice firewall-allow-v4 { type ipv4_addr . inet_proto . inet_service . ipv4_addr; flags interval; }
flush set inet sluice firewall-allow-v4
add set inet sluice firewall-allow-v6 { type ipv6_addr . inet_proto . inet_service . ipv6_addr; flags interval; }
flush set inet sluice firewall-allow-v6
add map inet sluice no-endpoint-services-v4 { type ipv4_addr . inet_proto . inet_service : verdict; }
flush map inet sluice no-endpoint-services-v4
add map inet sluice no-endpoint-services-v6 { type ipv6_addr . inet_proto . inet_service : verdict; }
flush map inet sluice no-endpoint-services-v6
add map inet sluice udp-ports-v4 { type ipv4_addr . inet_service : inet_service; }
flush map inet sluice udp-ports-v4
add map inet sluice udp-ports-v6 { type ipv6_addr . inet_service : inet_service; }
flush map inet sluice udp-ports-v6
add chain inet sluice reject-chain
flush chain inet sluice reject-chain
add chain inet sluice endpoints-check
flush chain inet sluice endpoints-check
add chain inet sluice firewall-check
flush chain inet sluice firewall-check
add chain inet sluice filter-prerouting { type filter hook prerouting priority -110; policy accept; }
flush chain inet sluice filter-prerouting
add chain inet sluice filter-input { type filter hook input priority -110; policy accept; }
flush chain inet sluice filter-input
add chain inet sluice filter-forward { type filter hook forward priority -110; policy accept; }
flush chain inet sluice filter-forward
add chain inet sluice filter-output { type filter hook output priority -110; policy accept; }
flush chain inet sluice filter-output
add chain inet sluice nat-prerouting { type nat hook prerouting priority dstnat; policy accept; }
flush chain inet sluice nat-prerouting
add chain inet sluice nat-output { type nat hook output priority -100; policy accept; }
flush chain inet sluice nat-output
add rule inet sluice reject-chain meta l4proto tcp reject with tcp reset
add rule inet sluice reject-chain reject
add rule inet sluice endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services-v4
add rule inet sluice endpoints-check ip6 daddr . meta l4proto . th dport vmap @no-endpoint-services-v6
add rule inet sluice firewall-check ip daddr . meta l4proto . th dport @firewall-ips-v4 ip daddr . meta l4proto . th dport . ip saddr != @firewall-allow-v4 drop
add rule inet sluice firewall-check ip6 daddr . meta l4proto . th dport @firewall-ips-v6 ip6 daddr . meta l4proto . th dport . ip6 saddr != @firewall-allow-v6 drop
add rule inet sluice filter-prerouting ct state new jump firewall-check
add rule inet sluice filter-input ct state new jump endpoints-check
add rule inet sluice filter-forward ct state new jump endpoints-check
add rule inet sluice filter-output ct state new jump firewall-check
add rule inet sluice filter-output ct state new jump endpoints-check
add rule inet sluice nat-prerouting meta l4proto tcp ip daddr . meta l4proto . th dport @service-ips-v4 redirect to :10261
add rule inet sluice nat-prerouting meta l4proto tcp ip6 daddr . meta l4proto . th dport @service-ips-v6 redirect to :10261
add rule inet sluice nat-prerouting meta l4proto udp redirect to ip daddr . udp dport map @udp-ports-v4
add rule inet sluice nat-prerouting meta l4proto udp redirect to ip6 daddr . udp dport map @udp-ports-v6
add rule inet sluice nat-output meta l4proto tcp ip daddr . meta l4proto . th dport @service-ips-v4 redirect to :10261
add rule inet sluice nat-output meta l4proto tcp ip6 daddr . meta l4proto . th dport @service-ips-v6 redirect to :10261
add rule inet sluice nat-output meta l4proto udp redirect to ip daddr . udp dport map @udp-ports-v4
add rule inet sluice nat-output meta l4proto udp redirect to ip6 daddr . udp dport map @udp-ports-v6
add element inet sluice service-ips-v4 { 10.96.0.10 . tcp . 80, 192.168.1.10 . tcp . 31000 }
add element inet sluice service-ips-v6 { fd00::1 . tcp . 443 }
add chain inet sluice steer-replies { type filter hook prerouting priority mangle; policy accept; }
flush chain inet sluice steer-replies
delete chain inet sluice steer-replies
";
        assert_eq!(r.full_sync_script(), expected);
        assert!(!expected.contains("flush table"));
        let replace = r.replace_script();
        assert!(replace.starts_with("add table inet sluice\ndelete table inet sluice\n"));
        assert!(replace.ends_with(expected));
    }

    #[test]
    fn update_adds_and_deletes_elements_only() {
        let old = Ruleset::from_table(&table(&["10.96.0.10:80", "10.96.0.11:80"]), 10261);
        let new = Ruleset::from_table(&table(&["10.96.0.10:80", "[fd00::2]:8080"]), 10261);
        assert_eq!(
            new.update_script(&old).unwrap(),
            "delete element inet sluice service-ips-v4 { 10.96.0.11 . tcp . 80 }\n\
             add element inet sluice service-ips-v6 { fd00::2 . tcp . 8080 }\n"
        );
        assert_eq!(new.update_script(&new), None);
        // An empty table is an update too: every element deleted, nothing flushed.
        let empty = Ruleset::from_table(&Table::new(), 10261);
        let script = empty.update_script(&old).unwrap();
        assert_eq!(script.lines().count(), 1);
        assert!(script.starts_with("delete element"));
    }

    #[test]
    fn a_changed_port_is_a_full_sync() {
        let old = Ruleset::from_table(&table(&["10.96.0.10:80"]), 10261);
        let new = Ruleset::from_table(&table(&["10.96.0.10:80"]), 10262);
        let script = new.update_script(&old).unwrap();
        assert!(script.contains("flush chain inet sluice nat-output"));
        assert!(script.contains("redirect to :10262"));
    }

    #[test]
    fn ten_thousand_services_are_nineteen_rules_and_chunked_elements() {
        let keys: Vec<String> = (0..10_000u32)
            .map(|i| format!("10.96.{}.{}:80", i / 250, i % 250 + 1))
            .collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let r = Ruleset::from_table(&table(&keys), 10261);
        let script = r.full_sync_script();
        // The rules are the same for no Service and for 10,000.
        assert_eq!(script.matches("add rule").count(), 19);
        let none = Ruleset::from_table(&Table::new(), 10261).full_sync_script();
        assert_eq!(none.matches("add rule").count(), 19);
        assert_eq!(script.matches("add element").count(), 10);
        assert_eq!(script.matches(" . tcp . 80").count(), 10_000);
    }

    #[test]
    fn a_key_without_endpoints_gets_its_verdict_and_no_redirect() {
        let mut t = table(&["10.96.0.10:80"]);
        t.insert(
            listen_key("10.96.0.11:80"),
            service("none", false, Settings::default()),
        );
        let drop = Settings {
            no_endpoints: NoEndpoints::Drop,
            ..Settings::default()
        };
        t.insert(
            listen_key("192.168.50.10:30080"),
            service("local", false, drop),
        );
        t.insert(
            listen_key("[fd00::11]:53/udp"),
            service("dns", false, Settings::default()),
        );
        // A UDP key with endpoints is neither steered nor rejected.
        t.insert(
            listen_key("10.96.0.12:53/udp"),
            service("dns", true, Settings::default()),
        );
        let r = Ruleset::from_table(&t, 10261);
        let shown: Vec<String> = r.elements.iter().map(|e| e.to_string()).collect();
        assert_eq!(shown, ["10.96.0.10 . tcp . 80"]);
        let script = r.full_sync_script();
        assert!(script.contains(
            "add element inet sluice no-endpoint-services-v4 { 10.96.0.11 . tcp . 80 : goto reject-chain, 192.168.50.10 . tcp . 30080 : drop }\n"
        ), "{script}");
        assert!(script.contains(
            "add element inet sluice no-endpoint-services-v6 { fd00::11 . udp . 53 : goto reject-chain }\n"
        ), "{script}");
        assert!(!script.contains("10.96.0.12"), "{script}");
    }

    #[test]
    fn endpoints_coming_and_going_move_a_key_in_one_transaction() {
        let served = Ruleset::from_table(&table(&["10.96.0.10:80"]), 10261);
        let mut t = Table::new();
        t.insert(
            listen_key("10.96.0.10:80"),
            service("web", false, Settings::default()),
        );
        let rejected = Ruleset::from_table(&t, 10261);
        assert_eq!(
            rejected.update_script(&served).unwrap(),
            "delete element inet sluice service-ips-v4 { 10.96.0.10 . tcp . 80 }\n\
             add element inet sluice no-endpoint-services-v4 { 10.96.0.10 . tcp . 80 : goto reject-chain }\n"
        );
        assert_eq!(
            served.update_script(&rejected).unwrap(),
            "delete element inet sluice no-endpoint-services-v4 { 10.96.0.10 . tcp . 80 }\n\
             add element inet sluice service-ips-v4 { 10.96.0.10 . tcp . 80 }\n"
        );
        assert_eq!(rejected.changes(&served), (1, 1));
        // Reject to drop (endpoints appeared elsewhere, none local): the
        // map element is replaced, delete first.
        let drop = Settings {
            no_endpoints: NoEndpoints::Drop,
            ..Settings::default()
        };
        t.insert(listen_key("10.96.0.10:80"), service("web", false, drop));
        let dropped = Ruleset::from_table(&t, 10261);
        assert_eq!(
            dropped.update_script(&rejected).unwrap(),
            "delete element inet sluice no-endpoint-services-v4 { 10.96.0.10 . tcp . 80 }\n\
             add element inet sluice no-endpoint-services-v4 { 10.96.0.10 . tcp . 80 : drop }\n"
        );
    }

    #[test]
    fn source_ranges_fill_the_firewall_of_their_family_outermost_only() {
        let with = |ranges: &[&str]| Settings {
            source_ranges: cidrs(ranges),
            ..Settings::default()
        };
        let mut t = table(&["10.96.0.10:80"]);
        let ranges = ["10.0.0.0/8", "10.1.0.0/16", "fd00::/8", "192.168.50.1/32"];
        t.insert(
            listen_key("192.168.60.1:80"),
            service("lb", true, with(&ranges)),
        );
        // Only ranges of the other family: no filter (kube-proxy's
        // per-family proxiers).
        t.insert(
            listen_key("[fd00:60::1]:80"),
            service("lb6", true, with(&["10.0.0.0/8"])),
        );
        let r = Ruleset::from_table(&t, 10261);
        let script = r.full_sync_script();
        for line in [
            "add element inet sluice firewall-ips-v4 { 192.168.60.1 . tcp . 80 }\n",
            "add element inet sluice firewall-allow-v4 { 192.168.60.1 . tcp . 80 . 10.0.0.0/8, 192.168.60.1 . tcp . 80 . 192.168.50.1/32 }\n",
            "add element inet sluice service-ips-v6 { fd00:60::1 . tcp . 80 }\n",
        ] {
            assert!(script.contains(line), "{line} not in:\n{script}");
        }
        assert!(
            !script.contains("firewall-ips-v6 {  }")
                && !script.contains("add element inet sluice firewall-ips-v6")
        );
        // One range fewer: one allow element deleted, nothing else.
        t.insert(
            listen_key("192.168.60.1:80"),
            service("lb", true, with(&["10.0.0.0/8"])),
        );
        let narrower = Ruleset::from_table(&t, 10261);
        assert_eq!(
            narrower.update_script(&r).unwrap(),
            "delete element inet sluice firewall-allow-v4 { 192.168.60.1 . tcp . 80 . 192.168.50.1/32 }\n"
        );
        // No ranges left: the key leaves the firewall.
        t.insert(
            listen_key("192.168.60.1:80"),
            service("lb", true, with(&[])),
        );
        let open = Ruleset::from_table(&t, 10261);
        assert_eq!(
            open.update_script(&narrower).unwrap(),
            "delete element inet sluice firewall-ips-v4 { 192.168.60.1 . tcp . 80 }\n\
             delete element inet sluice firewall-allow-v4 { 192.168.60.1 . tcp . 80 . 10.0.0.0/8 }\n"
        );
    }

    #[test]
    fn udp_ports_are_read_from_nft_json_and_bad_elements_skipped() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"map": {"family": "inet", "name": "udp-ports-v4", "table": "sluice",
             "type": ["ipv4_addr", "inet_service"], "map": "inet_service",
             "elem": [[{"concat": ["10.96.0.10", 53]}, 20000],
                      [{"concat": ["fd00::10", "53"]}, 20002],
                      [{"concat": ["10.96.0.11", 70000]}, 20001],
                      "garbage"]}}]}"#;
        let (read, skipped) = parse_udp_ports(json);
        assert_eq!(
            read,
            [
                (listen_key("10.96.0.10:53/udp"), 20000),
                (listen_key("[fd00::10]:53/udp"), 20002)
            ]
        );
        assert_eq!(skipped, 2);
        assert_eq!(parse_udp_ports("not json"), (Vec::new(), 1));
        // A map without elements: nothing, nothing skipped.
        let empty = r#"{"nftables": [{"map": {"name": "udp-ports-v6"}}]}"#;
        assert_eq!(parse_udp_ports(empty), (Vec::new(), 0));
    }

    /// `key → local port` for [`Ruleset::with_udp`].
    fn udp_ports(v: &[(&str, u16)]) -> Vec<(ListenKey, u16)> {
        v.iter().map(|(k, p)| (listen_key(k), *p)).collect()
    }

    #[test]
    fn udp_keys_with_backends_map_to_their_local_port() {
        let mut t = table(&["10.96.0.10:53/udp", "10.96.0.10:53", "[fd00::10]:53/udp"]);
        t.insert(
            listen_key("10.96.0.11:53/udp"),
            service("none", false, Settings::default()),
        );
        let ports = udp_ports(&[
            ("10.96.0.10:53/udp", 20000),
            ("[fd00::10]:53/udp", 20001),
            ("10.96.0.11:53/udp", 20002),
            ("10.96.0.10:53", 20003), // TCP: ignored
        ]);
        let r = Ruleset::from_table(&t, 10261)
            .with_udp(ports.iter().map(|(k, p)| (k, *p)), (20000, 20009));
        let script = r.full_sync_script();
        assert!(script.contains(
            "add rule inet sluice filter-input meta l4proto udp udp dport 20000-20009 ct status & dnat == 0 drop\n"
        ));
        assert!(
            script.contains("add element inet sluice udp-ports-v4 { 10.96.0.10 . 53 : 20000 }\n")
        );
        assert!(
            script.contains("add element inet sluice udp-ports-v6 { fd00::10 . 53 : 20001 }\n")
        );
        // No endpoints: the verdict (ICMP port unreachable), no redirect.
        assert!(!script.contains("20002"));
        assert!(script.contains("10.96.0.11 . udp . 53 : goto reject-chain"));
        assert!(!script.contains("20003"));
        assert_eq!(script.matches("add rule").count(), 20);
        let shown: Vec<String> = r.elements.iter().map(|e| e.to_string()).collect();
        assert_eq!(shown, ["10.96.0.10 . tcp . 53"]);
    }

    #[test]
    fn a_udp_key_changing_port_or_endpoints_is_a_delete_and_an_add() {
        let range = (20000, 20009);
        let t = table(&["10.96.0.10:53/udp", "10.96.0.12:53/udp"]);
        let ports = udp_ports(&[("10.96.0.10:53/udp", 20000), ("10.96.0.12:53/udp", 20001)]);
        let old =
            Ruleset::from_table(&t, 10261).with_udp(ports.iter().map(|(k, p)| (k, *p)), range);
        let ports = udp_ports(&[("10.96.0.10:53/udp", 20005), ("10.96.0.12:53/udp", 20001)]);
        let new =
            Ruleset::from_table(&t, 10261).with_udp(ports.iter().map(|(k, p)| (k, *p)), range);
        assert_eq!(
            new.update_script(&old).unwrap(),
            "delete element inet sluice udp-ports-v4 { 10.96.0.10 . 53 }\n\
             add element inet sluice udp-ports-v4 { 10.96.0.10 . 53 : 20005 }\n"
        );
        assert_eq!(new.changes(&old), (1, 1));
        // The endpoints go: the key moves from the port map to the reject
        // verdict in one transaction.
        let mut t2 = table(&["10.96.0.12:53/udp"]);
        t2.insert(
            listen_key("10.96.0.10:53/udp"),
            service("none", false, Settings::default()),
        );
        let gone =
            Ruleset::from_table(&t2, 10261).with_udp(ports.iter().map(|(k, p)| (k, *p)), range);
        let script = gone.update_script(&new).unwrap();
        assert_eq!(
            script,
            "delete element inet sluice udp-ports-v4 { 10.96.0.10 . 53 }\n\
             add element inet sluice no-endpoint-services-v4 { 10.96.0.10 . udp . 53 : goto reject-chain }\n"
        );
        // A changed range changes a rule: a full sync.
        let wider = Ruleset::from_table(&t, 10261)
            .with_udp(ports.iter().map(|(k, p)| (k, *p)), (20000, 20099));
        assert!(
            wider
                .update_script(&new)
                .unwrap()
                .contains("dport 20000-20099")
        );
    }

    /// A TableDiff's keys are enough: the ruleset kept up to date key by
    /// key equals the one built from the whole table, and the key-restricted
    /// ops are the full diff's ops (as a set), and take the old ruleset to
    /// the new one.
    #[test]
    fn key_by_key_updates_match_the_whole_table() {
        let with = |ranges: &[&str]| Settings {
            source_ranges: cidrs(ranges),
            ..Settings::default()
        };
        let drop = Settings {
            no_endpoints: NoEndpoints::Drop,
            ..Settings::default()
        };
        let mut t = table(&[
            "10.96.0.10:80",
            "10.96.0.11:80",
            "[fd00::1]:80",
            "10.96.0.53:53/udp",
        ]);
        t.insert(
            listen_key("203.0.113.8:80"),
            service("lb", true, with(&["10.0.0.0/8"])),
        );
        let ports: BTreeMap<ListenKey, u16> = [(listen_key("10.96.0.53:53/udp"), 20000)].into();
        let mut steps: Vec<(Table, BTreeMap<ListenKey, u16>)> = Vec::new();
        let mut next = t.clone();
        next.insert(
            listen_key("10.96.0.10:80"),
            service("web", false, Settings::default()),
        );
        steps.push((next.clone(), ports.clone()));
        next.insert(listen_key("10.96.0.10:80"), service("web", false, drop));
        next.remove(&listen_key("[fd00::1]:80"));
        steps.push((next.clone(), ports.clone()));
        next.insert(
            listen_key("203.0.113.8:80"),
            service("lb", true, with(&["10.1.0.0/16", "192.168.0.0/24"])),
        );
        next.insert(
            listen_key("10.96.0.12:80"),
            service("new", true, Settings::default()),
        );
        steps.push((next.clone(), ports.clone()));
        next.insert(
            listen_key("10.96.0.53:53/udp"),
            service("dns", false, Settings::default()),
        );
        steps.push((next.clone(), ports.clone()));
        next.insert(
            listen_key("10.96.0.53:53/udp"),
            service("dns", true, Settings::default()),
        );
        steps.push((
            next.clone(),
            [(listen_key("10.96.0.53:53/udp"), 20007)].into(),
        ));
        next.insert(
            listen_key("203.0.113.8:80"),
            service("lb", true, Settings::default()),
        );
        steps.push((next.clone(), ports.clone()));

        let range = (20000, 20009);
        let build = |t: &Table, p: &BTreeMap<ListenKey, u16>| {
            Ruleset::from_table(t, 10261).with_udp(p.iter().map(|(k, v)| (k, *v)), range)
        };
        let mut previous = t.clone();
        let mut kept = build(&t, &ports);
        for (i, (t, ports)) in steps.iter().enumerate() {
            let keys = diff_keys(&TableDiff::between(&previous, t));
            let old = kept.clone();
            kept.update_keys(t, &keys);
            kept.set_udp_ports(ports);
            let whole = build(t, ports);
            assert_eq!(kept, whole, "step {i}");
            let ops = kept.key_ops(&old, &keys).unwrap();
            let mut full = kept.element_ops(&old).unwrap();
            let mut sorted = ops.clone();
            let order = |o: &ElementOp| (o.add, o.item);
            sorted.sort_by_key(order);
            full.sort_by_key(order);
            assert_eq!(sorted, full, "step {i}");
            assert!(!ops.is_empty(), "step {i}");
            let first_add = ops.iter().position(|o| o.add).unwrap_or(ops.len());
            assert!(
                ops[first_add..].iter().all(|o| o.add),
                "deletes first: {ops:?}"
            );
            let mut applied = old;
            applied.apply_ops(&ops);
            assert_eq!(applied, whole, "step {i}");
            previous = t.clone();
        }
    }

    #[test]
    fn steering_replies_is_one_chain_and_a_full_sync_when_it_changes() {
        let plain = Ruleset::from_table(&table(&["10.96.0.10:80"]), 10261);
        // Without transparent dials the chain goes, if an earlier sluice
        // left it (checked against the kernel in tests/nft_netlink.rs).
        let deleted = plain.full_sync_script();
        assert!(deleted.ends_with(
            "flush chain inet sluice steer-replies\n\
             delete chain inet sluice steer-replies\n"
        ));
        assert!(!deleted.contains("add rule inet sluice steer-replies"));
        let steered = plain.clone().with_steer_mark(Some(0x1000));
        let script = steered.full_sync_script();
        assert!(script.contains(
            "add chain inet sluice steer-replies { type filter hook prerouting priority mangle; policy accept; }\n\
             flush chain inet sluice steer-replies\n\
             add rule inet sluice steer-replies meta l4proto tcp socket transparent 1 counter meta mark set meta mark | 0x1000\n"
        ));
        assert_eq!(script.matches("add rule").count(), 20);
        assert_eq!(
            steered.update_script(&plain),
            Some(steered.full_sync_script())
        );
        assert_eq!(steered.update_script(&steered.clone()), None);
    }

    #[test]
    fn the_bridge_table_has_a_rule_per_bridge_and_family() {
        use crate::policy_route::Bridge;
        let bridges = [Bridge {
            name: "cni0".into(),
            mac: [0x02, 0x42, 0xac, 0x11, 0x00, 0x0a],
            subnets: cidrs(&["10.244.0.0/24", "fd00:244::/64"]),
        }];
        assert_eq!(
            bridge_script(0x1000, &bridges),
            "add table bridge sluice\n\
             delete table bridge sluice\n\
             add table bridge sluice\n\
             add chain bridge sluice prerouting { type filter hook prerouting priority 10; policy accept; }\n\
             add rule bridge sluice prerouting ip daddr 10.244.0.0/24 meta mark & 0x1000 == 0x1000 counter ether daddr set 02:42:ac:11:00:0a meta pkttype set host comment \"cni0\"\n\
             add rule bridge sluice prerouting ip6 daddr fd00:244::/64 meta mark & 0x1000 == 0x1000 counter ether daddr set 02:42:ac:11:00:0a meta pkttype set host comment \"cni0\"\n"
        );
        assert_eq!(
            bridge_cleanup_script(),
            "add table bridge sluice\ndelete table bridge sluice\n"
        );
    }

    #[test]
    fn cleanup_deletes_only_sluices_table() {
        assert_eq!(
            cleanup_script(),
            "add table inet sluice\ndelete table inet sluice\n"
        );
    }

    #[tokio::test]
    async fn a_missing_nft_names_the_package() {
        let e = apply_with("/nonexistent/nft", "list tables\n", NFT_TIMEOUT)
            .await
            .unwrap_err();
        assert!(matches!(e, NftError::NotInstalled));
        assert!(e.to_string().contains("`nftables`"), "{e}");
    }

    #[tokio::test]
    async fn a_failed_script_reports_nft_stderr() {
        // A shell script stands in for nft: reads the script, fails with a message.
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("nft");
        std::fs::write(
            &fake,
            "#!/bin/sh\ncat >/dev/null\necho 'Error: boom' >&2\nexit 1\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = apply_with(
            fake.to_str().unwrap(),
            "add table inet sluice\n",
            NFT_TIMEOUT,
        )
        .await
        .unwrap_err();
        let shown = e.to_string();
        assert!(shown.contains("Error: boom"), "{shown}");
        assert!(shown.contains("nft -f -"), "{shown}");
    }

    #[tokio::test]
    async fn a_hung_nft_is_killed_at_its_time_limit() {
        // A stand-in that never reads its script nor exits; it writes its
        // pid so the test can check it was killed, not left behind.
        let dir = tempfile::tempdir().unwrap();
        let (fake, pid_file) = (dir.path().join("nft"), dir.path().join("pid"));
        let body = format!(
            "#!/bin/sh\necho $$ > {}\nexec sleep 30\n",
            pid_file.display()
        );
        std::fs::write(&fake, body).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Larger than a pipe's buffer: the write itself would block.
        let script = "add table inet sluice\n".repeat(10_000);
        // Long enough for the stand-in to write its pid on a busy machine.
        let limit = std::time::Duration::from_secs(2);
        let started = std::time::Instant::now();
        let e = apply_with(fake.to_str().unwrap(), &script, limit)
            .await
            .unwrap_err();
        assert!(matches!(e, NftError::TimedOut(l) if l == limit), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        let pid = std::fs::read_to_string(&pid_file).expect("the stand-in started within 2 s");
        let proc_dir = format!("/proc/{}", pid.trim());
        // The kill is sent on drop; the zombie is reaped by tokio soon after.
        let mut gone = false;
        for _ in 0..100 {
            let state = std::fs::read_to_string(format!("{proc_dir}/stat")).unwrap_or_default();
            if state.is_empty() || state.split_whitespace().nth(2) == Some("Z") {
                gone = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(gone, "the hung nft ({proc_dir}) is still running");
    }
}

//! Which source address a backend sees: the client's own IP (a transparent
//! dial, [`crate::connect::Bind::transparent`]) or the node's.
//!
//! The rule is kube-proxy's masquerade policy (pkg/proxy/nftables/
//! proxier.go), restated for a dial instead of a DNAT: a transparent dial
//! works only when the backend's reply comes back through this node, which
//! is what kube-proxy's masquerading guarantees too. Measured path by path
//! in docs/source-ip.md ("The mechanism per path"):
//!
//! | client → backend | source |
//! |---|---|
//! | local pod → any backend (same node bridged or routed, other node) | client IP |
//! | outside → NodePort/LB/externalIP of an eTP=Local Service | client IP |
//! | outside → eTP=Cluster external address, or a non-local client to a ClusterIP | node (`not_local`) |
//! | a pod to its own Service landing on itself (hairpin) | node (`hairpin`) |
//! | local pod → backend on the same pod bridge while `bridge-nf-call-iptables=0` | node (`bridge_unsteered`) |
//! | `--source-ip=node`, or transparent dials unavailable | node (`disabled`) |
//!
//! "Local pod" is kube-proxy's `--detect-local-mode`, decided here on the
//! peer address (the `redirect` keeps the client's source): `NodeCIDR`
//! (sluice's default: this node's `spec.podCIDRs`, published with the
//! table), `ClusterCIDR` (`--cluster-cidr`), or `BridgeInterface` /
//! `InterfaceNamePrefix` (the main table's routes over the pod interfaces,
//! read over netlink by [`crate::policy_route::follow_bridges`]: a client
//! arrives on the interface the node routes it over). sluice's default differs
//! from kube-proxy's (`ClusterCIDR`) on purpose: a pod of another node
//! reaching a NodePort here is inside the cluster CIDR, but its replies do
//! not come back here, so a transparent dial for it would hang.
//!
//! The decision allocates nothing and makes no system call: a few CIDR
//! matches on the peer and one pointer load.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use sluice_control::Cidr;

/// Why a connection is dialed from the node's address
/// (`sluice_source_ip_node_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeReason {
    /// The client is the backend itself (a pod reaching its own Service):
    /// a packet from its own address would be dropped as martian.
    Hairpin,
    /// Neither a pod of this node nor an outside client of an
    /// `externalTrafficPolicy: Local` entry: the reply would not come back
    /// through this node.
    NotLocal,
    /// Client and backend on one pod bridge whose frames the ip hooks do
    /// not see (`bridge-nf-call-iptables=0`): the reply cannot be steered.
    BridgeUnsteered,
    /// `--source-ip=node`, or transparent dials are unavailable here.
    Disabled,
}

impl NodeReason {
    pub const ALL: [NodeReason; 4] = [
        NodeReason::Hairpin,
        NodeReason::NotLocal,
        NodeReason::BridgeUnsteered,
        NodeReason::Disabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeReason::Hairpin => "hairpin",
            NodeReason::NotLocal => "not_local",
            NodeReason::BridgeUnsteered => "bridge_unsteered",
            NodeReason::Disabled => "disabled",
        }
    }
}

/// The source of one dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Bind the client's address (transparent).
    Client(IpAddr),
    /// Let routing pick the node's address.
    Node(NodeReason),
}

/// `--detect-local-mode`: what makes a client a pod of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetectLocal {
    /// In this node's `spec.podCIDRs` (published with the table).
    NodeCidr,
    /// In one of these (`--cluster-cidr`); none: nothing is local, as in
    /// kube-proxy.
    ClusterCidr(Vec<Cidr>),
    /// `BridgeInterface` / `InterfaceNamePrefix`: routed by this node over
    /// a matching interface (the main table's routes, re-read with the pod
    /// bridges: [`SourceIp::set_interface_cidrs`]). Routing is symmetric
    /// for pods (rp_filter enforces it), so the clients that arrive on an
    /// interface are those routed to over it.
    Interfaces(InterfaceMatch),
}

/// Which interfaces carry this node's pods (kube-proxy's
/// `--pod-bridge-interface` / `--pod-interface-name-prefix`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterfaceMatch {
    /// This exact name (a bridge CNI's `cni0`, `cbr0`).
    Bridge(String),
    /// Names that start with this (Calico's `cali`, one veth per pod).
    Prefix(String),
}

impl InterfaceMatch {
    pub fn matches(&self, name: &str) -> bool {
        match self {
            InterfaceMatch::Bridge(b) => name == b,
            InterfaceMatch::Prefix(p) => name.starts_with(p.as_str()),
        }
    }
}

/// The local pod networks for [`DetectLocal::Interfaces`]: the
/// destinations of `routes` (the main table's unicast, link- or
/// universe-scope routes, with their output interface's name) whose
/// interface matches, without default routes and IPv6 link-local
/// (`fe80::/64` is routed on every interface), sorted, without duplicates.
pub fn local_cidrs(routes: &[(Cidr, String)], m: &InterfaceMatch) -> Vec<Cidr> {
    let mut out: Vec<Cidr> = routes
        .iter()
        .filter(|(c, dev)| {
            let link_local = matches!(c.addr(), IpAddr::V6(v6) if v6.is_unicast_link_local());
            c.prefix() > 0 && !link_local && m.matches(dev)
        })
        .map(|(c, _)| *c)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What a dial needs to know about the client and the entry it reached.
#[derive(Debug, Clone, Copy)]
pub struct Dial<'a> {
    pub client: IpAddr,
    pub backend: IpAddr,
    /// The entry's [`sluice_control::Settings::keep_external_client_ip`].
    pub keep_external_client_ip: bool,
    /// This node's pod networks (the table's
    /// [`sluice_control::Table::local_pod_cidrs`]).
    pub node_pod_cidrs: &'a [Cidr],
}

/// The data plane's source-address state: the detector (fixed at start),
/// whether transparent dials are on (set once the node's routing is in
/// place) and the pod-bridge subnets whose replies cannot be steered
/// (re-read with each sync of the bridge rules).
#[derive(Debug)]
pub struct SourceIp {
    detect: DetectLocal,
    enabled: AtomicBool,
    unsteered: ArcSwap<Vec<Cidr>>,
    /// [`DetectLocal::Interfaces`]: the matching interfaces' routes (empty
    /// until the first read: nothing local, dials from the node).
    interface_cidrs: ArcSwap<Vec<Cidr>>,
}

impl SourceIp {
    /// Disabled until [`Self::enable`].
    pub fn new(detect: DetectLocal) -> Self {
        Self {
            detect,
            enabled: AtomicBool::new(false),
            unsteered: ArcSwap::from_pointee(Vec::new()),
            interface_cidrs: ArcSwap::from_pointee(Vec::new()),
        }
    }

    /// Transparent dials on (`true`) or off.
    pub fn enable(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn detect(&self) -> &DetectLocal {
        &self.detect
    }

    /// The pod-bridge subnets whose bridged replies cannot be steered
    /// (their bridge's `bridge-nf-call-iptables`/`-ip6tables` is 0).
    pub fn set_unsteered(&self, subnets: Vec<Cidr>) {
        if **self.unsteered.load() != subnets {
            self.unsteered.store(Arc::new(subnets));
        }
    }

    /// With [`DetectLocal::Interfaces`]: the pod networks routed over the
    /// matching interfaces ([`local_cidrs`]).
    pub fn set_interface_cidrs(&self, cidrs: Vec<Cidr>) {
        if **self.interface_cidrs.load() != cidrs {
            self.interface_cidrs.store(Arc::new(cidrs));
        }
    }

    /// The source for one dial.
    pub fn choose(&self, dial: &Dial<'_>) -> Source {
        if !self.is_enabled() {
            return Source::Node(NodeReason::Disabled);
        }
        let unsteered = self.unsteered.load();
        match &self.detect {
            DetectLocal::NodeCidr => choose(dial, dial.node_pod_cidrs, &unsteered),
            DetectLocal::ClusterCidr(cidrs) => choose(dial, cidrs, &unsteered),
            DetectLocal::Interfaces(_) => choose(dial, &self.interface_cidrs.load(), &unsteered),
        }
    }
}

/// The pure rule (see the module docs): `local_cidrs` say which clients
/// are pods of this node, `unsteered` which pod-bridge subnets cannot have
/// their replies steered.
pub fn choose(dial: &Dial<'_>, local_cidrs: &[Cidr], unsteered: &[Cidr]) -> Source {
    let client = dial.client;
    if client == dial.backend {
        return Source::Node(NodeReason::Hairpin);
    }
    // A loopback peer cannot be a source on the wire (only towards a
    // loopback backend: `sluice-bench compare`), nor an unspecified one,
    // and a dial across families cannot bind the client.
    if (client.is_loopback() && !dial.backend.is_loopback())
        || client.is_unspecified()
        || client.is_ipv4() != dial.backend.is_ipv4()
    {
        return Source::Node(NodeReason::NotLocal);
    }
    let local_pod = local_cidrs.iter().any(|c| c.contains(client));
    if !local_pod && !dial.keep_external_client_ip {
        return Source::Node(NodeReason::NotLocal);
    }
    let same_bridge = |c: &Cidr| c.contains(client) && c.contains(dial.backend);
    if unsteered.iter().any(same_bridge) {
        return Source::Node(NodeReason::BridgeUnsteered);
    }
    Source::Client(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidrs(v: &[&str]) -> Vec<Cidr> {
        v.iter().map(|c| c.parse().unwrap()).collect()
    }

    /// The topology of docs/source-ip.md: this node's pods 10.244.0.0/24
    /// (a bridge) and 10.244.1.0/24 (routed), fd00:244::/64; node2's pods
    /// 10.244.2.0/24; outside 192.168.50.1.
    const PODS: &[&str] = &["10.244.0.0/23", "fd00:244::/64"];
    const BRIDGE: &[&str] = &["10.244.0.0/24", "fd00:244::/64"];

    fn source(client: &str, backend: &str, keep: bool, unsteered: &[&str]) -> Source {
        let dial = Dial {
            client: ip(client),
            backend: ip(backend),
            keep_external_client_ip: keep,
            node_pod_cidrs: &[],
        };
        choose(&dial, &cidrs(PODS), &cidrs(unsteered))
    }

    #[test]
    fn a_local_pod_keeps_its_ip_for_any_backend() {
        for (client, backend) in [
            ("10.244.0.10", "10.244.0.20"), // same bridge
            ("10.244.1.10", "10.244.0.20"), // routed pod -> bridged backend
            ("10.244.0.10", "10.244.2.20"), // backend on another node
            ("fd00:244::10", "fd00:244::20"),
        ] {
            for keep in [false, true] {
                assert_eq!(
                    source(client, backend, keep, &[]),
                    Source::Client(ip(client)),
                    "{client} -> {backend}"
                );
            }
        }
    }

    #[test]
    fn an_outside_client_keeps_its_ip_only_for_local_policy_entries() {
        assert_eq!(
            source("192.168.50.1", "10.244.0.20", true, &[]),
            Source::Client(ip("192.168.50.1"))
        );
        assert_eq!(
            source("fd00:50::1", "fd00:244::20", true, &[]),
            Source::Client(ip("fd00:50::1"))
        );
        // eTP=Cluster (or a ClusterIP reached from outside the pods).
        assert_eq!(
            source("192.168.50.1", "10.244.2.20", false, &[]),
            Source::Node(NodeReason::NotLocal)
        );
        // A pod of another node: inside the cluster, not local here.
        assert_eq!(
            source("10.244.2.30", "10.244.0.20", false, &[]),
            Source::Node(NodeReason::NotLocal)
        );
    }

    #[test]
    fn hairpin_is_dialed_from_the_node() {
        for keep in [false, true] {
            assert_eq!(
                source("10.244.0.10", "10.244.0.10", keep, &[]),
                Source::Node(NodeReason::Hairpin)
            );
        }
    }

    #[test]
    fn the_node_itself_is_dialed_from_the_node() {
        for client in ["127.0.0.1", "::1", "0.0.0.0"] {
            assert_eq!(
                source(client, "10.244.0.20", true, &[]),
                Source::Node(NodeReason::NotLocal),
                "{client}"
            );
        }
        // Loopback to loopback (a benchmark on one host) binds, if local.
        let lo = Dial {
            client: ip("127.0.0.1"),
            backend: ip("127.0.5.1"),
            keep_external_client_ip: false,
            node_pod_cidrs: &[],
        };
        assert_eq!(
            choose(&lo, &cidrs(&["127.0.0.0/8"]), &[]),
            Source::Client(lo.client)
        );
        // An IPv4 client to an IPv6 backend cannot be bound.
        assert_eq!(
            source("10.244.0.10", "fd00:244::20", false, &[]),
            Source::Node(NodeReason::NotLocal)
        );
    }

    #[test]
    fn an_unsteered_bridge_falls_back_only_within_itself() {
        assert_eq!(
            source("10.244.0.10", "10.244.0.20", false, BRIDGE),
            Source::Node(NodeReason::BridgeUnsteered)
        );
        assert_eq!(
            source("fd00:244::10", "fd00:244::20", false, BRIDGE),
            Source::Node(NodeReason::BridgeUnsteered)
        );
        // Routed through the node either way: steered by the ip rule.
        for (client, backend) in [
            ("10.244.1.10", "10.244.0.20"),
            ("10.244.0.10", "10.244.2.20"),
            ("192.168.50.1", "10.244.0.20"),
        ] {
            assert_eq!(
                source(client, backend, true, BRIDGE),
                Source::Client(ip(client)),
                "{client} -> {backend}"
            );
        }
    }

    #[test]
    fn disabled_and_detectors() {
        let dial = Dial {
            client: ip("10.244.0.10"),
            backend: ip("10.244.2.20"),
            keep_external_client_ip: false,
            node_pod_cidrs: &cidrs(&["10.244.0.0/24"]),
        };
        let node_cidr = SourceIp::new(DetectLocal::NodeCidr);
        assert_eq!(node_cidr.choose(&dial), Source::Node(NodeReason::Disabled));
        node_cidr.enable(true);
        assert_eq!(node_cidr.choose(&dial), Source::Client(dial.client));
        // Before the Node's pod CIDRs are known nothing is local.
        let unknown = Dial {
            node_pod_cidrs: &[],
            ..dial
        };
        assert_eq!(
            node_cidr.choose(&unknown),
            Source::Node(NodeReason::NotLocal)
        );
        // ClusterCIDR ignores the node's CIDRs; without any, nothing is local.
        let cluster = SourceIp::new(DetectLocal::ClusterCidr(cidrs(&["10.244.0.0/16"])));
        cluster.enable(true);
        assert_eq!(cluster.choose(&unknown), Source::Client(dial.client));
        let none = SourceIp::new(DetectLocal::ClusterCidr(Vec::new()));
        none.enable(true);
        assert_eq!(none.choose(&dial), Source::Node(NodeReason::NotLocal));
        // The unsteered subnets follow the bridge sync.
        let same_bridge = Dial {
            backend: ip("10.244.0.20"),
            ..dial
        };
        assert_eq!(node_cidr.choose(&same_bridge), Source::Client(dial.client));
        node_cidr.set_unsteered(cidrs(&["10.244.0.0/24"]));
        assert_eq!(
            node_cidr.choose(&same_bridge),
            Source::Node(NodeReason::BridgeUnsteered)
        );
        node_cidr.enable(false);
        assert_eq!(
            node_cidr.choose(&same_bridge),
            Source::Node(NodeReason::Disabled)
        );
    }

    fn routes(v: &[(&str, &str)]) -> Vec<(Cidr, String)> {
        v.iter()
            .map(|(c, dev)| (c.parse().unwrap(), dev.to_string()))
            .collect()
    }

    #[test]
    fn interface_routes_to_local_cidrs() {
        // A node with a bridge CNI (cni0), Calico veths and an uplink.
        let table = routes(&[
            ("0.0.0.0/0", "cni0"),
            ("10.244.0.0/24", "cni0"),
            ("fd00:244::/64", "cni0"),
            ("fe80::/64", "cni0"),
            ("10.244.1.7/32", "calia1b2c3"),
            ("10.244.1.9/32", "cali99"),
            ("10.244.1.7/32", "calia1b2c3"),
            ("fd00:245::7/128", "calia1b2c3"),
            ("192.168.50.0/24", "eth0"),
            ("10.244.5.0/24", "cni0x"),
        ]);
        let bridge = InterfaceMatch::Bridge("cni0".into());
        assert_eq!(
            local_cidrs(&table, &bridge),
            cidrs(&["10.244.0.0/24", "fd00:244::/64"])
        );
        let prefix = InterfaceMatch::Prefix("cali".into());
        assert_eq!(
            local_cidrs(&table, &prefix),
            cidrs(&["10.244.1.7/32", "10.244.1.9/32", "fd00:245::7/128"])
        );
        assert_eq!(
            local_cidrs(&table, &InterfaceMatch::Bridge("cni".into())),
            Vec::<Cidr>::new()
        );
        assert!(InterfaceMatch::Prefix("cni0".into()).matches("cni0x"));
    }

    #[test]
    fn interface_detector_follows_the_routes() {
        let s = SourceIp::new(DetectLocal::Interfaces(InterfaceMatch::Prefix(
            "cali".into(),
        )));
        s.enable(true);
        let dial = Dial {
            client: ip("10.244.1.7"),
            backend: ip("10.244.2.20"),
            keep_external_client_ip: false,
            // Ignored by this detector.
            node_pod_cidrs: &cidrs(&["10.244.0.0/16"]),
        };
        // Before the first read nothing is local.
        assert_eq!(s.choose(&dial), Source::Node(NodeReason::NotLocal));
        s.set_interface_cidrs(cidrs(&["10.244.1.7/32"]));
        assert_eq!(s.choose(&dial), Source::Client(dial.client));
        let other = Dial {
            client: ip("10.244.1.8"),
            ..dial
        };
        assert_eq!(s.choose(&other), Source::Node(NodeReason::NotLocal));
        // The pod went away: its route with it.
        s.set_interface_cidrs(Vec::new());
        assert_eq!(s.choose(&dial), Source::Node(NodeReason::NotLocal));
    }
}

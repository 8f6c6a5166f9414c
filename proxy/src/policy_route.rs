//! The node's routing for transparent dials: replies to the client's
//! address are delivered to sluice's socket instead of being routed on.
//!
//! ```text
//! ip rule add fwmark MARK/MARK lookup TABLE pref TABLE
//! ip route add local 0.0.0.0/0 dev lo table TABLE
//! ip -6 rule add fwmark MARK/MARK lookup TABLE pref TABLE
//! ip -6 route add local ::/0 dev lo table TABLE
//! ```
//!
//! The mark is set by the `steer-replies` chain of sluice's nftables table
//! (`socket transparent 1`, i.e. only on packets of a transparent socket)
//! and, for a backend on the same pod bridge, by `table bridge sluice`
//! (see [`crate::nft::bridge_script`]). MARK and TABLE are
//! `--transparent-mark` and `--transparent-route-table`.
//!
//! Everything goes through rtnetlink, as [`crate::vip`] does. [`install`]
//! is idempotent (a rule that exists is kept, the route is replaced);
//! [`remove`] deletes the rules of that priority and mark and the route,
//! and is what `--cleanup` and a clean exit run. Also here: the pod
//! bridges (name, MAC, IPv4/IPv6 subnets) that the bridge rules need,
//! read over netlink at each sync ([`bridges`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
use rtnetlink::packet_route::route::{RouteScope, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};
use sluice_control::Cidr;

/// The fwmark bit and the table (also the rule priority).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyRoute {
    pub mark: u32,
    pub table: u32,
}

/// A netlink connection for one batch of requests; the connection task
/// ends with the handle.
fn connect() -> Result<(Handle, tokio::task::JoinHandle<()>), String> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| format!("cannot open a netlink socket: {e}"))?;
    Ok((handle, tokio::spawn(connection)))
}

impl PolicyRoute {
    /// Installs the rule and the local route for both families. IPv4 is
    /// required; an IPv6 failure (IPv6 disabled on the node) is returned
    /// as a warning in `Ok`.
    pub async fn install(&self) -> Result<Option<String>, String> {
        let (handle, task) = connect()?;
        let result = self.install_with(&handle).await;
        task.abort();
        result
    }

    async fn install_with(&self, handle: &Handle) -> Result<Option<String>, String> {
        let lo = link_index(handle, "lo").await?;
        self.install_family(handle, lo, IpVersion::V4)
            .await
            .map_err(|e| format!("IPv4: {e}"))?;
        Ok(self
            .install_family(handle, lo, IpVersion::V6)
            .await
            .err()
            .map(|e| format!("IPv6 transparent dials unavailable: {e}")))
    }

    async fn install_family(&self, handle: &Handle, lo: u32, v: IpVersion) -> Result<(), String> {
        let have = self.our_rules(handle, v.clone()).await?;
        let exact = have.len() == 1
            && have.iter().all(|r| {
                let attrs = &r.attributes;
                attrs.contains(&RuleAttribute::FwMark(self.mark))
                    && attrs.contains(&RuleAttribute::FwMask(self.mark))
            });
        if !exact {
            // Another mark or table under our priority (flags changed):
            // replaced.
            for rule in have {
                let _ = handle.rule().del(rule).execute().await;
            }
            let mut message = RuleMessage::default();
            message.header.family = match v {
                IpVersion::V4 => AddressFamily::Inet,
                IpVersion::V6 => AddressFamily::Inet6,
            };
            message.header.action = RuleAction::ToTable;
            message.attributes = vec![
                RuleAttribute::Priority(self.table),
                RuleAttribute::FwMark(self.mark),
                RuleAttribute::FwMask(self.mark),
                RuleAttribute::Table(self.table),
            ];
            add_rule(handle, message).await.map_err(|e| {
                format!(
                    "ip rule add fwmark {:#x}/{:#x} lookup {} pref {}: {e}",
                    self.mark, self.mark, self.table, self.table
                )
            })?;
        }
        let route = match v {
            IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .output_interface(lo)
                .table_id(self.table)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .build(),
            IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                .output_interface(lo)
                .table_id(self.table)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .build(),
        };
        handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(|e| {
                format!(
                    "ip route add local default dev lo table {}: {e}",
                    self.table
                )
            })
    }

    /// The rules with our priority that look up our table (whatever their
    /// mark: a previous run's flags).
    async fn our_rules(&self, handle: &Handle, v: IpVersion) -> Result<Vec<RuleMessage>, String> {
        let rules: Vec<RuleMessage> = handle
            .rule()
            .get(v)
            .execute()
            .try_collect()
            .await
            .map_err(|e| format!("cannot list ip rules: {e}"))?;
        Ok(rules
            .into_iter()
            .filter(|r| r.attributes.contains(&RuleAttribute::Priority(self.table)))
            .filter(|r| {
                r.attributes.contains(&RuleAttribute::Table(self.table))
                    || u32::from(r.header.table) == self.table
            })
            .collect())
    }

    /// Deletes the rules and routes [`Self::install`] adds (what exists of
    /// them, whatever mark a previous run used), both families. Errors name what could not be removed.
    pub async fn remove(&self) -> Result<(), String> {
        let (handle, task) = connect()?;
        let mut errors = Vec::new();
        for v in [IpVersion::V4, IpVersion::V6] {
            match self.our_rules(&handle, v.clone()).await {
                Ok(rules) => {
                    for rule in rules {
                        if let Err(e) = handle.rule().del(rule).execute().await {
                            errors.push(format!("ip rule del pref {}: {e}", self.table));
                        }
                    }
                }
                Err(e) if v == IpVersion::V6 => tracing::debug!("{e}"),
                Err(e) => errors.push(e),
            }
            if let Err(e) = self.flush_table(&handle, v).await {
                errors.push(e);
            }
        }
        task.abort();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Deletes every route of our table in one family.
    async fn flush_table(&self, handle: &Handle, v: IpVersion) -> Result<(), String> {
        let filter = match v {
            IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
                .table_id(self.table)
                .build(),
            IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
                .table_id(self.table)
                .build(),
        };
        let routes: Vec<_> = match handle.route().get(filter).execute().try_collect().await {
            Ok(r) => r,
            Err(_) if v == IpVersion::V6 => return Ok(()),
            Err(e) => return Err(format!("cannot list routes: {e}")),
        };
        for route in routes {
            if route_table(&route) != self.table {
                continue;
            }
            if let Err(e) = handle.route().del(route).execute().await {
                return Err(format!("ip route flush table {}: {e}", self.table));
            }
        }
        Ok(())
    }
}

/// Adds a rule message as is (`ip rule add`).
async fn add_rule(handle: &Handle, message: RuleMessage) -> Result<(), rtnetlink::Error> {
    use futures_util::StreamExt;
    use rtnetlink::packet_core::{
        NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
    };
    use rtnetlink::packet_route::RouteNetlinkMessage;
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewRule(message));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE;
    let mut handle = handle.clone();
    let mut response = handle.request(req)?;
    while let Some(message) = response.next().await {
        if let NetlinkPayload::Error(e) = message.payload {
            return Err(rtnetlink::Error::NetlinkError(e));
        }
    }
    Ok(())
}

/// The table a route is in (the attribute, for tables above 255).
fn route_table(route: &rtnetlink::packet_route::route::RouteMessage) -> u32 {
    use rtnetlink::packet_route::route::RouteAttribute;
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

/// Every link of the namespace (`ip link`).
async fn all_links(
    handle: &Handle,
) -> Result<Vec<rtnetlink::packet_route::link::LinkMessage>, String> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| format!("cannot list links: {e}"))
}

async fn link_index(handle: &Handle, name: &str) -> Result<u32, String> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) => Err(format!("no device {name}")),
        Err(e) => Err(format!("cannot look up device {name}: {e}")),
    }
}

/// A Linux bridge with addresses: a pod bridge (cni0, cbr0, docker0...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    pub name: String,
    pub mac: [u8; 6],
    /// The networks of the bridge's own addresses (the pods behind it).
    pub subnets: Vec<Cidr>,
}

/// The bridges of this network namespace that carry an address (a bridge
/// without one carries no pods sluice could be asked to serve).
#[cfg(test)]
async fn bridges() -> Result<Vec<Bridge>, String> {
    read_node(false).await.1
}

/// One read of the node for [`follow_bridges`]: one netlink connection
/// and one dump of the links for both the pod bridges and, when
/// `routes`, the routes over the pod interfaces ([`interface_routes_with`]).
async fn read_node(
    routes: bool,
) -> (
    Option<Result<Vec<(Cidr, String)>, String>>,
    Result<Vec<Bridge>, String>,
) {
    let (handle, task) = match connect() {
        Ok(c) => c,
        Err(e) => return (routes.then(|| Err(e.clone())), Err(e)),
    };
    let read = match all_links(&handle).await {
        Ok(links) => {
            let routes = match routes {
                true => Some(interface_routes_with(&handle, &links).await),
                false => None,
            };
            (routes, bridges_with(&handle, &links).await)
        }
        Err(e) => (routes.then(|| Err(e.clone())), Err(e)),
    };
    task.abort();
    read
}

async fn bridges_with(
    handle: &Handle,
    links: &[rtnetlink::packet_route::link::LinkMessage],
) -> Result<Vec<Bridge>, String> {
    let mut found: Vec<(u32, Bridge)> = Vec::new();
    for link in links {
        let mut name = None;
        let mut mac = None;
        let mut is_bridge = false;
        for a in &link.attributes {
            match a {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::Address(m) if m.len() == 6 => {
                    let mut b = [0u8; 6];
                    b.copy_from_slice(m);
                    mac = Some(b);
                }
                LinkAttribute::LinkInfo(infos) => {
                    is_bridge |= infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge)));
                }
                _ => {}
            }
        }
        if let (true, Some(name), Some(mac)) = (is_bridge, name, mac) {
            found.push((
                link.header.index,
                Bridge {
                    name,
                    mac,
                    subnets: Vec::new(),
                },
            ));
        }
    }
    if found.is_empty() {
        return Ok(Vec::new());
    }
    let addresses: Vec<_> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| format!("cannot list addresses: {e}"))?;
    for a in addresses {
        let Some((_, bridge)) = found.iter_mut().find(|(i, _)| *i == a.header.index) else {
            continue;
        };
        let ip: Option<IpAddr> = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let ip = ip.or_else(|| {
            a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        let Some(ip) = ip else { continue };
        // Link-local IPv6 (fe80::/64) is on every bridge: no pods there.
        let link_local = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
        if link_local || a.header.family == AddressFamily::Unspec {
            continue;
        }
        if let Some(c) = Cidr::new(ip, a.header.prefix_len)
            && !bridge.subnets.contains(&c)
        {
            bridge.subnets.push(c);
        }
    }
    let mut bridges: Vec<Bridge> = found
        .into_iter()
        .map(|(_, b)| b)
        .filter(|b| !b.subnets.is_empty())
        .collect();
    for b in &mut bridges {
        b.subnets.sort();
    }
    bridges.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(bridges)
}

#[cfg(test)]
async fn interface_routes() -> Result<Vec<(Cidr, String)>, String> {
    read_node(true)
        .await
        .0
        .unwrap_or_else(|| Err("routes not read".into()))
}

/// The main routing table's unicast routes of link or universe scope (both
/// families), each with its output interface's name (`ip route show dev
/// NAME`): what [`crate::source_ip::local_cidrs`] matches for
/// `--detect-local-mode BridgeInterface`/`InterfaceNamePrefix`. Routes
/// without one output interface (multipath, blackhole) are left out. An
/// IPv6 dump failure (IPv6 disabled) yields the IPv4 routes only.
async fn interface_routes_with(
    handle: &Handle,
    links: &[rtnetlink::packet_route::link::LinkMessage],
) -> Result<Vec<(Cidr, String)>, String> {
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader};
    let names: std::collections::HashMap<u32, String> = links
        .iter()
        .filter_map(|l| {
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some((l.header.index, n.clone())),
                _ => None,
            })
        })
        .collect();
    let mut out = Vec::new();
    for v in [IpVersion::V4, IpVersion::V6] {
        let filter = match v {
            IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
            IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        };
        let routes: Vec<_> = match handle.route().get(filter).execute().try_collect().await {
            Ok(r) => r,
            Err(e) if v == IpVersion::V6 => {
                tracing::debug!("cannot list IPv6 routes: {e}");
                continue;
            }
            Err(e) => return Err(format!("cannot list routes: {e}")),
        };
        for route in routes {
            let h = &route.header;
            if route_table(&route) != u32::from(RouteHeader::RT_TABLE_MAIN)
                || h.kind != RouteType::Unicast
                || !matches!(h.scope, RouteScope::Link | RouteScope::Universe)
            {
                continue;
            }
            let mut dst: Option<IpAddr> = None;
            let mut oif = None;
            for a in &route.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                        dst = Some(IpAddr::V4(*ip))
                    }
                    RouteAttribute::Destination(RouteAddress::Inet6(ip)) => {
                        dst = Some(IpAddr::V6(*ip))
                    }
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let (Some(dst), Some(name)) = (dst, oif.and_then(|i| names.get(&i))) else {
                continue;
            };
            if let Some(c) = Cidr::new(dst, h.destination_prefix_length) {
                out.push((c, name.clone()));
            }
        }
    }
    Ok(out)
}

/// Whether the ip hooks see bridged frames of a family
/// (`/proc/sys/net/bridge/bridge-nf-call-iptables`, `-ip6tables`): the
/// bridge rule keys on a mark the ip prerouting hooks set, so without it
/// replies within one bridge cannot be steered. A missing file
/// (br_netfilter not loaded) reads as `false`.
pub fn bridge_nf_call(ipv4: bool) -> bool {
    let file = if ipv4 {
        "/proc/sys/net/bridge/bridge-nf-call-iptables"
    } else {
        "/proc/sys/net/bridge/bridge-nf-call-ip6tables"
    };
    std::fs::read_to_string(file).is_ok_and(|s| s.trim() == "1")
}

/// Turns transparent dials on if this node allows them: `IP_TRANSPARENT`
/// is permitted (CAP_NET_ADMIN) and the rule and route are in place.
/// `Ok(Some(warning))`: on for IPv4 only. `Err(reason)`: left off, every
/// dial from the node's address (the caller logs it once and shows it on
/// /healthz).
pub async fn enable_transparent(
    route: PolicyRoute,
    source_ip: &crate::source_ip::SourceIp,
) -> Result<Option<String>, String> {
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| format!("cannot open a socket: {e}"))?;
    probe
        .set_ip_transparent_v4(true)
        .map_err(|e| format!("IP_TRANSPARENT refused ({e}): sluice needs CAP_NET_ADMIN"))?;
    let warning = route.install().await?;
    source_ip.enable(true);
    Ok(warning)
}

/// The publish-driven half of [`follow_bridges`], for
/// [`crate::reconcile::run`]: each table change wakes the bridge re-read
/// (a pod that came or went may have moved a bridge's MAC). The re-read
/// itself runs in [`follow_bridges`]'s task, at most once a second, so a
/// burst of publishes never holds up the other followers behind netlink
/// dumps; the 10 s resync is its own clock there.
pub struct BridgeFollower {
    wake: std::sync::Arc<tokio::sync::Notify>,
}

impl BridgeFollower {
    /// Spawns [`follow_bridges`] (until `stop`) and returns what wakes it.
    pub fn start(
        mark: u32,
        source_ip: std::sync::Arc<crate::source_ip::SourceIp>,
        stop: tokio_util::sync::CancellationToken,
    ) -> Self {
        let wake = std::sync::Arc::new(tokio::sync::Notify::new());
        tokio::spawn(follow_bridges(mark, source_ip, wake.clone(), stop));
        Self { wake }
    }
}

impl crate::reconcile::Follower for BridgeFollower {
    fn apply<'a>(
        &'a mut self,
        _diff: &'a sluice_control::TableDiff,
        _table: &'a sluice_control::Table,
    ) -> futures_util::future::BoxFuture<'a, bool> {
        // A wake-up stored while the loop is busy is taken at its next wait.
        self.wake.notify_one();
        Box::pin(std::future::ready(true))
    }
}

/// Keeps `table bridge sluice` equal to the pod bridges of the node (their
/// MAC moves when ports come and go: re-read when `wake` is notified, at
/// each table change ([`BridgeFollower`]), and every [`BRIDGE_RESYNC`]),
/// and tells `source_ip` which bridge subnets cannot be steered
/// (`bridge-nf-call-iptables`/`-ip6tables` is 0) and, with
/// [`crate::source_ip::DetectLocal::Interfaces`], which networks are
/// routed over the pod interfaces ([`interface_routes_with`]), until `stop`.
pub async fn follow_bridges(
    mark: u32,
    source_ip: std::sync::Arc<crate::source_ip::SourceIp>,
    wake: std::sync::Arc<tokio::sync::Notify>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut applied: Option<String> = None;
    let mut failing = false;
    let interfaces = match source_ip.detect() {
        crate::source_ip::DetectLocal::Interfaces(m) => Some(m.clone()),
        _ => None,
    };
    let mut routes_failing = false;
    loop {
        // --detect-local-mode BridgeInterface/InterfaceNamePrefix: the
        // local pods are the routes over the pod interfaces (a Calico pod
        // gets its /32 when it starts). On a failed read the last good
        // list stays.
        let (routes, bridges) = read_node(interfaces.is_some()).await;
        if let (Some(m), Some(routes)) = (&interfaces, routes) {
            match routes {
                Ok(routes) => {
                    routes_failing = false;
                    source_ip.set_interface_cidrs(crate::source_ip::local_cidrs(&routes, m));
                }
                Err(e) if !routes_failing => {
                    routes_failing = true;
                    tracing::warn!(
                        "cannot read the routes over the pod interfaces ({m:?}): {e}; \
                         keeping the last read, retrying"
                    );
                }
                Err(_) => {}
            }
        }
        let outcome = match bridges {
            Ok(found) => {
                let v4 = bridge_nf_call(true);
                let v6 = bridge_nf_call(false);
                let unsteered: Vec<Cidr> = (found.iter())
                    .flat_map(|b| b.subnets.iter().copied())
                    .filter(|c| if c.is_ipv4() { !v4 } else { !v6 })
                    .collect();
                source_ip.set_unsteered(unsteered);
                let script = crate::nft::bridge_script(mark, &found);
                if applied.as_ref() == Some(&script) {
                    Ok(())
                } else {
                    match crate::nft::apply(&script).await {
                        Ok(()) => {
                            let names: Vec<&str> = found.iter().map(|b| b.name.as_str()).collect();
                            tracing::info!(table = crate::nft::BRIDGE_TABLE, bridges = ?names, "reply steering for pod bridges synced");
                            applied = Some(script);
                            Ok(())
                        }
                        Err(e) => Err(format!("cannot sync {}: {e}", crate::nft::BRIDGE_TABLE)),
                    }
                }
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(
                    "transparent dials to backends on a pod bridge may hang: {e}; retrying"
                );
            }
            Err(_) => {}
        }
        // At most one netlink dump per second, however often tables are
        // published (endpoint churn): a wake-up during this second is kept
        // (`notify_one` stores it) and served right after it.
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            () = stop.cancelled() => return,
        }
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(BRIDGE_RESYNC - std::time::Duration::from_secs(1)) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// How often the pod bridges are re-read without a table change.
pub const BRIDGE_RESYNC: std::time::Duration = std::time::Duration::from_secs(10);

/// At exit: removes the rule, the route and `table bridge sluice`, unless
/// another process (the sluice replacing this one) listens on
/// `intercept_port`: its transparent connections need them.
pub async fn remove_at_exit(route: PolicyRoute, intercept_port: u16) {
    if crate::listener::port_listened(intercept_port) {
        tracing::info!(
            port = intercept_port,
            "another process listens on the intercept port (the sluice replacing this one?): \
             leaving the transparent-dial routing to it"
        );
        return;
    }
    remove_all(route).await;
}

/// Removes the rule, the route and `table bridge sluice` (exit and
/// `--cleanup`); false when something could not be removed (logged).
pub async fn remove_all(route: PolicyRoute) -> bool {
    let mut ok = true;
    if let Err(e) = route.remove().await {
        tracing::warn!("cannot remove the transparent-dial routing: {e}");
        ok = false;
    }
    match crate::nft::apply(&crate::nft::bridge_cleanup_script()).await {
        Ok(()) => {}
        Err(crate::nft::NftError::NotInstalled) => {}
        Err(e) => {
            tracing::warn!("cannot remove {}: {e}", crate::nft::BRIDGE_TABLE);
            ok = false;
        }
    }
    if ok {
        tracing::info!(
            table = route.table,
            "removed the transparent-dial routing (ip rule, route table, table bridge sluice)"
        );
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_testkit::netns::{self, Netns};
    use std::time::Duration;

    fn ip_out(ns: &str, args: &[&str]) -> String {
        let out = std::process::Command::new("ip")
            .args(["-n", ns])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Root only: install is idempotent and replaces a rule of other
    /// flags; remove leaves nothing; bridges are found with their subnets.
    #[test]
    fn install_remove_and_bridges_in_a_namespace() {
        if let Some(why) = netns::unusable(&["ip"]) {
            eprintln!("skipped: {why}");
            return;
        }
        let ns = Netns::new(format!("s-pr-{}", std::process::id())).unwrap();
        let pr = PolicyRoute {
            mark: 0x1000,
            table: 2626,
        };
        ns.ip(&["link", "add", "br9", "type", "bridge"]).unwrap();
        ns.ip(&["addr", "add", "10.244.9.1/24", "dev", "br9"])
            .unwrap();
        ns.ip(&["addr", "add", "fd00:249::1/64", "dev", "br9", "nodad"])
            .unwrap();
        ns.ip(&["link", "set", "br9", "up"]).unwrap();
        let (warning, bridges) = ns
            .block_on(Duration::from_secs(10), move || async move {
                let w = pr.install().await.unwrap();
                // Twice: no error, still one rule.
                assert_eq!(pr.install().await.unwrap(), w);
                (w, bridges().await.unwrap())
            })
            .unwrap();
        assert_eq!(warning, None);
        let rules = ip_out(ns.name(), &["rule"]);
        assert_eq!(rules.matches("2626:").count(), 1, "{rules}");
        assert!(
            rules.contains("fwmark 0x1000/0x1000 lookup 2626"),
            "{rules}"
        );
        let rules6 = ip_out(ns.name(), &["-6", "rule"]);
        assert_eq!(rules6.matches("2626:").count(), 1, "{rules6}");
        let routes = ip_out(ns.name(), &["route", "show", "table", "2626"]);
        assert!(routes.contains("local default dev lo"), "{routes}");
        let routes6 = ip_out(ns.name(), &["-6", "route", "show", "table", "2626"]);
        assert!(routes6.contains("local default dev lo"), "{routes6}");
        assert_eq!(bridges.len(), 1, "{bridges:?}");
        let subnets: Vec<String> = bridges[0].subnets.iter().map(|c| c.to_string()).collect();
        assert_eq!(subnets, ["10.244.9.0/24", "fd00:249::/64"]);
        // Other flags: the old rule is replaced, not kept beside.
        let other = PolicyRoute {
            mark: 0x2000,
            table: 2626,
        };
        ns.block_on(Duration::from_secs(10), move || async move {
            other.install().await.unwrap();
        })
        .unwrap();
        let rules = ip_out(ns.name(), &["rule"]);
        assert_eq!(rules.matches("2626:").count(), 1, "{rules}");
        assert!(rules.contains("fwmark 0x2000/0x2000"), "{rules}");
        ns.block_on(Duration::from_secs(10), move || async move {
            other.remove().await.unwrap();
            // Removing what is gone is fine.
            other.remove().await.unwrap();
        })
        .unwrap();
        let rules = ip_out(ns.name(), &["rule"]);
        assert!(!rules.contains("2626"), "{rules}");
        assert!(!ip_out(ns.name(), &["-6", "rule"]).contains("2626"));
        assert_eq!(ip_out(ns.name(), &["route", "show", "table", "2626"]), "");
        assert_eq!(
            ip_out(ns.name(), &["-6", "route", "show", "table", "2626"]),
            ""
        );
    }

    /// Root only: the routes over a bridge (connected) and over per-pod
    /// veths (Calico's /32 and /128 scope link) are read with their
    /// interface, and the matchers pick them.
    #[test]
    fn interface_routes_in_a_namespace() {
        use crate::source_ip::{InterfaceMatch, local_cidrs};
        if let Some(why) = netns::unusable(&["ip"]) {
            eprintln!("skipped: {why}");
            return;
        }
        let ns = Netns::new(format!("d-rt-{}", std::process::id())).unwrap();
        ns.ip(&["link", "add", "br7", "type", "bridge"]).unwrap();
        ns.ip(&["addr", "add", "10.244.7.1/24", "dev", "br7"])
            .unwrap();
        ns.ip(&["addr", "add", "fd00:247::1/64", "dev", "br7", "nodad"])
            .unwrap();
        ns.ip(&["link", "set", "br7", "up"]).unwrap();
        ns.ip(&["link", "add", "calid7", "type", "veth", "peer", "d7peer"])
            .unwrap();
        ns.ip(&["link", "set", "calid7", "up"]).unwrap();
        ns.ip(&["link", "set", "d7peer", "up"]).unwrap();
        ns.ip(&[
            "route",
            "add",
            "10.245.0.7/32",
            "dev",
            "calid7",
            "scope",
            "link",
        ])
        .unwrap();
        ns.ip(&["-6", "route", "add", "fd00:245::7/128", "dev", "calid7"])
            .unwrap();
        // Not a pod route: a default route over the bridge, another table.
        ns.ip(&["route", "add", "default", "via", "10.244.7.9", "dev", "br7"])
            .unwrap();
        ns.ip(&[
            "route",
            "add",
            "10.245.0.8/32",
            "dev",
            "calid7",
            "table",
            "77",
        ])
        .unwrap();
        let routes = ns
            .block_on(Duration::from_secs(10), || async {
                interface_routes().await.unwrap()
            })
            .unwrap();
        let show = |m: InterfaceMatch| -> Vec<String> {
            local_cidrs(&routes, &m)
                .iter()
                .map(|c| c.to_string())
                .collect()
        };
        assert_eq!(
            show(InterfaceMatch::Bridge("br7".into())),
            ["10.244.7.0/24", "fd00:247::/64"],
            "{routes:?}"
        );
        assert_eq!(
            show(InterfaceMatch::Prefix("cali".into())),
            ["10.245.0.7/32", "fd00:245::7/128"],
            "{routes:?}"
        );
        assert!(show(InterfaceMatch::Prefix("d7".into())).is_empty());
    }
}

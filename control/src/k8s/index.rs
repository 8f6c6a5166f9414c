//! The index: Services, EndpointSlices and this node's Node in, a [`Table`] out.
//!
//! Pure and synchronous: the watcher source feeds it objects of every
//! [`Watched`] kind through three generic entry points ([`Index::apply`],
//! [`Index::delete`], and [`Index::reset`] on a relist) and calls
//! [`Index::build`] when it wants a table. Each
//! change marks the Services it touches dirty; `build` recomputes only those
//! and patches the working table (a persistent map) key by key, so one
//! EndpointSlice change costs O(size of that Service + log n), not O(n).
//!
//! The rules are kube-proxy's; see the module docs of [`crate::k8s`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service as K8sService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{Metadata, Resource};

use super::convert::{
    EndpointInfo, Family, Malformed, NodeInfo, ObjectRef, ServiceInfo, SliceInfo, TrafficPolicy,
    node_info, service_info, slice_info,
};
use crate::cidr::Cidr;
use crate::table::{Backend, ListenKey, NoEndpoints, Policy, Service, Settings, Table};

/// Which traffic a table entry carries: cluster traffic (clusterIPs, under
/// `internalTrafficPolicy`) or external traffic (externalIPs, load-balancer
/// IPs, node ports, under `externalTrafficPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Variant {
    Cluster,
    External,
}

/// The table entry a Service makes for one port and variant: what claims a
/// listen key. When two Services claim one key (a user error, e.g. the same
/// externalIP twice), the smallest claim (by name, then variant) wins,
/// deterministically, and a warning is logged.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct EntryId {
    /// `namespace/service:port` (see [`super::convert::ServicePortInfo::entry_name`]).
    name: String,
    variant: Variant,
}

/// A `healthCheckNodePort` to answer, with what to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ObjectRef,
    pub port: u16,
    /// Ready endpoints on this node (distinct addresses). 0 means answer 503.
    pub local_endpoints: usize,
}

/// Counters of what the index skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Objects rejected as malformed (each apply counts).
    pub malformed: u64,
    /// Service ports skipped because they are not TCP (counted once per
    /// Service version that introduces them).
    pub skipped_ports: u64,
    /// Listen keys claimed by more than one Service (counted per rebuild).
    pub conflicts: u64,
    /// Bad fields skipped while the rest of their object is used: addresses
    /// that do not parse, ports out of range, endpoints without an address
    /// or of the wrong family (counted once per object version that
    /// introduces them).
    pub skipped_fields: u64,
}

/// A kind of object the index is fed. [`Index::apply`], [`Index::delete`]
/// and [`Index::reset`] are written once over it: feeding the index one
/// more kind (Namespaces, a CRD) is one impl.
pub trait Watched: Resource + Metadata<Ty = ObjectMeta> {
    /// How the index names one object of the kind.
    type Key: Clone + Eq + Hash;
    /// What the index keeps of one object.
    type Info: Clone + PartialEq;
    /// The key, from the metadata alone (objects that do not decode are
    /// deleted and kept by it too); `None` when a name is missing.
    fn key(meta: &ObjectMeta) -> Option<Self::Key>;
    /// What the index keeps of the object; `Ok(None)` when the index leaves
    /// it alone (a previous version is then removed).
    fn info(&self, index: &Index) -> Result<Option<Self::Info>, Malformed>;
    /// The version the index holds.
    fn get<'a>(index: &'a Index, key: &Self::Key) -> Option<&'a Self::Info>;
    /// The keys of every object of the kind the index holds.
    fn keys(index: &Index) -> Vec<Self::Key>;
    /// Stores (`Some`) or removes (`None`) a changed object and marks the
    /// Services it feeds dirty.
    fn set(index: &mut Index, key: Self::Key, info: Option<Self::Info>);
}

/// Services and EndpointSlices, indexed for incremental table builds.
#[derive(Debug, Default)]
pub struct Index {
    node_name: Option<String>,
    /// Node addresses given by the operator; when empty the Node's are used.
    fixed_addresses: Vec<IpAddr>,
    /// This node's Node, once seen.
    node: Option<NodeInfo>,
    /// This node's Node was seen once: its absence now means deleted.
    node_seen: bool,
    /// The addresses of this node's Node when it was last seen: node ports
    /// stay there when the Node is deleted or missing from a relist.
    last_node_addresses: Vec<IpAddr>,
    services: HashMap<ObjectRef, Arc<ServiceInfo>>,
    /// Slice (`namespace/slice-name`) to the Service that owns it.
    slice_owner: HashMap<ObjectRef, ObjectRef>,
    /// Service to its slices, by slice name (ordered: deterministic merges).
    slices: HashMap<ObjectRef, BTreeMap<String, Arc<SliceInfo>>>,
    /// What each Service put in the table, to take it out again.
    contributed: HashMap<ObjectRef, Vec<(ListenKey, EntryId)>>,
    claims: HashMap<ListenKey, BTreeMap<EntryId, Arc<Service>>>,
    health: HashMap<ObjectRef, HealthCheck>,
    /// `health` changed since the last `build` put it on the table.
    health_changed: bool,
    table: Table,
    dirty: HashSet<ObjectRef>,
    /// The table changed since the last `build`.
    changed: bool,
    triggers: Vec<i128>,
    stats: IndexStats,
    /// The scheduler of Services without a (known) `sluice.io/scheduler`.
    default_policy: Policy,
}

impl Index {
    /// `node_name`: this node (for local traffic policies and the Node's
    /// zone); without it, `Local` policies select no endpoint.
    /// `node_addresses`: where node ports are served; empty means the
    /// InternalIP/ExternalIP addresses of this node's Node object.
    pub fn new(node_name: Option<String>, node_addresses: Vec<IpAddr>) -> Self {
        Self {
            node_name,
            fixed_addresses: node_addresses,
            ..Self::default()
        }
    }

    /// Sets the scheduler of Services that name none (or an unknown one)
    /// in `sluice.io/scheduler` (`--scheduler`; default round robin).
    pub fn with_default_policy(mut self, policy: Policy) -> Self {
        self.default_policy = policy;
        self
    }

    /// The working table (what the last [`Index::build`] made).
    pub fn table(&self) -> &Table {
        &self.table
    }

    pub fn stats(&self) -> IndexStats {
        self.stats
    }

    /// Number of Services indexed (after skipping).
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The `healthCheckNodePort`s to answer, by port, as the last
    /// [`Index::build`] put them on the table ([`Table::health_checks`]).
    pub fn health_checks(&self) -> &[HealthCheck] {
        self.table.health_checks()
    }

    /// Trigger times (ns since the epoch) of the slice changes applied since
    /// the last call: to measure network programming latency at publish.
    pub fn take_trigger_times(&mut self) -> Vec<i128> {
        std::mem::take(&mut self.triggers)
    }

    /// Whether a change waits for [`Index::build`].
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    // ----- Objects ----------------------------------------------------------

    /// Adds or replaces an object. A malformed one is rejected and its
    /// previous version (if any) stays.
    pub fn apply<K: Watched>(&mut self, obj: &K) -> Result<(), Malformed> {
        let info = obj.info(self);
        let info = info.inspect_err(|_| self.stats.malformed += 1)?;
        if let Some(key) = K::key(obj.metadata()) {
            self.store::<K>(key, info);
        }
        Ok(())
    }

    /// Removes an object by key (also for objects that did not decode).
    pub fn delete<K: Watched>(&mut self, key: &K::Key) {
        self.store::<K>(key.clone(), None);
    }

    /// Replaces every object of kind `K` by `items` (a relist): objects
    /// missing from it are removed (deleted while the watch was down).
    /// `keep` names listed objects that could not even be decoded. For
    /// those, and for each malformed one (returned), the previous version
    /// (if any) stays.
    pub fn reset<'a, K: Watched + 'a>(
        &mut self,
        items: impl IntoIterator<Item = &'a K>,
        keep: &[K::Key],
    ) -> Vec<Malformed> {
        let mut errors = Vec::new();
        // Absent from `next` means deleted, so kept versions go in explicitly.
        let mut next: HashMap<K::Key, Option<K::Info>> = (keep.iter())
            .map(|key| (key.clone(), K::get(self, key).cloned()))
            .collect();
        for obj in items {
            let key = K::key(obj.metadata());
            let info = match obj.info(self) {
                Ok(info) => info,
                Err(e) => {
                    self.stats.malformed += 1;
                    errors.push(e);
                    key.as_ref().and_then(|key| K::get(self, key)).cloned()
                }
            };
            if let Some(key) = key {
                next.insert(key, info);
            }
        }
        for key in K::keys(self) {
            if !next.contains_key(&key) {
                self.store::<K>(key, None);
            }
        }
        for (key, info) in next {
            self.store::<K>(key, info);
        }
        errors
    }

    fn store<K: Watched>(&mut self, key: K::Key, info: Option<K::Info>) {
        if K::get(self, &key) != info.as_ref() {
            K::set(self, key, info);
        }
    }

    /// Counts the bad fields a new version of an object skips that its
    /// previous version did not, and logs them, once for the object.
    fn note_skipped(
        &mut self,
        kind: &'static str,
        key: &ObjectRef,
        old: Option<&[String]>,
        skipped: &[String],
    ) {
        let new: Vec<&String> = skipped
            .iter()
            .filter(|s| !old.is_some_and(|old| old.contains(s)))
            .collect();
        if !new.is_empty() {
            self.stats.skipped_fields += new.len() as u64;
            tracing::warn!(
                kind,
                object = %key,
                skipped = ?new,
                "skipping bad fields; the rest of the object is used"
            );
        }
    }

    /// Whether this node may take load-balancer traffic (kube-proxy's
    /// `nodeEligible`): its Node is not being deleted and not tainted
    /// `ToBeDeletedByClusterAutoscaler`. A Node deleted (or gone from a
    /// relist) is not eligible; one never seen (no `--node-name`, or not
    /// listed yet) is.
    pub fn node_eligible(&self) -> bool {
        match &self.node {
            Some(node) => node.eligible,
            None => !self.node_seen,
        }
    }

    fn is_this_node(&self, name: &str) -> bool {
        self.node_name.as_deref() == Some(name)
    }

    fn node_addresses(&self) -> &[IpAddr] {
        match &self.node {
            _ if !self.fixed_addresses.is_empty() => &self.fixed_addresses,
            Some(node) => &node.addresses,
            None => &self.last_node_addresses,
        }
    }

    // ----- Building -------------------------------------------------------

    /// Recomputes the dirty Services into the working table, with its
    /// health checks and pod CIDRs. Returns whether the table changed since
    /// the last call (a health check's local endpoint count alone counts);
    /// if so, publish `self.table().clone()` (O(1)).
    pub fn build(&mut self) -> bool {
        let dirty: Vec<ObjectRef> = self.dirty.drain().collect();
        for key in dirty {
            self.rebuild(&key);
        }
        // Health checks travel with the table, as pod CIDRs do.
        if std::mem::take(&mut self.health_changed) {
            let mut checks: Vec<HealthCheck> = self.health.values().cloned().collect();
            checks.sort_by(|a, b| a.port.cmp(&b.port).then_with(|| a.service.cmp(&b.service)));
            if self.table.set_health_checks(checks.into()) {
                self.changed = true;
            }
        }
        std::mem::take(&mut self.changed)
    }

    fn rebuild(&mut self, key: &ObjectRef) {
        let mut touched: Vec<ListenKey> = Vec::new();
        if let Some(old) = self.contributed.remove(key) {
            for (lk, claim) in old {
                if let Some(c) = self.claims.get_mut(&lk) {
                    c.remove(&claim);
                }
                touched.push(lk);
            }
        }
        let old_health = self.health.remove(key);
        if let Some(info) = self.services.get(key).cloned() {
            let empty = BTreeMap::new();
            let slices = self.slices.get(key).unwrap_or(&empty);
            let mut claims: Vec<(ListenKey, EntryId, Arc<Service>)> = Vec::new();
            for port in &info.ports {
                let name = port.entry_name(key);
                for family in [Family::V4, Family::V6] {
                    let at = |ips: &[IpAddr], port: u16| -> Vec<SocketAddr> {
                        ips.iter()
                            .filter(|ip| Family::of(ip) == family)
                            .map(|ip| SocketAddr::new(*ip, port))
                            .collect()
                    };
                    let cluster = at(&info.cluster_ips, port.port);
                    let mut external = at(&info.external_ips, port.port);
                    let load_balancer = at(&info.load_balancer_ips, port.port);
                    if info.node_ports
                        && let Some(np) = port.node_port
                    {
                        external.extend(at(self.node_addresses(), np));
                    }
                    // kube-proxy serves a Service only in the families of
                    // its cluster IPs: an IPv4-only Service gets no IPv6
                    // node port or external address, and a Service without
                    // a cluster IP (not allocated yet) nothing.
                    if cluster.is_empty() {
                        continue;
                    }
                    let eps = self.merged_endpoints(slices, family, &port.name);
                    let uses_cluster = info.internal_policy == TrafficPolicy::Cluster
                        || (info.external_policy == TrafficPolicy::Cluster
                            && !(external.is_empty() && load_balancer.is_empty()));
                    let no_endpoints = no_endpoints_verdict(&eps, uses_cluster);
                    let base = Settings {
                        no_endpoints,
                        ..info.settings.clone()
                    };
                    // Outside clients of an eTP=Local entry keep their IP
                    // (kube-proxy does not masquerade them).
                    let external_base = Settings {
                        keep_external_client_ip: info.external_policy == TrafficPolicy::Local,
                        ..base.clone()
                    };
                    let firewalled = Settings {
                        source_ranges: self.source_ranges(&info, family, &load_balancer),
                        ..external_base.clone()
                    };
                    // Entries with equal policies and settings are shared.
                    let mut made: Vec<(TrafficPolicy, &Settings, Arc<Service>)> = Vec::new();
                    for (variant, addrs, settings) in [
                        (Variant::Cluster, cluster, &base),
                        (Variant::External, external, &external_base),
                        (Variant::External, load_balancer, &firewalled),
                    ] {
                        if addrs.is_empty() {
                            continue;
                        }
                        let policy = match variant {
                            Variant::Cluster => info.internal_policy,
                            Variant::External => info.external_policy,
                        };
                        let shared = made.iter().find(|(p, s, _)| *p == policy && *s == settings);
                        let svc = match shared {
                            Some((_, _, svc)) => svc.clone(),
                            None => {
                                let svc = self.make_service(&name, &info, &eps, policy);
                                let svc = Arc::new(svc.with_settings(settings.clone()));
                                made.push((policy, settings, svc.clone()));
                                svc
                            }
                        };
                        for addr in addrs {
                            let id = EntryId {
                                name: name.clone(),
                                variant,
                            };
                            let lk = ListenKey {
                                addr,
                                protocol: port.protocol,
                            };
                            claims.push((lk, id, svc.clone()));
                        }
                    }
                }
            }
            if let Some(port) = info.health_check_node_port
                && !info.cluster_ips.is_empty()
            {
                let mut local: Vec<IpAddr> = slices
                    .values()
                    .flat_map(|s| s.endpoints.iter())
                    .filter(|e| e.conditions.ready && self.is_local(e))
                    .map(|e| e.ip)
                    .collect();
                local.sort();
                local.dedup();
                self.health.insert(
                    key.clone(),
                    HealthCheck {
                        service: key.clone(),
                        port,
                        local_endpoints: local.len(),
                    },
                );
            }
            let mut contributed = Vec::with_capacity(claims.len());
            for (lk, claim, svc) in claims {
                let entry = self.claims.entry(lk).or_default();
                if let Some(other) = entry.keys().find(|other| other.name != claim.name) {
                    self.stats.conflicts += 1;
                    tracing::warn!(
                        listen = %lk,
                        service = %claim.name,
                        other = %other.name,
                        "two services claim one address; the first by name wins"
                    );
                }
                entry.insert(claim.clone(), svc);
                contributed.push((lk, claim));
                touched.push(lk);
            }
            self.contributed.insert(key.clone(), contributed);
        }
        if self.health.get(key) != old_health.as_ref() {
            self.health_changed = true;
        }
        touched.sort();
        touched.dedup();
        for lk in touched {
            self.settle(lk);
        }
    }

    /// Puts the winning claim of `lk` in the table (or removes the key).
    fn settle(&mut self, lk: ListenKey) {
        let best = self
            .claims
            .get(&lk)
            .and_then(|c| c.values().next().cloned());
        match best {
            None => {
                self.claims.remove(&lk);
                if self.table.remove(&lk).is_some() {
                    self.changed = true;
                }
            }
            Some(svc) => {
                let same = self
                    .table
                    .get(&lk)
                    .is_some_and(|cur| Arc::ptr_eq(cur, &svc) || **cur == *svc);
                if !same {
                    self.table.insert(lk, svc);
                    self.changed = true;
                }
            }
        }
    }

    /// The endpoints of one port and family over every slice of a Service,
    /// each address once. An address listed in several slices (a new pod
    /// reusing the IP of a terminating one) keeps its most usable copy, as
    /// kube-proxy does: ready over serving over terminating, then the local
    /// one; among equal copies the first slice by name wins.
    fn merged_endpoints<'a>(
        &self,
        slices: &'a BTreeMap<String, Arc<SliceInfo>>,
        family: Family,
        port: &str,
    ) -> Vec<(SocketAddr, &'a EndpointInfo)> {
        let usability = |e: &EndpointInfo| {
            let c = e.conditions;
            (c.ready, c.serving, !c.terminating, self.is_local(e))
        };
        let mut eps: Vec<(SocketAddr, &EndpointInfo)> = Vec::new();
        let mut at: HashMap<SocketAddr, usize> = HashMap::new();
        for s in slices.values().filter(|s| s.family == family) {
            let Some(&p) = s.ports.get(port) else {
                continue;
            };
            for e in &s.endpoints {
                let addr = SocketAddr::new(e.ip, p);
                match at.get(&addr).and_then(|&i| eps.get_mut(i)) {
                    Some(kept) if usability(e) > usability(kept.1) => kept.1 = e,
                    Some(_) => {}
                    None => {
                        at.insert(addr, eps.len());
                        eps.push((addr, e));
                    }
                }
            }
        }
        eps
    }

    fn is_local(&self, ep: &EndpointInfo) -> bool {
        self.node_name.is_some() && ep.node_name == self.node_name
    }

    /// The entry for one port and family under `policy`: local endpoints, or
    /// topology-filtered ones. Eligibility is decided by [`Service::new`].
    fn make_service(
        &self,
        name: &str,
        info: &ServiceInfo,
        eps: &[(SocketAddr, &EndpointInfo)],
        policy: TrafficPolicy,
    ) -> Service {
        let backends: Vec<Backend> = if policy == TrafficPolicy::Local {
            eps.iter()
                .filter(|(_, e)| self.is_local(e))
                .map(|(a, e)| Backend::new(*a, e.conditions))
                .collect()
        } else if let Some(topology) = self.topology(eps) {
            // Ready endpoints hinted for this node or zone; others that are
            // not ready stay listed (for draining) but no fallback to them
            // happens since a ready one exists.
            eps.iter()
                .filter(|(_, e)| !e.conditions.ready || topology.admits(e))
                .map(|(a, e)| Backend::new(*a, e.conditions))
                .collect()
        } else {
            eps.iter()
                .map(|(a, e)| Backend::new(*a, e.conditions))
                .collect()
        };
        let scheduler = info.scheduler.unwrap_or(self.default_policy);
        Service::new(name, scheduler, info.affinity, backends)
    }

    /// `loadBalancerSourceRanges` of `family` for the load-balancer IPs
    /// `lb` of one port. When a range holds one of this node's addresses,
    /// the load-balancer IPs themselves are allowed as sources too
    /// (kube-proxy's `allowFromNode`: a VIP-like load balancer can loop a
    /// node's request back with the VIP as its source). Nested ranges are
    /// kept once (the widest).
    fn source_ranges(&self, info: &ServiceInfo, family: Family, lb: &[SocketAddr]) -> Vec<Cidr> {
        let of_family = |c: &&Cidr| (family == Family::V4) == c.is_ipv4();
        let mut ranges: Vec<Cidr> = (info.load_balancer_source_ranges.iter())
            .filter(of_family)
            .copied()
            .collect();
        if lb.is_empty() || ranges.is_empty() {
            return Vec::new();
        }
        let node_allowed =
            (self.node_addresses().iter()).any(|ip| ranges.iter().any(|r| r.contains(*ip)));
        if node_allowed {
            ranges.extend(lb.iter().map(|a| Cidr::host(a.ip())));
        }
        ranges.sort();
        ranges.dedup();
        let all = ranges.clone();
        ranges.retain(|r| !all.iter().any(|o| o != r && o.covers(r)));
        ranges
    }

    /// Which topology hints apply, kube-proxy's rule (only ready endpoints
    /// are considered): node hints when every ready endpoint carries
    /// `hints.forNodes` and one names this node; else zone hints when every
    /// ready endpoint carries `hints.forZones` and one names this node's
    /// zone; else none.
    fn topology(&self, eps: &[(SocketAddr, &EndpointInfo)]) -> Option<Topology<'_>> {
        let ready = || eps.iter().map(|(_, e)| e).filter(|e| e.conditions.ready);
        let hinted = |hints: fn(&EndpointInfo) -> Option<&Vec<String>>, name: &str| {
            let mut any = false;
            for e in ready() {
                any |= hints(e)?.iter().any(|n| n == name);
            }
            any.then_some(())
        };
        if let Some(node) = self.node_name.as_deref()
            && hinted(|e| e.nodes.as_ref(), node).is_some()
        {
            return Some(Topology::Node(node));
        }
        let zone = self.node.as_ref()?.zone.as_deref()?;
        hinted(|e| e.zones.as_ref(), zone).map(|()| Topology::Zone(zone))
    }
}

/// What the kernel does with connections to an entry of a port that has no
/// eligible backend: drop when the port has endpoints somewhere (so only a
/// `Local` policy can have left the entry empty), else reject. kube-proxy's
/// `hasEndpoints`: a ready endpoint anywhere, or, when a `Cluster` policy
/// is in use, a serving and terminating one.
fn no_endpoints_verdict(eps: &[(SocketAddr, &EndpointInfo)], uses_cluster: bool) -> NoEndpoints {
    let has_any = eps.iter().any(|(_, e)| {
        let c = e.conditions;
        c.ready || (uses_cluster && c.serving && c.terminating)
    });
    if has_any {
        NoEndpoints::Drop
    } else {
        NoEndpoints::Reject
    }
}

/// The topology hints in use for a Service port: this node's name or zone.
#[derive(Debug, Clone, Copy)]
enum Topology<'a> {
    Node(&'a str),
    Zone(&'a str),
}

impl Topology<'_> {
    /// Whether an endpoint is hinted for this node (or zone).
    fn admits(self, e: &EndpointInfo) -> bool {
        let (hints, name) = match self {
            Topology::Node(node) => (&e.nodes, node),
            Topology::Zone(zone) => (&e.zones, zone),
        };
        hints.as_ref().is_some_and(|h| h.iter().any(|h| h == name))
    }
}

impl Watched for K8sService {
    type Key = ObjectRef;
    type Info = ServiceInfo;

    fn key(meta: &ObjectMeta) -> Option<ObjectRef> {
        ObjectRef::of(meta)
    }

    fn info(&self, _: &Index) -> Result<Option<ServiceInfo>, Malformed> {
        service_info(self)
    }

    fn get<'a>(index: &'a Index, key: &ObjectRef) -> Option<&'a ServiceInfo> {
        index.services.get(key).map(|s| &**s)
    }

    fn keys(index: &Index) -> Vec<ObjectRef> {
        index.services.keys().cloned().collect()
    }

    fn set(index: &mut Index, key: ObjectRef, info: Option<ServiceInfo>) {
        match info {
            None => {
                index.services.remove(&key);
            }
            Some(info) => {
                let old_skipped = index.services.get(&key).map(|o| o.skipped.clone());
                index.note_skipped("Service", &key, old_skipped.as_deref(), &info.skipped);
                let old = index.services.get(&key);
                for p in &info.skipped_ports {
                    let seen = old.is_some_and(|o| o.skipped_ports.contains(p));
                    if !seen {
                        index.stats.skipped_ports += 1;
                        tracing::info!(
                            service = %key,
                            port = p.port,
                            name = %p.name,
                            protocol = %p.protocol,
                            "skipping non-TCP service port"
                        );
                    }
                }
                index.services.insert(key.clone(), Arc::new(info));
            }
        }
        index.dirty.insert(key);
    }
}

/// A slice is keyed by its own `namespace/name` and stored under the
/// Service it names, which it marks dirty (and the one it left, if any).
impl Watched for EndpointSlice {
    type Key = ObjectRef;
    type Info = SliceInfo;

    fn key(meta: &ObjectMeta) -> Option<ObjectRef> {
        ObjectRef::of(meta)
    }

    fn info(&self, _: &Index) -> Result<Option<SliceInfo>, Malformed> {
        slice_info(self)
    }

    fn get<'a>(index: &'a Index, key: &ObjectRef) -> Option<&'a SliceInfo> {
        let owner = index.slice_owner.get(key)?;
        index.slices.get(owner)?.get(&key.name).map(|s| &**s)
    }

    fn keys(index: &Index) -> Vec<ObjectRef> {
        index.slice_owner.keys().cloned().collect()
    }

    fn set(index: &mut Index, key: ObjectRef, info: Option<SliceInfo>) {
        if let Some(info) = &info {
            let old = Self::get(index, &key).map(|o| o.skipped.clone());
            index.note_skipped("EndpointSlice", &key, old.as_deref(), &info.skipped);
        }
        if let Some(old_owner) = index.slice_owner.remove(&key) {
            if let Some(m) = index.slices.get_mut(&old_owner) {
                m.remove(&key.name);
                if m.is_empty() {
                    index.slices.remove(&old_owner);
                }
            }
            index.dirty.insert(old_owner);
        }
        if let Some(info) = info {
            if let Some(t) = info.trigger_time_ns {
                index.triggers.push(t);
            }
            let owner = ObjectRef::new(key.namespace.clone(), info.service.clone());
            index
                .slices
                .entry(owner.clone())
                .or_default()
                .insert(key.name.clone(), Arc::new(info));
            index.slice_owner.insert(key, owner.clone());
            index.dirty.insert(owner);
        }
    }
}

/// Only this node's Node is kept (its zone and addresses); others are left
/// alone. A Node is cluster-scoped: keyed by name.
impl Watched for Node {
    type Key = String;
    type Info = NodeInfo;

    fn key(meta: &ObjectMeta) -> Option<String> {
        meta.name.clone().filter(|n| !n.is_empty())
    }

    fn info(&self, index: &Index) -> Result<Option<NodeInfo>, Malformed> {
        let ours = Self::key(&self.metadata).is_some_and(|n| index.is_this_node(&n));
        Ok(ours.then(|| node_info(self)))
    }

    fn get<'a>(index: &'a Index, key: &String) -> Option<&'a NodeInfo> {
        index.node.as_ref().filter(|_| index.is_this_node(key))
    }

    fn keys(index: &Index) -> Vec<String> {
        index
            .node
            .iter()
            .filter_map(|_| index.node_name.clone())
            .collect()
    }

    fn set(index: &mut Index, key: String, info: Option<NodeInfo>) {
        if index.is_this_node(&key) {
            // Zone and addresses feed every Service: rare, so rebuild all.
            // A Node deleted (or missing from a relist) leaves its addresses
            // to serve node ports on, as kube-proxy keeps the addresses it
            // found at start-up; its zone goes (hints unused), as in
            // kube-proxy.
            if let Some(old) = index.node.take() {
                index.last_node_addresses = old.addresses;
            }
            index.node_seen |= info.is_some();
            // Pod CIDRs travel with the table; a deleted Node leaves the
            // last ones (its pods are still here), as its addresses.
            if let Some(node) = &info
                && index.table.set_local_pod_cidrs(&node.pod_cidrs)
            {
                index.changed = true;
            }
            index.node = info;
            index.dirty.extend(index.services.keys().cloned());
        }
    }
}

#[cfg(test)]
mod scheduler_tests {
    use super::super::convert::SCHEDULER_ANNOTATION;
    use super::*;

    /// `default/web` on 10.96.0.1:80, with `sluice.io/scheduler` if given.
    fn web(scheduler: Option<&str>) -> K8sService {
        let annotations: Vec<(&str, &str)> = scheduler
            .map(|s| (SCHEDULER_ANNOTATION, s))
            .into_iter()
            .collect();
        super::super::convert::settings_tests::web(&annotations)
    }

    fn scheduler_of(index: &mut Index, svc: &K8sService) -> Policy {
        index.apply(svc).unwrap();
        index.build();
        let key = ListenKey::tcp(SocketAddr::from(([10, 96, 0, 1], 80)));
        index.table().get(&key).unwrap().policy
    }

    #[test]
    fn the_annotation_chooses_the_scheduler_over_the_node_default() {
        let mut index = Index::new(None, vec![]);
        assert_eq!(scheduler_of(&mut index, &web(None)), Policy::RoundRobin);
        for p in Policy::ALL {
            assert_eq!(scheduler_of(&mut index, &web(Some(p.name()))), p);
        }
        let mut index = Index::new(None, vec![]).with_default_policy(Policy::Maglev);
        assert_eq!(scheduler_of(&mut index, &web(None)), Policy::Maglev);
        let rr = web(Some("round-robin"));
        assert_eq!(scheduler_of(&mut index, &rr), Policy::RoundRobin);
        assert_eq!(index.stats().skipped_fields, 0);
    }

    #[test]
    fn an_unknown_scheduler_is_skipped_once_per_version_for_the_default() {
        let mut index = Index::new(None, vec![]).with_default_policy(Policy::SourceHash);
        let bad = web(Some("Maglev"));
        assert_eq!(scheduler_of(&mut index, &bad), Policy::SourceHash);
        assert_eq!(index.stats().skipped_fields, 1);
        assert_eq!(scheduler_of(&mut index, &bad), Policy::SourceHash);
        assert_eq!(index.stats().skipped_fields, 1, "the same version again");
        assert_eq!(
            scheduler_of(&mut index, &web(Some("wrr"))),
            Policy::SourceHash
        );
        assert_eq!(index.stats().skipped_fields, 2, "another bad value");
        assert_eq!(
            scheduler_of(&mut index, &web(Some("maglev"))),
            Policy::Maglev
        );
        assert_eq!(index.stats().skipped_fields, 2);
    }
}

#[cfg(test)]
mod settings_tests {
    use super::super::convert::settings_tests::web;
    use super::super::convert::{IDLE_TIMEOUT_ANNOTATION, MAX_CONNECTIONS_ANNOTATION};
    use super::*;

    #[test]
    fn annotated_settings_reach_the_table() {
        let svc = web(&[
            (MAX_CONNECTIONS_ANNOTATION, "7"),
            (IDLE_TIMEOUT_ANNOTATION, "bad"),
        ]);
        let mut index = Index::new(None, vec![]);
        index.apply(&svc).unwrap();
        index.build();
        let key = ListenKey::tcp(SocketAddr::from(([10, 96, 0, 1], 80)));
        let table = index.table();
        let settings = &table.get(&key).unwrap().settings;
        assert_eq!(settings.max_connections, Some(7));
        assert_eq!(settings.idle_timeout, None, "a bad value: the default");
        assert_eq!(index.stats().skipped_fields, 1);
    }
}

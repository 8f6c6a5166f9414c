//! The index: Services, EndpointSlices and this node's Node in, a [`Table`] out.
//!
//! Pure and synchronous: the watcher source feeds it objects
//! ([`Index::apply_service`], [`Index::delete_slice`], [`Index::reset_slices`]
//! on a relist, ...) and calls [`Index::build`] when it wants a table. Each
//! change marks the Services it touches dirty; `build` recomputes only those
//! and patches the working table (a persistent map) key by key, so one
//! EndpointSlice change costs O(size of that Service + log n), not O(n).
//!
//! The rules are kube-proxy's; see the module docs of [`crate::k8s`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service as K8sService};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::convert::{
    EndpointInfo, Family, Malformed, NodeInfo, ObjectRef, ServiceInfo, SliceInfo, node_info,
    service_info, slice_info,
};
use crate::table::{Backend, ListenKey, Policy, Service, Table};

/// Which traffic a table entry carries: cluster traffic (clusterIPs, under
/// `internalTrafficPolicy`) or external traffic (externalIPs, load-balancer
/// IPs, node ports, under `externalTrafficPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Variant {
    Cluster,
    External,
}

/// A Service's claim on a listen key: its entry name and variant. When two
/// Services claim one key (a user error, e.g. the same externalIP twice), the
/// smallest claim wins, deterministically, and a warning is logged.
type Claim = (String, Variant);

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
}

/// Services and EndpointSlices, indexed for incremental table builds.
#[derive(Debug, Default)]
pub struct Index {
    node_name: Option<String>,
    /// Node addresses given by the operator; when empty the Node's are used.
    fixed_addresses: Vec<IpAddr>,
    node: NodeInfo,
    services: HashMap<ObjectRef, Arc<ServiceInfo>>,
    /// Slice (`namespace/slice-name`) to the Service that owns it.
    slice_owner: HashMap<ObjectRef, ObjectRef>,
    /// Service to its slices, by slice name (ordered: deterministic merges).
    slices: HashMap<ObjectRef, BTreeMap<String, Arc<SliceInfo>>>,
    /// What each Service put in the table, to take it out again.
    contributed: HashMap<ObjectRef, Vec<(ListenKey, Claim)>>,
    claims: HashMap<ListenKey, BTreeMap<Claim, Arc<Service>>>,
    health: HashMap<ObjectRef, HealthCheck>,
    /// `health` changed since the last `take_health_changed`.
    health_changed: bool,
    table: Table,
    dirty: HashSet<ObjectRef>,
    /// The table changed since the last `build`.
    changed: bool,
    triggers: Vec<i128>,
    stats: IndexStats,
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

    /// The `healthCheckNodePort`s to answer, by port.
    pub fn health_checks(&self) -> Vec<HealthCheck> {
        let mut v: Vec<HealthCheck> = self.health.values().cloned().collect();
        v.sort_by(|a, b| a.port.cmp(&b.port).then_with(|| a.service.cmp(&b.service)));
        v
    }

    /// Whether [`Index::health_checks`] changed since the last call.
    pub fn take_health_changed(&mut self) -> bool {
        std::mem::take(&mut self.health_changed)
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

    // ----- Services -------------------------------------------------------

    /// Adds or replaces a Service. A malformed Service is rejected and its
    /// previous version (if any) stays.
    pub fn apply_service(&mut self, svc: &K8sService) -> Result<(), Malformed> {
        match service_info(svc) {
            Err(e) => {
                self.stats.malformed += 1;
                Err(e)
            }
            Ok(info) => {
                // service_info checked the reference.
                if let Some(key) = ObjectRef::of(&svc.metadata) {
                    self.set_service(key, info);
                }
                Ok(())
            }
        }
    }

    pub fn delete_service(&mut self, svc: &K8sService) {
        if let Some(key) = ObjectRef::of(&svc.metadata) {
            self.set_service(key, None);
        }
    }

    /// Deletes a Service by reference (for objects that did not decode).
    pub fn delete_service_ref(&mut self, key: &ObjectRef) {
        self.set_service(key.clone(), None);
    }

    /// Replaces every Service by `items` (a relist). Returns the malformed
    /// ones; for each, a previous good version is kept.
    pub fn reset_services<'a>(
        &mut self,
        items: impl IntoIterator<Item = &'a K8sService>,
    ) -> Vec<Malformed> {
        self.reset_services_keeping(items, &[])
    }

    /// [`Index::reset_services`], where `keep` names listed Services that
    /// could not even be decoded: their previous version (if any) stays.
    pub fn reset_services_keeping<'a>(
        &mut self,
        items: impl IntoIterator<Item = &'a K8sService>,
        keep: &[ObjectRef],
    ) -> Vec<Malformed> {
        let mut errors = Vec::new();
        let mut next: HashMap<ObjectRef, Option<ServiceInfo>> = HashMap::new();
        for key in keep {
            let old = self.services.get(key).map(|s| (**s).clone());
            next.insert(key.clone(), old);
        }
        for svc in items {
            let Some(key) = ObjectRef::of(&svc.metadata) else {
                if let Err(e) = service_info(svc) {
                    self.stats.malformed += 1;
                    errors.push(e);
                }
                continue;
            };
            match service_info(svc) {
                Ok(info) => {
                    next.insert(key, info);
                }
                Err(e) => {
                    self.stats.malformed += 1;
                    errors.push(e);
                    // Keep the last good version: absent from `next` means
                    // deleted, so carry it over explicitly.
                    let old = self.services.get(&key).map(|s| (**s).clone());
                    next.insert(key, old);
                }
            }
        }
        let gone: Vec<ObjectRef> = self
            .services
            .keys()
            .filter(|k| !next.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            self.set_service(key, None);
        }
        for (key, info) in next {
            self.set_service(key, info);
        }
        errors
    }

    fn set_service(&mut self, key: ObjectRef, info: Option<ServiceInfo>) {
        let old = self.services.get(&key);
        if old.map(|o| &**o) == info.as_ref() {
            return;
        }
        match info {
            None => {
                self.services.remove(&key);
            }
            Some(info) => {
                for p in &info.skipped_ports {
                    let seen = old.is_some_and(|o| o.skipped_ports.contains(p));
                    if !seen {
                        self.stats.skipped_ports += 1;
                        tracing::info!(
                            service = %key,
                            port = p.port,
                            name = %p.name,
                            protocol = %p.protocol,
                            "skipping non-TCP service port"
                        );
                    }
                }
                self.services.insert(key.clone(), Arc::new(info));
            }
        }
        self.dirty.insert(key);
    }

    // ----- EndpointSlices -------------------------------------------------

    /// Adds or replaces an EndpointSlice. A malformed slice is rejected and
    /// its previous version (if any) stays.
    pub fn apply_slice(&mut self, slice: &EndpointSlice) -> Result<(), Malformed> {
        match slice_info(slice) {
            Err(e) => {
                self.stats.malformed += 1;
                Err(e)
            }
            Ok(info) => {
                if let Some(key) = ObjectRef::of(&slice.metadata) {
                    self.set_slice(key, info);
                }
                Ok(())
            }
        }
    }

    pub fn delete_slice(&mut self, slice: &EndpointSlice) {
        if let Some(key) = ObjectRef::of(&slice.metadata) {
            self.set_slice(key, None);
        }
    }

    /// Deletes an EndpointSlice by reference (for objects that did not
    /// decode).
    pub fn delete_slice_ref(&mut self, key: &ObjectRef) {
        self.set_slice(key.clone(), None);
    }

    /// Replaces every EndpointSlice by `items` (a relist). Returns the
    /// malformed ones; for each, a previous good version is kept.
    pub fn reset_slices<'a>(
        &mut self,
        items: impl IntoIterator<Item = &'a EndpointSlice>,
    ) -> Vec<Malformed> {
        self.reset_slices_keeping(items, &[])
    }

    /// [`Index::reset_slices`], where `keep` names listed slices that could
    /// not even be decoded: their previous version (if any) stays.
    pub fn reset_slices_keeping<'a>(
        &mut self,
        items: impl IntoIterator<Item = &'a EndpointSlice>,
        keep: &[ObjectRef],
    ) -> Vec<Malformed> {
        let mut errors = Vec::new();
        let mut next: HashMap<ObjectRef, Option<SliceInfo>> = HashMap::new();
        for key in keep {
            let old = self.current_slice(key).map(|s| (**s).clone());
            next.insert(key.clone(), old);
        }
        for slice in items {
            let Some(key) = ObjectRef::of(&slice.metadata) else {
                if let Err(e) = slice_info(slice) {
                    self.stats.malformed += 1;
                    errors.push(e);
                }
                continue;
            };
            match slice_info(slice) {
                Ok(info) => {
                    next.insert(key, info);
                }
                Err(e) => {
                    self.stats.malformed += 1;
                    errors.push(e);
                    let old = self.current_slice(&key).map(|s| (**s).clone());
                    next.insert(key, old);
                }
            }
        }
        let gone: Vec<ObjectRef> = self
            .slice_owner
            .keys()
            .filter(|k| !next.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            self.set_slice(key, None);
        }
        for (key, info) in next {
            self.set_slice(key, info);
        }
        errors
    }

    fn current_slice(&self, key: &ObjectRef) -> Option<&Arc<SliceInfo>> {
        let owner = self.slice_owner.get(key)?;
        self.slices.get(owner)?.get(&key.name)
    }

    fn set_slice(&mut self, key: ObjectRef, info: Option<SliceInfo>) {
        if self.current_slice(&key).map(|s| &**s) == info.as_ref() {
            return;
        }
        if let Some(old_owner) = self.slice_owner.remove(&key) {
            if let Some(m) = self.slices.get_mut(&old_owner) {
                m.remove(&key.name);
                if m.is_empty() {
                    self.slices.remove(&old_owner);
                }
            }
            self.dirty.insert(old_owner);
        }
        if let Some(info) = info {
            if let Some(t) = info.trigger_time_ns {
                self.triggers.push(t);
            }
            let owner = ObjectRef::new(key.namespace.clone(), info.service.clone());
            self.slices
                .entry(owner.clone())
                .or_default()
                .insert(key.name.clone(), Arc::new(info));
            self.slice_owner.insert(key, owner.clone());
            self.dirty.insert(owner);
        }
    }

    // ----- Node -----------------------------------------------------------

    /// Applies this node's Node object (others are ignored).
    pub fn apply_node(&mut self, node: &Node) {
        if self.node_name.is_some() && node.metadata.name == self.node_name {
            self.set_node(node_info(node));
        }
    }

    pub fn delete_node(&mut self, node: &Node) {
        if self.node_name.is_some() && node.metadata.name == self.node_name {
            self.set_node(NodeInfo::default());
        }
    }

    /// Replaces the Node (a relist).
    pub fn reset_nodes<'a>(&mut self, items: impl IntoIterator<Item = &'a Node>) {
        let ours = items
            .into_iter()
            .find(|n| self.node_name.is_some() && n.metadata.name == self.node_name);
        self.set_node(ours.map(node_info).unwrap_or_default());
    }

    fn set_node(&mut self, info: NodeInfo) {
        if info == self.node {
            return;
        }
        // Zone and addresses feed every Service: rare, so rebuild all.
        self.node = info;
        self.dirty.extend(self.services.keys().cloned());
    }

    fn node_addresses(&self) -> &[IpAddr] {
        if self.fixed_addresses.is_empty() {
            &self.node.addresses
        } else {
            &self.fixed_addresses
        }
    }

    // ----- Building -------------------------------------------------------

    /// Recomputes the dirty Services into the working table. Returns whether
    /// the table changed since the last call; if so, publish
    /// `self.table().clone()` (O(1)).
    pub fn build(&mut self) -> bool {
        let dirty: Vec<ObjectRef> = self.dirty.drain().collect();
        for key in dirty {
            self.rebuild(&key);
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
            let mut claims: Vec<(ListenKey, Claim, Arc<Service>)> = Vec::new();
            for port in &info.ports {
                let name = port.entry_name(key);
                for family in [Family::V4, Family::V6] {
                    let of = |ips: &[IpAddr]| -> Vec<IpAddr> {
                        ips.iter()
                            .filter(|ip| Family::of(ip) == family)
                            .copied()
                            .collect()
                    };
                    let cluster = of(&info.cluster_ips);
                    let mut external: Vec<SocketAddr> = of(&info.external_ips)
                        .into_iter()
                        .chain(of(&info.load_balancer_ips))
                        .map(|ip| SocketAddr::new(ip, port.port))
                        .collect();
                    if info.node_ports
                        && let Some(np) = port.node_port
                    {
                        external.extend(
                            of(self.node_addresses())
                                .into_iter()
                                .map(|ip| SocketAddr::new(ip, np)),
                        );
                    }
                    if cluster.is_empty() && external.is_empty() {
                        continue;
                    }
                    let eps: Vec<(SocketAddr, &EndpointInfo)> = slices
                        .values()
                        .filter(|s| s.family == family)
                        .filter_map(|s| s.ports.get(&port.name).map(|p| (s, *p)))
                        .flat_map(|(s, p)| {
                            s.endpoints
                                .iter()
                                .map(move |e| (SocketAddr::new(e.ip, p), e))
                        })
                        .collect();
                    let cluster_svc = (!cluster.is_empty()).then(|| {
                        Arc::new(self.make_service(&name, &info, &eps, info.internal_local))
                    });
                    let external_svc = if external.is_empty() {
                        None
                    } else {
                        match &cluster_svc {
                            Some(c) if !info.internal_local && !info.external_local => {
                                Some(c.clone())
                            }
                            _ => Some(Arc::new(self.make_service(
                                &name,
                                &info,
                                &eps,
                                info.external_local,
                            ))),
                        }
                    };
                    if let Some(svc) = cluster_svc {
                        for ip in cluster {
                            claims.push((
                                ListenKey::tcp(SocketAddr::new(ip, port.port)),
                                (name.clone(), Variant::Cluster),
                                svc.clone(),
                            ));
                        }
                    }
                    if let Some(svc) = external_svc {
                        for addr in external {
                            claims.push((
                                ListenKey::tcp(addr),
                                (name.clone(), Variant::External),
                                svc.clone(),
                            ));
                        }
                    }
                }
            }
            if let Some(port) = info.health_check_node_port {
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
                if let Some(((other, _), _)) = entry.iter().find(|((n, _), _)| *n != claim.0) {
                    self.stats.conflicts += 1;
                    tracing::warn!(
                        listen = %lk,
                        service = %claim.0,
                        other = %other,
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

    fn is_local(&self, ep: &EndpointInfo) -> bool {
        self.node_name.is_some() && ep.node_name == self.node_name
    }

    /// The entry for one port and family: local endpoints when `local`, else
    /// topology-filtered ones. Eligibility is decided by [`Service::new`].
    fn make_service(
        &self,
        name: &str,
        info: &ServiceInfo,
        eps: &[(SocketAddr, &EndpointInfo)],
        local: bool,
    ) -> Service {
        let backends: Vec<Backend> = if local {
            eps.iter()
                .filter(|(_, e)| self.is_local(e))
                .map(|(a, e)| Backend::new(*a, e.conditions))
                .collect()
        } else if let Some(zone) = self.topology_zone(eps) {
            // Ready endpoints hinted for this zone; others that are not
            // ready stay listed (for draining) but no fallback to them
            // happens since a ready one exists.
            eps.iter()
                .filter(|(_, e)| {
                    !e.conditions.ready
                        || e.zones
                            .as_ref()
                            .is_some_and(|z| z.iter().any(|z| z == zone))
                })
                .map(|(a, e)| Backend::new(*a, e.conditions))
                .collect()
        } else {
            eps.iter()
                .map(|(a, e)| Backend::new(*a, e.conditions))
                .collect()
        };
        Service::new(name, Policy::RoundRobin, info.affinity, backends)
    }

    /// This node's zone when topology hints apply: every ready endpoint
    /// carries `hints.forZones` and one of them names this zone (kube-proxy's
    /// rule; only ready endpoints are considered, as kube-proxy does).
    fn topology_zone(&self, eps: &[(SocketAddr, &EndpointInfo)]) -> Option<&str> {
        let zone = self.node.zone.as_deref()?;
        let mut any_ready = false;
        let mut hit = false;
        for (_, e) in eps.iter().filter(|(_, e)| e.conditions.ready) {
            any_ready = true;
            match &e.zones {
                None => return None,
                Some(z) => hit |= z.iter().any(|z| z == zone),
            }
        }
        (any_ready && hit).then_some(zone)
    }
}

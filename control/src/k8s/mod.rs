//! Kubernetes objects to table entries, with kube-proxy's semantics. Pure:
//! no `kube` import, no I/O (the watcher lives in [`crate::source::kube`]).
//!
//! Rules implemented (see issue 3):
//! - Slices join their Service through `kubernetes.io/service-name`; all
//!   slices of a Service are merged and an address is kept once: its most
//!   usable copy (ready over serving over terminating, as kube-proxy), so a
//!   new pod reusing a terminating pod's IP gets new connections. IPv4 and
//!   IPv6 slices are served (each listen IP gets endpoints of its family);
//!   FQDN slices are ignored. An endpoint's first address is its address.
//! - Conditions default as the API says (`ready` unset: true; `serving`
//!   unset: `ready`; `terminating` unset: false); [`crate::Service::new`]
//!   picks ready ones, else serving-and-terminating ones.
//! - A Service port uses the slice port of the same name (the resolved
//!   target port, which may differ per slice). Only TCP is proxied; other
//!   protocols are logged once and counted.
//! - Listen keys: every `clusterIPs` entry, `externalIPs`, load-balancer
//!   ingress IPs (not `ipMode: Proxy`), and `nodePort` on the node addresses
//!   for NodePort and LoadBalancer Services, each only in the IP families
//!   of the Service's cluster IPs (kube-proxy ignores a Service in a family
//!   where it has none; without any cluster IP, nothing). Headless and ExternalName
//!   Services, and those labelled `service.kubernetes.io/service-proxy-name`,
//!   are skipped.
//! - When this node's Node is deleted or missing from a relist, node ports
//!   stay on its last known addresses (kube-proxy keeps the addresses it
//!   found at start-up); its zone is forgotten, so zone hints are unused.
//! - `internalTrafficPolicy: Local` (cluster IPs) and
//!   `externalTrafficPolicy: Local` (external IPs, LB IPs, node ports): only
//!   endpoints on this node, no fallback. `healthCheckNodePort` entries are
//!   reported by [`Index::health_checks`].
//! - `sessionAffinity: ClientIP` with its timeout (default 10800 s).
//! - Topology hints (kube-proxy's rule), for cluster-wide traffic: when
//!   every ready endpoint has `hints.forNodes` and one names this node
//!   (`trafficDistribution: PreferSameNode`), only ready endpoints hinted
//!   for this node are used; otherwise, when every ready endpoint has
//!   `hints.forZones` and one names this node's zone, only ready endpoints
//!   hinted for the zone.
//! - A bad element (an address that does not parse, even with kube-proxy's
//!   sloppy IPv4 parse that takes leading zeros; a port out of range; an
//!   endpoint without an address or of the other family) is left out,
//!   counted and logged once per object; the rest of the object is used.
//! - A malformed object (no name, no spec, an affinity timeout out of range)
//!   is rejected with its namespace/name; the previous version of that
//!   object stays, everything else updates.

pub mod convert;
pub mod index;

pub use convert::{Malformed, ObjectRef};
pub use index::{HealthCheck, Index, IndexStats, Watched};

#[cfg(test)]
mod tests;

//! Conversion of Kubernetes objects into the plain facts the index needs.
//!
//! Each function reads one object and answers: `Ok(Some(info))` to use it,
//! `Ok(None)` when sluice must leave it alone (headless, ExternalName, owned
//! by another proxy, FQDN slice, slice of no Service), or `Err(Malformed)`
//! naming the object and what is wrong with it. Defaults are applied here,
//! exactly once, as Kubernetes documents them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::cidr::Cidr;
use crate::table::{Affinity, Conditions, Policy, Protocol, ProxyProtocol, Settings};

/// Label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label handing a Service to another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Annotation on an EndpointSlice: when the change it carries was triggered.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Annotation on a Service choosing its scheduler (a [`Policy`] name);
/// unset or unknown: the node default (`--scheduler`).
pub const SCHEDULER_ANNOTATION: &str = "sluice.io/scheduler";
/// Annotation on a Service: most connections each of its ports serves at
/// once on this node ([`Settings::max_connections`]); bad: the node default.
pub const MAX_CONNECTIONS_ANNOTATION: &str = "sluice.io/max-connections";
/// Annotation on a Service: idle timeout of its connections
/// ([`Settings::idle_timeout`]); bad: none.
pub const IDLE_TIMEOUT_ANNOTATION: &str = "sluice.io/idle-timeout";
/// Annotation on a Service: send its backends a PROXY protocol header
/// (`v2`) on every TCP connection ([`Settings::proxy_protocol`]); bad:
/// none.
pub const PROXY_PROTOCOL_ANNOTATION: &str = "sluice.io/proxy-protocol";

/// Annotation overriding the idle timeout of the Service's UDP flows
/// ([`crate::Settings::udp_timeout`]): whole seconds, bare (`"5"`) or with
/// a unit (`"5s"`, `"2m"`, `"1h"`), within [`UDP_TIMEOUT_RANGE`].
pub const UDP_TIMEOUT_ANNOTATION: &str = "sluice.io/udp-timeout";

/// Annotation turning the re-send of unanswered UDP datagrams on or off
/// for the Service ([`crate::Settings::udp_resend`]): `"true"` or
/// `"false"`; bad: the default (on for port 53).
pub const UDP_RESEND_ANNOTATION: &str = "sluice.io/udp-resend";

/// Parses a [`UDP_RESEND_ANNOTATION`] value.
pub fn parse_udp_resend(value: &str) -> Result<bool, String> {
    match value.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("{value:?} is not \"true\" or \"false\"")),
    }
}

/// The value of a Service's annotation `name` as `parse` reads it: `None`
/// when absent or bad. A bad value is skipped with its error, naming the
/// annotation (the Service is served with the default).
fn annotation<T, E: fmt::Display>(
    meta: &ObjectMeta,
    name: &str,
    parse: impl FnOnce(&str) -> Result<T, E>,
    skipped: &mut Vec<String>,
) -> Option<T> {
    let value = meta.annotations.as_ref()?.get(name)?;
    (parse(value))
        .inspect_err(|e| skipped.push(format!("annotation {name}: {e}")))
        .ok()
}

/// Valid values of [`UDP_TIMEOUT_ANNOTATION`], in seconds.
pub const UDP_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 1..=86_400;

/// Parses a [`UDP_TIMEOUT_ANNOTATION`] value.
pub fn parse_udp_timeout(value: &str) -> Result<Duration, String> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, unit) = v.split_at(split);
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("{value:?} has an unknown unit (valid: s, m, h)")),
    };
    let secs = (digits.parse::<u64>().ok())
        .and_then(|n| n.checked_mul(scale))
        .filter(|s| UDP_TIMEOUT_RANGE.contains(s))
        .ok_or_else(|| {
            let (min, max) = UDP_TIMEOUT_RANGE.into_inner();
            format!("{value:?} is not a duration within {min}..={max} seconds")
        })?;
    Ok(Duration::from_secs(secs))
}
/// Label on a Node naming its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Longest `sessionAffinityConfig.clientIP.timeoutSeconds` Kubernetes accepts.
const MAX_AFFINITY_SECONDS: i32 = 86_400;

/// `namespace/name` of an object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The reference of a namespaced object; `None` when a name is missing.
    pub fn of(meta: &ObjectMeta) -> Option<Self> {
        let name = meta.name.as_deref().filter(|n| !n.is_empty())?;
        let namespace = meta.namespace.as_deref().filter(|n| !n.is_empty())?;
        Some(Self::new(namespace, name))
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An object sluice cannot use, with what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {kind} {object}: {reason}")]
pub struct Malformed {
    pub kind: &'static str,
    /// `namespace/name`, or what is known of it.
    pub object: String,
    pub reason: String,
}

impl Malformed {
    pub fn new(kind: &'static str, meta: &ObjectMeta, reason: impl Into<String>) -> Self {
        let object = match (&meta.namespace, &meta.name) {
            (Some(ns), Some(n)) => format!("{ns}/{n}"),
            (None, Some(n)) => n.clone(),
            (Some(ns), None) => format!("{ns}/<no name>"),
            (None, None) => "<no name>".to_owned(),
        };
        Self {
            kind,
            object,
            reason: reason.into(),
        }
    }
}

/// IP family of an address or an EndpointSlice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// One TCP or UDP port of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortInfo {
    /// Port name; empty when unnamed.
    pub name: String,
    pub port: u16,
    pub node_port: Option<u16>,
    /// TCP (the default) or UDP.
    pub protocol: Protocol,
}

impl ServicePortInfo {
    /// The table name of this port: `namespace/name:portname`, or
    /// `namespace/name:port` when unnamed.
    pub fn entry_name(&self, svc: &ObjectRef) -> String {
        if self.name.is_empty() {
            format!("{svc}:{}", self.port)
        } else {
            format!("{svc}:{}", self.name)
        }
    }
}

/// A port sluice does not proxy (SCTP, or an unknown protocol), kept to be
/// logged and counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedPort {
    pub name: String,
    pub port: i32,
    pub protocol: String,
}

/// Which endpoints serve a kind of traffic: all of them (`Cluster`, topology
/// hints applying) or only this node's (`Local`, no fallback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

impl TrafficPolicy {
    /// A `*TrafficPolicy` field: unset or anything but `Local` is `Cluster`.
    fn of(field: Option<&str>) -> Self {
        match field {
            Some("Local") => TrafficPolicy::Local,
            _ => TrafficPolicy::Cluster,
        }
    }
}

/// What the index needs of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub ports: Vec<ServicePortInfo>,
    pub skipped_ports: Vec<SkippedPort>,
    /// `clusterIPs` (or `clusterIP`), dual-stack.
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` whose `ipMode` is not `Proxy`.
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges` (both families; spaces trimmed, bad
    /// ones skipped, as kube-proxy does): who may reach the load-balancer
    /// IPs. Empty: everyone.
    pub load_balancer_source_ranges: Vec<Cidr>,
    /// Type NodePort or LoadBalancer: `nodePort` is served on node addresses.
    pub node_ports: bool,
    /// `internalTrafficPolicy`: for cluster IPs.
    pub internal_policy: TrafficPolicy,
    /// `externalTrafficPolicy`: for external IPs, LB IPs and node ports.
    pub external_policy: TrafficPolicy,
    pub affinity: Option<Affinity>,
    /// `sluice.io/scheduler`, when set to a known scheduler; `None`: the
    /// node default.
    pub scheduler: Option<Policy>,
    /// From the `sluice.io/max-connections`, `sluice.io/idle-timeout`,
    /// `sluice.io/udp-timeout` and `sluice.io/proxy-protocol` annotations;
    /// a bad value is skipped (default kept).
    pub settings: Settings,
    /// Served only for LoadBalancer Services with `externalTrafficPolicy: Local`.
    pub health_check_node_port: Option<u16>,
    /// Fields left out because they are bad (an address that does not
    /// parse, a port out of range), each saying what and why; the rest of
    /// the Service is used, as kube-proxy does.
    pub skipped: Vec<String>,
}

/// Parses an address as kube-proxy does (`ParseIPSloppy`): also IPv4 with
/// leading zeros, read as decimal (`010.000.000.001` is 10.0.0.1).
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    s.parse().ok().or_else(|| parse_ipv4_leading_zeros(s))
}

fn parse_ipv4_leading_zeros(s: &str) -> Option<IpAddr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = part.trim_start_matches('0');
        *octet = if digits.is_empty() {
            0
        } else {
            digits.parse().ok()?
        };
    }
    parts.next().is_none().then(|| IpAddr::from(octets))
}

fn parse_port(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

/// The protocol of a Service or EndpointSlice port that sluice serves:
/// TCP (also when unset, the API default) and UDP. SCTP is not served: a
/// userspace proxy would need SCTP sockets (kernel module `sctp`, absent on
/// many nodes) and multi-homing has no place in a per-node L4 proxy.
fn served_protocol(protocol: Option<&str>) -> Option<Protocol> {
    match protocol {
        None | Some("TCP") => Some(Protocol::Tcp),
        Some("UDP") => Some(Protocol::Udp),
        Some(_) => None,
    }
}

/// Converts a Service. `Ok(None)`: not sluice's to serve.
pub fn service_info(svc: &Service) -> Result<Option<ServiceInfo>, Malformed> {
    let meta = &svc.metadata;
    let bad = |reason: String| Malformed::new("Service", meta, reason);
    if ObjectRef::of(meta).is_none() {
        return Err(bad("no namespace or name".into()));
    }
    if meta
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL))
    {
        return Ok(None);
    }
    let Some(spec) = &svc.spec else {
        return Err(bad("no spec".into()));
    };
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    if type_ == "ExternalName" {
        return Ok(None);
    }
    let cluster_strings: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) => vec![ip.as_str()],
        _ => vec![],
    };
    if cluster_strings.contains(&"None") {
        return Ok(None); // headless
    }
    let mut skipped = Vec::new();
    let mut ips = |field: &str, strings: &mut dyn Iterator<Item = &str>| -> Vec<IpAddr> {
        let mut ips = Vec::new();
        for s in strings {
            match parse_ip(s) {
                Some(ip) => ips.push(ip),
                None => skipped.push(format!("{field} {s:?} is not an IP")),
            }
        }
        ips
    };
    let cluster_ips = ips(
        "clusterIP",
        &mut cluster_strings.iter().copied().filter(|s| !s.is_empty()),
    );
    let external_ips = ips(
        "externalIP",
        &mut spec.external_ips.iter().flatten().map(String::as_str),
    );
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    let load_balancer_ips = ips(
        "loadBalancer ingress ip",
        &mut ingress
            .into_iter()
            .flatten()
            .filter(|ing| ing.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|ing| ing.ip.as_deref()),
    );
    let mut load_balancer_source_ranges = Vec::new();
    for s in spec.load_balancer_source_ranges.iter().flatten() {
        match s.parse::<Cidr>() {
            Ok(cidr) => load_balancer_source_ranges.push(cidr),
            Err(e) => skipped.push(format!("loadBalancerSourceRanges: {e}")),
        }
    }
    let node_ports = matches!(type_, "NodePort" | "LoadBalancer");
    let mut ports = Vec::new();
    let mut skipped_ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let name = p.name.clone().unwrap_or_default();
        let Some(port) = parse_port(p.port) else {
            skipped.push(format!("port {:?} number {} out of range", name, p.port));
            continue;
        };
        let Some(protocol) = served_protocol(p.protocol.as_deref()) else {
            skipped_ports.push(SkippedPort {
                name,
                port: p.port,
                protocol: p.protocol.clone().unwrap_or_default(),
            });
            continue;
        };
        let node_port = match p.node_port {
            Some(n) if node_ports => parse_port(n).or_else(|| {
                skipped.push(format!("port {name:?} nodePort {n} out of range"));
                None
            }),
            _ => None,
        };
        ports.push(ServicePortInfo {
            name,
            port,
            node_port,
            protocol,
        });
    }
    let affinity = match spec.session_affinity.as_deref() {
        Some("ClientIP") => {
            let secs = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            let timeout = match secs {
                None => Affinity::DEFAULT_TIMEOUT,
                Some(s) if (1..=MAX_AFFINITY_SECONDS).contains(&s) => {
                    Duration::from_secs(s.unsigned_abs().into())
                }
                Some(s) => {
                    return Err(bad(format!(
                        "sessionAffinityConfig.clientIP.timeoutSeconds {s} outside 1..={MAX_AFFINITY_SECONDS}"
                    )));
                }
            };
            Some(Affinity { timeout })
        }
        _ => None,
    };
    let external_policy = TrafficPolicy::of(spec.external_traffic_policy.as_deref());
    let health_check_node_port = match spec.health_check_node_port {
        Some(p) if type_ == "LoadBalancer" && external_policy == TrafficPolicy::Local => {
            parse_port(p).or_else(|| {
                skipped.push(format!("healthCheckNodePort {p} out of range"));
                None
            })
        }
        _ => None,
    };
    let scheduler = annotation(
        meta,
        SCHEDULER_ANNOTATION,
        str::parse::<Policy>,
        &mut skipped,
    );
    // In this order, as the skipped fields are listed.
    let settings = Settings {
        max_connections: annotation(
            meta,
            MAX_CONNECTIONS_ANNOTATION,
            Settings::parse_max_connections,
            &mut skipped,
        ),
        idle_timeout: annotation(
            meta,
            IDLE_TIMEOUT_ANNOTATION,
            Settings::parse_idle_timeout,
            &mut skipped,
        ),
        udp_timeout: annotation(
            meta,
            UDP_TIMEOUT_ANNOTATION,
            parse_udp_timeout,
            &mut skipped,
        ),
        proxy_protocol: annotation(
            meta,
            PROXY_PROTOCOL_ANNOTATION,
            str::parse::<ProxyProtocol>,
            &mut skipped,
        ),
        udp_resend: annotation(meta, UDP_RESEND_ANNOTATION, parse_udp_resend, &mut skipped),
        ..Settings::default()
    };
    Ok(Some(ServiceInfo {
        ports,
        skipped_ports,
        cluster_ips,
        external_ips,
        load_balancer_ips,
        load_balancer_source_ranges,
        node_ports,
        internal_policy: TrafficPolicy::of(spec.internal_traffic_policy.as_deref()),
        external_policy,
        affinity,
        scheduler,
        settings,
        health_check_node_port,
        skipped,
    }))
}

/// One endpoint of a slice, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    /// The endpoint's first address.
    pub ip: IpAddr,
    pub conditions: Conditions,
    pub node_name: Option<String>,
    /// `hints.forZones`; `None` when the endpoint carries no zone hint.
    pub zones: Option<Vec<String>>,
    /// `hints.forNodes` (`trafficDistribution: PreferSameNode`); `None` when
    /// the endpoint carries no node hint.
    pub nodes: Option<Vec<String>>,
}

/// What the index needs of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceInfo {
    /// Name of the Service (same namespace) from `kubernetes.io/service-name`.
    pub service: String,
    pub family: Family,
    /// TCP and UDP ports: name (empty when unnamed) to resolved target port.
    /// Port names are unique within a Service whatever their protocol, so
    /// the name alone matches a Service port.
    pub ports: BTreeMap<String, u16>,
    pub endpoints: Vec<EndpointInfo>,
    /// `endpoints.kubernetes.io/last-change-trigger-time`, in nanoseconds
    /// since the Unix epoch, when present and parseable.
    pub trigger_time_ns: Option<i128>,
    /// Ports and endpoints left out because they are bad (port out of range,
    /// no address, an address that does not parse or is of the other
    /// family), each saying what and why; the rest of the slice is used.
    pub skipped: Vec<String>,
}

/// Converts an EndpointSlice. `Ok(None)`: FQDN (or unknown) address type, or
/// no `kubernetes.io/service-name` label.
pub fn slice_info(slice: &EndpointSlice) -> Result<Option<SliceInfo>, Malformed> {
    let meta = &slice.metadata;
    let bad = |reason: String| Malformed::new("EndpointSlice", meta, reason);
    if ObjectRef::of(meta).is_none() {
        return Err(bad("no namespace or name".into()));
    }
    let family = match slice.address_type.as_str() {
        "IPv4" => Family::V4,
        "IPv6" => Family::V6,
        _ => return Ok(None),
    };
    let Some(service) = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .filter(|s| !s.is_empty())
    else {
        return Ok(None);
    };
    let mut skipped = Vec::new();
    let mut ports = BTreeMap::new();
    for p in slice.ports.iter().flatten() {
        if served_protocol(p.protocol.as_deref()).is_none() {
            continue;
        }
        let name = p.name.clone().unwrap_or_default();
        let Some(num) = p.port else { continue };
        match parse_port(num) {
            Some(port) => {
                ports.insert(name, port);
            }
            None => skipped.push(format!("port {name:?} number {num} out of range")),
        }
    }
    let mut endpoints = Vec::new();
    for ep in slice.endpoints.iter().flatten() {
        let Some(first) = ep.addresses.first() else {
            skipped.push("an endpoint has no address".to_owned());
            continue;
        };
        let Some(ip) = parse_ip(first) else {
            skipped.push(format!("endpoint address {first:?} is not an IP"));
            continue;
        };
        if Family::of(&ip) != family {
            let address_type = &slice.address_type;
            skipped.push(format!("endpoint address {first} is not {address_type}"));
            continue;
        }
        let c = ep.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let conditions = Conditions {
            ready,
            serving: c.and_then(|c| c.serving).unwrap_or(ready),
            terminating: c.and_then(|c| c.terminating).unwrap_or(false),
        };
        let hints = ep.hints.as_ref();
        let zones = (hints.and_then(|h| h.for_zones.as_ref()))
            .filter(|z| !z.is_empty())
            .map(|z| z.iter().map(|z| z.name.clone()).collect());
        let nodes = (hints.and_then(|h| h.for_nodes.as_ref()))
            .filter(|n| !n.is_empty())
            .map(|n| n.iter().map(|n| n.name.clone()).collect());
        endpoints.push(EndpointInfo {
            ip,
            conditions,
            node_name: ep.node_name.clone(),
            zones,
            nodes,
        });
    }
    let trigger_time_ns = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(|t| t.as_nanosecond());
    Ok(Some(SliceInfo {
        service: service.clone(),
        family,
        ports,
        endpoints,
        trigger_time_ns,
        skipped,
    }))
}

/// What the index needs of this node's Node object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub zone: Option<String>,
    /// `status.addresses` of type InternalIP and ExternalIP that parse.
    pub addresses: Vec<IpAddr>,
    /// Not being removed: no deletion timestamp and no
    /// `ToBeDeletedByClusterAutoscaler` taint (kube-proxy's rule for
    /// `nodeEligible` on `/healthz`).
    pub eligible: bool,
    /// `spec.podCIDRs` (else `spec.podCIDR`) that parse, sorted: this
    /// node's pod networks (`--detect-local-mode NodeCIDR`).
    pub pod_cidrs: Vec<crate::cidr::Cidr>,
}

/// The taint the cluster autoscaler puts on a node it is removing.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Converts a Node. Addresses that do not parse are left out.
pub fn node_info(node: &Node) -> NodeInfo {
    let zone = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ZONE_LABEL))
        .cloned();
    let mut addresses: Vec<IpAddr> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| parse_ip(&a.address))
        .collect();
    addresses.sort();
    addresses.dedup();
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    let eligible = node.metadata.deletion_timestamp.is_none() && !tainted;
    let spec = node.spec.as_ref();
    let listed = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    let single = spec.and_then(|s| s.pod_cidr.clone());
    let texts = if listed.is_empty() {
        single.into_iter().collect()
    } else {
        listed
    };
    let mut pod_cidrs = Vec::new();
    for text in &texts {
        match text.parse::<crate::cidr::Cidr>() {
            Ok(c) => pod_cidrs.push(c),
            Err(e) => tracing::warn!(node = ?node.metadata.name, "skipping a pod CIDR: {e}"),
        }
    }
    pod_cidrs.sort();
    pod_cidrs.dedup();
    NodeInfo {
        zone,
        addresses,
        eligible,
        pod_cidrs,
    }
}

#[cfg(test)]
pub(crate) mod settings_tests {
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};

    use super::*;

    /// `default/web` on 10.96.0.1:80 with these annotations.
    pub(crate) fn web(annotations: &[(&str, &str)]) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some("default".into()),
                name: Some("web".into()),
                annotations: Some(
                    (annotations.iter())
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ips: Some(vec!["10.96.0.1".into()]),
                ports: Some(vec![ServicePort {
                    port: 80,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn limit_and_idle_timeout_annotations_are_read() {
        let info = service_info(&web(&[
            (MAX_CONNECTIONS_ANNOTATION, "100"),
            (IDLE_TIMEOUT_ANNOTATION, "5m"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(info.settings.max_connections, Some(100));
        assert_eq!(info.settings.idle_timeout, Some(Duration::from_secs(300)));
        assert!(info.skipped.is_empty(), "{:?}", info.skipped);
        let none = service_info(&web(&[])).unwrap().unwrap();
        assert_eq!(none.settings, Settings::default());
    }

    #[test]
    fn the_proxy_protocol_annotation_is_read() {
        for value in ["v2", " v2 "] {
            let info = service_info(&web(&[(PROXY_PROTOCOL_ANNOTATION, value)]))
                .unwrap()
                .unwrap();
            assert_eq!(info.settings.proxy_protocol, Some(ProxyProtocol::V2));
            assert!(info.skipped.is_empty(), "{:?}", info.skipped);
        }
        let none = service_info(&web(&[])).unwrap().unwrap();
        assert_eq!(none.settings.proxy_protocol, None);
    }

    #[test]
    fn every_bad_annotation_is_skipped_with_its_exact_text_in_order() {
        let info = service_info(&web(&[
            (SCHEDULER_ANNOTATION, "fastest"),
            (MAX_CONNECTIONS_ANNOTATION, "lots"),
            (IDLE_TIMEOUT_ANNOTATION, "10ms"),
            (UDP_TIMEOUT_ANNOTATION, "5d"),
            (PROXY_PROTOCOL_ANNOTATION, "v1"),
            (UDP_RESEND_ANNOTATION, "yes"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(info.scheduler, None);
        assert_eq!(info.settings, Settings::default());
        assert_eq!(
            info.skipped,
            [
                "annotation sluice.io/scheduler: unknown scheduler \"fastest\" (valid: round-robin, least-connections, maglev, source-hash)",
                "annotation sluice.io/max-connections: \"lots\" is not an integer in 1..=4294967295",
                "annotation sluice.io/idle-timeout: \"10ms\" is shorter than 1s",
                "annotation sluice.io/udp-timeout: \"5d\" has an unknown unit (valid: s, m, h)",
                "annotation sluice.io/proxy-protocol: \"v1\" is not a PROXY protocol version sluice sends (valid: v2)",
                "annotation sluice.io/udp-resend: \"yes\" is not \"true\" or \"false\"",
            ]
        );
        // Good values are all read.
        let info = service_info(&web(&[
            (SCHEDULER_ANNOTATION, "maglev"),
            (UDP_TIMEOUT_ANNOTATION, "2m"),
            (UDP_RESEND_ANNOTATION, "false"),
        ]))
        .unwrap()
        .unwrap();
        assert!(info.skipped.is_empty(), "{:?}", info.skipped);
        assert_eq!(info.scheduler, Some(Policy::Maglev));
        assert_eq!(info.settings.udp_timeout, Some(Duration::from_secs(120)));
        assert_eq!(info.settings.udp_resend, Some(false));
    }

    #[test]
    fn a_bad_value_is_skipped_naming_it_and_the_service_keeps_the_default() {
        for (name, value) in [
            (MAX_CONNECTIONS_ANNOTATION, "0"),
            (MAX_CONNECTIONS_ANNOTATION, "-3"),
            (MAX_CONNECTIONS_ANNOTATION, "lots"),
            (IDLE_TIMEOUT_ANNOTATION, "300"),
            (IDLE_TIMEOUT_ANNOTATION, "10ms"),
            (IDLE_TIMEOUT_ANNOTATION, "soon"),
            (PROXY_PROTOCOL_ANNOTATION, "v1"),
            (PROXY_PROTOCOL_ANNOTATION, "true"),
            (PROXY_PROTOCOL_ANNOTATION, "V2"),
            (PROXY_PROTOCOL_ANNOTATION, ""),
        ] {
            let info = service_info(&web(&[(name, value)])).unwrap().unwrap();
            assert_eq!(info.settings, Settings::default(), "{name}: {value}");
            assert_eq!(info.cluster_ips.len(), 1, "the Service is still served");
            assert_eq!(info.skipped.len(), 1, "{:?}", info.skipped);
            assert!(
                info.skipped[0].contains(name) && info.skipped[0].contains(value),
                "{:?}",
                info.skipped
            );
        }
    }
}

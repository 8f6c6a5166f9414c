//! The file's schema, declared once: what `sluice --config FILE` reads and
//! what tests and `sluice-bench` write.
//!
//! These are plain serde documents. Parsing one only checks the YAML shape
//! and types; the rules across fields (unique listen addresses and backends,
//! ranges, port 0, protocol) are checked when the file source turns it into
//! a [`crate::Table`] (see [`super::parse`]).

use std::fmt;
use std::net::SocketAddr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use super::tree::Quoted;
use crate::cidr::Cidr;
use crate::table::{Affinity, NoEndpoints, Policy, Protocol, ProxyProtocol};

/// The whole file: `services:` and nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConfigDoc {
    /// Keyed by `listen`; `services: []` is an empty table.
    pub services: Vec<ServiceDoc>,
}

/// One entry of `services:`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceDoc {
    /// Non-empty; used in logs and metrics.
    pub name: String,
    /// IP:port; IPv6 quoted in YAML (`"[::1]:8080"`).
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// `tcp` (the default) or `udp`; a TCP and a UDP service may share a
    /// listen address.
    #[serde(default)]
    pub protocol: Protocol,
    /// UDP only: idle timeout of a flow, in seconds (1..=86400); unset:
    /// kube-proxy's conntrack defaults (30 s unreplied, 120 s replied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_timeout_seconds: Option<u64>,
    #[serde(default)]
    pub policy: Policy,
    /// Client-IP affinity; `affinity: {}` for the default timeout.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub affinity: Option<AffinityDoc>,
    /// Most connections served at once (at least 1); unset: the node
    /// default (`--service-max-connections`).
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_connections: Option<u32>,
    /// Idle timeout of a connection, a duration such as `300s` or `5m`
    /// (at least 1s); unset: none.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_timeout: Option<String>,
    /// TCP only: `v2` sends each backend a PROXY protocol v2 header (the
    /// client's address and the `listen` address) before the client's
    /// bytes; unset: none.
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// `backends: []` for none.
    pub backends: Vec<BackendDoc>,
    /// With `--intercept nftables`, what the kernel does with new
    /// connections while no backend is eligible: `reject` (the default;
    /// what Kubernetes does for a Service without endpoints) or `drop`
    /// (what it does for a `Local` traffic policy without a local endpoint).
    #[serde(default, skip_serializing_if = "is_default")]
    pub no_endpoints: NoEndpoints,
    /// With `--intercept nftables`, the only client networks that may
    /// connect (CIDRs, as `loadBalancerSourceRanges`); empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<Cidr>,
    /// UDP only: re-send a datagram left unanswered for
    /// `--udp-resend-after` once to another backend (`true`), or never
    /// (`false`); unset: on for port 53 (DNS) only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_resend: Option<bool>,
    /// With `--source-ip=transparent`, clients that are not pods of this
    /// node keep their own IP towards the backend, as outside clients of
    /// an `externalTrafficPolicy: Local` Service do; only for backends
    /// whose replies route back through this node. Default `false`: such
    /// clients are dialed from the node's address.
    #[serde(default, skip_serializing_if = "is_default")]
    pub keep_external_client_ip: bool,
}

/// `affinity:` of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AffinityDoc {
    /// 1..=86400, as Kubernetes validates
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    #[serde(default = "AffinityDoc::default_timeout_seconds")]
    pub timeout_seconds: i64,
}

/// One entry of `backends:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendDoc {
    /// Unique within the service.
    #[serde(deserialize_with = "socket_addr")]
    pub address: SocketAddr,
    #[serde(default = "yes")]
    pub ready: bool,
    /// Unset means the same as `ready` (as in Kubernetes).
    #[serde(
        default,
        deserialize_with = "some",
        skip_serializing_if = "Option::is_none"
    )]
    pub serving: Option<bool>,
    #[serde(default)]
    pub terminating: bool,
    /// 0 means no new connections.
    #[serde(default = "one")]
    pub weight: u32,
}

/// What `listen` and `address` hold.
const ADDRESS: &str = "IP:port (IPv6 quoted: \"[::1]:80\")";

/// An optional field that, when given, is not null (`affinity:` alone is a
/// mistake, not the default).
fn some<'de, D: Deserializer<'de>, T: Deserialize<'de>>(de: D) -> Result<Option<T>, D::Error> {
    T::deserialize(de).map(Some)
}

/// A socket address, with messages that say how to write one.
fn socket_addr<'de, D: Deserializer<'de>>(de: D) -> Result<SocketAddr, D::Error> {
    struct Addr;

    impl Visitor<'_> for Addr {
        type Value = SocketAddr;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(ADDRESS)
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<SocketAddr, E> {
            s.parse().map_err(|_| {
                E::custom(format_args!(
                    "invalid socket address {} (expected {ADDRESS})",
                    Quoted(s)
                ))
            })
        }
    }

    de.deserialize_any(Addr)
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

/// Why a document could not be written as YAML.
pub type ToYamlError = serde_saphyr::ser::Error;

impl ConfigDoc {
    pub fn new(services: Vec<ServiceDoc>) -> Self {
        Self { services }
    }

    /// The document as the file source reads it.
    pub fn to_yaml(&self) -> Result<String, ToYamlError> {
        serde_saphyr::to_string(self)
    }
}

impl From<ServiceDoc> for ConfigDoc {
    fn from(service: ServiceDoc) -> Self {
        Self::new(vec![service])
    }
}

impl ServiceDoc {
    /// A TCP, round-robin service without affinity.
    pub fn new(name: impl Into<String>, listen: SocketAddr, backends: Vec<BackendDoc>) -> Self {
        Self {
            name: name.into(),
            listen,
            protocol: Protocol::Tcp,
            udp_timeout_seconds: None,
            policy: Policy::RoundRobin,
            affinity: None,
            max_connections: None,
            idle_timeout: None,
            proxy_protocol: None,
            backends,
            no_endpoints: NoEndpoints::default(),
            source_ranges: Vec::new(),
            udp_resend: None,
            keep_external_client_ip: false,
        }
    }

    /// What the kernel does while no backend is eligible (nftables mode).
    pub fn with_no_endpoints(mut self, no_endpoints: NoEndpoints) -> Self {
        self.no_endpoints = no_endpoints;
        self
    }

    /// Only these client networks may connect (nftables mode).
    pub fn with_source_ranges(mut self, ranges: Vec<Cidr>) -> Self {
        self.source_ranges = ranges;
        self
    }

    /// The same service over UDP.
    pub fn udp(mut self) -> Self {
        self.protocol = Protocol::Udp;
        self
    }

    /// Unanswered UDP datagrams are re-sent once elsewhere (`true`) or
    /// never (`false`), whatever the port.
    pub fn with_udp_resend(mut self, on: bool) -> Self {
        self.udp_resend = Some(on);
        self
    }

    /// UDP flows idle for `seconds` are closed.
    pub fn with_udp_timeout(mut self, seconds: u64) -> Self {
        self.udp_timeout_seconds = Some(seconds);
        self
    }

    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// At most `max` connections at once (`maxConnections`).
    pub fn with_max_connections(mut self, max: u32) -> Self {
        self.max_connections = Some(max);
        self
    }

    /// Idle timeout, as written in the file (`idleTimeout: 5m`).
    pub fn with_idle_timeout(mut self, timeout: impl Into<String>) -> Self {
        self.idle_timeout = Some(timeout.into());
        self
    }

    /// Backends get a PROXY protocol header first (`proxyProtocol`).
    pub fn with_proxy_protocol(mut self, version: ProxyProtocol) -> Self {
        self.proxy_protocol = Some(version);
        self
    }

    /// Client-IP affinity with this timeout (whole seconds).
    pub fn with_affinity(mut self, timeout_seconds: i64) -> Self {
        self.affinity = Some(AffinityDoc { timeout_seconds });
        self
    }
}

impl AffinityDoc {
    fn default_timeout_seconds() -> i64 {
        // 10800: fits.
        Affinity::DEFAULT_TIMEOUT
            .as_secs()
            .try_into()
            .unwrap_or(i64::MAX)
    }
}

impl Default for AffinityDoc {
    fn default() -> Self {
        Self {
            timeout_seconds: Self::default_timeout_seconds(),
        }
    }
}

impl BackendDoc {
    /// Ready (so serving), not terminating, weight 1.
    pub fn ready(address: SocketAddr) -> Self {
        Self {
            address,
            ready: true,
            serving: None,
            terminating: false,
            weight: 1,
        }
    }

    /// Neither ready nor serving: never picked.
    pub fn not_ready(address: SocketAddr) -> Self {
        Self {
            ready: false,
            ..Self::ready(address)
        }
    }

    /// Terminating but still serving: what Kubernetes shows during a pod's
    /// grace period.
    pub fn terminating(address: SocketAddr) -> Self {
        Self {
            ready: false,
            serving: Some(true),
            terminating: true,
            ..Self::ready(address)
        }
    }

    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }
}

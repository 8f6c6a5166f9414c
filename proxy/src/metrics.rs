//! Prometheus metrics (`prometheus-client`), rendered by the admin server.
//!
//! Label sets are bounded by what the live table holds: a service's series
//! are created with its listener and removed with it, a backend's with its
//! tracker entry. The connection path never looks a label set up: each
//! listener holds its [`ServiceMetrics`] and each tracked backend its
//! [`BackendMetrics`], handles that share the registered atomics.
//!
//! Every metric is listed, with its meaning, in docs/operations.md.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::connect::DialErrorKind;
use crate::forward::Outcome;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum CloseReason {
    /// Both directions ended with EOF.
    Closed,
    /// A peer reset or failed; the reset was propagated.
    Reset,
    /// Cut at the drain timeout or the end of the shutdown grace.
    Cut,
    /// No eligible backend accepted: the client was reset.
    NoBackend,
    /// No byte moved either way for the Service's idle timeout.
    Idle,
}

/// Label values in the Prometheus style (snake case).
macro_rules! label_values {
    ($t:ty { $($v:ident => $s:literal),* $(,)? }) => {
        impl $t {
            /// Every value: what a Service's or backend's series are
            /// removed over when it goes.
            pub const ALL: &'static [Self] = &[$(Self::$v),*];

            pub fn as_str(&self) -> &'static str {
                match self { $(Self::$v => $s),* }
            }
        }
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    };
}

label_values!(CloseReason { Closed => "closed", Reset => "reset", Cut => "cut", NoBackend => "no_backend", Idle => "idle_timeout" });
label_values!(Direction { ClientToBackend => "client_to_backend", BackendToClient => "backend_to_client" });
label_values!(DialReason { Refused => "refused", Unreachable => "unreachable", Timeout => "timeout", Local => "local", Other => "other" });

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    pub service: String,
    pub reason: CloseReason,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Direction {
    ClientToBackend,
    BackendToClient,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub service: String,
    pub direction: Direction,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum DialReason {
    Refused,
    Unreachable,
    Timeout,
    Local,
    Other,
}

impl From<DialErrorKind> for DialReason {
    fn from(k: DialErrorKind) -> Self {
        match k {
            DialErrorKind::Refused => DialReason::Refused,
            DialErrorKind::Unreachable => DialReason::Unreachable,
            DialErrorKind::Timeout => DialReason::Timeout,
            DialErrorKind::Local => DialReason::Local,
            DialErrorKind::Other => DialReason::Other,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DialLabels {
    pub backend: String,
    pub reason: DialReason,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: DialReason,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InterceptLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
}

/// Every metric sluice exports, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    accepted: Family<ServiceLabels, Counter>,
    active: Family<ServiceLabels, Gauge>,
    closed: Family<CloseLabels, Counter>,
    retries: Family<ServiceLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    backend_connections: Family<BackendLabels, Counter>,
    backend_active: Family<BackendLabels, Gauge>,
    dial_failures: Family<ReasonLabels, Counter>,
    backend_dial_failures: Family<DialLabels, Counter>,
    ejections: Counter,
    backend_ejections: Family<BackendLabels, Counter>,
    /// Dials that failed for want of a local resource: never ejections.
    local_dial_errors: Counter,
    accept_errors: Counter,
    limit_waits: Counter,
    /// Connections reset because their Service was at its own limit.
    service_limit_rejected: Family<ServiceLabels, Counter>,
    /// Local resource exhaustion, for `/healthz`.
    pub saturation: crate::saturation::Saturation,
    /// From a backend's drain start to its last connection's end.
    pub drain_duration: Histogram,
    /// Connections cut because their backend's drain timeout expired.
    pub drain_cut: Counter,
    pub table_generation: Gauge,
    pub table_publishes: Counter,
    intercept_rejected: Family<InterceptLabels, Counter>,
    /// Failed syncs of sluice's nftables table (`--intercept nftables`).
    pub nft_sync_failures: Counter,
    /// UDP Services ([`crate::udp`]).
    pub udp: UdpMetrics,
    /// Connections cut because the shutdown grace (`--shutdown-grace`)
    /// ended while they were still open.
    pub shutdown_cut: Counter,
    /// Which source address backends see ([`crate::source_ip`]).
    pub source_ip: SourceIpMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        root.register_collector(Box::new(crate::compat_metrics::ProcessCollector));
        let registry = root.sub_registry_with_prefix("sluice");
        let m = Metrics {
            accepted: Family::default(),
            active: Family::default(),
            closed: Family::default(),
            retries: Family::default(),
            bytes: Family::default(),
            backend_connections: Family::default(),
            backend_active: Family::default(),
            dial_failures: Family::default(),
            backend_dial_failures: Family::default(),
            ejections: Counter::default(),
            backend_ejections: Family::default(),
            local_dial_errors: Counter::default(),
            accept_errors: Counter::default(),
            limit_waits: Counter::default(),
            service_limit_rejected: Family::default(),
            saturation: Default::default(),
            drain_duration: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            drain_cut: Counter::default(),
            table_generation: Gauge::default(),
            table_publishes: Counter::default(),
            intercept_rejected: Family::default(),
            nft_sync_failures: Counter::default(),
            udp: UdpMetrics::default(),
            shutdown_cut: Counter::default(),
            source_ip: SourceIpMetrics::default(),
            registry: Registry::default(),
        };
        m.udp.register(registry);
        m.source_ip.register(registry);
        registry.register(
            "connections_accepted",
            "Client connections accepted, per service",
            m.accepted.clone(),
        );
        registry.register(
            "connections_active",
            "Client connections open now, per service",
            m.active.clone(),
        );
        registry.register(
            "connections_closed",
            "Client connections ended, per service and reason",
            m.closed.clone(),
        );
        registry.register(
            "dial_retries",
            "Dials retried on another backend after a failed dial, per service",
            m.retries.clone(),
        );
        registry.register(
            "forwarded_bytes",
            "Bytes forwarded, per service and direction",
            m.bytes.clone(),
        );
        registry.register(
            "backend_connections",
            "Connections established to each backend",
            m.backend_connections.clone(),
        );
        registry.register(
            "backend_connections_active",
            "Connections (and dials in progress) to each backend now",
            m.backend_active.clone(),
        );
        registry.register(
            "dial_failures",
            "Failed dials to backends, per reason",
            m.dial_failures.clone(),
        );
        registry.register(
            "backend_dial_failures",
            "Failed dials, per backend still tracked and reason",
            m.backend_dial_failures.clone(),
        );
        registry.register(
            "ejections",
            "Times a backend was ejected from new picks after a failed dial",
            m.ejections.clone(),
        );
        registry.register(
            "local_dial_errors",
            "Dials that failed because sluice ran out of a local resource (descriptors, socket buffers, memory, source ports); they eject no backend",
            m.local_dial_errors.clone(),
        );
        registry.register(
            "accept_errors",
            "Failed accept(2) calls (running out of descriptors and the like); the accept loop backs off",
            m.accept_errors.clone(),
        );
        registry.register(
            "connection_limit_waits",
            "Accepted connections that had to wait for a --max-connections permit",
            m.limit_waits.clone(),
        );
        registry.register(
            "service_limit_rejected",
            "Connections reset at once because their service was at its sluice.io/max-connections (or --service-max-connections) limit, per service",
            m.service_limit_rejected.clone(),
        );
        registry.register(
            "backend_ejections",
            "Ejections, per backend still tracked",
            m.backend_ejections.clone(),
        );
        registry.register(
            "drain_duration_seconds",
            "Time from a backend leaving the eligible set to its last connection ending",
            m.drain_duration.clone(),
        );
        registry.register(
            "shutdown_cut_connections",
            "Connections cut because the shutdown grace ended while they were open",
            m.shutdown_cut.clone(),
        );
        registry.register(
            "drain_cut_connections",
            "Connections cut because their backend's drain timeout expired",
            m.drain_cut.clone(),
        );
        registry.register(
            "table_generation",
            "Generation of the live table",
            m.table_generation.clone(),
        );
        registry.register(
            "table_publishes",
            "Tables made live (equal tables are not counted)",
            m.table_publishes.clone(),
        );
        registry.register(
            "intercept_rejected_connections",
            "Connections reset at the intercept port because they were not redirected Service traffic, per reason",
            m.intercept_rejected.clone(),
        );
        registry.register(
            "nft_sync_failures",
            "Failed syncs of sluice's nftables table (retried)",
            m.nft_sync_failures.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        registry.register("build_info", "sluice's version; always 1", build);
        Metrics {
            registry: root,
            ..m
        }
    }

    /// Counts a connection reset at the intercept port (`reason`: one of a
    /// few fixed strings).
    pub fn intercept_rejected(&self, reason: &'static str) {
        self.intercept_rejected
            .get_or_create(&InterceptLabels { reason })
            .inc();
    }

    /// A dial failed for want of a local resource (see
    /// [`DialErrorKind::Local`]).
    pub fn local_dial_error(&self) {
        self.local_dial_errors.inc();
    }

    /// An accept failed; local resource exhaustion also feeds
    /// [`Self::saturation`].
    pub fn accept_error(&self, e: &std::io::Error) {
        self.accept_errors.inc();
        if let Some(what) = crate::saturation::local_resource(e) {
            self.saturation.record(std::time::Instant::now(), what);
        }
    }

    /// An accepted connection waits for a `--max-connections` permit.
    pub fn limit_wait(&self) {
        self.limit_waits.inc();
    }

    /// Extra metrics registered by other parts (e.g. the control plane),
    /// named `sluice_*`.
    pub fn registry_mut(&mut self) -> &mut Registry {
        self.registry.sub_registry_with_prefix("sluice")
    }

    /// Extra metrics under names of their own, without sluice's prefix
    /// (kube-proxy's, where the meaning is the same).
    pub fn unprefixed_registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Handles for one service's series (created now, shared afterwards).
    pub fn service(&self, name: &str) -> ServiceMetrics {
        let svc = ServiceLabels {
            service: name.to_string(),
        };
        let closed = |reason| {
            self.closed.get_or_create_owned(&CloseLabels {
                service: name.to_string(),
                reason,
            })
        };
        let bytes = |direction| {
            self.bytes.get_or_create_owned(&BytesLabels {
                service: name.to_string(),
                direction,
            })
        };
        ServiceMetrics {
            accepted: self.accepted.get_or_create_owned(&svc),
            active: self.active.get_or_create_owned(&svc),
            retries: self.retries.get_or_create_owned(&svc),
            closed: closed(CloseReason::Closed),
            reset: closed(CloseReason::Reset),
            cut: closed(CloseReason::Cut),
            no_backend: closed(CloseReason::NoBackend),
            idle: closed(CloseReason::Idle),
            limit_rejected: self.service_limit_rejected.get_or_create_owned(&svc),
            bytes_up: bytes(Direction::ClientToBackend),
            bytes_down: bytes(Direction::BackendToClient),
            name: name.to_string(),
        }
    }

    /// Removes a service's series (its listener closed).
    pub fn forget_service(&self, name: &str) {
        let svc = ServiceLabels {
            service: name.to_string(),
        };
        self.accepted.remove(&svc);
        self.active.remove(&svc);
        self.retries.remove(&svc);
        self.service_limit_rejected.remove(&svc);
        for &reason in CloseReason::ALL {
            self.closed.remove(&CloseLabels {
                service: name.to_string(),
                reason,
            });
        }
        for &direction in Direction::ALL {
            self.bytes.remove(&BytesLabels {
                service: name.to_string(),
                direction,
            });
        }
    }

    /// Handles for one backend's series.
    pub fn backend(&self, addr: &str) -> BackendMetrics {
        let b = BackendLabels {
            backend: addr.to_string(),
        };
        let dial = |reason| {
            [
                self.backend_dial_failures.get_or_create_owned(&DialLabels {
                    backend: addr.to_string(),
                    reason,
                }),
                self.dial_failures
                    .get_or_create_owned(&ReasonLabels { reason }),
            ]
        };
        BackendMetrics {
            connections: self.backend_connections.get_or_create_owned(&b),
            active: self.backend_active.get_or_create_owned(&b),
            ejections: [
                self.backend_ejections.get_or_create_owned(&b),
                self.ejections.clone(),
            ],
            refused: dial(DialReason::Refused),
            unreachable: dial(DialReason::Unreachable),
            timeout: dial(DialReason::Timeout),
            other: dial(DialReason::Other),
        }
    }

    /// Removes a backend's series (it left the table and has no connection).
    pub fn forget_backend(&self, addr: &str) {
        let b = BackendLabels {
            backend: addr.to_string(),
        };
        self.backend_connections.remove(&b);
        self.backend_active.remove(&b);
        self.backend_ejections.remove(&b);
        for &reason in DialReason::ALL {
            self.backend_dial_failures.remove(&DialLabels {
                backend: addr.to_string(),
                reason,
            });
        }
    }
}

/// One service's series; cheap to bump from the connection path.
#[derive(Debug, Clone)]
pub struct ServiceMetrics {
    pub name: String,
    pub accepted: Counter,
    pub active: Gauge,
    pub retries: Counter,
    closed: Counter,
    reset: Counter,
    cut: Counter,
    pub no_backend: Counter,
    idle: Counter,
    /// Reset at once: the service was at its own connection limit.
    pub limit_rejected: Counter,
    pub bytes_up: Counter,
    pub bytes_down: Counter,
}

impl ServiceMetrics {
    pub fn ended(&self, outcome: Outcome) {
        match outcome {
            Outcome::Closed => &self.closed,
            Outcome::Reset => &self.reset,
            Outcome::Cut => &self.cut,
            Outcome::Idle => &self.idle,
        }
        .inc();
    }
}

/// Why a UDP datagram from a client was not forwarded.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum UdpDrop {
    /// A new flow was needed and `--udp-max-flows` flows are open.
    FlowLimit,
    /// No eligible backend (or none left after a failure).
    NoBackend,
    /// sluice could not open a socket (descriptors, buffers, memory).
    Local,
    /// The send failed (full socket buffer and the like).
    SendFailed,
    /// Cut by the kernel to sluice's receive buffer (`MSG_TRUNC`), or
    /// without an IP source: not forwarded.
    Truncated,
}

/// Why a UDP flow ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum UdpFlowEnd {
    /// Idle for its timeout.
    Idle,
    /// Its backend left the table or stopped being eligible.
    BackendGone,
    /// Its backend was unreachable and no re-send was left or possible.
    Unreachable,
}

label_values!(UdpDrop { FlowLimit => "flow_limit", NoBackend => "no_backend", Local => "local", SendFailed => "send_failed", Truncated => "truncated" });
label_values!(UdpFlowEnd { Idle => "idle", BackendGone => "backend_gone", Unreachable => "unreachable" });

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UdpDropLabels {
    pub service: String,
    pub reason: UdpDrop,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UdpFlowEndLabels {
    pub service: String,
    pub reason: UdpFlowEnd,
}

/// Dials from the node's address per reason, and transparent dials that
/// failed (`sluice_source_ip_node_total`,
/// `sluice_transparent_dial_failures_total`). The reasons' counters exist
/// from the start: counting one is an atomic add, no label lookup.
#[derive(Debug)]
pub struct SourceIpMetrics {
    node: [Counter; 4],
    family: Family<InterceptLabels, Counter>,
    pub transparent_dial_failures: Counter,
}

impl Default for SourceIpMetrics {
    fn default() -> Self {
        let family = Family::<InterceptLabels, Counter>::default();
        let node = crate::source_ip::NodeReason::ALL.map(|r| {
            family
                .get_or_create(&InterceptLabels { reason: r.as_str() })
                .clone()
        });
        Self {
            node,
            family,
            transparent_dial_failures: Counter::default(),
        }
    }
}

impl SourceIpMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "source_ip_node",
            "Dials from the node's address instead of the client's, per reason (hairpin, not_local, bridge_unsteered, disabled)",
            self.family.clone(),
        );
        registry.register(
            "transparent_dial_failures",
            "Dials from the client's address (transparent) that failed; the connection is retried on another backend, never from the node's address",
            self.transparent_dial_failures.clone(),
        );
    }

    /// Counts a dial from the node's address.
    pub fn node(&self, reason: crate::source_ip::NodeReason) {
        // `ALL` lists the reasons in declaration order.
        if let Some(c) = self.node.get(reason as usize) {
            c.inc();
        }
    }
}

/// The series of UDP Services, per service (`sluice_udp_*`).
#[derive(Debug, Default)]
pub struct UdpMetrics {
    flows: Family<ServiceLabels, Gauge>,
    flows_ended: Family<UdpFlowEndLabels, Counter>,
    datagrams: Family<BytesLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    resent: Family<ServiceLabels, Counter>,
    dropped: Family<UdpDropLabels, Counter>,
}

impl UdpMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "udp_flows",
            "UDP flows (client addresses with a backend socket) open now, per service",
            self.flows.clone(),
        );
        registry.register(
            "udp_flows_ended",
            "UDP flows ended, per service and reason (idle, backend_gone, unreachable)",
            self.flows_ended.clone(),
        );
        registry.register(
            "udp_datagrams",
            "UDP datagrams forwarded, per service and direction",
            self.datagrams.clone(),
        );
        registry.register(
            "udp_bytes",
            "UDP payload bytes forwarded, per service and direction",
            self.bytes.clone(),
        );
        registry.register(
            "udp_resent_datagrams",
            "UDP datagrams re-sent to another backend after ICMP unreachable or their backend leaving, per service",
            self.resent.clone(),
        );
        registry.register(
            "udp_dropped_datagrams",
            "UDP datagrams from clients not forwarded, per service and reason (flow_limit: dropped for --udp-max-flows)",
            self.dropped.clone(),
        );
    }

    /// Handles for one UDP service's series.
    pub fn service(&self, name: &str) -> UdpServiceMetrics {
        let svc = ServiceLabels {
            service: name.to_string(),
        };
        let dir = |family: &Family<BytesLabels, Counter>, direction| {
            family.get_or_create_owned(&BytesLabels {
                service: name.to_string(),
                direction,
            })
        };
        UdpServiceMetrics {
            flows: self.flows.get_or_create_owned(&svc),
            datagrams_up: dir(&self.datagrams, Direction::ClientToBackend),
            datagrams_down: dir(&self.datagrams, Direction::BackendToClient),
            bytes_up: dir(&self.bytes, Direction::ClientToBackend),
            bytes_down: dir(&self.bytes, Direction::BackendToClient),
            resent: self.resent.get_or_create_owned(&svc),
            name: name.to_string(),
        }
    }

    /// Counts a dropped datagram of `service`.
    pub fn dropped(&self, service: &str, reason: UdpDrop) {
        self.dropped
            .get_or_create(&UdpDropLabels {
                service: service.to_string(),
                reason,
            })
            .inc();
    }

    /// Counts an ended flow of `service`.
    pub fn flow_ended(&self, service: &str, reason: UdpFlowEnd) {
        self.flows_ended
            .get_or_create(&UdpFlowEndLabels {
                service: service.to_string(),
                reason,
            })
            .inc();
    }

    /// Removes a UDP service's series (its socket closed).
    pub fn forget_service(&self, name: &str) {
        let svc = ServiceLabels {
            service: name.to_string(),
        };
        self.flows.remove(&svc);
        self.resent.remove(&svc);
        for &direction in Direction::ALL {
            let l = BytesLabels {
                service: name.to_string(),
                direction,
            };
            self.datagrams.remove(&l);
            self.bytes.remove(&l);
        }
        for &reason in UdpDrop::ALL {
            self.dropped.remove(&UdpDropLabels {
                service: name.to_string(),
                reason,
            });
        }
        for &reason in UdpFlowEnd::ALL {
            self.flows_ended.remove(&UdpFlowEndLabels {
                service: name.to_string(),
                reason,
            });
        }
    }
}

/// One UDP service's series; cheap to bump per datagram.
#[derive(Debug, Clone)]
pub struct UdpServiceMetrics {
    pub name: String,
    pub flows: Gauge,
    pub datagrams_up: Counter,
    pub datagrams_down: Counter,
    pub bytes_up: Counter,
    pub bytes_down: Counter,
    pub resent: Counter,
}

/// One backend's series. Failures and ejections also count in the
/// process-wide series, which outlive the backend.
#[derive(Debug, Clone)]
pub struct BackendMetrics {
    pub connections: Counter,
    pub active: Gauge,
    ejections: [Counter; 2],
    refused: [Counter; 2],
    unreachable: [Counter; 2],
    timeout: [Counter; 2],
    other: [Counter; 2],
}

impl BackendMetrics {
    pub fn dial_failed(&self, kind: DialErrorKind) {
        let counters = match kind {
            DialErrorKind::Refused => &self.refused,
            DialErrorKind::Unreachable => &self.unreachable,
            DialErrorKind::Timeout => &self.timeout,
            DialErrorKind::Other => &self.other,
            // sluice's own saturation: counted process-wide by the tracker
            // (`Metrics::local_dial_error`), never against a backend.
            DialErrorKind::Local => return,
        };
        counters.iter().for_each(|c| {
            c.inc();
        });
    }

    pub fn ejected(&self) {
        self.ejections.iter().for_each(|c| {
            c.inc();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_series_and_forgets_them() {
        let m = Metrics::new();
        let s = m.service("default/web:http");
        s.accepted.inc();
        s.ended(Outcome::Reset);
        let b = m.backend("10.0.0.1:80");
        b.dial_failed(DialErrorKind::Refused);
        let text = m.render();
        assert!(
            text.contains(r#"sluice_connections_accepted_total{service="default/web:http"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"sluice_connections_closed_total{service="default/web:http",reason="reset"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"sluice_backend_dial_failures_total{backend="10.0.0.1:80",reason="refused"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("sluice_build_info"), "{text}");
        m.forget_service("default/web:http");
        m.forget_backend("10.0.0.1:80");
        let text = m.render();
        assert!(!text.contains("default/web:http"), "{text}");
        assert!(!text.contains("10.0.0.1:80"), "{text}");
        assert!(
            text.contains(r#"sluice_dial_failures_total{reason="refused"} 1"#),
            "process-wide series outlive the backend: {text}"
        );
    }
}

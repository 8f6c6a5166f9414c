//! The `sluice` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use sluice_control::Policy;

use crate::ProxyConfig;
use crate::tracker::TrackerConfig;

/// Exit status for a bad flag or configuration (EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

/// How Service traffic reaches sluice (`--intercept`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Intercept {
    /// A listening socket per Service address (Service IPs on a device
    /// with the Kubernetes source).
    Bind,
    /// sluice's own nftables table redirects Service traffic to the
    /// intercept port; no Service IP is put on any device.
    Nftables,
}

/// Default of `--intercept-port`: not used by any Kubernetes component
/// (kubelet 10248/10250/10255, kube-proxy 10249/10256, controller managers
/// 10257/10258, scheduler 10259).
pub const DEFAULT_INTERCEPT_PORT: u16 = 10261;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// sluice: a per-node userspace TCP load balancer for Kubernetes Services.
///
/// Every new connection is balanced at accept time from the live table;
/// a failed dial is retried on another backend before the client sees
/// anything; terminating and removed backends drain.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about, long_about = None)]
pub struct Args {
    /// Serve the services described in this YAML file (reloaded on change
    /// and on SIGHUP). Without it, Services and EndpointSlices come from
    /// Kubernetes (--kubeconfig, else KUBECONFIG or ~/.kube/config, else
    /// the in-cluster config).
    #[arg(
        long,
        env = "SLUICE_CONFIG",
        value_name = "FILE",
        conflicts_with = "kubeconfig"
    )]
    pub config: Option<PathBuf>,

    /// Kubernetes source: the kubeconfig to use.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// Kubernetes source: refuse to start (exit 64) when the apiserver
    /// would be reached only through the in-cluster `kubernetes` Service
    /// address (KUBERNETES_SERVICE_HOST/PORT) or a Service DNS name, which
    /// sluice itself serves. Without this flag that is a warning, logged at
    /// start and shown on /healthz.
    #[arg(
        long,
        env = "SLUICE_REQUIRE_DIRECT_APISERVER",
        conflicts_with = "config"
    )]
    pub require_direct_apiserver: bool,

    /// Kubernetes source: this node's name (local traffic policies,
    /// topology zone). The DaemonSet sets NODE_NAME from the downward API.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,

    /// Kubernetes source: addresses on which node ports are served
    /// (comma-separated). Default: the Node's InternalIP/ExternalIP.
    #[arg(
        long,
        env = "SLUICE_NODE_ADDRESSES",
        value_delimiter = ',',
        value_name = "IP,..."
    )]
    pub node_addresses: Vec<std::net::IpAddr>,

    /// Kubernetes source: kube-proxy's flag. CIDRs (comma-separated): node
    /// ports are served on this node's interface addresses inside them
    /// (loopback excepted), read at start. `primary` (the default): the
    /// Node's InternalIP/ExternalIP. Not with --node-addresses.
    #[arg(
        long,
        env = "SLUICE_NODEPORT_ADDRESSES",
        value_delimiter = ',',
        value_name = "CIDR,...|primary",
        conflicts_with = "node_addresses"
    )]
    pub nodeport_addresses: Vec<sluice_control::NodePortAddress>,

    /// Kubernetes source: the scheduler of Services without a
    /// `sluice.io/scheduler` annotation (or with an unknown one):
    /// round-robin, least-connections, maglev (consistent hashing of the
    /// client IP) or source-hash. A file config sets `policy:` per service.
    #[arg(
        long,
        env = "SLUICE_SCHEDULER",
        default_value = "round-robin",
        value_name = "SCHEDULER"
    )]
    pub scheduler: Policy,

    /// Kubernetes source: at most one table build per this interval (bursts
    /// of changes are coalesced; a lone change after a quiet interval is
    /// built at once).
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub min_sync_period: Duration,

    /// How often the config file is checked for changes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub config_poll_interval: Duration,

    /// Connect timeout of each dial to a backend.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub connect_timeout: Duration,

    /// Connect timeout of a client connection's last chance: its last
    /// attempt, or no other backend left that is not ejected. Covers the
    /// kernel's SYN resends (after 1 s and 3 s) so that a busy backend whose
    /// accept queue overflowed delays the client instead of resetting it.
    #[arg(long, default_value = "3500ms", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub last_connect_timeout: Duration,

    /// Bytes each of sluice's sockets may hold queued but unsent
    /// (TCP_NOTSENT_LOWAT); at the cap sluice stops reading the other side.
    /// 0: no cap (the kernel's `net.ipv4.tcp_notsent_lowat`). See
    /// docs/reliability.md.
    #[arg(long, env = "SLUICE_NOTSENT_LOWAT", default_value_t = crate::forward::Buffers::default().notsent_lowat, value_name = "BYTES")]
    pub notsent_lowat: u32,

    /// Receive buffer (SO_RCVBUF) of each of sluice's sockets; the kernel
    /// doubles it and stops autotuning it. Bounds the memory a peer that
    /// does not read can pin in sluice, at the price of a fixed TCP window
    /// per connection. 0: the kernel's autotuning. See docs/reliability.md.
    #[arg(long, env = "SLUICE_RECEIVE_BUFFER", default_value_t = crate::forward::Buffers::default().receive, value_name = "BYTES")]
    pub receive_buffer: u32,

    /// Dials per client connection, each to a different backend, before the
    /// client is reset.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub max_attempts: u16,

    /// Cooldown during which a backend that failed a dial gets no new
    /// connection; doubles on each consecutive failure.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub eject_cooldown: Duration,

    /// Upper bound of the ejection cooldown.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub eject_cooldown_max: Duration,

    /// How long connections to a terminating or removed backend may live
    /// before they are cut.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub drain_timeout: Duration,

    /// After SIGTERM/SIGINT: how long open connections may finish before
    /// they are cut.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub shutdown_grace: Duration,

    /// Concurrent client connections, over all services.
    #[arg(long, default_value_t = 100_000)]
    pub max_connections: usize,

    /// Open UDP flows (client addresses with a backend socket), over all
    /// UDP Services. Each costs one descriptor; a datagram that would need
    /// one more flow is dropped and counted
    /// (`sluice_udp_dropped_datagrams_total{reason="flow_limit"}`).
    #[arg(long, default_value_t = crate::udp::DEFAULT_MAX_FLOWS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub udp_max_flows: usize,
    /// UDP Services with re-send on (port 53, or `sluice.io/udp-resend:
    /// "true"`; file: `udpResend`): a client datagram still unanswered
    /// this long after it was sent is sent once more to another backend,
    /// and a backend that answers none of them is ejected. `0s`: never.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub udp_resend_after: Duration,
    /// Concurrent client connections per Service (each port of a
    /// Kubernetes Service, over all its addresses) that sets no
    /// `sluice.io/max-connections` annotation (file: `maxConnections`); a
    /// connection beyond it is reset at once. Default: unlimited (only
    /// --max-connections applies).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub service_max_connections: Option<u32>,

    /// Data-plane threads. Each runs its own event loop with its own
    /// listener for every Service address (one SO_REUSEPORT group per
    /// address), and a connection stays on the thread that accepted it.
    /// Default: the number of CPUs sluice may use (affinity mask, cgroup
    /// quota), at most 4. 0: no dedicated threads, one listener per
    /// address, and connections spread over the shared runtime by work
    /// stealing.
    #[arg(long, env = "SLUICE_WORKERS", value_name = "N", value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub workers: Option<u16>,

    /// Assign every Service IP sluice serves to this existing device (e.g.
    /// `lo`, or an `ifb` device), as IPVS mode does with `kube-ipvs0`, and
    /// remove the ones it no longer serves. Default with the Kubernetes
    /// source: `sluice0`, a dummy device created if missing; the file
    /// source leaves addresses alone unless this flag is given.
    #[arg(long, env = "SLUICE_VIP_INTERFACE", value_name = "NAME")]
    pub vip_interface: Option<String>,

    /// How Service traffic reaches sluice: `bind` (a listening socket per
    /// Service address) or `nftables` (sluice's table `inet sluice`
    /// redirects it to --intercept-port; see docs/operations.md). Default:
    /// `nftables` with the Kubernetes source, `bind` with --config.
    #[arg(long, env = "SLUICE_INTERCEPT", value_enum, value_name = "MODE")]
    pub intercept: Option<Intercept>,

    /// With --intercept nftables: the port, on 0.0.0.0 and [::], that
    /// redirected Service traffic reaches. Direct connections are reset.
    #[arg(long, env = "SLUICE_INTERCEPT_PORT", default_value_t = DEFAULT_INTERCEPT_PORT, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub intercept_port: u16,

    /// With --intercept nftables: the local UDP ports (FIRST-LAST) that
    /// UDP Service ports are redirected to, one port each (a redirected
    /// datagram does not say which Service it was for). sluice binds them
    /// on 0.0.0.0 and [::], skipping ports another process holds; a
    /// datagram sent to one of them directly is dropped. Keep the range
    /// clear of other programs' ports, NodePorts and ephemeral ports.
    #[arg(long, env = "SLUICE_UDP_INTERCEPT_PORTS", default_value = "20000-29999", value_name = "FIRST-LAST", value_parser = crate::udp_intercept::parse_range)]
    pub udp_intercept_ports: (u16, u16),

    /// Which source address backends see: `transparent` (the client's
    /// own IP where kube-proxy would keep it: pods of this node, outside
    /// clients of `externalTrafficPolicy: Local`; sluice installs a
    /// policy-routing rule and nftables rules to steer the replies, see
    /// docs/operations.md) or `node` (every dial from the node's
    /// address). Default: `transparent` with the Kubernetes source and
    /// --intercept nftables, else `node`. When the node cannot do it (no
    /// CAP_NET_ADMIN, the rule cannot be added) sluice falls back to
    /// `node`, logs why once and shows it on /healthz.
    #[arg(long, env = "SLUICE_SOURCE_IP", value_enum, value_name = "MODE")]
    pub source_ip: Option<SourceIpMode>,

    /// Which clients are pods of this node (kube-proxy's flag): `NodeCIDR`
    /// (the default: this node's `spec.podCIDRs`) or `ClusterCIDR`
    /// (--cluster-cidr; includes other nodes' pods, whose replies do not
    /// come back here: their transparent dials to a NodePort of this node
    /// hang), `BridgeInterface` (--pod-bridge-interface) or
    /// `InterfaceNamePrefix` (--pod-interface-name-prefix): the clients the
    /// node routes over those interfaces (the main routing table's routes,
    /// re-read with each table publish and every 10 s; before the first
    /// read nothing is local).
    #[arg(
        long,
        env = "SLUICE_DETECT_LOCAL_MODE",
        value_enum,
        default_value = "NodeCIDR",
        value_name = "MODE"
    )]
    pub detect_local_mode: DetectLocalMode,

    /// With --detect-local-mode ClusterCIDR: the cluster's pod networks
    /// (comma-separated CIDRs).
    #[arg(
        long,
        env = "SLUICE_CLUSTER_CIDR",
        value_delimiter = ',',
        value_name = "CIDR,..."
    )]
    pub cluster_cidr: Vec<sluice_control::Cidr>,

    /// With --detect-local-mode BridgeInterface: the pod bridge's name
    /// (`cni0`, `cbr0`); required by that mode.
    #[arg(long, env = "SLUICE_POD_BRIDGE_INTERFACE", value_name = "NAME")]
    pub pod_bridge_interface: Option<String>,

    /// With --detect-local-mode InterfaceNamePrefix: the prefix of the pod
    /// interfaces' names (Calico: `cali`); required by that mode.
    #[arg(long, env = "SLUICE_POD_INTERFACE_NAME_PREFIX", value_name = "PREFIX")]
    pub pod_interface_name_prefix: Option<String>,

    /// The local-pod detector the data path uses, decided once by
    /// [`Args::validate`] from the flags above (`NodeCIDR` until then).
    #[arg(skip = crate::source_ip::DetectLocal::NodeCidr)]
    local_detector: crate::source_ip::DetectLocal,

    /// The fwmark bit that steers replies of transparent dials to sluice
    /// (hex or decimal); pick one your CNI does not use (kube-proxy uses
    /// 0x4000/0x8000, Calico 0xffff0000, Cilium 0x0f00).
    #[arg(long, env = "SLUICE_TRANSPARENT_MARK", default_value = "0x1000", value_parser = parse_mark, value_name = "BIT")]
    pub transparent_mark: u32,

    /// The policy-routing table (and rule priority) for replies of
    /// transparent dials: `local 0.0.0.0/0 dev lo` and `local ::/0 dev lo`.
    #[arg(long, env = "SLUICE_TRANSPARENT_ROUTE_TABLE", default_value_t = 2626, value_parser = clap::value_parser!(u32).range(1..=0xfffffeff), value_name = "ID")]
    pub transparent_route_table: u32,

    /// Remove sluice's nftables table (`inet sluice`) and exit, like
    /// kube-proxy's flag of that name. Every other exit leaves the table in
    /// place, so that a restarted sluice adopts it.
    #[arg(long)]
    pub cleanup: bool,

    /// Serve /healthz, /livez and /readyz here (empty: disabled).
    #[arg(
        long,
        env = "SLUICE_HEALTHZ_BIND_ADDRESS",
        default_value = "0.0.0.0:10256",
        value_name = "IP:PORT"
    )]
    pub healthz_bind_address: BindAddress,

    /// Serve /metrics and /debug/table here (empty: disabled).
    #[arg(
        long,
        env = "SLUICE_METRICS_BIND_ADDRESS",
        default_value = "127.0.0.1:10249",
        value_name = "IP:PORT"
    )]
    pub metrics_bind_address: BindAddress,

    /// /healthz turns 503 when source input has waited this long for a
    /// table publish.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub healthz_timeout: Duration,

    /// Log format on stderr. The level comes from RUST_LOG (default: info).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// `--source-ip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceIpMode {
    /// The client's own address where the reply comes back through this
    /// node.
    Transparent,
    /// Always the node's address.
    Node,
}

/// `--detect-local-mode` (kube-proxy's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DetectLocalMode {
    #[value(name = "NodeCIDR")]
    NodeCidr,
    #[value(name = "ClusterCIDR")]
    ClusterCidr,
    #[value(name = "BridgeInterface")]
    BridgeInterface,
    #[value(name = "InterfaceNamePrefix")]
    InterfaceNamePrefix,
}

/// A single fwmark bit, `0x1000` or `4096`.
fn parse_mark(s: &str) -> Result<u32, String> {
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("{s:?} is not a number (hex 0x1000 or decimal)"))?;
    if v.count_ones() != 1 {
        return Err(format!("{s:?} must be exactly one bit, e.g. 0x1000"));
    }
    Ok(v)
}

/// An `IP:PORT` to bind, or `None` when given empty ("disabled").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindAddress(pub Option<SocketAddr>);

impl std::str::FromStr for BindAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Ok(Self(None));
        }
        s.parse::<SocketAddr>()
            .map(|a| Self(Some(a)))
            .map_err(|e| format!("{s:?} is not IP:PORT ({e})"))
    }
}

impl Args {
    /// The interception mode: `--intercept` when given, else `nftables`
    /// with the Kubernetes source and `bind` with `--config`.
    pub fn intercept(&self) -> Intercept {
        match (self.intercept, &self.config) {
            (Some(mode), _) => mode,
            (None, Some(_)) => Intercept::Bind,
            (None, None) => Intercept::Nftables,
        }
    }

    /// Data-plane threads to start (see `--workers`).
    pub fn worker_count(&self) -> usize {
        self.workers
            .map_or_else(crate::workers::default_count, usize::from)
    }

    /// `--source-ip`, or its default: `transparent` with the Kubernetes
    /// source and --intercept nftables, else `node`.
    pub fn source_ip_mode(&self) -> SourceIpMode {
        match self.source_ip {
            Some(mode) => mode,
            None if self.config.is_none() && self.intercept() == Intercept::Nftables => {
                SourceIpMode::Transparent
            }
            None => SourceIpMode::Node,
        }
    }

    /// The local-pod detector, or why it cannot be used.
    pub fn detect_local(&self) -> Result<crate::source_ip::DetectLocal, String> {
        use crate::source_ip::{DetectLocal, InterfaceMatch};
        // kube-proxy refuses an empty name too.
        let required = |value: &Option<String>, mode: &str, flag: &str| match value {
            Some(v) if !v.is_empty() => Ok(v.clone()),
            _ => Err(format!(
                "--detect-local-mode {mode} needs {flag} (the pod interface to match)"
            )),
        };
        match self.detect_local_mode {
            DetectLocalMode::NodeCidr => Ok(DetectLocal::NodeCidr),
            DetectLocalMode::ClusterCidr => Ok(DetectLocal::ClusterCidr(self.cluster_cidr.clone())),
            DetectLocalMode::BridgeInterface => required(
                &self.pod_bridge_interface,
                "BridgeInterface",
                "--pod-bridge-interface NAME",
            )
            .map(|n| DetectLocal::Interfaces(InterfaceMatch::Bridge(n))),
            DetectLocalMode::InterfaceNamePrefix => required(
                &self.pod_interface_name_prefix,
                "InterfaceNamePrefix",
                "--pod-interface-name-prefix PREFIX",
            )
            .map(|p| DetectLocal::Interfaces(InterfaceMatch::Prefix(p))),
        }
    }

    /// Checks what clap cannot check flag by flag, and decides once what
    /// follows from several flags: the local-pod detector
    /// ([`Args::detect_local`]), carried to [`Args::proxy_config`]. Its
    /// error (a mode without the flag it needs) only counts when
    /// transparent dials are asked for; with `--source-ip node` the
    /// detector is unused and left at `NodeCIDR`. `Err` is the message for
    /// the operator (exit [`EXIT_USAGE`]).
    pub fn validate(&mut self) -> Result<(), String> {
        self.local_detector = match self.detect_local() {
            Ok(detector) => detector,
            Err(e) if self.source_ip_mode() != SourceIpMode::Node => return Err(e),
            Err(_) => crate::source_ip::DetectLocal::NodeCidr,
        };
        Ok(())
    }

    /// `--transparent-mark` and `--transparent-route-table`.
    pub fn policy_route(&self) -> crate::policy_route::PolicyRoute {
        crate::policy_route::PolicyRoute {
            mark: self.transparent_mark,
            table: self.transparent_route_table,
        }
    }

    /// UDP settings.
    pub fn udp_config(&self) -> crate::udp::UdpConfig {
        crate::udp::UdpConfig {
            max_flows: self.udp_max_flows,
            resend_after: self.udp_resend_after,
        }
    }

    pub fn proxy_config(&self) -> ProxyConfig {
        ProxyConfig {
            connect_timeout: self.connect_timeout,
            last_connect_timeout: self.last_connect_timeout,
            buffers: crate::forward::Buffers {
                notsent_lowat: self.notsent_lowat,
                receive: self.receive_buffer,
            },
            max_attempts: usize::from(self.max_attempts),
            tracker: TrackerConfig {
                eject_base: self.eject_cooldown,
                eject_max: self.eject_cooldown_max.max(self.eject_cooldown),
                drain_timeout: self.drain_timeout,
            },
            max_connections: self.max_connections.max(1),
            service_max_connections: self.service_max_connections,
            shutdown_grace: self.shutdown_grace,
            intercept_port: match self.intercept() {
                Intercept::Bind => None,
                Intercept::Nftables => Some(self.intercept_port),
            },
            source_ip: std::sync::Arc::new(crate::source_ip::SourceIp::new(
                self.local_detector.clone(),
            )),
            reserved: [self.healthz_bind_address, self.metrics_bind_address]
                .into_iter()
                .filter_map(|BindAddress(a)| a)
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("sluice").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn bind_is_the_default_interception_with_a_config_file() {
        let args = parse(&["--config", "x.yaml"]);
        assert_eq!(args.intercept(), Intercept::Bind);
        assert_eq!(args.proxy_config().intercept_port, None);
        assert!(!args.cleanup);
    }

    #[test]
    fn nftables_is_the_default_interception_with_kubernetes() {
        let args = parse(&[]);
        assert_eq!(args.intercept(), Intercept::Nftables);
        assert_eq!(
            args.proxy_config().intercept_port,
            Some(DEFAULT_INTERCEPT_PORT)
        );
        let args = parse(&["--kubeconfig", "k"]);
        assert_eq!(args.intercept(), Intercept::Nftables);
    }

    #[test]
    fn an_explicit_interception_always_wins() {
        assert_eq!(parse(&["--intercept", "bind"]).intercept(), Intercept::Bind);
        assert_eq!(
            parse(&["--config", "x.yaml", "--intercept", "nftables"]).intercept(),
            Intercept::Nftables
        );
    }

    #[test]
    fn nftables_interception_takes_the_intercept_port() {
        let args = parse(&["--config", "x.yaml", "--intercept", "nftables"]);
        assert_eq!(
            args.proxy_config().intercept_port,
            Some(DEFAULT_INTERCEPT_PORT)
        );
        let args = parse(&["--intercept", "nftables", "--intercept-port", "20000"]);
        assert_eq!(args.proxy_config().intercept_port, Some(20000));
        assert!(
            Args::try_parse_from(["sluice", "--intercept", "tproxy"]).is_err(),
            "unknown modes are refused"
        );
        assert!(Args::try_parse_from(["sluice", "--intercept-port", "0"]).is_err());
    }

    #[test]
    fn scheduler_defaults_to_round_robin_and_takes_every_policy() {
        assert_eq!(parse(&[]).scheduler, Policy::RoundRobin);
        for p in Policy::ALL {
            assert_eq!(parse(&["--scheduler", p.name()]).scheduler, p);
        }
        let err = Args::try_parse_from(["sluice", "--scheduler", "wrr"]).unwrap_err();
        assert!(
            err.to_string().contains("unknown scheduler \"wrr\""),
            "{err}"
        );
    }

    #[test]
    fn dial_and_buffer_defaults() {
        let c = parse(&[]).proxy_config();
        assert_eq!(c.connect_timeout, Duration::from_millis(300));
        assert_eq!(c.last_connect_timeout, Duration::from_millis(3500));
        assert_eq!(c.buffers, crate::forward::Buffers::default());
        let c = parse(&["--notsent-lowat", "0", "--receive-buffer", "65536"]).proxy_config();
        assert_eq!(c.buffers.notsent_lowat, 0);
        assert_eq!(c.buffers.receive, 65536);
    }

    #[test]
    fn cleanup_parses_alone() {
        assert!(parse(&["--cleanup"]).cleanup);
    }

    #[test]
    fn source_ip_defaults_follow_the_mode() {
        assert_eq!(parse(&[]).source_ip_mode(), SourceIpMode::Transparent);
        let node = [
            &["--intercept", "bind"][..],
            &["--config", "x.yaml"],
            &["--config", "x.yaml", "--intercept", "nftables"],
            &["--source-ip", "node"],
        ];
        for args in node {
            assert_eq!(parse(args).source_ip_mode(), SourceIpMode::Node, "{args:?}");
        }
        let explicit = parse(&["--config", "x.yaml", "--source-ip", "transparent"]);
        assert_eq!(explicit.source_ip_mode(), SourceIpMode::Transparent);
        assert_eq!(parse(&[]).transparent_mark, 0x1000);
        assert_eq!(
            parse(&["--transparent-mark", "256"]).transparent_mark,
            0x100
        );
        assert_eq!(parse(&[]).transparent_route_table, 2626);
        let bad = Args::try_parse_from(["sluice", "--transparent-mark", "0x3000"]);
        assert!(bad.unwrap_err().to_string().contains("exactly one bit"));
    }

    #[test]
    fn detect_local_modes() {
        use crate::source_ip::DetectLocal;
        assert_eq!(parse(&[]).detect_local(), Ok(DetectLocal::NodeCidr));
        let cluster = parse(&[
            "--detect-local-mode",
            "ClusterCIDR",
            "--cluster-cidr",
            "10.244.0.0/16,fd00:244::/56",
        ]);
        match cluster.detect_local() {
            Ok(DetectLocal::ClusterCidr(c)) => assert_eq!(c.len(), 2),
            other => panic!("{other:?}"),
        }
        use crate::source_ip::InterfaceMatch;
        let bridge = parse(&["--detect-local-mode", "BridgeInterface"]).detect_local();
        assert!(
            bridge
                .unwrap_err()
                .contains("BridgeInterface needs --pod-bridge-interface"),
        );
        let empty = parse(&[
            "--detect-local-mode",
            "BridgeInterface",
            "--pod-bridge-interface",
            "",
        ]);
        assert!(empty.detect_local().is_err());
        let prefix = parse(&["--detect-local-mode", "InterfaceNamePrefix"]).detect_local();
        assert!(
            prefix
                .unwrap_err()
                .contains("InterfaceNamePrefix needs --pod-interface-name-prefix"),
        );
        let bridge = parse(&[
            "--detect-local-mode",
            "BridgeInterface",
            "--pod-bridge-interface",
            "cni0",
        ]);
        assert_eq!(
            bridge.detect_local(),
            Ok(DetectLocal::Interfaces(InterfaceMatch::Bridge(
                "cni0".into()
            )))
        );
        let prefix = parse(&[
            "--detect-local-mode",
            "InterfaceNamePrefix",
            "--pod-interface-name-prefix",
            "cali",
        ]);
        assert_eq!(
            prefix.detect_local(),
            Ok(DetectLocal::Interfaces(InterfaceMatch::Prefix(
                "cali".into()
            )))
        );
        // The other mode's flag does not stand in.
        let wrong = parse(&[
            "--detect-local-mode",
            "InterfaceNamePrefix",
            "--pod-bridge-interface",
            "cni0",
        ]);
        assert!(wrong.detect_local().is_err());
    }

    #[test]
    fn validate_decides_the_detector_once_and_carries_it() {
        use crate::source_ip::DetectLocal;
        let detector = |a: &Args| a.proxy_config().source_ip.detect().clone();
        // Transparent dials asked for (the Kubernetes default): a mode
        // without its flag is refused with the detector's own message.
        for source_ip in [&[][..], &["--source-ip", "transparent"]] {
            let mut args =
                parse(&[source_ip, &["--detect-local-mode", "BridgeInterface"]].concat());
            assert_eq!(
                args.validate(),
                Err(
                    "--detect-local-mode BridgeInterface needs --pod-bridge-interface NAME \
                     (the pod interface to match)"
                        .into()
                )
            );
        }
        // Unused with --source-ip node: accepted, NodeCIDR.
        let mut node = parse(&[
            "--source-ip",
            "node",
            "--detect-local-mode",
            "InterfaceNamePrefix",
        ]);
        assert_eq!(node.validate(), Ok(()));
        assert_eq!(detector(&node), DetectLocal::NodeCidr);
        // A good mode reaches the data path's config.
        let mut cluster = parse(&[
            "--detect-local-mode",
            "ClusterCIDR",
            "--cluster-cidr",
            "10.244.0.0/16",
        ]);
        assert_eq!(cluster.validate(), Ok(()));
        assert_eq!(
            detector(&cluster),
            DetectLocal::ClusterCidr(vec!["10.244.0.0/16".parse().unwrap()])
        );
    }
}

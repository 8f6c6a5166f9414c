//! The immutable routing table: what sluice serves, built off the hot path.
//!
//! A [`Table`] maps every address sluice listens on ([`ListenKey`]: IP, port,
//! protocol) to the [`Service`] reached there. Each service carries all of its
//! backends with the state Kubernetes gives them, plus the subset that may
//! receive *new* connections, computed once when the table is built (the
//! ProxyTerminatingEndpoints rule), so that a pick at accept time is a load and
//! an index, never a scan of states.
//!
//! Nothing here knows where the table came from (file or Kubernetes) and
//! nothing here is mutable: a change is a new table, published whole.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::cidr::Cidr;
use serde::{Deserialize, Serialize};

/// Transport protocol of a listen address. Part of the key so that TCP 53 and
/// UDP 53 on the same IP are two services.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Where a service is reached: the key of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListenKey {
    pub addr: SocketAddr,
    pub protocol: Protocol,
}

impl ListenKey {
    pub fn tcp(addr: SocketAddr) -> Self {
        Self {
            addr,
            protocol: Protocol::Tcp,
        }
    }

    pub fn udp(addr: SocketAddr) -> Self {
        Self {
            addr,
            protocol: Protocol::Udp,
        }
    }
}

impl fmt::Display for ListenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.protocol)
    }
}

/// A backend's conditions, exactly as an EndpointSlice states them (after
/// defaulting: `ready` unset is true, `serving` unset is `ready`,
/// `terminating` unset is false).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Conditions {
    pub const READY: Conditions = Conditions {
        ready: true,
        serving: true,
        terminating: false,
    };
    /// Terminating but still serving: eligible only when nothing is ready.
    pub const TERMINATING: Conditions = Conditions {
        ready: false,
        serving: true,
        terminating: true,
    };

    /// Short human name for logs and the debug endpoint.
    pub fn label(&self) -> &'static str {
        match (self.ready, self.serving, self.terminating) {
            (true, _, false) => "ready",
            (true, _, true) => "ready-terminating",
            (false, true, true) => "serving-terminating",
            (false, false, true) => "terminating",
            (false, true, false) => "serving",
            (false, false, false) => "not-ready",
        }
    }
}

impl Default for Conditions {
    fn default() -> Self {
        Self::READY
    }
}

/// One endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    pub addr: SocketAddr,
    pub conditions: Conditions,
    /// Relative weight: the share of new connections round robin gives it,
    /// and what least connections divides its active connections by; 0
    /// means "never a new connection" (IPVS's drain).
    pub weight: u32,
}

impl Backend {
    pub fn new(addr: SocketAddr, conditions: Conditions) -> Self {
        Self {
            addr,
            conditions,
            weight: 1,
        }
    }
}

/// How a service spreads new connections over its eligible backends (the
/// scheduler, in IPVS's words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Smooth weighted round robin (IPVS `rr`/`wrr`).
    #[default]
    RoundRobin,
    /// Power of two random choices over active connections per unit of
    /// weight (IPVS `lc`/`wlc`, sampled).
    LeastConnections,
    /// Maglev consistent hashing of the client IP (IPVS `mh`): every node
    /// with the same backends picks the same one for a client, and a
    /// backend leaving moves only the clients it had (see
    /// [`Service::hash_order`]).
    Maglev,
    /// The client IP's hash modulo the eligible backends, in proportion to
    /// their weights (IPVS `sh`): the same on every node, but a change of
    /// backends moves most clients.
    SourceHash,
}

impl Policy {
    /// Every policy, in the order the docs list them.
    pub const ALL: [Policy; 4] = [
        Policy::RoundRobin,
        Policy::LeastConnections,
        Policy::Maglev,
        Policy::SourceHash,
    ];

    /// The name used in files, flags and annotations (`round-robin`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::LeastConnections => "least-connections",
            Policy::Maglev => "maglev",
            Policy::SourceHash => "source-hash",
        }
    }

    /// Whether the pick follows a hash of the client IP.
    pub fn hashes_client(self) -> bool {
        matches!(self, Policy::Maglev | Policy::SourceHash)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A scheduler name that is none of [`Policy::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scheduler {0:?} (valid: round-robin, least-connections, maglev, source-hash)")]
pub struct UnknownPolicy(pub String);

impl std::str::FromStr for Policy {
    type Err = UnknownPolicy;

    /// The exact [`Policy::name`].
    fn from_str(s: &str) -> Result<Self, UnknownPolicy> {
        (Policy::ALL.into_iter())
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownPolicy(s.to_owned()))
    }
}

/// A fixed, documented hash: 64-bit FNV-1a over `parts`, then MurmurHash3's
/// `fmix64` finaliser (FNV alone mixes the last bytes poorly into the low
/// bits). Every node and every build of sluice computes the same value,
/// which std's `DefaultHasher` does not promise.
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in parts.iter().copied().flatten() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    fmix64(h)
}

/// The hash of a client address that [`Policy::Maglev`] and
/// [`Policy::SourceHash`] pick by: its octets (an IPv4-mapped IPv6 address
/// as the IPv4 one, so a client hashes alike on both kinds of listener).
pub fn client_hash(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => stable_hash(&[&v4.octets()]),
        IpAddr::V6(v6) => stable_hash(&[&v6.octets()]),
    }
}

/// Entries of a Maglev lookup table: a prime (the Maglev paper's), about
/// 100 per backend or more up to a thousand backends, so that shares stay
/// within about 1% of even. 128 KiB per Maglev service entry.
pub const MAGLEV_SIZE: usize = 65_537;

/// Most eligible backends a hashing policy builds its table for (positions
/// are `u16`, and `u16::MAX` marks an empty slot while Maglev fills).
/// Beyond it the pick is the client hash modulo the eligible count, in
/// listing order.
const MAX_HASHED_BACKENDS: usize = u16::MAX as usize;

/// Table entries a Maglev fallback walks (looking for a backend that is
/// neither tried nor ejected) before it scans the eligible set in order.
const MAGLEV_WALK: usize = 64;

/// A hashing policy's table: slot to position in the eligible set. Derived
/// from the service's policy and eligible backends, so it takes no part in
/// comparing or hashing services (two equal services have equal tables).
#[derive(Clone, Default)]
struct Lookup(Arc<[u16]>);

impl PartialEq for Lookup {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Lookup {}

impl std::hash::Hash for Lookup {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

impl fmt::Debug for Lookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lookup({} slots)", self.0.len())
    }
}

/// Most eligible backends a [`Policy::Maglev`] table is filled by
/// rendezvous hashing for ([`rendezvous_lookup`]: a backend leaving moves
/// only its own clients, but shares vary by about √(N/M), 6% at 256, and
/// the build costs N × M hashes); beyond, by Maglev's own fill
/// ([`maglev_lookup`]: even shares, a build of O(M log M), but more
/// clients move than the leaving backend had).
pub const RENDEZVOUS_MAX_BACKENDS: usize = 256;

/// A backend's identity for hashing: its address and port.
fn backend_id(addr: &SocketAddr) -> Vec<u8> {
    let ip: &[u8] = match addr.ip() {
        IpAddr::V4(v4) => &v4.octets(),
        IpAddr::V6(v6) => &v6.octets(),
    };
    [ip, &addr.port().to_be_bytes()].concat()
}

/// MurmurHash3's `fmix64`: one well-mixed 64-bit value from another.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// `ln(u)` for `u` in (0, 1] from IEEE-754 +, −, × and ÷ only, each exactly
/// rounded by the standard, so every CPU and libm computes the same bits
/// (a libm's `log` may differ in the last bit between CPUs, which could
/// flip a near tie and so a slot between nodes). Series of 2·atanh,
/// accurate to about 1e-16 relative.
fn portable_ln(u: f64) -> f64 {
    let bits = u.to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as i64 - 1023;
    // The mantissa as a number in [1, 2), then in [√½, √2).
    let mut f = f64::from_bits((bits & ((1 << 52) - 1)) | (1023 << 52));
    let mut e = exponent as f64;
    if f > std::f64::consts::SQRT_2 {
        f /= 2.0;
        e += 1.0;
    }
    let s = (f - 1.0) / (f + 1.0);
    let s2 = s * s;
    let (mut term, mut sum) = (s, 0.0);
    for k in 0..14 {
        sum += term / f64::from(2 * k + 1);
        term *= s2;
    }
    2.0 * sum + e * std::f64::consts::LN_2
}

/// Fills a [`Policy::Maglev`] table of [`MAGLEV_SIZE`] slots by rendezvous
/// (highest random weight) hashing, one slot at a time: slot `s` goes to
/// the backend with the best score `hash(backend, s)`; with unequal
/// weights, the smallest `−ln(u)/w` (`u` the score as a fraction in (0, 1):
/// an exponential race, won in proportion to `w`). A slot's owner depends
/// only on the backends' own scores for it, so when a backend leaves, its
/// slots alone change owner (spread over the others in proportion to
/// their weights), and when one joins it takes slots only; Maglev's fill
/// also moves slots between backends that stay (measured in
/// docs/performance.md). Deterministic: integer hashes of the addresses,
/// and IEEE-754 basic operations ([`portable_ln`]). O(N × M).
fn rendezvous_lookup(backends: &[(SocketAddr, u64, u16)]) -> Lookup {
    let ids: Vec<(u64, u64, u16)> = (backends.iter())
        .filter(|b| b.1 > 0)
        .map(|(addr, turns, position)| {
            let id = stable_hash(&[b"rendezvous", &backend_id(addr)]);
            (id, *turns, *position)
        })
        .collect();
    if ids.is_empty() {
        return Lookup::default();
    }
    let equal = ids.windows(2).all(|w| w[0].1 == w[1].1);
    let slot_key = |slot: u64| slot.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let slots: Vec<u16> = (0..MAGLEV_SIZE as u64)
        .map(|slot| {
            let key = slot_key(slot);
            let score = |id: u64| fmix64(id ^ key);
            if equal {
                // Highest score; ties (2^-64) to the lower address.
                let mut best: Option<(u64, u16)> = None;
                for &(id, _, position) in &ids {
                    let x = score(id);
                    if best.is_none_or(|b| x > b.0) {
                        best = Some((x, position));
                    }
                }
                best.map_or(0, |b| b.1)
            } else {
                let mut best = (f64::INFINITY, 0);
                for &(id, turns, position) in &ids {
                    // 53 bits of the score, as a fraction in (0, 1].
                    let u = ((score(id) >> 11) + 1) as f64 / (1u64 << 53) as f64;
                    let race = -portable_ln(u) / turns as f64;
                    if race < best.0 {
                        best = (race, position);
                    }
                }
                best.1
            }
        })
        .collect();
    Lookup(slots.into())
}

/// Fills a Maglev lookup table (Eisenbud et al., NSDI 2016, section 3.4)
/// for `backends` (address, turns per round, position in the eligible set;
/// at most [`MAX_HASHED_BACKENDS`], sorted by address). Each backend's preference list is a
/// permutation of the slots from two hashes of its address (offset, skip);
/// in each round every backend, in address order, takes the next free slot
/// of its list once per turn. So the table depends only on the set of
/// (address, weight) pairs, not on the order they were listed in, and a
/// heavier backend gets more slots. O(M log M) expected.
fn maglev_lookup(backends: &[(SocketAddr, u64, u16)]) -> Lookup {
    const EMPTY: u16 = u16::MAX;
    let m = MAGLEV_SIZE as u64;
    // (next slot to try, skip) per backend.
    let mut lists: Vec<(u64, u64)> = (backends.iter())
        .map(|(addr, _, _)| {
            let id = backend_id(addr);
            let offset = stable_hash(&[b"offset", &id]) % m;
            let skip = stable_hash(&[b"skip", &id]) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    if backends.iter().all(|b| b.1 == 0) {
        return Lookup::default();
    }
    let mut slots = vec![EMPTY; MAGLEV_SIZE];
    let mut filled = 0;
    while filled < MAGLEV_SIZE {
        for (&(_, turns, position), (next, skip)) in backends.iter().zip(&mut lists) {
            for _ in 0..turns {
                // M is prime and 0 < skip < M: the list visits every slot,
                // so a free one is found while the table is not full.
                while slots[*next as usize] != EMPTY {
                    *next = (*next + *skip) % m;
                }
                slots[*next as usize] = position;
                filled += 1;
                if filled == MAGLEV_SIZE {
                    return Lookup(slots.into());
                }
            }
        }
    }
    Lookup(slots.into())
}

/// Client-IP session affinity (Kubernetes `sessionAffinity: ClientIP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Affinity {
    pub timeout: Duration,
}

impl Affinity {
    /// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10_800);
}

/// Per-Service settings beyond scheduling and affinity. `Default` is what
/// a Service without annotations or optional fields gets (kube-proxy's
/// behaviour); each setting documents its source field or annotation.
/// Set with [`Service::with_settings`], so that adding one touches no
/// constructor call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Settings {
    /// UDP only: how long a flow (one client address) may stay idle before
    /// sluice forgets it and closes its backend socket, whether or not the
    /// backend replied. `None`: kube-proxy's conntrack defaults
    /// (`nf_conntrack_udp_timeout` 30 s while unreplied,
    /// `nf_conntrack_udp_timeout_stream` 120 s once replied). From the
    /// annotation `sluice.io/udp-timeout` (Kubernetes) or
    /// `udpTimeoutSeconds` (file).
    pub udp_timeout: Option<Duration>,
    /// UDP only: whether a client datagram that its backend leaves
    /// unanswered for `--udp-resend-after` is sent once more to another
    /// backend (and a backend that answers nothing is ejected). It
    /// duplicates datagrams, so it is for idempotent request/response
    /// protocols such as DNS. `None`: on for a Service port 53 (DNS), off
    /// otherwise. Annotation `sluice.io/udp-resend` (`"true"`/`"false"`),
    /// file field `udpResend`.
    pub udp_resend: Option<bool>,
    /// What the kernel does with a new connection to this entry while no
    /// backend is eligible (`--intercept nftables` only): reject it when the
    /// Service has no endpoints anywhere, drop it when it has some but this
    /// entry's traffic policy (`Local`) may use none of them (kube-proxy's
    /// `no-endpoint-services` verdicts). Set by the Kubernetes index; the
    /// file source's `noEndpoints:`.
    pub no_endpoints: NoEndpoints,
    /// `spec.loadBalancerSourceRanges` of the entry's family, on
    /// load-balancer IP entries only (empty elsewhere): with
    /// `--intercept nftables`, new connections from other sources are
    /// dropped. Empty: every source is allowed. The file source's
    /// `sourceRanges:`.
    pub source_ranges: Vec<Cidr>,
    /// Most client connections this Service serves at once on this node,
    /// counted over all its listen addresses of the same name (cluster IP,
    /// node ports, external IPs); a connection beyond it is reset at once.
    /// Annotation `sluice.io/max-connections`, file field `maxConnections`.
    /// `None`: the node default (`--service-max-connections`; unlimited
    /// unless set, so only the global `--max-connections` applies).
    pub max_connections: Option<u32>,
    /// A proxied connection that moves no byte either way for this long is
    /// closed (both sides reset). Annotation `sluice.io/idle-timeout`, file
    /// field `idleTimeout` (`300s`, `5m`...). `None`: no idle timeout
    /// (TCP keepalive still finds dead peers).
    pub idle_timeout: Option<Duration>,
    /// TCP only: send a PROXY protocol header to the backend first on
    /// every connection, carrying the client's address and port as source
    /// and the address:port the client dialled (the listen key) as
    /// destination, for backends that read it instead of the transparent
    /// dial. Annotation `sluice.io/proxy-protocol: v2`, file field
    /// `proxyProtocol: v2`. `None`: no header (the backend sees the
    /// client's bytes unchanged). Ignored on UDP entries.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// An external entry (node port, external IP, load-balancer IP) of an
    /// `externalTrafficPolicy: Local` Service: an outside client keeps its
    /// own IP towards the backend (with `--source-ip=transparent`), as
    /// kube-proxy does by not masquerading such traffic. Every backend of
    /// such an entry is local, so the reply comes back through this node.
    /// Set by the Kubernetes index; the file source's
    /// `keepExternalClientIp:`. `false`: outside clients are dialed from
    /// the node's address (kube-proxy masquerades them).
    pub keep_external_client_ip: bool,
}

/// What sluice's nftables table does with a new connection to an entry
/// without an eligible backend (see [`Settings::no_endpoints`]).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum NoEndpoints {
    /// TCP reset (ICMP port unreachable for other protocols): the client
    /// sees ECONNREFUSED at once. No endpoints anywhere.
    #[default]
    Reject,
    /// No answer at all (no SYN-ACK): endpoints exist, none this node may
    /// use (`externalTrafficPolicy`/`internalTrafficPolicy: Local`).
    Drop,
}

impl Settings {
    /// Shortest idle timeout accepted: below it, ordinary pauses of a
    /// healthy connection would be cut.
    pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

    /// Parses a `max-connections` value: an integer of at least 1.
    pub fn parse_max_connections(value: &str) -> Result<u32, String> {
        match value.trim().parse::<u32>() {
            Ok(0) => Err(format!("{value:?} must be at least 1")),
            Ok(n) => Ok(n),
            Err(_) => Err(format!("{value:?} is not an integer in 1..={}", u32::MAX)),
        }
    }

    /// Parses an `idle-timeout` value: a duration (`300s`, `5m`, `1h30m`)
    /// of at least [`Self::MIN_IDLE_TIMEOUT`].
    pub fn parse_idle_timeout(value: &str) -> Result<Duration, String> {
        let d = humantime::parse_duration(value.trim())
            .map_err(|e| format!("{value:?} is not a duration like 300s or 5m ({e})"))?;
        if d < Self::MIN_IDLE_TIMEOUT {
            return Err(format!(
                "{value:?} is shorter than {}s",
                Self::MIN_IDLE_TIMEOUT.as_secs()
            ));
        }
        Ok(d)
    }
}

/// A version of the PROXY protocol sluice can send to backends
/// ([`Settings::proxy_protocol`]): HAProxy's `proxy-protocol.txt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProxyProtocol {
    /// The binary header (version 2), `PROXY` command, TCP over IPv4 or
    /// IPv6, no TLVs (HAProxy's `send-proxy-v2`).
    #[serde(rename = "v2")]
    V2,
}

impl std::str::FromStr for ProxyProtocol {
    type Err = String;

    /// `v2` (spaces around it trimmed); anything else is an error naming
    /// the value and the valid ones.
    fn from_str(value: &str) -> Result<Self, String> {
        match value.trim() {
            "v2" => Ok(ProxyProtocol::V2),
            _ => Err(format!(
                "{value:?} is not a PROXY protocol version sluice sends (valid: v2)"
            )),
        }
    }
}

/// A service as reached on one listen address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Service {
    /// Human name, e.g. `default/web:http`; used in logs and metrics.
    pub name: String,
    pub policy: Policy,
    pub affinity: Option<Affinity>,
    /// Settings beyond scheduling: see [`Settings`].
    pub settings: Settings,
    /// Every backend, whatever its state (for draining and the debug view).
    backends: Vec<Backend>,
    /// Indexes into `backends` of those that may receive new connections.
    eligible: Vec<usize>,
    /// When eligible backends have unequal weights: one cycle of turns
    /// (positions in `eligible`), each backend's turns in proportion to its
    /// weight and spread evenly over the cycle. Empty when weights are
    /// equal: turn `k` is then position `k mod n`.
    turns: Vec<u32>,
    /// Hashing policies: slot to position in the eligible set. Maglev's
    /// table ([`MAGLEV_SIZE`] slots), or for source hashing one weighted
    /// cycle over the eligible backends in address order. Empty for other
    /// policies.
    lookup: Lookup,
}

/// Longest cycle of weighted turns kept per service; larger weight ratios
/// are scaled down to fit (every backend keeping at least one turn).
const MAX_TURNS: u64 = 4096;

/// `weights` (all > 0) divided by their gcd, and scaled down to sum to
/// about [`MAX_TURNS`] when larger (each keeping at least 1): the turns of
/// each backend in one cycle (round robin) or one round (Maglev's fill).
fn reduced_weights(weights: &[u64]) -> Vec<u64> {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut w: Vec<u64> = weights.iter().map(|w| w / g).collect();
    let total: u64 = w.iter().sum();
    if total > MAX_TURNS {
        for w in &mut w {
            *w = (u128::from(*w) * u128::from(MAX_TURNS) / u128::from(total)).max(1) as u64;
        }
    }
    w
}

/// One cycle of smooth weighted round robin over `weights` (all > 0):
/// backend `i` gets `w_i / g` turns per cycle (`g` their gcd; scaled to
/// about [`MAX_TURNS`] when larger), each turn placed at the middle of its
/// share of the cycle, so a heavy backend's turns interleave with the light
/// ones' instead of coming in one run. O(turns × log n).
fn weighted_turns(weights: &[u64]) -> Vec<u32> {
    let w = reduced_weights(weights);
    // Turn c (0-based) of backend i of n is due at (c + φ_i) / w_i of the
    // cycle, φ_i = (i + 1/2) / n: evenly spaced, and light backends out of
    // each other's way. The earliest due turn goes next (ties: lower index).
    let n = w.len() as u64;
    #[derive(PartialEq, Eq)]
    struct Due {
        /// (c + φ_i) · 2n, an integer: 2cn + 2i + 1.
        at: u64,
        step: u64,
        weight: u64,
        index: u32,
    }
    impl Ord for Due {
        fn cmp(&self, other: &Self) -> std::cmp::Ordering {
            // Reversed (the heap pops the largest): earlier is greater.
            let when = |d: &Due, by: &Due| u128::from(d.at) * u128::from(by.weight);
            (when(other, self).cmp(&when(self, other))).then(other.index.cmp(&self.index))
        }
    }
    impl PartialOrd for Due {
        fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }
    let mut heap: std::collections::BinaryHeap<Due> = (w.iter().zip(0u32..))
        .map(|(&weight, index)| Due {
            at: 2 * u64::from(index) + 1,
            step: 0,
            weight,
            index,
        })
        .collect();
    let mut turns = Vec::with_capacity(usize::try_from(w.iter().sum::<u64>()).unwrap_or(0));
    while let Some(mut due) = heap.pop() {
        turns.push(due.index);
        due.step += 1;
        due.at += 2 * n;
        if due.step < due.weight {
            heap.push(due);
        }
    }
    turns
}

impl Service {
    /// Builds a service and computes its eligible set:
    /// ready backends with a weight; when none, serving-and-terminating ones
    /// (ProxyTerminatingEndpoints); otherwise none. Weights are relative:
    /// see [`Service::weighted_turn`].
    /// Duplicate addresses keep their first occurrence.
    pub fn new(
        name: impl Into<String>,
        policy: Policy,
        affinity: Option<Affinity>,
        backends: Vec<Backend>,
    ) -> Self {
        let mut seen = std::collections::HashSet::with_capacity(backends.len());
        let backends: Vec<Backend> = backends
            .into_iter()
            .filter(|b| seen.insert(b.addr))
            .collect();
        let usable = |b: &Backend| b.weight > 0;
        let mut eligible: Vec<usize> = backends
            .iter()
            .enumerate()
            .filter(|(_, b)| usable(b) && b.conditions.ready && !b.conditions.terminating)
            .map(|(i, _)| i)
            .collect();
        if eligible.is_empty() {
            eligible = backends
                .iter()
                .enumerate()
                .filter(|(_, b)| usable(b) && b.conditions.serving && b.conditions.terminating)
                .map(|(i, _)| i)
                .collect();
        }
        let weights: Vec<u64> = (eligible.iter())
            .filter_map(|&i| backends.get(i))
            .map(|b| u64::from(b.weight))
            .collect();
        let turns = if weights.windows(2).all(|w| w[0] == w[1]) {
            Vec::new()
        } else {
            weighted_turns(&weights)
        };
        let lookup = if policy.hashes_client() && eligible.len() <= MAX_HASHED_BACKENDS {
            // By address: what every node agrees on, whatever the order
            // the backends were listed in.
            let mut ids: Vec<(SocketAddr, u64, u16)> = (eligible.iter())
                .filter_map(|&i| backends.get(i))
                .zip(reduced_weights(&weights))
                .zip(0u16..)
                .map(|((b, turns), position)| (b.addr, turns, position))
                .collect();
            ids.sort_unstable_by_key(|b| b.0);
            match policy {
                Policy::Maglev if ids.len() <= RENDEZVOUS_MAX_BACKENDS => rendezvous_lookup(&ids),
                Policy::Maglev => maglev_lookup(&ids),
                _ => {
                    let w: Vec<u64> = ids.iter().map(|b| b.1).collect();
                    let cycle = weighted_turns(&w);
                    let slot = |i: usize| ids.get(i).map_or(0, |b| b.2);
                    Lookup(cycle.iter().map(|&i| slot(i as usize)).collect())
                }
            }
        } else {
            Lookup::default()
        };
        Self {
            name: name.into(),
            policy,
            affinity,
            settings: Settings::default(),
            backends,
            eligible,
            turns,
            lookup,
        }
    }

    /// The same service with `settings`.
    pub fn with_settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    /// The eligible positions to offer client `hash` (see [`client_hash`])
    /// under a hashing policy, best first. The first is one lookup: slot
    /// `hash mod len` of the service's table (Maglev's, or for
    /// [`Policy::SourceHash`] one weighted cycle in address order). Then
    /// the next [`MAGLEV_WALK`] slots (for Maglev, other backends in an
    /// order that differs from slot to slot, so the clients of a backend
    /// that is down spread over the rest), then every position from the
    /// first on: a pick that skips tried and ejected backends along it
    /// still finds any that is left.
    ///
    /// Deterministic: the same on every node with the same eligible
    /// backends (addresses and weights), whatever their listing order.
    /// Empty when nothing is eligible.
    pub fn hash_order(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let n = self.eligible.len();
        let slots: &[u16] = if n == 0 { &[] } else { &self.lookup.0 };
        let start = hash.checked_rem(slots.len() as u64).unwrap_or(0) as usize;
        let first = (slots.get(start))
            .map_or(hash.checked_rem(n as u64).unwrap_or(0) as usize, |&p| {
                usize::from(p)
            });
        let walk = (0..slots.len().min(MAGLEV_WALK + 1))
            .filter_map(move |k| slots.get((start + k) % slots.len()))
            .map(|&p| usize::from(p));
        walk.chain((0..n).map(move |k| (first + k) % n))
    }

    /// The position (in the eligible set) of turn `k` of weighted round
    /// robin: over a cycle, each eligible backend gets turns in proportion
    /// to its weight, spread evenly. With equal weights, `k mod n`.
    /// Needs `eligible_len() > 0` (returns 0 otherwise).
    pub fn weighted_turn(&self, k: usize) -> usize {
        match self.turns.len() {
            0 => k.checked_rem(self.eligible.len()).unwrap_or(0),
            len => self.turns.get(k % len).map_or(0, |&i| i as usize),
        }
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// Number of backends eligible for a new connection.
    pub fn eligible_len(&self) -> usize {
        self.eligible.len()
    }

    /// The `i`-th eligible backend (`i < eligible_len()`).
    pub fn eligible(&self, i: usize) -> Option<&Backend> {
        self.eligible.get(i).and_then(|&j| self.backends.get(j))
    }

    /// Iterates the eligible backends in table order.
    pub fn eligible_iter(&self) -> impl Iterator<Item = &Backend> + '_ {
        self.eligible.iter().filter_map(|&j| self.backends.get(j))
    }

    /// Whether `addr` may receive a new connection from this service.
    pub fn is_eligible(&self, addr: SocketAddr) -> bool {
        self.eligible_iter().any(|b| b.addr == addr)
    }
}

/// The whole routing table. Immutable once published; compare two tables
/// with `==`.
///
/// Stored in a persistent ordered map ([`imbl::OrdMap`]): cloning a table is
/// O(1) and shares structure, and changing one key of a clone costs
/// O(log n). This lets the Kubernetes index keep a working table, change the
/// few keys one EndpointSlice touches and publish a clone, without copying
/// 10,000 services per update.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    services: imbl::OrdMap<ListenKey, Arc<Service>>,
    /// This node's pod networks (the Node's `spec.podCIDRs`): a client in
    /// one of them is a pod of this node, whose replies come back here
    /// (`--detect-local-mode NodeCIDR`, the data plane's choice of source
    /// address). Empty: unknown (no Node, or none assigned yet).
    local_pod_cidrs: Arc<[Cidr]>,
    /// The `healthCheckNodePort`s this node answers (LoadBalancer Services
    /// with `externalTrafficPolicy: Local`) and their local endpoint
    /// counts, by port: they travel with the table so that the one place
    /// that follows it also drives the responders (kube-proxy feeds its
    /// healthcheck server from its sync loop the same way).
    health_checks: Arc<[crate::k8s::HealthCheck]>,
}

impl Table {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the service reached on `key`.
    pub fn insert(&mut self, key: ListenKey, service: Arc<Service>) {
        self.services.insert(key, service);
    }

    /// Removes the service reached on `key`, returning it.
    pub fn remove(&mut self, key: &ListenKey) -> Option<Arc<Service>> {
        self.services.remove(key)
    }

    pub fn get(&self, key: &ListenKey) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ListenKey, &Arc<Service>)> + '_ {
        self.services.iter()
    }

    pub fn keys(&self) -> impl Iterator<Item = &ListenKey> + '_ {
        self.services.keys()
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// This node's pod networks, see [`Table::set_local_pod_cidrs`].
    pub fn local_pod_cidrs(&self) -> &[Cidr] {
        &self.local_pod_cidrs
    }

    /// Sets this node's pod networks (the Node's `spec.podCIDRs`); returns
    /// whether they changed. They travel with the table, so a change
    /// reaches the data path with the next publish.
    pub fn set_local_pod_cidrs(&mut self, cidrs: &[Cidr]) -> bool {
        if *self.local_pod_cidrs == *cidrs {
            return false;
        }
        self.local_pod_cidrs = cidrs.into();
        true
    }

    /// The `healthCheckNodePort`s to answer, see [`Table::set_health_checks`].
    pub fn health_checks(&self) -> &[crate::k8s::HealthCheck] {
        &self.health_checks
    }

    /// Sets the `healthCheckNodePort`s to answer; returns whether they
    /// changed. They travel with the table (shared by its clones until they
    /// change), so a change reaches the responders with the next publish.
    pub fn set_health_checks(&mut self, checks: Arc<[crate::k8s::HealthCheck]>) -> bool {
        if *self.health_checks == *checks {
            return false;
        }
        self.health_checks = checks;
        true
    }

    /// Whether `addr` may receive new connections from any service.
    pub fn is_eligible_anywhere(&self, addr: SocketAddr) -> bool {
        self.services.values().any(|s| s.is_eligible(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn mk_backend(a: &str, c: Conditions) -> Backend {
        Backend::new(addr(a), c)
    }

    fn eligible(s: &Service) -> Vec<SocketAddr> {
        s.eligible_iter().map(|b| b.addr).collect()
    }

    #[test]
    fn ready_backends_only_when_any_ready() {
        let s = Service::new(
            "t",
            Policy::RoundRobin,
            None,
            vec![
                mk_backend("10.0.0.1:80", Conditions::READY),
                mk_backend("10.0.0.2:80", Conditions::TERMINATING),
            ],
        );
        assert_eq!(eligible(&s), vec![addr("10.0.0.1:80")]);
    }

    #[test]
    fn terminating_serving_fallback_when_none_ready() {
        let not_serving = Conditions {
            ready: false,
            serving: false,
            terminating: true,
        };
        let s = Service::new(
            "t",
            Policy::RoundRobin,
            None,
            vec![
                mk_backend("10.0.0.1:80", not_serving),
                mk_backend("10.0.0.2:80", Conditions::TERMINATING),
            ],
        );
        assert_eq!(eligible(&s), vec![addr("10.0.0.2:80")]);
    }

    #[test]
    fn nothing_eligible_when_none_serving() {
        let s = Service::new(
            "t",
            Policy::RoundRobin,
            None,
            vec![mk_backend(
                "10.0.0.1:80",
                Conditions {
                    ready: false,
                    serving: false,
                    terminating: false,
                },
            )],
        );
        assert_eq!(s.eligible_len(), 0);
    }

    #[test]
    fn weight_zero_never_eligible_and_duplicates_dropped() {
        let mut zero = mk_backend("10.0.0.1:80", Conditions::READY);
        zero.weight = 0;
        let s = Service::new(
            "t",
            Policy::RoundRobin,
            None,
            vec![
                zero,
                mk_backend("10.0.0.2:80", Conditions::READY),
                mk_backend("10.0.0.2:80", Conditions::TERMINATING),
            ],
        );
        assert_eq!(eligible(&s), vec![addr("10.0.0.2:80")]);
        assert_eq!(s.backends().len(), 2);
    }

    /// Ready backends 10.0.0.1:80, .2, ... with these weights.
    fn weighted(policy: Policy, weights: &[u32]) -> Service {
        let backends = (weights.iter().zip(1u8..))
            .map(|(&weight, i)| Backend {
                weight,
                ..Backend::new(SocketAddr::from(([10, 0, 0, i], 80)), Conditions::READY)
            })
            .collect();
        Service::new("t", policy, None, backends)
    }

    #[test]
    fn weighted_turns_follow_weights_in_a_bounded_cycle() {
        let mk = |weights: &[u32]| weighted(Policy::RoundRobin, weights);
        let shares = |s: &Service, len: usize| {
            let mut c = vec![0; s.eligible_len()];
            for k in 0..len {
                c[s.weighted_turn(k)] += 1;
            }
            c
        };
        // Reduced by the gcd: a cycle of 6.
        let s = mk(&[2, 4, 6]);
        assert_eq!(s.turns.len(), 6);
        assert_eq!(shares(&s, 6), vec![1, 2, 3]);
        // Equal weights: no cycle kept, plain rotation.
        let s = mk(&[7, 7, 7]);
        assert!(s.turns.is_empty());
        assert_eq!(
            (0..4).map(|k| s.weighted_turn(k)).collect::<Vec<_>>(),
            [0, 1, 2, 0]
        );
        // Huge ratios are scaled into a bounded cycle; every backend keeps a turn.
        let s = mk(&[u32::MAX, 1, 0]);
        assert_eq!(s.eligible_len(), 2, "weight 0 drains");
        assert!(s.turns.len() as u64 <= MAX_TURNS + 2, "{}", s.turns.len());
        assert_eq!(shares(&s, s.turns.len())[1], 1);
        // No eligible backend: position 0, no panic.
        assert_eq!(mk(&[0]).weighted_turn(5), 0);
    }

    #[test]
    fn policies_parse_by_their_names() {
        for p in Policy::ALL {
            assert_eq!(p.name().parse::<Policy>(), Ok(p));
            assert_eq!(p.to_string(), p.name());
        }
        let err = "Maglev".parse::<Policy>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown scheduler \"Maglev\" (valid: round-robin, least-connections, maglev, source-hash)"
        );
    }

    #[test]
    fn the_client_hash_is_fixed() {
        // FNV-1a 64 then fmix64, computed independently of this code.
        assert_eq!(client_hash([192, 0, 2, 1].into()), 0x8039_3182_6a22_88ea);
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(client_hash(mapped), 0x8039_3182_6a22_88ea);
    }

    fn maglev(weights: &[u32]) -> Service {
        weighted(Policy::Maglev, weights)
    }

    /// Slots per eligible position.
    fn slot_shares(s: &Service) -> Vec<usize> {
        let mut c = vec![0; s.eligible_len()];
        for &p in s.lookup.0.iter() {
            c[usize::from(p)] += 1;
        }
        c
    }

    #[test]
    fn maglev_table_is_full_even_and_weighted() {
        let s = maglev(&[1; 10]);
        assert_eq!(s.lookup.0.len(), MAGLEV_SIZE);
        // Rendezvous shares vary by about √(N/M): 1.2% at N = 10.
        let even = MAGLEV_SIZE / 10;
        for share in slot_shares(&s) {
            assert!(share.abs_diff(even) <= even / 20, "{:?}", slot_shares(&s));
        }
        // Beyond RENDEZVOUS_MAX_BACKENDS, Maglev's own fill: even to a slot.
        let big = maglev_of(0..RENDEZVOUS_MAX_BACKENDS as u16 + 1);
        let shares = slot_shares(&big);
        let (min, max) = (shares.iter().min(), shares.iter().max());
        assert!(max.unwrap() - min.unwrap() <= 1, "{min:?}..{max:?}");
        // Twice the weight, twice the slots.
        let shares = slot_shares(&maglev(&[2, 1, 1]));
        assert!(
            shares[0].abs_diff(MAGLEV_SIZE / 2) < MAGLEV_SIZE / 100,
            "{shares:?}"
        );
        assert!(
            shares[1].abs_diff(shares[2]) < MAGLEV_SIZE / 100,
            "{shares:?}"
        );
        // Weight 0 drains; other policies keep no table.
        assert_eq!(slot_shares(&maglev(&[0, 3])), vec![MAGLEV_SIZE]);
        let rr = Service::new("t", Policy::RoundRobin, None, s.backends().to_vec());
        assert!(rr.lookup.0.is_empty());
        assert!(maglev(&[]).hash_order(7).next().is_none());
    }

    /// Backends `10.1.hi.lo:8080` for `ids`.
    fn maglev_of(ids: impl Iterator<Item = u16>) -> Service {
        let backends = ids
            .map(|i| {
                let [hi, lo] = i.to_be_bytes();
                Backend::new(SocketAddr::from(([10, 1, hi, lo], 8080)), Conditions::READY)
            })
            .collect();
        Service::new("t", Policy::Maglev, None, backends)
    }

    /// The fraction of 100,000 clients whose first pick differs.
    fn clients_moved(a: &Service, b: &Service) -> f64 {
        let first = |s: &Service, hash: u64| {
            let p = s.hash_order(hash).next().unwrap();
            s.eligible(p).unwrap().addr
        };
        let clients = 100_000u32;
        let moved = (0..clients)
            .map(|i| client_hash(std::net::Ipv4Addr::from((10 << 24 | 200 << 16) + i).into()))
            .filter(|&h| first(a, h) != first(b, h))
            .count();
        moved as f64 / f64::from(clients)
    }

    /// Issue 15's target: when one of N backends leaves, at most 1.2/N of
    /// the clients move (ideal 1/N: its own); measured for every backend
    /// leaving at N = 3, for five of them at N = 10 and 100; and a slot
    /// whose backend stays keeps it.
    #[test]
    fn maglev_moves_at_most_1_2_over_n_clients_when_one_leaves() {
        for n in [3u16, 10, 100] {
            let all = maglev_of(0..n);
            let step = usize::from(n / 5).max(1);
            for gone in (0..n).step_by(step) {
                let less = maglev_of((0..n).filter(|&i| i != gone));
                let moved = clients_moved(&all, &less);
                assert!(
                    moved <= 1.2 / f64::from(n),
                    "N = {n}, backend {gone} leaves: {:.3}/N moved",
                    moved * f64::from(n)
                );
                let at = |s: &Service, slot: usize| {
                    s.eligible(usize::from(s.lookup.0[slot])).unwrap().addr
                };
                let gone_addr = all.eligible(usize::from(gone)).unwrap().addr;
                for slot in 0..MAGLEV_SIZE {
                    if at(&all, slot) != gone_addr {
                        assert_eq!(at(&all, slot), at(&less, slot), "slot {slot} moved");
                    }
                }
            }
            let more = maglev_of(0..=n);
            let moved = clients_moved(&all, &more);
            assert!(
                moved <= 1.2 / f64::from(n + 1),
                "N = {n}, one joins: {moved}"
            );
        }
    }

    #[test]
    fn maglev_table_ignores_listing_order() {
        let backends = maglev(&[1, 2, 3, 1]).backends().to_vec();
        let mut reversed = backends.clone();
        reversed.reverse();
        let a = Service::new("t", Policy::Maglev, None, backends);
        let b = Service::new("t", Policy::Maglev, None, reversed);
        let at = |s: &Service, slot: usize| s.eligible(usize::from(s.lookup.0[slot])).unwrap().addr;
        assert!((0..MAGLEV_SIZE).all(|i| at(&a, i) == at(&b, i)));
    }

    #[test]
    fn tables_compare_by_content() {
        let mk = || {
            let mut t = Table::new();
            t.insert(
                ListenKey::tcp(addr("127.0.0.1:80")),
                Arc::new(Service::new(
                    "a",
                    Policy::RoundRobin,
                    None,
                    vec![mk_backend("10.0.0.1:80", Conditions::READY)],
                )),
            );
            t
        };
        assert_eq!(mk(), mk());
        let mut other = mk();
        other.insert(
            ListenKey::tcp(addr("127.0.0.1:81")),
            Arc::new(Service::new("b", Policy::RoundRobin, None, vec![])),
        );
        assert_ne!(mk(), other);
    }
}

/// What changed between two tables, for one log line per change.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TableDiff {
    pub added: Vec<ListenKey>,
    pub removed: Vec<ListenKey>,
    /// Per changed service: backend changes such as `+10.0.0.9:80`,
    /// `-10.0.0.1:80`, `10.0.0.2:80 ready->serving-terminating`.
    pub changed: Vec<(ListenKey, Vec<String>)>,
    /// The health-check ports or their local endpoint counts changed
    /// ([`Table::health_checks`]).
    pub health_checks: bool,
}

impl TableDiff {
    /// Costs O(changes × log n) when `new` was derived from `old` (the
    /// persistent map skips shared subtrees), O(n) at worst.
    pub fn between(old: &Table, new: &Table) -> TableDiff {
        use imbl::ordmap::DiffItem;
        let mut d = TableDiff::default();
        for item in old.services.diff(&new.services) {
            match item {
                DiffItem::Add(key, _) => d.added.push(*key),
                DiffItem::Remove(key, _) => d.removed.push(*key),
                DiffItem::Update {
                    old: (_, prev),
                    new: (key, svc),
                } => d.changed.push((*key, backend_changes(prev, svc))),
            }
        }
        d.health_checks = !Arc::ptr_eq(&old.health_checks, &new.health_checks)
            && old.health_checks != new.health_checks;
        d
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && !self.health_checks
    }
}

fn backend_changes(old: &Service, new: &Service) -> Vec<String> {
    let mut out = Vec::new();
    for b in new.backends() {
        match old.backends().iter().find(|o| o.addr == b.addr) {
            None => out.push(format!("+{} {}", b.addr, b.conditions.label())),
            Some(o) if o.conditions != b.conditions => out.push(format!(
                "{} {}->{}",
                b.addr,
                o.conditions.label(),
                b.conditions.label()
            )),
            Some(o) if o.weight != b.weight => {
                out.push(format!("{} weight {}->{}", b.addr, o.weight, b.weight))
            }
            Some(_) => {}
        }
    }
    for o in old.backends() {
        if !new.backends().iter().any(|b| b.addr == o.addr) {
            out.push(format!("-{}", o.addr));
        }
    }
    if old.policy != new.policy {
        out.push(format!("policy {}->{}", old.policy, new.policy));
    }
    if old.affinity != new.affinity {
        out.push("affinity changed".to_string());
    }
    if old.name != new.name {
        out.push(format!("name {}->{}", old.name, new.name));
    }
    out
}

/// At most this many items per part of the line; the rest is counted.
const DIFF_ITEMS: usize = 8;

impl fmt::Display for TableDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list<T: fmt::Display>(f: &mut fmt::Formatter<'_>, items: &[T]) -> fmt::Result {
            for (i, it) in items.iter().take(DIFF_ITEMS).enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{it}")?;
            }
            if items.len() > DIFF_ITEMS {
                write!(f, " and {} more", items.len() - DIFF_ITEMS)?;
            }
            Ok(())
        }
        let mut sep = "";
        if !self.added.is_empty() {
            f.write_str("added: ")?;
            list(f, &self.added)?;
            sep = "; ";
        }
        if !self.removed.is_empty() {
            write!(f, "{sep}removed: ")?;
            list(f, &self.removed)?;
            sep = "; ";
        }
        if !self.changed.is_empty() {
            write!(f, "{sep}changed: ")?;
            let parts: Vec<String> = self
                .changed
                .iter()
                .map(|(k, c)| {
                    let shown: Vec<&str> = c.iter().take(DIFF_ITEMS).map(String::as_str).collect();
                    let more = c.len().saturating_sub(DIFF_ITEMS);
                    if more > 0 {
                        format!("{k} [{} and {more} more]", shown.join(", "))
                    } else {
                        format!("{k} [{}]", shown.join(", "))
                    }
                })
                .collect();
            list(f, &parts)?;
            sep = "; ";
        }
        if self.health_checks {
            write!(f, "{sep}health checks changed")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod diff_tests {
    use super::*;

    fn key(port: u16) -> ListenKey {
        ListenKey::tcp(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    fn svc(backends: &[(&str, Conditions)]) -> Arc<Service> {
        Arc::new(Service::new(
            "s",
            Policy::RoundRobin,
            None,
            backends
                .iter()
                .map(|(a, c)| Backend::new(a.parse().unwrap(), *c))
                .collect(),
        ))
    }

    #[test]
    fn names_what_changed() {
        let mut old = Table::new();
        old.insert(
            key(80),
            svc(&[
                ("10.0.0.1:80", Conditions::READY),
                ("10.0.0.2:80", Conditions::READY),
            ]),
        );
        old.insert(key(81), svc(&[]));
        let mut new = Table::new();
        new.insert(
            key(80),
            svc(&[
                ("10.0.0.1:80", Conditions::TERMINATING),
                ("10.0.0.3:80", Conditions::READY),
            ]),
        );
        new.insert(key(82), svc(&[]));
        let d = TableDiff::between(&old, &new);
        assert_eq!(d.added, vec![key(82)]);
        assert_eq!(d.removed, vec![key(81)]);
        assert_eq!(
            d.to_string(),
            "added: 127.0.0.1:82/tcp; removed: 127.0.0.1:81/tcp; changed: 127.0.0.1:80/tcp \
             [10.0.0.1:80 ready->serving-terminating, +10.0.0.3:80 ready, -10.0.0.2:80]"
        );
        assert!(TableDiff::between(&new, &new).is_empty());
    }

    #[test]
    fn a_health_check_change_alone_is_a_change() {
        use crate::k8s::{HealthCheck, ObjectRef};
        let check = |local_endpoints| HealthCheck {
            service: ObjectRef {
                namespace: "default".into(),
                name: "lb".into(),
            },
            port: 30123,
            local_endpoints,
        };
        let mut old = Table::new();
        old.insert(key(80), svc(&[("10.0.0.1:80", Conditions::READY)]));
        let mut new = old.clone();
        new.set_health_checks(Arc::from(vec![check(1)]));
        let d = TableDiff::between(&old, &new);
        assert!(d.health_checks && !d.is_empty());
        assert!(d.added.is_empty() && d.changed.is_empty());
        assert_eq!(d.to_string(), "health checks changed");
        // Equal contents in another allocation: no change.
        let mut same = new.clone();
        same.set_health_checks(Arc::from(vec![check(1)]));
        assert!(TableDiff::between(&new, &same).is_empty());
        let mut fewer = new.clone();
        fewer.set_health_checks(Arc::from(vec![check(0)]));
        assert!(TableDiff::between(&new, &fewer).health_checks);
    }
}

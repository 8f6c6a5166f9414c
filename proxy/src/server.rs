//! The proxy: listeners that follow the table, one task per connection, and
//! a graceful shutdown.
//!
//! [`ProxyFollower`], one of the reconcile loop's followers
//! ([`crate::reconcile`]), follows the table. Each time a table goes live
//! it
//! 1. tells the [`Tracker`] (backends no longer eligible start draining), and
//! 2. opens a listener for every new TCP listen address and closes the
//!    listeners of addresses that left the table (their established
//!    connections carry on and drain like any other).
//!
//! [`Proxy::run`] keeps only the housekeeping (affinity expiry, idle
//! tracker entries, stale intercept routes).
//!
//! Each listener runs an accept loop: accept, take a connection permit (the
//! global limit; at the limit, wait for one), spawn [`Proxy::handle`]. With
//! data-plane workers ([`crate::workers`]) every address gets one listener
//! per worker, in one SO_REUSEPORT group, each accept loop on its worker's
//! event loop, and connections stay on the worker that accepted them;
//! without, one listener per address on the runtime that runs the proxy.
//!
//! A connection loads the live table once per dial attempt, picks an
//! eligible backend, dials it with a short timeout, and on failure ejects
//! that backend and tries another, up to a bounded number of attempts;
//! nothing has reached the client yet, so the client never sees the failed
//! dial. When no eligible backend is left the
//! client is reset at once.
//!
//! With `--intercept nftables` ([`ProxyConfig::intercept_port`]) no
//! listener is bound per Service address: sluice's nftables table
//! ([`crate::nft`]) redirects Service traffic to one intercept port
//! (0.0.0.0 and [::], one listener per worker), and each accepted
//! connection is routed by its original destination
//! (`getsockopt(SO_ORIGINAL_DST)`), looked up in the live table as a
//! [`ListenKey`]. A connection that was not redirected to a Service (no
//! original destination, the intercept port itself, or an address that is
//! no Service) is reset at once and counted, never proxied.
//!
//! On shutdown every listener closes at once, connections get the grace
//! period to finish, and whatever is left is cut, counted
//! (`sluice_shutdown_cut_connections_total`) and logged with its age.
//! Closing the listeners is the hand-over of an upgrade: a new sluice
//! listening beside this one on the same addresses (SO_REUSEPORT, see
//! [`crate::listener`]) takes every new connection, and with
//! `net.ipv4.tcp_migrate_req=1` the kernel moves the connections still
//! queued on the closed listeners to the new one's.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use sluice_control::{ListenKey, Protocol, Publisher, Service, Table, TableDiff};
use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::balance::{PickContext, ServiceRuntime, pick};
use crate::connect::{Bind, dial};
use crate::forward::{Mode, Outcome, forward, reset};
use crate::listener::bind_tcp;
use crate::metrics::{Metrics, ServiceMetrics};
use crate::source_ip::{Dial, Source};
use crate::tracker::{Tracker, TrackerConfig};

/// Intercept mode: how long a redirected connection that arrives before
/// the first table (a restarted sluice whose nftables table was adopted,
/// while its source still lists) waits for it before it is reset.
const FIRST_TABLE_WAIT: Duration = Duration::from_secs(10);

/// The service at `key` in the live table. Before the first table
/// (generation 0) waits for one to be published, at most `bound`; after,
/// answers at once.
async fn service_at(
    publisher: &Publisher,
    key: &ListenKey,
    bound: Duration,
) -> Option<Arc<Service>> {
    // Watched only before the first table, and looked again after
    // subscribing, so that a table published in between is not missed: a
    // connection after the first table costs one pointer load.
    let mut changes = None;
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let snapshot = publisher.snapshot();
        if let Some(service) = snapshot.table.get(key) {
            return Some(service.clone());
        }
        if snapshot.generation > 0 {
            return None;
        }
        let Some(rx) = changes.as_mut() else {
            changes = Some(publisher.subscribe());
            continue;
        };
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            _ => return None,
        }
    }
}

/// Data-plane settings (from the command line).
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Per-dial connect timeout.
    pub connect_timeout: Duration,
    /// Connect timeout of a connection's last chance (no attempt or no
    /// other healthy backend left): see `connect::attempt_timeout`.
    pub last_connect_timeout: Duration,
    /// Kernel buffer bounds of each connection's sockets
    /// (`forward::bound_buffers`).
    pub buffers: crate::forward::Buffers,
    /// Dials per client connection, over distinct backends.
    pub max_attempts: usize,
    pub tracker: TrackerConfig,
    /// Concurrent client connections, over all listeners.
    pub max_connections: usize,
    /// Concurrent client connections per Service that sets no
    /// `sluice.io/max-connections` (`--service-max-connections`); `None`:
    /// only `max_connections` applies.
    pub service_max_connections: Option<u32>,
    /// How long connections may finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// `Some(port)`: Service traffic arrives redirected at this port
    /// (`--intercept nftables`), no listener is bound per Service address.
    pub intercept_port: Option<u16>,
    /// Which source each dial gets (`--source-ip`, `--detect-local-mode`):
    /// the client's own address or the node's. Disabled unless enabled
    /// once the node's routing for it is in place.
    pub source_ip: Arc<crate::source_ip::SourceIp>,
    /// sluice's own admin endpoints (`--healthz-bind-address`,
    /// `--metrics-bind-address`): a Service listener that would share one
    /// of their ports is refused. Every listener is SO_REUSEPORT (for
    /// upgrades), so the kernel would let both bind and split the
    /// connections between them.
    pub reserved: Vec<SocketAddr>,
}

/// The admin endpoint of `reserved` that a listener on `addr` would share
/// a port with (same port, and the same address or either a wildcard).
pub fn clashes_with(addr: SocketAddr, reserved: &[SocketAddr]) -> Option<SocketAddr> {
    reserved.iter().copied().find(|r| {
        r.port() == addr.port()
            && r.is_ipv4() == addr.is_ipv4()
            && (r.ip() == addr.ip() || r.ip().is_unspecified() || addr.ip().is_unspecified())
    })
}

/// What a shutdown did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections open when accepting stopped.
    pub open_at_stop: usize,
    /// Connections cut at the end of the grace period.
    pub cut: usize,
}

pub struct Proxy {
    config: ProxyConfig,
    publisher: Arc<Publisher>,
    tracker: Arc<Tracker>,
    metrics: Arc<Metrics>,
    limit: Arc<Semaphore>,
    connections: TaskTracker,
    shutdown_cut: CancellationToken,
    /// Data-plane event loops; empty: the proxy's own runtime.
    workers: Vec<Handle>,
    /// Bind mode: the listeners ([`ProxyFollower`] opens and closes them,
    /// the shutdown drains them).
    listening: Mutex<Listeners>,
    /// Intercept mode: per-key state of the Services reached so far.
    routes: DashMap<ListenKey, Arc<Route>>,
    /// Intercept mode: stops the intercept accept loops.
    intercept_stop: CancellationToken,
    intercept_tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Reaching `--max-connections`, reported at warn level.
    limit_warned: Throttle,
    /// A Service reaching its own limit, reported at warn level.
    service_limit_warned: Throttle,
}

/// A connection limit is reported at warn level at most this often.
const LIMIT_WARN_EVERY: Duration = Duration::from_secs(10);

/// A warning logged at most once per [`LIMIT_WARN_EVERY`]; the occasions
/// held back in between are counted and told with the next one.
#[derive(Default)]
struct Throttle {
    last: Mutex<Option<Instant>>,
    held_back: std::sync::atomic::AtomicU64,
}

impl Throttle {
    /// `Some(occasions held back since the last warning)` when this one is
    /// to be logged; `None` (counted) when it is held back.
    fn due(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = Instant::now();
        // Never waits: under a flood of rejections on several workers, the
        // one holding the lock decides and the others count themselves.
        let mut last = match self.last.try_lock() {
            Ok(last) => last,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                self.held_back.fetch_add(1, Relaxed);
                return None;
            }
        };
        if last.is_some_and(|t| now.saturating_duration_since(t) < LIMIT_WARN_EVERY) {
            self.held_back.fetch_add(1, Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.held_back.swap(0, Relaxed))
    }
}

/// Counts a connection in its Service's active gauge until dropped.
struct Active<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What a connection to one listen key needs besides the table; shared
/// (one `Arc` clone per connection).
struct Route {
    runtime: Arc<ServiceRuntime>,
    metrics: Arc<ServiceMetrics>,
    service: String,
}

/// Where an accept loop's connections go.
enum Target {
    /// A listener bound on the Service's own address.
    Service(ListenKey, Arc<Route>),
    /// The intercept port: routed by original destination.
    Intercept,
}

/// The bind-mode listeners, by listen key.
#[derive(Default)]
struct Listeners {
    by_key: HashMap<ListenKey, Listening>,
    /// The shutdown took them: nothing is bound any more.
    closed: bool,
}

/// How often idle client affinity is expired.
const AFFINITY_EXPIRY: Duration = Duration::from_secs(30);

/// A listener whose bind failed is retried this often.
pub(crate) const BIND_RETRY: Duration = Duration::from_secs(1);

/// The table-following half of [`Proxy`], driven by
/// [`crate::reconcile::run`] with the other followers: at each publish it
/// tells the [`Tracker`] and brings the listeners (bind mode) or routes
/// (intercept mode) to the table by its diff. A bind that failed makes the
/// apply incomplete, so the reconciler retries it after [`BIND_RETRY`]
/// (1 s: a port held by a process being replaced comes free soon; the
/// nftables retry keeps its 5 s). Once every follower has the table, the
/// generation is told: `sluice_table_generation` and the `table live`
/// line.
pub struct ProxyFollower {
    proxy: Arc<Proxy>,
    /// Keys whose bind failed, retried at each apply.
    failed: HashSet<ListenKey>,
}

impl ProxyFollower {
    fn sync(&mut self, diff: &TableDiff, table: &Table) -> bool {
        let proxy = &self.proxy;
        proxy.tracker.on_diff(diff, table);
        let mut listeners = proxy.listening();
        if listeners.closed {
            return true;
        }
        proxy.reconcile(table, diff, &mut listeners.by_key, &mut self.failed);
        self.failed.is_empty()
    }
}

impl crate::reconcile::Follower for ProxyFollower {
    fn apply<'a>(
        &'a mut self,
        diff: &'a TableDiff,
        table: &'a Table,
    ) -> futures_util::future::BoxFuture<'a, bool> {
        let complete = self.sync(diff, table);
        Box::pin(std::future::ready(complete))
    }

    fn retry_after(&self) -> Duration {
        BIND_RETRY
    }

    fn applied(&mut self, generation: u64, diff: &TableDiff, table: &Table) {
        let proxy = &self.proxy;
        proxy.metrics.table_generation.set(generation as i64);
        proxy.metrics.table_publishes.inc();
        info!(
            services = table.len(),
            backends = proxy.tracker.listed(),
            listening = proxy.listening().by_key.len(),
            "table live generation={} {}",
            generation,
            if diff.is_empty() {
                "(no change)".to_string()
            } else {
                diff.to_string()
            },
        );
    }
}

struct Listening {
    runtime: Arc<ServiceRuntime>,
    service: String,
    stop: CancellationToken,
    /// One accept loop per listener (per worker).
    tasks: Vec<JoinHandle<()>>,
}

impl Proxy {
    /// A proxy that accepts and forwards on the runtime that runs it.
    pub fn new(config: ProxyConfig, publisher: Arc<Publisher>, metrics: Arc<Metrics>) -> Arc<Self> {
        Self::with_workers(config, publisher, metrics, Vec::new())
    }

    /// A proxy that accepts and forwards on `workers` (one listener per
    /// worker and address); on its own runtime when `workers` is empty.
    pub fn with_workers(
        config: ProxyConfig,
        publisher: Arc<Publisher>,
        metrics: Arc<Metrics>,
        workers: Vec<Handle>,
    ) -> Arc<Self> {
        let shutdown_cut = CancellationToken::new();
        Arc::new(Self {
            tracker: Arc::new(Tracker::new(
                config.tracker,
                shutdown_cut.clone(),
                metrics.clone(),
            )),
            limit: Arc::new(Semaphore::new(config.max_connections)),
            config,
            publisher,
            metrics,
            connections: TaskTracker::new(),
            shutdown_cut,
            workers,
            listening: Mutex::new(Listeners::default()),
            routes: DashMap::new(),
            intercept_stop: CancellationToken::new(),
            intercept_tasks: Mutex::new(Vec::new()),
            limit_warned: Throttle::default(),
            service_limit_warned: Throttle::default(),
        })
    }

    /// Warns that `--max-connections` is reached, at most once per
    /// [`LIMIT_WARN_EVERY`] (every wait is counted in
    /// `sluice_connection_limit_waits_total`).
    fn warn_limit_reached(&self) {
        if let Some(held_back) = self.limit_warned.due() {
            warn!(
                max_connections = self.config.max_connections,
                held_back,
                "connection limit reached: new connections wait in the accept backlog \
                 (sluice_connection_limit_waits_total counts them; held_back: waits \
                 since the last of these warnings)"
            );
        }
    }

    /// Warns that a Service is at its own limit, at most once per
    /// [`LIMIT_WARN_EVERY`] over all Services (each rejection is counted in
    /// `sluice_service_limit_rejected_total`).
    fn warn_service_limit_reached(&self, service: &str, max: u32) {
        if let Some(held_back) = self.service_limit_warned.due() {
            warn!(
                service,
                max_connections = max,
                held_back,
                "service connection limit reached: new connections to it are reset \
                 (sluice_service_limit_rejected_total counts them; held_back: rejections \
                 of any service since the last of these warnings)"
            );
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }

    /// Intercept mode: binds the intercept listeners (0.0.0.0, required;
    /// [::], skipped with a warning when IPv6 is unavailable), one per
    /// worker, and starts their accept loops. Returns the bound addresses;
    /// none without `intercept_port`.
    pub fn start_intercept(self: &Arc<Self>) -> std::io::Result<Vec<SocketAddr>> {
        let Some(port) = self.config.intercept_port else {
            return Ok(Vec::new());
        };
        let mut bound = Vec::new();
        for addr in [
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
        ] {
            let listeners = match self.bind(addr) {
                Ok(l) => l,
                Err(e) if addr.is_ipv6() => {
                    warn!(address = %addr, error = %e, "cannot bind the IPv6 intercept listener: IPv6 Services are not served");
                    continue;
                }
                Err(e) => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("cannot bind the intercept port {addr}: {e}"),
                    ));
                }
            };
            info!(address = %addr, listeners = listeners.len(), "intercept port listening");
            bound.push(addr);
            let mut tasks = self
                .intercept_tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (listener, worker) in listeners {
                let task = self.clone().accept_loop(
                    ListenKey::tcp(addr),
                    listener,
                    Target::Intercept,
                    self.intercept_stop.clone(),
                );
                tasks.push(match worker {
                    Some(worker) => worker.spawn(task),
                    None => tokio::spawn(task),
                });
            }
        }
        Ok(bound)
    }

    /// The half of the proxy that follows the table (bind-mode listeners,
    /// intercept routes, the tracker), for [`crate::reconcile::run`].
    pub fn follower(self: &Arc<Self>) -> ProxyFollower {
        ProxyFollower {
            proxy: self.clone(),
            failed: HashSet::new(),
        }
    }

    /// Serves until `stop` fires, then shuts down gracefully. Does not
    /// follow the table ([`ProxyFollower`] does, driven by
    /// [`crate::reconcile::run`]): every 30 s it expires idle client
    /// affinity, forgets idle backends no table lists
    /// ([`Tracker::forget_idle`]) and intercept routes a race left behind,
    /// a clock of its own rather than a table change.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) -> ShutdownReport {
        let mut housekeeping = tokio::time::interval(AFFINITY_EXPIRY);
        housekeeping.tick().await;
        loop {
            tokio::select! {
                _ = housekeeping.tick() => {
                    self.expire_affinity();
                    self.tracker.forget_idle();
                    self.prune_stale_routes();
                }
                _ = stop.cancelled() => break,
            }
        }
        self.shutdown().await
    }

    /// Brings the listeners (bind mode) or routes (intercept mode) to
    /// `table`, given `diff` from the table of the previous call: keys
    /// that left stop accepting, keys that came (and earlier bind failures,
    /// retried) are bound. O(changes + failures), not O(table).
    fn reconcile(
        self: &Arc<Self>,
        table: &Table,
        diff: &TableDiff,
        listening: &mut HashMap<ListenKey, Listening>,
        failed: &mut HashSet<ListenKey>,
    ) {
        if self.config.intercept_port.is_some() {
            self.prune_routes(table, diff);
            return;
        }
        let mut closed = Vec::new();
        for key in &diff.removed {
            if let Some(l) = listening.remove(key) {
                info!(listen = %key, service = %l.service, "service removed: stopped accepting");
                l.stop.cancel();
                closed.push(l.service.clone());
            }
        }
        for name in closed {
            if !listening.values().any(|l| l.service == name) {
                self.metrics.forget_service(&name);
            }
        }
        failed.retain(|key| table.get(key).is_some());
        let wanted: Vec<ListenKey> = diff.added.iter().chain(failed.iter()).copied().collect();
        for key in &wanted {
            let Some(service) = table.get(key) else {
                continue;
            };
            if listening.contains_key(key) {
                continue;
            }
            if key.protocol != Protocol::Tcp {
                continue; // UDP: served by crate::udp
            }
            match self.bind(key.addr) {
                Ok(listeners) => {
                    if failed.remove(key) {
                        info!(listen = %key, "bind succeeded after earlier failure");
                    }
                    info!(listen = %key, service = %service.name, listeners = listeners.len(), "listening");
                    let route = self.new_route(&service.name);
                    let runtime = route.runtime.clone();
                    let stop = CancellationToken::new();
                    let tasks = listeners
                        .into_iter()
                        .map(|(listener, worker)| {
                            let task = self.clone().accept_loop(
                                *key,
                                listener,
                                Target::Service(*key, route.clone()),
                                stop.clone(),
                            );
                            match worker {
                                Some(worker) => worker.spawn(task),
                                None => tokio::spawn(task),
                            }
                        })
                        .collect();
                    listening.insert(
                        *key,
                        Listening {
                            runtime,
                            service: service.name.clone(),
                            stop,
                            tasks,
                        },
                    );
                }
                Err(e) => {
                    if failed.insert(*key) {
                        warn!(listen = %key, service = %service.name, error = %e, "cannot listen; retrying every second");
                    }
                }
            }
        }
    }

    /// Binds the listeners of one address: one per worker, each registered
    /// with its worker's event loop, or one on the current runtime. All or
    /// none: on error the ones already bound are closed.
    fn bind(&self, addr: SocketAddr) -> std::io::Result<Vec<(TcpListener, Option<&Handle>)>> {
        if let Some(admin) = clashes_with(addr, &self.config.reserved) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{addr} would share the port of sluice's own admin endpoint {admin}"),
            ));
        }
        // The accepted connections inherit the buffer bounds (Linux).
        let bind_tcp = |addr| {
            let l = bind_tcp(addr)?;
            crate::forward::bound_listener(&l, self.config.buffers);
            Ok::<_, std::io::Error>(l)
        };
        if self.workers.is_empty() {
            return Ok(vec![(bind_tcp(addr)?, None)]);
        }
        let mut bound = Vec::with_capacity(self.workers.len());
        let mut addr = addr;
        for worker in &self.workers {
            let _entered = worker.enter();
            let listener = bind_tcp(addr)?;
            // Port 0: the rest of the group joins the port the first got.
            addr = listener.local_addr()?;
            bound.push((listener, Some(worker)));
        }
        Ok(bound)
    }

    fn new_route(&self, service: &str) -> Arc<Route> {
        Arc::new(Route {
            runtime: Arc::new(ServiceRuntime::default()),
            metrics: Arc::new(self.metrics.service(service)),
            service: service.to_string(),
        })
    }

    /// Intercept mode: forgets the routes of the diff's keys that left the
    /// table (or now lead to another service).
    fn prune_routes(&self, table: &Table, diff: &TableDiff) {
        let keys = (diff.removed.iter()).chain(diff.changed.iter().map(|(k, _)| k));
        self.prune_routes_of(table, keys);
    }

    /// Intercept mode: forgets the routes of `keys` that left `table` (or
    /// now lead to another service), and their metrics when no route of
    /// the same service is left.
    fn prune_routes_of<'k>(&self, table: &Table, keys: impl Iterator<Item = &'k ListenKey>) {
        let mut closed = Vec::new();
        for key in keys {
            let gone = self.routes.remove_if(key, |_, r| {
                table.get(key).is_none_or(|s| s.name != r.service)
            });
            if let Some((_, r)) = gone {
                closed.push(r.service.clone());
            }
        }
        for name in closed {
            if !self.routes.iter().any(|r| r.service == name) {
                self.metrics.forget_service(&name);
            }
        }
    }

    /// Intercept mode: the listen key a redirected connection was meant
    /// for, and its route; `Err(reason)` when it must be reset.
    async fn route(&self, client: &TcpStream) -> Result<(ListenKey, Arc<Route>), &'static str> {
        const NO_ORIGINAL: &str = "no_original_destination";
        let local = client.local_addr().map_err(|_| NO_ORIGINAL)?;
        let sock = SockRef::from(client);
        let original = match local {
            SocketAddr::V4(_) => sock.original_dst_v4(),
            SocketAddr::V6(_) => sock.original_dst_v6(),
        };
        let original = original
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or(NO_ORIGINAL)?;
        if original == local {
            // Not redirected: someone dialed the intercept port itself.
            return Err("direct");
        }
        let key = ListenKey::tcp(original);
        let service = service_at(&self.publisher, &key, FIRST_TABLE_WAIT)
            .await
            .ok_or("not_a_service")?;
        if let Some(route) = self.routes.get(&key)
            && route.service == service.name
        {
            return Ok((key, route.clone()));
        }
        let route = self.new_route(&service.name);
        self.routes.insert(key, route.clone());
        Ok((key, route))
    }

    /// Intercept mode: forgets routes the diffs missed: a connection that
    /// looked its Service up in a table replaced just after may add its
    /// route once the follower pruned that key. A walk of the routes, on
    /// the 30 s clock.
    fn prune_stale_routes(&self) {
        let keys: Vec<ListenKey> = self.routes.iter().map(|r| *r.key()).collect();
        self.prune_routes_of(&self.publisher.load(), keys.iter());
    }

    fn expire_affinity(&self) {
        let now = Instant::now();
        let table = self.publisher.load();
        let runtimes: Vec<(ListenKey, Arc<ServiceRuntime>)> = {
            let listening = self.listening();
            (listening.by_key.iter())
                .map(|(key, l)| (*key, l.runtime.clone()))
                .chain(self.routes.iter().map(|r| (*r.key(), r.runtime.clone())))
                .collect()
        };
        for (key, runtime) in runtimes {
            if let Some(aff) = table.get(&key).and_then(|s| s.affinity) {
                runtime.expire_affinity(aff.timeout, now);
            }
        }
    }

    /// The bind-mode listeners: locked by the follower at a publish, by
    /// the affinity expiry and by the shutdown, never per connection.
    fn listening(&self) -> std::sync::MutexGuard<'_, Listeners> {
        self.listening.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accepts on `listener` (whose address `listen` names) until `stop`.
    async fn accept_loop(
        self: Arc<Self>,
        listen: ListenKey,
        listener: TcpListener,
        target: Target,
        stop: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = stop.cancelled() => return,
            };
            let (client, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather
                    // than spin; the listener itself stays open.
                    self.metrics.accept_error(&e);
                    warn!(listen = %listen, error = %e, ?backoff, "accept failed; backing off");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            backoff = Duration::from_millis(5);
            let fixed = match &target {
                Target::Service(key, route) => Some((*key, route.clone())),
                Target::Intercept => None,
            };
            // A permit of the global limit, taken only once a connection is
            // here: an idle loop holds none (there is one loop per worker
            // and address). At the limit this loop waits with the one
            // connection it accepted; further ones wait in the backlog.
            let permit = match self.limit.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    self.metrics.limit_wait();
                    self.warn_limit_reached();
                    debug!(listen = %listen, "connection limit reached: waiting for a connection to end");
                    tokio::select! {
                        p = self.limit.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            Err(_) => return, // the semaphore is never closed
                        },
                        // The accepted client is dropped (closed) with us.
                        _ = stop.cancelled() => return,
                    }
                }
            };
            let this = self.clone();
            self.connections.spawn(async move {
                let (key, route) = match fixed {
                    Some(fixed) => fixed,
                    None => match this.route(&client).await {
                        Ok(r) => r,
                        Err(reason) => {
                            this.metrics.intercept_rejected(reason);
                            debug!(client = %peer, listen = %listen, reason, "not redirected Service traffic: reset");
                            reset(&client);
                            return;
                        }
                    },
                };
                let Route {
                    runtime, metrics, ..
                } = &*route;
                this.handle(client, peer, key, runtime, metrics).await;
                drop(permit);
            });
        }
    }

    /// Serves one client connection from pick to close.
    pub async fn handle(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        key: ListenKey,
        runtime: &ServiceRuntime,
        metrics: &ServiceMetrics,
    ) {
        // On Linux the listener's TCP_NODELAY is inherited (see listener.rs).
        #[cfg(not(target_os = "linux"))]
        let _ = client.set_nodelay(true);
        let accepted = Instant::now();
        // One table load serves the limit check and the first attempt.
        let mut table = self.publisher.load();
        let settings = table.get(&key).map(|s| &s.settings);
        let limit =
            (settings.and_then(|s| s.max_connections)).or(self.config.service_max_connections);
        let idle = settings.and_then(|s| s.idle_timeout);
        let proxy_header = (settings.and_then(|s| s.proxy_protocol))
            .map(|v| crate::proxy_protocol::Header::for_client(v, &client, peer, key.addr));
        // The Service's active gauge is its connection count (shared by
        // its listen addresses): counted first, so that concurrent
        // connections on several workers cannot all slip under the limit.
        let previous = metrics.active.inc();
        let _active = Active(&metrics.active);
        if let Some(max) = limit
            && previous >= i64::from(max)
        {
            // Reset at once rather than wait: a wait would hold this
            // accept loop (shared by every Service at the intercept port)
            // and a waiting client cannot tell a full Service from a dead
            // one. See docs/reliability.md.
            metrics.limit_rejected.inc();
            self.warn_service_limit_reached(&metrics.name, max);
            debug!(client = %peer, listen = %key, max, "service connection limit reached: reset");
            reset(&client);
            return;
        }
        metrics.accepted.inc();
        let mut tried: Vec<SocketAddr> = Vec::new();
        while tried.len() < self.config.max_attempts {
            if !tried.is_empty() {
                table = self.publisher.load();
            }
            let Some(service) = table.get(&key) else {
                break;
            };
            let now = Instant::now();
            let ctx = PickContext {
                health: &*self.tracker,
                client_ip: peer.ip(),
                exclude: &tried,
                now,
            };
            let Some(addr) = pick(service, runtime, &ctx) else {
                break;
            };
            let guard = self.tracker.connect(addr);
            let timeout = crate::connect::attempt_timeout(
                service,
                addr,
                &tried,
                self.config.max_attempts,
                &*self.tracker,
                now,
                (
                    self.config.connect_timeout,
                    self.config.last_connect_timeout,
                ),
            );
            let source = self.config.source_ip.choose(&Dial {
                client: peer.ip(),
                backend: addr.ip(),
                keep_external_client_ip: service.settings.keep_external_client_ip,
                node_pod_cidrs: table.local_pod_cidrs(),
            });
            let bind = match source {
                Source::Client(ip) => Some(Bind::transparent(ip)),
                Source::Node(reason) => {
                    self.metrics.source_ip.node(reason);
                    None
                }
            };
            let dialed = dial(addr, bind, timeout).await;
            if bind.is_some() && dialed.is_err() {
                // No retry from the node's address: that would hide broken
                // reply steering behind changed client IPs. Another
                // backend is tried as usual.
                self.metrics.source_ip.transparent_dial_failures.inc();
            }
            match crate::proxy_protocol::after_dial(addr, dialed, proxy_header.as_ref()).await {
                Ok(backend) => {
                    if self.tracker.dial_succeeded(addr) {
                        info!(backend = %addr, "backend accepts connections again");
                    }
                    debug!(client = %peer, listen = %key, backend = %addr, attempts = tried.len() + 1, "connected");
                    crate::forward::bound_buffers(&client, &backend, self.config.buffers);
                    let (outcome, moved) =
                        forward(client, backend, guard.cut_token(), Mode::from_env(), idle).await;
                    metrics.ended(outcome);
                    metrics.bytes_up.inc_by(moved.client_to_backend);
                    metrics.bytes_down.inc_by(moved.backend_to_client);
                    match outcome {
                        Outcome::Cut => self.cut_at_shutdown(peer, addr, accepted),
                        Outcome::Idle => {
                            debug!(client = %peer, backend = %addr, ?idle, "idle timeout: connection closed")
                        }
                        _ => {}
                    }
                    return;
                }
                Err(e) => {
                    drop(guard);
                    if let Some(what) = crate::saturation::local_resource(&e.source) {
                        self.metrics.saturation.record(now, what);
                    }
                    let cooldown = self.tracker.dial_failed(addr, e.kind, now);
                    debug!(client = %peer, service = %service.name, error = %e, ?cooldown, "dial failed; backend ejected");
                    tried.push(addr);
                    if tried.len() < self.config.max_attempts {
                        metrics.retries.inc();
                    }
                }
            }
        }
        metrics.no_backend.inc();
        debug!(client = %peer, listen = %key, tried = tried.len(), "no backend left: resetting client");
        reset(&client);
    }

    /// A connection ended cut: at the end of the shutdown grace it is
    /// counted and logged with its age (an upgrade or restart cut it);
    /// a drain-timeout cut is the tracker's to count.
    fn cut_at_shutdown(&self, client: SocketAddr, backend: SocketAddr, accepted: Instant) {
        if !self.shutdown_cut.is_cancelled() {
            debug!(%client, %backend, "connection cut");
            return;
        }
        self.metrics.shutdown_cut.inc();
        warn!(
            %client,
            %backend,
            age = ?accepted.elapsed(),
            grace = ?self.config.shutdown_grace,
            "connection cut: still open at the end of the shutdown grace"
        );
    }

    async fn shutdown(&self) -> ShutdownReport {
        // Closed for the follower too: a publish racing the shutdown binds
        // nothing more.
        let listening = {
            let mut listeners = self.listening();
            listeners.closed = true;
            std::mem::take(&mut listeners.by_key)
        };
        for l in listening.values() {
            l.stop.cancel();
        }
        self.intercept_stop.cancel();
        let intercept = std::mem::take(
            &mut *self
                .intercept_tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for task in intercept {
            let _ = task.await;
        }
        for (_, l) in listening {
            for task in l.tasks {
                let _ = task.await;
            }
        }
        self.connections.close();
        let open_at_stop = self.connections.len();
        info!(
            connections = open_at_stop,
            grace = ?self.config.shutdown_grace,
            "stopped accepting; waiting for connections to finish"
        );
        let mut cut = 0;
        if tokio::time::timeout(self.config.shutdown_grace, self.connections.wait())
            .await
            .is_err()
        {
            cut = self.connections.len();
            warn!(
                connections = cut,
                "shutdown grace over: cutting connections"
            );
            self.shutdown_cut.cancel();
            if tokio::time::timeout(Duration::from_secs(5), self.connections.wait())
                .await
                .is_err()
            {
                warn!(
                    connections = self.connections.len(),
                    "connections still open after cut"
                );
            }
        }
        info!(open_at_stop, cut, "shutdown complete");
        ShutdownReport { open_at_stop, cut }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_control::Policy;

    fn one_service(key: ListenKey) -> Table {
        let mut t = Table::new();
        t.insert(
            key,
            Arc::new(Service::new("web", Policy::RoundRobin, None, Vec::new())),
        );
        t
    }

    #[test]
    fn a_listener_on_an_admin_endpoint_s_port_clashes() {
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let reserved = [a("127.0.0.1:10249"), a("0.0.0.0:10256")];
        assert_eq!(
            clashes_with(a("127.0.0.1:10249"), &reserved),
            Some(reserved[0])
        );
        assert_eq!(
            clashes_with(a("0.0.0.0:10249"), &reserved),
            Some(reserved[0])
        );
        assert_eq!(
            clashes_with(a("10.96.0.1:10256"), &reserved),
            Some(reserved[1])
        );
        assert_eq!(clashes_with(a("127.0.0.2:10249"), &reserved), None);
        assert_eq!(clashes_with(a("127.0.0.1:80"), &reserved), None);
        assert_eq!(
            clashes_with(a("[::]:10256"), &reserved),
            None,
            "other family"
        );
    }

    #[test]
    fn a_throttled_warning_counts_what_it_holds_back() {
        let t = Throttle::default();
        assert_eq!(t.due(), Some(0), "the first is logged");
        assert_eq!(t.due(), None);
        assert_eq!(t.due(), None);
        // The next one due will tell of the two held back.
        *t.last.lock().unwrap() = Instant::now().checked_sub(LIMIT_WARN_EVERY);
        assert_eq!(t.due(), Some(2));
        assert_eq!(t.due(), None);
    }

    #[tokio::test]
    async fn before_the_first_table_a_lookup_waits_for_it() {
        let key = ListenKey::tcp("10.96.0.10:80".parse().unwrap());
        let publisher = Arc::new(Publisher::new());
        let later = publisher.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            later.publish(one_service(key));
        });
        let found = service_at(&publisher, &key, Duration::from_secs(5)).await;
        assert_eq!(found.unwrap().name, "web");
    }

    #[tokio::test]
    async fn before_the_first_table_the_wait_is_bounded() {
        let key = ListenKey::tcp("10.96.0.10:80".parse().unwrap());
        let publisher = Publisher::new();
        let start = Instant::now();
        assert!(
            service_at(&publisher, &key, Duration::from_millis(50))
                .await
                .is_none()
        );
        assert!(start.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn after_the_first_table_an_unknown_key_is_refused_at_once() {
        let key = ListenKey::tcp("10.96.0.10:80".parse().unwrap());
        let other = ListenKey::tcp("10.96.0.11:80".parse().unwrap());
        let publisher = Publisher::new();
        publisher.publish(one_service(key));
        let start = Instant::now();
        assert!(
            service_at(&publisher, &other, Duration::from_secs(5))
                .await
                .is_none()
        );
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(
            service_at(&publisher, &key, Duration::from_secs(5))
                .await
                .is_some()
        );
    }
}

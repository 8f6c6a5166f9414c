//! The Kubernetes source: Services, EndpointSlices and this node's Node,
//! watched with kube-rs's watcher, fed to the pure [`Index`], published.
//!
//! This is the only module of sluice that imports `kube`.
//!
//! Behaviour:
//! - One watcher per kind, each with `.default_backoff()`: errors are logged
//!   and retried, never end the source; the last table keeps serving.
//! - Like kube's reflector store, a (re)list is buffered from `Init` to
//!   `InitDone` and then replaces that kind in the index whole, so objects
//!   deleted while the watch was down disappear.
//! - Ready (first publish, generation 1) only once every kind has been fully
//!   listed and turned into a table; before that nothing is published.
//! - Coalescing: at most one table build per `coalesce` interval. A change
//!   after a quiet interval is built at once; changes during the interval
//!   wait for its end and are built together.
//! - Malformed objects are logged with namespace/name and skipped; a bad
//!   field of an object that is otherwise used is left out, logged, counted.
//! - `healthCheckNodePort`s of LoadBalancer Services with
//!   `externalTrafficPolicy: Local` and their local endpoint counts travel
//!   with the published table ([`crate::table::Table::health_checks`]);
//!   the responders ([`super::healthcheck`]) follow the table, not the
//!   index.
//! - Network programming latency: for slices carrying
//!   `endpoints.kubernetes.io/last-change-trigger-time`, the time from that
//!   trigger to the publish is logged and kept in [`KubeStats`].

use std::borrow::Cow;
use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use futures::stream::{BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Config, Resource as _};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::time::Instant;

use crate::k8s::{Index, Malformed, Watched};
use crate::publish::Publisher;
use crate::table::Policy;

/// Default coalescing interval: at most one table build per this much time.
pub const DEFAULT_COALESCE: Duration = Duration::from_millis(100);

/// Most events applied before a build is considered, so that a flood of
/// buffered events cannot starve publishing.
const MAX_DRAIN: usize = 10_000;

/// How the Kubernetes source connects and what node it runs on.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// `None`: `KUBECONFIG`, `~/.kube/config`, then in-cluster config.
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (`--node-name` / `NODE_NAME`): local traffic
    /// policies and the zone for topology hints. Without it, `Local`
    /// policies select no endpoint.
    pub node_name: Option<String>,
    /// Addresses on which node ports are served. Empty: the InternalIP and
    /// ExternalIP addresses of this node's Node object.
    pub node_addresses: Vec<IpAddr>,
    /// At most one table build per this interval.
    pub coalesce: Duration,
    /// Counters the source updates (share the `Arc` to read them).
    pub stats: Arc<KubeStats>,
    /// The scheduler of Services without a (known) `sluice.io/scheduler`
    /// annotation (`--scheduler`).
    pub scheduler: Policy,
    /// Kept equal to [`Index::node_eligible`] (share the `Arc` to read it):
    /// false while this node's Node is being deleted or carries the
    /// cluster autoscaler's deletion taint.
    pub node_eligible: Arc<AtomicBool>,
}

impl Default for KubeOptions {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            node_name: None,
            node_addresses: Vec::new(),
            coalesce: DEFAULT_COALESCE,
            stats: Arc::default(),
            scheduler: Policy::default(),
            node_eligible: Arc::new(AtomicBool::new(true)),
        }
    }
}

/// What the source did, for metrics and tests. The histograms are
/// registered in the daemon's `/metrics` (as
/// `sluice_table_build_duration_seconds` and
/// `sluice_network_programming_latency_seconds`), the counters through
/// this type's [`Collector`] (read at each scrape, `sluice_kube_*_total`).
#[derive(Debug)]
pub struct KubeStats {
    /// Duration of each incremental index rebuild.
    pub build_duration: Histogram,
    /// For each EndpointSlice change carrying
    /// `endpoints.kubernetes.io/last-change-trigger-time`: from that time to
    /// the publish that made it live.
    pub programming_latency: Histogram,
    /// Table builds (incremental index rebuilds) run.
    pub builds: AtomicU64,
    /// Tables published (builds that changed something, plus the first).
    pub publishes: AtomicU64,
    /// Watch errors seen (each is retried with backoff).
    pub watch_errors: AtomicU64,
    /// Complete lists (initial or relist) applied, all kinds.
    pub relists: AtomicU64,
    /// Objects skipped as malformed.
    pub malformed: AtomicU64,
    /// Non-TCP Service ports skipped.
    pub skipped_ports: AtomicU64,
    /// Bad fields (addresses, ports, endpoints) skipped in objects that are
    /// otherwise used.
    pub skipped_fields: AtomicU64,
    /// Network programming latency of the last publish that carried an
    /// EndpointSlice trigger time, in microseconds (the largest in it).
    pub last_programming_latency_us: AtomicU64,
    /// Largest network programming latency seen, in microseconds.
    pub max_programming_latency_us: AtomicU64,
}

impl Collector for KubeStats {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let counters = [
            (
                "kube_table_builds",
                "Table builds (incremental index rebuilds) from Kubernetes objects",
                &self.builds,
            ),
            (
                "kube_table_publishes",
                "Tables published by the Kubernetes source (builds that changed something, and the first)",
                &self.publishes,
            ),
            (
                "kube_watch_errors",
                "Errors of the Services, EndpointSlices and Node watches (each is retried with backoff)",
                &self.watch_errors,
            ),
            (
                "kube_relists",
                "Complete lists (initial or after a watch restart) applied, all kinds",
                &self.relists,
            ),
            (
                "kube_malformed_objects",
                "Objects skipped as malformed (logged with what was wrong)",
                &self.malformed,
            ),
            (
                "kube_skipped_service_ports",
                "Service ports not served because their protocol is not TCP",
                &self.skipped_ports,
            ),
            (
                "kube_skipped_fields",
                "Bad addresses, ports and endpoints left out of Services and EndpointSlices that are otherwise used (logged with what was wrong)",
                &self.skipped_fields,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value.load(Ordering::Relaxed));
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

impl Default for KubeStats {
    fn default() -> Self {
        KubeStats {
            // 10 µs .. ~5 s
            build_duration: Histogram::new(exponential_buckets(0.000_01, 2.0, 20)),
            // 1 ms .. ~65 s
            programming_latency: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            builds: AtomicU64::new(0),
            publishes: AtomicU64::new(0),
            watch_errors: AtomicU64::new(0),
            relists: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            skipped_ports: AtomicU64::new(0),
            skipped_fields: AtomicU64::new(0),
            last_programming_latency_us: AtomicU64::new(0),
            max_programming_latency_us: AtomicU64::new(0),
        }
    }
}

/// Fatal set-up errors of the Kubernetes source.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("cannot read kubeconfig {path}: {source}")]
    ReadKubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot use kubeconfig {path}: {source}")]
    UseKubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration: no --kubeconfig, no usable KUBECONFIG or ~/.kube/config, and not in a cluster: {0}"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

async fn load_config(opts: &KubeOptions) -> Result<Config, KubeSourceError> {
    match &opts.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeSourceError::ReadKubeconfig {
                    path: path.clone(),
                    source,
                }
            })?;
            Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| KubeSourceError::UseKubeconfig {
                    path: path.clone(),
                    source,
                })
        }
        None => Config::infer().await.map_err(KubeSourceError::Infer),
    }
}

/// Why the apiserver that `opts` leads to would be reached only through a
/// Service that sluice itself serves (see [`super::apiserver`]), or `None`.
/// Loads the configuration as [`run`] will, without connecting.
pub async fn reached_through_service(
    opts: &KubeOptions,
) -> Result<Option<String>, KubeSourceError> {
    let config = load_config(opts).await?;
    let url = &config.cluster_url;
    let default_port = if url.scheme_str() == Some("http") {
        80
    } else {
        443
    };
    Ok(super::apiserver::reached_through_service(
        url.host().unwrap_or_default(),
        url.port_u16().unwrap_or(default_port),
        |name| std::env::var(name).ok(),
    ))
}

/// Runs the Kubernetes source until the process ends. Returns `Err` only
/// for fatal set-up errors (configuration, client).
pub async fn run(opts: KubeOptions, publisher: Arc<Publisher>) -> Result<(), KubeSourceError> {
    let config = load_config(&opts).await?;
    tracing::info!(server = %config.cluster_url, node = ?opts.node_name, "kubernetes source starting");
    let client = Client::try_from(config).map_err(KubeSourceError::Client)?;
    run_with_client(client, opts, publisher).await;
    Ok(())
}

/// An object as listed or watched: decoded, or, when it does not decode
/// as `K`, its metadata and why. Watching this instead of `K` keeps one
/// undecodable object from failing a whole list (kube's typed list would
/// fail and retry forever) and lets it be logged with its namespace/name.
#[derive(Clone, Debug)]
enum Lenient<K> {
    Ok(K),
    Bad {
        meta: Box<ObjectMeta>,
        error: String,
    },
}

impl<'de, K: serde::de::DeserializeOwned> serde::Deserialize<'de> for Lenient<K> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        match K::deserialize(&v) {
            Ok(k) => Ok(Lenient::Ok(k)),
            Err(e) => Ok(Lenient::Bad {
                meta: Box::new(
                    v.get("metadata")
                        .and_then(|m| ObjectMeta::deserialize(m).ok())
                        .unwrap_or_default(),
                ),
                error: e.to_string(),
            }),
        }
    }
}

impl<K: kube::Resource<DynamicType = ()>> kube::Resource for Lenient<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        match self {
            Lenient::Ok(k) => k.meta(),
            Lenient::Bad { meta, .. } => meta,
        }
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Lenient::Ok(k) => k.meta_mut(),
            Lenient::Bad { meta, .. } => meta,
        }
    }
}

/// One watch event of some kind, bound to the generic code that applies it
/// ([`Source::take`]): the streams of every kind merge into one of these.
type Input = Box<dyn FnOnce(&mut Source, &Publisher) + Send>;

/// A watch event once a (re)list is buffered: like kube's reflector store,
/// objects are collected from `Init` to `InitDone` and then replace their
/// kind in the index whole, so objects deleted while the watch was down
/// (which arrive as no `Delete`) disappear.
enum Change<K> {
    /// `Init` or `InitApply`: buffered, nothing to apply yet.
    Buffered,
    Listed(Vec<Lenient<K>>),
    Apply(Lenient<K>),
    Delete(Lenient<K>),
}

fn fold<K>(buffer: &mut Option<Vec<Lenient<K>>>, ev: Event<Lenient<K>>) -> Change<K> {
    match ev {
        Event::Init => {
            *buffer = Some(Vec::new());
            Change::Buffered
        }
        Event::InitApply(o) => match buffer {
            Some(b) => {
                b.push(o);
                Change::Buffered
            }
            // Not expected from the watcher; treat as a plain apply.
            None => Change::Apply(o),
        },
        Event::InitDone => Change::Listed(buffer.take().unwrap_or_default()),
        Event::Apply(o) => Change::Apply(o),
        Event::Delete(o) => Change::Delete(o),
    }
}

/// The watch of every `K` that `config` selects, as inputs. With
/// `.default_backoff()`, errors are retried and the stream never ends.
fn watch<K>(client: &Client, config: watcher::Config) -> BoxStream<'static, Input>
where
    K: Watched + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut buffer = None;
    watcher::watcher(Api::<Lenient<K>>::all(client.clone()), config)
        .default_backoff()
        .map(move |ev| {
            let change = ev.map(|ev| fold(&mut buffer, ev));
            Box::new(move |src: &mut Source, publisher: &Publisher| src.take(change, publisher))
                as Input
        })
        .boxed()
}

fn log_malformed(errors: impl IntoIterator<Item = Malformed>, stats: &KubeStats) {
    for e in errors {
        stats.malformed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(kind = e.kind, object = %e.object, reason = %e.reason, "skipping malformed object");
    }
}

/// The object, or (logged as malformed) the key of one that does not decode.
fn decoded<K: Watched>(item: Lenient<K>, stats: &KubeStats) -> Result<K, Option<K::Key>> {
    match item {
        Lenient::Ok(k) => Ok(k),
        Lenient::Bad { meta, error } => {
            let reason = format!("does not decode: {error}");
            log_malformed([Malformed::new(K::KIND, &meta, reason)], stats);
            Err(K::key(&meta))
        }
    }
}

struct Source {
    index: Index,
    /// Kinds watched, and those listed once: ready when all are.
    kinds: usize,
    listed: HashSet<&'static str>,
    /// The first table (generation 1) was published.
    published: bool,
    stats: Arc<KubeStats>,
}

impl Source {
    fn ready(&self) -> bool {
        self.listed.len() == self.kinds
    }

    /// Applies one event of kind `K`'s watch: the one path of every kind.
    fn take<K: Watched>(
        &mut self,
        change: Result<Change<K>, watcher::Error>,
        publisher: &Publisher,
    ) {
        let stats = &*self.stats;
        let change = match change {
            Ok(change) => change,
            Err(e) => {
                stats.watch_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(kind = K::KIND, error = %e, "watch error; retrying with backoff, last table keeps serving");
                return;
            }
        };
        // Input that may change the table: the health rule (kube-proxy's)
        // watches how long it waits for a publish.
        publisher.mark_pending();
        match change {
            Change::Buffered => {}
            Change::Listed(items) => {
                stats.relists.fetch_add(1, Ordering::Relaxed);
                self.listed.insert(K::KIND);
                tracing::info!(kind = K::KIND, count = items.len(), "objects listed");
                let (mut good, mut keep) = (Vec::new(), Vec::new());
                for item in items {
                    match decoded(item, stats) {
                        Ok(k) => good.push(k),
                        Err(key) => keep.extend(key),
                    }
                }
                log_malformed(self.index.reset(&good, &keep), stats);
            }
            Change::Apply(o) => {
                if let Ok(o) = decoded(o, stats) {
                    log_malformed(self.index.apply(&o).err(), stats);
                }
            }
            Change::Delete(o) => {
                if let Some(key) = K::key(o.meta()) {
                    self.index.delete::<K>(&key);
                }
            }
        }
        let index_stats = self.index.stats();
        (stats.skipped_ports).store(index_stats.skipped_ports, Ordering::Relaxed);
        (stats.skipped_fields).store(index_stats.skipped_fields, Ordering::Relaxed);
    }

    /// Builds, and publishes if the table changed or nothing was published
    /// yet (the first table makes the source ready).
    fn build_and_publish(&mut self, publisher: &Publisher) {
        let first = !self.published;
        self.published = true;
        self.stats.builds.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let changed = self.index.build();
        self.stats
            .build_duration
            .observe(started.elapsed().as_secs_f64());
        let triggers = self.index.take_trigger_times();
        // The table carries its health checks: a change of them alone (a
        // local endpoint count) is a change too.
        if !(changed || first) {
            publisher.settle_unchanged();
            return;
        }
        let table = self.index.table().clone();
        let len = table.len();
        let generation = publisher.publish_changed(table);
        self.stats.publishes.fetch_add(1, Ordering::Relaxed);
        let now_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| i128::try_from(d.as_nanos()).ok());
        if let Some(now) = now_ns {
            for &t in &triggers {
                self.stats
                    .programming_latency
                    .observe((now - t).max(0) as f64 / 1e9);
            }
        }
        let latency = triggers.iter().max().and_then(|&newest| {
            let now = now_ns?;
            // The oldest trigger in the batch waited the longest.
            let oldest = triggers.iter().min().copied().unwrap_or(newest);
            u64::try_from((now - oldest).max(0) / 1_000).ok()
        });
        if let Some(us) = latency {
            self.stats
                .last_programming_latency_us
                .store(us, Ordering::Relaxed);
            self.stats
                .max_programming_latency_us
                .fetch_max(us, Ordering::Relaxed);
        }
        if first {
            tracing::info!(
                generation,
                entries = len,
                services = self.index.service_count(),
                "first complete table published: ready"
            );
        } else {
            tracing::debug!(generation, entries = len, programming_latency_us = ?latency, "table published");
        }
    }
}

/// Runs the source on an existing client (what [`run`] does after loading
/// the configuration). Runs until the process ends.
pub async fn run_with_client(client: Client, opts: KubeOptions, publisher: Arc<Publisher>) {
    if opts.node_name.is_none() {
        tracing::warn!(
            "no node name (--node-name or NODE_NAME): Services with a Local traffic policy get no endpoint and topology hints are not used"
        );
    }
    let mut streams = vec![
        watch::<Service>(&client, watcher::Config::default()),
        watch::<EndpointSlice>(&client, watcher::Config::default()),
    ];
    if let Some(name) = &opts.node_name {
        let by_name = watcher::Config::default().fields(&format!("metadata.name={name}"));
        streams.push(watch::<Node>(&client, by_name));
    }
    let mut src = Source {
        index: Index::new(opts.node_name.clone(), opts.node_addresses.clone())
            .with_default_policy(opts.scheduler),
        kinds: streams.len(),
        listed: HashSet::new(),
        published: false,
        stats: opts.stats.clone(),
    };
    let mut events = futures::stream::select_all(streams);
    let mut last_build: Option<Instant> = None;
    loop {
        let due = last_build.map(|t| t + opts.coalesce);
        let waiting = src.published && src.index.is_dirty();
        let next = tokio::select! {
            ev = events.next() => Some(ev),
            () = sleep_until_opt(due), if waiting => None,
        };
        match next {
            Some(Some(input)) => {
                input(&mut src, &publisher);
                // Apply whatever else is already buffered before deciding.
                for _ in 0..MAX_DRAIN {
                    match events.next().now_or_never() {
                        Some(Some(input)) => input(&mut src, &publisher),
                        _ => break,
                    }
                }
                if src.published && !src.index.is_dirty() {
                    // The input changed nothing the table depends on.
                    publisher.settle_unchanged();
                }
                let eligible = src.index.node_eligible();
                if opts.node_eligible.swap(eligible, Ordering::Relaxed) != eligible {
                    tracing::info!(
                        eligible,
                        "node eligibility for load-balancer traffic changed (/healthz nodeEligible)"
                    );
                }
            }
            Some(None) => {
                // The watchers never end by themselves; be safe anyway.
                tracing::error!("kubernetes watch streams ended");
                return;
            }
            None => {}
        }
        if !src.ready() {
            continue;
        }
        let now = Instant::now();
        if !src.published || (src.index.is_dirty() && due.is_none_or(|d| now >= d)) {
            src.build_and_publish(&publisher);
            last_build = Some(now);
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_exported_at_each_scrape() {
        let stats = Arc::new(KubeStats::default());
        let mut registry = prometheus_client::registry::Registry::with_prefix("sluice");
        registry.register_collector(Box::new(stats.clone()));
        stats.relists.fetch_add(3, Ordering::Relaxed);
        stats.malformed.fetch_add(1, Ordering::Relaxed);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("sluice_kube_relists_total 3\n"), "{text}");
        assert!(
            text.contains("sluice_kube_malformed_objects_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("sluice_kube_watch_errors_total 0\n"),
            "{text}"
        );
        assert!(
            text.contains("sluice_kube_skipped_fields_total 0\n"),
            "{text}"
        );
        // Read at scrape time, not at registration.
        stats.relists.fetch_add(1, Ordering::Relaxed);
        text.clear();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("sluice_kube_relists_total 4\n"), "{text}");
    }
}

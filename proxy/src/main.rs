//! The `sluice` daemon: parse flags, load the first table, serve until a
//! signal, drain, exit.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use sluice_control::Publisher;
use sluice_control::source::healthcheck::HealthResponders;
use sluice_control::source::{file, kube};
use sluice_proxy::Proxy;
use sluice_proxy::admin::{self, Admin, Endpoints};
use sluice_proxy::cli::{Args, BindAddress, EXIT_USAGE, Intercept, LogFormat};
use sluice_proxy::metrics::Metrics;
use sluice_proxy::nft;
use sluice_proxy::reconcile::{self, Follower, HealthFollower, NftFollower, VipFollower};
use sluice_proxy::vip::VipDevice;
use sluice_proxy::workers::Workers;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let mut args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return if usage {
                ExitCode::from(EXIT_USAGE as u8)
            } else {
                ExitCode::SUCCESS // --help, --version
            };
        }
    };
    init_logs(args.log_format);
    if args.cleanup {
        return cleanup(&args);
    }
    if let Err(e) = args.validate() {
        eprintln!("sluice: {e}");
        return ExitCode::from(EXIT_USAGE as u8);
    }
    if args.intercept() == Intercept::Nftables && args.vip_interface.is_some() {
        eprintln!(
            "sluice: --vip-interface has no use with --intercept nftables, the default with the \
             Kubernetes source (no Service IP is put on any device); add --intercept bind to \
             put Service IPs on a device"
        );
        return ExitCode::from(EXIT_USAGE as u8);
    }
    raise_fd_limit();
    let workers = args.worker_count();
    // With data-plane workers the main runtime only runs the control plane
    // (sources, table builds, reconciler, admin endpoints): two threads,
    // so a long table build never stalls the admin endpoints. Without, it
    // carries the connections too: one thread per CPU.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        builder.worker_threads(2);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let workers = match Workers::start(workers) {
        Ok(w) => w,
        Err(e) => {
            error!(error = %e, "cannot start the data-plane workers");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(args, workers.handles()));
    // The proxy has stopped: its connections are gone, the workers are idle.
    drop(workers);
    code
}

/// `sluice --cleanup`: removes sluice's nftables tables and the
/// transparent-dial routing, and exits.
fn cleanup(args: &Args) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let routing = runtime.block_on(sluice_proxy::policy_route::remove_all(args.policy_route()));
    match runtime.block_on(nft::apply(&nft::cleanup_script())) {
        Ok(()) if !routing => ExitCode::FAILURE,
        Ok(()) => {
            info!(table = nft::TABLE, "removed sluice's nftables table");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluice: --cleanup: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where node ports are served: `--node-addresses`, or the interface
/// addresses `--nodeport-addresses` CIDRs select (none: an error, else no
/// node port would be served), or empty for the Node's addresses.
async fn nodeport_addresses(args: &Args) -> Result<Vec<std::net::IpAddr>, String> {
    if args.nodeport_addresses.is_empty() {
        return Ok(args.node_addresses.clone());
    }
    let local = nft::local_addresses().await.map_err(|e| e.to_string())?;
    match sluice_control::cidr::nodeport_addresses(&args.nodeport_addresses, &local)? {
        None => Ok(Vec::new()),
        Some(chosen) if chosen.is_empty() => Err(format!(
            "no interface address of this node is inside the CIDRs (addresses: {local:?})"
        )),
        Some(chosen) => {
            info!(addresses = ?chosen, "node ports served on --nodeport-addresses");
            Ok(chosen)
        }
    }
}

fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Each proxied connection holds two descriptors: lift the soft limit to
/// the hard one.
fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "file descriptor limit"),
        Err(e) => warn!(error = %e, "cannot raise the file descriptor limit"),
    }
}

async fn run(args: Args, workers: Vec<tokio::runtime::Handle>) -> ExitCode {
    let publisher = Arc::new(Publisher::new());
    let mut metrics = Metrics::new();
    let reload = Arc::new(Notify::new());
    let mut warnings = Vec::new();
    // The proxy's own health, started now: /healthz's rule and the
    // healthCheckNodePort answers.
    let health = admin::ProxyHealth {
        publisher: publisher.clone(),
        timeout: args.healthz_timeout,
        started: std::time::Instant::now(),
    };
    let node_eligible = Arc::new(std::sync::atomic::AtomicBool::new(true));
    if let Some(config) = &args.config {
        let first = match file::load(config) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("sluice: {e}");
                return ExitCode::from(EXIT_USAGE as u8);
            }
        };
        publisher.publish(first);
        tokio::spawn(file::watch(
            config.clone(),
            args.config_poll_interval,
            publisher.clone(),
            reload.clone(),
        ));
    } else {
        let node_addresses = match nodeport_addresses(&args).await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("sluice: --nodeport-addresses: {e}");
                return ExitCode::from(EXIT_USAGE as u8);
            }
        };
        let opts = kube::KubeOptions {
            kubeconfig: args.kubeconfig.clone(),
            node_name: args.node_name.clone(),
            node_addresses,
            coalesce: args.min_sync_period,
            scheduler: args.scheduler,
            node_eligible: node_eligible.clone(),
            ..kube::KubeOptions::default()
        };
        match kube::reached_through_service(&opts).await {
            Ok(None) => {}
            Ok(Some(why)) if args.require_direct_apiserver => {
                eprintln!("sluice: refusing to start (--require-direct-apiserver): {why}");
                return ExitCode::from(EXIT_USAGE as u8);
            }
            Ok(Some(why)) => {
                warn!("{why}");
                warnings.push(why);
            }
            Err(e) => {
                eprintln!("sluice: {e}");
                return ExitCode::from(EXIT_USAGE as u8);
            }
        }
        let stats = Arc::new(kube::KubeStats::default());
        let registry = metrics.registry_mut();
        registry.register(
            "table_build_duration_seconds",
            "Duration of each table build from Kubernetes objects",
            stats.build_duration.clone(),
        );
        registry.register(
            "network_programming_latency_seconds",
            "From an EndpointSlice's last-change-trigger-time to the table that carries it going live",
            stats.programming_latency.clone(),
        );
        registry.register_collector(Box::new(stats.clone()));
        // kube-proxy's names for the same histograms and its last-sync
        // gauge, for the dashboards and alerts operators already have.
        let compat = metrics.unprefixed_registry_mut();
        compat.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "sluice: duration of each table build from Kubernetes objects (kube-proxy: SyncProxyRules latency)",
            stats.build_duration.clone(),
        );
        compat.register(
            "kubeproxy_network_programming_duration_seconds",
            "From an EndpointSlice's last-change-trigger-time to the table that carries it going live (kube-proxy: in-cluster network programming latency)",
            stats.programming_latency.clone(),
        );
        compat.register_collector(Box::new(sluice_proxy::compat_metrics::LastSync(
            publisher.clone(),
        )));
        let opts = kube::KubeOptions { stats, ..opts };
        let publisher = publisher.clone();
        tokio::spawn(async move {
            // Returns only on a fatal set-up error (bad kubeconfig): nothing
            // is served yet, so exit as for a bad flag.
            if let Err(e) = kube::run(opts, publisher).await {
                eprintln!("sluice: {e}");
                std::process::exit(EXIT_USAGE);
            }
        });
    }

    // Cancelled by SIGTERM/SIGINT: the proxy stops accepting and drains;
    // the Service IPs and the nftables table stop following the table and
    // stay as they are, for the sluice that takes over.
    let stop = CancellationToken::new();

    // The Kubernetes source owns the node's Service IPs: on `sluice0` (a
    // dummy device, created if missing) unless --vip-interface names another.
    // The file source touches addresses only when asked to. With
    // --intercept nftables no Service IP is put on any device.
    let bind_mode = args.intercept() == Intercept::Bind;
    // What follows the table (Service IPs, the proxy's listeners, routes
    // and tracker, the nftables table, the pod bridges' reply steering):
    // one reconcile loop, one TableDiff per publish.
    let mut followers: Vec<Box<dyn Follower>> = Vec::new();
    // The UDP intercept ports' serving tasks, waited for at exit (their
    // flows drain while the next sluice takes the ports).
    let mut udp_tasks = None;
    if args.config.is_none() {
        // healthCheckNodePort responders (kube-proxy: on all addresses),
        // fed from the table like the rest; 200 only while the proxy is
        // healthy by /healthz's rule (kube-proxy's serviceProxyHealthy).
        followers.push(Box::new(HealthFollower::new(HealthResponders::new(
            std::net::Ipv4Addr::UNSPECIFIED.into(),
            health.check(),
        ))));
    }
    if bind_mode && (args.vip_interface.is_some() || args.config.is_none()) {
        match VipDevice::open(args.vip_interface.as_deref()).await {
            Ok(device) => followers.push(Box::new(VipFollower::new(device))),
            Err(e) => {
                eprintln!("sluice: {e}");
                return ExitCode::from(EXIT_USAGE as u8);
            }
        }
    }

    // Hand-over of queued connections between an old and a new sluice: a
    // log line (warn in Kubernetes mode), not a /healthz warning: the node
    // serves as well without it, only an upgrade loses more.
    match sluice_proxy::listener::check_migrate_req() {
        Ok(()) => {}
        Err(why) if args.config.is_none() => warn!("{why}"),
        Err(why) => info!("{why}"),
    }

    // A node: report what kube-proxy left on it (a half-migrated node).
    if args.config.is_none() || args.intercept() == Intercept::Nftables {
        warnings.extend(sluice_proxy::leftovers::check_at_start(metrics.registry_mut()).await);
    }

    if let Err(e) = watch_signals(stop.clone(), reload) {
        error!(error = %e, "cannot install signal handlers");
        return ExitCode::FAILURE;
    }
    let metrics = Arc::new(metrics);
    info!(workers = workers.len(), "data plane");
    // Transparent dials (--source-ip): on once the node's routing is in
    // place, else every dial from the node's address, told on /healthz.
    let config = args.proxy_config();
    let source_ip = config.source_ip.clone();
    let (transparent, why) = match source_ip_setup(&args, &source_ip).await {
        Ok(on) => on,
        Err(code) => return code,
    };
    warnings.extend(why);
    let proxy = Proxy::with_workers(config, publisher.clone(), metrics.clone(), workers);
    // After the Service IPs (a listener binds on them), before the
    // nftables table: listeners, routes, the tracker.
    followers.push(Box::new(proxy.follower()));
    if args.intercept() == Intercept::Nftables {
        if let Err(e) = nft::check().await {
            eprintln!("sluice: --intercept nftables: {e}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
        // Listen first, then steer: a redirected connection never meets a
        // closed port because of us. When another sluice already listens
        // there (an upgrade), join its SO_REUSEPORT group at once too, even
        // before the first table: the connections that land here wait for
        // it (at most 10 s), whereas a sluice that joined only later would
        // leave the port closed if the old one went first. Under
        // hostNetwork the old one may answer the new pod's readiness probe
        // (both listen on the health port), so the new pod can be taken
        // for ready, and the old one terminated, before its first table.
        if sluice_proxy::listener::port_listened(args.intercept_port) {
            info!(
                port = args.intercept_port,
                "another process listens on the intercept port (a sluice being replaced?): \
                 sharing it"
            );
        }
        if let Err(e) = proxy.start_intercept() {
            eprintln!("sluice: {e}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
        // UDP Services: a local port each (the one the nftables map already
        // has, after a restart or during a hand-over), bound and served
        // before the nftables table steers to it: the UDP follower runs
        // before reconcile::NftFollower.
        let udp = sluice_proxy::udp_intercept::UdpIntercept::new(
            sluice_proxy::udp::UdpProxy::new(
                args.udp_config(),
                publisher.clone(),
                proxy.tracker().clone(),
                metrics.clone(),
            ),
            args.udp_intercept_ports,
            stop.clone(),
        );
        let udp_steering = udp.steering();
        udp_tasks = Some(udp.tasks());
        followers.push(Box::new(udp));
        if transparent {
            followers.push(Box::new(sluice_proxy::policy_route::BridgeFollower::start(
                args.transparent_mark,
                source_ip.clone(),
                stop.clone(),
            )));
        }
        followers.push(Box::new(NftFollower::new(
            args.intercept_port,
            transparent.then_some(args.transparent_mark),
            udp_steering,
            metrics.clone(),
        )));
    }
    // Bind mode: UDP Services are served by sockets bound on their
    // addresses (with --intercept nftables: reconcile::NftFollower's local
    // ports), after the Service IPs are on their device.
    if bind_mode {
        let udp = sluice_proxy::udp::UdpProxy::new(
            args.udp_config(),
            publisher.clone(),
            proxy.tracker().clone(),
            metrics.clone(),
        );
        followers.push(Box::new(udp.follower()));
    }
    tokio::spawn(reconcile::run(publisher.clone(), followers, stop.clone()));
    let admin = Arc::new(Admin {
        publisher,
        tracker: proxy.tracker().clone(),
        metrics,
        health,
        warnings,
        node_eligible,
    });
    for (addr, endpoints) in [
        (args.healthz_bind_address, Endpoints::Health),
        (args.metrics_bind_address, Endpoints::Metrics),
    ] {
        if let BindAddress(Some(addr)) = addr {
            // The health listener closes with the data plane's at SIGTERM,
            // so that during an upgrade every probe reaches the new sluice
            // listening beside this one; /metrics stays up while draining.
            let until = match endpoints {
                Endpoints::Health => stop.clone(),
                Endpoints::Metrics => CancellationToken::new(),
            };
            let admin = admin.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = serve_admin(addr, admin, endpoints) => {}
                    () = until.cancelled() => {}
                }
            });
        }
    }
    let report = proxy.run(stop).await;
    if let Some(tasks) = udp_tasks {
        tasks.close();
        tasks.wait().await;
    }
    if report.cut > 0 {
        warn!(cut = report.cut, "exiting with connections cut");
    }
    if transparent {
        sluice_proxy::policy_route::remove_at_exit(args.policy_route(), args.intercept_port).await;
    }
    ExitCode::SUCCESS
}

/// `--source-ip`: `Ok((true, warnings))` when transparent dials are on,
/// `Ok((false, [reason]))` when asked for but unavailable (logged once, on
/// /healthz), `Ok((false, []))` with `node`; `Err` for a bad flag.
async fn source_ip_setup(
    args: &Args,
    source_ip: &sluice_proxy::source_ip::SourceIp,
) -> Result<(bool, Vec<String>), ExitCode> {
    use sluice_proxy::cli::SourceIpMode;
    if args.source_ip_mode() == SourceIpMode::Node {
        info!("--source-ip=node: backends see the node's address");
        return Ok((false, Vec::new()));
    }
    let fallback = |why: String| {
        let why = format!(
            "transparent dials unavailable, backends see the node's address instead of the client's (as with --source-ip=node): {why}"
        );
        warn!("{why}");
        Ok((false, vec![why]))
    };
    if args.intercept() != Intercept::Nftables {
        return fallback("--source-ip=transparent needs --intercept nftables".into());
    }
    match sluice_proxy::policy_route::enable_transparent(args.policy_route(), source_ip).await {
        Ok(warning) => {
            info!(
                mark = format_args!("{:#x}", args.transparent_mark),
                table = args.transparent_route_table,
                detect_local_mode = ?source_ip.detect(),
                "transparent dials on: backends see the client's address where kube-proxy keeps it"
            );
            if let Some(w) = &warning {
                warn!("{w}");
            }
            Ok((true, warning.into_iter().collect()))
        }
        Err(why) => fallback(why),
    }
}

/// SIGTERM/SIGINT stop the proxy; SIGHUP reloads the config at once.
fn watch_signals(stop: CancellationToken, reload: Arc<Notify>) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
                _ = int.recv() => { info!("SIGINT: shutting down"); break; }
                _ = hup.recv() => { info!("SIGHUP: reloading"); reload.notify_one(); }
            }
        }
        stop.cancel();
    });
    Ok(())
}

/// Binds and serves one admin listener. A bind failure (say, the port is
/// still held by the kube-proxy being replaced) is logged and retried: the
/// proxy keeps serving meanwhile.
async fn serve_admin(addr: SocketAddr, admin: Arc<Admin>, endpoints: Endpoints) {
    let mut logged = false;
    loop {
        match admin::bind(addr).await {
            Ok(listener) => {
                info!(address = %addr, ?endpoints, "admin endpoints listening");
                return admin::serve(listener, admin, endpoints).await;
            }
            Err(e) => {
                if !logged {
                    error!(address = %addr, ?endpoints, error = %e, "cannot bind admin endpoints; retrying every 5s");
                    logged = true;
                }
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        }
    }
}

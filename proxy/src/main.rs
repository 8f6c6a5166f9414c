//! The `sluice` daemon: parse flags, load the first table, serve until a
//! signal, drain, exit.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use sluice_control::Publisher;
use sluice_control::source::file;
use sluice_proxy::Proxy;
use sluice_proxy::cli::{Args, EXIT_USAGE, LogFormat};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
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
    raise_fd_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
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

async fn run(args: Args) -> ExitCode {
    let publisher = Arc::new(Publisher::new());
    let first = match file::load(&args.config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("sluice: {e}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    publisher.publish(first);

    let reload = Arc::new(Notify::new());
    tokio::spawn(file::watch(
        args.config.clone(),
        args.config_poll_interval,
        publisher.clone(),
        reload.clone(),
    ));

    let stop = CancellationToken::new();
    if let Err(e) = watch_signals(stop.clone(), reload) {
        error!(error = %e, "cannot install signal handlers");
        return ExitCode::FAILURE;
    }
    let proxy = Proxy::new(args.proxy_config(), publisher);
    let report = proxy.run(stop).await;
    if report.cut > 0 {
        warn!(cut = report.cut, "exiting with connections cut");
    }
    ExitCode::SUCCESS
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

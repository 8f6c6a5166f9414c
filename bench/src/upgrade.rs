//! `sluice-bench upgrade` (root, `ip`, `nft`, `sysctl`): sluice replaced
//! under load on a mini node, the scenario of issue 14
//! ([`sluice_testkit::upgrade`], also run by `proxy/tests/upgrade.rs`).
//!
//! A pod reaches a ClusterIP through sluice's nftables table; a storm of
//! short connections plus long-lived streams carrying data both ways (every
//! byte checked) runs while the serving sluice is replaced: by default a
//! hand-over (a second sluice starts beside it, the first gets SIGTERM),
//! with `--kill` a crash (SIGKILL, the next one started right after),
//! with `--compare` both. Exits 1 when a hand-over lost a short connection
//! or broke a stream.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use sluice_control::source::file::{BackendDoc, ConfigDoc, ServiceDoc};
use sluice_testkit::upgrade::{self, Replace, Report, Scenario};

#[derive(Debug, clap::Args)]
pub struct UpgradeArgs {
    /// A crash instead of the hand-over: SIGKILL, then the next sluice.
    #[arg(long)]
    pub kill: bool,
    /// Both: the hand-over, then the crash.
    #[arg(long, conflicts_with = "kill")]
    pub compare: bool,
    /// Long-lived streams.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub streams: u16,
    /// Short-connection clients, each back to back.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub clients: u16,
    /// Leave net.ipv4.tcp_migrate_req at 0 in the node, to see what it
    /// saves.
    #[arg(long)]
    pub no_migrate_req: bool,
    /// The sluice binary (default: beside this executable, built first
    /// under cargo).
    #[arg(long, value_name = "PATH")]
    pub sluice: Option<PathBuf>,
    /// One JSON object per run on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

fn config(backends: &[SocketAddr]) -> Result<String, String> {
    let backends = backends.iter().map(|a| BackendDoc::ready(*a)).collect();
    let vip = upgrade::VIP.parse().map_err(|e| format!("{e}"))?;
    let doc: ConfigDoc = ServiceDoc::new(upgrade::SERVICE, vip, backends).into();
    doc.to_yaml().map_err(|e| e.to_string())
}

pub async fn run(args: UpgradeArgs) -> Result<ExitCode> {
    use std::os::unix::fs::MetadataExt as _;
    anyhow::ensure!(
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0),
        "upgrade needs root (network namespaces, nftables)"
    );
    let sluice = crate::sluice::locate(args.sluice.as_deref())?;
    let replaces = match (args.compare, args.kill) {
        (true, _) => vec![Replace::HandOver, Replace::Kill],
        (false, true) => vec![Replace::Kill],
        (false, false) => vec![Replace::HandOver],
    };
    let mut failed = false;
    for replace in replaces {
        let scenario = Scenario {
            sluice: sluice.clone(),
            replace,
            streams: usize::from(args.streams),
            clients: u64::from(args.clients),
            migrate_req: !args.no_migrate_req,
            tag: "bench".into(),
            config,
        };
        let report = tokio::task::spawn_blocking(move || upgrade::run(&scenario))
            .await
            .context("the run panicked")??;
        if replace == Replace::HandOver
            && (!report.short_failed.is_empty() || report.broken_streams() > 0)
        {
            failed = true;
        }
        if args.json {
            let v = serde_json::json!({"replace": replace, "report": report});
            outln!("{v}");
        } else {
            print_text(replace, &report, usize::from(args.streams));
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_text(replace: Replace, r: &Report, streams: usize) {
    let what = match replace {
        Replace::HandOver => "hand-over (B beside A, SIGTERM to A)",
        Replace::Kill => "crash (SIGKILL to A, then B)",
    };
    outln!("{what}:");
    outln!(
        "  A replaced at {:.3} s, B ready at {:.3} s",
        r.replaced_at,
        r.new_ready_at
    );
    outln!(
        "  short connections: {} ok, {} failed",
        r.short_ok,
        r.short_failed.len()
    );
    if let Some((first, last)) = r.failure_window() {
        outln!(
            "  failures from {first:.3} s to {last:.3} s ({:.0} ms): {:?}",
            (last - first) * 1000.0,
            r.failures_by_kind()
        );
    }
    outln!(
        "  long-lived streams: {} of {streams} ended cleanly, every byte checked",
        streams - r.broken_streams()
    );
    if replace == Replace::HandOver {
        outln!(
            "  A drained its streams: {}, exit code {:?}, cut connections: {}",
            r.old_drained,
            r.old_exit_code,
            r.old_cut
        );
    }
    outln!(
        "  B accepted {} connections; nftables table kept: {}",
        r.new_accepted,
        r.table_kept
    );
}

//! TEMPORARY stand-in for the YAML file source (replaced by the real one).
#![allow(missing_docs)]
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::{Affinity, Backend, Conditions, ListenKey, Policy, Publisher, Service, Table};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

#[derive(Deserialize)]
struct Raw {
    services: Vec<RawService>,
}
#[derive(Deserialize)]
struct RawService {
    name: String,
    listen: SocketAddr,
    #[serde(default)]
    policy: Option<String>,
    #[serde(default)]
    affinity: Option<RawAff>,
    backends: Vec<RawBackend>,
}
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawAff {
    timeout_seconds: Option<u64>,
}
#[derive(Deserialize)]
struct RawBackend {
    address: SocketAddr,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    weight: Option<u32>,
}

pub fn parse(path: &Path, text: &str) -> Result<Table, ConfigError> {
    let raw: Raw =
        serde_yaml::from_str(text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
    let mut t = Table::new();
    for s in raw.services {
        let policy = match s.policy.as_deref() {
            Some("least-connections") => Policy::LeastConnections,
            _ => Policy::RoundRobin,
        };
        let affinity = s.affinity.map(|a| Affinity {
            timeout: a
                .timeout_seconds
                .map(Duration::from_secs)
                .unwrap_or(Affinity::DEFAULT_TIMEOUT),
        });
        let backends = s
            .backends
            .into_iter()
            .map(|b| {
                let ready = b.ready.unwrap_or(true);
                let mut be = Backend::new(
                    b.address,
                    Conditions {
                        ready,
                        serving: b.serving.unwrap_or(ready),
                        terminating: b.terminating.unwrap_or(false),
                    },
                );
                be.weight = b.weight.unwrap_or(1);
                be
            })
            .collect();
        t.insert(
            ListenKey::tcp(s.listen),
            Arc::new(Service::new(s.name, policy, affinity, backends)),
        );
    }
    Ok(t)
}

pub fn load(path: &Path) -> Result<Table, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
    parse(path, &text)
}

pub async fn watch(
    path: PathBuf,
    poll: Duration,
    publisher: Arc<Publisher>,
    reload: Arc<tokio::sync::Notify>,
) {
    let mut last = std::fs::read(&path).ok();
    loop {
        tokio::select! { _ = tokio::time::sleep(poll) => {}, _ = reload.notified() => {} }
        let now = std::fs::read(&path).ok();
        if now == last {
            continue;
        }
        last = now;
        match load(&path) {
            Ok(t) => {
                publisher.publish(t);
            }
            Err(e) => tracing::error!("{e}"),
        }
    }
}

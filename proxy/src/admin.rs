//! Admin HTTP endpoints (hyper): health, metrics, the live table.
//!
//! Two listeners, as kube-proxy has them:
//! - the health address (`--healthz-bind-address`, default `0.0.0.0:10256`):
//!   `/healthz` and `/livez` answer 200 while the live table reflects the
//!   sources' input, that is, no input has waited longer than the health
//!   timeout for a publish (kube-proxy's rule), and 503 otherwise or before
//!   the first table; the body is `{"lastUpdated": …, "currentTime": …,
//!   "warnings": […]}`, the warnings being set-up problems to fix.
//!   `/readyz` answers 200 once the first complete table is live.
//! - the metrics address (`--metrics-bind-address`, default
//!   `127.0.0.1:10249`): `/metrics` (Prometheus text) and `/debug/table`
//!   (the live table as JSON, with active connections per backend).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sluice_control::Publisher;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::tracker::Tracker;

/// What the endpoints read.
pub struct Admin {
    pub publisher: Arc<Publisher>,
    pub tracker: Arc<Tracker>,
    pub metrics: Arc<Metrics>,
    /// Input waiting longer than this for a publish makes `/healthz` 503.
    pub health_timeout: Duration,
    /// Set-up problems that do not stop sluice but that an operator must
    /// fix (say, an apiserver reached only through a Service sluice serves),
    /// listed in `/healthz`'s body.
    pub warnings: Vec<String>,
}

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoints {
    Health,
    Metrics,
}

/// Serves `endpoints` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, endpoints: Endpoints) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.route(&req, endpoints)) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "admin connection ended");
            }
        });
    }
}

/// Binds an admin listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl Admin {
    fn route(&self, req: &Request<Incoming>, endpoints: Endpoints) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            );
        }
        match (endpoints, req.uri().path()) {
            (Endpoints::Health, "/healthz" | "/livez") => self.healthz(),
            (Endpoints::Health, "/readyz") => self.readyz(),
            (Endpoints::Metrics, "/metrics") => respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.render(),
            ),
            (Endpoints::Metrics, "/debug/table") => respond(
                StatusCode::OK,
                "application/json",
                self.table_json().to_string(),
            ),
            _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }

    /// Healthy when a first table is live and no source input has waited
    /// longer than the health timeout.
    pub fn is_healthy(&self, now: Instant) -> bool {
        let snap = self.publisher.snapshot();
        let waiting_too_long = self
            .publisher
            .pending_since()
            .is_some_and(|t| now.saturating_duration_since(t) > self.health_timeout);
        snap.generation > 0 && !waiting_too_long
    }

    fn healthz(&self) -> Response<Full<Bytes>> {
        let snap = self.publisher.snapshot();
        let status = if self.is_healthy(Instant::now()) {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = json!({
            "lastUpdated": rfc3339(snap.published_wall),
            "currentTime": rfc3339(SystemTime::now()),
            "warnings": self.warnings,
        });
        respond(status, "application/json", body.to_string())
    }

    fn readyz(&self) -> Response<Full<Bytes>> {
        if self.publisher.snapshot().generation > 0 {
            respond(StatusCode::OK, "text/plain", "ok\n".into())
        } else {
            respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "no table yet\n".into(),
            )
        }
    }

    /// The live table with each backend's runtime state.
    pub fn table_json(&self) -> Value {
        let snap = self.publisher.snapshot();
        let now = Instant::now();
        let services: Vec<Value> = snap
            .table
            .iter()
            .map(|(key, svc)| {
                let backends: Vec<Value> = svc
                    .backends()
                    .iter()
                    .map(|b| {
                        let c = b.conditions;
                        json!({
                            "address": b.addr.to_string(),
                            "state": c.label(),
                            "ready": c.ready,
                            "serving": c.serving,
                            "terminating": c.terminating,
                            "weight": b.weight,
                            "eligible": svc.is_eligible(b.addr),
                            "active": self.tracker.active(b.addr),
                            "ejected": self.tracker.is_ejected(b.addr, now),
                        })
                    })
                    .collect();
                json!({
                    "listen": key.addr.to_string(),
                    "protocol": key.protocol.to_string(),
                    "name": svc.name,
                    "policy": svc.policy.to_string(),
                    "affinityTimeoutSeconds": svc.affinity.map(|a| a.timeout.as_secs()),
                    "backends": backends,
                })
            })
            .collect();
        json!({
            "generation": snap.generation,
            "services": services,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::TrackerConfig;
    use http_body_util::BodyExt;
    use sluice_control::Table;
    use tokio_util::sync::CancellationToken;

    fn mk_admin(timeout: Duration) -> Admin {
        let metrics = Arc::new(Metrics::new());
        let cfg = TrackerConfig {
            eject_base: Duration::from_secs(1),
            eject_max: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(1),
        };
        Admin {
            publisher: Arc::new(Publisher::new()),
            tracker: Arc::new(Tracker::new(cfg, CancellationToken::new(), metrics.clone())),
            metrics,
            health_timeout: timeout,
            warnings: vec!["fix me".into()],
        }
    }

    #[test]
    fn unhealthy_before_the_first_table_and_when_input_waits_too_long() {
        let a = mk_admin(Duration::from_secs(60));
        let now = Instant::now();
        assert!(!a.is_healthy(now), "no table yet");
        a.publisher.publish(Table::new());
        assert!(a.is_healthy(now));
        a.publisher.mark_pending();
        assert!(a.is_healthy(Instant::now() + Duration::from_secs(59)));
        assert!(!a.is_healthy(Instant::now() + Duration::from_secs(61)));
        a.publisher.publish(Table::new());
        assert!(a.is_healthy(Instant::now() + Duration::from_secs(61)));
    }

    #[tokio::test]
    async fn healthz_lists_the_warnings() {
        let a = mk_admin(Duration::from_secs(60));
        a.publisher.publish(Table::new());
        let body = a.healthz().into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["warnings"], json!(["fix me"]), "{v}");
        assert!(v["lastUpdated"].is_string(), "{v}");
    }
}

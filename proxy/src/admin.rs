//! Admin HTTP endpoints (hyper): health, metrics, the live table.
//!
//! Two listeners, as kube-proxy has them:
//! - the health address (`--healthz-bind-address`, default `0.0.0.0:10256`):
//!   `/healthz` and `/livez` answer 200 while the live table reflects the
//!   sources' input, that is, no input has waited longer than the health
//!   timeout for a publish (kube-proxy's rule), and 503 otherwise or before
//!   the first table; the body is `{"lastUpdated": …, "currentTime": …,
//!   "warnings": […], "saturated": …}`, the warnings being set-up problems
//!   to fix. `/healthz` is also 503 while sluice has been running out of
//!   local resources (descriptors, buffers, ports) for [`SATURATED_AFTER`]
//!   (`saturated` says what), so that load balancers stop sending to the
//!   node; `/livez` ignores that, so the kubelet never restarts a process
//!   that is only full.
//!   `/readyz` answers 200 once the first complete table is live.
//! - the metrics address (`--metrics-bind-address`, default
//!   `127.0.0.1:10249`): `/metrics` (Prometheus text), `/debug/table`
//!   (the live table as JSON, with active connections per backend) and
//!   `/debug/generation` (the generation the data plane has applied, as
//!   one number: cheap enough to poll every few milliseconds).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// How long local resource errors must go on before `/healthz` turns 503.
pub const SATURATED_AFTER: Duration = Duration::from_secs(30);

/// The proxy's own health (kube-proxy's `serviceProxyHealthy`): no source
/// input has waited longer than the health timeout for a publish, counting
/// the start as input. The one definition behind [`Admin::is_healthy`]
/// (`/healthz`, `/livez`) and the `healthCheckNodePort` answers.
#[derive(Clone)]
pub struct ProxyHealth {
    pub publisher: Arc<Publisher>,
    /// Input waiting longer than this for a publish makes it unhealthy.
    pub timeout: Duration,
    /// When the process started: before its first table, sluice reports
    /// healthy for one health timeout (as kube-proxy does while starting).
    pub started: Instant,
}

impl ProxyHealth {
    /// Healthy at `now` (while starting, healthy until the first table is
    /// one timeout late: kube-proxy's rule).
    pub fn is_healthy(&self, now: Instant) -> bool {
        self.publisher.is_healthy(now, self.timeout, self.started)
    }

    /// [`ProxyHealth::is_healthy`] now, as the `healthCheckNodePort`
    /// responders take it.
    pub fn check(&self) -> Arc<dyn Fn() -> bool + Send + Sync> {
        let health = self.clone();
        Arc::new(move || health.is_healthy(Instant::now()))
    }
}

/// What the endpoints read.
pub struct Admin {
    pub publisher: Arc<Publisher>,
    pub tracker: Arc<Tracker>,
    pub metrics: Arc<Metrics>,
    /// The proxy's own health, shared with the `healthCheckNodePort`
    /// responders.
    pub health: ProxyHealth,
    /// Set-up problems that do not stop sluice but that an operator must
    /// fix (say, an apiserver reached only through a Service sluice serves,
    /// or kube-proxy leftovers: [`crate::leftovers`]), listed in
    /// `/healthz`'s body.
    pub warnings: Vec<String>,
    /// This node may take load-balancer traffic (kube-proxy's
    /// `nodeEligible`): false while its Node is being deleted or tainted
    /// `ToBeDeletedByClusterAutoscaler`. Always true with a file config.
    pub node_eligible: Arc<AtomicBool>,
}

/// `/healthz` (the node may take traffic) or `/livez` (the process works).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Health,
    Liveness,
}

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoints {
    Health,
    Metrics,
}

/// Descriptors each admin listener holds back (open on `/dev/null`) for
/// the moment the process runs out: when `accept` fails for want of a
/// descriptor, one is closed and the accept retried at once, so `/healthz`
/// and `/metrics` still answer while the data plane is exhausted (the data
/// plane's accept loops are backing off then, so the freed slot goes to
/// the admin connection). Refilled after each accept, as far as possible.
const RESERVE: usize = 2;

#[derive(Debug, Default)]
struct Reserve(Vec<std::fs::File>);

impl Reserve {
    fn refill(&mut self) {
        while self.0.len() < RESERVE {
            match std::fs::File::open("/dev/null") {
                Ok(f) => self.0.push(f),
                Err(_) => return, // still exhausted: next time
            }
        }
    }

    /// Frees one held descriptor; false when none is left.
    fn release(&mut self) -> bool {
        self.0.pop().is_some()
    }
}

/// Serves `endpoints` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, endpoints: Endpoints) {
    let mut reserve = Reserve::default();
    reserve.refill();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => {
                reserve.refill();
                a
            }
            Err(e) if crate::saturation::local_resource(&e).is_some() && reserve.release() => {
                debug!(error = %e, ?endpoints, "admin accept: using a reserved descriptor");
                continue;
            }
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

/// Binds an admin listener, shareable (SO_REUSEPORT) with the admin
/// listener of another sluice on the same address: during an upgrade the
/// new process binds beside the old one, which closes its health listener
/// on SIGTERM (see `docs/operations.md`).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    crate::listener::bind_local_tcp(addr)
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
            (Endpoints::Health, "/healthz") => self.healthz(Probe::Health),
            (Endpoints::Health, "/livez") => self.healthz(Probe::Liveness),
            (Endpoints::Health, "/readyz") => self.readyz(),
            (Endpoints::Metrics, "/metrics") => respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.render(),
            ),
            (Endpoints::Metrics, "/debug/generation") => respond(
                StatusCode::OK,
                "text/plain",
                format!("{}\n", self.metrics.table_generation.get()),
            ),
            (Endpoints::Metrics, "/debug/table") => respond(
                StatusCode::OK,
                "application/json",
                self.table_json().to_string(),
            ),
            _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }

    /// Healthy by [`ProxyHealth::is_healthy`]: no source input has waited
    /// longer than the health timeout for a publish.
    pub fn is_healthy(&self, now: Instant) -> bool {
        self.health.is_healthy(now)
    }

    fn healthz(&self, probe: Probe) -> Response<Full<Bytes>> {
        let now = Instant::now();
        let saturated = self.metrics.saturation.persisting(now, SATURATED_AFTER);
        let node_eligible = self.node_eligible.load(Ordering::Relaxed);
        let healthy = self.is_healthy(now)
            && (probe == Probe::Liveness || (saturated.is_none() && node_eligible));
        let status = if healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = json!({
            "lastUpdated": rfc3339(self.publisher.last_synced()),
            "currentTime": rfc3339(SystemTime::now()),
            "nodeEligible": node_eligible,
            "warnings": self.warnings,
            "saturated": saturated.map(|what| format!("running out of {what}")),
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
        let publisher = Arc::new(Publisher::new());
        Admin {
            publisher: publisher.clone(),
            tracker: Arc::new(Tracker::new(cfg, CancellationToken::new(), metrics.clone())),
            metrics,
            health: ProxyHealth {
                publisher,
                timeout,
                started: Instant::now(),
            },
            warnings: vec!["fix me".into()],
            node_eligible: Arc::new(AtomicBool::new(true)),
        }
    }

    async fn get(a: &Admin, probe: Probe) -> (StatusCode, Value) {
        let r = a.healthz(probe);
        let status = r.status();
        let body = r.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[test]
    fn healthy_while_starting_then_unhealthy_when_input_waits_too_long() {
        let a = mk_admin(Duration::from_secs(60));
        let now = Instant::now();
        // No table yet: healthy for one timeout after the start, as
        // kube-proxy is while it starts.
        assert!(a.is_healthy(now), "starting");
        assert!(
            !a.is_healthy(now + Duration::from_secs(61)),
            "first table too late"
        );
        a.publisher.publish(Table::new());
        assert!(a.is_healthy(now + Duration::from_secs(61)));
        a.publisher.mark_pending();
        assert!(a.is_healthy(Instant::now() + Duration::from_secs(59)));
        assert!(!a.is_healthy(Instant::now() + Duration::from_secs(61)));
        a.publisher.publish(Table::new());
        assert!(a.is_healthy(Instant::now() + Duration::from_secs(61)));
    }

    #[test]
    fn health_check_node_ports_follow_the_healthz_rule() {
        // What main hands the healthCheckNodePort responders: it turns with
        // /healthz's rule, on the same publisher.
        let a = mk_admin(Duration::from_millis(1));
        let check = a.health.check();
        a.publisher.publish(Table::new());
        assert!(check() && a.is_healthy(Instant::now()));
        a.publisher.mark_pending();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!a.is_healthy(Instant::now()));
        assert!(!check(), "input waits too long: the responders say so too");
        a.publisher.publish(Table::new());
        assert!(check());
    }

    #[tokio::test]
    async fn persisting_saturation_fails_healthz_but_not_livez() {
        let a = mk_admin(Duration::from_secs(60));
        a.publisher.publish(Table::new());
        assert_eq!(a.healthz(Probe::Health).status(), StatusCode::OK);
        // Descriptors have been running out for longer than SATURATED_AFTER.
        let Some(start) = Instant::now().checked_sub(SATURATED_AFTER + Duration::from_secs(1))
        else {
            return; // the clock started less than that ago
        };
        let mut t = start;
        while t <= Instant::now() {
            a.metrics
                .saturation
                .record(t, "file descriptors (process limit)");
            t += Duration::from_secs(1);
        }
        let health = a.healthz(Probe::Health);
        assert_eq!(health.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = health.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert!(
            v["saturated"]
                .as_str()
                .unwrap()
                .contains("file descriptors"),
            "{v}"
        );
        assert_eq!(a.healthz(Probe::Liveness).status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_node_being_removed_fails_healthz_but_not_livez() {
        let a = mk_admin(Duration::from_secs(60));
        a.publisher.publish(Table::new());
        let (status, body) = get(&a, Probe::Health).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["nodeEligible"], json!(true), "{body}");
        a.node_eligible.store(false, Ordering::Relaxed);
        let (status, body) = get(&a, Probe::Health).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["nodeEligible"], json!(false), "{body}");
        assert_eq!(get(&a, Probe::Liveness).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn last_updated_follows_unchanged_publishes_too() {
        let a = mk_admin(Duration::from_secs(60));
        a.publisher.publish(Table::new());
        let (_, first) = get(&a, Probe::Health).await;
        std::thread::sleep(Duration::from_millis(5));
        a.publisher.settle_unchanged();
        let (_, later) = get(&a, Probe::Health).await;
        assert!(
            later["lastUpdated"].as_str() > first["lastUpdated"].as_str(),
            "{first} then {later}"
        );
    }

    #[tokio::test]
    async fn healthz_lists_the_warnings() {
        let a = mk_admin(Duration::from_secs(60));
        a.publisher.publish(Table::new());
        let body = a
            .healthz(Probe::Health)
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["warnings"], json!(["fix me"]), "{v}");
        assert!(v["lastUpdated"].is_string(), "{v}");
    }
}

//! `healthCheckNodePort` responders, as kube-proxy runs them: for each
//! LoadBalancer Service with `externalTrafficPolicy: Local`, an HTTP server
//! on its health-check port answers 200 when this node has ready local
//! endpoints for it **and** the proxy itself is healthy (kube-proxy's
//! `serviceProxyHealthy`: the same rule as `/healthz`, without node
//! eligibility), 503 otherwise, with kube-proxy's JSON body and its
//! `X-Load-Balancing-Endpoint-Weight` header (the local endpoint count), so
//! that cloud load balancers send traffic only to nodes that can serve it.
//! The listener is dual-stack (`[::]` accepting IPv4 too) when the
//! responders listen on all addresses and the node has IPv6; IPv4 only
//! otherwise.
//!
//! What to answer comes with the published table
//! ([`crate::table::Table::health_checks`], filled by the Kubernetes
//! source): [`HealthResponders::follow`] brings the responders to a table,
//! called by whatever follows the published tables (the daemon's
//! reconciler), as kube-proxy's proxier sync loop feeds its healthcheck
//! server.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::k8s::HealthCheck;

type Shared = Arc<Mutex<HashMap<u16, HealthCheck>>>;

/// Whether the proxy itself is healthy (`serviceProxyHealthy`).
pub type ProxyHealthy = Arc<dyn Fn() -> bool + Send + Sync>;

/// The running responders, one listener per health-check port.
pub struct HealthResponders {
    ip: IpAddr,
    proxy_healthy: ProxyHealthy,
    state: Shared,
    listeners: HashMap<u16, JoinHandle<()>>,
    /// Wanted ports whose bind failed (say, still held by the kube-proxy
    /// being replaced): retried by [`HealthResponders::retry`].
    failed: HashSet<u16>,
    /// The checks of the last table followed ([`Self::follow`]).
    followed: Option<Arc<[HealthCheck]>>,
}

/// How often health-check ports that could not be bound are tried again
/// (the reconcile loop's retry delay for the health follower).
pub const RETRY: std::time::Duration = std::time::Duration::from_secs(5);

impl Drop for HealthResponders {
    fn drop(&mut self) {
        for (_, t) in self.listeners.drain() {
            t.abort();
        }
    }
}

fn lock(s: &Shared) -> MutexGuard<'_, HashMap<u16, HealthCheck>> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl HealthResponders {
    /// Responders will listen on `ip` (kube-proxy: all addresses) and
    /// answer 200 only while `proxy_healthy` says so.
    pub fn new(ip: IpAddr, proxy_healthy: ProxyHealthy) -> Self {
        Self {
            ip,
            proxy_healthy,
            state: Arc::default(),
            listeners: HashMap::new(),
            failed: HashSet::new(),
            followed: None,
        }
    }

    /// Brings the responders to `table`'s health checks: an update when
    /// they differ from the last table's, a retry of the ports whose bind
    /// failed otherwise. True when every wanted port is listened on (false:
    /// call again later, with this table or the next).
    pub async fn follow(&mut self, table: &crate::table::Table) -> bool {
        let checks = table.health_checks();
        if self.followed.as_deref() != Some(checks) {
            self.update(checks).await;
            self.followed = Some(checks.into());
        } else if self.incomplete() {
            self.retry().await;
        }
        !self.incomplete()
    }

    /// Makes the responders answer for exactly `checks`: opens listeners on
    /// new ports, closes those no longer wanted, updates counts. A port that
    /// cannot be bound is logged once and remembered: [`Self::incomplete`]
    /// says so, and the next update (or [`Self::retry`]) tries it again.
    pub async fn update(&mut self, checks: &[HealthCheck]) {
        {
            let mut st = lock(&self.state);
            st.clear();
            for c in checks {
                st.insert(c.port, c.clone());
            }
        }
        self.listeners.retain(|port, task| {
            let keep = checks.iter().any(|c| c.port == *port) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        self.failed
            .retain(|port| checks.iter().any(|c| c.port == *port));
        for c in checks {
            if self.listeners.contains_key(&c.port) {
                continue;
            }
            let addr = SocketAddr::new(self.ip, c.port);
            match bind(addr) {
                Ok(l) => {
                    if self.failed.remove(&c.port) {
                        tracing::info!(%addr, service = %c.service, "health check port bound after earlier failure");
                    }
                    tracing::info!(%addr, service = %c.service, "health check responder listening");
                    let st = self.state.clone();
                    let healthy = self.proxy_healthy.clone();
                    self.listeners
                        .insert(c.port, tokio::spawn(serve(l, c.port, st, healthy)));
                }
                Err(e) => {
                    if self.failed.insert(c.port) {
                        tracing::warn!(%addr, service = %c.service, error = %e, "cannot bind health check port; retrying every {RETRY:?}");
                    } else {
                        tracing::debug!(%addr, service = %c.service, error = %e, "health check port still cannot be bound");
                    }
                }
            }
        }
    }

    /// Whether some wanted port has no listener (its bind failed).
    pub fn incomplete(&self) -> bool {
        !self.failed.is_empty()
    }

    /// Tries the ports whose bind failed again, with the current checks.
    pub async fn retry(&mut self) {
        let checks: Vec<HealthCheck> = lock(&self.state).values().cloned().collect();
        self.update(&checks).await;
    }

    /// Ports currently listened on.
    pub fn ports(&self) -> Vec<u16> {
        let mut v: Vec<u16> = self.listeners.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

/// Binds a health-check port. On the IPv4 wildcard, a dual-stack `[::]`
/// listener when the node has IPv6 (it takes IPv4 connections too),
/// else `0.0.0.0`.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let listen = |addr: SocketAddr, v6only: Option<bool>| -> std::io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        // Shareable with the responders of another sluice during an upgrade
        // (old and new side by side); still refused while a process without
        // SO_REUSEPORT (kube-proxy) holds the port.
        socket.set_reuse_port(true)?;
        if let Some(only) = v6only {
            socket.set_only_v6(only)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(128)?;
        TcpListener::from_std(socket.into())
    };
    if addr.ip() == IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED) {
        let any6 = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), addr.port());
        if let Ok(l) = listen(any6, Some(false)) {
            return Ok(l);
        }
    }
    listen(addr, None)
}

async fn serve(listener: TcpListener, port: u16, state: Shared, healthy: ProxyHealthy) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: do not spin.
                tracing::warn!(port, error = %e, "health check accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let st = state.clone();
        let healthy = healthy.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req: Request<Incoming>| {
                let answer = lock(&st).get(&port).cloned();
                let proxy_healthy = healthy();
                async move { Ok::<_, Infallible>(respond(answer.as_ref(), proxy_healthy)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// kube-proxy's answer: 200 with local endpoints while the proxy is
/// healthy, 503 otherwise; the endpoint count also in
/// `X-Load-Balancing-Endpoint-Weight`.
fn respond(check: Option<&HealthCheck>, proxy_healthy: bool) -> Response<Full<Bytes>> {
    let (code, body, weight) = match check {
        Some(c) => (
            if c.local_endpoints > 0 && proxy_healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            format!(
                "{{\"service\":{{\"namespace\":\"{}\",\"name\":\"{}\"}},\"localEndpoints\":{},\"serviceProxyHealthy\":{}}}",
                c.service.namespace, c.service.name, c.local_endpoints, proxy_healthy
            ),
            c.local_endpoints,
        ),
        None => (StatusCode::SERVICE_UNAVAILABLE, "{}".to_owned(), 0),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    let headers = r.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        hyper::header::X_CONTENT_TYPE_OPTIONS,
        hyper::header::HeaderValue::from_static("nosniff"),
    );
    headers.insert("x-load-balancing-endpoint-weight", weight.into());
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::ObjectRef;

    fn check(port: u16) -> HealthCheck {
        HealthCheck {
            service: ObjectRef {
                namespace: "default".into(),
                name: "web".into(),
            },
            port,
            local_endpoints: 1,
        }
    }

    fn header<'a>(r: &'a Response<Full<Bytes>>, name: &str) -> &'a str {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    #[test]
    fn the_answer_needs_local_endpoints_and_a_healthy_proxy() {
        let c = check(1);
        let ok = respond(Some(&c), true);
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(header(&ok, "x-load-balancing-endpoint-weight"), "1");
        let sick = respond(Some(&c), false);
        assert_eq!(sick.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(header(&sick, "x-load-balancing-endpoint-weight"), "1");
        let none = HealthCheck {
            local_endpoints: 0,
            ..check(1)
        };
        let empty = respond(Some(&none), true);
        assert_eq!(empty.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(header(&empty, "x-load-balancing-endpoint-weight"), "0");
    }

    #[tokio::test]
    async fn the_body_says_whether_the_proxy_is_healthy() {
        use http_body_util::BodyExt;
        let body = respond(Some(&check(1)), false)
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["serviceProxyHealthy"], serde_json::json!(false), "{v}");
        assert_eq!(v["localEndpoints"], serde_json::json!(1), "{v}");
    }

    #[tokio::test]
    async fn the_wildcard_listener_takes_ipv4_and_ipv6() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let l = bind(SocketAddr::new([0, 0, 0, 0].into(), port)).unwrap();
        let v6 = l.local_addr().unwrap().is_ipv6();
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        if v6 {
            tokio::net::TcpStream::connect(("::1", port)).await.unwrap();
        } else {
            eprintln!("no IPv6 here: IPv4 only");
        }
    }

    #[tokio::test]
    async fn a_port_held_elsewhere_is_retried_until_it_binds() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let mut r = HealthResponders::new("127.0.0.1".parse().unwrap(), Arc::new(|| true));
        r.update(&[check(port)]).await;
        assert!(r.ports().is_empty());
        assert!(r.incomplete());
        r.retry().await;
        assert!(r.incomplete(), "still held");
        drop(held);
        r.retry().await;
        assert_eq!(r.ports(), [port]);
        assert!(!r.incomplete());
        // A port no longer wanted is forgotten, bound or not.
        r.update(&[]).await;
        assert!(r.ports().is_empty() && !r.incomplete());
    }

    #[tokio::test]
    async fn the_responders_follow_the_table_s_health_checks() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let mut r = HealthResponders::new("127.0.0.1".parse().unwrap(), Arc::new(|| true));
        let mut table = crate::table::Table::new();
        assert!(r.follow(&table).await, "nothing wanted");
        table.set_health_checks(Arc::from(vec![check(port)]));
        assert!(!r.follow(&table).await, "held elsewhere: incomplete");
        drop(held);
        // The same table again: the failed port is retried.
        assert!(r.follow(&table).await);
        assert_eq!(r.ports(), [port]);
        let answer = |r: &HealthResponders| lock(&r.state).get(&port).cloned();
        assert_eq!(answer(&r).map(|c| c.local_endpoints), Some(1));
        // The count changes with the next table.
        let mut next = table.clone();
        next.set_health_checks(Arc::from(vec![HealthCheck {
            local_endpoints: 0,
            ..check(port)
        }]));
        assert!(r.follow(&next).await);
        assert_eq!(answer(&r).map(|c| c.local_endpoints), Some(0));
        // The Service goes: the port closes.
        assert!(r.follow(&crate::table::Table::new()).await);
        assert!(r.ports().is_empty());
    }
}

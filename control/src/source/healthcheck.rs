//! `healthCheckNodePort` responders, as kube-proxy runs them: for each
//! LoadBalancer Service with `externalTrafficPolicy: Local`, an HTTP server
//! on its health-check port answers 200 when this node has ready local
//! endpoints for it and 503 otherwise, with kube-proxy's JSON body, so that
//! cloud load balancers send traffic only to nodes that can serve it.

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

/// The running responders, one listener per health-check port.
pub struct HealthResponders {
    ip: IpAddr,
    state: Shared,
    listeners: HashMap<u16, JoinHandle<()>>,
    /// Wanted ports whose bind failed (say, still held by the kube-proxy
    /// being replaced): retried by [`HealthResponders::retry`].
    failed: HashSet<u16>,
}

/// How often the source retries health-check ports it could not bind.
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
    /// Responders will listen on `ip` (kube-proxy: all addresses).
    pub fn new(ip: IpAddr) -> Self {
        Self {
            ip,
            state: Arc::default(),
            listeners: HashMap::new(),
            failed: HashSet::new(),
        }
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
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    if self.failed.remove(&c.port) {
                        tracing::info!(%addr, service = %c.service, "health check port bound after earlier failure");
                    }
                    tracing::info!(%addr, service = %c.service, "health check responder listening");
                    let st = self.state.clone();
                    self.listeners
                        .insert(c.port, tokio::spawn(serve(l, c.port, st)));
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

async fn serve(listener: TcpListener, port: u16, state: Shared) {
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
        tokio::spawn(async move {
            let svc = service_fn(move |_req: Request<Incoming>| {
                let answer = lock(&st).get(&port).cloned();
                async move { Ok::<_, Infallible>(respond(answer.as_ref())) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// kube-proxy's answer: 200 with local endpoints, 503 without.
fn respond(check: Option<&HealthCheck>) -> Response<Full<Bytes>> {
    let (code, body) = match check {
        Some(c) => (
            if c.local_endpoints > 0 {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            format!(
                "{{\"service\":{{\"namespace\":\"{}\",\"name\":\"{}\"}},\"localEndpoints\":{},\"serviceProxyHealthy\":true}}",
                c.service.namespace, c.service.name, c.local_endpoints
            ),
        ),
        None => (StatusCode::SERVICE_UNAVAILABLE, "{}".to_owned()),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
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

    #[tokio::test]
    async fn a_port_held_elsewhere_is_retried_until_it_binds() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let mut r = HealthResponders::new("127.0.0.1".parse().unwrap());
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
}

//! `healthCheckNodePort` responders, as kube-proxy runs them: for each
//! LoadBalancer Service with `externalTrafficPolicy: Local`, an HTTP server
//! on its health-check port answers 200 when this node has ready local
//! endpoints for it and 503 otherwise, with kube-proxy's JSON body, so that
//! cloud load balancers send traffic only to nodes that can serve it.

use std::collections::HashMap;
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
}

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
        }
    }

    /// Makes the responders answer for exactly `checks`: opens listeners on
    /// new ports, closes those no longer wanted, updates counts. A port that
    /// cannot be bound is logged (and retried on the next update).
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
        for c in checks {
            if self.listeners.contains_key(&c.port) {
                continue;
            }
            let addr = SocketAddr::new(self.ip, c.port);
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    tracing::info!(%addr, service = %c.service, "health check responder listening");
                    let st = self.state.clone();
                    self.listeners
                        .insert(c.port, tokio::spawn(serve(l, c.port, st)));
                }
                Err(e) => {
                    tracing::warn!(%addr, service = %c.service, error = %e, "cannot bind health check port");
                }
            }
        }
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
        let Ok((stream, _)) = listener.accept().await else {
            continue;
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

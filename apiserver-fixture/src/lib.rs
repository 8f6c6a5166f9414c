//! A tiny Kubernetes apiserver for tests: plain HTTP, speaking the real
//! list/watch protocol for Services, EndpointSlices and Nodes, so that
//! kube-rs's own watcher runs against it unchanged.
//!
//! What it serves:
//! - discovery: `/version`, `/api`, `/api/v1`, `/apis`,
//!   `/apis/discovery.k8s.io/v1`;
//! - list, cluster-wide or per namespace, with `resourceVersion` in the list
//!   metadata, `limit`/`continue` paging and `fieldSelector=metadata.name=X`;
//! - watch (`?watch=true&resourceVersion=N`): events newer than `N` from the
//!   history, then live `ADDED`/`MODIFIED`/`DELETED`, and `BOOKMARK` when
//!   asked ([`ApiServer::bookmark`]) and allowed by the client;
//! - an expired `resourceVersion` (older than the last
//!   [`ApiServer::compact`]) answers HTTP 200 with one `ERROR` event of code
//!   410, as a real apiserver does, so the watcher relists;
//! - faults: [`ApiServer::drop_watches`] ends every watch stream,
//!   [`ApiServer::kill_connections`] aborts every TCP connection, and
//!   [`ApiServer::set_unavailable`] answers 503 to everything.
//!
//! It is a test fixture: no auth, no TLS, everything in memory.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod builders;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures::channel::mpsc;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::{AbortHandle, JoinHandle};

type Body = BoxBody<Bytes, Infallible>;

/// The kinds this fixture serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "/api/v1",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1",
        }
    }

    fn namespaced(self) -> bool {
        self != Kind::Node
    }

    fn from_kind(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.kind() == kind)
    }
}

/// What a request path asks for.
struct Target {
    kind: Kind,
    namespace: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    for kind in Kind::ALL {
        let Some(rest) = path.strip_prefix(kind.prefix()) else {
            continue;
        };
        if rest == format!("/{}", kind.plural()) {
            return Some(Target {
                kind,
                namespace: None,
            });
        }
        if kind.namespaced()
            && let Some(ns_rest) = rest.strip_prefix("/namespaces/")
            && let Some((ns, plural)) = ns_rest.split_once('/')
            && plural == kind.plural()
        {
            return Some(Target {
                kind,
                namespace: Some(ns.to_owned()),
            });
        }
    }
    None
}

type ObjKey = (Kind, String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

struct HistoryEvent {
    rv: u64,
    kind: Kind,
    namespace: String,
    name: String,
    ty: EventType,
    object: Value,
}

struct Watch {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>,
}

impl Watch {
    fn matches(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        self.kind == kind
            && self.namespace.as_deref().is_none_or(|n| n == namespace)
            && self.name.as_deref().is_none_or(|n| n == name)
    }

    fn send(&self, line: Bytes) -> bool {
        self.tx.unbounded_send(Ok(Frame::data(line))).is_ok()
    }
}

/// A request as the fixture saw it, for tests to assert on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
}

impl Seen {
    pub fn is_watch(&self) -> bool {
        matches!(
            self.query.get("watch").map(String::as_str),
            Some("true" | "1")
        )
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<ObjKey, Value>,
    history: Vec<HistoryEvent>,
    /// Watches from a resourceVersion older than this get 410.
    compacted: u64,
    watches: Vec<Watch>,
    unavailable: bool,
    seen: Vec<Seen>,
    connections: Vec<AbortHandle>,
}

impl State {
    fn broadcast(&mut self, ev: &HistoryEvent) {
        let line = event_line(ev.ty.as_str(), &ev.object);
        self.watches
            .retain(|w| !w.matches(ev.kind, &ev.namespace, &ev.name) || w.send(line.clone()));
    }
}

fn event_line(ty: &str, object: &Value) -> Bytes {
    let mut s = json!({ "type": ty, "object": object }).to_string();
    s.push('\n');
    Bytes::from(s)
}

/// The fixture apiserver. Dropping it stops it.
pub struct ApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    accept: JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.accept.abort();
        let mut st = self.lock();
        st.watches.clear();
        for c in st.connections.drain(..) {
            c.abort();
        }
    }
}

/// An error of the fixture's own API (bad test input).
#[derive(Debug)]
pub struct FixtureError(pub String);

impl std::fmt::Display for FixtureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FixtureError {}

impl ApiServer {
    /// Listens on 127.0.0.1 on a free port.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            rv: 1,
            ..State::default()
        }));
        let st = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st2 = st.clone();
                let conn = tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st3 = st2.clone();
                        async move { Ok::<_, Infallible>(handle(&st3, req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                let mut guard = st.lock().unwrap_or_else(|e| e.into_inner());
                guard.connections.retain(|c| !c.is_finished());
                guard.connections.push(conn.abort_handle());
            }
        });
        Ok(Self {
            addr,
            state,
            accept,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing at this server, without credentials.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fixture\n  cluster:\n    server: {}\ncontexts:\n- name: fixture\n  context:\n    cluster: fixture\n    user: fixture\ncurrent-context: fixture\nusers:\n- name: fixture\n  user: {{}}\n",
            self.url()
        )
    }

    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Creates or replaces an object (ADDED or MODIFIED). Returns its new
    /// resourceVersion.
    pub fn apply<K>(&self, obj: &K) -> Result<u64, FixtureError>
    where
        K: k8s_openapi::Resource + serde::Serialize,
    {
        let v = serde_json::to_value(obj).map_err(|e| FixtureError(e.to_string()))?;
        self.apply_json(v)
    }

    /// Creates or replaces an object given as JSON (it must have `kind`,
    /// and `metadata.name`; `metadata.namespace` for namespaced kinds). Lets
    /// a test send what no typed struct would produce.
    pub fn apply_json(&self, mut obj: Value) -> Result<u64, FixtureError> {
        let kind = obj
            .get("kind")
            .and_then(Value::as_str)
            .and_then(Kind::from_kind)
            .ok_or_else(|| FixtureError(format!("unknown or missing kind in {obj}")))?;
        let (ns, name) = names(kind, &obj)?;
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        obj["apiVersion"] = json!(kind.api_version());
        let meta = &mut obj["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        if meta.get("uid").is_none() {
            meta["uid"] = json!(format!("uid-{}-{ns}-{name}", kind.plural()));
        }
        let key = (kind, ns.clone(), name.clone());
        let ty = if st.objects.insert(key, obj.clone()).is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        let ev = HistoryEvent {
            rv,
            kind,
            namespace: ns,
            name,
            ty,
            object: obj,
        };
        st.broadcast(&ev);
        st.history.push(ev);
        Ok(rv)
    }

    /// Deletes an object (DELETED). `namespace` is ignored for Nodes.
    /// Returns the new resourceVersion, or `None` if it did not exist.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<u64> {
        let ns = if kind.namespaced() { namespace } else { "" };
        let mut st = self.lock();
        let mut obj = st.objects.remove(&(kind, ns.to_owned(), name.to_owned()))?;
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let ev = HistoryEvent {
            rv,
            kind,
            namespace: ns.to_owned(),
            name: name.to_owned(),
            ty: EventType::Deleted,
            object: obj,
        };
        st.broadcast(&ev);
        st.history.push(ev);
        Some(rv)
    }

    /// Forgets the event history: a watch from any older resourceVersion
    /// now gets `ERROR` 410 and the client must relist.
    pub fn compact(&self) {
        let mut st = self.lock();
        st.compacted = st.rv;
        st.history.clear();
    }

    /// Sends a BOOKMARK with the current resourceVersion on every watch
    /// that allowed bookmarks.
    pub fn bookmark(&self) {
        let mut st = self.lock();
        let rv = st.rv.to_string();
        st.watches.retain(|w| {
            if !w.bookmarks {
                return true;
            }
            let obj = json!({
                "kind": w.kind.kind(),
                "apiVersion": w.kind.api_version(),
                "metadata": { "resourceVersion": rv },
            });
            w.send(event_line("BOOKMARK", &obj))
        });
    }

    /// Ends every watch stream cleanly (the response body finishes).
    pub fn drop_watches(&self) {
        self.lock().watches.clear();
    }

    /// Aborts every open TCP connection, mid-stream.
    pub fn kill_connections(&self) {
        let mut st = self.lock();
        st.watches.clear();
        for c in st.connections.drain(..) {
            c.abort();
        }
    }

    /// While unavailable every request gets 503 (and open watches end).
    pub fn set_unavailable(&self, unavailable: bool) {
        let mut st = self.lock();
        st.unavailable = unavailable;
        if unavailable {
            st.watches.clear();
        }
    }

    /// Number of open watch streams of `kind`.
    pub fn watch_count(&self, kind: Kind) -> usize {
        let mut st = self.lock();
        st.watches.retain(|w| !w.tx.is_closed());
        st.watches.iter().filter(|w| w.kind == kind).count()
    }

    /// Every request seen so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// Number of list (not watch) requests of `kind` seen so far.
    pub fn list_count(&self, kind: Kind) -> usize {
        self.lock()
            .seen
            .iter()
            .filter(|s| !s.is_watch() && parse_path(&s.path).is_some_and(|t| t.kind == kind))
            .count()
    }
}

fn names(kind: Kind, obj: &Value) -> Result<(String, String), FixtureError> {
    let meta = &obj["metadata"];
    let name = meta["name"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| FixtureError(format!("{} without metadata.name", kind.kind())))?;
    let ns = if kind.namespaced() {
        meta["namespace"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| FixtureError(format!("{} {name} without namespace", kind.kind())))?
    } else {
        ""
    };
    Ok((ns.to_owned(), name.to_owned()))
}

fn parse_query(q: Option<&str>) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        m.insert(percent_decode(k), percent_decode(v));
    }
    m
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn status_response(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status(code.as_u16(), reason, message))
}

/// `metadata.name=X` from a field selector (the only one supported).
fn field_name(q: &BTreeMap<String, String>) -> Result<Option<String>, String> {
    match q.get("fieldSelector").map(String::as_str) {
        None | Some("") => Ok(None),
        Some(sel) => match sel.strip_prefix("metadata.name=") {
            Some(n) if !n.contains(',') => Ok(Some(n.to_owned())),
            _ => Err(format!("unsupported fieldSelector {sel:?}")),
        },
    }
}

fn handle(state: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = parse_query(req.uri().query());
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    st.seen.push(Seen {
        method: req.method().to_string(),
        path: path.clone(),
        query: query.clone(),
    });
    if st.unavailable {
        return status_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "fixture is unavailable",
        );
    }
    if req.method() != Method::GET {
        return status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the fixture is read-only",
        );
    }
    if let Some(v) = discovery(&path) {
        return json_response(StatusCode::OK, &v);
    }
    let Some(target) = parse_path(&path) else {
        return status_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no route {path}"),
        );
    };
    let name = match field_name(&query) {
        Ok(n) => n,
        Err(e) => return status_response(StatusCode::BAD_REQUEST, "BadRequest", &e),
    };
    let is_watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if is_watch {
        watch(&mut st, target, name, &query)
    } else {
        list(&st, &target, name.as_deref(), &query)
    }
}

fn list(
    st: &State,
    target: &Target,
    name: Option<&str>,
    q: &BTreeMap<String, String>,
) -> Response<Body> {
    let kind = target.kind;
    let items: Vec<&Value> = st
        .objects
        .iter()
        .filter(|((k, ns, n), _)| {
            *k == kind
                && target.namespace.as_deref().is_none_or(|t| t == ns)
                && name.is_none_or(|want| want == n)
        })
        .map(|(_, v)| v)
        .collect();
    let offset: usize = q.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let page: Vec<&Value> = items.iter().skip(offset).take(limit).copied().collect();
    let next = offset.saturating_add(page.len());
    let mut metadata = json!({ "resourceVersion": st.rv.to_string() });
    if next < items.len() {
        metadata["continue"] = json!(next.to_string());
    }
    json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", kind.kind()),
            "apiVersion": kind.api_version(),
            "metadata": metadata,
            "items": page,
        }),
    )
}

fn watch(
    st: &mut State,
    target: Target,
    name: Option<String>,
    q: &BTreeMap<String, String>,
) -> Response<Body> {
    let (tx, rx) = mpsc::unbounded();
    let from = q.get("resourceVersion").map(String::as_str).unwrap_or("");
    let w = Watch {
        kind: target.kind,
        namespace: target.namespace,
        name,
        bookmarks: q.get("allowWatchBookmarks").map(String::as_str) == Some("true"),
        tx,
    };
    if from.is_empty() || from == "0" {
        // Start "now": synthetic ADDED for every current object.
        for ((k, ns, n), obj) in &st.objects {
            if w.matches(*k, ns, n) {
                w.send(event_line("ADDED", obj));
            }
        }
    } else {
        let Ok(from) = from.parse::<u64>() else {
            return status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("resourceVersion {from:?} is not a number"),
            );
        };
        if from < st.compacted {
            // As a real apiserver: 200 with one ERROR event, then the end.
            let msg = format!("too old resource version: {from} ({})", st.compacted);
            w.send(event_line("ERROR", &status(410, "Expired", &msg)));
            drop(w);
            return streaming(rx);
        }
        for ev in st.history.iter().filter(|e| e.rv > from) {
            if w.matches(ev.kind, &ev.namespace, &ev.name) {
                w.send(event_line(ev.ty.as_str(), &ev.object));
            }
        }
    }
    st.watches.push(w);
    streaming(rx)
}

fn streaming(rx: mpsc::UnboundedReceiver<Result<Frame<Bytes>, Infallible>>) -> Response<Body> {
    let body = BodyExt::boxed(StreamBody::new(rx));
    let mut r = Response::new(body);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn discovery(path: &str) -> Option<Value> {
    let resource = |k: Kind| {
        json!({
            "name": k.plural(),
            "singularName": k.kind().to_lowercase(),
            "namespaced": k.namespaced(),
            "kind": k.kind(),
            "verbs": ["get", "list", "watch"],
        })
    };
    Some(match path {
        "/version" => json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-sluice-fixture",
            "platform": "linux/amd64",
        }),
        "/api" => json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [],
        }),
        "/apis" => json!({
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [{
                "name": "discovery.k8s.io",
                "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
                "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"},
            }],
        }),
        "/api/v1" => json!({
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": [resource(Kind::Service), resource(Kind::Node)],
        }),
        "/apis/discovery.k8s.io/v1" => json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": "discovery.k8s.io/v1",
            "resources": [resource(Kind::EndpointSlice)],
        }),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse() {
        let t = parse_path("/api/v1/services").unwrap();
        assert_eq!((t.kind, t.namespace), (Kind::Service, None));
        let t = parse_path("/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices").unwrap();
        assert_eq!(
            (t.kind, t.namespace.as_deref()),
            (Kind::EndpointSlice, Some("ns"))
        );
        assert!(parse_path("/api/v1/namespaces/ns/nodes").is_none());
        assert!(parse_path("/api/v1/pods").is_none());
    }

    #[test]
    fn query_decodes() {
        let q = parse_query(Some("fieldSelector=metadata.name%3Dnode-a&watch=true&x"));
        assert_eq!(q["fieldSelector"], "metadata.name=node-a");
        assert_eq!(q["watch"], "true");
        assert_eq!(q["x"], "");
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}

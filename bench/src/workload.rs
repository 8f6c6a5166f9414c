//! Clients: one short-lived request/response connection, the open-loop and
//! closed-loop drivers around it, the source-port pool, and the
//! classification of what went wrong.
//!
//! Every connection sends `GET n\n` and expects `<backend-id> n\n` followed
//! by the close of the connection (the protocol of [`crate::backend`]).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

/// What a client saw go wrong. Only these are client-visible errors; a
/// failure to get a local socket is counted apart (see [`Outcome::NotStarted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// ECONNREFUSED.
    Refused,
    /// ECONNRESET / ECONNABORTED / EPIPE before a full response.
    Reset,
    /// The client's deadline passed, or ETIMEDOUT.
    Timeout,
    /// EHOSTUNREACH / ENETUNREACH.
    Unreachable,
    /// EOF before a full response line.
    Empty,
    /// A response line that is not `<id> n`.
    Mismatch,
    /// Anything else.
    Other,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 7] = [
        ErrorKind::Refused,
        ErrorKind::Reset,
        ErrorKind::Timeout,
        ErrorKind::Unreachable,
        ErrorKind::Empty,
        ErrorKind::Mismatch,
        ErrorKind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Refused => "refused",
            ErrorKind::Reset => "reset",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::Empty => "empty",
            ErrorKind::Mismatch => "mismatch",
            ErrorKind::Other => "other",
        }
    }
}

/// Maps an I/O error from connect/read/write to the kind a client reports.
pub fn classify(e: &io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => return ErrorKind::Refused,
        Some(libc::ECONNRESET | libc::ECONNABORTED | libc::EPIPE) => return ErrorKind::Reset,
        Some(libc::ETIMEDOUT) => return ErrorKind::Timeout,
        Some(libc::EHOSTUNREACH | libc::ENETUNREACH) => return ErrorKind::Unreachable,
        _ => {}
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ErrorKind::Refused,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => ErrorKind::Reset,
        io::ErrorKind::TimedOut => ErrorKind::Timeout,
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            ErrorKind::Unreachable
        }
        io::ErrorKind::UnexpectedEof => ErrorKind::Empty,
        _ => ErrorKind::Other,
    }
}

/// Checks a whole response (everything read until EOF) against request `n`.
/// Returns the id of the backend that answered.
pub fn verify(resp: &[u8], n: u64) -> Result<String, ErrorKind> {
    let Some(end) = resp.iter().position(|&b| b == b'\n') else {
        // Nothing, or a line cut short: EOF before a full response.
        return Err(ErrorKind::Empty);
    };
    if end + 1 != resp.len() {
        return Err(ErrorKind::Mismatch);
    }
    let line = std::str::from_utf8(&resp[..end]).map_err(|_| ErrorKind::Mismatch)?;
    let (id, num) = line.split_once(' ').ok_or(ErrorKind::Mismatch)?;
    if id.is_empty() || id.contains(char::is_whitespace) {
        return Err(ErrorKind::Mismatch);
    }
    match num.parse::<u64>() {
        Ok(m) if m == n => Ok(id.to_string()),
        _ => Err(ErrorKind::Mismatch),
    }
}

/// How one connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Verified response from the backend with this id.
    Ok(Arc<str>),
    /// A client-visible error.
    Failed(ErrorKind),
    /// Never reached the network: no local port/socket could be had, or the
    /// client's in-flight limit was reached. Not a client-visible error.
    NotStarted,
}

/// One connection.
#[derive(Debug, Clone)]
pub struct Record {
    /// When it was scheduled (open loop) or started (closed loop), since t0.
    pub start: Duration,
    /// From `start` to the end of the response (or the error).
    pub latency: Duration,
    pub outcome: Outcome,
}

/// A small fixed set of local ports that clients bind before connecting,
/// so that source ports are reused the way a busy client reuses them.
#[derive(Debug)]
pub struct PortPool {
    base: u16,
    in_use: Mutex<Vec<bool>>,
    next: AtomicUsize,
}

/// A port taken from the pool; returned on drop.
#[derive(Debug)]
pub struct PortGuard {
    pool: Arc<PortPool>,
    idx: usize,
}

impl PortGuard {
    pub fn port(&self) -> u16 {
        self.pool.base + self.idx as u16
    }
}

impl Drop for PortGuard {
    fn drop(&mut self) {
        if let Ok(mut v) = self.pool.in_use.lock()
            && let Some(slot) = v.get_mut(self.idx)
        {
            *slot = false;
        }
    }
}

impl PortPool {
    /// Ports `base .. base+len`. Fails if the range leaves u16.
    pub fn new(base: u16, len: u16) -> anyhow::Result<Arc<Self>> {
        anyhow::ensure!(len > 0, "source port pool is empty");
        anyhow::ensure!(
            base.checked_add(len - 1).is_some(),
            "source port pool {base}+{len} goes past 65535"
        );
        Ok(Arc::new(Self {
            base,
            in_use: Mutex::new(vec![false; len as usize]),
            next: AtomicUsize::new(0),
        }))
    }

    pub fn len(&self) -> usize {
        self.in_use.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// The next port not held by another connection of ours, round-robin.
    pub fn acquire(self: &Arc<Self>) -> Option<PortGuard> {
        let mut v = self.in_use.lock().ok()?;
        let len = v.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for k in 0..len {
            let idx = (start + k) % len;
            if !v[idx] {
                v[idx] = true;
                self.next.store(idx + 1, Ordering::Relaxed);
                return Some(PortGuard {
                    pool: self.clone(),
                    idx,
                });
            }
        }
        None
    }
}

/// Where and how the clients connect.
#[derive(Debug)]
pub struct LoadSpec {
    /// Connections go round-robin over these.
    pub targets: Vec<SocketAddr>,
    /// Source ports to reuse; `None` lets the kernel pick.
    pub pool: Option<Arc<PortPool>>,
    /// Per-connection deadline (connect + request + response).
    pub timeout: Duration,
    /// Open loop: at most this many connections in flight; beyond, a
    /// scheduled connection is recorded as not started.
    pub max_inflight: usize,
}

/// What a load run produced.
#[derive(Debug, Default)]
pub struct LoadResult {
    pub records: Vec<Record>,
    /// Local bind/connect failures on pool ports (each retried on the next
    /// port); not client-visible.
    pub local_bind_failures: u64,
    /// The measured window.
    pub elapsed: Duration,
}

enum ConnectError {
    Local,
    Remote(io::Error),
}

fn is_local_addr_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRINUSE | libc::EADDRNOTAVAIL)
    )
}

async fn connect(
    target: SocketAddr,
    pool: Option<&Arc<PortPool>>,
    local_failures: &AtomicU64,
) -> Result<(TcpStream, Option<PortGuard>), ConnectError> {
    let Some(pool) = pool else {
        return match TcpStream::connect(target).await {
            Ok(s) => Ok((s, None)),
            Err(e) if is_local_addr_error(&e) => {
                local_failures.fetch_add(1, Ordering::Relaxed);
                Err(ConnectError::Local)
            }
            Err(e) => Err(ConnectError::Remote(e)),
        };
    };
    for _ in 0..pool.len() {
        let Some(guard) = pool.acquire() else {
            break;
        };
        let local = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, guard.port()));
        let sock = match Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)) {
            Ok(s) => s,
            Err(_) => {
                local_failures.fetch_add(1, Ordering::Relaxed);
                return Err(ConnectError::Local);
            }
        };
        let bound = sock
            .set_reuse_address(true)
            .and_then(|()| sock.set_nonblocking(true))
            .and_then(|()| sock.bind(&local.into()));
        if bound.is_err() {
            local_failures.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let std_stream: std::net::TcpStream = sock.into();
        let tsock = TcpSocket::from_std_stream(std_stream);
        match tsock.connect(target).await {
            Ok(s) => return Ok((s, Some(guard))),
            Err(e) if is_local_addr_error(&e) => {
                local_failures.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(e) => return Err(ConnectError::Remote(e)),
        }
    }
    Err(ConnectError::Local)
}

const MAX_RESPONSE: usize = 256;

async fn request_inner(
    target: SocketAddr,
    n: u64,
    pool: Option<&Arc<PortPool>>,
    local_failures: &AtomicU64,
) -> Outcome {
    let (mut s, _guard) = match connect(target, pool, local_failures).await {
        Ok(x) => x,
        Err(ConnectError::Local) => return Outcome::NotStarted,
        Err(ConnectError::Remote(e)) => return Outcome::Failed(classify(&e)),
    };
    let _ = s.set_nodelay(true);
    if let Err(e) = s.write_all(format!("GET {n}\n").as_bytes()).await {
        return Outcome::Failed(classify(&e));
    }
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 128];
    loop {
        match s.read(&mut chunk).await {
            Ok(0) => break,
            Ok(k) => {
                buf.extend_from_slice(&chunk[..k]);
                if buf.len() > MAX_RESPONSE {
                    return Outcome::Failed(ErrorKind::Mismatch);
                }
            }
            // A full line already arrived: the client has its answer even if
            // the close that followed was an RST.
            Err(_) if buf.last() == Some(&b'\n') => break,
            Err(e) => return Outcome::Failed(classify(&e)),
        }
    }
    match verify(&buf, n) {
        Ok(id) => Outcome::Ok(id.into()),
        Err(k) => Outcome::Failed(k),
    }
}

/// One request/response connection to `target`, bounded by `timeout`.
pub async fn request(
    target: SocketAddr,
    n: u64,
    pool: Option<&Arc<PortPool>>,
    local_failures: &AtomicU64,
    timeout: Duration,
) -> Outcome {
    match tokio::time::timeout(timeout, request_inner(target, n, pool, local_failures)).await {
        Ok(o) => o,
        Err(_) => Outcome::Failed(ErrorKind::Timeout),
    }
}

/// Open loop: connection `i` starts at `t0 + i/rate` whatever the others
/// do, for `duration`. Waits for the stragglers (each bounded by the spec's
/// timeout) before returning.
pub async fn open_loop(
    spec: Arc<LoadSpec>,
    rate: f64,
    duration: Duration,
    t0: Instant,
) -> LoadResult {
    let total = (rate * duration.as_secs_f64()).floor() as u64;
    let records = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let local = Arc::new(AtomicU64::new(0));
    let max_inflight = spec.max_inflight.max(1);
    let sem = Arc::new(Semaphore::new(max_inflight));
    for i in 0..total {
        let offset = Duration::from_secs_f64(i as f64 / rate);
        let due = t0 + offset;
        tokio::time::sleep_until(due.into()).await;
        let Ok(permit) = sem.clone().try_acquire_owned() else {
            push(
                &records,
                Record {
                    start: offset,
                    latency: Duration::ZERO,
                    outcome: Outcome::NotStarted,
                },
            );
            continue;
        };
        let spec = spec.clone();
        let records = records.clone();
        let local = local.clone();
        tokio::spawn(async move {
            let target = spec.targets[(i as usize) % spec.targets.len()];
            let outcome = request(target, i, spec.pool.as_ref(), &local, spec.timeout).await;
            push(
                &records,
                Record {
                    start: offset,
                    latency: due.elapsed(),
                    outcome,
                },
            );
            drop(permit);
        });
    }
    // Every task holds a permit until it has pushed its record.
    let _all = sem.acquire_many(max_inflight as u32).await;
    finish(records, &local, duration)
}

/// Closed loop: `concurrency` workers, each starting its next connection as
/// soon as the previous one ends, until `duration` has passed.
pub async fn closed_loop(
    spec: Arc<LoadSpec>,
    concurrency: usize,
    duration: Duration,
    t0: Instant,
) -> LoadResult {
    let records = Arc::new(Mutex::new(Vec::new()));
    let local = Arc::new(AtomicU64::new(0));
    let counter = Arc::new(AtomicU64::new(0));
    let deadline = t0 + duration;
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency.max(1) {
        let spec = spec.clone();
        let records = records.clone();
        let local = local.clone();
        let counter = counter.clone();
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while Instant::now() < deadline {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let target = spec.targets[(i as usize) % spec.targets.len()];
                let started = Instant::now();
                let outcome = request(target, i, spec.pool.as_ref(), &local, spec.timeout).await;
                mine.push(Record {
                    start: started.duration_since(t0),
                    latency: started.elapsed(),
                    outcome,
                });
            }
            if let Ok(mut r) = records.lock() {
                r.extend(mine);
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let elapsed = t0.elapsed();
    finish(records, &local, elapsed)
}

fn push(records: &Mutex<Vec<Record>>, r: Record) {
    if let Ok(mut v) = records.lock() {
        v.push(r);
    }
}

fn finish(records: Arc<Mutex<Vec<Record>>>, local: &AtomicU64, elapsed: Duration) -> LoadResult {
    let mut records = match records.lock() {
        Ok(mut v) => std::mem::take(&mut *v),
        Err(_) => Vec::new(),
    };
    records.sort_by_key(|r| r.start);
    LoadResult {
        records,
        local_bind_failures: local.load(Ordering::Relaxed),
        elapsed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    #[test]
    fn classify_os_errors() {
        assert_eq!(classify(&os(libc::ECONNREFUSED)), ErrorKind::Refused);
        assert_eq!(classify(&os(libc::ECONNRESET)), ErrorKind::Reset);
        assert_eq!(classify(&os(libc::EPIPE)), ErrorKind::Reset);
        assert_eq!(classify(&os(libc::ECONNABORTED)), ErrorKind::Reset);
        assert_eq!(classify(&os(libc::ETIMEDOUT)), ErrorKind::Timeout);
        assert_eq!(classify(&os(libc::EHOSTUNREACH)), ErrorKind::Unreachable);
        assert_eq!(classify(&os(libc::ENETUNREACH)), ErrorKind::Unreachable);
        assert_eq!(classify(&os(libc::EACCES)), ErrorKind::Other);
    }

    #[test]
    fn classify_kinds_without_os_code() {
        let e = |k| io::Error::new(k, "x");
        assert_eq!(classify(&e(io::ErrorKind::UnexpectedEof)), ErrorKind::Empty);
        assert_eq!(classify(&e(io::ErrorKind::TimedOut)), ErrorKind::Timeout);
        assert_eq!(classify(&e(io::ErrorKind::BrokenPipe)), ErrorKind::Reset);
        assert_eq!(classify(&e(io::ErrorKind::InvalidData)), ErrorKind::Other);
    }

    #[test]
    fn verify_responses() {
        assert_eq!(verify(b"old-1 7\n", 7), Ok("old-1".to_string()));
        assert_eq!(verify(b"", 7), Err(ErrorKind::Empty));
        assert_eq!(verify(b"old-1 7", 7), Err(ErrorKind::Empty));
        assert_eq!(verify(b"old-1 8\n", 7), Err(ErrorKind::Mismatch));
        assert_eq!(verify(b"old-1 7\nmore", 7), Err(ErrorKind::Mismatch));
        assert_eq!(verify(b" 7\n", 7), Err(ErrorKind::Mismatch));
        assert_eq!(verify(b"ERR\n", 7), Err(ErrorKind::Mismatch));
    }

    #[test]
    fn pool_hands_out_distinct_ports_and_takes_them_back() {
        let pool = PortPool::new(40000, 2).unwrap();
        let a = pool.acquire().unwrap();
        let b = pool.acquire().unwrap();
        assert_ne!(a.port(), b.port());
        assert!(pool.acquire().is_none());
        let pa = a.port();
        drop(a);
        assert_eq!(pool.acquire().unwrap().port(), pa);
        assert!(PortPool::new(65535, 2).is_err());
    }

    #[tokio::test]
    async fn refused_dial_is_classified_refused() {
        // A port that was just free: nothing listens there.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let local = AtomicU64::new(0);
        let o = request(addr, 1, None, &local, Duration::from_secs(2)).await;
        assert_eq!(o, Outcome::Failed(ErrorKind::Refused));
    }
}

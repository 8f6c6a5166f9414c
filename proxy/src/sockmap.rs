//! Kernel-side forwarding with a BPF sockmap (`SLUICE_FORWARD=sockmap`,
//! `--forward sockmap`; issue 18).
//!
//! After the decision (pick, dial, PROXY header) a connection's two
//! sockets enter three maps of the program in `proxy/bpf/sockmap.bpf.c`
//! (see there for their layout). From then on every byte a socket receives
//! is handed by the kernel to its peer's send path (an `sk_skb`
//! stream-verdict program, `bpf_sk_redirect_hash`): no read or write by
//! sluice, no wake-up per message.
//!
//! Userspace keeps the semantics of [`crate::forward`]:
//! - It listens for read-closed and errors only (its own epoll
//!   registration with read interest; a message that the program takes
//!   wakes nobody). A socket whose peer sent a FIN is at its end once a
//!   `MSG_PEEK` read returns 0: every byte before the FIN has been through
//!   the program by then (the read takes the socket's lock, which the
//!   softirq that runs the program holds).
//! - Half-close: the kernel moves redirected bytes out of the peer
//!   asynchronously (they queue in the peer's psock backlog, sent by a
//!   kworker). A FIN sent at once could overtake them, and the peer's
//!   shutdown would then drop them. So before `shutdown(SHUT_WR)` sluice
//!   waits until the peer has written (unsent + acknowledged bytes, read
//!   consistently) as many bytes as the program counted for this
//!   direction in `MOVED`.
//! - Resets, cuts (drain, shutdown grace) and idle timeouts reset both
//!   sides, as in the other modes. Entries leave the maps before a socket
//!   is closed: `PEERS` first (no more input taken), then `TARGETS`.
//! - Bytes that arrived before the sockets entered the map sit in the
//!   socket's queue, and the kernel runs the program only when more
//!   arrive: sluice kicks it with `setsockopt(SO_RCVLOWAT, 1)`, which runs
//!   the socket's data-ready callback at once.
//!
//! When the program cannot be used (built without clang, no CAP_BPF or
//! CAP_NET_ADMIN, an old kernel, a verifier refusal), [`init`] logs why
//! once and every connection is forwarded with splice. A connection whose
//! sockets cannot enter the maps (a peer already half-closed: the kernel
//! takes only established sockets) is forwarded with splice too. Both are
//! counted (`sluice_forward_sockmap_*` metrics, [`stats`]).

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use socket2::SockRef;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::forward::{Outcome, Transferred};

/// Connections forwarded in the kernel, and connections that asked for it
/// and were forwarded with splice instead.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub forwarded: u64,
    pub fallbacks: u64,
}

static FORWARDED: AtomicU64 = AtomicU64::new(0);
static FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// What this process's connections have done so far.
pub fn stats() -> Stats {
    Stats {
        forwarded: FORWARDED.load(Ordering::Relaxed),
        fallbacks: FALLBACKS.load(Ordering::Relaxed),
    }
}

/// The loaded program and its maps, kept for the life of the process.
struct Loaded {
    peers: RawFd,
    targets: RawFd,
    moved: RawFd,
    #[cfg(sluice_sockmap)]
    _ebpf: aya::Ebpf,
}

static LOADED: OnceLock<Result<Loaded, String>> = OnceLock::new();

/// Loads and attaches the program once; later calls return the first
/// answer. An error says why sockmap forwarding is unavailable (it is
/// logged once, as a warning).
pub fn init() -> Result<(), String> {
    match LOADED.get_or_init(|| {
        let r = load();
        if let Err(e) = &r {
            tracing::warn!("sockmap forwarding unavailable: {e}; forwarding with splice instead");
        } else {
            tracing::info!("sockmap forwarding: program loaded and attached");
        }
        r
    }) {
        Ok(_) => Ok(()),
        Err(e) => Err(e.clone()),
    }
}

fn loaded() -> Option<&'static Loaded> {
    let _ = init();
    LOADED.get().and_then(|r| r.as_ref().ok())
}

#[cfg(not(sluice_sockmap))]
fn load() -> Result<Loaded, String> {
    Err("built without clang".into())
}

#[cfg(sluice_sockmap)]
fn load() -> Result<Loaded, String> {
    use aya::maps::{Map, SockHash};
    use aya::programs::SkSkb;
    use std::os::fd::AsFd;

    let object = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockmap.bpf.o"));
    let mut ebpf = aya::Ebpf::load(object).map_err(|e| format!("loading the program: {e}"))?;
    let raw = |ebpf: &aya::Ebpf, name: &str| -> Result<RawFd, String> {
        match ebpf.map(name) {
            Some(Map::SockHash(d)) | Some(Map::HashMap(d)) => Ok(d.fd().as_fd().as_raw_fd()),
            _ => Err(format!("map {name} missing from the program")),
        }
    };
    let (targets, moved) = (raw(&ebpf, "TARGETS")?, raw(&ebpf, "MOVED")?);
    let peers_map = ebpf
        .map("PEERS")
        .ok_or_else(|| "map PEERS missing from the program".to_string())?;
    let peers_hash: SockHash<&aya::maps::MapData, u64> =
        SockHash::try_from(peers_map).map_err(|e| format!("map PEERS: {e}"))?;
    let peers_fd = peers_hash
        .fd()
        .try_clone()
        .map_err(|e| format!("map PEERS: {e}"))?;
    let peers = raw(&ebpf, "PEERS")?;
    let prog: &mut SkSkb = ebpf
        .program_mut("sluice_verdict")
        .ok_or_else(|| "program sluice_verdict missing".to_string())?
        .try_into()
        .map_err(|e| format!("program sluice_verdict: {e}"))?;
    prog.load()
        .map_err(|e| format!("the kernel refused the program: {e}"))?;
    prog.attach(&peers_fd)
        .map_err(|e| format!("attaching the program to PEERS: {e}"))?;
    Ok(Loaded {
        peers,
        targets,
        moved,
        _ebpf: ebpf,
    })
}

/// Entries in the three maps (each connection holds six while it is
/// forwarded; 0 once every connection has ended). None when the program
/// is not loaded.
pub fn entries() -> Option<io::Result<usize>> {
    let l = loaded()?;
    Some((|| {
        Ok(sys::count(l.peers)? + sys::count(l.targets)? + sys::count(l.moved)?)
    })())
}

/// A connection's place in the maps: the cookies of its two sockets.
struct Entry {
    maps: &'static Loaded,
    client: u64,
    backend: u64,
    client_fd: RawFd,
    backend_fd: RawFd,
    /// Which map entries exist: TARGETS, then PEERS (client, backend).
    targets: bool,
    peers: [bool; 2],
}

impl Entry {
    /// Puts both sockets in the maps (TARGETS and MOVED, then PEERS).
    /// On an error, nothing of this connection is left in the maps, and
    /// no byte went through the program unless `Err.1` says so.
    fn attach(
        maps: &'static Loaded,
        client: &TcpStream,
        backend: &TcpStream,
    ) -> Result<Entry, (io::Error, Entry)> {
        let mut e = Entry {
            maps,
            client: 0,
            backend: 0,
            client_fd: client.as_raw_fd(),
            backend_fd: backend.as_raw_fd(),
            targets: false,
            peers: [false; 2],
        };
        let cookies = SockRef::from(client)
            .cookie()
            .and_then(|c| Ok((c, SockRef::from(backend).cookie()?)));
        match cookies {
            Ok((c, b)) => (e.client, e.backend) = (c, b),
            Err(err) => return Err((err, e)),
        }
        let r = (|| {
            sys::update(maps.moved, e.client, 0)?;
            sys::update(maps.moved, e.backend, 0)?;
            e.targets = true;
            sys::update_sock(maps.targets, e.client, e.backend_fd)?;
            sys::update_sock(maps.targets, e.backend, e.client_fd)?;
            // The backend first: a client that has already sent its FIN
            // cannot enter (the kernel takes established sockets only),
            // and the backend has then most likely sent nothing yet.
            sys::update_sock(maps.peers, e.backend, e.backend_fd)?;
            e.peers[1] = true;
            sys::update_sock(maps.peers, e.client, e.client_fd)?;
            e.peers[0] = true;
            Ok(())
        })();
        match r {
            Ok(()) => Ok(e),
            Err(err) => Err((err, e)),
        }
    }

    /// Bytes the program took from each socket: (client's, backend's).
    fn moved(&self) -> (u64, u64) {
        let m = |c| sys::lookup(self.maps.moved, c).unwrap_or(0);
        (m(self.client), m(self.backend))
    }

    /// Takes both sockets out of PEERS: the program sees no more input.
    fn stop(&mut self) {
        for (i, c) in [(1, self.backend), (0, self.client)] {
            if std::mem::take(&mut self.peers[i]) {
                let _ = sys::delete(self.maps.peers, c);
            }
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.stop();
        if self.targets {
            for c in [self.client, self.backend] {
                let _ = sys::delete(self.maps.targets, c);
            }
        }
        for c in [self.client, self.backend] {
            if c != 0 {
                let _ = sys::delete(self.maps.moved, c);
            }
        }
    }
}

/// Bytes written into `s` so far (unsent and unacknowledged ones
/// included), up to a constant: `SIOCOUTQ` plus `tcpi_bytes_acked`, read
/// again until no acknowledgement came in between. If acknowledgements
/// keep coming, a lower bound.
fn written(s: RawFd) -> io::Result<u64> {
    let mut acked = sys::bytes_acked(s)?;
    for _ in 0..8 {
        let queued = sys::outq(s)?;
        let again = sys::bytes_acked(s)?;
        if again == acked {
            return Ok(acked + queued);
        }
        acked = again;
    }
    Ok(acked)
}

/// Forwards `client` ⇄ `backend` in the kernel until both directions end,
/// one side fails, `cut` fires or (with `idle`) nothing moves for that
/// long. Gives the sockets back untouched when the connection cannot be
/// forwarded this way (the caller then splices).
pub async fn forward(
    client: TcpStream,
    backend: TcpStream,
    cut: &CancellationToken,
    idle: Option<Duration>,
) -> Result<(Outcome, Transferred), (TcpStream, TcpStream)> {
    let Some(maps) = loaded() else {
        FALLBACKS.fetch_add(1, Ordering::Relaxed);
        return Err((client, backend));
    };
    // Everything sluice wrote before (a PROXY header) is in these bases.
    let bases = written(client.as_raw_fd()).and_then(|c| Ok((c, written(backend.as_raw_fd())?)));
    let Ok((client_base, backend_base)) = bases else {
        FALLBACKS.fetch_add(1, Ordering::Relaxed);
        return Err((client, backend));
    };
    let mut entry = match Entry::attach(maps, &client, &backend) {
        Ok(e) => e,
        Err((err, mut e)) => {
            tracing::debug!(error = %err, "sockmap: connection not attached; splicing it");
            FALLBACKS.fetch_add(1, Ordering::Relaxed);
            if e.peers[1] {
                // The backend was in: what the program took from it must
                // reach the client before userspace writes to the client.
                e.stop();
                let (_, from_backend) = e.moved();
                if flushed(&client, client_base + from_backend).await.is_err() {
                    drop(e);
                    crate::forward::reset(&client);
                    crate::forward::reset(&backend);
                    let moved = Transferred {
                        client_to_backend: 0,
                        backend_to_client: from_backend,
                    };
                    return Ok((Outcome::Reset, moved));
                }
            }
            return Err((client, backend));
        }
    };
    FORWARDED.fetch_add(1, Ordering::Relaxed);
    // Bytes queued before the sockets entered the map.
    for s in [&client, &backend] {
        let _ = sys::kick(s.as_raw_fd());
    }
    // A registration of sluice's own with read interest only: tokio's
    // also asks for writability, and every message the program takes
    // would wake it for that. (One epoll set takes a descriptor once, so
    // tokio's goes first.)
    let watch = |s: TcpStream| s.into_std().and_then(sys::watch);
    let (c, b) = match (watch(client), watch(backend)) {
        (Ok(c), Ok(b)) => (c, b),
        (c, b) => {
            // Not watched, so not forwarded: end it as a failure.
            entry.stop();
            let (up, down) = entry.moved();
            drop(entry);
            for s in [c.ok(), b.ok()].into_iter().flatten() {
                let _ = SockRef::from(s.get_ref()).set_linger(Some(Duration::ZERO));
            }
            let moved = Transferred {
                client_to_backend: up,
                backend_to_client: down,
            };
            return Ok((Outcome::Reset, moved));
        }
    };
    let outcome = run(&c, &b, &entry, (client_base, backend_base), cut, idle).await;
    entry.stop();
    let (up, down) = entry.moved();
    // Out of the maps before the sockets close.
    drop(entry);
    if outcome != Outcome::Closed {
        for s in [&c, &b] {
            let _ = SockRef::from(s.get_ref()).set_linger(Some(Duration::ZERO));
        }
    }
    drop((c, b));
    let moved = Transferred {
        client_to_backend: up,
        backend_to_client: down,
    };
    Ok((outcome, moved))
}

type Watched = AsyncFd<std::net::TcpStream>;

async fn run(
    c: &Watched,
    b: &Watched,
    entry: &Entry,
    (client_base, backend_base): (u64, u64),
    cut: &CancellationToken,
    idle: Option<Duration>,
) -> Outcome {
    let others_done = AtomicBool::new(false);
    let up = one_way(
        c,
        b.get_ref(),
        entry.client,
        entry,
        backend_base,
        &others_done,
    );
    let down = one_way(
        b,
        c.get_ref(),
        entry.backend,
        entry,
        client_base,
        &others_done,
    );
    let idle_watch = idle_for(idle, entry);
    tokio::pin!(up, down, idle_watch);
    let (mut up_done, mut down_done) = (false, false);
    loop {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(e) => {
                    tracing::debug!(error = %e, "sockmap: client to backend failed");
                    return Outcome::Reset;
                }
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(e) => {
                    tracing::debug!(error = %e, "sockmap: backend to client failed");
                    return Outcome::Reset;
                }
            },
            _ = cut.cancelled() => return Outcome::Cut,
            _ = &mut idle_watch, if idle.is_some() => return Outcome::Idle,
        }
        if up_done && down_done {
            return Outcome::Closed;
        }
    }
}

/// Waits until `from`'s peer has sent its FIN and every byte before it went
/// through the program; then, once `to` has written all of them,
/// half-closes `to` (unless the other direction has ended too: the caller
/// closes both, which sends the FIN anyway).
async fn one_way(
    from: &Watched,
    to: &std::net::TcpStream,
    from_cookie: u64,
    entry: &Entry,
    to_base: u64,
    others_done: &AtomicBool,
) -> io::Result<()> {
    loop {
        let mut ready = from.readable().await?;
        match sys::peek(from.as_raw_fd()) {
            Ok(0) => break,
            Ok(_) => {
                // Bytes not yet taken by the program: kick it again.
                sys::kick(from.as_raw_fd())?;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
            Err(e) => return Err(e),
        }
    }
    let moved = sys::lookup(entry.maps.moved, from_cookie)?;
    flushed(to, to_base + moved).await?;
    if !others_done.swap(true, Ordering::AcqRel) {
        let _ = SockRef::from(to).shutdown(Shutdown::Write);
    }
    Ok(())
}

/// Waits until `to` has written `target` bytes (see [`written`]); fails if
/// `to` fails first (a redirect that cannot be sent sets the socket's
/// error).
async fn flushed<S: AsFd + AsRawFd>(to: &S, target: u64) -> io::Result<()> {
    let mut pause = Duration::from_micros(100);
    loop {
        if let Some(e) = SockRef::from(to).take_error()? {
            return Err(e);
        }
        if written(to.as_raw_fd())? >= target {
            return Ok(());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Returns once neither socket's `MOVED` count changed for `timeout`;
/// never without a timeout.
async fn idle_for(timeout: Option<Duration>, entry: &Entry) {
    let moved = || {
        let (up, down) = entry.moved();
        up.wrapping_add(down)
    };
    crate::forward::quiet_for(timeout, moved).await
}

/// `sluice_forward_sockmap_*`: whether the program is loaded, and the
/// connections forwarded with it or without it.
#[derive(Debug, Default)]
pub struct SockmapCollector;

impl Collector for SockmapCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        // Only a process that asked for sockmap forwarding loads it.
        let Some(state) = LOADED.get() else {
            return Ok(());
        };
        let up = ConstGauge::new(i64::from(state.is_ok()));
        up.encode(encoder.encode_descriptor(
            "sluice_forward_sockmap_available",
            "1 if the sockmap forwarding program is loaded (SLUICE_FORWARD=sockmap), 0 if connections are spliced instead",
            None,
            up.metric_type(),
        )?)?;
        let s = stats();
        counter(
            &mut encoder,
            "sluice_forward_sockmap_connections",
            "Connections forwarded in the kernel by the sockmap program",
            s.forwarded,
        )?;
        counter(
            &mut encoder,
            "sluice_forward_sockmap_fallbacks",
            "Connections that asked for sockmap forwarding and were spliced instead",
            s.fallbacks,
        )
    }
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

/// The system calls the crates used here do not wrap: map operations by
/// descriptor (lock-free, from any worker), `TCP_INFO`, `SIOCOUTQ`.
#[allow(unsafe_code)]
mod sys {
    use std::io;
    use std::os::fd::RawFd;

    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

    /// `union bpf_attr` as the `BPF_MAP_*_ELEM` commands read it.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    fn bpf<V>(cmd: libc::c_long, map: RawFd, key: &u64, value: *mut V) -> io::Result<()> {
        let mut attr = ElemAttr {
            map_fd: map as u32,
            _pad: 0,
            key: key as *const u64 as u64,
            value: value as u64,
            flags: 0,
        };
        // SAFETY: `attr` is a valid bpf_attr prefix of the size given; its
        // key points at 8 readable bytes and its value at 8 writable bytes
        // (or is null for a delete), all alive for the call. The maps'
        // keys are 8 bytes, their values 8 (MOVED) or 4 (the sockhashes:
        // a descriptor), as the callers pass (proxy/bpf/sockmap.bpf.c).
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                &mut attr as *mut ElemAttr,
                std::mem::size_of::<ElemAttr>(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sets `map[key] = value` (MOVED).
    pub(super) fn update(map: RawFd, key: u64, value: u64) -> io::Result<()> {
        let mut v = value;
        bpf(BPF_MAP_UPDATE_ELEM, map, &key, &mut v)
    }

    /// Puts socket `fd` in sockhash `map` under `key`.
    pub(super) fn update_sock(map: RawFd, key: u64, fd: RawFd) -> io::Result<()> {
        let mut v = fd as u32;
        bpf(BPF_MAP_UPDATE_ELEM, map, &key, &mut v)
    }

    pub(super) fn lookup(map: RawFd, key: u64) -> io::Result<u64> {
        let mut v = 0u64;
        bpf(BPF_MAP_LOOKUP_ELEM, map, &key, &mut v)?;
        Ok(v)
    }

    pub(super) fn delete(map: RawFd, key: u64) -> io::Result<()> {
        bpf(BPF_MAP_DELETE_ELEM, map, &key, std::ptr::null_mut::<u64>())
    }

    /// Keys in `map`, walked with `BPF_MAP_GET_NEXT_KEY` (bounded by the
    /// maps' size).
    pub(super) fn count(map: RawFd) -> io::Result<usize> {
        let mut n = 0;
        let mut key = u64::MAX; // not a key: the walk starts at the first
        let mut next = 0u64;
        while n <= 1 << 20 {
            match bpf(BPF_MAP_GET_NEXT_KEY, map, &key, &mut next) {
                Ok(()) => {
                    n += 1;
                    key = next;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    fn getsockopt(fd: RawFd, level: i32, name: i32, buf: &mut [u8]) -> io::Result<usize> {
        let mut len = buf.len() as libc::socklen_t;
        // SAFETY: buf is writable for len bytes; the kernel writes at most
        // len and stores the length written.
        let r = unsafe { libc::getsockopt(fd, level, name, buf.as_mut_ptr().cast(), &mut len) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(len as usize)
    }

    /// `tcpi_bytes_acked` of `struct tcp_info` (offset 120, Linux ≥ 4.1).
    pub(super) fn bytes_acked(fd: RawFd) -> io::Result<u64> {
        const AT: usize = 120;
        let mut buf = [0u8; 136];
        let len = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut buf)?;
        if len < AT + 8 {
            return Err(io::Error::other("TCP_INFO without tcpi_bytes_acked"));
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[AT..AT + 8]);
        Ok(u64::from_ne_bytes(b))
    }

    /// Bytes in `fd`'s send queue, unsent or unacknowledged (`SIOCOUTQ`).
    pub(super) fn outq(fd: RawFd) -> io::Result<u64> {
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int.
        let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n.max(0) as u64)
    }

    /// Registers `s` with the runtime for read readiness only.
    pub(super) fn watch(
        s: std::net::TcpStream,
    ) -> io::Result<tokio::io::unix::AsyncFd<std::net::TcpStream>> {
        // SAFETY: the std stream owns its descriptor, which stays open and
        // the same until the AsyncFd (which owns the stream) is dropped.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(s, tokio::io::Interest::READABLE)
        }
        .map_err(io::Error::from)
    }

    /// `recv(MSG_PEEK | MSG_DONTWAIT)` of one byte: 0 at the end of the
    /// stream, 1 while bytes wait in the socket's own queue, WouldBlock
    /// otherwise. Takes nothing.
    pub(super) fn peek(fd: RawFd) -> io::Result<usize> {
        let mut b = [0u8; 1];
        // SAFETY: b is writable for one byte.
        let r = unsafe {
            libc::recv(
                fd,
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// `setsockopt(SO_RCVLOWAT, 1)`: the kernel runs the socket's
    /// data-ready callback (the program) for bytes already queued.
    pub(super) fn kick(fd: RawFd) -> io::Result<()> {
        let one: libc::c_int = 1;
        // SAFETY: the option value is one int, alive for the call.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

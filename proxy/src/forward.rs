//! Moving bytes between a client and its backend.
//!
//! Both directions run in one task over shared references to the two
//! sockets. On Linux each direction splices through a pipe taken from a pool
//! (see [`crate::splice`]); elsewhere, or when no pipe can be had, it copies
//! through a userspace buffer. Either way a direction waits for readability
//! *before* it takes a pipe or a buffer and gives it back as soon as the
//! source would block with nothing left to write, so an idle connection
//! holds neither.
//!
//! Semantics, as a client and a backend expect of a transparent L4 hop:
//! - EOF on one side shuts down only the write side towards the other peer
//!   (half-close); the other direction keeps flowing.
//! - A read or write error on either side (a reset above all) aborts both
//!   sockets with a reset (SO_LINGER 0), so a reset propagates as a reset.
//! - A cut (drain timeout, end of shutdown grace) aborts both with a reset.
//! - With an idle timeout (`sluice.io/idle-timeout`), a connection that
//!   moved no byte either way for that long is aborted on both sides with a
//!   reset. Each direction publishes its byte count in an atomic after every
//!   write (a plain store, also without a timeout); one timer per connection
//!   looks at the counts an eighth of the timeout apart, never a timer per
//!   read. Without a timeout there is no timer at all.

use std::io;
use std::net::Shutdown;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const BUF_SIZE: usize = 16 * 1024;

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

/// How a forwarded connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions reached EOF.
    Closed,
    /// One side failed (reset, broken pipe...); both were reset.
    Reset,
    /// The cut token fired; both were reset.
    Cut,
    /// No byte moved either way for the idle timeout; both were reset.
    Idle,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::Reset => "reset",
            Outcome::Cut => "cut",
            Outcome::Idle => "idle",
        }
    }
}

/// Aborts a socket: the peer receives a reset, not a FIN.
pub fn reset(stream: &TcpStream) {
    // Errors here mean the socket is already dead, which is what we want.
    let _ = SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}

/// Kernel buffer bounds of each of sluice's sockets (`--notsent-lowat`,
/// `--receive-buffer`); see [`bound_buffers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffers {
    /// `TCP_NOTSENT_LOWAT`: bytes a socket may queue unsent; 0: no cap.
    pub notsent_lowat: u32,
    /// `SO_RCVBUF`: receive buffer size asked for (the kernel doubles it
    /// for its overhead and stops autotuning it); 0: autotuning.
    pub receive: u32,
}

impl Default for Buffers {
    fn default() -> Self {
        Self {
            notsent_lowat: 128 * 1024,
            receive: 128 * 1024,
        }
    }
}

/// Bounds the kernel memory a connection's two sockets can hold when one
/// peer stops reading (docs/reliability.md): best effort, a socket that
/// refuses an option is used as it is.
///
/// - `TCP_NOTSENT_LOWAT` (Linux) caps what each socket keeps queued but not
///   yet sent: at the cap the socket stops being writable, so sluice stops
///   reading the other side. Send autotuning stays on.
/// - `SO_RCVBUF` caps each socket's receive queue. Without it, receive
///   autotuning grows the buffer while sluice reads fast (before the
///   non-reading peer's window closes) and the sender then fills it. The
///   price is a fixed window: one connection moves at most about that
///   many bytes per round trip.
///
/// On Linux the client side needs nothing per connection: the listener
/// carries both options ([`bound_listener`]) and accepted sockets inherit
/// them (a unit test checks it on the running kernel), two `setsockopt(2)`
/// fewer per connection. Elsewhere both sockets are set here. So on Linux
/// `client` must have been accepted from a listener that went through
/// [`bound_listener`] (every Service and intercept listener does).
pub fn bound_buffers(client: &TcpStream, backend: &TcpStream, b: Buffers) {
    #[cfg(not(target_os = "linux"))]
    bound_socket(SockRef::from(client), b);
    #[cfg(target_os = "linux")]
    let _ = client;
    bound_socket(SockRef::from(backend), b);
}

/// Sets [`bound_buffers`]'s options on a Service or intercept listener,
/// whose accepted connections inherit them on Linux.
pub fn bound_listener(listener: &tokio::net::TcpListener, b: Buffers) {
    bound_socket(SockRef::from(listener), b);
}

fn bound_socket(s: SockRef<'_>, b: Buffers) {
    #[cfg(target_os = "linux")]
    if b.notsent_lowat > 0 {
        let _ = s.set_tcp_notsent_lowat(b.notsent_lowat);
    }
    if b.receive > 0 {
        let _ = s.set_recv_buffer_size(b.receive as usize);
    }
}

/// How bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Copy while reads are small; once a read fills the buffer (bulk),
    /// splice the rest of that direction. The default: small exchanges
    /// cost least through a buffer, bulk least through a pipe.
    Auto,
    /// splice(2) through a pooled pipe from the first byte (Linux). Falls
    /// back to [`Mode::Copy`] for a direction that cannot get a pipe, and
    /// is [`Mode::Copy`] elsewhere.
    Splice,
    /// read(2) into a userspace buffer, write(2) out of it.
    Copy,
}

impl Mode {
    /// The mode of this process: `SLUICE_FORWARD=copy|splice|auto` (a
    /// diagnostic and benchmarking switch); [`Mode::Auto`] by default.
    pub fn from_env() -> Mode {
        static MODE: std::sync::OnceLock<Mode> = std::sync::OnceLock::new();
        *MODE.get_or_init(|| match std::env::var("SLUICE_FORWARD").as_deref() {
            Ok("copy") => Mode::Copy,
            Ok("splice") => Mode::Splice,
            _ => Mode::Auto,
        })
    }
}

/// Moves `from` → `to` until EOF, then shuts down `to`'s write side
/// (unless `others_done` says the other direction has ended too: the
/// caller closes both sockets at once, which sends the FIN anyway).
/// `progress` holds the bytes written so far (see [`idle_for`]).
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    mode: Mode,
    others_done: &AtomicBool,
    progress: &AtomicU64,
) -> io::Result<u64> {
    let mut total = 0;
    #[cfg(target_os = "linux")]
    {
        if mode == Mode::Auto {
            match copy(from, to, 0, Until::EofOrFull, progress).await? {
                Copied::Eof(n) => {
                    finish(to, others_done);
                    return Ok(n);
                }
                Copied::Bulk(n) => total = n,
            }
        }
        if mode != Mode::Copy {
            match crate::splice::one_way(from, to, total, progress).await? {
                crate::splice::Spliced::Eof(n) => {
                    finish(to, others_done);
                    return Ok(n);
                }
                crate::splice::Spliced::NoPipe(n) => total = n,
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = mode;
    match copy(from, to, total, Until::Eof, progress).await? {
        Copied::Eof(n) | Copied::Bulk(n) => {
            finish(to, others_done);
            Ok(n)
        }
    }
}

/// This direction reached EOF: half-close towards `to`.
fn finish(to: &TcpStream, others_done: &AtomicBool) {
    if others_done.swap(true, Ordering::AcqRel) {
        return;
    }
    // The peer may already be gone entirely; that is the other direction's
    // business, not an error of this one.
    let _ = SockRef::from(to).shutdown(Shutdown::Write);
}

enum Copied {
    /// `from` reached EOF. Bytes moved in all.
    Eof(u64),
    /// A read filled the buffer (only when asked to stop there); everything
    /// read was written. Bytes moved so far.
    Bulk(u64),
}

/// Reads into `buf`. A short read also clears `from`'s read readiness (as
/// tokio's own reads do): the socket is drained, so the next wait goes to
/// epoll instead of spending a read(2) that fails with EAGAIN. Read-closed
/// readiness is never cleared, so a FIN already queued is still seen.
fn read_some(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let len = buf.len();
    let mut got = 0;
    let r = from.try_io(Interest::READABLE, || {
        let mut sock: &socket2::Socket = &SockRef::from(from);
        let n = io::Read::read(&mut sock, buf)?;
        got = n;
        if n > 0 && n < len {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        r => r,
    }
}

/// When [`copy`] stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    /// At EOF (or a FIN queued behind the data).
    Eof,
    /// Also at the first read that fills the buffer: the direction carries
    /// bulk data, worth handing to splice.
    EofOrFull,
}

/// Copies `from` → `to` until EOF or, with [`Until::EofOrFull`], until a
/// read fills the buffer. `total` is what was already moved; `progress`
/// gets the new total after every write. The buffer is held
/// only while data is in flight: it goes back to the pool whenever `from`
/// would block.
///
/// When `from`'s peer has already half-closed (its FIN came with the data,
/// as when a server writes its response and closes), a short read has
/// taken everything before the FIN: that data is written with MSG_MORE and
/// the direction ends without another read, so the FIN sent next leaves in
/// the same segment as the data (one packet and one wake-up less for the
/// receiver). A reset is never taken for a FIN: the event that reports a
/// reset's read-closed also reports an error, and then the read goes on
/// and fails as usual.
async fn copy(
    from: &TcpStream,
    to: &TcpStream,
    mut total: u64,
    until: Until,
    progress: &AtomicU64,
) -> io::Result<Copied> {
    loop {
        let ready = from.ready(Interest::READABLE).await?;
        let fin_queued = ready.is_read_closed() && !has_error(from);
        let mut buf = Buf::take();
        loop {
            let n = match read_some(from, &mut buf) {
                Ok(0) => return Ok(Copied::Eof(total)),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            let last = fin_queued && n < buf.len();
            write_all(to, &buf[..n], last).await?;
            total += n as u64;
            progress.store(total, Ordering::Relaxed);
            if last {
                return Ok(Copied::Eof(total));
            }
            if until == Until::EofOrFull && n == buf.len() {
                return Ok(Copied::Bulk(total));
            }
        }
    }
}

/// A copy buffer from a small per-thread pool: reused buffers save the
/// allocation and the zeroing of a fresh one per read cycle. Returned to
/// the pool on drop; the pool keeps at most [`POOL_MAX`] per thread.
struct Buf(Vec<u8>);

const POOL_MAX: usize = 64;

thread_local! {
    static POOL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Buf {
    fn take() -> Buf {
        // try_with: a buffer may be taken or dropped while the thread exits.
        let pooled = POOL
            .try_with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.pop()))
            .ok()
            .flatten();
        Buf(pooled.unwrap_or_else(|| vec![0; BUF_SIZE]))
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        // Contents left over are never read: every read overwrites the
        // prefix it reports.
        let _ = POOL.try_with(|p| {
            if let Ok(mut p) = p.try_borrow_mut()
                && p.len() < POOL_MAX
            {
                p.push(buf);
            }
        });
    }
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

/// Whether `s` has error readiness (a reset sets it in the same event as
/// read-closed; a FIN does not). No system call.
fn has_error(s: &TcpStream) -> bool {
    match s.ready(Interest::ERROR).now_or_never() {
        Some(Ok(r)) => r.is_error(),
        Some(Err(_)) => true,
        None => false,
    }
}

/// Writes all of `buf` to `to`; with `more`, tells the kernel more follows
/// at once (MSG_MORE, Linux): the FIN the caller sends next joins the data.
async fn write_all(to: &TcpStream, buf: &[u8], more: bool) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    let flags = if more { libc::MSG_MORE } else { 0 };
    #[cfg(not(target_os = "linux"))]
    let flags = {
        let _ = more;
        0
    };
    let mut sent = 0;
    while sent < buf.len() {
        let r = to.try_io(Interest::WRITABLE, || {
            SockRef::from(to).send_with_flags(&buf[sent..], flags)
        });
        match r {
            Ok(m) => sent += m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Returns once the sum of `progress` has not changed for `timeout`
/// (checked every eighth of it, so at most `timeout × 9/8` after the last
/// byte); never without a timeout.
async fn idle_for(timeout: Option<Duration>, progress: &[AtomicU64; 2]) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    let moved = || {
        (progress.iter())
            .map(|p| p.load(Ordering::Relaxed))
            .fold(0u64, u64::wrapping_add)
    };
    let tick = (timeout / 8).max(Duration::from_millis(1));
    let mut seen = moved();
    let mut active_at = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(tick.min(timeout)).await;
        let now = tokio::time::Instant::now();
        let current = moved();
        if current != seen {
            seen = current;
            active_at = now;
        } else if now.saturating_duration_since(active_at) >= timeout {
            return;
        }
    }
}

/// Forwards between `client` and `backend` until both directions end, one
/// side fails, `cut` fires, or (with `idle`) no byte moves either way for
/// that long. Consumes both sockets.
pub async fn forward(
    client: TcpStream,
    backend: TcpStream,
    cut: &CancellationToken,
    mode: Mode,
    idle: Option<Duration>,
) -> (Outcome, Transferred) {
    let others_done = AtomicBool::new(false);
    let progress = [AtomicU64::new(0), AtomicU64::new(0)];
    let up = one_way(&client, &backend, mode, &others_done, &progress[0]);
    let down = one_way(&backend, &client, mode, &others_done, &progress[1]);
    let idle_watch = idle_for(idle, &progress);
    tokio::pin!(up, down, idle_watch);
    let (mut up_done, mut down_done) = (false, false);
    let outcome = loop {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(_) => up_done = true,
                Err(_) => break Outcome::Reset,
            },
            r = &mut down, if !down_done => match r {
                Ok(_) => down_done = true,
                Err(_) => break Outcome::Reset,
            },
            _ = cut.cancelled() => break Outcome::Cut,
            _ = &mut idle_watch, if idle.is_some() => break Outcome::Idle,
        }
        if up_done && down_done {
            break Outcome::Closed;
        }
    };
    if outcome != Outcome::Closed {
        reset(&client);
        reset(&backend);
    }
    // Also what a failed or cut connection moved before it ended.
    let moved = Transferred {
        client_to_backend: progress[0].load(Ordering::Relaxed),
        backend_to_client: progress[1].load(Ordering::Relaxed),
    };
    (outcome, moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const T: Duration = Duration::from_secs(10);

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_connections_inherit_the_listener_s_buffer_bounds() {
        let b = Buffers::default();
        let l = crate::listener::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        bound_listener(&l, b);
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let (s, c) = (SockRef::from(&s), SockRef::from(&c));
        assert_eq!(s.tcp_notsent_lowat().unwrap(), b.notsent_lowat);
        assert_eq!(
            c.tcp_notsent_lowat().unwrap(),
            0,
            "not set on a plain socket"
        );
        // What the kernel makes of the asked size (doubled, capped by
        // net.core.rmem_max), read off a socket set directly.
        let direct =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        direct.set_recv_buffer_size(b.receive as usize).unwrap();
        let want = direct.recv_buffer_size().unwrap();
        assert_eq!(s.recv_buffer_size().unwrap(), want);
        assert_ne!(
            c.recv_buffer_size().unwrap(),
            want,
            "not set on a plain socket"
        );
    }

    /// A connected pair: (the end a test drives, the end sluice holds).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    type Hop = (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<(Outcome, Transferred)>,
    );

    /// client ⇄ [forward] ⇄ backend; returns the outer ends and the task.
    async fn hop(mode: Mode, cut: CancellationToken) -> Hop {
        hop_idle(mode, cut, None).await
    }

    /// [`hop`] with an idle timeout.
    async fn hop_idle(mode: Mode, cut: CancellationToken, idle: Option<Duration>) -> Hop {
        let (client, client_side) = pair().await;
        let (backend_side, backend) = pair().await;
        let task =
            tokio::spawn(async move { forward(client_side, backend_side, &cut, mode, idle).await });
        (client, backend, task)
    }

    /// Both outer ends of a hop were reset.
    async fn assert_both_reset(client: &mut TcpStream, backend: &mut TcpStream) {
        for s in [client, backend] {
            let mut rest = Vec::new();
            let r = tokio::time::timeout(T, s.read_to_end(&mut rest))
                .await
                .unwrap();
            assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
        }
    }

    fn payload(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    async fn half_close_both_ways(mode: Mode) {
        let (client, backend, task) = hop(mode, CancellationToken::new()).await;
        let up = payload(3 << 20, 1);
        let down = payload(5 << 20, 2);
        let (mut cr, mut cw) = client.into_split();
        let (mut br, mut bw) = backend.into_split();
        let sent = up.clone();
        let writer = tokio::spawn(async move {
            cw.write_all(&sent).await.unwrap();
            cw.shutdown().await.unwrap(); // client half-closes first
            cw
        });
        // The backend sees all of it, then EOF, while its own side is open.
        let mut got = Vec::new();
        tokio::time::timeout(T, br.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert!(got == up, "upstream bytes differ");
        let _cw = writer.await.unwrap();
        // The reply still flows after the client's FIN (written while the
        // client reads: more than the socket buffers may hold).
        let sent = down.clone();
        let writer = tokio::spawn(async move {
            bw.write_all(&sent).await.unwrap();
            bw.shutdown().await.unwrap();
            bw
        });
        let mut got = Vec::new();
        tokio::time::timeout(T, cr.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert!(got == down, "downstream bytes differ");
        let _bw = tokio::time::timeout(T, writer).await.unwrap().unwrap();
        let (outcome, moved) = tokio::time::timeout(T, task).await.unwrap().unwrap();
        assert_eq!(outcome, Outcome::Closed);
        assert_eq!(moved.client_to_backend, up.len() as u64);
        assert_eq!(moved.backend_to_client, down.len() as u64);
    }

    async fn backend_reset_resets_client(mode: Mode) {
        let (mut client, mut backend, task) = hop(mode, CancellationToken::new()).await;
        client.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        backend.read_exact(&mut b).await.unwrap();
        SockRef::from(&backend)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(backend);
        let mut rest = Vec::new();
        let r = tokio::time::timeout(T, client.read_to_end(&mut rest))
            .await
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(task.await.unwrap().0, Outcome::Reset);
    }

    async fn cut_resets_both(mode: Mode) {
        let cut = CancellationToken::new();
        let (mut client, mut backend, task) = hop(mode, cut.clone()).await;
        client.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        backend.read_exact(&mut b).await.unwrap();
        cut.cancel();
        assert_eq!(task.await.unwrap().0, Outcome::Cut);
        assert_both_reset(&mut client, &mut backend).await;
    }

    /// A server that writes its answer and closes at once: the client gets
    /// the answer and then EOF (the FIN may travel with the data).
    async fn reply_then_close(mode: Mode) {
        let (mut client, mut backend, task) = hop(mode, CancellationToken::new()).await;
        client.write_all(b"request").await.unwrap();
        let mut b = [0u8; 7];
        backend.read_exact(&mut b).await.unwrap();
        backend.write_all(b"reply").await.unwrap();
        drop(backend);
        let mut got = Vec::new();
        tokio::time::timeout(T, client.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"reply");
        // The client can still send (its direction is open) and then close.
        client.shutdown().await.unwrap();
        let (outcome, moved) = tokio::time::timeout(T, task).await.unwrap().unwrap();
        assert!(
            outcome == Outcome::Closed || outcome == Outcome::Reset,
            "{outcome:?}"
        );
        assert_eq!(moved.backend_to_client, 5);
    }

    /// A server that writes and then aborts: the client sees a reset, never
    /// a clean end.
    async fn reply_then_reset(mode: Mode) {
        let (mut client, mut backend, task) = hop(mode, CancellationToken::new()).await;
        client.write_all(b"request").await.unwrap();
        let mut b = [0u8; 7];
        backend.read_exact(&mut b).await.unwrap();
        backend.write_all(b"reply").await.unwrap();
        SockRef::from(&backend)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(backend);
        let mut got = Vec::new();
        let r = tokio::time::timeout(T, client.read_to_end(&mut got))
            .await
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(task.await.unwrap().0, Outcome::Reset);
    }

    #[tokio::test]
    async fn auto_reply_then_close() {
        reply_then_close(Mode::Auto).await;
    }

    #[tokio::test]
    async fn copy_reply_then_close() {
        reply_then_close(Mode::Copy).await;
    }

    #[tokio::test]
    async fn splice_reply_then_close() {
        reply_then_close(Mode::Splice).await;
    }

    #[tokio::test]
    async fn auto_reply_then_reset() {
        reply_then_reset(Mode::Auto).await;
    }

    #[tokio::test]
    async fn copy_reply_then_reset() {
        reply_then_reset(Mode::Copy).await;
    }

    #[tokio::test]
    async fn splice_reply_then_reset() {
        reply_then_reset(Mode::Splice).await;
    }

    #[tokio::test]
    async fn splice_half_close_both_ways() {
        half_close_both_ways(Mode::Splice).await;
    }

    #[tokio::test]
    async fn auto_half_close_both_ways() {
        half_close_both_ways(Mode::Auto).await;
    }

    #[tokio::test]
    async fn auto_backend_reset_resets_client() {
        backend_reset_resets_client(Mode::Auto).await;
    }

    #[tokio::test]
    async fn auto_cut_resets_both() {
        cut_resets_both(Mode::Auto).await;
    }

    #[tokio::test]
    async fn copy_half_close_both_ways() {
        half_close_both_ways(Mode::Copy).await;
    }

    #[tokio::test]
    async fn splice_backend_reset_resets_client() {
        backend_reset_resets_client(Mode::Splice).await;
    }

    #[tokio::test]
    async fn copy_backend_reset_resets_client() {
        backend_reset_resets_client(Mode::Copy).await;
    }

    #[tokio::test]
    async fn splice_cut_resets_both() {
        cut_resets_both(Mode::Splice).await;
    }

    #[tokio::test]
    async fn copy_cut_resets_both() {
        cut_resets_both(Mode::Copy).await;
    }

    /// With an idle timeout: a connection that keeps moving bytes (either
    /// way) stays open past it; once nothing moves for the timeout, both
    /// sides are reset.
    async fn idle_timeout_closes_only_idle(mode: Mode) {
        let idle = Some(Duration::from_millis(300));
        let (mut client, mut backend, task) = hop_idle(mode, CancellationToken::new(), idle).await;
        // Busy for three timeouts: one byte every 100 ms, alternating ways.
        for i in 0..9u8 {
            let mut b = [0u8; 1];
            if i % 2 == 0 {
                client.write_all(&[i]).await.unwrap();
                backend.read_exact(&mut b).await.unwrap();
            } else {
                backend.write_all(&[i]).await.unwrap();
                client.read_exact(&mut b).await.unwrap();
            }
            assert_eq!(b[0], i);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!task.is_finished(), "a busy connection was closed");
        let (outcome, moved) = tokio::time::timeout(T, task).await.unwrap().unwrap();
        assert_eq!(outcome, Outcome::Idle);
        assert_eq!(moved.client_to_backend, 5);
        assert_eq!(moved.backend_to_client, 4);
        assert_both_reset(&mut client, &mut backend).await;
    }

    #[tokio::test]
    async fn auto_idle_timeout_closes_only_idle() {
        idle_timeout_closes_only_idle(Mode::Auto).await;
    }

    #[tokio::test]
    async fn splice_idle_timeout_closes_only_idle() {
        idle_timeout_closes_only_idle(Mode::Splice).await;
    }

    #[tokio::test]
    async fn copy_idle_timeout_closes_only_idle() {
        idle_timeout_closes_only_idle(Mode::Copy).await;
    }

    /// An idle spliced connection holds no pipe: after an exchange, its
    /// pipes are back in the pool while the connection stays open.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn idle_spliced_connection_returns_its_pipes() {
        let (mut client, mut backend, task) = hop(Mode::Splice, CancellationToken::new()).await;
        client.write_all(b"request").await.unwrap();
        let mut b = [0u8; 7];
        backend.read_exact(&mut b).await.unwrap();
        backend.write_all(b"reply").await.unwrap();
        let mut b = [0u8; 5];
        client.read_exact(&mut b).await.unwrap();
        // Both directions are now waiting for readability with no pipe.
        // Other tests share the pool, so look for at least one pipe.
        let deadline = std::time::Instant::now() + T;
        while crate::splice::pooled() == 0 {
            assert!(std::time::Instant::now() < deadline, "no pipe returned");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!task.is_finished());
        drop((client, backend));
    }
}

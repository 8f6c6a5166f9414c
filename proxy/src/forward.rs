//! Moving bytes between a client and its backend.
//!
//! Both directions run in one task over shared references to the two
//! sockets. Each direction waits for readability *before* it takes a buffer,
//! so an idle connection holds no buffer at all; the buffer is allocated on
//! the first byte and kept while the connection lives.
//!
//! Semantics, as a client and a backend expect of a transparent L4 hop:
//! - EOF on one side shuts down only the write side towards the other peer
//!   (half-close); the other direction keeps flowing.
//! - A read or write error on either side (a reset above all) aborts both
//!   sockets with a reset (SO_LINGER 0), so a reset propagates as a reset.
//! - A cut (drain timeout, end of shutdown grace) aborts both with a reset.

use std::io;
use std::net::Shutdown;

use socket2::SockRef;
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
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::Reset => "reset",
            Outcome::Cut => "cut",
        }
    }
}

/// Aborts a socket: the peer receives a reset, not a FIN.
pub fn reset(stream: &TcpStream) {
    // Errors here mean the socket is already dead, which is what we want.
    let _ = SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}

/// Copies `from` → `to` until EOF, then shuts down `to`'s write side.
async fn pipe(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let mut buf: Vec<u8> = Vec::new();
    let mut total = 0u64;
    loop {
        from.readable().await?;
        if buf.is_empty() {
            buf = vec![0; BUF_SIZE];
        }
        let n = match from.try_read(&mut buf) {
            Ok(0) => {
                // The peer may already be gone entirely; that is the other
                // direction's business, not an error of this one.
                let _ = SockRef::from(to).shutdown(Shutdown::Write);
                return Ok(total);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut sent = 0;
        while sent < n {
            to.writable().await?;
            match to.try_write(&buf[sent..n]) {
                Ok(m) => sent += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}

/// Forwards between `client` and `backend` until both directions end, one
/// side fails, or `cut` fires. Consumes both sockets.
pub async fn forward(
    client: TcpStream,
    backend: TcpStream,
    cut: &CancellationToken,
) -> (Outcome, Transferred) {
    let mut moved = Transferred::default();
    let up = pipe(&client, &backend);
    let down = pipe(&backend, &client);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let outcome = loop {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(n) => { moved.client_to_backend = n; up_done = true; }
                Err(_) => break Outcome::Reset,
            },
            r = &mut down, if !down_done => match r {
                Ok(n) => { moved.backend_to_client = n; down_done = true; }
                Err(_) => break Outcome::Reset,
            },
            _ = cut.cancelled() => break Outcome::Cut,
        }
        if up_done && down_done {
            break Outcome::Closed;
        }
    };
    if outcome != Outcome::Closed {
        reset(&client);
        reset(&backend);
    }
    (outcome, moved)
}

//! Zero-copy forwarding on Linux: splice(2) from one socket into a pipe,
//! and from the pipe into the other socket. The bytes stay in the kernel
//! (page references move, nothing is copied through userspace).
//!
//! Pipes are taken from a process-wide pool only when a socket is readable
//! and go back to it as soon as they are empty again, so an idle connection
//! holds no pipe. A pipe that still holds data when its connection fails is
//! closed, never pooled. When no pipe can be had (out of descriptors), the
//! caller falls back to the portable copy for the rest of the direction:
//! at that point every byte read so far has been written, so nothing is
//! lost or reordered.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::unistd::pipe2;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Capacity asked for each pipe (F_SETPIPE_SZ; the kernel's default of
/// 64 KiB is kept if the request is refused). Only the pages of data in
/// flight are ever allocated, not the capacity.
const PIPE_SIZE: i32 = 256 * 1024;
/// Largest number of empty pipes kept for reuse. Each holds two
/// descriptors, taken from the same limit as connections: keep it small.
/// Bulk flows amortise a pipe's creation; small exchanges use no pipe.
const POOL_MAX: usize = 64;

/// An empty pipe, or one whose content is accounted for by its user.
#[derive(Debug)]
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
}

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

fn pool() -> std::sync::MutexGuard<'static, Vec<Pipe>> {
    // The pool holds plain descriptors; a panic elsewhere cannot leave it
    // inconsistent.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pipe {
    fn take() -> io::Result<Pipe> {
        if let Some(p) = pool().pop() {
            return Ok(p);
        }
        let (r, w) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let cap = match fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)) {
            Ok(n) => n as usize,
            Err(_) => fcntl(&w, FcntlArg::F_GETPIPE_SZ).map_or(64 * 1024, |n| n as usize),
        };
        Ok(Pipe { r, w, cap })
    }

    /// Returns an empty pipe to the pool (or closes it when the pool is full).
    fn give_back(self) {
        let mut pool = pool();
        if pool.len() < POOL_MAX {
            pool.push(self);
        }
    }
}

/// Number of empty pipes waiting in the pool (for tests and the docs).
pub fn pooled() -> usize {
    pool().len()
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_NONBLOCK.union(SpliceFFlags::SPLICE_F_MOVE);

/// How a spliced direction ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Spliced {
    /// `from` reached EOF; everything was written to `to`. Bytes moved.
    Eof(u64),
    /// No pipe could be had; everything read so far was written. Bytes
    /// moved so far: the caller carries on with a copy.
    NoPipe(u64),
}

/// Moves bytes `from` → `to` through a pipe until EOF on `from` (returns
/// without shutting anything down: that is the caller's business) or an
/// error on either socket.
/// `total` is what was already moved (by a copy that came first);
/// `progress` gets the new total after every write (for the idle timeout).
pub async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    mut total: u64,
    progress: &AtomicU64,
) -> io::Result<Spliced> {
    loop {
        from.readable().await?;
        let pipe = match Pipe::take() {
            Ok(p) => p,
            Err(_) => return Ok(Spliced::NoPipe(total)),
        };
        // Keep the pipe while `from` has data; give it back when it is empty
        // and `from` would block.
        loop {
            let n = match from.try_io(Interest::READABLE, || {
                splice(from, None, &pipe.w, None, pipe.cap, FLAGS).map_err(io::Error::from)
            }) {
                Ok(0) => {
                    pipe.give_back();
                    return Ok(Spliced::Eof(total));
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    pipe.give_back();
                    break;
                }
                // The pipe is empty: it could be pooled, but a failed
                // connection is rare; closing it is simpler.
                Err(e) => return Err(e),
            };
            // On error the pipe (with data in it) is dropped: closed.
            drain(&pipe, n, to).await?;
            total += n as u64;
            progress.store(total, Ordering::Relaxed);
        }
    }
}

/// Writes the `n` bytes held in `pipe` to `to`.
async fn drain(pipe: &Pipe, mut n: usize, to: &TcpStream) -> io::Result<()> {
    while n > 0 {
        match to.try_io(Interest::WRITABLE, || {
            splice(&pipe.r, None, to, None, n, FLAGS).map_err(io::Error::from)
        }) {
            // A socket never takes 0 bytes from a non-empty pipe; guard
            // against a busy loop all the same.
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(m) => n -= m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

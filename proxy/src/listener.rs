//! Listening sockets, built so that two sluice processes can share them.
//!
//! Every listener sets SO_REUSEADDR and SO_REUSEPORT, so a new sluice can
//! bind the same addresses while the old one still drains (in-place
//! upgrade), and IP_FREEBIND, so a Service IP can be bound before (or
//! without) being assigned to a local device. TCP_NODELAY is set on the
//! listener: on Linux the connections it accepts inherit it, which saves a
//! `setsockopt(2)` per connection.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;

/// Accept backlog of each listener.
pub const BACKLOG: i32 = 4096;

/// Binds a shareable, non-blocking TCP listener on `addr`.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    match addr {
        SocketAddr::V4(_) => socket.set_freebind_v4(true)?,
        SocketAddr::V6(_) => {
            socket.set_only_v6(true)?;
            socket.set_freebind_v6(true)?;
        }
    }
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn two_listeners_share_an_address() {
        let a = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = a.local_addr().unwrap();
        let b = bind_tcp(addr).unwrap();
        assert_eq!(b.local_addr().unwrap(), addr);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay() {
        let l = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let _c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert!(s.nodelay().unwrap(), "accepted socket lost TCP_NODELAY");
    }

    #[tokio::test]
    async fn binds_an_address_not_assigned_here() {
        // 192.0.2.0/24 is TEST-NET-1: never assigned locally. Nothing is
        // sent; IP_FREEBIND only lets the bind succeed.
        let l = bind_tcp("192.0.2.1:0".parse().unwrap()).unwrap();
        assert_eq!(l.local_addr().unwrap().ip().to_string(), "192.0.2.1");
    }
}

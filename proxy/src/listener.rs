//! Listening sockets, built so that two sluice processes can share them.
//!
//! Every listener sets SO_REUSEADDR and SO_REUSEPORT, so a new sluice can
//! bind the same addresses while the old one still drains (in-place
//! upgrade), and IP_FREEBIND, so a Service IP can be bound before (or
//! without) being assigned to a local device. TCP_NODELAY is set on the
//! listener: on Linux the connections it accepts inherit it, which saves a
//! `setsockopt(2)` per connection. TCP keepalive ([`KEEPALIVE`]) is set on
//! the listener for the same reason: accepted connections inherit it.

use std::io;
use std::net::SocketAddr;

use std::time::Duration;

use socket2::{Domain, Socket, TcpKeepalive, Type};
use tokio::net::TcpListener;

/// Accept backlog of each listener.
pub const BACKLOG: i32 = 4096;

/// TCP keepalive of client connections (set on the listener, inherited):
/// after 5 min without traffic, a probe every 30 s, and the connection is
/// declared dead after 4 unanswered probes. A client that vanished without
/// a FIN or reset (a node powered off, a NAT entry expired) so frees its
/// connection's descriptors and permit within about 7 minutes instead of
/// never. Idle but live connections cost one small probe per 5 minutes.
pub const KEEPALIVE: TcpKeepalive = TcpKeepalive::new()
    .with_time(Duration::from_secs(300))
    .with_interval(Duration::from_secs(30))
    .with_retries(4);

/// TCP keepalive of backend connections, set on each dial: the same 5 min
/// idle time, with the kernel's interval and probe count
/// (`net.ipv4.tcp_keepalive_intvl`/`_probes`, 75 s × 9 by default): two
/// `setsockopt(2)` per dial instead of four, and a vanished backend is
/// still found out within about 16 minutes.
pub const BACKEND_KEEPALIVE: TcpKeepalive = TcpKeepalive::new().with_time(Duration::from_secs(300));

/// A socket of type `ty` for `addr`, not bound yet: SO_REUSEADDR,
/// SO_REUSEPORT, IP_FREEBIND (IPv6: v6 only), non-blocking. Shared by the
/// TCP listeners and the UDP Service sockets ([`crate::udp::bind_udp`]).
pub fn shareable_socket(addr: SocketAddr, ty: Type) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), ty, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    match addr {
        SocketAddr::V4(_) => socket.set_freebind_v4(true)?,
        SocketAddr::V6(_) => {
            socket.set_only_v6(true)?;
            socket.set_freebind_v6(true)?;
        }
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Binds a shareable, non-blocking TCP listener on `addr`.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = shareable_socket(addr, Type::STREAM)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(&KEEPALIVE)?;
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
        let sock = socket2::SockRef::from(&s);
        assert!(
            sock.keepalive().unwrap(),
            "accepted socket lost SO_KEEPALIVE"
        );
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(300));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(30)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 4);
    }

    #[tokio::test]
    async fn binds_an_address_not_assigned_here() {
        // 192.0.2.0/24 is TEST-NET-1: never assigned locally. Nothing is
        // sent; IP_FREEBIND only lets the bind succeed.
        let l = bind_tcp("192.0.2.1:0".parse().unwrap()).unwrap();
        assert_eq!(l.local_addr().unwrap().ip().to_string(), "192.0.2.1");
    }
}

//! Listening sockets, built so that two sluice processes can share them.
//!
//! Every listener (Service addresses, the intercept port, the admin
//! endpoints) sets SO_REUSEADDR and SO_REUSEPORT, so a new sluice can
//! bind the same addresses while the old one still drains (in-place
//! upgrade). When the old one closes its listeners, the connections queued
//! on them (handshake done, not yet accepted) move to the new one's
//! listeners if `net.ipv4.tcp_migrate_req` is 1 ([`check_migrate_req`]);
//! with 0 the kernel resets them. Service listeners also set IP_FREEBIND, so a Service IP can be bound before (or
//! without) being assigned to a local device. TCP_NODELAY is set on the
//! listener: on Linux the connections it accepts inherit it, which saves a
//! `setsockopt(2)` per connection. TCP keepalive ([`KEEPALIVE`]) is set on
//! the listener for the same reason: accepted connections inherit it.

use std::io;
use std::net::SocketAddr;

use std::time::Duration;

use socket2::{Domain, Socket, TcpKeepalive, Type};
use tokio::net::TcpListener;

/// The sysctl (per network namespace) that makes a closing listener hand
/// its queued connections to another listener of its SO_REUSEPORT group.
pub const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Checks that `net.ipv4.tcp_migrate_req` is 1 in this network namespace
/// (it covers IPv6 listeners too). sluice does not set it: that is the
/// node's business (the DaemonSet's privileged init container sets it), and
/// a test or a demo run must not change the machine it runs on. `Err`
/// says what is lost without it.
pub fn check_migrate_req() -> Result<(), String> {
    let now = std::fs::read_to_string(MIGRATE_REQ)
        .map_err(|e| format!("cannot read {MIGRATE_REQ}: {e} (kernel older than 5.14?)"))?;
    if now.trim() == "1" {
        return Ok(());
    }
    Err(format!(
        "net.ipv4.tcp_migrate_req is {}, not 1: when an old sluice hands over to a new one \
         (upgrade, restart), the connections queued on the old one's listeners are reset \
         instead of moving to the new one's; set it on the node (the DaemonSet's init \
         container does)",
        now.trim()
    ))
}

/// Whether some socket in this network namespace listens on TCP `port`
/// (any address), from `/proc/net/tcp` and `/proc/net/tcp6`: during an
/// upgrade, the old sluice's intercept listeners. False when neither file
/// can be read.
pub fn port_listened(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .any(|path| std::fs::read_to_string(path).is_ok_and(|text| listens_on(&text, port)))
}

/// `/proc/net/tcp` text has a LISTEN (state `0A`) socket on `port`.
fn listens_on(text: &str, port: u16) -> bool {
    text.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        let (Some(local), Some(_remote), Some(state)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return false;
        };
        state == "0A"
            && local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port)
    })
}

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

/// Binds a shareable, non-blocking TCP listener on `addr`, which need not
/// be a local address (IP_FREEBIND).
pub fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    listen(addr, Kind::Service)
}

/// Binds a shareable, non-blocking TCP listener on `addr`, a local address
/// (the bind fails otherwise): for the admin endpoints, where a typo in
/// the address must be an error rather than a port that never answers. On
/// `[::]` it keeps the system's dual-stack default.
pub fn bind_local_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    listen(addr, Kind::Admin)
}

/// Where a socket is bound.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A Service address or the intercept port: IP_FREEBIND, IPv6 only.
    Service,
    /// An admin endpoint: a local address, the system's IPv6 default.
    Admin,
}

/// A socket of type `ty` for `addr`, not bound yet: SO_REUSEPORT
/// (shareable with a second sluice during a hand-over), SO_REUSEADDR for
/// TCP only (a listener binds over its port's TIME_WAIT connections; on
/// UDP it would let any other socket with SO_REUSEADDR bind the port and
/// take its datagrams, see [`udp_group_socket`]), non-blocking; for
/// [`Kind::Service`] also IP_FREEBIND (IPv6: v6 only). Shared by the TCP
/// listeners and the UDP Service sockets ([`crate::udp::bind_udp`]).
pub fn shareable_socket(addr: SocketAddr, ty: Type, kind: Kind) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), ty, None)?;
    if ty == Type::STREAM {
        socket.set_reuse_address(true)?;
    }
    socket.set_reuse_port(true)?;
    if kind == Kind::Service {
        match addr {
            SocketAddr::V4(_) => socket.set_freebind_v4(true)?,
            SocketAddr::V6(_) => {
                socket.set_only_v6(true)?;
                socket.set_freebind_v6(true)?;
            }
        }
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// A UDP socket for `addr` (a wildcard address and a port: sluice's UDP
/// intercept ports), not bound yet: SO_REUSEPORT so that a new sluice joins
/// the old one's group on the same port during a hand-over (both serve
/// the port until the old one leaves, [`leave_udp_group`]), non-blocking,
/// IPv6 only for IPv6. No SO_REUSEADDR: on a UDP socket it would let any
/// other socket with SO_REUSEADDR bind the port outside the group and take
/// its datagrams; SO_REUSEPORT shares only with sockets of the same user
/// that ask for it too.
pub fn udp_group_socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Takes a UDP socket bound on a wildcard address out of its SO_REUSEPORT
/// group, without closing it: the kernel stops handing it new datagrams
/// (they go to the other sockets of the group: the new sluice) while the
/// datagrams already queued stay readable and `sendmsg` with an explicit
/// source (IP_PKTINFO, as intercepted ports always send) still reaches
/// any address (the replies of flows that are draining; without one the
/// source would be the loopback address the socket is now bound to). How: `connect(2)`
/// to the socket's own port on loopback. The connect rehashes the socket
/// (it gets a local address), which detaches it from the group
/// (`udp_lib_rehash`), and a connected socket only receives datagrams from
/// its peer, here itself, which sends none. Needs `lo` up.
pub fn leave_udp_group(socket: &socket2::SockRef<'_>) -> io::Result<()> {
    let local = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an IP socket"))?;
    let peer: SocketAddr = match local {
        SocketAddr::V4(a) => (std::net::Ipv4Addr::LOCALHOST, a.port()).into(),
        SocketAddr::V6(a) => (std::net::Ipv6Addr::LOCALHOST, a.port()).into(),
    };
    socket.connect(&peer.into())
}

fn listen(addr: SocketAddr, kind: Kind) -> io::Result<TcpListener> {
    let socket = shareable_socket(addr, Type::STREAM, kind)?;
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

    #[test]
    fn listening_ports_are_read_from_proc_net_tcp() {
        let text = "  sl  local_address rem_address   st tx_queue\n\
            0: 00000000:280D 00000000:0000 0A 00000000:00000000\n\
            1: 0100007F:1F90 0100007F:E8C4 01 00000000:00000000\n";
        assert!(listens_on(text, 10253));
        assert!(!listens_on(text, 8080), "established, not listening");
        assert!(!listens_on(text, 10261));
        assert!(!listens_on("garbage\nx y\n", 1));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_live_listener_is_seen() {
        let l = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(port_listened(port));
        drop(l);
        assert!(!port_listened(port));
    }

    #[tokio::test]
    async fn a_local_listener_refuses_an_address_not_assigned_here() {
        assert!(bind_local_tcp("192.0.2.1:0".parse().unwrap()).is_err());
        let a = bind_local_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = bind_local_tcp(a.local_addr().unwrap()).unwrap();
        assert_eq!(a.local_addr().unwrap(), b.local_addr().unwrap());
    }

    /// A socket that left its group gets no new datagram (the other one
    /// gets them all), still reads what was queued before, and still sends
    /// to any address.
    #[test]
    fn a_udp_socket_that_leaves_its_group_stops_receiving_but_sends() {
        let bind = |port: u16| {
            let s = udp_group_socket(SocketAddr::from(([0, 0, 0, 0], port))).unwrap();
            s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
                .unwrap();
            std::net::UdpSocket::from(s)
        };
        let old = bind(0);
        let port = old.local_addr().unwrap().port();
        let new = bind(port);
        let to = SocketAddr::from(([127, 0, 0, 1], port));
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"queued", to).unwrap();
        // Wherever it landed, read it there later.
        std::thread::sleep(Duration::from_millis(50));
        leave_udp_group(&socket2::SockRef::from(&old)).unwrap();
        old.set_nonblocking(true).unwrap();
        new.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 16];
        let queued = [old.recv_from(&mut buf).ok(), new.recv_from(&mut buf).ok()];
        assert_eq!(queued.iter().flatten().count(), 1, "{queued:?}");
        // 64 new senders (64 hashes): every datagram reaches the new socket.
        for _ in 0..64 {
            let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            c.send_to(b"new", to).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        let mut got = 0;
        while new.recv_from(&mut buf).is_ok() {
            got += 1;
        }
        assert_eq!(got, 64);
        assert!(
            old.recv_from(&mut buf).is_err(),
            "the old socket still receives"
        );
        old.send_to(b"reply", client.local_addr().unwrap()).unwrap();
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from.port()), (&b"reply"[..], port));
    }

    #[tokio::test]
    async fn binds_an_address_not_assigned_here() {
        // 192.0.2.0/24 is TEST-NET-1: never assigned locally. Nothing is
        // sent; IP_FREEBIND only lets the bind succeed.
        let l = bind_tcp("192.0.2.1:0".parse().unwrap()).unwrap();
        assert_eq!(l.local_addr().unwrap().ip().to_string(), "192.0.2.1");
    }
}

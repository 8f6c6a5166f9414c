//! Dialing backends: the one place sluice opens a connection to a backend.
//!
//! [`dial`] takes an optional source address so that a transparent mode
//! (preserving the client's IP) can bind it here without touching callers.
//! Failures are classified into the kinds an operator sees in rollouts
//! ([`DialErrorKind`]): refused (process gone, namespace alive), unreachable
//! (`No route to host` after ARP gave up), timeout (the black hole while the
//! node still has an ARP entry for a vanished pod), local (sluice itself
//! ran out of descriptors, buffers, memory or source ports: never the
//! backend's fault, so it never ejects one), other.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Why a dial failed, as counted and logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DialErrorKind {
    Refused,
    Unreachable,
    Timeout,
    /// A local resource ran out (EMFILE, ENFILE, ENOBUFS, ENOMEM,
    /// EADDRNOTAVAIL): sluice's own saturation.
    Local,
    Other,
}

impl DialErrorKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            DialErrorKind::Refused => "refused",
            DialErrorKind::Unreachable => "unreachable",
            DialErrorKind::Timeout => "timeout",
            DialErrorKind::Local => "local",
            DialErrorKind::Other => "other",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("dial {backend}: {}: {source}", kind.as_str())]
pub struct DialError {
    pub backend: SocketAddr,
    pub kind: DialErrorKind,
    #[source]
    pub source: io::Error,
}

fn classify(e: &io::Error) -> DialErrorKind {
    if crate::saturation::local_resource(e).is_some() {
        return DialErrorKind::Local;
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => DialErrorKind::Refused,
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            DialErrorKind::Unreachable
        }
        io::ErrorKind::TimedOut => DialErrorKind::Timeout,
        _ => DialErrorKind::Other,
    }
}

/// The connect timeout of a dial to `addr` for one client connection that
/// has already tried `tried`.
///
/// `short` (`--connect-timeout`) while the connection has another chance:
/// attempts left and another eligible, untried backend that is not ejected,
/// so that a vanished pod (SYNs into a black hole) costs the client one
/// short wait and a retry. On the **last** chance `long`
/// (`--last-connect-timeout`): a SYN dropped by a busy backend's full accept
/// queue is resent by the kernel after 1 s, and giving up at `short` would
/// reset a client that kube-proxy's DNAT would only have delayed.
pub fn attempt_timeout<H: crate::balance::Health>(
    service: &sluice_control::Service,
    addr: SocketAddr,
    tried: &[SocketAddr],
    max_attempts: usize,
    health: &H,
    now: std::time::Instant,
    (short, long): (Duration, Duration),
) -> Duration {
    let another = tried.len() + 1 < max_attempts
        && service
            .eligible_iter()
            .any(|b| b.addr != addr && !tried.contains(&b.addr) && !health.is_ejected(b.addr, now));
    if another { short } else { long.max(short) }
}

/// The address a dial is bound to before it connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind {
    pub addr: SocketAddr,
    /// `IP_TRANSPARENT` / `IPV6_TRANSPARENT` first: `addr` may be an
    /// address of no local interface (the client's, see
    /// [`crate::source_ip`]); needs CAP_NET_ADMIN (or CAP_NET_RAW).
    pub transparent: bool,
}

impl Bind {
    /// A transparent bind to `ip`, any free port.
    pub fn transparent(ip: std::net::IpAddr) -> Self {
        Self {
            addr: SocketAddr::new(ip, 0),
            transparent: true,
        }
    }
}

impl From<SocketAddr> for Bind {
    /// An ordinary bind to a local address.
    fn from(addr: SocketAddr) -> Self {
        Self {
            addr,
            transparent: false,
        }
    }
}

/// Binds `socket` as `bind` asks (transparent: the option first).
fn bind_source(socket: &Socket, bind: Bind) -> io::Result<()> {
    if bind.transparent {
        match bind.addr {
            SocketAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
            SocketAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
        }
    }
    socket.bind(&bind.addr.into())
}

/// Opens a TCP connection to `backend` within `timeout`, optionally from
/// `source` (bound before connecting; a [`SocketAddr`] converts into an
/// ordinary bind, [`Bind::transparent`] binds the client's address).
pub async fn dial(
    backend: SocketAddr,
    source: Option<Bind>,
    timeout: Duration,
) -> Result<TcpStream, DialError> {
    let fail = |source: io::Error| DialError {
        backend,
        kind: classify(&source),
        source,
    };
    // Non-blocking from the start on Linux: two fcntl(2) fewer per dial.
    #[cfg(target_os = "linux")]
    let socket = Socket::new(
        Domain::for_address(backend),
        Type::STREAM.nonblocking(),
        None,
    )
    .map_err(fail)?;
    #[cfg(not(target_os = "linux"))]
    let socket = Socket::new(Domain::for_address(backend), Type::STREAM, None).map_err(fail)?;
    #[cfg(not(target_os = "linux"))]
    socket.set_nonblocking(true).map_err(fail)?;
    socket.set_tcp_nodelay(true).map_err(fail)?;
    socket
        .set_tcp_keepalive(&crate::listener::BACKEND_KEEPALIVE)
        .map_err(fail)?;
    if let Some(bind) = source {
        bind_source(&socket, bind).map_err(fail)?;
    }
    match tokio::time::timeout(timeout, connect(socket, backend)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(fail(e)),
        Err(_) => Err(DialError {
            backend,
            kind: DialErrorKind::Timeout,
            source: io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            ),
        }),
    }
}

/// Starts a non-blocking connect and waits for its outcome.
///
/// Unlike tokio's own connect, a success costs no `getsockopt(SO_ERROR)`:
/// a connect that completed reports writability alone, one that failed
/// also reports an error or a hang-up, and only then is the socket asked
/// why. (A connection reset right after its handshake reads as a failed
/// dial too, and is retried like one.)
async fn connect(socket: Socket, backend: SocketAddr) -> io::Result<TcpStream> {
    match socket.connect(&backend.into()) {
        Ok(()) => {}
        #[cfg(unix)]
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        #[cfg(not(unix))]
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream.take_error()?.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed while connecting",
            )
        }));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refused_is_classified() {
        // Bind then drop to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = dial(
            SocketAddr::from(([127, 0, 0, 1], port)),
            None,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind, DialErrorKind::Refused);
        assert!(err.to_string().contains("refused"), "{err}");
    }

    /// Backends listed are ejected.
    struct Ejected(Vec<SocketAddr>);

    impl crate::balance::Health for Ejected {
        fn active(&self, _: SocketAddr) -> usize {
            0
        }
        fn is_ejected(&self, addr: SocketAddr, _: std::time::Instant) -> bool {
            self.0.contains(&addr)
        }
    }

    #[test]
    fn the_last_chance_waits_for_the_kernel_s_syn_resends() {
        use sluice_control::{Backend, Conditions, Policy, Service};
        let a: Vec<SocketAddr> = (1..=3)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect();
        let svc = |n: usize| {
            Service::new(
                "s",
                Policy::RoundRobin,
                None,
                a[..n]
                    .iter()
                    .map(|x| Backend::new(*x, Conditions::READY))
                    .collect(),
            )
        };
        let (short, long) = (Duration::from_millis(300), Duration::from_millis(3500));
        let now = std::time::Instant::now();
        let t = |service: &Service, tried: &[SocketAddr], max, ejected: &[SocketAddr]| {
            attempt_timeout(
                service,
                a[0],
                tried,
                max,
                &Ejected(ejected.to_vec()),
                now,
                (short, long),
            )
        };
        assert_eq!(t(&svc(3), &[], 3, &[]), short, "two others left");
        assert_eq!(t(&svc(1), &[], 3, &[]), long, "the only backend");
        assert_eq!(t(&svc(2), &[a[1]], 3, &[]), long, "the other one tried");
        assert_eq!(t(&svc(3), &[], 3, &a[1..]), long, "the others ejected");
        assert_eq!(t(&svc(3), &[a[1], a[2]], 3, &[]), long, "attempts used up");
        assert_eq!(t(&svc(3), &[], 1, &[]), long, "one attempt only");
        assert_eq!(t(&svc(3), &[a[2]], 3, &[]), short, "a[1] is left");
    }

    #[test]
    fn local_resource_errors_are_classified_local() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EADDRNOTAVAIL,
        ] {
            let e = io::Error::from_raw_os_error(errno);
            assert_eq!(classify(&e), DialErrorKind::Local, "{e}");
        }
        let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(classify(&refused), DialErrorKind::Refused);
    }

    #[tokio::test]
    async fn connects_and_binds_the_source() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let src: SocketAddr = "127.0.0.9:0".parse().unwrap();
        let s = dial(
            l.local_addr().unwrap(),
            Some(src.into()),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        let (_, peer) = l.accept().await.unwrap();
        assert_eq!(peer.ip(), src.ip());
        assert!(
            socket2::SockRef::from(&s).keepalive().unwrap(),
            "keepalive on the backend side"
        );
        assert_eq!(s.local_addr().unwrap().ip(), src.ip());
    }

    /// Root only (CAP_NET_ADMIN): a transparent bind to an address no
    /// interface has, and the option is really set. Skipped otherwise.
    #[tokio::test]
    async fn a_transparent_bind_takes_an_address_of_no_interface() {
        let probe = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        if probe.set_ip_transparent_v4(true).is_err() {
            eprintln!("skipped: IP_TRANSPARENT needs CAP_NET_ADMIN");
            return;
        }
        // Not routed back to us: the connect never completes, but the
        // bind must succeed (a plain bind fails with EADDRNOTAVAIL).
        let foreign: std::net::IpAddr = "198.51.100.77".parse().unwrap();
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let plain = socket.bind(&SocketAddr::new(foreign, 0).into());
        assert!(plain.is_err(), "a plain bind to a foreign address fails");
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        bind_source(&socket, Bind::transparent(foreign)).unwrap();
        assert!(socket.ip_transparent_v4().unwrap());
        let local = socket.local_addr().unwrap().as_socket().unwrap();
        assert_eq!(local.ip(), foreign);
        assert_ne!(local.port(), 0, "a port was chosen");
        let v6 = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
        let foreign6: std::net::IpAddr = "2001:db8::77".parse().unwrap();
        bind_source(&v6, Bind::transparent(foreign6)).unwrap();
        assert!(v6.ip_transparent_v6().unwrap());
    }
}

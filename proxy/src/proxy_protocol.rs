//! PROXY protocol headers sent to backends that ask for them
//! ([`sluice_control::Settings::proxy_protocol`], annotation
//! `sluice.io/proxy-protocol: v2`): the opt-in alternative to the
//! transparent dial for telling a backend who the client is.
//!
//! Version 2 of HAProxy's `proxy-protocol.txt` (section 2.2), what
//! HAProxy's `send-proxy-v2` sends without TLVs: the 12-byte signature,
//! `0x21` (version 2, `PROXY` command), the family and transport byte
//! (`0x11` TCP over IPv4, `0x21` TCP over IPv6), the length of the address
//! block (big-endian), then source address, destination address, source
//! port, destination port, all in network byte order. The source is the
//! client's address and port; the destination is the address the client
//! dialled (the listen key: the Service address, node port address, or in
//! intercept mode the connection's `SO_ORIGINAL_DST`; for a wildcard listen
//! address, the connection's local address).
//!
//! Mixed families: the spec's address block has one family for both
//! addresses. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is sent as the
//! IPv4 address it maps; if one address is then IPv4 and the other IPv6,
//! the IPv4 one is sent mapped and the header is TCP over IPv6, as HAProxy
//! does for its v1 line. sluice's TCP listeners are IPv6-only
//! (`IPV6_V6ONLY`), so a listen key and its clients share a family and this
//! does not happen in practice.
//!
//! The header is written in one `write_all` right after the dial succeeds
//! and before any client byte ([`after_dial`]); a failure there is a failed
//! dial of that backend (ejected and retried elsewhere, like a refused
//! connect). sluice sends no health checks of its own (a backend out of its
//! cool-down is probed by a real client connection, which carries that
//! client's header), so there is no `LOCAL` command to send.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use sluice_control::ProxyProtocol;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::connect::{DialError, DialErrorKind};

/// The 12 bytes every version 2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2 (high nibble), command `PROXY` (low nibble).
const VERSION_2_PROXY: u8 = 0x21;
/// Family `AF_INET` (high nibble), transport `STREAM` (low nibble).
const TCP_OVER_IPV4: u8 = 0x11;
/// Family `AF_INET6`, transport `STREAM`.
const TCP_OVER_IPV6: u8 = 0x21;
/// Signature, version and command, family and transport, length.
const FIXED_LEN: usize = 16;
/// The largest header sluice sends: TCP over IPv6 (2 × 16 + 2 × 2 bytes).
const MAX_LEN: usize = FIXED_LEN + 36;

/// One connection's header, built once per client connection and sent to
/// whichever backend the dial reaches.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Header {
    bytes: [u8; MAX_LEN],
    len: usize,
}

impl Header {
    /// The header of `version` for a connection from `client` to
    /// `destination` (the address the client dialled).
    pub fn new(version: ProxyProtocol, client: SocketAddr, destination: SocketAddr) -> Self {
        match version {
            ProxyProtocol::V2 => Self::v2(client, destination),
        }
    }

    /// The header of `version` for client connection `client` from `peer`
    /// accepted for listen address `listen`: the destination is `listen`,
    /// or when that is a wildcard (a file's `listen: 0.0.0.0:8080`) the
    /// address the client reached (the socket's local address).
    pub fn for_client(
        version: ProxyProtocol,
        client: &TcpStream,
        peer: SocketAddr,
        listen: SocketAddr,
    ) -> Self {
        let destination = match listen.ip().is_unspecified() {
            true => client.local_addr().unwrap_or(listen),
            false => listen,
        };
        Self::new(version, peer, destination)
    }

    /// A version 2 `PROXY` header for a TCP connection from `source` to
    /// `destination` (see the module documentation for mixed families).
    pub fn v2(source: SocketAddr, destination: SocketAddr) -> Self {
        let mut bytes = [0u8; MAX_LEN];
        bytes[..12].copy_from_slice(&SIGNATURE);
        bytes[12] = VERSION_2_PROXY;
        let (src_ip, dst_ip) = (source.ip().to_canonical(), destination.ip().to_canonical());
        let addresses = &mut bytes[FIXED_LEN..];
        let (family, block) = match (src_ip, dst_ip) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                addresses[..4].copy_from_slice(&s.octets());
                addresses[4..8].copy_from_slice(&d.octets());
                (TCP_OVER_IPV4, 8)
            }
            (s, d) => {
                addresses[..16].copy_from_slice(&v6(s).octets());
                addresses[16..32].copy_from_slice(&v6(d).octets());
                (TCP_OVER_IPV6, 32)
            }
        };
        addresses[block..block + 2].copy_from_slice(&source.port().to_be_bytes());
        addresses[block + 2..block + 4].copy_from_slice(&destination.port().to_be_bytes());
        let block = block + 4;
        bytes[13] = family;
        // 12 or 36: fits.
        bytes[14..16].copy_from_slice(&(block as u16).to_be_bytes());
        Self {
            bytes,
            len: FIXED_LEN + block,
        }
    }

    /// The bytes to send, exactly as long as the header.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Header").field(&self.as_bytes()).finish()
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// A dial's outcome (of `backend`) with `header` (if any) written to it first,
/// in one `write_all`, before any client byte. A failed write is a failed
/// dial of that backend (`other`, or `local` for sluice's own resources),
/// so the caller ejects it and retries elsewhere as for a refused connect.
/// The write cannot wait: a new connection's send buffer is empty and the
/// header (at most 52 bytes) fits in it.
pub async fn after_dial(
    backend: SocketAddr,
    dialed: Result<TcpStream, DialError>,
    header: Option<&Header>,
) -> Result<TcpStream, DialError> {
    let (mut stream, header) = match (dialed, header) {
        (Ok(stream), Some(header)) => (stream, header),
        (dialed, None) => return dialed,
        (Err(e), Some(_)) => return Err(e),
    };
    match stream.write_all(header.as_bytes()).await {
        Ok(()) => Ok(stream),
        Err(source) => Err(DialError {
            backend,
            kind: write_failure_kind(&source),
            source: io::Error::new(
                source.kind(),
                format!("sending the PROXY protocol header: {source}"),
            ),
        }),
    }
}

fn write_failure_kind(e: &io::Error) -> DialErrorKind {
    match crate::saturation::local_resource(e) {
        Some(_) => DialErrorKind::Local,
        None => DialErrorKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::connect::dial;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The spec's byte layout, written out by hand: TCP over IPv4.
    #[test]
    fn ipv4_header_has_the_spec_layout() {
        let h = Header::v2(addr("10.244.0.10:51234"), addr("10.96.0.1:80"));
        let mut expected = vec![
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54,
            0x0A, // signature
            0x21, // version 2, PROXY
            0x11, // AF_INET, STREAM
            0x00, 0x0C, // 12 address bytes
        ];
        expected.extend([10, 244, 0, 10]); // source address
        expected.extend([10, 96, 0, 1]); // destination address
        expected.extend([0xC8, 0x22]); // 51234
        expected.extend([0x00, 0x50]); // 80
        assert_eq!(h.as_bytes(), &expected[..]);
        assert_eq!(h.as_bytes().len(), 28);
    }

    /// TCP over IPv6: 36 address bytes, addresses 16-byte aligned.
    #[test]
    fn ipv6_header_has_the_spec_layout() {
        let h = Header::v2(addr("[fd00:244::10]:443"), addr("[fd00:96::1]:8443"));
        let b = h.as_bytes();
        assert_eq!(b.len(), 16 + 36);
        assert_eq!(&b[..12], &SIGNATURE);
        assert_eq!(&b[12..16], &[0x21, 0x21, 0x00, 0x24]);
        let src: Ipv6Addr = "fd00:244::10".parse().unwrap();
        let dst: Ipv6Addr = "fd00:96::1".parse().unwrap();
        assert_eq!(&b[16..32], &src.octets());
        assert_eq!(&b[32..48], &dst.octets());
        assert_eq!(&b[48..52], &[0x01, 0xBB, 0x20, 0xFB]);
    }

    /// An IPv4-mapped address is sent as IPv4; a real mix of families is
    /// sent as TCP over IPv6 with the IPv4 address mapped.
    #[test]
    fn mapped_and_mixed_families() {
        let mapped = Header::v2(
            addr("[::ffff:10.0.0.5]:1000"),
            addr("[::ffff:10.96.0.1]:80"),
        );
        assert_eq!(
            mapped,
            Header::v2(addr("10.0.0.5:1000"), addr("10.96.0.1:80"))
        );
        let mixed = Header::v2(addr("10.0.0.5:1000"), addr("[fd00::1]:80"));
        let b = mixed.as_bytes();
        assert_eq!(b[13], 0x21, "TCP over IPv6");
        let src: Ipv6Addr = "::ffff:10.0.0.5".parse().unwrap();
        assert_eq!(&b[16..32], &src.octets());
        let parsed = ppp::v2::Header::try_from(b).unwrap();
        match parsed.addresses {
            ppp::v2::Addresses::IPv6(a) => {
                assert_eq!(a.source_address, src);
                assert_eq!(
                    a.destination_address,
                    "fd00::1".parse::<Ipv6Addr>().unwrap()
                );
                assert_eq!((a.source_port, a.destination_port), (1000, 80));
            }
            other => panic!("{other:?}"),
        }
    }

    /// Another implementation (the `ppp` crate's parser) reads what we
    /// send as a complete `PROXY` header over TCP with our addresses.
    #[test]
    fn an_independent_parser_reads_it() {
        for (src, dst) in [
            ("192.0.2.1:65535", "198.51.100.7:1"),
            ("[2001:db8::1]:40000", "[2001:db8::2]:80"),
        ] {
            let h = Header::new(ProxyProtocol::V2, addr(src), addr(dst));
            let parsed = ppp::v2::Header::try_from(h.as_bytes()).unwrap();
            assert_eq!(parsed.command, ppp::v2::Command::Proxy);
            assert_eq!(parsed.protocol, ppp::v2::Protocol::Stream);
            assert_eq!(
                parsed.len(),
                h.as_bytes().len(),
                "no trailing bytes, no TLVs"
            );
            let got = match parsed.addresses {
                ppp::v2::Addresses::IPv4(a) => (
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                ),
                ppp::v2::Addresses::IPv6(a) => (
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                ),
                other => panic!("{other:?}"),
            };
            assert_eq!(got, (addr(src), addr(dst)));
        }
    }

    /// What a backend receives on a connection dialled through
    /// [`after_dial`] with `header`, on which `hello` is then written.
    async fn received(header: Option<&Header>) -> Vec<u8> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        let dialed = dial(at, None, Duration::from_secs(1)).await;
        let mut backend = after_dial(at, dialed, header).await.unwrap();
        backend.write_all(b"hello").await.unwrap();
        drop(backend);
        let (mut conn, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).await.unwrap();
        got
    }

    #[tokio::test]
    async fn the_header_comes_before_anything_else() {
        let header = Header::v2(addr("10.1.2.3:4567"), addr("10.96.0.1:80"));
        let got = received(Some(&header)).await;
        assert_eq!(&got[..28], header.as_bytes());
        assert_eq!(&got[28..], b"hello");
        // Without a header, nothing is added.
        assert_eq!(received(None).await, b"hello");
    }

    /// A backend that reset the connection before the header went out: the
    /// write fails and is reported as a failed dial of that backend.
    #[tokio::test]
    async fn a_failed_header_write_is_a_failed_dial() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = l.local_addr().unwrap();
        let mut stream = dial(backend_addr, None, Duration::from_secs(1))
            .await
            .unwrap();
        let (conn, _) = l.accept().await.unwrap();
        // Close with a reset (linger 0) and wait until it has arrived.
        socket2::SockRef::from(&conn)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(conn);
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .unwrap();
        assert!(read.is_err(), "the reset arrived: {read:?}");
        let header = Header::v2(addr("10.1.2.3:4567"), addr("10.96.0.1:80"));
        let err = after_dial(backend_addr, Ok(stream), Some(&header))
            .await
            .unwrap_err();
        assert_eq!(err.kind, DialErrorKind::Other);
        assert!(err.to_string().contains("PROXY protocol header"), "{err}");
    }
}

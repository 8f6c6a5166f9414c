//! One plain HTTP/1.0 GET, for sluice's admin endpoints and other small
//! test servers: no keep-alive, no chunked bodies, bounded in time and size.

use std::io::{Error, ErrorKind};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one GET may take, connect to last byte.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// `GET path` on `addr`: the status code and the body. Refused, reset,
/// timed out or not HTTP: an error naming the address and path.
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let name = |e: Error| Error::new(e.kind(), format!("GET http://{addr}{path}: {e}"));
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        s.take(16 << 20).read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| Error::new(ErrorKind::InvalidData, "no end of headers"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| Error::new(ErrorKind::InvalidData, "no status code"))?;
        Ok((status, body.to_string()))
    };
    match tokio::time::timeout(TIMEOUT, exchange).await {
        Ok(r) => r.map_err(name),
        Err(_) => Err(name(Error::new(ErrorKind::TimedOut, "timed out"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn status_and_body_are_returned_and_refusal_is_named() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = [0u8; 256];
            let n = s.read(&mut req).await.unwrap();
            let req = String::from_utf8_lossy(&req[..n]).to_string();
            s.write_all(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 3\r\n\r\nno\n")
                .await
                .unwrap();
            req
        });
        assert_eq!(get(addr, "/readyz").await.unwrap(), (503, "no\n".into()));
        assert!(
            server
                .await
                .unwrap()
                .starts_with("GET /readyz HTTP/1.0\r\n")
        );
        let err = get(addr, "/x").await.unwrap_err();
        assert!(err.to_string().contains(&format!("{addr}/x")), "{err}");
    }
}

//! A minimal blocking HTTP/1.1 client for the loopback sync endpoints: one
//! request per connection, `Connection: close`. Enough for talking to Envoy
//! on 127.0.0.1 without pulling an async HTTP stack into the sidecar.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

const MAX_RESPONSE: u64 = 1 << 20;

/// `http://127.0.0.1:10001`, `127.0.0.1:10001` → `127.0.0.1:10001`.
pub fn host_port(endpoint: &str) -> Result<String, String> {
    let rest = endpoint
        .strip_prefix("http://")
        .unwrap_or(endpoint)
        .trim_end_matches('/');
    if endpoint.starts_with("https://")
        || rest.is_empty()
        || rest.contains('/')
        || !rest.contains(':')
    {
        return Err(format!(
            "endpoint '{endpoint}' should look like http://127.0.0.1:10001"
        ));
    }
    Ok(rest.to_owned())
}

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Response, String> {
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))?;
    let mut stream =
        TcpStream::connect_timeout(&sock, timeout).map_err(|e| format!("{addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .and_then(|_| stream.write_all(body))
        .map_err(|e| format!("{addr}: {e}"))?;
    // Stop as soon as the response is complete: waiting for EOF would wait
    // out Envoy's delayed-close timeout (1 s) on every request.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(r) = complete_response(&raw) {
            return Ok(r);
        }
        let n = stream.read(&mut buf).map_err(|e| format!("{addr}: {e}"))?;
        if n == 0 || raw.len() as u64 + n as u64 > MAX_RESPONSE {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    parse_response(&raw).ok_or_else(|| format!("{addr}: malformed HTTP response"))
}

/// The response, once `raw` holds all of it (by content-length or a final chunk).
fn complete_response(raw: &[u8]) -> Option<Response> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split])
        .ok()?
        .to_ascii_lowercase();
    let body = &raw[split + 4..];
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(n) if body.len() >= n => parse_response(&raw[..split + 4 + n]),
        Some(_) => None,
        None if head.contains("transfer-encoding: chunked") => {
            dechunk(body).and_then(|_| parse_response(raw))
        }
        None => None,
    }
}

fn parse_response(raw: &[u8]) -> Option<Response> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let body = &raw[split + 4..];
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Some(Response { status, body })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_field = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_field.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_with_or_without_scheme() {
        assert_eq!(
            host_port("http://127.0.0.1:10001/").unwrap(),
            "127.0.0.1:10001"
        );
        assert_eq!(host_port("127.0.0.1:10001").unwrap(), "127.0.0.1:10001");
        assert!(host_port("https://127.0.0.1:10001").is_err());
        assert!(host_port("http://127.0.0.1:10001/path").is_err());
        assert!(host_port("localhost").is_err());
    }

    #[test]
    fn responses_parse_plain_and_chunked() {
        let r = parse_response(b"HTTP/1.1 409 Conflict\r\ncontent-length: 2\r\n\r\nok").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (409, b"ok".as_slice()));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, b"abc");
        assert!(parse_response(b"garbage").is_none());
    }

    #[test]
    fn a_response_is_complete_once_its_body_is_in() {
        assert!(complete_response(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab").is_none());
        let r = complete_response(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcd").unwrap();
        assert_eq!(r.body, b"abcd");
        assert!(complete_response(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n"
        )
        .is_none());
        assert!(complete_response(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        .is_some());
    }
}

//! A small blocking HTTP/1.1 client for the API socket: one request per connection.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// How long a plain request may take.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer accepted.
const MAX_ANSWER: usize = 1 << 20;

/// Decodes a JSON answer.
pub(crate) fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("unexpected answer from the VMM: {e}"))
}

/// Sends one request and returns the body of a 2xx answer; other answers become errors
/// carrying the server's `error` message.
pub(crate) fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let (status, body) = request(sock, method, path, body, timeout)?;
    if (200..300).contains(&status) {
        return Ok(body);
    }
    let msg = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
    Err(format!(
        "{method} {path}: {status} {}: {msg}",
        super::http::reason(status)
    ))
}

/// Sends one HTTP/1.1 request on a fresh connection; returns the status and body.
pub(crate) fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), String> {
    let where_ = || sock.display().to_string();
    let mut stream = UnixStream::connect(sock)
        .map_err(|e| format!("cannot connect to the API socket {}: {e}", where_()))?;
    let io_err = |e: std::io::Error| format!("API socket {}: {e}", where_());
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;

    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    req.push_str("Accept: application/json\r\nConnection: close\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    // A server that answers before reading (503 when it is busy or stopping) may close its
    // end while the request is still being written: read its answer before reporting that.
    let sent = stream.write_all(req.as_bytes());

    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let eof = match stream.read(&mut chunk) {
            Ok(0) => true,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "no answer on {} within {} s",
                    where_(),
                    timeout.as_secs()
                ))
            }
            Err(e) => return Err(io_err(sent.err().unwrap_or(e))),
        };
        if eof && buf.is_empty() {
            if let Err(e) = sent {
                return Err(io_err(e));
            }
        }
        if let Some(done) = parse_response(&buf, eof)? {
            return Ok(done);
        }
        if eof {
            return Err(format!("the VMM closed {} before answering", where_()));
        }
        if buf.len() > MAX_ANSWER {
            return Err(format!("answer on {} too large", where_()));
        }
    }
}

/// Parses an answer; `None` while incomplete. Without `Content-Length` the body runs to EOF.
fn parse_response(buf: &[u8], eof: bool) -> Result<Option<(u16, Vec<u8>)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed answer from the VMM: {e}")),
    };
    let status = resp.code.unwrap_or(0);
    let len = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| {
            std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| "malformed Content-Length in the answer".to_string())
        })
        .transpose()?;
    let rest = &buf[head..];
    match len {
        Some(n) if rest.len() >= n => Ok(Some((status, rest[..n].to_vec()))),
        None if eof || status == 204 => Ok(Some((status, rest.to_vec()))),
        _ => Ok(None),
    }
}

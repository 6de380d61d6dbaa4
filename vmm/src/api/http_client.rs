//! A small blocking HTTP/1.1 client for the API socket: one request per connection, and
//! [`CtlError`], everything that can go wrong in `tide ctl`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::units::fmt_bytes;
use super::MemoryStatus;

/// How long a plain request may take.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer accepted.
const MAX_ANSWER: usize = 1 << 20;

/// What can go wrong in `tide ctl`: reaching the API socket, the exchange on it, the server's
/// answer, or a `resize --wait` that runs out of time. The binary prints it with its causes on
/// one line through [`crate::error_chain`], as it prints a [`crate::Error`] of `tide run`.
///
/// Its own enum rather than a variant of [`crate::Error`]: `tide ctl` is another process that
/// never builds or runs a VM, and no failure of one can happen in the other, so each enum lists
/// only the cases its caller can meet. Every variant is made in this file, where the requests are.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The API socket cannot be connected to (no VM serves it, or no permission).
    #[error("cannot connect to the API socket {}", .0.display())]
    Connect(PathBuf, #[source] io::Error),
    /// Setting up, writing or reading the connection failed.
    #[error("API socket {}", .0.display())]
    Io(PathBuf, #[source] io::Error),
    /// No whole answer came within the request's timeout.
    #[error("no answer on {} within {:.0} s", .socket.display(), .timeout.as_secs_f64())]
    NoAnswer {
        /// The API socket.
        socket: PathBuf,
        /// How long the client waited.
        timeout: Duration,
    },
    /// The VMM closed the connection before a whole answer came.
    #[error("the VMM closed {} before answering", .0.display())]
    Closed(PathBuf),
    /// The answer is larger than the client accepts.
    #[error("answer on {} too large (over {MAX_ANSWER} bytes)", .0.display())]
    TooLarge(PathBuf),
    /// The answer is not HTTP/1.1.
    #[error("malformed answer from the VMM")]
    Http(#[source] httparse::Error),
    /// The answer's `Content-Length` is not a number.
    #[error("malformed Content-Length in the answer")]
    ContentLength,
    /// The server answered with a status other than 2xx.
    #[error("{method} {path}: {status} {}: {message}", super::http::reason(*.status))]
    Status {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
        /// The answer's HTTP status.
        status: u16,
        /// The server's `error` message (the body itself if it has none).
        message: String,
    },
    /// The body is not the JSON expected.
    #[error("unexpected answer from the VMM")]
    Decode(#[source] serde_json::Error),
    /// `resize --wait` ran out of time before the guest plugged the requested size.
    #[error(
        "timed out after {} s: the guest has plugged {} of {}",
        .after.as_secs(),
        fmt_bytes(.last.plugged_size),
        fmt_bytes(.last.requested_size)
    )]
    WaitTimedOut {
        /// How long it waited.
        after: Duration,
        /// The last status seen.
        last: MemoryStatus,
    },
}

/// Decodes a JSON answer.
pub(crate) fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, CtlError> {
    serde_json::from_slice(body).map_err(CtlError::Decode)
}

/// Sends one request and returns the body of a 2xx answer; other answers become
/// [`CtlError::Status`] with the server's `error` message. The whole request (connecting,
/// sending, the whole answer) gets `timeout`.
pub(crate) fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Vec<u8>, CtlError> {
    call_until(sock, method, path, body, deadline_in(timeout))
}

/// `now + timeout`, or far in the future when the clock cannot add it.
pub(crate) fn deadline_in(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

/// [`call`] that must be over by `deadline`.
pub(crate) fn call_until(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    deadline: Instant,
) -> Result<Vec<u8>, CtlError> {
    let (status, body) = request(sock, method, path, body, deadline)?;
    if (200..300).contains(&status) {
        return Ok(body);
    }
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
    Err(CtlError::Status {
        method: method.to_string(),
        path: path.to_string(),
        status,
        message,
    })
}

/// Sends one HTTP/1.1 request on a fresh connection; returns the status and body. Everything
/// (connecting, sending, reading the whole answer) ends by `deadline`, however slowly the server
/// sends: each read waits only for what is left of it.
pub(crate) fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    deadline: Instant,
) -> Result<(u16, Vec<u8>), CtlError> {
    let socket = || sock.to_path_buf();
    let timeout = deadline.saturating_duration_since(Instant::now());
    let no_answer = || CtlError::NoAnswer {
        socket: socket(),
        timeout,
    };
    // What is left until the deadline, never zero (a zero timeout means none).
    let left = || {
        let d = deadline.saturating_duration_since(Instant::now());
        (!d.is_zero()).then_some(d)
    };
    let mut stream = match connect(sock, left().ok_or_else(no_answer)?) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(no_answer()),
        Err(e) => return Err(CtlError::Connect(socket(), e)),
    };
    let io_err = |e: io::Error| CtlError::Io(socket(), e);
    stream
        .set_write_timeout(Some(left().ok_or_else(no_answer)?))
        .map_err(io_err)?;

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
        let Some(rest) = left() else {
            return Err(no_answer());
        };
        stream.set_read_timeout(Some(rest)).map_err(io_err)?;
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
                return Err(no_answer())
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
            return Err(CtlError::Closed(socket()));
        }
        if buf.len() > MAX_ANSWER {
            return Err(CtlError::TooLarge(socket()));
        }
    }
}

/// Connects to the UNIX socket at `path`, waiting at most `timeout` (a listener whose backlog
/// is full makes a plain connect wait for ever): WouldBlock when that passes.
fn connect(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns; closed on drop.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt reads one timeval of the size given. For UNIX sockets the send
    // timeout also bounds connect's wait for room in the listener's backlog.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let addr = super::socket::unix_addr(path)?;
    loop {
        // SAFETY: `addr` is a valid sockaddr_un of the size given; connect only reads it.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if r == 0 {
            // SAFETY: the fd is a connected stream socket we own; ownership moves.
            return Ok(unsafe { UnixStream::from_raw_fd(fd.into_raw_fd()) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Parses an answer; `None` while incomplete. Without `Content-Length` the body runs to EOF.
fn parse_response(buf: &[u8], eof: bool) -> Result<Option<(u16, Vec<u8>)>, CtlError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(CtlError::Http(e)),
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
                .ok_or(CtlError::ContentLength)
        })
        .transpose()?;
    let rest = &buf[head..];
    match len {
        Some(n) if rest.len() >= n => Ok(Some((status, rest[..n].to_vec()))),
        None if eof || status == 204 => Ok(Some((status, rest.to_vec()))),
        _ => Ok(None),
    }
}

//! `tide ctl`: a small blocking client for the API socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::{MemoryStatus, VmInfo};

/// How long a plain request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Length of one long poll while `resize --wait` waits (the progress bar moves between them).
const WAIT_SLICE: Duration = Duration::from_millis(500);
/// Largest answer accepted.
const MAX_ANSWER: usize = 1 << 20;
/// Width of the progress bar, in characters.
const BAR_WIDTH: usize = 20;

/// Arguments of `tide ctl`.
#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// Path of the VM's API socket (`--api-socket` of `tide run`).
    #[arg(long)]
    pub api_socket: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub cmd: CtlCommand,
}

/// `tide ctl` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum CtlCommand {
    /// Show the hotplug memory region.
    Status {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ask the guest to have SIZE of hotplug memory plugged.
    Resize {
        /// Bytes, or with a binary suffix: 512M, 1G, 0 (K, M, G, T, P; optional "iB"/"B").
        #[arg(value_parser = parse_size)]
        size: u64,
        /// Wait until the guest has plugged the requested size (exit status 1 on timeout).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds (default 60; needs --wait).
        #[arg(long, requires = "wait")]
        timeout: Option<u64>,
    },
    /// Show the VM's state.
    Info {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop the VM.
    Shutdown,
}

/// Runs `tide ctl`. Returns the exit status: 0 done, 1 `resize --wait` timed out. Errors are
/// one-line messages.
pub fn run(args: CtlArgs) -> Result<u8, String> {
    let sock = args.api_socket.as_path();
    match args.cmd {
        CtlCommand::Status { json } => {
            println!("{}", status(sock, json)?);
            Ok(0)
        }
        CtlCommand::Info { json } => {
            println!("{}", info(sock, json)?);
            Ok(0)
        }
        CtlCommand::Shutdown => {
            call(sock, "PUT", "/vm/shutdown", None, REQUEST_TIMEOUT)?;
            Ok(0)
        }
        CtlCommand::Resize {
            size,
            wait,
            timeout,
        } => {
            let timeout = timeout.unwrap_or(60);
            let wait = wait.then(|| Duration::from_secs(timeout));
            let mut bar = ProgressBar::default();
            let res = resize(sock, size, wait, &mut |s| bar.show(s));
            bar.finish();
            match res? {
                Waited::Done => Ok(0),
                Waited::TimedOut(s) => {
                    eprintln!(
                        "tide ctl: timed out after {timeout} s: the guest has plugged {} of {}",
                        fmt_bytes(s.plugged_size),
                        fmt_bytes(s.requested_size)
                    );
                    Ok(1)
                }
            }
        }
    }
}

/// How a resize ended.
#[derive(Debug, PartialEq)]
pub(crate) enum Waited {
    /// Requested (and, with a wait, reached).
    Done,
    /// The wait ran out; the last status seen.
    TimedOut(MemoryStatus),
}

/// A long-poll answer.
#[derive(Deserialize)]
struct LongPoll {
    #[serde(flatten)]
    status: MemoryStatus,
    settled: bool,
}

/// `status`: the hotplug region as a table, or the raw JSON.
pub(crate) fn status(sock: &Path, json: bool) -> Result<String, String> {
    let body = call(sock, "GET", "/hotplug/memory", None, REQUEST_TIMEOUT)?;
    if json {
        return Ok(String::from_utf8_lossy(&body).trim().to_string());
    }
    let s: MemoryStatus = decode(&body)?;
    let pct = |n: u64| match s.region_size {
        0 => String::new(),
        r => format!("  ({:.0}% of region)", n as f64 * 100.0 / r as f64),
    };
    Ok([
        ("region", fmt_bytes(s.region_size)),
        ("block size", fmt_bytes(s.block_size)),
        (
            "requested",
            format!("{}{}", fmt_bytes(s.requested_size), pct(s.requested_size)),
        ),
        (
            "plugged",
            format!("{}{}", fmt_bytes(s.plugged_size), pct(s.plugged_size)),
        ),
        ("usable", fmt_bytes(s.usable_region_size)),
        ("resident", fmt_bytes(s.resident_bytes)),
        ("backend", s.backend.clone()),
    ]
    .iter()
    .map(|(k, v)| format!("{k:<12}{v}"))
    .collect::<Vec<_>>()
    .join("\n"))
}

/// `info`: the VM's state as a table, or the raw JSON.
pub(crate) fn info(sock: &Path, json: bool) -> Result<String, String> {
    let body = call(sock, "GET", "/vm", None, REQUEST_TIMEOUT)?;
    if json {
        return Ok(String::from_utf8_lossy(&body).trim().to_string());
    }
    let v: VmInfo = decode(&body)?;
    let mut rows = vec![
        ("state", v.state.clone()),
        ("vcpus", v.vcpus.to_string()),
        ("boot memory", fmt_bytes(v.boot_memory)),
    ];
    if let Some(code) = v.exit_code {
        rows.push(("exit code", code.to_string()));
    }
    if let Some(reason) = &v.exit_reason {
        rows.push(("exit reason", reason.clone()));
    }
    Ok(rows
        .iter()
        .map(|(k, v)| format!("{k:<12}{v}"))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// `resize`: requests `size`; with `wait`, long-polls until the guest has plugged the requested
/// size or `wait` has passed, calling `progress` with every status seen.
pub(crate) fn resize(
    sock: &Path,
    size: u64,
    wait: Option<Duration>,
    progress: &mut dyn FnMut(&MemoryStatus),
) -> Result<Waited, String> {
    let body = format!("{{\"requested_size\":{size}}}");
    call(
        sock,
        "PATCH",
        "/hotplug/memory",
        Some(&body),
        REQUEST_TIMEOUT,
    )?;
    let Some(wait) = wait else {
        return Ok(Waited::Done);
    };
    // A wait too long for the clock is a wait without end.
    let deadline = Instant::now().checked_add(wait);
    loop {
        let left = deadline
            .map_or(WAIT_SLICE, |d| d.saturating_duration_since(Instant::now()))
            .min(WAIT_SLICE);
        let path = format!(
            "/hotplug/memory?wait_for=plugged_size&timeout_ms={}",
            left.as_millis()
        );
        let answer = call(sock, "GET", &path, None, left + REQUEST_TIMEOUT)?;
        let poll: LongPoll = decode(&answer)?;
        progress(&poll.status);
        if poll.settled {
            return Ok(Waited::Done);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(Waited::TimedOut(poll.status));
        }
    }
}

/// Shows `\r[#####     ] 512/1024 MiB` on stderr, progress measured from the first status.
#[derive(Default)]
struct ProgressBar {
    start: Option<u64>,
    shown: bool,
}

impl ProgressBar {
    fn show(&mut self, s: &MemoryStatus) {
        let start = *self.start.get_or_insert(s.plugged_size);
        eprint!("\r{}", progress_line(start, s));
        let _ = std::io::stderr().flush();
        self.shown = true;
    }

    fn finish(&mut self) {
        if self.shown {
            eprintln!();
        }
    }
}

/// The progress line for a wait that started at `start` bytes plugged.
pub(crate) fn progress_line(start: u64, s: &MemoryStatus) -> String {
    let total = start.abs_diff(s.requested_size);
    let left = s.plugged_size.abs_diff(s.requested_size).min(total);
    let filled = if total == 0 {
        BAR_WIDTH
    } else {
        ((total - left) as f64 / total as f64 * BAR_WIDTH as f64).round() as usize
    };
    format!(
        "[{}{}] {}/{} MiB",
        "#".repeat(filled),
        " ".repeat(BAR_WIDTH - filled),
        s.plugged_size >> 20,
        s.requested_size >> 20
    )
}

fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, String> {
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

/// Parses a size with the same parser as `tide run` ([`memory::parse_size`]).
pub fn parse_size(s: &str) -> Result<u64, String> {
    memory::parse_size(s).map_err(|e| e.to_string())
}

/// Formats bytes with a binary unit: `512 MiB`, `1.5 GiB`, `100 B`.
pub fn fmt_bytes(n: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        let u = 1u64 << shift;
        if n >= u {
            return if n.is_multiple_of(u) {
                format!("{} {unit}", n / u)
            } else {
                format!("{:.1} {unit}", n as f64 / u as f64)
            };
        }
    }
    format!("{n} B")
}

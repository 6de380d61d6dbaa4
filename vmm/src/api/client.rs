//! `tide ctl`: the command line of the API client and what each subcommand does.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

pub(crate) use super::http_client::call;
pub use super::http_client::CtlError;
use super::http_client::{decode, REQUEST_TIMEOUT};
#[cfg(test)]
pub(crate) use super::progress::progress_line;
use super::progress::ProgressBar;
pub use super::units::{fmt_bytes, parse_size};
use super::{MemoryStatus, VmInfo};

/// Length of one long poll while `resize --wait` waits (the progress bar moves between them).
const WAIT_SLICE: Duration = Duration::from_millis(500);
/// The longest one long poll of `wait ready` (the server's limit).
const MAX_POLL: Duration = Duration::from_millis(super::server::MAX_WAIT_MS);

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
        /// Wait until the guest has plugged the requested size and, when the guest reports its
        /// own view (the project's guest does), onlined all of it (exit status 1 on timeout).
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
    /// Wait for something in the guest.
    Wait {
        /// What to wait for.
        #[command(subcommand)]
        what: WaitCommand,
    },
    /// Stop the VM.
    Shutdown,
}

/// What `tide ctl wait` waits for.
#[derive(clap::Subcommand, Debug)]
pub enum WaitCommand {
    /// The guest's user space is up (its init reported ready over the guest channel); exit
    /// status 1 on timeout.
    Ready {
        /// How long to wait, in seconds (default 60).
        #[arg(long)]
        timeout: Option<u64>,
    },
}

/// Runs `tide ctl`. A `resize --wait` that runs out of time is [`CtlError::WaitTimedOut`].
pub fn run(args: CtlArgs) -> Result<(), CtlError> {
    let sock = args.api_socket.as_path();
    match args.cmd {
        CtlCommand::Status { json } => {
            println!("{}", status(sock, json)?);
            Ok(())
        }
        CtlCommand::Info { json } => {
            println!("{}", info(sock, json)?);
            Ok(())
        }
        CtlCommand::Wait {
            what: WaitCommand::Ready { timeout },
        } => wait_ready(sock, Duration::from_secs(timeout.unwrap_or(60))),
        CtlCommand::Shutdown => {
            call(sock, "PUT", "/vm/shutdown", None, REQUEST_TIMEOUT)?;
            Ok(())
        }
        CtlCommand::Resize {
            size,
            wait,
            timeout,
        } => {
            let wait = wait.then(|| Duration::from_secs(timeout.unwrap_or(60)));
            // The bar measures from the state before the PATCH: the first long poll may come
            // after the guest already plugged part of the way. A guest that reports its own
            // view is waited for until it has the memory online.
            let (before, wait_for) = match wait {
                Some(_) => {
                    let body = call(sock, "GET", "/hotplug/memory", None, REQUEST_TIMEOUT)?;
                    let s = decode::<MemoryStatus>(&body)?;
                    let wait_for = match s.guest_online_size {
                        Some(_) => WaitFor::Online,
                        None => WaitFor::Plugged,
                    };
                    (s.plugged_size, wait_for)
                }
                None => (0, WaitFor::Plugged),
            };
            let mut bar = ProgressBar::new(before);
            let res = resize_until(sock, size, wait, wait_for, &mut |s| bar.show(s));
            bar.finish();
            res
        }
    }
}

/// What `resize --wait` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitFor {
    /// The device plugged the requested size (`wait_for=plugged_size`).
    Plugged,
    /// That, and the guest reports all of it online (`wait_for=online`).
    Online,
}

/// A long-poll answer.
#[derive(Deserialize)]
struct LongPoll {
    #[serde(flatten)]
    status: MemoryStatus,
    settled: bool,
}

/// `status`: the hotplug region as a table, or the raw JSON.
pub(crate) fn status(sock: &Path, json: bool) -> Result<String, CtlError> {
    let body = call(sock, "GET", "/hotplug/memory", None, REQUEST_TIMEOUT)?;
    if json {
        return Ok(String::from_utf8_lossy(&body).trim().to_string());
    }
    let s: MemoryStatus = decode(&body)?;
    let online = match s.guest_online_size {
        Some(n) => format!("{}  (the guest's own view)", fmt_bytes(n)),
        None => "unknown (the guest does not report)".into(),
    };
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
        ("online", online),
        (
            "driver",
            s.driver.as_ref().map_or("unknown".into(), driver_line),
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

/// The driver's row of `status`: its summary, when it last sent a request, its last ERROR.
fn driver_line(d: &super::DriverStatus) -> String {
    let mut line = d.summary.clone();
    if let Some(ms) = d.last_request_ms_ago {
        line.push_str(&format!(", last request {:.1} s ago", ms as f64 / 1e3));
    }
    if let Some(e) = &d.last_error {
        let req = e
            .request
            .as_ref()
            .map_or("a malformed request".into(), |r| {
                format!("{} of {} blocks at {:#x}", r.kind, r.nb_blocks, r.addr)
            });
        line.push_str(&format!("; last ERROR: {req}: {}", e.reason));
    }
    line
}

/// `info`: the VM's state as a table, or the raw JSON.
pub(crate) fn info(sock: &Path, json: bool) -> Result<String, CtlError> {
    let body = call(sock, "GET", "/vm", None, REQUEST_TIMEOUT)?;
    if json {
        return Ok(String::from_utf8_lossy(&body).trim().to_string());
    }
    let v: VmInfo = decode(&body)?;
    let mut rows = vec![
        ("state", v.state.clone()),
        ("vcpus", v.vcpus.to_string()),
        ("boot memory", fmt_bytes(v.boot_memory)),
        (
            "guest ready",
            if v.guest_ready { "yes" } else { "no" }.into(),
        ),
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
/// size ([`CtlError::WaitTimedOut`] once `wait` has passed), calling `progress` with every
/// status seen.
#[cfg(test)]
pub(crate) fn resize(
    sock: &Path,
    size: u64,
    wait: Option<Duration>,
    progress: &mut dyn FnMut(&MemoryStatus),
) -> Result<(), CtlError> {
    resize_until(sock, size, wait, WaitFor::Plugged, progress)
}

/// `resize`: requests `size`; with `wait`, long-polls until `wait_for` happened
/// ([`CtlError::WaitTimedOut`] once `wait` has passed), calling `progress` with every status
/// seen.
pub(crate) fn resize_until(
    sock: &Path,
    size: u64,
    wait: Option<Duration>,
    wait_for: WaitFor,
    progress: &mut dyn FnMut(&MemoryStatus),
) -> Result<(), CtlError> {
    let body = format!("{{\"requested_size\":{size}}}");
    call(
        sock,
        "PATCH",
        "/hotplug/memory",
        Some(&body),
        REQUEST_TIMEOUT,
    )?;
    let Some(wait) = wait else {
        return Ok(());
    };
    let wait_for = match wait_for {
        WaitFor::Plugged => "plugged_size",
        WaitFor::Online => "online",
    };
    // A wait too long for the clock is a wait without end.
    let deadline = Instant::now().checked_add(wait);
    loop {
        let left = deadline
            .map_or(WAIT_SLICE, |d| d.saturating_duration_since(Instant::now()))
            .min(WAIT_SLICE);
        let path = format!(
            "/hotplug/memory?wait_for={wait_for}&timeout_ms={}",
            left.as_millis()
        );
        let answer = call(sock, "GET", &path, None, left + REQUEST_TIMEOUT)?;
        let poll: LongPoll = decode(&answer)?;
        progress(&poll.status);
        if poll.settled {
            return Ok(());
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(CtlError::WaitTimedOut {
                after: wait,
                last: Box::new(poll.status),
            });
        }
    }
}

/// A `GET /vm?wait_for=guest_ready` answer.
#[derive(Deserialize)]
struct ReadyPoll {
    settled: bool,
}

/// `wait ready`: long-polls until the guest's user space said it is ready
/// ([`CtlError::ReadyTimedOut`] after `wait`).
pub(crate) fn wait_ready(sock: &Path, wait: Duration) -> Result<(), CtlError> {
    let deadline = Instant::now().checked_add(wait);
    loop {
        // One long poll at most as long as the server allows; the client's deadline decides.
        let left = deadline
            .map_or(MAX_POLL, |d| d.saturating_duration_since(Instant::now()))
            .min(MAX_POLL);
        let path = format!("/vm?wait_for=guest_ready&timeout_ms={}", left.as_millis());
        let answer = call(sock, "GET", &path, None, left + REQUEST_TIMEOUT)?;
        if decode::<ReadyPoll>(&answer)?.settled {
            return Ok(());
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(CtlError::ReadyTimedOut(wait));
        }
    }
}

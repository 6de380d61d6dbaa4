//! `tide ctl`: the command line of the API client and what each subcommand does.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

pub(crate) use super::http_client::call;
pub use super::http_client::CtlError;
use super::http_client::{call_until, deadline_in, decode, REQUEST_TIMEOUT};
#[cfg(test)]
pub(crate) use super::progress::progress_line;
use super::progress::ProgressBar;
pub use super::units::{fmt_bytes, parse_size};
use super::{MemoryStatus, VmInfo};

/// Length of one long poll while `resize --wait` waits (the progress bar moves between them);
/// also the least time between the starts of two long polls, so that a server answering at
/// once cannot make the client spin.
const WAIT_SLICE: Duration = Duration::from_millis(500);
/// How far past its `--timeout` a `resize --wait` may run for a request under way to end
/// (it ends within the timeout plus a second, whatever the server does).
const WAIT_GRACE: Duration = Duration::from_millis(750);

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

/// Runs `tide ctl`. A `resize --wait` that runs out of time is [`CtlError::WaitTimedOut`].
pub fn run(args: CtlArgs) -> Result<(), CtlError> {
    let sock = args.api_socket.as_path();
    match args.cmd {
        CtlCommand::Status { json } => {
            print_out(&status(sock, json)?);
            Ok(())
        }
        CtlCommand::Info { json } => {
            print_out(&info(sock, json)?);
            Ok(())
        }
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
            // One deadline for the whole command, from now.
            let end = wait.map(deadline_in);
            // The bar measures from the state before the PATCH: the first long poll may come
            // after the guest already plugged part of the way.
            let before = match end {
                Some(end) => {
                    let by = request_deadline(Some(end), REQUEST_TIMEOUT);
                    let body = call_until(sock, "GET", "/hotplug/memory", None, by)?;
                    Some(decode::<MemoryStatus>(&body)?)
                }
                None => None,
            };
            let mut bar = ProgressBar::new(before.as_ref().map_or(0, |s| s.plugged_size));
            let res = resize_until(sock, size, wait.zip(end), before, &mut |s| bar.show(s));
            bar.finish();
            res
        }
    }
}

/// Prints `text` and a newline on stdout. A stdout that is closed or full of errors (`| head`
/// that has had enough) is not the request's failure: the output is dropped quietly, and the
/// exit status still says how the request went.
fn print_out(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}").and_then(|()| out.flush());
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
    resize_until(
        sock,
        size,
        wait.map(|w| (w, deadline_in(w))),
        None,
        progress,
    )
}

/// When a request started now must be over: after `timeout`, and, in a wait that ends at
/// `end`, no later than [`WAIT_GRACE`] after it.
fn request_deadline(end: Option<Instant>, timeout: Duration) -> Instant {
    let own = deadline_in(timeout);
    end.map_or(own, |e| own.min(e + WAIT_GRACE))
}

/// [`resize`] whose wait (`wait`, if any) ends at `end`; `before` is the status read before,
/// if any (reported if the wait runs out before a long poll answers).
fn resize_until(
    sock: &Path,
    size: u64,
    wait: Option<(Duration, Instant)>,
    before: Option<MemoryStatus>,
    progress: &mut dyn FnMut(&MemoryStatus),
) -> Result<(), CtlError> {
    let end = wait.map(|(_, end)| end);
    let mut last = before;
    // A request that gets no answer by the end of the wait is the wait running out.
    let timed_out = |e: CtlError, last: &Option<MemoryStatus>| match (e, wait, last) {
        (CtlError::NoAnswer { .. }, Some((after, end)), Some(last)) if Instant::now() >= end => {
            CtlError::WaitTimedOut {
                after,
                last: last.clone(),
            }
        }
        (e, ..) => e,
    };
    let body = format!("{{\"requested_size\":{size}}}");
    let by = request_deadline(end, REQUEST_TIMEOUT);
    call_until(sock, "PATCH", "/hotplug/memory", Some(&body), by)
        .map_err(|e| timed_out(e, &last))?;
    let Some((after, end)) = wait else {
        return Ok(());
    };
    loop {
        let started = Instant::now();
        let left = end.saturating_duration_since(started).min(WAIT_SLICE);
        let path = format!(
            "/hotplug/memory?wait_for=plugged_size&timeout_ms={}",
            left.as_millis()
        );
        let by = request_deadline(Some(end), left + REQUEST_TIMEOUT);
        let answer = call_until(sock, "GET", &path, None, by).map_err(|e| timed_out(e, &last))?;
        let poll: LongPoll = decode(&answer)?;
        progress(&poll.status);
        if poll.settled {
            return Ok(());
        }
        if Instant::now() >= end {
            return Err(CtlError::WaitTimedOut {
                after,
                last: poll.status,
            });
        }
        last = Some(poll.status);
        // An answer before the slice was over (a server that does not wait): pause for the
        // rest of it rather than asking again at once.
        let next = (started + WAIT_SLICE).min(end);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

//! The progress bar of `tide ctl resize --wait`.
//!
//! Hand-written rather than indicatif: one 20-character line on stderr, which a crate and its
//! terminal-handling dependencies would not make shorter or better tested.

use std::io::Write;
use std::time::{Duration, Instant};

use super::MemoryStatus;

/// Width of the progress bar, in characters.
const BAR_WIDTH: usize = 20;

/// Shows `\r[#####     ] 512/1024 MiB  128 MiB/s, 4 s left` on stderr: 512 MiB of a 1024 MiB
/// change done (growth and shrink alike), measured from the plugged size before the resize was
/// asked for.
pub(crate) struct ProgressBar {
    /// Plugged bytes before the PATCH.
    start: u64,
    /// When the PATCH was sent.
    since: Instant,
    shown: bool,
}

impl ProgressBar {
    /// A bar for a resize asked for now, from `start` bytes plugged.
    pub(crate) fn new(start: u64) -> Self {
        ProgressBar {
            start,
            since: Instant::now(),
            shown: false,
        }
    }

    pub(crate) fn show(&mut self, s: &MemoryStatus) {
        let rate = rate_and_time_left(self.start, s, self.since.elapsed());
        // Pad over what a longer previous line left.
        // Errors ignored: a closed stderr only loses the bar.
        let mut err = std::io::stderr().lock();
        let _ =
            write!(err, "\r{}{rate:<24}", progress_line(self.start, s)).and_then(|()| err.flush());
        self.shown = true;
    }

    pub(crate) fn finish(&mut self) {
        if self.shown {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// The change from `start` bytes plugged to `s.requested_size`, as (bytes done, bytes in all):
/// what is left is the distance from `s.plugged_size` to the request, at most the whole change.
fn change(start: u64, s: &MemoryStatus) -> (u64, u64) {
    let total = start.abs_diff(s.requested_size);
    let left = s.plugged_size.abs_diff(s.requested_size).min(total);
    (total - left, total)
}

/// `  128 MiB/s, 4 s left` for a change from `start` bytes plugged that has run `elapsed`;
/// empty until something moved.
pub(crate) fn rate_and_time_left(start: u64, s: &MemoryStatus, elapsed: Duration) -> String {
    let (done, total) = change(start, s);
    let left = total - done;
    let secs = elapsed.as_secs_f64();
    if done == 0 || secs <= 0.0 {
        return String::new();
    }
    let rate = done as f64 / secs;
    let mib_s = rate / (1u64 << 20) as f64;
    if left == 0 {
        return format!("  {mib_s:.0} MiB/s");
    }
    format!("  {mib_s:.0} MiB/s, {:.0} s left", left as f64 / rate)
}

/// The progress line for a wait that started at `start` bytes plugged: the bar and `done/total
/// MiB` of the change.
pub(crate) fn progress_line(start: u64, s: &MemoryStatus) -> String {
    let (done, total) = change(start, s);
    let filled = if total == 0 {
        BAR_WIDTH
    } else {
        (done as f64 / total as f64 * BAR_WIDTH as f64).round() as usize
    };
    format!(
        "[{}{}] {}/{} MiB",
        "#".repeat(filled),
        " ".repeat(BAR_WIDTH - filled),
        done >> 20,
        total >> 20
    )
}

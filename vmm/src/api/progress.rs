//! The progress bar of `tide ctl resize --wait`.

use std::io::Write;

use super::MemoryStatus;

/// Width of the progress bar, in characters.
const BAR_WIDTH: usize = 20;

/// Shows `\r[#####     ] 512/1024 MiB` on stderr, progress measured from the first status.
#[derive(Default)]
pub(crate) struct ProgressBar {
    start: Option<u64>,
    shown: bool,
}

impl ProgressBar {
    pub(crate) fn show(&mut self, s: &MemoryStatus) {
        let start = *self.start.get_or_insert(s.plugged_size);
        eprint!("\r{}", progress_line(start, s));
        let _ = std::io::stderr().flush();
        self.shown = true;
    }

    pub(crate) fn finish(&mut self) {
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

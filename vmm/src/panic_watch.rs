//! Guest kernel panics, seen on the serial console. Tide sees every byte the guest writes to the
//! UART, whether or not anybody reads its stdout, so it reads the lines there: Linux's panic()
//! prints `Kernel panic - not syncing: <why>` first (recorded: the VM's stop after it, a reset
//! with `panic=N` or a halt, becomes a panic), and `---[ end Kernel panic - not syncing: <why> ]---`
//! when it stops for good without rebooting (`panic=0`): then Tide stops the VM at once.
//!
//! A line counts only when the message starts it (after the optional `[ seconds]` time stamp),
//! so a command that prints the phrase inside a line of its own does not fake a panic.

use std::io::{self, Write};
use std::sync::Arc;

use crate::vcpu::RunState;

/// Longest console line kept for matching; the rest of a longer line is ignored.
const MAX_LINE: usize = 512;
const PANIC: &str = "Kernel panic - not syncing: ";
const PANIC_END: &str = "---[ end Kernel panic - not syncing: ";

/// What a console line said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PanicEvent {
    /// The panic line (from `Kernel panic`, time stamp removed).
    Panic(String),
    /// The kernel finished panicking and will not reboot.
    End(String),
}

/// Splits console output into lines and recognises the panic lines, whatever the write sizes.
#[derive(Debug, Default)]
pub struct PanicDetector {
    line: Vec<u8>,
}

impl PanicDetector {
    /// Feeds console bytes; returns what the lines completed by them said.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<PanicEvent> {
        let mut events = Vec::new();
        for &b in bytes {
            match b {
                b'\n' => {
                    if let Some(e) = Self::classify(&self.line) {
                        events.push(e);
                    }
                    self.line.clear();
                }
                b'\r' => {}
                _ if self.line.len() < MAX_LINE => self.line.push(b),
                _ => {}
            }
        }
        events
    }

    fn classify(line: &[u8]) -> Option<PanicEvent> {
        let text = String::from_utf8_lossy(line);
        let mut msg = text.trim_start();
        // "[    1.234567] " from CONFIG_PRINTK_TIME.
        if let Some(rest) = msg.strip_prefix('[') {
            let close = rest.find(']')?;
            msg = rest[close + 1..].trim_start();
        }
        let msg = msg.trim_end();
        if msg.starts_with(PANIC) {
            Some(PanicEvent::Panic(msg.to_string()))
        } else if msg.starts_with(PANIC_END) {
            Some(PanicEvent::End(msg.to_string()))
        } else {
            None
        }
    }
}

/// The UART's output writer: passes every byte on to `inner` (the console) and tells the run
/// state about panics.
pub struct PanicWatch<W: Write> {
    inner: W,
    detector: PanicDetector,
    state: Arc<RunState>,
}

impl<W: Write> PanicWatch<W> {
    /// Watches what is written to `inner` for the VM whose run state is `state`.
    pub fn new(inner: W, state: Arc<RunState>) -> Self {
        Self {
            inner,
            detector: PanicDetector::default(),
            state,
        }
    }
}

impl<W: Write> Write for PanicWatch<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        for event in self.detector.feed(&data[..n]) {
            match event {
                PanicEvent::Panic(line) => self.state.record_panic(line),
                PanicEvent::End(line) => {
                    self.state.record_panic(line);
                    self.state.request_exit(
                        crate::exit_status::GUEST_PANIC,
                        "the guest kernel stopped after its panic",
                    );
                }
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "[    0.912345] Run /init as init process\r\n\
        [    0.913000] Kernel panic - not syncing: No working init found.  Try passing init= option to kernel.\r\n\
        [    0.913100] CPU: 0 UID: 0 PID: 1 Comm: swapper/0 Not tainted 6.12.57 #1\n\
        [    0.914000] ---[ end Kernel panic - not syncing: No working init found.  Try passing init= option to kernel. ]---\n";

    fn expected() -> Vec<PanicEvent> {
        vec![
            PanicEvent::Panic(
                "Kernel panic - not syncing: No working init found.  Try passing init= option to kernel."
                    .into(),
            ),
            PanicEvent::End(
                "---[ end Kernel panic - not syncing: No working init found.  Try passing init= option to kernel. ]---"
                    .into(),
            ),
        ]
    }

    #[test]
    fn finds_the_panic_whatever_the_write_sizes() {
        // One byte at a time (what the UART does), and split at every position.
        let mut d = PanicDetector::default();
        let got: Vec<_> = LOG.bytes().flat_map(|b| d.feed(&[b])).collect();
        assert_eq!(got, expected());
        for cut in 0..LOG.len() {
            let mut d = PanicDetector::default();
            let mut got = d.feed(&LOG.as_bytes()[..cut]);
            got.extend(d.feed(&LOG.as_bytes()[cut..]));
            assert_eq!(got, expected(), "cut at {cut}");
        }
    }

    #[test]
    fn without_a_time_stamp_too_and_not_inside_a_line() {
        let mut d = PanicDetector::default();
        assert_eq!(
            d.feed(b"Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n"),
            vec![PanicEvent::Panic(
                "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100".into()
            )]
        );
        assert!(d
            .feed(b"echo 'Kernel panic - not syncing: fake'\n[ 1.0] no Kernel panic - not syncing: x\n")
            .is_empty());
    }

    #[test]
    fn a_line_longer_than_kept_neither_grows_nor_matches_later() {
        let mut d = PanicDetector::default();
        let long = vec![b'x'; 100_000];
        assert!(d.feed(&long).is_empty());
        assert!(d.line.len() <= MAX_LINE);
        assert!(d.feed(b"Kernel panic - not syncing: late\n").is_empty());
        assert_eq!(d.feed(b"Kernel panic - not syncing: now\n").len(), 1);
    }

    #[test]
    fn the_watch_records_the_panic_and_stops_at_its_end() {
        let state = Arc::new(RunState::new().unwrap());
        let mut w = PanicWatch::new(Vec::new(), state.clone());
        let (first, second) = LOG.split_at(LOG.find("[    0.914").unwrap());
        w.write_all(first.as_bytes()).unwrap();
        assert!(
            !state.stopping(),
            "recorded, not stopped, before the end line"
        );
        // A reset now (panic=1) is the panic.
        let reset = RunState::new().unwrap();
        reset.record_panic("Kernel panic - not syncing: x".into());
        reset.request_exit(0, "guest reset or powered off through the i8042");
        let e = reset.exit().unwrap();
        assert_eq!(e.code, crate::exit_status::GUEST_PANIC);
        assert!(e.reason.contains("Kernel panic - not syncing: x"), "{e:?}");
        // The end line stops the VM with the first panic line in the reason.
        w.write_all(second.as_bytes()).unwrap();
        let e = state.exit().expect("stopped at the end line");
        assert_eq!(e.code, crate::exit_status::GUEST_PANIC);
        assert!(
            e.reason
                .contains("Kernel panic - not syncing: No working init found."),
            "{e:?}"
        );
        assert_eq!(w.inner, LOG.as_bytes(), "every byte passed on");
    }
}

//! The guest channel: a second 8250 UART (COM2: port 0x2f8, IRQ 3, the guest's `ttyS1`) over
//! which a guest's own init tells the host what it sees: that its user space is ready, and which
//! of its memory blocks Linux has online. The host reads those lines into a [`GuestView`]; it
//! asks for a fresh report by writing a query line into the UART's receive FIFO.
//!
//! The protocol, one line each way (ASCII, `\r` ignored, at most [`MAX_LINE`] bytes):
//!
//! | from | line | meaning |
//! | --- | --- | --- |
//! | guest | `tide-ready` | its user space is up (init is done setting up) |
//! | guest | `tide-online TAG BSIZE ID... .` | memory blocks `ID` (decimal; block `ID` covers guest physical `[ID * BSIZE, (ID + 1) * BSIZE)`, `BSIZE` in hex as Linux's `block_size_bytes` shows it) are online, all others are not; `TAG` is the last query it read (0 before any); the final `.` marks a whole line (user space is up, too) |
//! | host | `TAG` | a query: scan again now and answer with a `tide-online TAG ...` line |
//!
//! A query's tag is a number the host chose (the vmm uses the virtio-mem configuration
//! generation): a report carrying it was scanned after the query was sent. Every other line
//! (the tty's echo of a query, anything else a guest writes) is ignored and counted. The final
//! `.` matters: a guest tty that echoes the query can put the echo (digits and a line end) into
//! a report line it is writing; the pieces then lack the `.` and are ignored, never misread. Everything
//! here is guest input: a line too long, a number out of range, a block size that is not a power
//! of two, each gets a defined answer (the line is ignored), never a panic and never an
//! unbounded allocation.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::legacy::{EventFdTrigger, SerialDevice};

/// Base port of COM2, the guest's `ttyS1`.
pub const COM2_PORT: u64 = 0x2f8;
/// Ports COM2 spans.
pub const COM2_LEN: u64 = 8;
/// ISA IRQ of COM2.
pub const COM2_IRQ: u32 = 3;
/// The longest line the host takes from the guest; a longer one is dropped whole.
pub const MAX_LINE: usize = 16 * 1024;
/// The most online memory blocks one report may name (what fits in [`MAX_LINE`]).
const MAX_IDS: usize = MAX_LINE / 2;

/// The guest's last report of its online memory blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnlineReport {
    /// The query the report answers (the last one the guest read; 0 before any).
    pub tag: u64,
    /// Linux's memory block size in bytes.
    pub block_size: u64,
    /// The online memory blocks, by index (block `i` starts at `i * block_size`), sorted,
    /// without duplicates.
    pub online: Vec<u64>,
}

impl OnlineReport {
    /// Bytes of `plugged` (sorted, non-overlapping `(start, length)` runs of guest physical
    /// memory) that lie in memory blocks this report names online.
    pub fn online_bytes(&self, plugged: &[(u64, u64)]) -> u64 {
        let bs = self.block_size;
        let mut total = 0u64;
        for &(start, len) in plugged {
            let end = start.saturating_add(len);
            // The online blocks that can overlap [start, end).
            let first = self.online.partition_point(|&id| id < start / bs);
            for &id in &self.online[first..] {
                let Some(b_start) = id.checked_mul(bs) else {
                    break;
                };
                if b_start >= end {
                    break;
                }
                let b_end = b_start.saturating_add(bs);
                total += end.min(b_end).saturating_sub(start.max(b_start));
            }
        }
        total
    }
}

#[derive(Debug, Default)]
struct ViewState {
    ready: bool,
    report: Option<OnlineReport>,
    /// Lines ignored (unknown, malformed or too long).
    ignored: u64,
}

/// What the guest told the host over the channel. Shared between the UART (written on the vCPU
/// thread that runs the guest's `out` instructions) and the vmm's API.
#[derive(Debug)]
pub struct GuestView {
    state: Mutex<ViewState>,
    changed: EventFd,
}

impl GuestView {
    /// An empty view: not ready, no report.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            state: Mutex::new(ViewState::default()),
            changed: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, ViewState> {
        // Every update is a plain store: the state stays consistent after a panic.
        memory::lock(&self.state)
    }

    /// Whether the guest said its user space is ready.
    pub fn ready(&self) -> bool {
        self.lock().ready
    }

    /// The guest's last report of its online memory blocks; `None` before its first.
    pub fn report(&self) -> Option<OnlineReport> {
        self.lock().report.clone()
    }

    /// The tag of the guest's last report, without copying it.
    pub fn report_tag(&self) -> Option<u64> {
        self.lock().report.as_ref().map(|r| r.tag)
    }

    /// Lines of the guest ignored so far.
    pub fn ignored_lines(&self) -> u64 {
        self.lock().ignored
    }

    /// Signalled after every line that changed the view.
    pub fn changed_evt(&self) -> &EventFd {
        &self.changed
    }

    /// Takes one complete line from the guest.
    fn take_line(&self, line: &[u8]) {
        let parsed = std::str::from_utf8(line).ok().and_then(parse_line);
        {
            let mut st = self.lock();
            match parsed {
                Some(Line::Ready) => st.ready = true,
                // A guest that reports has its user space up.
                Some(Line::Online(report)) => {
                    st.ready = true;
                    st.report = Some(report);
                }
                None => {
                    st.ignored += 1;
                    return;
                }
            }
        }
        if let Err(e) = self.changed.write(1) {
            log::warn!("guest channel: cannot signal a change: {e}");
        }
    }

    fn ignore_line(&self) {
        self.lock().ignored += 1;
    }
}

enum Line {
    Ready,
    Online(OnlineReport),
}

fn parse_line(line: &str) -> Option<Line> {
    let mut words = line.split_ascii_whitespace();
    match words.next()? {
        "tide-ready" => words.next().is_none().then_some(Line::Ready),
        "tide-online" => {
            let tag = words.next()?.parse::<u64>().ok()?;
            let block_size = u64::from_str_radix(words.next()?, 16).ok()?;
            if !block_size.is_power_of_two() || block_size < 4096 {
                return None;
            }
            let mut online = Vec::new();
            let mut whole = false;
            for w in words {
                if whole || online.len() >= MAX_IDS {
                    return None;
                }
                if w == "." {
                    whole = true;
                    continue;
                }
                let id = w.parse::<u64>().ok()?;
                // A block past the address space cannot be online.
                id.checked_mul(block_size)?.checked_add(block_size - 1)?;
                online.push(id);
            }
            if !whole {
                return None;
            }
            online.sort_unstable();
            online.dedup();
            Some(Line::Online(OnlineReport {
                tag,
                block_size,
                online,
            }))
        }
        _ => None,
    }
}

/// Collects the UART's output bytes into lines for the [`GuestView`].
struct LineReader {
    view: Arc<GuestView>,
    buf: Vec<u8>,
    /// The current line passed [`MAX_LINE`]: it is dropped up to its end.
    overlong: bool,
}

impl Write for LineReader {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        for &b in bytes {
            match b {
                b'\n' => {
                    if self.overlong {
                        self.view.ignore_line();
                    } else if !self.buf.is_empty() {
                        self.view.take_line(&self.buf);
                    }
                    self.buf.clear();
                    self.overlong = false;
                }
                b'\r' => {}
                _ if self.overlong => {}
                _ if self.buf.len() >= MAX_LINE => {
                    self.overlong = true;
                    self.buf = Vec::new();
                }
                _ => self.buf.push(b),
            }
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The channel's UART on the port-I/O bus.
pub struct GuestChannel {
    serial: SerialDevice,
    view: Arc<GuestView>,
}

impl GuestChannel {
    /// A channel raising its interrupt through `irq`.
    pub fn new(irq: EventFdTrigger) -> io::Result<Self> {
        let view = Arc::new(GuestView::new()?);
        let reader = LineReader {
            view: view.clone(),
            buf: Vec::new(),
            overlong: false,
        };
        Ok(Self {
            serial: SerialDevice::new(irq, Box::new(reader))?,
            view,
        })
    }

    /// What the guest reported.
    pub fn view(&self) -> &Arc<GuestView> {
        &self.view
    }

    /// The interrupt event fd (for an irqfd on [`COM2_IRQ`]).
    pub fn irq_evt(&self) -> &EventFd {
        self.serial.irq_evt()
    }

    /// Asks the guest for a report tagged `tag`. Returns false when the receive FIFO has no
    /// room for the whole query (a guest that does not read the channel): nothing is queued.
    pub fn query(&mut self, tag: u64) -> bool {
        let line = format!("{tag}\n");
        if self.serial.input_room() < line.len() {
            return false;
        }
        self.serial.enqueue_input(line.as_bytes()) == line.len()
    }
}

impl BusDevice for GuestChannel {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.serial.read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.serial.write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel() -> GuestChannel {
        GuestChannel::new(EventFdTrigger::new().unwrap()).unwrap()
    }

    fn send(c: &mut GuestChannel, s: &str) {
        for b in s.bytes() {
            c.write(0, &[b]);
        }
    }

    #[test]
    fn reads_ready_and_online_reports() {
        let mut c = channel();
        let view = c.view().clone();
        assert!(!view.ready());
        assert_eq!(view.report(), None);
        send(&mut c, "tide-ready\r\n");
        assert!(view.ready());
        assert_eq!(view.changed_evt().read().unwrap(), 1);
        // A report alone also says user space is up.
        let mut c2 = channel();
        send(&mut c2, "tide-online 0 8000000 .\n");
        assert!(c2.view().ready());
        send(&mut c, "tide-online 7 8000000 33 0 1 32 1 .\r\n");
        assert_eq!(
            view.report(),
            Some(OnlineReport {
                tag: 7,
                block_size: 128 << 20,
                online: vec![0, 1, 32, 33],
            })
        );
        // No block online is a report too.
        send(&mut c, "tide-online 8 8000000 .\n");
        assert_eq!(view.report().unwrap().online, Vec::<u64>::new());
        assert_eq!(view.report_tag(), Some(8));
        assert_eq!(view.ignored_lines(), 0);
    }

    #[test]
    fn hostile_lines_are_ignored() {
        let mut c = channel();
        let view = c.view().clone();
        send(&mut c, "tide-online 1 8000000 32 .\n");
        let good = view.report();
        for bad in [
            "tide-online\n",
            "tide-online 1 8000000 32\n", // no final dot: a piece of a line
            "tide-online 1 8000000 3 .5\n", // an echo before the line end
            "tide-online 1 8000000 . 3\n", // something after the final dot
            "tide-online x 8000000 1\n",
            "tide-online 1 3000 1\n",     // not a power of two
            "tide-online 1 800 1\n",      // under a page
            "tide-online 1 8000000 -1\n", // not a block index
            "tide-online 1 8000000 99999999999999999\n", // past the address space
            "tide-online 1 zz 1\n",
            "tide-ready now\n",
            "12\n", // the tty's echo of a query
            "\u{7f}\u{1}garbage\n",
        ] {
            send(&mut c, bad);
        }
        c.write(0, &[0xff, 0xfe]);
        send(&mut c, "\n");
        assert_eq!(view.report(), good);
        assert_eq!(view.ignored_lines(), 14);
        // An overlong line is dropped whole, and the next line is read again.
        let long = format!("tide-online 2 8000000 {}.\n", "1 ".repeat(MAX_LINE));
        send(&mut c, &long);
        assert_eq!(view.report(), good);
        assert_eq!(view.ignored_lines(), 15);
        send(&mut c, "tide-online 3 8000000 1 .\n");
        assert_eq!(view.report_tag(), Some(3));
    }

    #[test]
    fn online_bytes_counts_plugged_memory_in_online_blocks() {
        let mib = 1u64 << 20;
        let r = OnlineReport {
            tag: 0,
            block_size: 128 * mib,
            online: vec![0, 32, 33, 35],
        };
        let base = 32 * 128 * mib; // 4 GiB
        assert_eq!(r.online_bytes(&[]), 0);
        // Whole blocks: 32 and 33 online, 34 not.
        assert_eq!(r.online_bytes(&[(base, 384 * mib)]), 256 * mib);
        // Part of a block (sub-block plugs): only what is plugged counts.
        assert_eq!(r.online_bytes(&[(base + 2 * mib, 4 * mib)]), 4 * mib);
        // Several runs, one in block 35.
        assert_eq!(
            r.online_bytes(&[(base, 2 * mib), (base + 3 * 128 * mib, 2 * mib)]),
            4 * mib
        );
        // A run past the end of the address space does not overflow.
        assert_eq!(r.online_bytes(&[(u64::MAX - mib, mib)]), 0);
    }

    #[test]
    fn query_writes_a_line_only_when_it_fits() {
        let mut c = channel();
        assert!(c.query(42));
        let mut b = [0u8];
        let mut got = Vec::new();
        for _ in 0..3 {
            c.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, b"42\n");
        // A guest that never reads: the FIFO fills, later queries are refused whole.
        let mut n = 0;
        while c.query(123_456) {
            n += 1;
            assert!(n < 1000, "the FIFO never filled");
        }
        assert!(!c.query(1_000_000));
    }
}

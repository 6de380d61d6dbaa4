//! Tide's log sink. A thread that logs (a vCPU, the virtio-mem worker, the event loop) never
//! writes to stderr itself: it puts the line into a bounded buffer that a `log-out` thread
//! writes out. When nobody reads stderr (a supervisor that stopped draining the pipe, a stalled
//! `| tee`) the buffer fills and further lines are dropped and counted; when the reader is gone
//! (EPIPE) every line from then on is dropped and counted. Nothing that logs can block on, or
//! panic because of, the host's stderr. Once the reader takes lines again, the count of those
//! dropped is written before the next line.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Bytes of log lines held for a slow reader before lines are dropped.
pub const LOG_BUFFER: usize = 64 * 1024;
/// Longest line kept (longer ones are cut), so that one line cannot take the whole buffer.
const MAX_LINE: usize = 4096;

#[derive(Default)]
struct Buf {
    lines: VecDeque<String>,
    bytes: usize,
    /// Lines dropped because the buffer was full or stderr failed.
    dropped: u64,
    /// `dropped` as of the last "lines dropped" note written.
    reported: u64,
    /// The writer thread is in a `write` with lines taken from `lines`.
    writing: bool,
    /// Stderr failed (closed pipe...): every line from now on is dropped.
    broken: bool,
}

struct Shared {
    buf: Mutex<Buf>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Buf> {
        memory::lock(&self.buf)
    }
}

/// Fd 2 without Rust's stderr lock (a thread blocked in it must not hold a lock anybody else
/// takes).
struct RawStderr(ManuallyDrop<File>);

impl Write for RawStderr {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        (&*self.0).write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A bounded line buffer drained to a writer by its own thread (cheap to clone).
#[derive(Clone)]
pub struct LogSink {
    shared: Arc<Shared>,
}

impl LogSink {
    /// A sink writing to `out` from a `log-out` thread (which may block in `out` for ever: it
    /// is never joined).
    pub fn new(mut out: Box<dyn Write + Send>) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            buf: Mutex::new(Buf::default()),
            cv: Condvar::new(),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("log-out".into())
            .spawn(move || {
                let mut chunk = String::with_capacity(4096);
                loop {
                    let taken;
                    {
                        let mut b = s.lock();
                        b.writing = false;
                        s.cv.notify_all();
                        while b.lines.is_empty() {
                            b = s.cv.wait(b).unwrap_or_else(|e| e.into_inner());
                        }
                        chunk.clear();
                        if b.dropped > b.reported {
                            let n = b.dropped - b.reported;
                            chunk.push_str(&format!(
                                "tide: warn: {n} log lines dropped (stderr was not read in time)\n"
                            ));
                            b.reported = b.dropped;
                        }
                        let mut n = 0;
                        while chunk.len() < 4096 {
                            let Some(l) = b.lines.pop_front() else { break };
                            b.bytes -= l.len();
                            chunk.push_str(&l);
                            n += 1;
                        }
                        taken = n;
                        b.writing = true;
                    }
                    if out
                        .write_all(chunk.as_bytes())
                        .and_then(|()| out.flush())
                        .is_err()
                    {
                        let mut b = s.lock();
                        b.broken = true;
                        b.dropped += taken + b.lines.len() as u64;
                        b.lines.clear();
                        b.bytes = 0;
                        b.writing = false;
                        s.cv.notify_all();
                        return;
                    }
                }
            })?;
        Ok(LogSink { shared })
    }

    /// Queues one line (a newline is added); never blocks on the reader: a line that does not
    /// fit is dropped and counted.
    pub fn push(&self, line: &str) {
        let mut text = String::with_capacity(line.len().min(MAX_LINE) + 1);
        if line.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            text.push_str(&line[..cut]);
            text.push_str("...");
        } else {
            text.push_str(line);
        }
        text.push('\n');
        let mut b = self.shared.lock();
        if b.broken || b.bytes + text.len() > LOG_BUFFER {
            b.dropped += 1;
            return;
        }
        b.bytes += text.len();
        b.lines.push_back(text);
        self.shared.cv.notify_all();
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.shared.lock().dropped
    }

    /// Waits up to `timeout` for the queued lines to be written; true when all of them were
    /// (or the output is gone for good).
    pub fn drain(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        let mut b = self.shared.lock();
        loop {
            if b.broken || (b.lines.is_empty() && !b.writing) {
                return true;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            b = self
                .shared
                .cv
                .wait_timeout(b, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The process's sink on stderr, once [`init`] has run.
static SINK: OnceLock<LogSink> = OnceLock::new();

/// The `log` facade's logger: `tide: level: message` lines into [`SINK`].
///
/// Hand-written rather than env_logger: the one `tide: level: message` format users and tests
/// read, and a sink that never blocks, which env_logger's does not give.
struct Logger;

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            line(&format!(
                "tide: {}: {}",
                r.level().as_str().to_lowercase(),
                r.args()
            ));
        }
    }
    fn flush(&self) {}
}

/// Routes the `log` facade at `level` into a sink on this process's stderr.
pub fn init(level: log::LevelFilter) -> io::Result<()> {
    let sink = LogSink::new(Box::new(RawStderr(ManuallyDrop::new(
        // SAFETY: fd 2 stays open for the life of the process; ManuallyDrop never closes it.
        unsafe { File::from_raw_fd(libc::STDERR_FILENO) },
    ))))?;
    let _ = SINK.set(sink);
    let _ = log::set_logger(&Logger);
    log::set_max_level(level);
    Ok(())
}

/// Writes one line to stderr through the sink ([`init`]), or straight to stderr (errors
/// ignored) before it.
pub fn line(text: &str) {
    match SINK.get() {
        Some(s) => s.push(text),
        None => {
            let _ = writeln!(io::stderr(), "{text}");
        }
    }
}

/// Lines dropped so far by the process's sink.
pub fn dropped() -> u64 {
    SINK.get().map_or(0, LogSink::dropped)
}

/// Waits up to `timeout` for the process's sink to write what it holds; true when it did.
pub fn drain(timeout: Duration) -> bool {
    SINK.get().is_none_or(|s| s.drain(timeout))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A writer that blocks until told to go on, like a stderr nobody reads.
    struct Stuck(Arc<(Mutex<bool>, Condvar)>, mpsc::Sender<Vec<u8>>);

    impl Write for Stuck {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let (m, cv) = &*self.0;
            let mut go = m.lock().unwrap();
            while !*go {
                go = cv.wait(go).unwrap();
            }
            let _ = self.1.send(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A writer whose reader has gone.
    struct Gone;

    impl Write for Gone {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(libc::EPIPE))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_reader_that_never_reads_cannot_block_a_logger_and_the_drop_count_follows() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (tx, rx) = mpsc::channel();
        let sink = LogSink::new(Box::new(Stuck(gate.clone(), tx))).unwrap();
        let lines = 100_000u64;
        for i in 0..lines {
            sink.push(&format!("tide: warn: line {i} of a flood"));
        }
        // All pushed with nobody reading: most were dropped, the rest are bounded.
        let dropped = sink.dropped();
        assert!(dropped > lines / 2, "dropped {dropped}");
        assert!(!sink.drain(Duration::from_millis(50)));
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        assert!(sink.drain(Duration::from_secs(30)));
        let out: Vec<u8> = rx.try_iter().flatten().collect();
        let text = String::from_utf8(out).unwrap();
        let written = text.lines().filter(|l| l.contains("of a flood")).count() as u64;
        assert_eq!(written + dropped, lines);
        assert!(written as usize * 20 <= LOG_BUFFER + 4096, "{written}");
        // The count of what was dropped is in the log once the reader reads again (in one
        // note or more, as the writer took lines while they were being dropped).
        let noted: u64 = text
            .lines()
            .filter_map(|l| l.strip_prefix("tide: warn: "))
            .filter_map(|l| l.strip_suffix(" log lines dropped (stderr was not read in time)"))
            .map(|n| n.parse::<u64>().unwrap())
            .sum();
        assert_eq!(noted, dropped);
    }

    #[test]
    fn a_reader_that_is_gone_drops_and_counts_without_panicking() {
        let sink = LogSink::new(Box::new(Gone)).unwrap();
        sink.push("first");
        assert!(sink.drain(Duration::from_secs(30)));
        for _ in 0..10 {
            sink.push("more");
        }
        assert_eq!(sink.dropped(), 11);
    }
}

//! The guest console's output path. A vCPU writing to the UART never blocks on the host's
//! stdout: bytes go into a bounded buffer that a `console-out` thread writes to stdout. When
//! nobody reads stdout (a paused terminal, a supervisor that stopped draining the pipe) the
//! buffer fills and further guest output is dropped and counted, so neither the guest nor a
//! stop can hang on the console.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Guest output held for a slow reader before bytes are dropped.
pub const CONSOLE_BUFFER: usize = 64 * 1024;

#[derive(Default)]
struct Buf {
    data: VecDeque<u8>,
    /// Bytes dropped because the buffer was full or stdout failed.
    dropped: u64,
    /// The writer thread is in a `write` with bytes taken from `data`.
    writing: bool,
    /// Stdout failed (closed pipe...): everything from now on is dropped.
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

/// Fd 1 without Rust's stdout lock and buffer (a thread blocked in it must not hold the lock
/// that the process's exit takes).
struct RawStdout(ManuallyDrop<File>);

impl Write for RawStdout {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        (&*self.0).write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The writer the UART gets (cheap to clone: all clones share one buffer and thread).
#[derive(Clone)]
pub struct ConsoleOut {
    shared: Arc<Shared>,
}

impl ConsoleOut {
    /// A console writing to this process's stdout from a `console-out` thread.
    pub fn stdout() -> io::Result<Self> {
        Self::new(Box::new(RawStdout(ManuallyDrop::new(
            // SAFETY: fd 1 stays open for the life of the process; ManuallyDrop never closes it.
            unsafe { File::from_raw_fd(libc::STDOUT_FILENO) },
        ))))
    }

    /// A console writing to `out` from a `console-out` thread (which may block in `out`
    /// for ever: it is never joined).
    pub fn new(mut out: Box<dyn Write + Send>) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            buf: Mutex::new(Buf::default()),
            cv: Condvar::new(),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("console-out".into())
            .spawn(move || {
                let mut chunk = Vec::with_capacity(4096);
                loop {
                    {
                        let mut b = s.lock();
                        b.writing = false;
                        s.cv.notify_all();
                        while b.data.is_empty() {
                            b = s.cv.wait(b).unwrap_or_else(|e| e.into_inner());
                        }
                        let n = b.data.len().min(4096);
                        chunk.clear();
                        chunk.extend(b.data.drain(..n));
                        b.writing = true;
                    }
                    if out.write_all(&chunk).and_then(|()| out.flush()).is_err() {
                        let mut b = s.lock();
                        b.broken = true;
                        b.dropped += chunk.len() as u64 + b.data.len() as u64;
                        b.data.clear();
                        b.writing = false;
                        s.cv.notify_all();
                        return;
                    }
                }
            })?;
        Ok(ConsoleOut { shared })
    }

    /// Bytes of guest output dropped so far.
    pub fn dropped(&self) -> u64 {
        self.shared.lock().dropped
    }

    /// Waits up to `timeout` for buffered output to be written; true when all of it was.
    pub fn drain(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        let mut b = self.shared.lock();
        loop {
            if b.broken || (b.data.is_empty() && !b.writing) {
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

impl Write for ConsoleOut {
    /// Never blocks on the reader: takes what fits in the buffer and drops (counts) the rest.
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut b = self.shared.lock();
        let take = if b.broken {
            0
        } else {
            (CONSOLE_BUFFER - b.data.len().min(CONSOLE_BUFFER)).min(data.len())
        };
        b.data.extend(&data[..take]);
        b.dropped += (data.len() - take) as u64;
        if take > 0 {
            self.shared.cv.notify_all();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A writer that blocks until told to go on, like a stdout nobody reads.
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

    #[test]
    fn a_reader_that_never_reads_cannot_block_the_writer() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (tx, rx) = mpsc::channel();
        let mut c = ConsoleOut::new(Box::new(Stuck(gate.clone(), tx))).unwrap();
        let t = Instant::now();
        let line = [b'x'; 1000];
        for _ in 0..1000 {
            assert_eq!(c.write(&line).unwrap(), line.len());
        }
        // 1 MB written without anybody reading, in far less time than any timeout.
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        let dropped = c.dropped();
        assert!(
            dropped >= 1_000_000 - (CONSOLE_BUFFER as u64 + 4096),
            "dropped {dropped}"
        );
        assert!(!c.drain(Duration::from_millis(50)));
        // Once the reader reads again, what was kept comes out in order.
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        assert!(c.drain(Duration::from_secs(10)));
        let got: usize = rx.try_iter().map(|v| v.len()).sum();
        assert_eq!(got as u64 + dropped, 1_000_000);
    }
}

//! The VMM's event loop (event-manager): console input, guest reset, VM stop, and the API socket.
//! vCPUs run on their own threads and the virtio-mem queue on its worker, so nothing here waits
//! on the guest or on a populate.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::legacy::{SerialDevice, I8042};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::vcpu::RunState;

/// Registers `fd` for input with epoll data `data`; a failure is logged with `what` (the
/// subscriber then misses those events, which its own logic tolerates).
pub(crate) fn watch(ops: &mut EventOps, fd: RawFd, data: u32, what: &str) {
    if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
        log::error!("cannot watch {what}: {e:?}");
    }
}

/// Feeds the host's stdin to the guest's serial port. Reads the stdin fd directly (no buffering
/// in between, so epoll sees every byte that waits), keeps what the receive FIFO cannot take yet,
/// and stops watching stdin until the guest has read the FIFO empty (the UART's drained event):
/// a slow guest neither loses input nor makes this loop spin.
pub struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
    pending: VecDeque<u8>,
    /// Whether stdin is being watched (it is not while `pending` waits for the guest, or after
    /// end of file).
    watching: bool,
    stdin_registered: bool,
    eof: bool,
}

/// How much console input is read from stdin at a time.
const INPUT_CHUNK: usize = 4096;
const STDIN: u32 = 0;
const DRAINED: u32 = 1;

impl ConsoleInput {
    /// Console input for `serial`.
    pub fn new(serial: Arc<Mutex<SerialDevice>>) -> Self {
        Self {
            serial,
            pending: VecDeque::new(),
            watching: false,
            stdin_registered: false,
            eof: false,
        }
    }

    /// Hands the guest as much pending input as its FIFO takes.
    fn deliver(&mut self) {
        let mut serial = lock(&self.serial);
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            let n = serial.enqueue_input(front);
            if n == 0 {
                break;
            }
            self.pending.drain(..n);
        }
    }

    fn read_stdin(&mut self) -> std::io::Result<usize> {
        let mut buf = [0u8; INPUT_CHUNK];
        // SAFETY: `buf` is a valid, writable buffer of `buf.len()` bytes for the whole call, and
        // reading fd 0 touches nothing else of this process.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = n as usize;
        self.pending.extend(&buf[..n]);
        Ok(n)
    }

    /// Watches stdin exactly when there is nothing pending; forgets it once it has ended (a hung
    /// up fd is reported whatever the watched events).
    fn update_watch(&mut self, ops: &mut EventOps) {
        if self.eof {
            if self.watching || self.stdin_registered {
                let _ = ops.remove(Events::empty_raw(libc::STDIN_FILENO));
                self.watching = false;
                self.stdin_registered = false;
            }
            return;
        }
        let want = self.pending.is_empty();
        if want == self.watching {
            return;
        }
        let ev = if want {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        match ops.modify(Events::with_data_raw(libc::STDIN_FILENO, STDIN, ev)) {
            Ok(()) => self.watching = want,
            Err(e) => log::warn!("console input: cannot change the stdin watch: {e:?}"),
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        // A regular file or /dev/null on stdin cannot be polled: then there is no console input.
        match ops.add(Events::with_data_raw(
            libc::STDIN_FILENO,
            STDIN,
            EventSet::IN,
        )) {
            Ok(()) => {
                self.watching = true;
                self.stdin_registered = true;
            }
            Err(e) => {
                log::debug!("no console input: {e:?}");
                return;
            }
        }
        let drained = lock(&self.serial).rx_drained_evt().as_raw_fd();
        watch(ops, drained, DRAINED, "the serial receive FIFO");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            DRAINED => {
                let _ = lock(&self.serial).rx_drained_evt().read();
            }
            _ => match self.read_stdin() {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("console input ends: {e}");
                    self.eof = true;
                }
            },
        }
        self.deliver();
        self.update_watch(ops);
    }
}

/// What stops the VM: the guest resetting through the i8042, a signal, or any stop request.
pub struct StopSources {
    /// The i8042 whose reset fd is watched.
    pub i8042: Arc<Mutex<I8042>>,
    /// The VM's run state.
    pub state: Arc<RunState>,
    /// Set by SIGTERM, SIGINT or SIGHUP once [`crate::signals::install`] has run.
    pub signals: Option<&'static EventFd>,
}

const RESET: u32 = 1;
const STOP: u32 = 2;
const SIGNAL: u32 = 3;

impl MutEventSubscriber for StopSources {
    fn init(&mut self, ops: &mut EventOps) {
        let reset: RawFd = lock(&self.i8042).reset_evt().as_raw_fd();
        watch(ops, reset, RESET, "the guest's reset");
        watch(ops, self.state.evt().as_raw_fd(), STOP, "VM stops");
        if let Some(evt) = self.signals {
            watch(ops, evt.as_raw_fd(), SIGNAL, "stop signals");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            RESET => {
                let _ = lock(&self.i8042).reset_evt().read();
                self.state
                    .request_exit(0, "guest reset or powered off through the i8042");
            }
            SIGNAL => {
                if let Some(evt) = self.signals {
                    let _ = evt.read();
                }
                let sig = crate::signals::received().unwrap_or(libc::SIGTERM);
                self.state.request_exit(
                    crate::signals::exit_code(sig),
                    format!("stopped by {}", crate::signals::name(sig)),
                );
            }
            _ => {
                let _ = self.state.evt().read();
            }
        }
    }
}

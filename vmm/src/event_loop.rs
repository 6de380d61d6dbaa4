//! The VMM's event loop (event-manager): console input, guest reset, VM stop, and the API socket.
//! vCPUs run on their own threads and the virtio-mem queue on its worker, so nothing here waits
//! on the guest or on a populate.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::legacy::{SerialDevice, I8042};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::vcpu::RunState;

/// Feeds the host's stdin to the guest's serial port.
pub struct ConsoleInput {
    /// The UART.
    pub serial: Arc<Mutex<SerialDevice>>,
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        // A regular file or /dev/null on stdin cannot be polled: then there is no console input.
        if let Err(e) = ops.add(Events::new_raw(libc::STDIN_FILENO, EventSet::IN)) {
            log::debug!("no console input: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut serial = lock(&self.serial);
        let room = serial.input_room();
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        let closed = events
            .event_set()
            .intersects(EventSet::HANG_UP | EventSet::ERROR);
        if want == 0 && !closed {
            return; // the guest has not drained the FIFO yet: try on the next event
        }
        match std::io::stdin().lock().read(&mut buf[..want.max(1)]) {
            Ok(0) | Err(_) => {
                let _ = ops.remove(events);
            }
            Ok(n) => {
                serial.enqueue_input(&buf[..n]);
            }
        }
    }
}

/// Stops the VM when the guest resets through the i8042, or when anything requested a stop.
pub struct StopWatch {
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

impl MutEventSubscriber for StopWatch {
    fn init(&mut self, ops: &mut EventOps) {
        let reset: RawFd = lock(&self.i8042).reset_evt().as_raw_fd();
        for (fd, data) in [(reset, RESET), (self.state.evt().as_raw_fd(), STOP)] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                log::error!("cannot watch for VM stops: {e:?}");
            }
        }
        if let Some(evt) = self.signals {
            if let Err(e) = ops.add(Events::with_data(evt, SIGNAL, EventSet::IN)) {
                log::error!("cannot watch for stop signals: {e:?}");
            }
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

//! Legacy PC devices: the 8250 UART on port 0x3f8 (vm-superio's, fitted here to the [`BusDevice`]
//! trait) and the i8042 controller whose CPU-reset command ends the VM ([`I8042`], our own: Linux
//! probes more of it than vm-superio answers). Both signal event fds: the vmm turns the serial's
//! fd into an irqfd on IRQ 4 and watches the i8042's fd to stop the VM. And the debug-exit port
//! 0xf4 ([`DebugExit`]) through which a guest sets the VMM's exit status.

use std::io::{self, Write};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

mod debug_exit;
mod i8042;
pub use debug_exit::{DebugExit, OnExit, DEBUG_EXIT_LEN, DEBUG_EXIT_PORT};
pub use i8042::{I8042, KBD_IRQ};

/// Base port of COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// Ports COM1 spans.
pub const COM1_LEN: u64 = 8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;
/// Base port of the i8042 controller.
pub const I8042_PORT: u64 = 0x60;
/// Ports the i8042 spans (data at 0x60, command/status at 0x64).
pub const I8042_LEN: u64 = 5;

/// An [`EventFd`] that vm-superio devices can trigger.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

impl EventFdTrigger {
    /// A new non-blocking event fd.
    pub fn new() -> io::Result<Self> {
        Ok(Self(EventFd::new(libc::EFD_NONBLOCK)?))
    }
}

/// The UART's receive-side events: signals an event fd whenever the guest has read the receive
/// FIFO empty, so the console can hand it the next bytes without polling.
pub struct RxDrained(EventFd);

impl vm_superio::serial::SerialEvents for RxDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            log::warn!("serial: cannot signal a drained receive FIFO: {e}");
        }
    }
}

/// The 8250 UART.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, RxDrained, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// A UART writing guest output to `out` and raising its interrupt through `irq`.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> io::Result<Self> {
        let drained = RxDrained(EventFd::new(libc::EFD_NONBLOCK)?);
        Ok(Self {
            serial: Serial::with_events(irq, drained, out),
        })
    }

    /// Signalled each time the guest has read the receive FIFO empty.
    pub fn rx_drained_evt(&self) -> &EventFd {
        &self.serial.events().0
    }

    /// The interrupt event fd (for an irqfd on [`COM1_IRQ`]).
    pub fn irq_evt(&self) -> &EventFd {
        &self.serial.interrupt_evt().0
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.serial.fifo_capacity().min(input.len());
        match self.serial.enqueue_raw_bytes(&input[..room]) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(off), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), Some(&value)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.serial.write(off, value) {
                log::warn!("serial output failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_writes_out_and_reads_input() {
        let sink = Sink::default();
        let mut s =
            SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(sink.clone())).unwrap();
        s.write(0, b"h");
        s.write(0, &[]); // empty access is ignored
        s.write(1 << 40, b"x"); // absurd offset is ignored
        assert_eq!(&*sink.0.lock().unwrap(), b"h");
        assert_eq!(s.enqueue_input(b"ok"), 2);
        let mut d = [0u8; 1];
        s.read(0, &mut d);
        assert_eq!(d[0], b'o');
        assert!(
            s.rx_drained_evt().read().is_err(),
            "one byte is still queued"
        );
        s.read(0, &mut d);
        assert_eq!(d[0], b'k');
        assert_eq!(s.rx_drained_evt().read().unwrap(), 1);
    }
}

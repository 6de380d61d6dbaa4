//! The saved state of the legacy devices, for snapshots: the UART's registers and receive FIFO
//! ([`SerialState`]) and the i8042's ([`I8042State`], saved by the i8042 itself).

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::Serial;

use super::{EventFdTrigger, RxDrained, SerialDevice};

pub use super::i8042::I8042State;

/// The 8250 UART's registers and the bytes in its receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// The receive FIFO, oldest byte first.
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    /// The UART's state.
    pub fn save_state(&self) -> SerialState {
        let s = self.serial.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Puts the UART into `state`, keeping its interrupt and drained event fds (already
    /// registered) and writing guest output to `out` from now on. Refuses a FIFO longer than
    /// the UART's.
    pub fn restore_state(
        &mut self,
        state: &SerialState,
        out: Box<dyn Write + Send>,
    ) -> io::Result<()> {
        let irq = EventFdTrigger(self.irq_evt().try_clone()?);
        let drained = RxDrained(self.rx_drained_evt().try_clone()?);
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        self.serial = Serial::from_state(&s, irq, drained, out).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("serial state: {e:?}"))
        })?;
        Ok(())
    }
}

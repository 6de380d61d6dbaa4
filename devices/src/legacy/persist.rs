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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::legacy::I8042;

    #[test]
    fn serial_registers_and_fifo_survive_a_restore() {
        let mut s =
            SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(io::sink())).unwrap();
        s.write(3, &[0x83]); // DLAB on
        s.write(0, &[0x0c]); // divisor low
        s.write(3, &[0x03]); // 8N1, DLAB off
        s.write(1, &[0x01]); // receive interrupt on
        s.write(7, &[0x5a]); // scratch
        assert_eq!(s.enqueue_input(b"abc"), 3);
        let saved = s.save_state();
        let saved: SerialState =
            serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
        let mut fresh =
            SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(io::sink())).unwrap();
        assert_ne!(fresh.save_state(), saved);
        fresh.restore_state(&saved, Box::new(io::sink())).unwrap();
        assert_eq!(fresh.save_state(), saved);
        let mut b = [0u8; 1];
        fresh.read(0, &mut b);
        assert_eq!(b[0], b'a');
        // A FIFO longer than the UART's is refused.
        let mut bad = saved.clone();
        bad.in_buffer = vec![0; 1 << 16];
        assert!(fresh.restore_state(&bad, Box::new(io::sink())).is_err());
    }

    #[test]
    fn i8042_state_survives_a_restore() {
        let trig = || EventFdTrigger::new().unwrap();
        let mut k = I8042::new(trig(), trig());
        k.write(4, &[0x60]); // write the configuration byte next
        k.write(0, &[0x45]);
        k.write(4, &[0x20]); // read it back: one byte waits on the data port
        let saved = k.save_state();
        assert_eq!(saved.ctr, 0x45);
        assert_eq!(saved.output, vec![0x45]);
        let mut fresh = I8042::new(trig(), trig());
        fresh.restore_state(&saved).unwrap();
        assert_eq!(fresh.save_state(), saved);
        let mut b = [0u8; 1];
        fresh.read(0, &mut b);
        assert_eq!(b[0], 0x45);
        let mut bad = saved;
        bad.output = vec![0; 4096];
        assert!(fresh.restore_state(&bad).is_err());
    }
}

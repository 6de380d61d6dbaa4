//! The debug-exit port, like QEMU's `isa-debug-exit`: a one-byte write of N to port 0xf4 asks the
//! VMM to end the run with exit status N (plainly N, not QEMU's `(N << 1) | 1`). The device only
//! hands the byte to the callback it was built with, on the vCPU thread of the write, before the
//! guest runs on; the vmm stops the VM there.

use crate::bus::BusDevice;

/// The port.
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
/// Ports it spans.
pub const DEBUG_EXIT_LEN: u64 = 1;

/// What the device does with the byte written.
pub type OnExit = Box<dyn Fn(u8) + Send>;

/// The debug-exit device.
pub struct DebugExit {
    on_exit: OnExit,
}

impl DebugExit {
    /// A device that calls `on_exit` with each byte the guest writes to it.
    pub fn new(on_exit: OnExit) -> Self {
        Self { on_exit }
    }
}

impl BusDevice for DebugExit {
    /// Reads as 0xff, like an unassigned port.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    /// Only a one-byte write at the port counts; wider or misplaced writes are ignored.
    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, &[n]) => (self.on_exit)(n),
            _ => log::debug!(
                "debug-exit: ignored a {}-byte write at offset {offset}",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_one_byte_write_hands_over_the_byte_and_nothing_else_does() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let mut d = DebugExit::new(Box::new(move |n| g.lock().unwrap().push(n)));
        d.write(0, &[7, 0]);
        d.write(0, &[]);
        d.write(1, &[9]);
        d.write(0, &[0, 0, 0, 0]);
        assert!(got.lock().unwrap().is_empty());
        d.write(0, &[42]);
        d.write(0, &[0]);
        assert_eq!(*got.lock().unwrap(), vec![42, 0]);
        let mut r = [0u8; 2];
        d.read(0, &mut r);
        assert_eq!(r, [0xff, 0xff]);
    }
}

//! The saved state of the i8042 controller ([`I8042State`]), for snapshots.

use serde::{Deserialize, Serialize};

use super::{I8042, OUTPUT_CAPACITY};

/// The i8042's registers and output buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// The controller configuration byte.
    pub ctr: u8,
    /// The command waiting for its parameter byte.
    pub pending: Option<u8>,
    /// Whether the last write went to the command port.
    pub last_was_command: bool,
    /// Bytes waiting on the data port, oldest first.
    pub output: Vec<u8>,
}

impl I8042 {
    /// The controller's state.
    pub fn save_state(&self) -> I8042State {
        I8042State {
            ctr: self.ctr,
            pending: self.pending,
            last_was_command: self.last_was_command,
            output: self.output.iter().copied().collect(),
        }
    }

    /// Puts the controller into `state`; refuses an output buffer longer than the controller's.
    pub fn restore_state(&mut self, state: &I8042State) -> Result<(), &'static str> {
        if state.output.len() > OUTPUT_CAPACITY {
            return Err("the i8042 output buffer is longer than the controller's");
        }
        self.ctr = state.ctr;
        self.pending = state.pending;
        self.last_was_command = state.last_was_command;
        self.output = state.output.iter().copied().collect();
        Ok(())
    }
}

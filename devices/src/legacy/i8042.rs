//! The i8042 keyboard controller, as much of it as Linux's `i8042` driver asks for at probe: the
//! controller configuration byte (CTR), the self-tests, port enable/disable, the keyboard
//! loopback, and the CPU-reset command (0xfe) that ends the VM. The AUX (mouse) port reports
//! itself absent; the keyboard port has a keyboard that acknowledges every byte it is sent and
//! never types, its answers raised on IRQ 1 when the guest enabled the keyboard interrupt (Linux's
//! `atkbd` reads them in its interrupt handler).
//!
//! vm-superio's `I8042Device` only handles the reset command and reads every register as 0, which
//! makes Linux log `Can't read CTR while initializing i8042` and fail the probe.

use std::collections::VecDeque;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use crate::bus::BusDevice;

mod persist;
pub use persist::I8042State;

/// Offset of the data port (0x60) from the controller's base port.
const DATA: u64 = 0;
/// Offset of the command/status port (0x64).
const COMMAND: u64 = 4;

/// ISA IRQ of the keyboard.
pub const KBD_IRQ: u32 = 1;

/// Status: the output buffer holds a byte for the host.
const STR_OBF: u8 = 0x01;
/// Status: system flag (set after a passed self-test).
const STR_SYS: u8 = 0x04;
/// Status: the last write went to the command port.
const STR_CMDDAT: u8 = 0x08;
/// "Keyboard not inhibited" (Linux warns "Keylock active" when it is clear).
const STR_KEYLOCK: u8 = 0x10;

/// Configuration: keyboard interrupt (IRQ 1) enabled.
const CTR_KBDINT: u8 = 0x01;
/// Configuration: system flag.
const CTR_SYS: u8 = 0x04;
/// Configuration: keyboard clock disabled.
const CTR_KBDDIS: u8 = 0x10;
/// Configuration: AUX (mouse) clock disabled.
const CTR_AUXDIS: u8 = 0x20;
/// Configuration: scan-code set 2 to set 1 translation.
const CTR_XLATE: u8 = 0x40;

/// Command: read the configuration byte.
const CMD_READ_CTR: u8 = 0x20;
/// Command: write the configuration byte (next data byte).
const CMD_WRITE_CTR: u8 = 0x60;
/// Command: disable the AUX port.
const CMD_AUX_DISABLE: u8 = 0xa7;
/// Command: enable the AUX port.
const CMD_AUX_ENABLE: u8 = 0xa8;
/// Command: test the AUX interface.
const CMD_AUX_TEST: u8 = 0xa9;
/// Command: controller self-test.
const CMD_SELF_TEST: u8 = 0xaa;
/// Command: test the keyboard interface.
const CMD_KBD_TEST: u8 = 0xab;
/// Command: disable the keyboard port.
const CMD_KBD_DISABLE: u8 = 0xad;
/// Command: enable the keyboard port.
const CMD_KBD_ENABLE: u8 = 0xae;
/// Command: write the output port (next data byte; bit 0 clear resets the CPU).
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
/// Command: echo the next data byte as if the keyboard sent it.
const CMD_KBD_LOOP: u8 = 0xd2;
/// Command: echo the next data byte as if the mouse sent it.
const CMD_AUX_LOOP: u8 = 0xd3;
/// Command: send the next data byte to the mouse.
const CMD_AUX_SEND: u8 = 0xd4;
/// Command: pulse the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// Answer to a passed controller self-test.
const SELF_TEST_OK: u8 = 0x55;
/// Answer to a passed interface test.
const PORT_TEST_OK: u8 = 0x00;
/// AUX interface test: "clock line stuck low", i.e. no mouse port.
const AUX_TEST_ABSENT: u8 = 0x01;
const KBD_ACK: u8 = 0xfa;
const KBD_RESET_OK: u8 = 0xaa;
const KBD_CMD_RESET: u8 = 0xff;
const KBD_CMD_GET_ID: u8 = 0xf2;
/// An MF2 keyboard's ID, as it answers KBD_CMD_GET_ID after the ACK.
const KBD_ID: [u8; 2] = [0xab, 0x83];

/// Output buffer bound: the guest reads what it asked for; anything beyond is dropped.
const OUTPUT_CAPACITY: usize = 16;

/// The i8042 controller: answers Linux's probe and signals [`Self::reset_evt`] on the CPU-reset
/// command (or an output-port write that clears the reset line).
pub struct I8042 {
    reset: EventFdTrigger,
    kbd_irq: EventFdTrigger,
    ctr: u8,
    /// The command waiting for its parameter byte on the data port.
    pending: Option<u8>,
    /// Whether the last write went to the command port (status bit 3).
    last_was_command: bool,
    output: VecDeque<u8>,
}

impl I8042 {
    /// A controller signalling `reset` when the guest resets the CPU through it, and `kbd_irq`
    /// (for an irqfd on [`KBD_IRQ`]) when keyboard data is ready.
    pub fn new(reset: EventFdTrigger, kbd_irq: EventFdTrigger) -> Self {
        Self {
            reset,
            kbd_irq,
            // What a BIOS leaves: keyboard interrupt on, translation on, system flag, no mouse.
            ctr: CTR_KBDINT | CTR_SYS | CTR_XLATE | CTR_AUXDIS,
            pending: None,
            last_was_command: false,
            output: VecDeque::new(),
        }
    }

    /// The event fd signalled on a guest reset or power-off request.
    pub fn reset_evt(&self) -> &EventFd {
        &self.reset.0
    }

    /// The keyboard interrupt's event fd.
    pub fn kbd_irq_evt(&self) -> &EventFd {
        &self.kbd_irq.0
    }

    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.output.len() < OUTPUT_CAPACITY {
                self.output.push_back(b);
            }
        }
    }

    /// Queues what the keyboard answers and raises IRQ 1 if the guest enabled it.
    fn keyboard_answer(&mut self, bytes: &[u8]) {
        self.push(bytes);
        self.raise_kbd_irq();
    }

    fn raise_kbd_irq(&self) {
        if self.ctr & CTR_KBDINT != 0 && !self.output.is_empty() {
            if let Err(e) = self.kbd_irq.trigger() {
                log::warn!("i8042 cannot raise IRQ 1: {e}");
            }
        }
    }

    fn trigger_reset(&self) {
        if let Err(e) = self.reset.trigger() {
            log::error!("i8042 cannot signal the reset: {e}");
        }
    }

    fn status(&self) -> u8 {
        let mut s = STR_SYS | STR_KEYLOCK;
        if !self.output.is_empty() {
            s |= STR_OBF;
        }
        if self.last_was_command {
            s |= STR_CMDDAT;
        }
        s
    }

    fn command(&mut self, cmd: u8) {
        self.pending = None;
        match cmd {
            CMD_READ_CTR => self.push(&[self.ctr]),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT | CMD_KBD_LOOP | CMD_AUX_LOOP | CMD_AUX_SEND => {
                self.pending = Some(cmd)
            }
            CMD_AUX_DISABLE => self.ctr |= CTR_AUXDIS,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUXDIS,
            CMD_AUX_TEST => self.push(&[AUX_TEST_ABSENT]),
            CMD_SELF_TEST => self.push(&[SELF_TEST_OK]),
            CMD_KBD_TEST => self.push(&[PORT_TEST_OK]),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBDDIS,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBDDIS,
            CMD_RESET_CPU => self.trigger_reset(),
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = value,
            // Bit 0 of the output port is the CPU reset line (active low).
            Some(CMD_WRITE_OUTPUT_PORT) if value & 1 == 0 => self.trigger_reset(),
            Some(CMD_WRITE_OUTPUT_PORT) => {}
            // Keyboard loopback: the byte comes back as if the keyboard sent it. The AUX loopback
            // echoes it too, but without the AUX flag in the status: no mouse port is there.
            Some(CMD_KBD_LOOP) | Some(CMD_AUX_LOOP) => self.push(&[value]),
            Some(CMD_AUX_SEND) => {}
            _ => match value {
                KBD_CMD_RESET => self.keyboard_answer(&[KBD_ACK, KBD_RESET_OK]),
                KBD_CMD_GET_ID => self.keyboard_answer(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
                _ => self.keyboard_answer(&[KBD_ACK]),
            },
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(first) = data.first_mut() else {
            return;
        };
        *first = match offset {
            DATA => {
                let b = self.output.pop_front().unwrap_or(0);
                // One interrupt per byte, as the real controller raises it for each.
                self.raise_kbd_irq();
                b
            }
            COMMAND => self.status(),
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            DATA => {
                self.last_was_command = false;
                self.data(value);
            }
            COMMAND => {
                self.last_was_command = true;
                self.command(value);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> I8042 {
        I8042::new(
            EventFdTrigger::new().unwrap(),
            EventFdTrigger::new().unwrap(),
        )
    }

    fn read(k: &mut I8042, port: u64) -> u8 {
        let mut d = [0u8; 1];
        k.read(port, &mut d);
        d[0]
    }

    /// Linux's `i8042_command`: waits for OBF, then reads the data port.
    fn answer(k: &mut I8042) -> Option<u8> {
        (read(k, COMMAND) & STR_OBF != 0).then(|| read(k, DATA))
    }

    #[test]
    fn reset_command_signals() {
        let mut k = controller();
        k.write(DATA, &[CMD_RESET_CPU]);
        assert!(k.reset_evt().read().is_err(), "a data byte is no command");
        k.write(COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(k.reset_evt().read().unwrap(), 1);
        k.write(COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        k.write(DATA, &[0xfe]);
        assert_eq!(k.reset_evt().read().unwrap(), 1);
    }

    #[test]
    fn answers_linux_probe() {
        let mut k = controller();
        // i8042_flush: nothing buffered.
        assert_eq!(read(&mut k, COMMAND) & STR_OBF, 0);
        assert_ne!(
            read(&mut k, COMMAND),
            0xff,
            "0xff status means no controller"
        );
        assert_ne!(read(&mut k, COMMAND) & STR_KEYLOCK, 0);
        k.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(answer(&mut k), Some(SELF_TEST_OK));
        // Two equal CTR reads, then a write that sticks.
        k.write(COMMAND, &[CMD_READ_CTR]);
        let ctr = answer(&mut k).unwrap();
        k.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(answer(&mut k), Some(ctr));
        k.write(COMMAND, &[CMD_WRITE_CTR]);
        k.write(DATA, &[(ctr | CTR_KBDDIS) & !CTR_KBDINT]);
        k.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(answer(&mut k), Some((ctr | CTR_KBDDIS) & !CTR_KBDINT));
        // Port enable/disable show in the CTR.
        k.write(COMMAND, &[CMD_KBD_ENABLE]);
        k.write(COMMAND, &[CMD_AUX_ENABLE]);
        k.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(answer(&mut k).unwrap() & (CTR_KBDDIS | CTR_AUXDIS), 0);
        // No mouse: the AUX loopback comes back without the AUX flag, the AUX test fails.
        k.write(COMMAND, &[CMD_AUX_LOOP]);
        k.write(DATA, &[0x5a]);
        assert_eq!(read(&mut k, COMMAND) & 0x20, 0);
        assert_eq!(answer(&mut k), Some(0x5a));
        k.write(COMMAND, &[CMD_AUX_TEST]);
        assert_eq!(answer(&mut k), Some(AUX_TEST_ABSENT));
        k.write(COMMAND, &[CMD_KBD_TEST]);
        assert_eq!(answer(&mut k), Some(PORT_TEST_OK));
        k.write(COMMAND, &[CMD_KBD_LOOP]);
        k.write(DATA, &[0xa5]);
        assert_eq!(answer(&mut k), Some(0xa5));
        // The keyboard acknowledges what it is sent, on IRQ 1 once the guest enables it.
        k.write(DATA, &[0xed]);
        assert!(
            k.kbd_irq_evt().read().is_err(),
            "keyboard interrupt still off"
        );
        assert_eq!(answer(&mut k), Some(KBD_ACK));
        k.write(COMMAND, &[CMD_WRITE_CTR]);
        k.write(DATA, &[ctr | CTR_KBDINT]);
        k.write(DATA, &[KBD_CMD_GET_ID]);
        assert!(k.kbd_irq_evt().read().is_ok());
        assert_eq!(answer(&mut k), Some(KBD_ACK));
        assert_eq!(answer(&mut k), Some(KBD_ID[0]));
        assert_eq!(answer(&mut k), Some(KBD_ID[1]));
        assert_eq!(answer(&mut k), None);
        assert!(k.reset_evt().read().is_err());
    }

    #[test]
    fn hostile_accesses_are_bounded() {
        let mut k = controller();
        for _ in 0..1000 {
            k.write(DATA, &[0x00]);
        }
        assert_eq!(k.output.len(), OUTPUT_CAPACITY);
        k.write(COMMAND, &[]);
        k.write(7, &[CMD_RESET_CPU]);
        let mut empty = [0u8; 0];
        k.read(DATA, &mut empty);
        assert_eq!(read(&mut k, 2), 0xff);
        assert!(k.reset_evt().read().is_err());
    }
}

//! `tide run`'s exit status contract: what each status means, in one table that `tide run --help`
//! prints and docs/ci.md repeats word for word (a test checks both).
//!
//! The codes Tide chooses itself sit where a command's own status rarely is: 124 and 125 as
//! coreutils' `timeout` uses them, 128 + N as shells report a signal, and 252 to 255 at the top
//! (255 for a panic, as virtme-ng). A command's or a debug-exit write's own status is passed on as
//! it is, so a command that itself exits 124 or 255 reads like those rows: the console (and the
//! line Tide prints on stderr for each of its own codes) tells them apart.

/// The guest powered off or reset on its own, or the command succeeded.
pub const SUCCESS: i32 = 0;
/// `--timeout` reached: Tide stopped the guest.
pub const TIMEOUT: i32 = 124;
/// Tide's own error: a bad option, no usable /dev/kvm, a kernel it cannot load, a host failure.
pub const TIDE_ERROR: i32 = 125;
/// Stopped by signal N: `SIGNAL_BASE + N`.
pub const SIGNAL_BASE: i32 = 128;
/// The guest's virtio-mem driver failed the device (FAILED or DEVICE_NEEDS_RESET), or Tide had
/// to answer one of its requests ERROR. Replaces a status of 0 at the end of the run.
pub const DRIVER_FAILED: i32 = 252;
/// The guest touched unplugged hotplug memory.
pub const UNPLUGGED_ACCESS: i32 = 253;
/// KVM gave up on the guest: internal error, failed entry, a triple fault that was not a reset
/// the guest asked for (`reboot=t`), an unexpected exit.
pub const KVM_GAVE_UP: i32 = 254;
/// The guest kernel panicked (seen on the serial console, or a KVM crash event).
pub const GUEST_PANIC: i32 = 255;

/// The table, as `tide run --help` prints it after the options.
pub const TABLE: &str = "\
Exit status:
  0        the guest powered off or reset on its own (no panic), or the command succeeded
  N        the command's own status (--exec, tide.cmd=), or N written to the debug-exit port 0xf4
  124      --timeout reached: Tide stopped the guest and printed where its vCPUs were
  125      Tide's own error: a bad option, no usable /dev/kvm, a kernel it cannot load, ...
  128+N    stopped by signal N (SIGHUP 129, SIGINT 130, SIGTERM 143)
  252      the guest's virtio-mem driver failed the device (FAILED or DEVICE_NEEDS_RESET) or Tide
           answered one of its requests ERROR; replaces a 0 at the end of the run
  253      the guest touched unplugged hotplug memory
  254      KVM gave up on the guest: internal error, failed entry, a triple fault that was not a
           reset asked for with reboot=t
  255      guest kernel panic (stderr names the panic line)
Tide's own codes come with one line on stderr saying what happened; a command's status that
equals one of them is passed on as it is.";

/// Whether a kernel command line asks for resets by triple fault (`reboot=t` or `reboot=triple`,
/// possibly among other comma-separated reboot modes): then a triple fault is the guest's reset.
pub fn triple_fault_is_reset(cmdline: &str) -> bool {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|p| p.strip_prefix("reboot="))
        .any(|modes| modes.split(',').any(|m| m.starts_with('t')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_outside_the_signal_range() {
        let own = [
            TIMEOUT,
            TIDE_ERROR,
            DRIVER_FAILED,
            UNPLUGGED_ACCESS,
            KVM_GAVE_UP,
            GUEST_PANIC,
        ];
        for (i, a) in own.iter().enumerate() {
            assert!(own[i + 1..].iter().all(|b| a != b), "{a} twice");
            // Not a signal that stops Tide (SIGHUP, SIGINT, SIGTERM).
            for sig in crate::signals::STOP_SIGNALS {
                assert_ne!(*a, SIGNAL_BASE + sig);
            }
            assert!((1..=255).contains(a));
        }
    }

    #[test]
    fn the_table_names_every_code() {
        for code in [
            SUCCESS,
            TIMEOUT,
            TIDE_ERROR,
            DRIVER_FAILED,
            UNPLUGGED_ACCESS,
            KVM_GAVE_UP,
            GUEST_PANIC,
        ] {
            assert!(
                TABLE.lines().any(|l| l.starts_with(&format!("  {code} "))),
                "{code}"
            );
        }
        assert!(TABLE.contains("128+N"));
    }

    #[test]
    fn docs_hold_the_same_table() {
        let docs = include_str!("../../docs/ci.md");
        assert!(
            docs.contains(TABLE),
            "docs/ci.md must repeat exit_status::TABLE word for word"
        );
    }

    #[test]
    fn triple_fault_resets_only_when_asked() {
        assert!(!triple_fault_is_reset("console=ttyS0 reboot=k panic=1"));
        assert!(!triple_fault_is_reset(""));
        assert!(!triple_fault_is_reset("tide.reboot=t"));
        assert!(triple_fault_is_reset("console=ttyS0 reboot=t"));
        assert!(triple_fault_is_reset("reboot=triple"));
        assert!(triple_fault_is_reset("reboot=w,t"));
    }
}

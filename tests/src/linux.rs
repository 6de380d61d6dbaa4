//! The Linux guest of tier 3 (built by `resources/build-guest.sh`) as a test would use it: boot it
//! under `tide` with an interactive shell on the console, type commands and read their output,
//! and read the guest's own view of its memory.
//!
//! On an emulating KVM (this project's build machines, see `kvm_is_emulating`) the guest needs the
//! workaround parameters in the artifact directory's `cmdline` file; on a hardware-assisted KVM it
//! boots without them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{kvm_is_emulating, temp_dir, wait_for_path, TempDir, Tide};

/// Guest physical address where Tide places the hotplug region of a guest with less than 3 GiB of
/// boot RAM (the first 1 GiB boundary above 4 GiB: `memory::MemoryLayout`).
pub const HOTPLUG_BASE: u64 = 0x1_0000_0000;
/// Linux's memory block size on x86_64 with less than 64 GiB of boot RAM.
pub use memory::LINUX_MEMORY_BLOCK;

/// How long a boot may take before a test gives up: generous, since an emulating KVM on a loaded
/// machine has been seen to take 3 minutes. A bound for failures, not a timing assertion.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// Bound on one command or one resize in the guest.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// The guest artifact directory for tier-3 test `test`, or `None` after printing why it is
/// skipped (no usable /dev/kvm, or no guest artifacts).
pub fn guest_or_skip(test: &str) -> Option<PathBuf> {
    if !crate::require_kvm(test) {
        return None;
    }
    match guest_dir() {
        Ok(d) => Some(d),
        Err(why) => {
            println!("SKIP {test}: {why}");
            None
        }
    }
}

/// The guest artifact directory from `TIDE_GUEST_DIR` (what `resources/build-guest.sh` printed),
/// or why it cannot be used.
pub fn guest_dir() -> Result<PathBuf, String> {
    let dir = PathBuf::from(std::env::var_os("TIDE_GUEST_DIR").ok_or(
        "no Linux guest: set TIDE_GUEST_DIR to the output of resources/build-guest.sh (resources/test.sh does)",
    )?);
    for f in ["vmlinux", "initramfs.cpio", "cmdline"] {
        if !dir.join(f).exists() {
            return Err(format!(
                "{} has no {f}: rebuild it with resources/build-guest.sh",
                dir.display()
            ));
        }
    }
    Ok(dir)
}

/// The kernel command line for the guest: console, reboot through the i8042, no PCI, hot-added
/// memory onlined movable, plus the workaround parameters when this host's KVM emulates.
pub fn kernel_cmdline(dir: &Path) -> String {
    let mut c =
        String::from("console=ttyS0 reboot=k panic=1 pci=off memhp_default_state=online_movable");
    if kvm_is_emulating().is_some() {
        let extra = std::fs::read_to_string(dir.join("cmdline")).expect("read the guest's cmdline");
        c.push(' ');
        c.push_str(extra.trim());
    }
    c
}

/// A booted Linux guest with a shell on its console and an API socket.
pub struct LinuxGuest {
    /// The running `tide`.
    pub tide: Tide,
    /// Its API socket.
    pub sock: PathBuf,
    /// `MemTotal` (kB) right after boot, before any plug.
    pub boot_mem_total_kib: u64,
    seq: u32,
    _tmp: TempDir,
}

impl Drop for LinuxGuest {
    /// A failing test shows what the guest and Tide said last: the console's tail (the guest's
    /// kernel messages, a panic) and Tide's diagnostics.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let out = self.tide.stdout();
            // The last 16 KiB, from the first whole character (stdout() is valid UTF-8).
            let mut from = out.len().saturating_sub(16 * 1024);
            while !out.is_char_boundary(from) {
                from += 1;
            }
            let tail = &out[from..];
            eprintln!(
                "--- the guest's console, last 16 KiB ---\n{tail}\n--- tide's stderr ---\n{}",
                self.tide.stderr()
            );
        }
    }
}

impl LinuxGuest {
    /// Boots the guest of `dir` with 128 MiB of boot RAM, an API socket and `extra` arguments to
    /// `tide run` (hotplug region, vCPUs, backend), and waits for its shell.
    ///
    /// The guest's init runs each line typed on the console in its own shell
    /// (`tide.console=lines`): no line editing (an interactive busybox shell reads and echoes each
    /// character with a system call of its own, seconds per line on an emulating KVM), no process
    /// started for it, and kernel messages kept off the console so that they never split a
    /// command's output (the tests read them with `dmesg`).
    pub fn boot(dir: &Path, tag: &str, extra: &[&str]) -> LinuxGuest {
        let tmp = temp_dir(tag);
        let sock = tmp.as_path().join("api.sock");
        let mut args: Vec<String> = [
            "run",
            "--kernel",
            &dir.join("vmlinux").display().to_string(),
            "--initrd",
            &dir.join("initramfs.cpio").display().to_string(),
            "--memory",
            "128M",
            "--api-socket",
            &sock.display().to_string(),
            "--cmdline",
            &format!("{} tide.console=lines", kernel_cmdline(dir)),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut tide = Tide::spawn_console(args);
        tide.wait_for("TIDE-LINES-READY", BOOT_TIMEOUT);
        println!(
            "linux: {tag} booted to its shell in {:.0} s",
            tide.started.elapsed().as_secs_f64()
        );
        wait_for_path(&sock, Duration::from_secs(10));
        let mut g = LinuxGuest {
            tide,
            sock,
            boot_mem_total_kib: 0,
            seq: 0,
            _tmp: tmp,
        };
        // Helpers made of shell builtins that set a variable rather than print: every exec
        // costs seconds of emulated kernel work here, and a `$(...)` forks a second process
        // (see `kernel_log_grep` for what concurrent processes risk on this machine's KVM).
        // mt: MT = MemTotal in kB.
        g.sh("mt() { local k v u; while read k v u; do [ \"$k\" = MemTotal: ] && { MT=$v; return; }; done </proc/meminfo; }");
        // tick: waits a second with shell builtins only (a read that times out on a FIFO nobody
        // writes), where `sleep` would cost an exec.
        g.sh("mkfifo /tmp/tick; tick() { read -t 1 _ <>/tmp/tick; true; }");
        // blocks FIRST END: BL = the state of each memory block FIRST..END-1, on one line. Linux
        // may remove a block between any test and the read: a block whose file cannot be opened
        // is absent, and the shell's complaint about it goes nowhere (stderr is redirected before
        // the file is opened).
        g.sh("blocks() { local i=$1 l= s f; while [ $i -lt $2 ]; do f=/sys/devices/system/memory/memory$i/state; \
              read s 2>/dev/null <$f || s=absent; l=\"$l $s\"; i=$((i+1)); done; BL=${l# }; }");
        g.boot_mem_total_kib = g.mem_total_kib();
        g
    }

    /// Runs `cmd` in the guest's shell and returns its output; panics unless it exits 0.
    pub fn sh(&mut self, cmd: &str) -> String {
        let (rc, out) = self.sh_rc(cmd);
        assert_eq!(rc, 0, "`{cmd}` failed in the guest:\n{out}");
        out
    }

    /// Runs `cmd` in the guest's shell; returns its exit status and output.
    pub fn sh_rc(&mut self, cmd: &str) -> (i32, String) {
        self.seq += 1;
        let n = self.seq;
        // The markers are quoted so that the console's echo of the typed line never matches them.
        self.tide.send(&format!(
            "echo '<<'{n}'>>'; {cmd}\necho '<<'{n}' rc='$?'>>'\n"
        ));
        let (begin, end) = (format!("<<{n}>>"), format!("<<{n} rc="));
        let out = self.tide.wait_for(&end, COMMAND_TIMEOUT);
        let out = self.tide.wait_for_after(&end, ">>", out, COMMAND_TIMEOUT);
        let out = out.replace('\r', "");
        let start = out
            .find(&format!("{begin}\n"))
            .map(|i| i + begin.len() + 1)
            .unwrap_or_else(|| panic!("no output of `{cmd}`:\n{out}"));
        let stop = out.find(&end).unwrap();
        let rc = out[stop + end.len()..]
            .split(">>")
            .next()
            .and_then(|r| r.trim().parse().ok())
            .unwrap_or(-1);
        (rc, out[start..stop].to_string())
    }

    /// The guest's `MemTotal` in kB.
    pub fn mem_total_kib(&mut self) -> u64 {
        let out = self.sh("mt; echo $MT");
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("MemTotal: {out:?}"))
    }

    /// Waits (in the guest, once a second) until `MemTotal` is `kib`; panics after `COMMAND_TIMEOUT`.
    pub fn wait_mem_total(&mut self, kib: u64) {
        let tries = COMMAND_TIMEOUT.as_secs();
        let out = self.sh_rc(&format!(
            "i=0; mt; while [ \"$MT\" != {kib} ] && [ $i -lt {tries} ]; do i=$((i+1)); tick; mt; done; echo $MT"
        ));
        assert_eq!(
            out.1.trim(),
            kib.to_string(),
            "MemTotal never reached {kib} kB"
        );
    }

    /// Waits (in the guest, once a second) until the memory blocks in `[base, base + size)` are
    /// `states` ("online", "offline", "going-offline", or "absent" for a block Linux has not
    /// added or already removed), and returns what they are then. Linux removes a memory block after the device
    /// acknowledged its last unplug, and adds one before it plugs into it: its sysfs view follows
    /// the device's by a moment.
    pub fn wait_memory_block_states(
        &mut self,
        base: u64,
        size: u64,
        states: &[&str],
    ) -> Vec<String> {
        let (first, end) = Self::block_range(base, size);
        let want = states.join(" ");
        let tries = COMMAND_TIMEOUT.as_secs();
        let out = self.sh(&format!(
            "i=0; blocks {first} {end}; while [ \"$BL\" != '{want}' ] && [ $i -lt {tries} ]; do i=$((i+1)); tick; blocks {first} {end}; done; echo $BL"
        ));
        out.split_whitespace().map(str::to_string).collect()
    }

    fn block_range(base: u64, size: u64) -> (u64, u64) {
        let first = base / LINUX_MEMORY_BLOCK;
        (first, first + size / LINUX_MEMORY_BLOCK)
    }

    /// Kernel log lines that show a problem: warnings, bugs, oopses, errors of virtio-mem, and
    /// errors of Tide's own devices (i8042, serial). Empty when the log is clean.
    pub fn kernel_log_problems(&mut self) -> Vec<String> {
        self.kernel_log_grep(
            "warning|bug|oops|call trace|stall|starved|virtio|i8042|serio|serial|8250|error|fail|broken|unable|can.t",
        )
        .lines()
            .filter(|l| is_problem(l, kvm_is_emulating().is_some()))
            .map(str::to_string)
            .collect()
    }

    /// The guest's whole kernel log, for a failure message that needs the context of a problem.
    pub fn kernel_log(&mut self) -> String {
        self.sh("dmesg")
    }

    /// The lines of the guest's kernel log that match the extended regular expression
    /// `pattern` (case-insensitive); panics if reading the log fails.
    ///
    /// A pipeline, as a CI user's script would write it, with `pipefail`: a crashed `dmesg` or
    /// `grep` (status 128+N) fails the test instead of hiding lines. Such pipelines crashed on this
    /// machine's emulating KVM in 2026-11 and no longer do (docs/testing.md; tests/pipelines.rs
    /// runs 100 of them).
    pub fn kernel_log_grep(&mut self, pattern: &str) -> String {
        let (rc, out) = self.sh_rc(&format!(
            "(set -o pipefail; dmesg | grep -i -E '{pattern}')"
        ));
        // grep: 0 lines found, 1 none; anything else (a failed or crashed process) is a failure.
        assert!(
            rc == 0 || rc == 1,
            "dmesg | grep of the kernel log failed ({rc}):\n{out}"
        );
        out
    }

    /// Ends the session: init syncs and resets through the i8042 (`reboot=k`); returns tide's
    /// status.
    pub fn power_off(mut self) -> std::process::ExitStatus {
        self.tide.send("tide-poweroff\n");
        self.tide.wait_for("TIDE-POWEROFF", COMMAND_TIMEOUT);
        self.tide.wait_exit(COMMAND_TIMEOUT)
    }
}

/// Whether a kernel log line reports a problem (see [`LinuxGuest::kernel_log_problems`]).
/// `emulating`: the guest runs on an emulating KVM, whose CPUID instruction returns the host's
/// values whatever Tide set (docs/testing.md), so Linux sees CPUID's initial APIC ID 0
/// on every vCPU although Tide gives each its own: a fact of that KVM, not of Tide.
pub fn is_problem(line: &str, emulating: bool) -> bool {
    let l = line.to_ascii_lowercase();
    if emulating && l.contains("[firmware bug]: cpu") && l.contains("apic id mismatch") {
        return false;
    }
    // Facts of this host's CPU that the kernel reports as such, not faults of the guest or Tide,
    // and the echo of a boot parameter of resources/emulated-kvm.cmdline.
    const BENIGN: [&str; 4] = [
        "[firmware bug]: tsc doesn't count with p0 frequency",
        "rdseed32 is broken. disabling the corresponding cpuid bit",
        "pmu not available due to virtualization",
        "rcu cpu stall warnings timeout set to",
    ];
    if BENIGN.iter().any(|b| l.contains(b)) {
        return false;
    }
    l.contains("warning")
        || l.contains("bug")
        || l.contains("oops")
        || l.contains("call trace")
        || (l.contains("rcu")
            && (l.contains("detected stall")
                || l.contains("detected expedited stall")
                || l.contains("starved")))
        || ((l.contains("virtio")
            || l.contains("i8042")
            || l.contains("serio")
            || l.contains("8250"))
            && (l.contains("error")
                || l.contains("fail")
                || l.contains("broken")
                || l.contains("unable")
                || l.contains("can't")))
}

#[cfg(test)]
mod tests {
    use super::is_problem;

    #[test]
    fn kernel_log_filter() {
        for emulating in [false, true] {
            let p = |l: &str| is_problem(l, emulating);
            assert!(p("[   12.0] virtio_mem virtio0: marking device broken"));
            assert!(p(
                "[    1.0] i8042: Can't read CTR while initializing i8042"
            ));
            assert!(p(
                "[    1.0] i8042 i8042: probe with driver i8042 failed with error -5"
            ));
            assert!(p(
                "[    2.0] WARNING: CPU: 0 PID: 1 at mm/page_alloc.c:1 foo"
            ));
            assert!(p("[    2.0] BUG: unable to handle page fault"));
            assert!(p(
                "[  140.5] rcu: INFO: rcu_sched self-detected stall on CPU"
            ));
            assert!(p(
                "[  140.5] rcu: rcu_sched kthread starved for 2101 jiffies!"
            ));
            assert!(p(
                "[  655.2] rcu: INFO: rcu_sched detected stalls on CPUs/tasks:"
            ));
            assert!(!p("[    1.0] x86/fpu: xstate handlers installed"));
            assert!(!p(
                "[   15.7] \tRCU CPU stall warnings timeout set to 300 (rcu_cpu_stall_timeout)."
            ));
            assert!(!p(
                "[    0.0] Command line: console=ttyS0 rcupdate.rcu_cpu_stall_timeout=300"
            ));
            assert!(!p(
                "[    0.0] [Firmware Bug]: TSC doesn't count with P0 frequency!"
            ));
            assert!(!p("[   41.8] serio: i8042 KBD port at 0x60,0x64 irq 1"));
            assert!(!p("[   12.2] virtio_mem virtio0: plugged size: 0x0"));
        }
        let mismatch =
            "[ 1.0] [Firmware Bug]: CPU   1: APIC ID mismatch. CPUID: 0x0000 APIC: 0x0001";
        assert!(is_problem(mismatch, false));
        assert!(!is_problem(mismatch, true));
    }
}

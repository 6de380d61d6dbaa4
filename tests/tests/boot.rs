//! Tier 2: `tide run` boots the freestanding test guest on the real /dev/kvm through the same
//! 64-bit boot protocol as Linux and reads what the guest reports on its serial console.

use std::process::Command;
use std::time::Duration;

use tests::{require_kvm, test_guest, tide_bin, Tide};

const T: Duration = Duration::from_secs(60);

#[test]
fn guest_boots_prints_cmdline_and_powers_off() {
    if !require_kvm("guest_boots_prints_cmdline_and_powers_off") {
        return;
    }
    let mut tide = Tide::run_guest("console=ttyS0 tide.hello=world", &["--memory", "256M"]);
    let status = tide.wait_exit(T);
    let out = tide.stdout();
    assert!(out.contains("tide-guest: hello"), "{out}");
    assert!(
        out.contains("tide-guest: cmdline: console=ttyS0 tide.hello=world"),
        "{out}"
    );
    assert!(out.contains("tide-guest: cpus: 1"), "{out}");
    assert!(status.success(), "exit {status:?}\n{}", tide.stderr());
}

#[test]
fn guest_sees_every_vcpu_in_the_mp_table() {
    if !require_kvm("guest_sees_every_vcpu_in_the_mp_table") {
        return;
    }
    let mut tide = Tide::run_guest("console=ttyS0", &["--cpus", "4"]);
    let status = tide.wait_exit(T);
    assert!(
        tide.stdout().contains("tide-guest: cpus: 4"),
        "{}",
        tide.stdout()
    );
    assert!(status.success());
}

#[test]
fn guest_sees_the_e820_map_of_boot_ram() {
    if !require_kvm("guest_sees_the_e820_map_of_boot_ram") {
        return;
    }
    // 3.5 GiB of boot RAM: 3 GiB below the MMIO gap, 512 MiB above 4 GiB; the e820 map lists
    // base memory, RAM from 1 MiB to 3 GiB and the high part (the BIOS hole is left out).
    let mut tide = Tide::run_guest("console=ttyS0", &["--memory", "3584M"]);
    let status = tide.wait_exit(T);
    let out = tide.stdout();
    assert!(
        out.contains("tide-guest: e820: 3 entries, 3583 MiB"),
        "{out}"
    );
    assert!(status.success());
}

#[test]
fn triple_fault_ends_tide_cleanly() {
    if !require_kvm("triple_fault_ends_tide_cleanly") {
        return;
    }
    let mut tide = Tide::run_guest("console=ttyS0 tide.test=triple", &[]);
    let status = tide.wait_exit(T);
    // Ended in order, with the status that says KVM gave up (no reboot=t: not a reset request).
    assert_eq!(
        status.code(),
        Some(vmm::exit_status::KVM_GAVE_UP),
        "{}",
        tide.stderr()
    );
}

fn run_err(args: &[&str]) -> (i32, String) {
    let out = Command::new(tide_bin())
        .args(args)
        .output()
        .expect("run tide");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line_error(args: &[&str], needle: &str) {
    let (code, err) = run_err(args);
    assert_ne!(code, 0, "{args:?} succeeded");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: not one line:\n{err}"
    );
    assert!(
        err.contains(needle),
        "{args:?}: {err:?} does not say {needle:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_kernels_and_sizes_give_one_line_errors() {
    // These fail before or while opening /dev/kvm, so they need no KVM.
    let guest = test_guest().display().to_string();
    assert_one_line_error(
        &["run", "--kernel", "/nonexistent/kernel"],
        "cannot open kernel /nonexistent/kernel",
    );
    let dir = tests::temp_dir("badkernel");
    let corrupt = dir.as_path().join("corrupt");
    std::fs::write(&corrupt, vec![0x5au8; 8192]).unwrap();
    if std::path::Path::new("/dev/kvm").exists() {
        assert_one_line_error(
            &["run", "--kernel", corrupt.to_str().unwrap()],
            "cannot load kernel",
        );
        let elf_corrupt = dir.as_path().join("bad.elf");
        let mut bytes = std::fs::read(&guest).unwrap();
        bytes.truncate(80);
        std::fs::write(&elf_corrupt, bytes).unwrap();
        assert_one_line_error(
            &["run", "--kernel", elf_corrupt.to_str().unwrap()],
            "cannot load kernel",
        );
        assert_one_line_error(&["run", "--kernel", &guest, "--memory", "0"], "boot RAM");
    }
    assert_one_line_error(&["run", "--kernel", &guest, "--memory", "abc"], "abc");
    assert_one_line_error(&["run", "--kernel", &guest, "--cpus", "0"], "cpus");
}

#[test]
fn missing_kvm_gives_one_line_error() {
    // Run tide in a mount namespace where /dev/kvm is hidden (needs root and unshare).
    let (Ok(out), true) = (
        Command::new("unshare")
            .args(["-m", "sh", "-c"])
            .arg(format!(
                "mount -t tmpfs none /dev 2>/dev/null || exit 77; exec {} run --kernel {}",
                tide_bin().display(),
                test_guest().display()
            ))
            .output(),
        nix_root(),
    ) else {
        println!(
            "SKIP missing_kvm_gives_one_line_error: needs root and unshare(1) to hide /dev/kvm"
        );
        return;
    };
    if out.status.code() == Some(77) {
        println!("SKIP missing_kvm_gives_one_line_error: cannot mount over /dev here");
        return;
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("/dev/kvm"), "{err}");
}

fn nix_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

//! `tide run`'s exit status contract (vmm::exit_status), one test per row: tier 2 with the
//! freestanding test guest, tier 3 with the Linux guest (commands, a kernel panic, --timeout; the
//! CI scenario of docs/ci.md).

use std::process::Command;
use std::time::Duration;

use tests::linux::{guest_or_skip, kernel_cmdline, BOOT_TIMEOUT};
use tests::{require_kvm, tide_bin, Tide};
use vmm::exit_status::{
    DRIVER_FAILED, GUEST_PANIC, KVM_GAVE_UP, TIDE_ERROR, TIMEOUT, UNPLUGGED_ACCESS,
};

const T: Duration = Duration::from_secs(60);
/// Bound on a whole Linux run here: a boot and a command or a panic. Generous: with the machine
/// loaded (two other guests and stress-ng beside it) one panic run took 23 minutes of guest time.
/// A bound for failures, not a timing assertion.
const LINUX_RUN: Duration = Duration::from_secs(2 * BOOT_TIMEOUT.as_secs());

fn code(tide: &mut Tide, timeout: Duration) -> i32 {
    let st = tide.wait_exit(timeout);
    st.code()
        .unwrap_or_else(|| panic!("tide ended without a status: {st:?}"))
}

/// The one line Tide prints on stderr for one of its own codes (log lines aside).
fn reason_line(tide: &Tide) -> String {
    let is_log = |l: &str| {
        ["warn", "info", "debug", "error", "trace"]
            .iter()
            .any(|lv| l.starts_with(&format!("tide: {lv}: ")))
    };
    tide.stderr()
        .lines()
        .rfind(|l| l.starts_with("tide: ") && !is_log(l))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn help_shows_the_exit_status_table() {
    let out = Command::new(tide_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains(vmm::exit_status::TABLE), "{text}");
}

#[test]
fn tides_own_errors_exit_125() {
    for args in [
        vec!["run", "--no-such-option"],
        vec!["run", "--kernel", "/nonexistent/vmlinux"],
        vec!["run", "--kernel", "/x", "--timeout", "0"],
        vec!["run", "--kernel", "/x", "--exec", " "],
    ] {
        let out = Command::new(tide_bin()).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(TIDE_ERROR), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn debug_exit_port_sets_the_exit_status() {
    if !require_kvm("debug_exit_port_sets_the_exit_status") {
        return;
    }
    for n in [42, 0, 255] {
        let mut tide = Tide::run_guest(&format!("console=ttyS0 tide.exit={n}"), &[]);
        assert_eq!(code(&mut tide, T), n, "{}", tide.stderr());
        let out = tide.stdout();
        assert!(
            out.contains(&format!("tide-guest: debug-exit {n}")),
            "{out}"
        );
        assert!(!out.contains("debug-exit returned"), "{out}");
        if n != 0 {
            assert!(
                reason_line(&tide).contains(&format!("wrote {n} to the debug-exit port 0xf4")),
                "{}",
                tide.stderr()
            );
        }
    }
}

#[test]
fn a_driver_that_sets_failed_gives_the_driver_failed_code() {
    if !require_kvm("a_driver_that_sets_failed_gives_the_driver_failed_code") {
        return;
    }
    let mut tide = Tide::run_guest(
        "console=ttyS0 tide.test=mem-failed",
        &["--hotplug-size", "1G"],
    );
    assert_eq!(code(&mut tide, T), DRIVER_FAILED, "{}", tide.stderr());
    let out = tide.stdout();
    // The guest then powered off on its own, which alone would be 0.
    assert!(
        out.contains("virtio-mem: driver gives up: status FAILED"),
        "{out}"
    );
    let why = reason_line(&tide);
    assert!(why.contains("the driver set FAILED"), "{}", tide.stderr());
}

#[test]
fn tide_answering_error_gives_the_driver_failed_code() {
    if !require_kvm("tide_answering_error_gives_the_driver_failed_code") {
        return;
    }
    // The hostile scenario sends malformed requests that Tide answers ERROR, then powers off.
    let mut tide = Tide::run_guest(
        "console=ttyS0 tide.test=mem-hostile",
        &["--hotplug-size", "64M", "--requested", "4M"],
    );
    assert_eq!(code(&mut tide, T), DRIVER_FAILED, "{}", tide.stderr());
    assert!(tide.stdout().contains("hostile done"), "{}", tide.stdout());
    assert!(
        reason_line(&tide).contains("request(s) ERROR"),
        "{}",
        tide.stderr()
    );
}

#[test]
fn touching_unplugged_memory_gives_its_code() {
    if !require_kvm("touching_unplugged_memory_gives_its_code") {
        return;
    }
    let mut tide = Tide::run_guest(
        "console=ttyS0 tide.test=mem-touch-unplugged",
        &["--hotplug-size", "1G"],
    );
    assert_eq!(code(&mut tide, T), UNPLUGGED_ACCESS, "{}", tide.stderr());
    assert!(
        reason_line(&tide).contains("unplugged hotplug memory"),
        "{}",
        tide.stderr()
    );
}

#[test]
fn a_triple_fault_is_kvm_giving_up_unless_the_guest_resets_that_way() {
    if !require_kvm("a_triple_fault_is_kvm_giving_up_unless_the_guest_resets_that_way") {
        return;
    }
    let mut tide = Tide::run_guest("console=ttyS0 tide.test=triple", &[]);
    assert_eq!(code(&mut tide, T), KVM_GAVE_UP, "{}", tide.stderr());
    let err = tide.stderr();
    assert!(reason_line(&tide).contains("triple-faulted"), "{err}");
    assert!(err.contains("guest state of vCPU 0"), "{err}");
    let mut tide = Tide::run_guest("console=ttyS0 reboot=t tide.test=triple", &[]);
    assert_eq!(code(&mut tide, T), 0, "{}", tide.stderr());
}

#[test]
fn timeout_stops_a_hung_guest_and_reports_its_vcpus() {
    if !require_kvm("timeout_stops_a_hung_guest_and_reports_its_vcpus") {
        return;
    }
    // The guest hangs for ever (hlt with interrupts off), so only the timeout can end the run.
    let mut tide = Tide::run_guest(
        "console=ttyS0 tide.test=hang",
        &["--cpus", "2", "--timeout", "2s"],
    );
    assert_eq!(code(&mut tide, T), TIMEOUT, "{}", tide.stderr());
    assert!(tide.stdout().contains("hanging"), "{}", tide.stdout());
    let err = tide.stderr();
    assert!(reason_line(&tide).contains("--timeout 2s reached"), "{err}");
    assert!(err.contains("guest state of vCPU 0:"), "{err}");
    assert!(err.contains("guest state of vCPU 1:"), "{err}");
    assert!(err.contains("rip 0x"), "{err}");
}

// --- tier 3: the Linux guest -------------------------------------------------------------------

/// `tide run` of the Linux guest with 128 MiB, `cmdline_extra` and `extra` arguments.
fn run_linux(dir: &std::path::Path, cmdline_extra: &str, extra: &[&str]) -> Tide {
    let mut args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        dir.join("vmlinux").display().to_string(),
        "--initrd".into(),
        dir.join("initramfs.cpio").display().to_string(),
        "--memory".into(),
        "128M".into(),
        "--cmdline".into(),
        format!("{} {cmdline_extra}", kernel_cmdline(dir)),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Tide::spawn(args)
}

#[test]
fn linux_exec_returns_the_commands_status() {
    let Some(dir) = guest_or_skip("linux_exec_returns_the_commands_status") else {
        return;
    };
    // Quotes, spaces, a percent sign and a backslash survive the trip through the command line.
    let cmd = r#"echo "out: a  b" 'c' 100% \\n; exit 7"#;
    let mut tide = run_linux(&dir, "", &["--exec", cmd]);
    assert_eq!(code(&mut tide, LINUX_RUN), 7, "{}", tide.stderr());
    let out = tide.stdout();
    assert!(out.contains(r"out: a  b c 100% \n"), "{out}");
    assert!(out.contains("TIDE-CMD-END rc=7"), "{out}");
    println!(
        "linux: --exec ran and returned in {:.0} s",
        tide.started.elapsed().as_secs_f64()
    );
}

/// The older form, `tide.cmd="..."` on the kernel command line, gets the same exit status.
#[test]
fn linux_tide_cmd_returns_the_commands_status() {
    let Some(dir) = guest_or_skip("linux_tide_cmd_returns_the_commands_status") else {
        return;
    };
    let mut tide = run_linux(&dir, "tide.cmd=\"echo via-tide-cmd; exit 3\"", &[]);
    assert_eq!(code(&mut tide, LINUX_RUN), 3, "{}", tide.stderr());
    let out = tide.stdout();
    assert!(
        out.contains("via-tide-cmd\r\nTIDE-CMD-END rc=3")
            || out.contains("via-tide-cmd\nTIDE-CMD-END rc=3"),
        "{out}"
    );
}

#[test]
fn linux_kernel_panic_gives_the_panic_code_and_names_it() {
    let Some(dir) = guest_or_skip("linux_kernel_panic_gives_the_panic_code_and_names_it") else {
        return;
    };
    // No init anywhere: the kernel panics, and with panic=1 it resets a second later.
    let mut tide = run_linux(&dir, "rdinit=/nonexistent init=/nonexistent", &[]);
    assert_eq!(code(&mut tide, LINUX_RUN), GUEST_PANIC, "{}", tide.stderr());
    let why = reason_line(&tide);
    assert!(
        why.contains("guest kernel panic: Kernel panic - not syncing: "),
        "{}",
        tide.stderr()
    );
    // The very line the guest printed.
    let line = why
        .split("guest kernel panic: ")
        .nth(1)
        .and_then(|r| r.split(" (then: ").next())
        .unwrap_or_default();
    assert!(line.len() > "Kernel panic - not syncing: ".len(), "{why}");
    assert!(tide.stdout().contains(line), "{why}\n{}", tide.stdout());
}

#[test]
fn linux_timeout_gives_its_code() {
    let Some(dir) = guest_or_skip("linux_timeout_gives_its_code") else {
        return;
    };
    // A command that never ends: whatever the speed of this KVM, only the timeout ends the run.
    let mut tide = run_linux(
        &dir,
        "",
        &["--exec", "while :; do sleep 1; done", "--timeout", "5s"],
    );
    assert_eq!(code(&mut tide, LINUX_RUN), TIMEOUT, "{}", tide.stderr());
    let err = tide.stderr();
    assert!(reason_line(&tide).contains("--timeout 5s reached"), "{err}");
    assert!(err.contains("guest state of vCPU 0:"), "{err}");
}

/// docs/ci.md shows the scenario script as it is (the test below runs the file).
#[test]
fn docs_show_the_ci_scenario_as_written() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = std::fs::read_to_string(root.join("resources/ci-scenario.sh")).unwrap();
    let docs = std::fs::read_to_string(root.join("docs/ci.md")).unwrap();
    assert!(
        docs.contains(&format!("```sh\n{script}```")),
        "docs/ci.md must show resources/ci-scenario.sh word for word"
    );
}

/// The CI scenario of docs/ci.md, run as written: boot with --exec, grow over the socket, the
/// guest sees and uses the memory, shrink, and tide's exit status 0.
#[test]
fn linux_ci_scenario_runs_as_written() {
    let Some(dir) = guest_or_skip("linux_ci_scenario_runs_as_written") else {
        return;
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cmd = Command::new(root.join("resources/ci-scenario.sh"));
    cmd.env("TIDE", tide_bin())
        .env("TIDE_GUEST_DIR", &dir)
        .env("STEP_TIMEOUT", LINUX_RUN.as_secs().to_string());
    if tests::kvm_is_emulating().is_some() {
        let extra = std::fs::read_to_string(dir.join("cmdline")).unwrap();
        // Each new guest page costs seconds of emulated kernel work here: a small check.
        cmd.env("TIDE_GUEST_CMDLINE", extra.trim())
            .env("CHECK_MIB", "8")
            .env("GROW_MIB", "256");
    }
    let started = std::time::Instant::now();
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{text}\n{err}");
    for step in [
        "GUEST-READY",
        "GUEST-GREW",
        "memtest: ok",
        "GUEST-CHECKED",
        "GUEST-SHRANK",
    ] {
        assert!(text.contains(step), "no {step}:\n{text}\n{err}");
    }
    println!(
        "linux: CI scenario passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

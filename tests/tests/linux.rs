//! Tier 3: the real Linux guest (built by resources/build-guest.sh) and Linux's own virtio-mem
//! driver, driven like a user's session: boot to a shell, resize over the API socket, and check
//! both the guest's view (its /proc/meminfo, /sys/devices/system/memory, a program using the
//! memory, its kernel log) and the host's (the API status, resident memory).
//!
//! Runs on any KVM: on an emulating one (this project's build machines) the guest gets the
//! workaround parameters of its artifact directory's `cmdline` file, and boots take minutes, so
//! each test shares one boot between its steps.

use memory::MIB;
use std::time::Duration;

use tests::linux::{guest_or_skip, LinuxGuest, COMMAND_TIMEOUT, HOTPLUG_BASE, LINUX_MEMORY_BLOCK};
use tests::{field, kvm_is_emulating, patch, status, wait_settled};

/// How much a program fills in the guest to show plugged memory is usable: most of it on a
/// hardware-assisted KVM; on an emulating one each new page costs the guest's emulated page-fault
/// and page-clearing work (2-4 s per MiB measured here), so a sample that still lands in
/// hot-plugged memory (checked through /proc/self/pagemap).
fn fill_mib(plugged: u64) -> u64 {
    if kvm_is_emulating().is_some() {
        8
    } else {
        plugged / MIB * 3 / 4
    }
}

/// Resizes to `bytes` and checks both views once the device settled: the guest's MemTotal moved
/// by exactly the plugged size, its memory blocks in the region are online (or gone), and the
/// host's resident memory of the region follows.
fn resize_and_check(g: &mut LinuxGuest, bytes: u64) {
    patch(&g.sock, bytes);
    let st = wait_settled(&g.sock, COMMAND_TIMEOUT);
    assert_eq!(field(&st, "plugged_size"), bytes, "{st}");
    let expected = g.boot_mem_total_kib + bytes / 1024;
    g.wait_mem_total(expected);
    let online = (bytes / LINUX_MEMORY_BLOCK) as usize;
    let want: Vec<&str> = (0..8)
        .map(|i| if i < online { "online" } else { "absent" })
        .collect();
    let blocks = g.wait_memory_block_states(HOTPLUG_BASE, 1 << 30, &want);
    assert_eq!(
        blocks, want,
        "Linux memory blocks of the region's first GiB"
    );
    let resident = field(&status(&g.sock), "resident_bytes");
    assert!(
        resident >= bytes && resident <= bytes + 4 * MIB,
        "host resident {resident} for {bytes} plugged"
    );
    println!(
        "linux: resized to {} MiB: MemTotal {} kB (boot {} kB), host resident {} MiB, at {:.0} s",
        bytes / MIB,
        expected,
        g.boot_mem_total_kib,
        resident / MIB,
        g.tide.started.elapsed().as_secs_f64()
    );
}

/// A program in the guest writes and verifies `mib` MiB; all of it must sit in hot-plugged memory
/// (Linux allocates user pages from ZONE_MOVABLE first, which is where it onlined the plug).
fn use_plugged_memory(g: &mut LinuxGuest, mib: u64) {
    let out = g.sh(&format!("memtest {mib} {HOTPLUG_BASE:#x}"));
    let pages = mib * MIB / 4096;
    assert!(
        out.contains(&format!("ok {mib} MiB written and verified"))
            && out.contains(&format!("{pages} of {pages} pages at or above")),
        "{out}"
    );
    println!("linux: {}", out.trim());
}

fn assert_kernel_log_clean(g: &mut LinuxGuest) {
    let problems = g.kernel_log_problems();
    if !problems.is_empty() {
        let log = g.kernel_log();
        panic!(
            "guest kernel log problems:\n{}\nthe whole log:\n{log}",
            problems.join("\n")
        );
    }
}

/// One vCPU, anonymous memory: boot, run a command, grow 0 -> 256 MiB -> 1 GiB and use the
/// memory, shrink to 0, reverse a resize while Linux is still plugging, power off.
#[test]
fn linux_session_resizes_uses_memory_and_powers_off() {
    let test = "linux_session_resizes_uses_memory_and_powers_off";
    let Some(dir) = guest_or_skip(test) else {
        return;
    };
    let mut g = LinuxGuest::boot(
        &dir,
        "linux-session",
        &["--hotplug-size", "2G", "--block-size", "2M"],
    );
    // Case 1: a command runs; the virtio-mem driver found the device with nothing plugged.
    // Builtins and one process at a time (see `LinuxGuest::kernel_log_grep`).
    let out = g.sh("read os </proc/sys/kernel/ostype; echo hello from $os");
    assert!(out.contains("hello from Linux"), "{out}");
    let out = g.kernel_log_grep("virtio_mem.*plugged size");
    assert!(out.contains("plugged size: 0x0"), "{out}");
    assert_eq!(field(&status(&g.sock), "resident_bytes"), 0);

    // Case 2: 0 -> 256 MiB -> 1 GiB -> 0, the memory used while plugged.
    resize_and_check(&mut g, 256 * MIB);
    resize_and_check(&mut g, 1 << 30);
    use_plugged_memory(&mut g, fill_mib(1 << 30));
    resize_and_check(&mut g, 0);
    assert_kernel_log_clean(&mut g);

    // Case 3: 1 GiB asked, then 256 MiB as soon as Linux has plugged anything.
    patch(&g.sock, 1 << 30);
    let plugged_when_reversed = loop {
        let p = field(&status(&g.sock), "plugged_size");
        if p > 0 {
            break p;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    patch(&g.sock, 256 * MIB);
    println!(
        "linux: reversed 1 GiB -> 256 MiB with {} MiB plugged{}",
        plugged_when_reversed / MIB,
        if plugged_when_reversed < 1 << 30 {
            " (mid-plug)"
        } else {
            " (the plug had already finished)"
        }
    );
    resize_and_check(&mut g, 256 * MIB);
    let log = g.kernel_log_grep("virtio_mem");
    assert!(!log.contains("broken"), "{log}");
    resize_and_check(&mut g, 0);
    assert_kernel_log_clean(&mut g);

    let st = g.power_off();
    assert!(st.success(), "tide exited with {st:?}");
}

/// Two vCPUs and the memfd backend: the same driver, plug, use and unplug.
#[test]
fn linux_two_vcpus_memfd_backend() {
    let test = "linux_two_vcpus_memfd_backend";
    let Some(dir) = guest_or_skip(test) else {
        return;
    };
    let mut g = LinuxGuest::boot(
        &dir,
        "linux-smp-memfd",
        &[
            "--cpus",
            "2",
            "--hotplug-size",
            "1G",
            "--block-size",
            "2M",
            "--backend",
            "memfd",
        ],
    );
    let out = g.sh("grep -c ^processor /proc/cpuinfo");
    assert_eq!(out.trim(), "2", "{out}");
    assert_eq!(
        status(&g.sock)["backend"].as_str(),
        Some("memfd"),
        "{}",
        status(&g.sock)
    );
    resize_and_check(&mut g, 512 * MIB);
    use_plugged_memory(&mut g, fill_mib(512 * MIB));
    resize_and_check(&mut g, 0);
    assert_kernel_log_clean(&mut g);
    let st = g.power_off();
    assert!(st.success(), "tide exited with {st:?}");
}

//! Tier 2: the test guest drives the real virtio-mmio virtio-mem device through real KVM exits,
//! ioeventfds and irqfds; the tests check what the guest sees and what the host's resident
//! memory does.

use memory::{GIB, MIB};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::{field, http, require_kvm, status, temp_dir, wait_for_path, Tide};

const T: Duration = Duration::from_secs(120);

fn wait_plugged(sock: &Path, want: u64) -> serde_json::Value {
    let end = Instant::now() + T;
    loop {
        let s = status(sock);
        if field(&s, "plugged_size") == want {
            // The settled answer carries a resident figure read after the last change (the
            // anon figure is read off Tide's event loop and can lag a plain GET).
            let s = tests::wait_settled(sock, T);
            assert_eq!(field(&s, "plugged_size"), want, "{s}");
            return s;
        }
        assert!(
            Instant::now() < end,
            "plugged_size never reached {want}: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn guest_plugs_1g_host_rss_follows_and_unplug_returns_it() {
    if !require_kvm("guest_plugs_1g_host_rss_follows_and_unplug_returns_it") {
        return;
    }
    let (mut tide, sock, _tmp) = Tide::run_guest_with_api(
        "plug1g",
        "console=ttyS0 tide.test=mem-follow",
        &["--hotplug-size", "4G", "--requested", "1G"],
    );
    tide.wait_for("tide-guest: plugged 1073741824 requested 1073741824", T);
    let out = tide.stdout();
    assert!(!out.contains("FAIL"), "{out}");
    assert!(
        out.contains("tide-guest: pattern 0x100000000"),
        "the guest wrote and checked its pattern: {out}"
    );
    let s = wait_plugged(&sock, GIB);
    let resident = field(&s, "resident_bytes");
    assert!(
        (GIB..=GIB + 4 * MIB).contains(&resident),
        "resident {resident} after plugging 1 GiB: {s}"
    );

    let (code, body) = http(
        &sock,
        "PATCH",
        "/hotplug/memory",
        Some(r#"{"requested_size": 0}"#),
    );
    assert_eq!(code, 204, "{body}");
    tide.wait_for("tide-guest: plugged 0 requested 0", T);
    let s = wait_plugged(&sock, 0);
    let resident = field(&s, "resident_bytes");
    assert!(
        resident <= MIB,
        "resident {resident} after unplugging everything: {s}"
    );

    let (code, _) = http(&sock, "PUT", "/vm/shutdown", None);
    assert_eq!(code, 204);
    assert!(tide.wait_exit(T).success(), "{}", tide.stderr());
}

#[test]
fn hostile_requests_get_the_right_answers_and_tide_keeps_running() {
    if !require_kvm("hostile_requests_get_the_right_answers_and_tide_keeps_running") {
        return;
    }
    let mut tide = Tide::run_guest(
        "console=ttyS0 tide.test=mem-hostile",
        &["--hotplug-size", "1G", "--requested", "64M"],
    );
    let status = tide.wait_exit(T);
    let out = tide.stdout();
    let answer = |name: &str| -> String {
        let prefix = format!("tide-guest: hostile {name}: ");
        let line = out
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {name} line:\n{out}"));
        line.split("-> ").nth(1).unwrap_or("").to_string()
    };
    for bad in [
        "misaligned",
        "beyond-region",
        "zero-blocks",
        "past-end",
        "double-plug",
        "unplug-unplugged",
        "unknown-type",
        "short-request",
    ] {
        assert!(
            answer(bad).starts_with("ERROR"),
            "{bad}: {}\n{out}",
            answer(bad)
        );
    }
    // A PLUG past the requested size is NACK whatever its range (checked first).
    assert!(
        answer("past-requested").starts_with("NACK"),
        "{}\n{out}",
        answer("past-requested")
    );
    assert!(answer("plug").starts_with("ACK"), "{out}");
    assert!(answer("state-plugged").starts_with("ACK PLUGGED"), "{out}");
    assert!(
        answer("state-unplugged").starts_with("ACK UNPLUGGED"),
        "{out}"
    );
    assert!(answer("state-mixed").starts_with("ACK MIXED"), "{out}");
    assert!(answer("no-writable").contains("len=0"), "{out}");
    assert!(answer("unplug").starts_with("ACK"), "{out}");
    assert!(out.contains("tide-guest: hostile final plug ACK"), "{out}");
    assert!(out.contains("tide-guest: hostile done"), "{out}");
    // Tide answered ERROR, after which a real driver stops using the device: the exit status
    // says so although the guest powered off on its own.
    assert_eq!(
        status.code(),
        Some(vmm::exit_status::DRIVER_FAILED),
        "{}",
        tide.stderr()
    );
    assert!(!tide.stderr().contains("panicked"));
}

#[test]
fn touching_unplugged_memory_is_reported_and_stops_the_guest() {
    if !require_kvm("touching_unplugged_memory_is_reported_and_stops_the_guest") {
        return;
    }
    let mut tide = Tide::run_guest(
        "console=ttyS0 tide.test=mem-touch-unplugged",
        &["--hotplug-size", "1G"],
    );
    let status = tide.wait_exit(T);
    let out = tide.stdout();
    assert!(
        out.contains("tide-guest: touching unplugged 0x100000000"),
        "{out}"
    );
    assert!(!out.contains("the guest was not stopped"), "{out}");
    assert!(!status.success());
    let err = tide.stderr();
    assert!(
        err.contains("unplugged hotplug memory at guest physical address 0x100000000"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

/// A guest that does not accept VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE may read unplugged memory.
/// On anonymous memory it reads zeros and the host allocates nothing (the resident memory is
/// measured after the guest read every page of a block); on the shared backends, where such a
/// read would allocate, the device refuses FEATURES_OK (the guest stops with "feature
/// negotiation").
#[test]
fn readable_unplugged_memory_reads_zero_without_allocating() {
    if !require_kvm("readable_unplugged_memory_reads_zero_without_allocating") {
        return;
    }
    let tmp = temp_dir("readable");
    let file = format!("file:{}", tmp.as_path().join("guest-mem").display());
    for backend in ["anon", "memfd", file.as_str()] {
        let sock = tmp.as_path().join("api.sock");
        let mut tide = Tide::run_guest(
            "console=ttyS0 tide.test=mem-read-unplugged tide.accept_inaccessible=0",
            &[
                "--hotplug-size",
                "1G",
                "--backend",
                backend,
                "--api-socket",
                sock.to_str().unwrap(),
            ],
        );
        if backend != "anon" {
            let status = tide.wait_exit(T);
            let out = tide.stdout();
            assert!(out.contains("FEATURES_OK not accepted"), "{backend}: {out}");
            assert!(!out.contains("read unplugged block"), "{backend}: {out}");
            assert!(!status.success() || out.contains("FAIL"), "{backend}");
            continue;
        }
        wait_for_path(&sock, T);
        tide.wait_for("tide-guest: plugged 0 requested 0", T);
        let out = tide.stdout();
        assert!(out.contains("driver features 0x100000000"), "{out}");
        assert!(
            out.contains("read unplugged block 0x100000000 sum 0x0"),
            "{out}"
        );
        let s = status(&sock);
        let resident = field(&s, "resident_bytes");
        assert!(resident < MIB, "{backend}: resident {resident}: {s}");
        let (code, _) = http(&sock, "PUT", "/vm/shutdown", None);
        assert_eq!(code, 204);
        assert!(tide.wait_exit(T).success(), "{}", tide.stderr());
    }
}

/// A device reset with memory plugged keeps the plug state (virtio 1.2 5.15.5); the
/// re-initialised driver finds plugged_size != 0 and sends UNPLUG_ALL, as Linux's does.
#[test]
fn device_reset_keeps_plugged_memory_and_the_next_driver_unplugs_all() {
    if !require_kvm("device_reset_keeps_plugged_memory_and_the_next_driver_unplugs_all") {
        return;
    }
    let mut tide = Tide::run_guest(
        "console=ttyS0 tide.test=mem-reset",
        &["--hotplug-size", "1G", "--requested", "128M"],
    );
    let status = tide.wait_exit(T);
    let out = tide.stdout();
    assert!(
        out.contains("tide-guest: after reset plugged 134217728"),
        "{out}"
    );
    assert!(out.contains("n=64 -> ACK PLUGGED"), "{out}");
    assert!(
        out.contains("tide-guest: after UNPLUG_ALL plugged 0"),
        "{out}"
    );
    assert!(status.success(), "{}", tide.stderr());
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn plug_the_host_cannot_back_gets_busy_and_the_guest_goes_on() {
    if !require_kvm("plug_the_host_cannot_back_gets_busy_and_the_guest_goes_on") {
        return;
    }
    let tmp = temp_dir("busy");
    let mnt = tmp.as_path().join("tmpfs");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = is_root()
        && Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                "size=64m",
                "tide-test",
                mnt.to_str().unwrap(),
            ])
            .status()
            .is_ok_and(|s| s.success());
    if !mounted {
        println!("SKIP plug_the_host_cannot_back_gets_busy_and_the_guest_goes_on: needs root to mount a size-limited tmpfs");
        return;
    }
    let backend = format!("file:{}", mnt.join("guest-mem").display());
    let mut tide = Tide::run_guest(
        "console=ttyS0 tide.test=mem-busy",
        &[
            "--hotplug-size",
            "1G",
            "--requested",
            "256M",
            "--backend",
            &backend,
        ],
    );
    let status = tide.wait_exit(T);
    let _ = Command::new("umount").arg(&mnt).status();
    let out = tide.stdout();
    let plugs: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("tide-guest: plug 0x"))
        .collect();
    assert!(
        plugs.first().is_some_and(|l| l.ends_with("n=128 -> BUSY")),
        "{out}"
    );
    // No resize comes: the device's retry timer raised the config change.
    assert!(
        out.contains("tide-guest: config change after BUSY"),
        "{out}"
    );
    assert!(
        plugs.get(1).is_some_and(|l| l.ends_with("n=1 -> ACK")),
        "{out}"
    );
    assert!(
        out.contains("tide-guest: plugged 2097152 requested"),
        "{out}"
    );
    assert!(status.success(), "{}", tide.stderr());
}

#[test]
fn usable_region_grows_with_requested_size_and_the_guest_follows() {
    if !require_kvm("usable_region_grows_with_requested_size_and_the_guest_follows") {
        return;
    }
    // Started with nothing requested, the usable region is 1 GiB of headroom; a 3 GiB request
    // widens it and the guest, reading the config again, plugs past the old limit.
    let (mut tide, sock, _tmp) = Tide::run_guest_with_api(
        "usable",
        "console=ttyS0 tide.test=mem-follow",
        &["--hotplug-size", "8G"],
    );
    tide.wait_for("tide-guest: plugged 0 requested 0", T);
    assert_eq!(field(&status(&sock), "usable_region_size"), GIB);
    let (code, body) = http(
        &sock,
        "PATCH",
        "/hotplug/memory",
        Some(r#"{"requested_size": 3221225472}"#),
    );
    assert_eq!(code, 204, "{body}");
    let s = wait_plugged(&sock, 3 * GIB);
    assert!(field(&s, "usable_region_size") >= 3 * GIB, "{s}");
    let (code, _) = http(&sock, "PUT", "/vm/shutdown", None);
    assert_eq!(code, 204);
    assert!(tide.wait_exit(T).success(), "{}", tide.stderr());
}

/// Populate ahead: with a guest that never plugs, Tide backs the requested blocks ahead
/// without plugging them or making them resident in the guest's memory, reports them apart,
/// gives them back when the requested size falls, and serves its metrics.
#[test]
fn populate_ahead_is_invisible_and_given_back() {
    if !require_kvm("populate_ahead_is_invisible_and_given_back") {
        return;
    }
    let (mut tide, sock, _tmp) = Tide::run_guest_with_api(
        "ahead",
        "console=ttyS0 tide.test=hang",
        &["--hotplug-size", "2G", "--requested", "256M"],
    );
    let end = Instant::now() + T;
    let s = loop {
        let s = status(&sock);
        if field(&s, "ahead_bytes") == 256 * MIB {
            break s;
        }
        assert!(Instant::now() < end, "never populated ahead: {s}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(field(&s, "plugged_size"), 0, "{s}");
    assert!(field(&s, "resident_bytes") <= MIB, "{s}");
    let (code, body) = http(&sock, "GET", "/metrics", None);
    assert_eq!(code, 200, "{body}");
    let m: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(m["plug"]["count"], 0, "{body}");
    assert_eq!(m["ahead"]["populated_bytes"], 256 * MIB, "{body}");

    let (code, body) = http(
        &sock,
        "PATCH",
        "/hotplug/memory",
        Some(r#"{"requested_size": 0}"#),
    );
    assert_eq!(code, 204, "{body}");
    let end = Instant::now() + T;
    loop {
        let s = status(&sock);
        if field(&s, "ahead_bytes") == 0 {
            break;
        }
        assert!(Instant::now() < end, "never given back: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, _) = http(&sock, "PUT", "/vm/shutdown", None);
    assert_eq!(code, 204);
    assert!(tide.wait_exit(T).success(), "{}", tide.stderr());
}

/// Linux's pattern (one 128 MiB request at a time) with populate ahead: the guest gets what it
/// asked for, its check of the plugged memory passes, resident memory follows, and nothing is
/// left populated ahead once it has plugged the requested size.
#[test]
fn linux_pattern_with_populate_ahead() {
    if !require_kvm("linux_pattern_with_populate_ahead") {
        return;
    }
    let (mut tide, sock, _tmp) = Tide::run_guest_with_api(
        "ahead-linux",
        "console=ttyS0 tide.test=mem-follow tide.chunk=128M",
        &["--hotplug-size", "2G"],
    );
    tide.wait_for("tide-guest: virtio-mem: usable", T);
    let (code, body) = http(
        &sock,
        "PATCH",
        "/hotplug/memory",
        Some(r#"{"requested_size": 536870912}"#),
    );
    assert_eq!(code, 204, "{body}");
    tide.wait_for("tide-guest: plugged 536870912 requested 536870912", T);
    let s = wait_plugged(&sock, 512 * MIB);
    let resident = field(&s, "resident_bytes");
    assert!(
        (512 * MIB..=516 * MIB).contains(&resident),
        "resident {resident}: {s}"
    );
    let end = Instant::now() + T;
    while field(&status(&sock), "ahead_bytes") != 0 {
        assert!(Instant::now() < end, "memory left populated ahead");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, body) = http(&sock, "GET", "/metrics", None);
    let m: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(m["plug"]["count"], 4, "four 128 MiB requests: {body}");
    assert_eq!(m["plug"]["ack"], 4, "{body}");
    let out = tide.stdout();
    assert!(!out.contains("FAIL") && !out.contains("MISMATCH"), "{out}");
    let (code, _) = http(&sock, "PUT", "/vm/shutdown", None);
    assert_eq!(code, 204);
    assert!(tide.wait_exit(T).success(), "{}", tide.stderr());
}

//! Tier 2: huge hotplug reservations cost no commit. `tide` boots with a 64 GiB and a 1 TiB
//! region, also with `vm.overcommit_memory=2`, and its own resident memory stays small.
//!
//! This file is its own test binary because it changes a machine-wide sysctl: cargo runs test
//! binaries one after the other, and the tests here run one at a time (a mutex).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tests::{http, require_kvm, temp_dir, wait_for_path, Tide};

const OVERCOMMIT: &str = "/proc/sys/vm/overcommit_memory";
static SERIAL: Mutex<()> = Mutex::new(());

/// Sets `vm.overcommit_memory` and puts the old value back on drop (also on panic).
struct Overcommit(String);

impl Overcommit {
    fn set(mode: &str) -> Option<Overcommit> {
        let old = std::fs::read_to_string(OVERCOMMIT).ok()?;
        std::fs::write(OVERCOMMIT, mode).ok()?;
        Some(Overcommit(old.trim().to_string()))
    }
}

impl Drop for Overcommit {
    fn drop(&mut self) {
        let _ = std::fs::write(OVERCOMMIT, &self.0);
    }
}

/// Boots the test guest with a `size` hotplug region, reads the VMM's peak Rss while the guest
/// runs, shuts it down over the API and returns (seconds from start to exit, peak Rss bytes).
fn boot_and_stop(size: &str) -> (f64, u64) {
    let tmp = temp_dir("big");
    let sock = tmp.as_path().join("api.sock");
    let started = Instant::now();
    let mut tide = Tide::run_guest(
        "console=ttyS0 tide.test=hang",
        &[
            "--hotplug-size",
            size,
            "--api-socket",
            sock.to_str().unwrap(),
            "--log-level",
            "info",
        ],
    );
    tide.wait_for("tide-guest: hanging", Duration::from_secs(120));
    wait_for_path(&sock, Duration::from_secs(10));
    let peak = tide.peak_rss().expect("VmHWM of tide");
    let (code, body) = http(&sock, "GET", "/hotplug/memory", None);
    assert_eq!(code, 200, "{body}");
    let s: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(s["plugged_size"], 0);
    assert!(s["resident_bytes"].as_u64().unwrap() <= 1 << 20, "{s}");
    let (code, _) = http(&sock, "PUT", "/vm/shutdown", None);
    assert_eq!(code, 204);
    assert!(
        tide.wait_exit(Duration::from_secs(60)).success(),
        "{}",
        tide.stderr()
    );
    let secs = started.elapsed().as_secs_f64();
    let slot_line = tide
        .stderr()
        .lines()
        .find(|l| l.contains("KVM slot registered"))
        .unwrap_or("")
        .to_string();
    println!(
        "hotplug {size}: start to exit {secs:.2} s, VMM peak Rss {} MiB; {slot_line}",
        peak >> 20
    );
    (secs, peak)
}

#[test]
fn hotplug_64g_boots_with_a_small_vmm() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !require_kvm("hotplug_64g_boots_with_a_small_vmm") {
        return;
    }
    let (_, peak) = boot_and_stop("64G");
    assert!(peak < 32 << 20, "VMM peak Rss {peak} with a 64 GiB region");
}

#[test]
fn hotplug_64g_and_1t_work_with_strict_overcommit() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !require_kvm("hotplug_64g_and_1t_work_with_strict_overcommit") {
        return;
    }
    let Some(_restore) = Overcommit::set("2") else {
        println!("SKIP hotplug_64g_and_1t_work_with_strict_overcommit: cannot set vm.overcommit_memory (needs root)");
        return;
    };
    let (_, peak) = boot_and_stop("64G");
    assert!(
        peak < 32 << 20,
        "VMM peak Rss {peak} with a 64 GiB region and overcommit_memory=2"
    );
    // 1 TiB: KVM itself spends seconds and GiBs of kernel memory on such a slot on this host
    // (no TDP MMU); the reservation itself is free.
    let (_, peak) = boot_and_stop("1T");
    assert!(
        peak < 32 << 20,
        "VMM peak Rss {peak} with a 1 TiB region and overcommit_memory=2"
    );
}

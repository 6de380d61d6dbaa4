//! Tier 2 soak: the test guest follows `requested_size` through many resize cycles (0 <-> 64 MiB
//! in 2 MiB blocks); at the end the host memory, threads and open files of `tide` are what they
//! were at the start.
//!
//! `TIDE_SOAK_CYCLES` sets the number of cycles (default 1000; one cycle is one PATCH and one
//! long poll until settled).

use memory::MIB;
use std::time::{Duration, Instant};

use tests::{field, http, require_kvm, wait_settled, Tide};

const T: Duration = Duration::from_secs(120);
const HIGH: u64 = 64 * MIB;

fn cycles() -> u32 {
    match std::env::var("TIDE_SOAK_CYCLES") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("TIDE_SOAK_CYCLES={s:?} is not a number")),
        Err(_) => 1000,
    }
}

#[test]
fn soak_resize_cycles_leave_no_memory_threads_or_fds_behind() {
    let name = "soak_resize_cycles_leave_no_memory_threads_or_fds_behind";
    if !require_kvm(name) {
        return;
    }
    let cycles = cycles();
    let (mut tide, sock, _tmp) = Tide::run_guest_with_api(
        "soak",
        "console=ttyS0 tide.test=mem-follow",
        &["--hotplug-size", "256M", "--requested", "0"],
    );
    tide.wait_for("tide-guest: virtio-mem: usable", T);
    let s = wait_settled(&sock, T);
    let resident0 = field(&s, "resident_bytes");
    let (threads0, fds0) = tide.threads_and_fds();

    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..cycles {
        let c0 = Instant::now();
        let want = if i % 2 == 0 { HIGH } else { 0 };
        let body = format!(r#"{{"requested_size": {want}}}"#);
        let (code, resp) = http(&sock, "PATCH", "/hotplug/memory", Some(&body));
        assert_eq!(code, 204, "cycle {i}: {resp}");
        let s = wait_settled(&sock, T);
        assert_eq!(field(&s, "plugged_size"), want, "cycle {i}: {s}");
        slowest = slowest.max(c0.elapsed());
    }
    let elapsed = start.elapsed();

    // End unplugged (an odd count ends at 64 MiB).
    let body = r#"{"requested_size": 0}"#;
    let (code, resp) = http(&sock, "PATCH", "/hotplug/memory", Some(body));
    assert_eq!(code, 204, "{resp}");
    let s = wait_settled(&sock, T);
    assert_eq!(field(&s, "plugged_size"), 0, "{s}");
    let resident = field(&s, "resident_bytes");
    assert!(
        resident.abs_diff(resident0) <= MIB,
        "resident {resident} after {cycles} cycles, {resident0} at the start: {s}"
    );
    let (threads, fds) = tide.threads_and_fds();
    assert_eq!(threads, threads0, "threads after {cycles} cycles");
    assert_eq!(fds, fds0, "open fds after {cycles} cycles");
    let out = tide.stdout();
    assert!(!out.contains("FAIL"), "{out}");
    assert!(!out.contains("MISMATCH"), "{out}");
    assert!(!out.contains("not zero"), "{out}");
    println!(
        "{name}: {cycles} cycles (0 <-> {} MiB) in {elapsed:.2?}, {:.1?} per cycle, slowest \
         {slowest:.1?}; resident {resident} (start {resident0}), {threads} threads, {fds} fds",
        HIGH / MIB,
        elapsed / cycles.max(1)
    );

    let (code, _) = http(&sock, "PUT", "/vm/shutdown", None);
    assert_eq!(code, 204);
    assert!(tide.wait_exit(T).success(), "{}", tide.stderr());
}

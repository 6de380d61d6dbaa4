//! The guest's own view in the API: the driver's health as the virtio-mem device sees it (tier 2,
//! the test guest), and what the project's Linux guest reports over the guest channel (tier 3:
//! its user space is ready, the memory it has online, and `wait_for=online`).

use std::path::Path;
use std::time::Duration;

use tests::linux::{guest_or_skip, LinuxGuest, COMMAND_TIMEOUT, HOTPLUG_BASE};
use tests::{
    field, http, patch, require_kvm, status, temp_dir, test_guest, tide_bin, wait_for_path, Tide,
    API_SOCKET_WAIT,
};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(120);

/// The `driver` object of the status.
fn driver(sock: &Path) -> serde_json::Value {
    status(sock)["driver"].clone()
}

/// `tide ctl --api-socket SOCK ARGS...`; returns its stdout, panicking unless it exits 0.
fn ctl(sock: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(tide_bin())
        .arg("ctl")
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .output()
        .expect("run tide ctl");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "tide ctl {args:?}: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Tier 2: the test guest's `mem-health` scenario waits for a key on the console before each
/// step, so the status is read at each: no driver yet (a resize is still accepted), active with
/// its last request, failed once a request was answered ERROR (with the request and the
/// reason), failed by the driver setting FAILED.
#[test]
fn driver_health_from_no_driver_to_failed() {
    if !require_kvm("driver_health_from_no_driver_to_failed") {
        return;
    }
    let tmp = temp_dir("driver-health");
    let sock = tmp.as_path().join("api.sock");
    let mut tide = Tide::spawn_console([
        "run".to_string(),
        "--kernel".into(),
        test_guest().display().to_string(),
        "--cmdline".into(),
        "console=ttyS0 tide.test=mem-health".into(),
        "--hotplug-size".into(),
        "1G".into(),
        "--api-socket".into(),
        sock.display().to_string(),
    ]);
    wait_for_path(&sock, API_SOCKET_WAIT);
    tide.wait_for("tide-guest: waiting for a key before the driver starts", T);

    // No driver yet: the status says so, and a resize is accepted all the same.
    let d = driver(&sock);
    assert_eq!(d["state"], "absent", "{d}");
    assert_eq!(d["summary"], "no driver yet", "{d}");
    assert!(d["last_request_ms_ago"].is_null(), "{d}");
    assert!(d["last_error"].is_null(), "{d}");
    patch(&sock, 4 * MIB);
    let s = status(&sock);
    assert_eq!(field(&s, "requested_size"), 4 * MIB, "{s}");
    assert_eq!(s["driver"]["summary"], "no driver yet", "{s}");
    let table = ctl(&sock, &["status"]);
    assert!(table.contains("driver      no driver yet"), "{table}");

    // The driver comes and plugs what was requested before it existed.
    tide.send("1");
    tide.wait_for(
        "tide-guest: waiting for a key before a misaligned unplug",
        T,
    );
    let s = status(&sock);
    assert_eq!(field(&s, "plugged_size"), 4 * MIB, "{s}");
    let d = &s["driver"];
    assert_eq!(d["state"], "active", "{d}");
    assert_eq!(d["requests"], 1, "{d}");
    assert!(d["last_request_ms_ago"].is_u64(), "{d}");
    assert!(d["failure"].is_null(), "{d}");

    // A request answered ERROR: recorded with the request and the reason.
    tide.send("2");
    tide.wait_for("tide-guest: waiting for a key before FAILED", T);
    let out = tide.stdout();
    assert!(
        out.contains("misaligned unplug 0x100001000 n=1 -> ERROR"),
        "{out}"
    );
    let d = driver(&sock);
    assert_eq!(d["state"], "failed", "{d}");
    assert_eq!(d["requests"], 2, "{d}");
    let failure = d["failure"].as_str().unwrap_or_default();
    assert!(failure.contains("answered ERROR"), "{d}");
    let e = &d["last_error"];
    assert_eq!(e["request"]["type"], "unplug", "{d}");
    assert_eq!(e["request"]["addr"], HOTPLUG_BASE + 4096, "{d}");
    assert_eq!(e["request"]["nb_blocks"], 1, "{d}");
    let reason = e["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("not aligned to the block size"), "{d}");
    let table = ctl(&sock, &["status"]);
    assert!(
        table.contains("last ERROR: unplug of 1 blocks at 0x100001000"),
        "{table}"
    );

    // The driver sets FAILED.
    tide.send("3");
    tide.wait_for("tide-guest: waiting for a key before power off", T);
    let d = driver(&sock);
    assert_eq!(d["state"], "failed", "{d}");
    assert_eq!(d["summary"], "failed: the driver set FAILED", "{d}");
    assert_eq!(d["status"].as_u64().unwrap_or(0) & 128, 128, "{d}");
    assert!(!d["last_error"].is_null(), "the ERROR stays on record: {d}");

    // The exit status says the same (docs/ci.md: 252, the driver failed the device).
    tide.send("4");
    let st = tide.wait_exit(T);
    assert_eq!(st.code(), Some(252), "{st:?}\n{}", tide.stderr());
}

/// Long-polls `wait_for=online` until it answers settled (bounded by [`COMMAND_TIMEOUT`]).
fn wait_online(sock: &Path) -> serde_json::Value {
    let end = std::time::Instant::now() + COMMAND_TIMEOUT;
    loop {
        let (code, body) = http(
            sock,
            "GET",
            "/hotplug/memory?wait_for=online&timeout_ms=60000",
            None,
        );
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
        if v["settled"] == true {
            return v;
        }
        assert!(
            std::time::Instant::now() < end,
            "never online: {v}\n{}",
            "(the guest reports over ttyS1)"
        );
    }
}

/// Tier 3: the project's guest reports ready and what it has online over the guest channel;
/// `wait_for=online` answers only once the guest's MemTotal shows the plugged size (read in the
/// guest right after the answer), and the reported size follows a resize up and down (the way
/// down through `tide ctl resize --wait`, which waits for the guest's view too).
#[test]
fn linux_guest_reports_ready_and_online_memory() {
    let test = "linux_guest_reports_ready_and_online_memory";
    let Some(dir) = guest_or_skip(test) else {
        return;
    };
    let mut g = LinuxGuest::boot(
        &dir,
        "guest-view",
        &["--hotplug-size", "1G", "--block-size", "2M"],
    );
    // Ready: the guest's init said so (a long poll, answered at once here).
    let (code, body) = http(
        &g.sock,
        "GET",
        "/vm?wait_for=guest_ready&timeout_ms=600000",
        None,
    );
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        (v["settled"].clone(), v["guest_ready"].clone()),
        (true.into(), true.into()),
        "{v}"
    );
    ctl(&g.sock, &["wait", "ready", "--timeout", "600"]);

    let boot = g.boot_mem_total_kib;
    let check = |g: &mut LinuxGuest, bytes: u64, v: &serde_json::Value| {
        // Right after the answer, in the guest.
        let mem_total = g.mem_total_kib();
        assert_eq!(
            mem_total,
            boot + bytes / 1024,
            "MemTotal right after the online answer for {} MiB: {v}",
            bytes / MIB
        );
        assert_eq!(field(v, "plugged_size"), bytes, "{v}");
        assert_eq!(field(v, "guest_online_size"), bytes, "{v}");
        println!(
            "linux: online {} MiB: MemTotal {mem_total} kB (boot {boot} kB) at {:.0} s",
            bytes / MIB,
            g.tide.started.elapsed().as_secs_f64()
        );
    };
    let v = status(&g.sock);
    assert_eq!(field(&v, "guest_online_size"), 0, "{v}");

    // Up.
    patch(&g.sock, 384 * MIB);
    let v = wait_online(&g.sock);
    check(&mut g, 384 * MIB, &v);

    // Down, through tide ctl.
    ctl(
        &g.sock,
        &[
            "resize",
            "128M",
            "--wait",
            "--timeout",
            &COMMAND_TIMEOUT.as_secs().to_string(),
        ],
    );
    let v = status(&g.sock);
    check(&mut g, 128 * MIB, &v);

    // Down to nothing.
    patch(&g.sock, 0);
    let v = wait_online(&g.sock);
    check(&mut g, 0, &v);

    let st = g.power_off();
    assert!(st.success(), "tide exited with {st:?}");
}

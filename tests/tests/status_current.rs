//! Tier 2: `GET /hotplug/memory` right after a resize answers a current `resident_bytes` (anon:
//! the latest page-table walk moved by what was plugged since), and says how old the walk is.

use std::time::{Duration, Instant};

use tests::{field, http, patch, require_kvm, status, Tide};

const T: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

#[test]
fn resident_bytes_right_after_a_resize_is_current() {
    if !require_kvm("resident_bytes_right_after_a_resize_is_current") {
        return;
    }
    let (mut tide, sock, _tmp) = Tide::run_guest_with_api(
        "status-current",
        "console=ttyS0 tide.test=mem-follow",
        &["--hotplug-size", "256M", "--no-populate-ahead"],
    );
    tide.wait_for("tide-guest: virtio-mem: ready", T);
    // A first walk with nothing being plugged (a status asks for one): the event is its age
    // showing in a status.
    let end = Instant::now() + T;
    loop {
        let s = status(&sock);
        assert_eq!(field(&s, "plugged_size"), 0, "{s}");
        if s["resident_age_ms"].is_u64() {
            break;
        }
        assert!(Instant::now() < end, "no page-table walk: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = tide.wait_for("virtio-mem: usable", T);
    for size in [64 * MIB, 192 * MIB, 32 * MIB] {
        patch(&sock, size);
        let line = format!("tide-guest: plugged {size} requested {size}");
        tide.wait_for_after("virtio-mem: usable", &line, out.clone(), T);
        // The guest has its memory: the very next GET says so.
        let s = status(&sock);
        assert_eq!(field(&s, "plugged_size"), size, "{s}");
        let resident = field(&s, "resident_bytes");
        assert!(
            resident >= size && resident <= size + 8 * MIB,
            "plugged {size}, resident {resident}: {s}"
        );
        assert!(s["resident_age_ms"].is_u64(), "{s}");
    }
    assert_eq!(http(&sock, "PUT", "/vm/shutdown", None).0, 204);
    assert!(tide.wait_exit(T).success());
}

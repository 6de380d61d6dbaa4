//! Tier 3: a Linux guest with 256 MiB plugged through its own virtio-mem driver is paused,
//! snapshotted, its tide ended, and restored by a new `tide restore`: its shell answers,
//! MemTotal is unchanged, resizes to 512 MiB and to 0 converge, and its kernel log has no new
//! problem.

use std::path::Path;
use std::time::Duration;

use tests::linux::{LinuxGuest, COMMAND_TIMEOUT};
use tests::{field, http, patch, wait_for_path, wait_settled, Tide};

const MIB: u64 = 1 << 20;

fn resize(g: &mut LinuxGuest, bytes: u64) {
    patch(&g.sock, bytes);
    let st = wait_settled(&g.sock, COMMAND_TIMEOUT);
    assert_eq!(field(&st, "plugged_size"), bytes, "{st}");
    let expected = g.boot_mem_total_kib + bytes / 1024;
    g.wait_mem_total(expected);
}

fn api(sock: &Path, method: &str, path: &str, body: Option<&str>, want: u16) -> String {
    let (code, resp) = http(sock, method, path, body);
    assert_eq!(code, want, "{method} {path}: {resp}");
    resp
}

#[test]
fn linux_guest_snapshot_and_restore_with_plugged_memory() {
    let test = "linux_guest_snapshot_and_restore_with_plugged_memory";
    let Some(dir) = tests::linux::guest_or_skip(test) else {
        return;
    };
    let mut g = LinuxGuest::boot(
        &dir,
        "linux-snapshot",
        &["--hotplug-size", "2G", "--block-size", "2M"],
    );
    resize(&mut g, 256 * MIB);
    let mem_total = g.mem_total_kib();
    let problems_before = g.kernel_log_problems();

    let files = tempdir_beside(&g.sock);
    let snap = files.join("linux.snap");
    let mem = files.join("linux.mem");
    api(&g.sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204);
    let body = serde_json::json!({ "snapshot_path": snap, "mem_file_path": mem }).to_string();
    let info = api(&g.sock, "PUT", "/snapshot/create", Some(&body), 200);
    println!("linux: snapshot {info}");
    api(&g.sock, "PUT", "/vm/shutdown", None, 204);
    assert!(g.tide.wait_exit(COMMAND_TIMEOUT).success());

    let sock = files.join("restored.sock");
    g.tide = Tide::spawn_console([
        "restore",
        "--snapshot",
        snap.to_str().unwrap(),
        "--mem-file",
        mem.to_str().unwrap(),
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    wait_for_path(&sock, Duration::from_secs(120));
    g.sock = sock;
    let out = g.sh("read os </proc/sys/kernel/ostype; echo hello again from $os");
    assert!(out.contains("hello again from Linux"), "{out}");
    assert_eq!(
        g.mem_total_kib(),
        mem_total,
        "MemTotal changed across the restore"
    );
    resize(&mut g, 512 * MIB);
    resize(&mut g, 0);
    let problems = g.kernel_log_problems();
    let new: Vec<_> = problems
        .iter()
        .filter(|l| !problems_before.contains(l))
        .collect();
    if !new.is_empty() {
        let log = g.kernel_log();
        panic!("new kernel log problems:\n{new:?}\nthe whole log:\n{log}");
    }
    let st = g.power_off();
    assert!(st.success(), "tide exited with {st:?}");
    let _ = std::fs::remove_dir_all(&files);
}

/// A new directory for the snapshot files next to the guest's socket directory.
fn tempdir_beside(sock: &Path) -> std::path::PathBuf {
    let d = sock
        .parent()
        .expect("socket directory")
        .join("snapshot-files");
    std::fs::create_dir_all(&d).expect("create the snapshot directory");
    d
}

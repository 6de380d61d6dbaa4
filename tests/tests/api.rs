//! Tier 2: a user's session with the control socket. `tide run` with the test guest following
//! requested_size; `tide ctl resize --wait` and `status`; the same through plain curl; and
//! hostile HTTP that gets the right 4xx while tide keeps serving.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::{http, require_kvm, temp_dir, tide_bin, wait_for_path, Tide};

const T: Duration = Duration::from_secs(120);

fn ctl(sock: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(tide_bin())
        .args(["ctl", "--api-socket", sock.to_str().unwrap()])
        .args(args)
        .output()
        .expect("run tide ctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn raw(sock: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(bytes).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp
}

fn status_code(resp: &str) -> u16 {
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn resize_a_running_guest_with_tide_ctl_and_curl() {
    if !require_kvm("resize_a_running_guest_with_tide_ctl_and_curl") {
        return;
    }
    let tmp = temp_dir("api");
    let sock = tmp.as_path().join("tide.sock");
    let mut tide = Tide::run_guest(
        "console=ttyS0 tide.test=mem-follow",
        &[
            "--hotplug-size",
            "4G",
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    );
    wait_for_path(&sock, T);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    tide.wait_for("tide-guest: plugged 0 requested 0", T);

    // tide ctl
    let (code, _, err) = ctl(&sock, &["resize", "1G", "--wait", "--timeout", "100"]);
    assert_eq!(code, 0, "{err}");
    let (code, json, _) = ctl(&sock, &["status", "--json"]);
    assert_eq!(code, 0);
    let s: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(s["plugged_size"], 1u64 << 30, "{s}");
    assert_eq!(s["requested_size"], 1u64 << 30, "{s}");
    let resident = s["resident_bytes"].as_u64().unwrap();
    assert!((1 << 30..(1 << 30) + (4 << 20)).contains(&resident), "{s}");
    let (code, table, _) = ctl(&sock, &["status"]);
    assert_eq!(code, 0);
    assert!(
        table.contains("plugged") && (table.contains("1 GiB") || table.contains("1024 MiB")),
        "{table}"
    );
    let (code, _, err) = ctl(&sock, &["resize", "0", "--wait", "--timeout", "100"]);
    assert_eq!(code, 0, "{err}");
    let (_, json, _) = ctl(&sock, &["status", "--json"]);
    let s: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(s["plugged_size"], 0, "{s}");
    assert!(s["resident_bytes"].as_u64().unwrap() <= 1 << 20, "{s}");

    // The same with plain curl.
    let curl = |args: &[&str]| {
        Command::new("curl")
            .args([
                "-s",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                "--unix-socket",
                sock.to_str().unwrap(),
            ])
            .args(args)
            .output()
    };
    match curl(&["-X", "PATCH", "-d", r#"{"requested_size": 536870912}"#, "http://localhost/hotplug/memory"]) {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(text.ends_with("204"), "{text}");
            let out = curl(&["http://localhost/hotplug/memory?wait_for=plugged_size&timeout_ms=100000"]).unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(text.contains("\"plugged_size\":536870912"), "{text}");
            let out = curl(&["http://localhost/vm"]).unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(text.contains("\"state\":\"running\"") && text.ends_with("200"), "{text}");
        }
        Err(e) => println!("SKIP curl part of resize_a_running_guest_with_tide_ctl_and_curl: curl not runnable ({e})"),
    }

    // Hostile HTTP: each gets its 4xx and tide keeps serving.
    assert_eq!(status_code(&raw(&sock, b"GARBAGE\r\n\r\n")), 400);
    assert_eq!(status_code(&raw(&sock, b"GET /nope HTTP/1.1\r\n\r\n")), 404);
    assert_eq!(
        status_code(&raw(&sock, b"DELETE /hotplug/memory HTTP/1.1\r\n\r\n")),
        405
    );
    let big = format!(
        "PATCH /hotplug/memory HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        10 << 20
    );
    assert_eq!(status_code(&raw(&sock, big.as_bytes())), 413);
    let mut huge_header = b"GET /vm HTTP/1.1\r\nX-Pad: ".to_vec();
    huge_header.extend(std::iter::repeat_n(b'a', 16 << 10));
    huge_header.extend_from_slice(b"\r\n\r\n");
    assert_eq!(status_code(&raw(&sock, &huge_header)), 431);
    for body in [
        r#"{"requested_size": "#,
        r#"{"requested_size": "1G"}"#,
        r#"{"size": 5}"#,
        "[]",
    ] {
        let (code, resp) = http(&sock, "PATCH", "/hotplug/memory", Some(body));
        assert_eq!(code, 400, "{body}: {resp}");
        assert!(resp.contains("\"error\""), "{resp}");
    }
    for bad in ["3", "5368709120"] {
        let (code, resp) = http(
            &sock,
            "PATCH",
            "/hotplug/memory",
            Some(&format!(r#"{{"requested_size": {bad}}}"#)),
        );
        assert_eq!(code, 400, "{bad}: {resp}");
    }
    let (code, _) = http(&sock, "GET", "/vm", None);
    assert_eq!(code, 200, "tide stopped serving after bad requests");

    let (code, _, _) = ctl(&sock, &["shutdown"]);
    assert_eq!(code, 0);
    assert!(tide.wait_exit(T).success(), "{}", tide.stderr());
    assert!(!sock.exists(), "the socket file is removed at exit");
}

#[test]
fn an_api_socket_in_use_is_refused_and_a_stale_one_replaced() {
    if !require_kvm("an_api_socket_in_use_is_refused_and_a_stale_one_replaced") {
        return;
    }
    let tmp = temp_dir("api-stale");
    let sock = tmp.as_path().join("tide.sock");
    // A stale socket file (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let mut first = Tide::run_guest(
        "console=ttyS0 tide.test=hang",
        &["--api-socket", sock.to_str().unwrap()],
    );
    first.wait_for("tide-guest: hanging", T);
    let (code, _) = http(&sock, "GET", "/vm", None);
    assert_eq!(code, 200);
    // A second tide on the same socket is refused with a one-line error.
    let mut second = Tide::run_guest("console=ttyS0", &["--api-socket", sock.to_str().unwrap()]);
    let st = second.wait_exit(T);
    assert!(!st.success());
    let err = second.stderr();
    assert!(err.contains("in use"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let (code, _) = http(&sock, "PUT", "/vm/shutdown", None);
    assert_eq!(code, 204);
    assert!(first.wait_exit(T).success());
}

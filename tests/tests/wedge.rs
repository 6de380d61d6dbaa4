//! Tier 2: nothing around the Tide process can wedge it. A stderr nobody reads or nobody can
//! read any more, a guest that makes Tide log as fast as it can, the fd limit, a socket path
//! that a stuck process holds: each gets a defined answer, never a hang, a panic or a spin.
//!
//! The stops here are bounded by a generous deadline that only detects a hang; the measured
//! times are printed.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tests::{http, require_kvm, temp_dir, test_guest, tide_bin, wait_for_path, TempDir};

/// Deadline of a stop: a hang detector only, generous for a loaded machine (a stop takes well
/// under a second; the times are printed).
const STOP: Duration = Duration::from_secs(60);
/// Deadline of the guest's progress (boots and floods take seconds here).
const T: Duration = Duration::from_secs(120);

/// A pipe: (read end, write end).
fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

/// Fills the pipe of write end `w` completely through a non-blocking open file description of
/// its own (so that the description the child gets stays blocking). Returns the bytes written.
fn fill_pipe(w: &File) -> usize {
    let mut nb = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags_nonblock()
        .open(format!("/proc/self/fd/{}", w.as_raw_fd()))
        .unwrap();
    let chunk = [b'#'; 512];
    let mut n = 0;
    loop {
        match nb.write(&chunk) {
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return n,
            Err(e) => panic!("filling the pipe: {e}"),
        }
    }
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK)
    }
}

/// Collects a child's stdout (the guest console) in the background.
fn collect(mut r: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

fn text(b: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&b.lock().unwrap()).into_owned()
}

/// Starts the log-flooding guest with `stderr` as Tide's stderr; returns the child, its console
/// and the API socket (in `tmp`).
fn flood(tmp: &TempDir, stderr: Stdio) -> (Child, Arc<Mutex<Vec<u8>>>, std::path::PathBuf) {
    let sock = tmp.as_path().join("api.sock");
    let mut child = Command::new(tide_bin())
        .args(["run", "--kernel"])
        .arg(test_guest())
        .args([
            "--cmdline",
            "console=ttyS0 tide.test=mem-log-flood",
            "--hotplug-size",
            "64M",
            "--requested",
            "2M",
            "--api-socket",
        ])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let console = collect(child.stdout.take().unwrap());
    wait_for_path(&sock, T);
    (child, console, sock)
}

/// Waits until the console shows `needle`; panics with the console on time-out or exit.
fn wait_console(child: &mut Child, console: &Arc<Mutex<Vec<u8>>>, needle: &str) {
    let end = Instant::now() + T;
    loop {
        let out = text(console);
        if out.contains(needle) {
            return;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("tide exited ({st:?}) before {needle:?}\n{out}");
        }
        assert!(Instant::now() < end, "no {needle:?} within {T:?}\n{out}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for the child to exit within [`STOP`] of `since`; kills it and panics otherwise.
fn wait_stopped(child: &mut Child, since: Instant, what: &str) -> std::process::ExitStatus {
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            println!("{what}: stopped in {:?}", since.elapsed());
            return st;
        }
        if since.elapsed() > STOP {
            let threads = thread_states(child.id());
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: tide did not stop within {STOP:?}; its threads:\n{threads}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Each thread of `pid`: name, state, where it waits in the kernel (for a hang's report).
fn thread_states(pid: u32) -> String {
    let mut out = String::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in dir.flatten() {
        let p = t.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().next().unwrap_or("?").to_string())
            .unwrap_or_default();
        out.push_str(&format!(
            "{} {} {} wchan={} {}\n",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            state,
            read("wchan").trim(),
            read("stack")
                .lines()
                .take(4)
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    out
}

/// With stderr a pipe that is full and that nobody reads, a guest making Tide log as fast as it
/// can: `PUT /vm/shutdown`, and one SIGTERM, each stop Tide.
#[test]
fn a_full_log_pipe_nobody_reads_holds_neither_a_shutdown_nor_a_sigterm() {
    if !require_kvm("a_full_log_pipe_nobody_reads_holds_neither_a_shutdown_nor_a_sigterm") {
        return;
    }
    for how in ["PUT /vm/shutdown", "SIGTERM"] {
        let tmp = temp_dir("wedge-log");
        let (mut r, w) = pipe();
        let prefill = fill_pipe(&w);
        let (mut child, console, sock) = flood(&tmp, Stdio::from(w));
        // Thousands of logged events, every one of them with stderr full.
        wait_console(&mut child, &console, "log-flood: 4096 requests answered");
        let t = Instant::now();
        if how == "SIGTERM" {
            // SAFETY: kill with the pid of our own child.
            assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        } else {
            assert_eq!(http(&sock, "PUT", "/vm/shutdown", None).0, 204);
        }
        let st = wait_stopped(&mut child, t, how);
        // The flood's malformed requests were answered ERROR: a stop that would be 0 says the
        // driver failed the device (vmm::exit_status).
        let want = if how == "SIGTERM" {
            128 + libc::SIGTERM
        } else {
            vmm::exit_status::DRIVER_FAILED
        };
        assert_eq!(st.code(), Some(want), "{how}: {st:?}");
        // Nothing could be added to the full pipe.
        let mut log = Vec::new();
        r.read_to_end(&mut log).unwrap();
        assert_eq!(log.len(), prefill, "{how}");
    }
}

/// A guest making Tide log as fast as it can, stderr a pipe nobody reads until Tide has
/// stopped: the log holds a bounded number of lines, and the count of what the rate limit held
/// back. (Without the limit, 64 KiB of lines fill the pipe and the logging thread waits.)
#[test]
fn a_guest_cannot_flood_the_log() {
    if !require_kvm("a_guest_cannot_flood_the_log") {
        return;
    }
    let tmp = temp_dir("wedge-flood");
    let (mut r, w) = pipe();
    let (mut child, console, sock) = flood(&tmp, Stdio::from(w));
    wait_console(&mut child, &console, "log-flood: 8192 requests answered");
    let (code, body) = http(&sock, "GET", "/metrics", None);
    assert_eq!(code, 200, "{body}");
    let m: serde_json::Value = serde_json::from_str(&body).unwrap();
    let kinds = &m["log"]["guest_messages"];
    for kind in [
        "virtio-mem invalid range",
        "virtio-mmio status write out of order",
    ] {
        let count = kinds[kind]["count"].as_u64().unwrap_or(0);
        let logged = kinds[kind]["logged"].as_u64().unwrap_or(u64::MAX);
        assert!(count >= 8192, "{kind}: {m}");
        assert!(logged < 100, "{kind}: {m}");
    }
    let t = Instant::now();
    assert_eq!(http(&sock, "PUT", "/vm/shutdown", None).0, 204);
    let st = wait_stopped(&mut child, t, "shutdown");
    // Answered ERROR: the driver-failed status (vmm::exit_status), not 0.
    assert_eq!(st.code(), Some(vmm::exit_status::DRIVER_FAILED), "{st:?}");
    let mut log = String::new();
    r.read_to_string(&mut log).unwrap();
    let lines = log.lines().count();
    println!("{lines} log lines:\n{log}");
    assert!(lines < 100, "{lines} lines");
    let summary = log
        .lines()
        .find(|l| l.contains("held back by the rate limit"))
        .unwrap_or_else(|| panic!("no rate-limit summary in:\n{log}"));
    assert!(summary.contains("virtio-mem invalid range"), "{summary}");
}

/// With stderr's reader gone (EPIPE), logging panicked the virtio-mem worker: the device never
/// answered again. Now the lines are dropped and the device keeps answering.
#[test]
fn a_closed_log_pipe_does_not_stop_the_device() {
    if !require_kvm("a_closed_log_pipe_does_not_stop_the_device") {
        return;
    }
    let tmp = temp_dir("wedge-epipe");
    let (r, w) = pipe();
    drop(r);
    let (mut child, console, sock) = flood(&tmp, Stdio::from(w));
    wait_console(&mut child, &console, "log-flood: 4096 requests answered");
    let out = text(&console);
    assert!(!out.contains("unexpected answer"), "{out}");
    let t = Instant::now();
    assert_eq!(http(&sock, "PUT", "/vm/shutdown", None).0, 204);
    let st = wait_stopped(&mut child, t, "shutdown");
    // Answered ERROR: the driver-failed status (vmm::exit_status), not 0.
    assert_eq!(st.code(), Some(vmm::exit_status::DRIVER_FAILED), "{st:?}");
}

/// `tide ctl status` whose stdout is closed (`| head -0`): a quiet exit, not a panic.
#[test]
fn ctl_with_a_closed_stdout_exits_quietly() {
    let tmp = temp_dir("wedge-ctl-stdout");
    let sock = tmp.as_path().join("api.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        let body = r#"{"region_size":67108864,"block_size":2097152,"requested_size":0,"plugged_size":0,"usable_region_size":67108864,"backend":"anon","resident_bytes":0}"#;
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    });
    let (r, w) = pipe();
    drop(r);
    let out = Command::new(tide_bin())
        .args(["ctl", "--api-socket"])
        .arg(&sock)
        .arg("status")
        .stdin(Stdio::null())
        .stdout(Stdio::from(w))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    server.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert!(err.is_empty(), "{err}");
}

/// Sets the soft fd limit of process `pid` to `limit` (at most its hard limit).
fn set_nofile(pid: u32, limit: u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit reads nothing and writes `old`.
    let r = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(r, 0);
    let new = libc::rlimit {
        rlim_cur: limit.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: prlimit reads `new` and writes nothing.
    let r = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
}

/// The lowest fd number process `pid` has free (a limit of that leaves it none).
fn lowest_free_fd(pid: u32) -> u64 {
    let open: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !open.contains(n)).unwrap()
}

/// At the fd limit `accept()` fails with EMFILE: the event loop spun on the listener, logging
/// each time. Now it stops watching the listener, logs once, and serves again once an fd is free.
#[test]
fn the_fd_limit_makes_the_api_wait_not_spin() {
    if !require_kvm("the_fd_limit_makes_the_api_wait_not_spin") {
        return;
    }
    let tmp = temp_dir("wedge-emfile");
    let sock = tmp.as_path().join("api.sock");
    let mut child = Command::new(tide_bin())
        .args(["run", "--kernel"])
        .arg(test_guest())
        .args([
            "--cmdline",
            "console=ttyS0 tide.test=mem-follow",
            "--hotplug-size",
            "64M",
            "--api-socket",
        ])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = collect(child.stderr.take().unwrap());
    wait_for_path(&sock, T);
    assert_eq!(http(&sock, "GET", "/vm", None).0, 200);
    let pid = child.id();
    // No fd left: the next accept fails with EMFILE.
    set_nofile(pid, lowest_free_fd(pid));
    let mut client = UnixStream::connect(&sock).unwrap();
    client
        .write_all(b"GET /vm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let end = Instant::now() + T;
    while !text(&log).contains("accept failed") {
        assert!(Instant::now() < end, "no accept failure logged");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A while at the limit, where a spinning loop would log line after line.
    std::thread::sleep(Duration::from_secs(1));
    // Room again: the waiting client is served.
    set_nofile(pid, 1024);
    client.set_read_timeout(Some(T)).unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let t = Instant::now();
    assert_eq!(http(&sock, "PUT", "/vm/shutdown", None).0, 204);
    assert!(wait_stopped(&mut child, t, "shutdown").success());
    std::thread::sleep(Duration::from_millis(50));
    let log = text(&log);
    let failures = log.matches("accept failed").count();
    println!("accept failures logged: {failures}");
    assert_eq!(failures, 1, "{}", &log[..log.len().min(2000)]);
}

/// A live socket whose owner stopped accepting (its backlog full): `tide run` connected to it
/// with a blocking connect and hung. Now it says the socket is in use and stops.
#[test]
fn a_socket_path_held_by_a_stuck_process_is_refused_without_hanging() {
    if !require_kvm("a_socket_path_held_by_a_stuck_process_is_refused_without_hanging") {
        return;
    }
    let tmp = temp_dir("wedge-sock");
    let sock = tmp.as_path().join("api.sock");
    let _held = stuck_listener(&sock);
    let t = Instant::now();
    let mut child = Command::new(tide_bin())
        .args(["run", "--kernel"])
        .arg(test_guest())
        .args(["--cmdline", "console=ttyS0 tide.test=hang", "--api-socket"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = collect(child.stderr.take().unwrap());
    let st = wait_stopped(&mut child, t, "start");
    std::thread::sleep(Duration::from_millis(50));
    let log = text(&log);
    assert!(!st.success(), "{log}");
    assert!(log.contains("in use"), "{log}");
    assert!(sock.exists());
}

/// A listening socket at `path` with a full backlog that nobody accepts from: (listener,
/// queued client).
fn stuck_listener(path: &Path) -> (OwnedFd, UnixStream) {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: socket() takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let p = path.as_os_str().as_bytes();
    assert!(p.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(p) {
        *d = *s as libc::c_char;
    }
    // SAFETY: bind and listen on our fd with a valid address of the given size.
    unsafe {
        assert_eq!(
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            ),
            0
        );
        assert_eq!(libc::listen(fd.as_raw_fd(), 0), 0);
    }
    // With a backlog of 0 one connection is queued; the next connect would wait.
    let queued = UnixStream::connect(path).unwrap();
    (fd, queued)
}

/// VmRSS of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |k| k * 1024)
}

/// SIGTERM while one PLUG of 2 GiB of 4 KiB pages is being populated: the populate stops at its
/// next slice instead of running to the end. (The memory crate's `a_stop_cuts_a_populate_at_the
/// _next_slice` proves the cut; this measures the stop of the whole process and prints it.)
#[test]
fn a_stop_during_a_big_plug_does_not_wait_for_it() {
    if !require_kvm("a_stop_during_a_big_plug_does_not_wait_for_it") {
        return;
    }
    let mut child = Command::new(tide_bin())
        .args(["run", "--kernel"])
        .arg(test_guest())
        .args([
            "--cmdline",
            "console=ttyS0 tide.test=mem-follow",
            "--hotplug-size",
            "4G",
            "--requested",
            "2G",
            "--no-thp",
            "--no-populate-ahead",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let console = collect(child.stdout.take().unwrap());
    let log = collect(child.stderr.take().unwrap());
    wait_console(&mut child, &console, "virtio-mem: ready");
    let base = rss(child.id());
    // The PLUG's populate is under way once the process has grown by 128 MiB.
    let end = Instant::now() + T;
    while rss(child.id()) < base + (128 << 20) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "tide exited\n{}",
            text(&console)
        );
        assert!(Instant::now() < end, "the plug never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    let t = Instant::now();
    // SAFETY: kill with the pid of our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let st = wait_stopped(&mut child, t, "SIGTERM during a 2 GiB plug");
    assert_eq!(st.code(), Some(128 + libc::SIGTERM));
    std::thread::sleep(Duration::from_millis(50));
    let cut = text(&log).contains("the VMM is stopping");
    println!(
        "the populate was {}",
        if cut {
            "cut at a slice"
        } else {
            "already over"
        }
    );
}

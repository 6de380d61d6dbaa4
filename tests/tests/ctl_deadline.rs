//! Tier 1: `tide ctl` always ends, whatever the server does: one deadline per whole request,
//! `resize --wait --timeout N` over within N plus a second, and pauses between long polls that
//! a server answers at once. The servers here are fakes on a UNIX socket.
//!
//! The deadlines below only detect a hang; the measured times are printed.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tests::{temp_dir, tide_bin};

/// A hang detector for one `tide ctl` run.
const HANG: Duration = Duration::from_secs(60);

const STATUS: &str = r#"{"region_size":1073741824,"block_size":2097152,"requested_size":1073741824,"plugged_size":0,"usable_region_size":1073741824,"backend":"anon","resident_bytes":0}"#;

/// Reads one request (headers and a `Content-Length` body); returns its first line.
fn read_request(s: &mut UnixStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            return head.lines().next().unwrap_or("").to_string();
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return String::new(),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A fake API server: `answer` handles each connection (given its request line) on a thread of
/// its own; runs until dropped.
struct Fake {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    sock: std::path::PathBuf,
}

impl Fake {
    fn start(
        sock: &Path,
        answer: impl Fn(&str, UnixStream, &AtomicBool) + Send + Sync + 'static,
    ) -> Fake {
        let listener = UnixListener::bind(sock).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let answer = Arc::new(answer);
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        let (a, st) = (answer.clone(), st.clone());
                        std::thread::spawn(move || {
                            let line = read_request(&mut s);
                            a(&line, s, &st);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Fake {
            stop,
            thread: Some(thread),
            sock: sock.to_path_buf(),
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// Sends an answer's head, then one body byte per `every` until the client leaves or the
/// server stops: a server that always seems about to finish.
fn trickle(mut s: UnixStream, stop: &AtomicBool, every: Duration) {
    let _ = s.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n",
    );
    while !stop.load(Ordering::SeqCst) {
        if s.write_all(b" ").is_err() {
            return;
        }
        std::thread::sleep(every);
    }
}

fn answer(mut s: UnixStream, code: &str, body: &str) {
    let _ = write!(
        s,
        "HTTP/1.1 {code}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Runs `tide ctl --api-socket sock args...`, killing it and panicking after [`HANG`]; returns
/// its output and how long it ran.
fn ctl(sock: &Path, args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let mut child = Command::new(tide_bin())
        .args(["ctl", "--api-socket"])
        .arg(sock)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            let took = t.elapsed();
            return (child.wait_with_output().unwrap(), took);
        }
        if t.elapsed() > HANG {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "tide ctl {args:?} did not end within {HANG:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A server sending one byte a second kept `tide ctl status` waiting for ever (each read had
/// 10 s); the whole request now has one deadline.
#[test]
fn a_trickling_server_cannot_hold_a_request() {
    let tmp = temp_dir("ctl-trickle");
    let sock = tmp.as_path().join("api.sock");
    let _fake = Fake::start(&sock, |_, s, stop| trickle(s, stop, Duration::from_secs(1)));
    let (out, took) = ctl(&sock, &["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    println!("status against a trickling server ended in {took:?}: {err}");
    assert!(!out.status.success());
    assert!(err.contains("no answer"), "{err}");
}

/// `resize --wait --timeout 1` against a server that trickles every answer ends, with the wait
/// timed out, within the timeout and its grace.
#[test]
fn resize_wait_ends_whatever_the_server_does() {
    let tmp = temp_dir("ctl-trickle-wait");
    let sock = tmp.as_path().join("api.sock");
    let _fake = Fake::start(&sock, |line, s, stop| {
        if line.starts_with("PATCH") {
            answer(s, "204 No Content", "")
        } else if line.contains("wait_for") {
            trickle(s, stop, Duration::from_millis(300))
        } else {
            answer(s, "200 OK", STATUS)
        }
    });
    let (out, took) = ctl(&sock, &["resize", "1G", "--wait", "--timeout", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    println!("resize --wait --timeout 1 against a trickling server ended in {took:?}: {err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("timed out after 1 s"), "{err}");
}

/// A server that answers every long poll at once, unsettled: the client pauses between them
/// (each starts at least half a second after the one before) instead of spinning.
#[test]
fn resize_wait_pauses_between_immediate_answers() {
    let tmp = temp_dir("ctl-spin");
    let sock = tmp.as_path().join("api.sock");
    let polls = Arc::new(AtomicUsize::new(0));
    let p = polls.clone();
    let _fake = Fake::start(&sock, move |line, s, _| {
        if line.starts_with("PATCH") {
            answer(s, "204 No Content", "")
        } else if line.contains("wait_for") {
            p.fetch_add(1, Ordering::SeqCst);
            let body = format!("{},\"settled\":false}}", &STATUS[..STATUS.len() - 1]);
            answer(s, "200 OK", &body)
        } else {
            answer(s, "200 OK", STATUS)
        }
    });
    let (out, took) = ctl(&sock, &["resize", "1G", "--wait", "--timeout", "2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    let n = polls.load(Ordering::SeqCst);
    println!("{n} long polls in {took:?}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("timed out after 2 s"), "{err}");
    // Long polls start at least 0.5 s apart, within 2 s: at most 5 (and 2 more for slack).
    assert!(n <= 7, "{n} long polls in {took:?}: the client spins");
}

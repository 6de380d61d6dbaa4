//! Tests of the API server and client: a real `ApiServer` in an `EventManager` on a thread,
//! over a socket in a fresh temporary directory, with a mock backend.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use super::client::{self, CtlArgs, CtlCommand, CtlError};
use super::server::{ApiError, ApiServer, StopHandle, MAX_CONNECTIONS, MAX_WAITERS};
use super::{ApiBackend, MemoryStatus, VmInfo};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

struct Mock {
    mem: Mutex<Option<MemoryStatus>>,
    /// Bytes `plugged_size` moves toward `requested_size` on each `memory_status` call.
    step: AtomicUsize,
    fail: Mutex<Option<String>>,
    shutdowns: AtomicUsize,
    /// How long `shutdown` takes to return (a VMM that is slow to start its stop).
    shutdown_delay: Mutex<Duration>,
}

impl Mock {
    fn new(hotplug: bool) -> Arc<Self> {
        Arc::new(Mock {
            mem: Mutex::new(hotplug.then(|| MemoryStatus {
                region_size: 4 * GIB,
                block_size: 2 * MIB,
                requested_size: 0,
                plugged_size: 0,
                usable_region_size: 0,
                backend: "anonymous".into(),
                resident_bytes: 3 * MIB / 2,
                ahead_bytes: 0,
            })),
            step: AtomicUsize::new(0),
            fail: Mutex::new(None),
            shutdowns: AtomicUsize::new(0),
            shutdown_delay: Mutex::new(Duration::ZERO),
        })
    }

    fn requested(&self) -> u64 {
        self.mem
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |m| m.requested_size)
    }
}

impl ApiBackend for Mock {
    fn memory_status(&self) -> Option<MemoryStatus> {
        let mut mem = self.mem.lock().unwrap();
        let m = mem.as_mut()?;
        let step = self.step.load(Ordering::SeqCst) as u64;
        if m.plugged_size < m.requested_size {
            m.plugged_size = (m.plugged_size + step).min(m.requested_size);
        } else {
            m.plugged_size = m.plugged_size.saturating_sub(step).max(m.requested_size);
        }
        Some(m.clone())
    }

    fn resize(&self, requested_size: u64) -> Result<(), super::BackendError> {
        if let Some(msg) = self.fail.lock().unwrap().clone() {
            return Err(msg.into());
        }
        let mut mem = self.mem.lock().unwrap();
        let m = mem.as_mut().ok_or("no region")?;
        if requested_size > m.region_size {
            return Err("requested size beyond the region".into());
        }
        m.requested_size = requested_size;
        m.usable_region_size = requested_size;
        Ok(())
    }

    fn vm_info(&self) -> VmInfo {
        VmInfo {
            state: "running".into(),
            exit_code: None,
            exit_reason: None,
            vcpus: 2,
            boot_memory: GIB,
        }
    }

    fn shutdown(&self) {
        std::thread::sleep(*self.shutdown_delay.lock().unwrap());
        self.shutdowns.fetch_add(1, Ordering::SeqCst);
    }
}

/// A fresh directory under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tide-api-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn sock(&self) -> PathBuf {
        self.0.join("api.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An `ApiServer` running in its own event loop thread.
struct Harness {
    mock: Arc<Mock>,
    sock: PathBuf,
    stop: Arc<AtomicBool>,
    api_stop: StopHandle,
    thread: Option<JoinHandle<()>>,
    _dir: TempDir,
}

impl Harness {
    fn start(mock: Arc<Mock>) -> Self {
        let dir = TempDir::new();
        let sock = dir.sock();
        let server = ApiServer::bind(&sock, mock.clone()).unwrap();
        let api_stop = server.stop_handle().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut em: EventManager<Box<dyn MutEventSubscriber + Send>> =
                EventManager::new().unwrap();
            em.add_subscriber(Box::new(server));
            while !stop2.load(Ordering::SeqCst) {
                em.run_with_timeout(20).unwrap();
            }
        });
        Harness {
            mock,
            sock,
            stop,
            api_stop,
            thread: Some(thread),
            _dir: dir,
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap()
    }

    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap().to_string()
    }
}

fn connect(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads an answer up to EOF (tolerating a reset after it) and checks its framing.
fn read_answer(s: &mut UnixStream) -> Answer {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset && !buf.is_empty() => break,
            Err(e) => panic!("read: {e}"),
        }
    }
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("no header end");
    let head = format!("{head}\r\n");
    let status = head[9..12].parse().unwrap();
    assert!(head.contains("Connection: close\r\n"), "{head}");
    if status == 204 {
        assert!(body.is_empty());
    } else {
        assert!(
            head.contains("Content-Type: application/json\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{head}"
        );
    }
    Answer {
        status,
        head,
        body: body.to_string(),
    }
}

fn raw(sock: &Path, req: &[u8]) -> Answer {
    let mut s = connect(sock);
    // A server at its connection limit answers 503 and closes before reading: the write may then
    // fail (EPIPE) while the answer is already waiting to be read.
    let _ = s.write_all(req);
    read_answer(&mut s)
}

fn get(sock: &Path, path: &str) -> Answer {
    raw(
        sock,
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
    )
}

fn send(sock: &Path, method: &str, path: &str, body: &str) -> Answer {
    raw(
        sock,
        format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

#[test]
fn get_memory_status() {
    let h = Harness::start(Mock::new(true));
    let a = get(&h.sock, "/hotplug/memory");
    assert_eq!(a.status, 200);
    let s: MemoryStatus = serde_json::from_str(&a.body).unwrap();
    assert_eq!(s.region_size, 4 * GIB);
    assert_eq!(s.backend, "anonymous");
    assert!(a.json().get("settled").is_none());
}

#[test]
fn no_hotplug_region_is_404() {
    let h = Harness::start(Mock::new(false));
    let a = get(&h.sock, "/hotplug/memory");
    assert_eq!(a.status, 404);
    assert!(a.error().contains("no hotplug"));
    assert_eq!(
        send(
            &h.sock,
            "PATCH",
            "/hotplug/memory",
            r#"{"requested_size":0}"#
        )
        .status,
        404
    );
    assert_eq!(
        get(&h.sock, "/hotplug/memory?wait_for=plugged_size").status,
        404
    );
}

#[test]
fn patch_memory() {
    let h = Harness::start(Mock::new(true));
    let a = send(
        &h.sock,
        "PATCH",
        "/hotplug/memory",
        r#"{"requested_size": 1073741824}"#,
    );
    assert_eq!(a.status, 204, "{}", a.body);
    assert_eq!(h.mock.requested(), GIB);

    for bad in [
        "",
        "{",
        "{}",
        r#"{"requested_size": "1G"}"#,
        r#"{"requested_size": 1.5}"#,
        r#"{"requested_size": -1}"#,
        r#"{"requested_size": 1, "other": 2}"#,
        "[1]",
    ] {
        let a = send(&h.sock, "PATCH", "/hotplug/memory", bad);
        assert_eq!(a.status, 400, "{bad}: {}", a.body);
        assert!(!a.error().is_empty());
    }
    // No Content-Length: an empty body.
    let a = raw(&h.sock, b"PATCH /hotplug/memory HTTP/1.1\r\n\r\n");
    assert_eq!(a.status, 400);
    assert!(a.error().contains("missing body"));

    // Backend refusals are 400 with the backend's message.
    let a = send(
        &h.sock,
        "PATCH",
        "/hotplug/memory",
        r#"{"requested_size": 8589934592}"#,
    );
    assert_eq!(
        (a.status, a.error().as_str()),
        (400, "requested size beyond the region")
    );
    *h.mock.fail.lock().unwrap() = Some("guest not ready".into());
    let a = send(
        &h.sock,
        "PATCH",
        "/hotplug/memory",
        r#"{"requested_size": 0}"#,
    );
    assert_eq!((a.status, a.error().as_str()), (400, "guest not ready"));
    assert_eq!(h.mock.requested(), GIB);
}

#[test]
fn vm_info_and_shutdown() {
    let h = Harness::start(Mock::new(true));
    let a = get(&h.sock, "/vm");
    assert_eq!(a.status, 200);
    let v: VmInfo = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v, h.mock.vm_info());
    assert_eq!(h.mock.shutdowns.load(Ordering::SeqCst), 0);
    let a = raw(
        &h.sock,
        b"PUT /vm/shutdown HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );
    assert_eq!(a.status, 204);
    assert_eq!(h.mock.shutdowns.load(Ordering::SeqCst), 1);
}

#[test]
fn routing_errors() {
    let h = Harness::start(Mock::new(true));
    for p in ["/", "/nope", "/vm/", "/hotplug", "/hotplug/memory/x"] {
        let a = get(&h.sock, p);
        assert_eq!(a.status, 404, "{p}");
        assert!(a.error().contains("no such endpoint"));
    }
    for (m, p, allow) in [
        ("POST", "/vm", "GET, PATCH"),
        ("DELETE", "/hotplug/memory", "GET, PATCH"),
        ("PUT", "/hotplug/memory", "GET, PATCH"),
        ("GET", "/vm/shutdown", "PUT"),
    ] {
        let a = send(&h.sock, m, p, "");
        assert_eq!(a.status, 405, "{m} {p}");
        assert!(
            a.head.contains(&format!("Allow: {allow}\r\n")),
            "{}",
            a.head
        );
        assert!(a.error().contains(m));
    }
    assert_eq!(h.mock.shutdowns.load(Ordering::SeqCst), 0);
}

#[test]
fn malformed_and_oversized_requests() {
    let h = Harness::start(Mock::new(true));
    for bad in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /vm HTTP/7.0\r\n\r\n",
        b"GET /vm\r\n\r\n",
        b"GET /vm HTTP/1.1\r\nBad Header\r\n\r\n",
        b"PATCH /hotplug/memory HTTP/1.1\r\nContent-Length: -3\r\n\r\n",
        b"\x00\x01\x02\r\n\r\n",
    ] {
        let a = raw(&h.sock, bad);
        assert_eq!(a.status, 400, "{:?}", String::from_utf8_lossy(bad));
        assert!(!a.error().is_empty());
    }
    // Header section over 8 KiB, complete or not.
    let mut big = b"GET /vm HTTP/1.1\r\nX-Filler: ".to_vec();
    big.extend(std::iter::repeat_n(b'x', 9 * 1024));
    assert_eq!(raw(&h.sock, &big).status, 431);
    big.extend_from_slice(b"\r\n\r\n");
    assert_eq!(raw(&h.sock, &big).status, 431);
    // Body over 64 KiB.
    let body = "x".repeat(70 * 1024);
    let a = send(&h.sock, "PATCH", "/hotplug/memory", &body);
    assert_eq!(a.status, 413);
    assert!(a.error().contains("body"));
    // Chunked bodies are refused.
    let a = raw(
        &h.sock,
        b"PATCH /hotplug/memory HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    assert_eq!(a.status, 411);
    // The server is still fine.
    assert_eq!(get(&h.sock, "/vm").status, 200);
}

#[test]
fn request_split_in_small_pieces() {
    let h = Harness::start(Mock::new(true));
    let req =
        b"PATCH /hotplug/memory HTTP/1.1\r\nContent-Length: 26\r\n\r\n{\"requested_size\":2097152}";
    let mut s = connect(&h.sock);
    for piece in req.chunks(7) {
        s.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(read_answer(&mut s).status, 204);
    assert_eq!(h.mock.requested(), 2 * MIB);
}

#[test]
fn concurrent_clients() {
    let h = Harness::start(Mock::new(true));
    let mut a = connect(&h.sock);
    a.write_all(b"GET /vm HTTP/1.1\r\nHost: loc").unwrap();
    let mut b = connect(&h.sock);
    b.write_all(b"GET /hotplug/memory HTTP/1.1\r\n\r\n")
        .unwrap();
    assert_eq!(read_answer(&mut b).status, 200);
    a.write_all(b"alhost\r\n\r\n").unwrap();
    let ans = read_answer(&mut a);
    assert_eq!(ans.status, 200);
    assert!(ans.body.contains("running"));

    // Many at once from threads.
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let sock = h.sock.clone();
            std::thread::spawn(move || {
                let path = if i % 2 == 0 { "/vm" } else { "/hotplug/memory" };
                get(&sock, path).status
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 200);
    }
}

#[test]
fn client_that_disconnects_mid_request() {
    let h = Harness::start(Mock::new(true));
    {
        let mut s = connect(&h.sock);
        s.write_all(b"PATCH /hotplug/memory HTTP/1.1\r\nContent-Length: 30\r\n\r\n{\"req")
            .unwrap();
        let mut s2 = connect(&h.sock);
        s2.write_all(b"GET /v").unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(get(&h.sock, "/vm").status, 200);
    assert_eq!(h.mock.requested(), 0);
}

#[test]
fn connection_limit() {
    let h = Harness::start(Mock::new(true));
    let idle: Vec<UnixStream> = (0..MAX_CONNECTIONS).map(|_| connect(&h.sock)).collect();
    let mut extra = connect(&h.sock);
    let a = read_answer(&mut extra);
    assert_eq!(a.status, 503);
    drop(idle);
    // Slots free up once the server sees the hang-ups.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let a = get(&h.sock, "/vm");
        if a.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "connections not released");
        std::thread::sleep(Duration::from_millis(20));
    }
}

const LONG_POLL: &[u8] =
    b"GET /hotplug/memory?wait_for=plugged_size&timeout_ms=600000 HTTP/1.1\r\n\r\n";

/// Parks `MAX_WAITERS` long polls and returns once the server has parked them all; one more
/// is then refused with 503 "too many long polls".
fn park_all_waiters(h: &Harness) -> Vec<UnixStream> {
    let polls: Vec<UnixStream> = (0..MAX_WAITERS)
        .map(|_| {
            let mut s = connect(&h.sock);
            s.write_all(LONG_POLL).unwrap();
            s
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.api_stop.parked_long_polls() < MAX_WAITERS {
        assert!(Instant::now() < deadline, "the polls were never all parked");
        std::thread::yield_now();
    }
    let mut s = connect(&h.sock);
    s.write_all(LONG_POLL).unwrap();
    let a = read_answer(&mut s);
    assert_eq!(a.status, 503);
    assert!(a.error().contains("long polls"), "{}", a.body);
    polls
}

#[test]
fn long_polls_whose_clients_leave_are_dropped() {
    let h = Harness::start(Mock::new(true));
    assert_eq!(
        send(
            &h.sock,
            "PATCH",
            "/hotplug/memory",
            r#"{"requested_size":2097152}"#
        )
        .status,
        204
    );
    let polls = park_all_waiters(&h);
    drop(polls);
    // Their slots free up once the server sees the hang-ups: a new poll parks (and times out)
    // instead of being refused.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let a = get(
            &h.sock,
            "/hotplug/memory?wait_for=plugged_size&timeout_ms=50",
        );
        if a.status == 200 {
            assert_eq!(a.json()["settled"], false);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "waiting connections not released"
        );
    }
}

/// Issue 11, failure 5: parked long polls took every connection slot, so the PATCH that would
/// satisfy them and the shutdown got 503.
#[test]
fn long_polls_do_not_take_the_slots_of_patch_get_and_shutdown() {
    let h = Harness::start(Mock::new(true));
    assert_eq!(
        send(
            &h.sock,
            "PATCH",
            "/hotplug/memory",
            r#"{"requested_size":2097152}"#
        )
        .status,
        204
    );
    let mut polls = park_all_waiters(&h);
    // Room for ordinary requests, all of MAX_CONNECTIONS of them at once.
    let idle: Vec<UnixStream> = (0..MAX_CONNECTIONS - 1).map(|_| connect(&h.sock)).collect();
    assert_eq!(get(&h.sock, "/vm").status, 200);
    drop(idle);
    // The PATCH that satisfies them gets through and every poll answers settled.
    h.mock.step.store(usize::MAX, Ordering::SeqCst);
    assert_eq!(
        send(
            &h.sock,
            "PATCH",
            "/hotplug/memory",
            r#"{"requested_size":0}"#
        )
        .status,
        204
    );
    for p in &mut polls {
        let a = read_answer(p);
        assert_eq!(a.status, 200);
        assert_eq!(a.json()["settled"], true);
    }
    // And a shutdown with polls parked again.
    h.mock.step.store(0, Ordering::SeqCst);
    assert_eq!(
        send(
            &h.sock,
            "PATCH",
            "/hotplug/memory",
            r#"{"requested_size":4194304}"#
        )
        .status,
        204
    );
    let _polls = park_all_waiters(&h);
    assert_eq!(send(&h.sock, "PUT", "/vm/shutdown", "").status, 204);
    assert_eq!(h.mock.shutdowns.load(Ordering::SeqCst), 1);
}

/// Issue 11, failure 7 (last part): a stop closed waiting long polls with no answer at all.
#[test]
fn stop_answers_every_waiting_long_poll() {
    let h = Harness::start(Mock::new(true));
    assert_eq!(
        send(
            &h.sock,
            "PATCH",
            "/hotplug/memory",
            r#"{"requested_size":2097152}"#
        )
        .status,
        204
    );
    let mut polls = park_all_waiters(&h);
    h.api_stop.stop();
    for p in &mut polls {
        let a = read_answer(p);
        assert_eq!(a.status, 503);
        assert!(a.error().contains("shutting down"), "{}", a.body);
    }
    let a = get(&h.sock, "/vm");
    assert_eq!(a.status, 503);
    assert!(a.error().contains("shutting down"), "{}", a.body);
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.api_stop.open_connections() != 0 {
        assert!(Instant::now() < deadline, "answers not flushed");
        std::thread::yield_now();
    }
}

/// Issue 11, failure 8: the shutdown was requested after its 204 was sent, so a client that
/// got the 204 could not rely on it (and the tests reading the counter raced). A VMM slow to
/// take the request makes the old order fail every time.
#[test]
fn shutdown_is_requested_before_its_answer_is_sent() {
    let mock = Mock::new(true);
    *mock.shutdown_delay.lock().unwrap() = Duration::from_millis(200);
    let h = Harness::start(mock);
    assert_eq!(send(&h.sock, "PUT", "/vm/shutdown", "").status, 204);
    assert_eq!(h.mock.shutdowns.load(Ordering::SeqCst), 1);
}

#[test]
fn long_poll_settles() {
    let mock = Mock::new(true);
    mock.step.store((128 * MIB) as usize, Ordering::SeqCst);
    let h = Harness::start(mock);
    assert_eq!(
        send(
            &h.sock,
            "PATCH",
            "/hotplug/memory",
            r#"{"requested_size":1073741824}"#
        )
        .status,
        204
    );
    let t = Instant::now();
    let a = get(
        &h.sock,
        "/hotplug/memory?wait_for=plugged_size&timeout_ms=5000",
    );
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(v["settled"], true);
    assert_eq!(v["plugged_size"], GIB);
    assert!(t.elapsed() < Duration::from_secs(4));
    // Already settled: at once.
    let a = get(&h.sock, "/hotplug/memory?wait_for=plugged_size");
    assert_eq!(a.json()["settled"], true);
}

#[test]
fn long_poll_times_out_without_blocking_others() {
    let h = Harness::start(Mock::new(true));
    assert_eq!(
        send(
            &h.sock,
            "PATCH",
            "/hotplug/memory",
            r#"{"requested_size":2097152}"#
        )
        .status,
        204
    );
    let sock = h.sock.clone();
    let poll = std::thread::spawn(move || {
        let t = Instant::now();
        let a = get(
            &sock,
            "/hotplug/memory?wait_for=plugged_size&timeout_ms=600",
        );
        (a.status, a.json(), t.elapsed())
    });
    // A long poll whose client leaves is dropped.
    let mut gone = connect(&h.sock);
    gone.write_all(b"GET /hotplug/memory?wait_for=plugged_size HTTP/1.1\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(gone);
    // Others are served while the poll is pending.
    let t = Instant::now();
    assert_eq!(get(&h.sock, "/vm").status, 200);
    assert!(t.elapsed() < Duration::from_millis(400));
    let (status, v, elapsed) = poll.join().unwrap();
    assert_eq!(status, 200);
    assert_eq!(v["settled"], false);
    assert_eq!(v["requested_size"], 2 * MIB);
    assert!(elapsed >= Duration::from_millis(600), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    // timeout_ms=0 answers at once; bad parameters are 400.
    assert_eq!(
        get(
            &h.sock,
            "/hotplug/memory?wait_for=plugged_size&timeout_ms=0"
        )
        .json()["settled"],
        false
    );
    assert_eq!(
        get(&h.sock, "/hotplug/memory?wait_for=requested_size").status,
        400
    );
    assert_eq!(
        get(
            &h.sock,
            "/hotplug/memory?wait_for=plugged_size&timeout_ms=x"
        )
        .status,
        400
    );
}

#[test]
fn socket_file_handling() {
    let dir = TempDir::new();
    let sock = dir.sock();
    let mock: Arc<dyn ApiBackend> = Mock::new(true);

    // Stale: a socket file nobody listens on is replaced.
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let server = ApiServer::bind(&sock, mock.clone()).unwrap();
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // In use: refused, and the file is left alone.
    match ApiServer::bind(&sock, mock.clone()) {
        Err(ApiError::InUse(p)) => assert_eq!(p, sock),
        other => panic!("expected InUse, got {other:?}"),
    }
    assert!(sock.exists());

    // Drop removes the file.
    drop(server);
    assert!(!sock.exists());

    // Not a socket: refused, the file is kept.
    std::fs::write(&sock, b"data").unwrap();
    assert!(matches!(
        ApiServer::bind(&sock, mock.clone()),
        Err(ApiError::NotASocket(_))
    ));
    assert_eq!(std::fs::read(&sock).unwrap(), b"data");

    // A missing directory is a bind error.
    let missing = dir.0.join("no/such/dir/api.sock");
    assert!(matches!(
        ApiServer::bind(&missing, mock),
        Err(ApiError::Bind(..))
    ));
}

#[test]
fn client_status_info_and_shutdown() {
    let h = Harness::start(Mock::new(true));
    let table = client::status(&h.sock, false).unwrap();
    assert!(table.contains("region      4 GiB"), "{table}");
    assert!(table.contains("block size  2 MiB"), "{table}");
    assert!(table.contains("resident    1.5 MiB"), "{table}");
    assert!(table.contains("backend     anonymous"), "{table}");
    let json = client::status(&h.sock, true).unwrap();
    let s: MemoryStatus = serde_json::from_str(&json).unwrap();
    assert_eq!(s.region_size, 4 * GIB);
    let info = client::info(&h.sock, false).unwrap();
    assert!(
        info.contains("state       running") && info.contains("boot memory 1 GiB"),
        "{info}"
    );

    let args = CtlArgs {
        api_socket: h.sock.clone(),
        cmd: CtlCommand::Shutdown,
    };
    client::run(args).unwrap();
    assert_eq!(h.mock.shutdowns.load(Ordering::SeqCst), 1);

    let none = Harness::start(Mock::new(false));
    match client::status(&none.sock, false) {
        Err(CtlError::Status {
            status: 404,
            message,
            ..
        }) => assert!(message.contains("no hotplug"), "{message}"),
        other => panic!("expected a 404, got {other:?}"),
    }
    let nothing = h._dir.0.join("nothing.sock");
    let err = client::status(&nothing, false).unwrap_err();
    match &err {
        CtlError::Connect(p, e) => assert_eq!((p, e.kind()), (&nothing, ErrorKind::NotFound)),
        other => panic!("expected a connect error, got {other:?}"),
    }
    // What `tide ctl` prints: what failed, where, and why.
    assert_eq!(
        crate::error_chain(&err),
        format!(
            "cannot connect to the API socket {}: No such file or directory (os error 2)",
            nothing.display()
        )
    );
}

#[test]
fn client_resize() {
    let h = Harness::start(Mock::new(true));
    let mut seen = Vec::new();
    client::resize(&h.sock, 512 * MIB, None, &mut |s| seen.push(s.clone())).unwrap();
    assert_eq!(h.mock.requested(), 512 * MIB);
    assert!(seen.is_empty());

    // --wait, reached.
    h.mock.step.store((64 * MIB) as usize, Ordering::SeqCst);
    let r = client::resize(&h.sock, GIB, Some(Duration::from_secs(10)), &mut |s| {
        seen.push(s.clone())
    });
    r.unwrap();
    assert_eq!(seen.last().map(|s| s.plugged_size), Some(GIB));

    // --wait, timed out.
    h.mock.step.store(0, Ordering::SeqCst);
    let t = Instant::now();
    let r = client::resize(
        &h.sock,
        2 * GIB,
        Some(Duration::from_millis(700)),
        &mut |_| {},
    );
    match r {
        Err(CtlError::WaitTimedOut { after, last }) => {
            assert_eq!(after, Duration::from_millis(700));
            assert_eq!((last.plugged_size, last.requested_size), (GIB, 2 * GIB));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(t.elapsed() >= Duration::from_millis(700) && t.elapsed() < Duration::from_secs(3));
    let args = CtlArgs {
        api_socket: h.sock.clone(),
        cmd: CtlCommand::Resize {
            size: 3 * GIB,
            wait: true,
            timeout: Some(0),
        },
    };
    let err = client::run(args).unwrap_err();
    assert!(matches!(err, CtlError::WaitTimedOut { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "timed out after 0 s: the guest has plugged 1 GiB of 3 GiB"
    );

    // Backend error: the server's message is what the user reads.
    let err = client::resize(&h.sock, 8 * GIB, None, &mut |_| {}).unwrap_err();
    assert!(
        matches!(&err, CtlError::Status { status: 400, message, .. } if message.contains("beyond the region")),
        "{err:?}"
    );
    assert_eq!(
        crate::error_chain(&err),
        "PATCH /hotplug/memory: 400 Bad Request: requested size beyond the region"
    );
}

#[test]
fn client_helpers() {
    use client::{fmt_bytes, parse_size};
    assert_eq!(parse_size("0"), Ok(0));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("512M"), Ok(512 * MIB));
    assert_eq!(parse_size("1G"), Ok(GIB));
    assert_eq!(parse_size("1g"), Ok(GIB));
    assert_eq!(parse_size("2GiB"), Ok(2 * GIB));
    assert_eq!(parse_size("3 MB"), Ok(3 * MIB));
    assert_eq!(parse_size("1T"), Ok(1 << 40));
    assert_eq!(parse_size("8K"), Ok(8192));
    for bad in ["", "M", "1.5G", "1X", "-1", "99999999999T", "1 G B"] {
        assert!(parse_size(bad).is_err(), "{bad}");
    }
    assert_eq!(fmt_bytes(0), "0 B");
    assert_eq!(fmt_bytes(1023), "1023 B");
    assert_eq!(fmt_bytes(512 * MIB), "512 MiB");
    assert_eq!(fmt_bytes(3 * GIB / 2), "1.5 GiB");
    assert_eq!(fmt_bytes(4 * GIB), "4 GiB");

    let mut s = Mock::new(true).memory_status().unwrap();
    s.requested_size = GIB;
    s.plugged_size = 512 * MIB;
    assert_eq!(
        client::progress_line(0, &s),
        "[##########          ] 512/1024 MiB"
    );
    // A shrink counts what it has unplugged, and ends on the whole change, not on 0/0.
    s.requested_size = 0;
    assert_eq!(
        client::progress_line(GIB, &s),
        "[##########          ] 512/1024 MiB"
    );
    s.plugged_size = 0;
    assert_eq!(
        client::progress_line(GIB, &s),
        "[####################] 1024/1024 MiB"
    );
    // A growth from a plugged size counts from there.
    s.requested_size = 640 * MIB;
    s.plugged_size = 384 * MIB;
    assert_eq!(
        client::progress_line(128 * MIB, &s),
        "[##########          ] 256/512 MiB"
    );
    // Nothing to change: done at once.
    s.plugged_size = 640 * MIB;
    assert_eq!(
        client::progress_line(640 * MIB, &s),
        "[####################] 0/0 MiB"
    );

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        ctl: CtlArgs,
    }
    let cli = <Cli as clap::Parser>::try_parse_from([
        "tide",
        "--api-socket",
        "/x.sock",
        "resize",
        "1G",
        "--wait",
    ])
    .unwrap();
    assert_eq!(cli.ctl.api_socket, PathBuf::from("/x.sock"));
    match cli.ctl.cmd {
        CtlCommand::Resize {
            size,
            wait,
            timeout,
        } => assert_eq!((size, wait, timeout), (GIB, true, None)),
        other => panic!("{other:?}"),
    }
    assert!(
        <Cli as clap::Parser>::try_parse_from(["tide", "--api-socket", "s", "resize", "1Q"])
            .is_err()
    );
    let cli =
        <Cli as clap::Parser>::try_parse_from(["tide", "--api-socket", "s", "status", "--json"])
            .unwrap();
    assert!(matches!(cli.ctl.cmd, CtlCommand::Status { json: true }));
}

/// Issue 11, failure 7: `resize --wait --timeout 18446744073709551615` panicked (Instant
/// overflow); `resize 1P` was refused while `tide run --hotplug-size 1P` was accepted.
#[test]
fn client_takes_any_timeout_and_the_run_size_syntax() {
    let h = Harness::start(Mock::new(true));
    h.mock.step.store(usize::MAX, Ordering::SeqCst);
    let forever = Duration::from_secs(u64::MAX);
    client::resize(&h.sock, 2 * MIB, Some(forever), &mut |_| {}).unwrap();
    for s in ["1P", "2MiB", "3 GB", "16383P"] {
        assert_eq!(
            client::parse_size(s),
            memory::parse_size(s).map_err(|e| e.to_string())
        );
    }
    assert_eq!(client::parse_size("1P"), Ok(1 << 50));
}

/// Issue 11, failure 7: a 503 was reported as "Broken pipe" when the server answered before
/// reading the request and closed.
#[test]
fn client_shows_a_503_as_the_servers_message() {
    let h = Harness::start(Mock::new(true));
    let _idle: Vec<UnixStream> = (0..MAX_CONNECTIONS).map(|_| connect(&h.sock)).collect();
    // A body large enough that the write is still going on when the server closes.
    let body = format!(
        r#"{{"requested_size": 0, "pad": "{}"}}"#,
        "x".repeat(60 << 10)
    );
    for _ in 0..5 {
        let err = client::call(
            &h.sock,
            "PATCH",
            "/hotplug/memory",
            Some(&body),
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert!(
            matches!(err, CtlError::Status { status: 503, .. }),
            "{err:?}"
        );
        // The user reads the server's reason, not "Broken pipe".
        assert!(
            crate::error_chain(&err).ends_with("503 Service Unavailable: too many API connections"),
            "{err}"
        );
    }
}

/// The (path, method) pairs of the OpenAPI document's `paths`.
fn documented_routes() -> Vec<(String, String)> {
    let doc = include_str!("openapi.yaml");
    let paths = doc
        .split_once("\npaths:\n")
        .expect("openapi.yaml has paths")
        .1;
    let mut out = Vec::new();
    let mut path = None;
    for line in paths.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            break; // the next top-level key
        }
        if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
            path = Some(format!("/{p}"));
        } else if let Some(m) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')) {
            if ["get", "put", "patch", "post", "delete"].contains(&m) {
                out.push((path.clone().unwrap(), m.to_uppercase()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn openapi_document_and_server_agree() {
    let mut served: Vec<(String, String)> = super::routes::ROUTES
        .iter()
        .flat_map(|(p, allow)| allow.split(", ").map(|m| (p.to_string(), m.to_string())))
        .collect();
    served.sort();
    assert_eq!(documented_routes(), served);
    // Every documented route is answered by the server, neither 404 for its path nor 405.
    let h = Harness::start(Mock::new(true));
    for (p, m) in documented_routes() {
        if (p.as_str(), m.as_str()) == ("/vm/shutdown", "PUT") {
            continue; // stops the harness's VM: vm_info_and_shutdown covers it
        }
        let body = if m == "PATCH" {
            r#"{"requested_size": 0}"#
        } else {
            ""
        };
        let a = send(&h.sock, &m, &p, body);
        let unrouted = a.status == 405 || a.body.contains("no such endpoint");
        assert!(!unrouted, "{m} {p}: {} {}", a.status, a.body);
    }
    // And a method the document does not list is 405.
    let a = send(&h.sock, "POST", "/version", "");
    assert_eq!(a.status, 405);
}

#[test]
fn firecracker_style_requests_and_errors() {
    let h = Harness::start(Mock::new(true));
    let a = send(
        &h.sock,
        "PATCH",
        "/hotplug/memory",
        r#"{"requested_size_mib": 512}"#,
    );
    assert_eq!(a.status, 204, "{}", a.body);
    assert_eq!(h.mock.requested(), 512 * MIB);
    for bad in [
        r#"{"requested_size": 0, "requested_size_mib": 0}"#,
        r#"{"requested_size_mib": 18446744073709551615}"#,
    ] {
        let a = send(&h.sock, "PATCH", "/hotplug/memory", bad);
        assert_eq!(a.status, 400, "{bad}");
        assert_eq!(a.json()["fault_message"], a.json()["error"]);
    }
    let a = get(&h.sock, "/version");
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["tide_version"], env!("CARGO_PKG_VERSION"));
    let a = get(&h.sock, "/nope");
    assert_eq!(a.json()["fault_message"], a.json()["error"]);
}

#[test]
fn progress_rate_and_time_left() {
    use super::progress::rate_and_time_left;
    let mut s = Mock::new(true).memory_status().unwrap();
    s.requested_size = 256 * MIB;
    s.plugged_size = 128 * MIB;
    // Measured from the state before the PATCH (0), not from the first status seen.
    assert_eq!(
        client::progress_line(0, &s),
        "[##########          ] 128/256 MiB"
    );
    let sec = Duration::from_secs(1);
    assert_eq!(rate_and_time_left(0, &s, sec), "  128 MiB/s, 1 s left");
    assert_eq!(rate_and_time_left(128 * MIB, &s, sec), "");
    s.plugged_size = 256 * MIB;
    assert_eq!(rate_and_time_left(0, &s, 2 * sec), "  128 MiB/s");
}

//! Tests of the API server and client: a real `ApiServer` in an `EventManager` on a thread,
//! over a socket in a fresh temporary directory, with a mock backend.

use memory::{GIB, MIB};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::tempdir::TempDir;

use super::client::{self, CtlArgs, CtlCommand, CtlError};
use super::server::{ApiError, ApiServer, StopHandle, MAX_CONNECTIONS, MAX_WAITERS};
use super::{ApiBackend, MemoryStatus, VmInfo};

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
                resident_age_ms: Some(0),
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
fn temp_dir() -> TempDir {
    TempDir::new_with_prefix(std::env::temp_dir().join("tide-api-")).unwrap()
}

/// The API socket's path in `dir`.
fn sock_in(dir: &TempDir) -> PathBuf {
    dir.as_path().join("api.sock")
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
        let dir = temp_dir();
        let sock = sock_in(&dir);
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

mod ctl;
mod documents;
mod long_polls;
mod requests;

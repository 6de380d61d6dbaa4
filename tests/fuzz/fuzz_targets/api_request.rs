//! The API server: the input's bytes are sent on a fresh connection to a real ApiServer (in an
//! EventManager run on this thread, over a UNIX socket, with a mock backend), in chunks whose
//! size the first byte picks, then the client half-closes. The server must answer once or close
//! the connection, within a bounded number of event loop rounds, and never panic.
//!
//! Checked: an answer is one well-formed HTTP/1.1 response with a known status code, a correct
//! Content-Length and a JSON body; the server keeps no connection open afterwards.
#![no_main]

use memory::{GIB, MIB};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vmm::api::{ApiBackend, ApiServer, MemoryStatus, VmInfo};

/// A backend whose guest follows at once: every long poll is settled, so none waits.
struct Mock {
    requested: AtomicU64,
}

impl ApiBackend for Mock {
    fn memory_status(&self) -> Option<MemoryStatus> {
        let r = self.requested.load(Ordering::SeqCst);
        Some(MemoryStatus {
            region_size: 4 * GIB,
            block_size: 2 * MIB,
            requested_size: r,
            plugged_size: r,
            usable_region_size: (r + GIB).min(4 * GIB),
            backend: "anon".into(),
            resident_bytes: r,
            resident_age_ms: Some(0),
            ahead_bytes: 0,
            guest_online_size: Some(r),
            driver: None,
        })
    }

    fn resize(&self, requested_size: u64) -> Result<(), vmm::api::BackendError> {
        if !requested_size.is_multiple_of(2 * MIB) || requested_size > 4 * GIB {
            return Err(format!("bad size {requested_size}").into());
        }
        self.requested.store(requested_size, Ordering::SeqCst);
        Ok(())
    }

    fn vm_info(&self) -> VmInfo {
        VmInfo {
            state: "running".into(),
            exit_code: None,
            exit_reason: None,
            vcpus: 1,
            boot_memory: 512 * MIB,
            guest_ready: true,
        }
    }

    fn shutdown(&self) {}
}

struct Server {
    em: EventManager<Box<dyn MutEventSubscriber + Send>>,
    sock: PathBuf,
}

fn server() -> &'static Mutex<Server> {
    static S: OnceLock<Mutex<Server>> = OnceLock::new();
    S.get_or_init(|| {
        // libFuzzer's main is not Rust's: SIGPIPE is not ignored unless we say so.
        // SAFETY: setting a signal disposition to SIG_IGN has no memory effects.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let dir = std::env::temp_dir().join(format!("tide-fuzz-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let backend = Arc::new(Mock {
            requested: AtomicU64::new(0),
        });
        let server = ApiServer::bind(&sock, backend).unwrap();
        let mut em: EventManager<Box<dyn MutEventSubscriber + Send>> = EventManager::new().unwrap();
        em.add_subscriber(Box::new(server));
        Mutex::new(Server { em, sock })
    })
}

/// Checks that `resp` is one well-formed answer.
fn check_answer(resp: &[u8], input: &[u8]) {
    let text = String::from_utf8_lossy(resp);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        panic!("answer without a header end: {text:?} to {input:?}");
    };
    let mut status_line = head.lines().next().unwrap_or("").splitn(3, ' ');
    assert_eq!(status_line.next(), Some("HTTP/1.1"), "{text:?}");
    let code: u16 = status_line
        .next()
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status code: {text:?}"));
    let reason = status_line.next().unwrap_or("");
    assert!(
        [200, 204, 400, 404, 405, 408, 411, 413, 431, 503].contains(&code),
        "unexpected status {code}: {text:?} to {input:?}"
    );
    assert_ne!(reason, "Unknown", "{text:?}");
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map(|n| n.parse::<usize>().expect("Content-Length is a number"));
    match (code, len) {
        (204, None) => assert!(body.is_empty(), "204 with a body: {text:?}"),
        (204, Some(_)) => panic!("204 with Content-Length: {text:?}"),
        (_, None) => panic!("{code} without Content-Length: {text:?}"),
        (_, Some(n)) => {
            assert_eq!(body.len(), n, "Content-Length mismatch: {text:?}");
            let _: serde_json::Value = serde_json::from_str(body)
                .unwrap_or_else(|e| panic!("body not JSON ({e}): {text:?}"));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, payload)) = data.split_first() else {
        return;
    };
    // 0: everything at once; else chunks of `first` bytes with event loop rounds in between.
    let chunk = if first == 0 {
        usize::MAX
    } else {
        usize::from(first)
    };
    let mut guard = server().lock().unwrap();
    let s = &mut *guard;
    let mut client = UnixStream::connect(&s.sock).unwrap();
    client.set_nonblocking(true).unwrap();

    let mut resp = Vec::new();
    let mut closed = false;
    let mut buf = [0u8; 4096];
    let mut read_some = |client: &mut UnixStream, resp: &mut Vec<u8>| -> bool {
        loop {
            match client.read(&mut buf) {
                Ok(0) => return true,
                Ok(n) => resp.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                // The server closed with our bytes unread: a reset after (or instead of) the answer.
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(e) => panic!("client read: {e}"),
            }
        }
    };
    let mut sent = 0;
    while sent < payload.len() && !closed {
        let end = payload.len().min(sent.saturating_add(chunk));
        match client.write(&payload[sent..end]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            // The server answered early (an error) and closed.
            Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {
                break
            }
            Err(e) => panic!("client write: {e}"),
        }
        s.em.run_with_timeout(0).unwrap();
        closed = read_some(&mut client, &mut resp);
    }
    let _ = client.shutdown(std::net::Shutdown::Write);
    let mut rounds = 0;
    while !closed {
        rounds += 1;
        assert!(
            rounds < 1000,
            "the server neither answered nor closed: {resp:?} to {payload:?}"
        );
        s.em.run_with_timeout(if rounds < 10 { 0 } else { 1 })
            .unwrap();
        closed = read_some(&mut client, &mut resp);
    }
    if !resp.is_empty() {
        check_answer(&resp, payload);
    }
    // Let the server notice the close; it must keep no connection of ours.
    let _ = s.em.run_with_timeout(0);
});

//! Helpers for Tide's integration tests: find the `tide` binary and the test guest, run `tide`
//! as a child process, read its console, talk to its API socket, and read host memory figures.
//!
//! Tests that need `/dev/kvm` call [`require_kvm`] first: it prints one loud `SKIP` line and
//! returns `false` when there is none.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod linux;

/// The freestanding test guest built by this crate's build script.
pub fn test_guest() -> PathBuf {
    PathBuf::from(env!("TIDE_TEST_GUEST"))
}

/// The `tide` binary of this build (built by `cargo build --workspace`, which the README's test
/// command runs first). Builds it if it is missing.
pub fn tide_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> (tests) or target/<profile>/<bin> (the bench) ->
    // target/<profile>/tide
    let mut profile_dir = exe.parent().expect("target dir");
    if profile_dir.ends_with("deps") {
        profile_dir = profile_dir.parent().expect("target dir");
    }
    let bin = profile_dir.join("tide");
    if !bin.exists() {
        let release = profile_dir.ends_with("release");
        let mut c = Command::new(env!("CARGO"));
        c.args(["build", "-p", "vmm", "--bin", "tide"]);
        if release {
            c.arg("--release");
        }
        let st = c.status().expect("run cargo build for tide");
        assert!(st.success(), "cannot build tide");
    }
    bin
}

/// Whether `/dev/kvm` can be used; prints one SKIP line naming `test` when not.
pub fn require_kvm(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            println!("SKIP {test}: /dev/kvm is not usable here ({e}); this test needs KVM");
            false
        }
    }
}

/// Whether this host's KVM emulates guest code instead of running it on hardware (the `kvm_pvm`
/// software nested KVM of docs/testing.md): real Linux guests cannot boot there.
pub fn kvm_is_emulating() -> Option<&'static str> {
    Path::new("/sys/module/kvm_pvm")
        .exists()
        .then_some("this host's /dev/kvm is the software kvm_pvm module, which emulates 64-bit guest code and cannot run a Linux kernel past early boot")
}

/// A running `tide` with its console captured.
pub struct Tide {
    child: Child,
    /// The guest console's input, when started with [`Tide::spawn_console`].
    stdin: Option<std::process::ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    /// When the process was started.
    pub started: Instant,
    /// When its first console byte came.
    first_output: Arc<OnceLock<Instant>>,
    status: Option<ExitStatus>,
}

/// Copies `r` into `buf` on a thread; `first` gets the time of the first byte.
fn pump(
    mut r: impl Read + Send + 'static,
    buf: Arc<Mutex<Vec<u8>>>,
    first: Option<Arc<OnceLock<Instant>>>,
) {
    std::thread::spawn(move || {
        let mut b = [0u8; 4096];
        while let Ok(n) = r.read(&mut b) {
            if n == 0 {
                break;
            }
            if let Some(f) = &first {
                f.get_or_init(Instant::now);
            }
            buf.lock().unwrap().extend_from_slice(&b[..n]);
        }
    });
}

impl Tide {
    /// Starts `tide` with `args` (stdin closed).
    pub fn spawn<I, S>(args: I) -> Tide
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Self::start(args, false)
    }

    /// Starts `tide` with `args` and a pipe on its stdin, the guest console's input
    /// ([`Tide::send`]).
    pub fn spawn_console<I, S>(args: I) -> Tide
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Self::start(args, true)
    }

    fn start<I, S>(args: I, console: bool) -> Tide
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Self::try_spawn(&tide_bin(), args, console).expect("spawn tide")
    }

    /// Starts the `tide` binary `bin` with `args` (a pipe on its stdin when `console`).
    pub fn try_spawn<I, S>(bin: &Path, args: I, console: bool) -> std::io::Result<Tide>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let started = Instant::now();
        let mut child = Command::new(bin)
            .args(args)
            .stdin(if console {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let first_output = Arc::new(OnceLock::new());
        pump(
            child.stdout.take().unwrap(),
            out.clone(),
            Some(first_output.clone()),
        );
        pump(child.stderr.take().unwrap(), err.clone(), None);
        Ok(Tide {
            stdin: child.stdin.take(),
            child,
            out,
            err,
            started,
            first_output,
            status: None,
        })
    }

    /// When the first console byte came, if it did.
    pub fn first_output(&self) -> Option<Instant> {
        self.first_output.get().copied()
    }

    /// Whether `tide` has exited (and how).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits until `cond` holds, without panicking: an error names `what` when `tide` exits
    /// first or `timeout` passes.
    pub fn try_wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&Tide) -> bool,
    ) -> Result<(), String> {
        let end = Instant::now() + timeout;
        loop {
            if cond(self) {
                return Ok(());
            }
            if let Some(st) = self.exited() {
                std::thread::sleep(Duration::from_millis(50));
                if cond(self) {
                    return Ok(());
                }
                return Err(format!(
                    "tide exited ({st}) before {what}; stderr: {}",
                    self.stderr().trim()
                ));
            }
            if Instant::now() > end {
                return Err(format!(
                    "timed out after {timeout:?} waiting for {what}; stderr: {}",
                    self.stderr().trim()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts `tide run --kernel <test guest>` with `extra` arguments and the guest command line.
    pub fn run_guest(cmdline: &str, extra: &[&str]) -> Tide {
        let guest = test_guest();
        let mut args: Vec<String> =
            vec!["run".into(), "--kernel".into(), guest.display().to_string()];
        args.push("--cmdline".into());
        args.push(cmdline.into());
        args.extend(extra.iter().map(|s| s.to_string()));
        Tide::spawn(args)
    }

    /// [`Tide::run_guest`] with `--api-socket` in a new temporary directory named after `tag`,
    /// once the socket exists (within [`API_SOCKET_WAIT`]). Returns tide, the socket's path and
    /// the directory, which must live as long as the test uses them.
    pub fn run_guest_with_api(
        tag: &str,
        cmdline: &str,
        extra: &[&str],
    ) -> (Tide, PathBuf, TempDir) {
        let tmp = temp_dir(tag);
        let sock = tmp.as_path().join("api.sock");
        let mut args = extra.to_vec();
        let sock_arg = sock.display().to_string();
        args.extend(["--api-socket", &sock_arg]);
        let tide = Tide::run_guest(cmdline, &args);
        wait_for_path(&sock, API_SOCKET_WAIT);
        (tide, sock, tmp)
    }

    /// Types `text` on the guest console; panics unless started with [`Tide::spawn_console`].
    pub fn send(&mut self, text: &str) {
        let stdin = self
            .stdin
            .as_mut()
            .expect("tide was started without a console pipe");
        stdin
            .write_all(text.as_bytes())
            .and_then(|_| stdin.flush())
            .expect("write to the guest console");
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Console output so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Diagnostics so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// Waits until the console shows `needle`; panics with the output on timeout or exit.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let out = self.stdout();
            if out.contains(needle) {
                return out;
            }
            if self.status.is_none() {
                self.status = self.child.try_wait().expect("try_wait");
            }
            if self.status.is_some() {
                std::thread::sleep(Duration::from_millis(50));
                let out = self.stdout();
                if out.contains(needle) {
                    return out;
                }
                panic!(
                    "tide exited ({:?}) before printing {needle:?}\nstdout:\n{out}\nstderr:\n{}",
                    self.status,
                    self.stderr()
                );
            }
            if Instant::now() > end {
                panic!("timed out after {timeout:?} waiting for {needle:?}\nstdout:\n{out}\nstderr:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Like [`Tide::wait_for`], for `needle` after the first `after` in `out` (output returned by
    /// an earlier wait).
    pub fn wait_for_after(
        &mut self,
        after: &str,
        needle: &str,
        mut out: String,
        timeout: Duration,
    ) -> String {
        let end = Instant::now() + timeout;
        loop {
            if let Some(i) = out.find(after) {
                if out[i + after.len()..].contains(needle) {
                    return out;
                }
            }
            assert!(
                Instant::now() < end,
                "timed out after {timeout:?} waiting for {needle:?} after {after:?}\nstdout:\n{out}"
            );
            std::thread::sleep(Duration::from_millis(20));
            out = self.stdout();
        }
    }

    /// Waits for `tide` to exit; kills it and panics on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self
                .status
                .or_else(|| self.child.try_wait().expect("try_wait"))
            {
                self.status = Some(s);
                std::thread::sleep(Duration::from_millis(50)); // let the pumps drain
                return s;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!(
                    "tide did not exit within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak resident memory of the tide process (VmHWM), in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        proc_status_kib(self.pid(), "VmHWM:").map(|k| k * 1024)
    }

    /// Current number of threads and open file descriptors of the tide process.
    pub fn threads_and_fds(&self) -> (u64, usize) {
        let threads = proc_status_kib(self.pid(), "Threads:").unwrap_or(0);
        // Not counted: the smaps file the `resident` thread holds open for a moment while it reads
        // an anon region's resident memory (it may or may not be open at either count).
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| {
                        std::fs::read_link(e.path())
                            .map(|t| !t.to_string_lossy().ends_with("/smaps"))
                            .unwrap_or(false)
                    })
                    .count()
            })
            .unwrap_or(0);
        (threads, fds)
    }
}

impl Drop for Tide {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A `kB` field of `/proc/PID/status`.
pub fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One HTTP/1.1 request over a UNIX socket; returns (status code, body). Panics when the socket
/// cannot be reached.
pub fn http(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    try_http(socket, method, path, body).unwrap_or_else(|e| panic!("{e}"))
}

/// [`http`], with an error instead of a panic when the socket cannot be reached or written. An
/// answer that cannot be read (60 s without one) is `(0, "")`.
pub fn try_http(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    let err = |what: &str, e: std::io::Error| format!("{method} {path}: {what}: {e}");
    let mut s = UnixStream::connect(socket).map_err(|e| err("connect to the API socket", e))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| err("set a read timeout", e))?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .map_err(|e| err("send the request", e))?;
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// How long [`Tide::run_guest_with_api`] waits for the API socket.
pub const API_SOCKET_WAIT: Duration = Duration::from_secs(120);

/// Waits until `path` exists (a socket being created), panicking after `timeout`.
pub fn wait_for_path(path: &Path, timeout: Duration) {
    let end = Instant::now() + timeout;
    while !path.exists() {
        assert!(
            Instant::now() < end,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub use vmm_sys_util::tempdir::TempDir;

/// A new temporary directory named after `tag`, removed (with what is in it) on drop.
pub fn temp_dir(tag: &str) -> TempDir {
    TempDir::new_with_prefix(std::env::temp_dir().join(format!("tide-{tag}-")))
        .expect("create a temporary directory")
}

/// `GET /hotplug/memory` as JSON; panics unless it answers 200.
pub fn status(sock: &Path) -> serde_json::Value {
    let (code, body) = http(sock, "GET", "/hotplug/memory", None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("status JSON")
}

/// An integer field of a status; panics when it is missing.
pub fn field(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

/// `PATCH /hotplug/memory` with a new requested size; panics unless it answers 204.
pub fn patch(sock: &Path, bytes: u64) {
    let body = format!(r#"{{"requested_size": {bytes}}}"#);
    let (code, resp) = http(sock, "PATCH", "/hotplug/memory", Some(&body));
    assert_eq!(code, 204, "PATCH {bytes}: {resp}");
}

/// Long-polls until `plugged_size == requested_size` and returns the status; panics if that
/// does not happen within `timeout`.
pub fn wait_settled(sock: &Path, timeout: Duration) -> serde_json::Value {
    let end = Instant::now() + timeout;
    loop {
        let (code, body) = http(
            sock,
            "GET",
            "/hotplug/memory?wait_for=plugged_size&timeout_ms=30000",
            None,
        );
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
        if v["settled"] == true {
            return v;
        }
        assert!(Instant::now() < end, "never settled: {v}");
    }
}

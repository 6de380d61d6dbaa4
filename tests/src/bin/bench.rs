//! Tide's benchmark: how fast guest memory grows and shrinks, against what the host itself can do.
//!
//! `cargo run --release -p tests --bin bench -- --out DIR [--quick]` measures, in one run:
//!
//! 1. the raw host limit: `MADV_POPULATE_WRITE` and the matching discard (`MADV_DONTNEED` for
//!    anonymous memory, `fallocate(PUNCH_HOLE)` for memfd and hugetlb) on a fresh mapping of the
//!    same kind as each Tide backend, in this process;
//! 2. Tide end to end: `tide run` with the test guest following `requested_size`, the time from
//!    `PATCH /hotplug/memory` to `plugged_size` reaching it (the long poll), and back to 0;
//! 3. `tide` start to the guest's first serial byte, and the VMM's own resident memory;
//! 4. the cost of the one KVM memory slot of the hotplug region, by region size;
//!
//! and writes `DIR/results.json`, `DIR/results.md`, `DIR/resize.png` (plugged size and host
//! resident memory over time) and `DIR/resize.csv` (its samples). `--quick` does 1 GiB and one
//! repetition only (a smoke test). Each measurement keeps the best of its repetitions: the host
//! is shared and noisy.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tests::{http, test_guest, TempDir};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TWO_MIB: usize = 2 << 20;
/// `MADV_POPULATE_WRITE` (Linux 5.14).
const MADV_POPULATE_WRITE: i32 = 23;
/// The command line of the test guest following `requested_size`.
const FOLLOW: &str = "console=ttyS0 tide.test=mem-follow tide.verify=0";
/// The command line of the test guest halting at once (the virtio-mem device stays untouched).
const HANG: &str = "console=ttyS0 tide.test=hang";
/// `--requested` at start for the mem-follow guest. The test guest reads `usable_region_size`
/// once, when its driver starts, and never plugs past it (tests/guest/guest.c, `scenario_follow`
/// computes `usable_blocks` once); Tide's usable region is `requested + max(requested, 1 GiB)`,
/// so starting at 0 would cap the guest at 1 GiB. Starting at 4 GiB makes all of the 8 GiB region
/// usable for the guest; the bench then goes back to 0 before measuring.
const START_REQUESTED: &str = "2G";
const START_REQUESTED_BYTES: u64 = 2 << 30;
/// Long waits (guest boot under an emulating KVM, a 4 GiB populate on a slow backend).
const LONG: Duration = Duration::from_secs(120);

type Res<T> = Result<T, String>;

#[path = "bench/ahead.rs"]
mod ahead;

// ------------------------------------------------------------------------------------------------
// Backends

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Anon4k,
    AnonThp,
    Memfd,
    Hugetlb,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Anon4k => "anon-4k",
            Kind::AnonThp => "anon-thp",
            Kind::Memfd => "memfd",
            Kind::Hugetlb => "hugetlb",
        }
    }

    fn tide_args(self) -> &'static [&'static str] {
        match self {
            Kind::Anon4k => &["--backend", "anon", "--no-thp"],
            Kind::AnonThp => &["--backend", "anon"],
            Kind::Memfd => &["--backend", "memfd"],
            Kind::Hugetlb => &["--backend", "hugetlb"],
        }
    }

    fn discard_name(self) -> &'static str {
        match self {
            Kind::Anon4k | Kind::AnonThp => "MADV_DONTNEED",
            Kind::Memfd | Kind::Hugetlb => "fallocate(PUNCH_HOLE)",
        }
    }
}

fn errno(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

// ------------------------------------------------------------------------------------------------
// 1. The raw host limit

/// A fresh mapping of one backend's kind, unmapped (and its memfd closed) on drop.
struct RawMap {
    base: *mut libc::c_void,
    map_len: usize,
    addr: *mut libc::c_void,
    len: usize,
    fd: i32,
    kind: Kind,
}

impl RawMap {
    fn new(kind: Kind, len: usize) -> Res<RawMap> {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        match kind {
            Kind::Memfd | Kind::Hugetlb => {
                let mut flags = libc::MFD_CLOEXEC;
                if kind == Kind::Hugetlb {
                    flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
                }
                // SAFETY: a NUL-terminated name and plain flags; the new fd is owned by the
                // returned RawMap (closed in Drop) or closed below on error.
                let fd = unsafe { libc::memfd_create(c"tide-bench".as_ptr(), flags) };
                if fd < 0 {
                    return Err(errno("memfd_create"));
                }
                // SAFETY: `fd` is the memfd created above and owned here.
                if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
                    let e = errno("ftruncate");
                    // SAFETY: closes the fd we own, once.
                    unsafe { libc::close(fd) };
                    return Err(e);
                }
                // SAFETY: a new shared mapping of our own memfd at an address the kernel
                // chooses; no existing memory is affected.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        prot,
                        libc::MAP_SHARED | libc::MAP_NORESERVE,
                        fd,
                        0,
                    )
                };
                if p == libc::MAP_FAILED {
                    let e = errno("mmap");
                    // SAFETY: closes the fd we own, once.
                    unsafe { libc::close(fd) };
                    return Err(e);
                }
                Ok(RawMap {
                    base: p,
                    map_len: len,
                    addr: p,
                    len,
                    fd,
                    kind,
                })
            }
            Kind::Anon4k | Kind::AnonThp => {
                let map_len = len + TWO_MIB;
                // SAFETY: a new private anonymous reservation at an address the kernel chooses;
                // no existing memory is affected.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        map_len,
                        prot,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                        -1,
                        0,
                    )
                };
                if p == libc::MAP_FAILED {
                    return Err(errno("mmap"));
                }
                let aligned = (p as usize).next_multiple_of(TWO_MIB);
                let addr = aligned as *mut libc::c_void;
                let advice = if kind == Kind::AnonThp {
                    libc::MADV_HUGEPAGE
                } else {
                    libc::MADV_NOHUGEPAGE
                };
                let map = RawMap {
                    base: p,
                    map_len,
                    addr,
                    len,
                    fd: -1,
                    kind,
                };
                // SAFETY: [addr, addr + len) lies inside the mapping created above
                // (aligned - p < 2 MiB of slack).
                if unsafe { libc::madvise(addr, len, advice) } != 0 {
                    return Err(errno("madvise(HUGEPAGE/NOHUGEPAGE)"));
                }
                Ok(map)
            }
        }
    }

    /// Populates the whole range for writing; returns the seconds it took.
    fn populate(&self) -> Res<f64> {
        let t = Instant::now();
        // SAFETY: the range is our own mapping; populating it changes no contents.
        if unsafe { libc::madvise(self.addr, self.len, MADV_POPULATE_WRITE) } != 0 {
            return Err(errno("madvise(MADV_POPULATE_WRITE)"));
        }
        Ok(t.elapsed().as_secs_f64())
    }

    /// Populates the whole range on `threads` of the [`RawThreads`] (2 MiB-aligned pieces, the
    /// caller waiting); returns the seconds it took.
    fn populate_n(&self, threads: usize) -> Res<f64> {
        let (base, len) = (self.addr as usize, self.len);
        let per = len.div_ceil(threads).next_multiple_of(TWO_MIB);
        let pool = RawThreads::get();
        let t = Instant::now();
        let (done, results) = std::sync::mpsc::channel();
        let mut sent = 0;
        for (worker, off) in pool.0.iter().zip((0..len).step_by(per)) {
            let piece = (base + off, per.min(len - off), done.clone());
            worker
                .lock()
                .unwrap()
                .send(piece)
                .map_err(|_| "a raw populate thread is gone")?;
            sent += 1;
        }
        let ok = (0..sent).all(|_| results.recv().unwrap_or(false));
        let secs = t.elapsed().as_secs_f64();
        if !ok {
            return Err("madvise(MADV_POPULATE_WRITE) failed on a thread".into());
        }
        Ok(secs)
    }

    /// Gives the whole range back to the host; returns the seconds it took.
    fn discard(&self) -> Res<f64> {
        let t = Instant::now();
        match self.kind {
            Kind::Anon4k | Kind::AnonThp => {
                // SAFETY: the range is our own private mapping and nothing holds references
                // into it; it reads zero afterwards.
                if unsafe { libc::madvise(self.addr, self.len, libc::MADV_DONTNEED) } != 0 {
                    return Err(errno("madvise(MADV_DONTNEED)"));
                }
            }
            Kind::Memfd | Kind::Hugetlb => {
                // SAFETY: punches a hole in our own memfd; only our mapping sees it.
                let r = unsafe {
                    libc::fallocate(
                        self.fd,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        0,
                        self.len as libc::off_t,
                    )
                };
                if r != 0 {
                    return Err(errno("fallocate(PUNCH_HOLE)"));
                }
            }
        }
        Ok(t.elapsed().as_secs_f64())
    }
}

impl Drop for RawMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`, once; no references into it
        // outlive the RawMap.
        unsafe { libc::munmap(self.base, self.map_len) };
        if self.fd >= 0 {
            // SAFETY: closes the memfd we own, once.
            unsafe { libc::close(self.fd) };
        }
    }
}

/// One long-lived thread pinned to each CPU, for the raw all-threads populate: the best this
/// machine does (threads started per call often share one CPU for most of a 128 MiB populate,
/// which measured as slow as one thread here).
struct RawThreads(Vec<Mutex<Sender<RawPiece>>>);

/// A piece to populate (address, length) and where to say whether it worked.
type RawPiece = (usize, usize, Sender<bool>);

impl RawThreads {
    fn get() -> &'static RawThreads {
        static THREADS: std::sync::OnceLock<RawThreads> = std::sync::OnceLock::new();
        THREADS.get_or_init(|| {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            RawThreads(
                (0..n)
                    .map(|cpu| {
                        let (tx, rx) = std::sync::mpsc::channel::<RawPiece>();
                        std::thread::spawn(move || {
                            // SAFETY: a zeroed bitmask with bit `cpu` set (below CPU_SETSIZE),
                            // applied to this thread only.
                            unsafe {
                                let mut set: libc::cpu_set_t = std::mem::zeroed();
                                libc::CPU_SET(cpu, &mut set);
                                libc::sched_setaffinity(
                                    0,
                                    std::mem::size_of::<libc::cpu_set_t>(),
                                    &set,
                                );
                            }
                            for (addr, len, done) in rx {
                                // SAFETY: the sender passes a range of its own mapping;
                                // populating it changes no contents.
                                let ok = unsafe {
                                    libc::madvise(
                                        addr as *mut libc::c_void,
                                        len,
                                        MADV_POPULATE_WRITE,
                                    )
                                } == 0;
                                let _ = done.send(ok);
                            }
                        });
                        Mutex::new(tx)
                    })
                    .collect(),
            )
        })
    }
}

/// Best (populate, discard) seconds over `reps` cycles on one fresh mapping, after one untimed
/// cycle (the first touch of fresh memory here also pays the outer hypervisor's faults).
fn raw_limit(kind: Kind, bytes: u64, reps: usize) -> Res<(f64, f64)> {
    let map = RawMap::new(kind, bytes as usize)?;
    map.populate()?;
    map.discard()?;
    let (mut pop, mut dis) = (f64::MAX, f64::MAX);
    for _ in 0..reps {
        pop = pop.min(map.populate()?);
        dis = dis.min(map.discard()?);
    }
    Ok((pop, dis))
}

// ------------------------------------------------------------------------------------------------
// Running tide

/// `target/release/tide` beside this program, (re)built first so that the figures are those of
/// the current source (a no-op when it is up to date).
fn tide_path() -> PathBuf {
    let exe = std::env::current_exe().expect("own executable path");
    let dir = exe.parent().expect("target dir").to_path_buf();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("building tide: cargo build --release -p vmm --bin tide");
    let st = Command::new(cargo)
        .current_dir(root)
        .args(["build", "--release", "-p", "vmm", "--bin", "tide"])
        .status()
        .expect("run cargo build for tide");
    assert!(st.success(), "cannot build tide");
    let bin = dir.join("tide");
    let built = root.join("target/release/tide");
    if !bin.exists() && built.exists() {
        return built;
    }
    bin
}

/// A running `tide` with its console and diagnostics captured; killed on drop.
struct Vmm {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    started: Instant,
    first_byte: Arc<Mutex<Option<Instant>>>,
    sock: Option<PathBuf>,
}

fn pump(
    mut r: impl Read + Send + 'static,
    buf: Arc<Mutex<Vec<u8>>>,
    first: Option<Arc<Mutex<Option<Instant>>>>,
) {
    std::thread::spawn(move || {
        let mut b = [0u8; 4096];
        while let Ok(n) = r.read(&mut b) {
            if n == 0 {
                break;
            }
            if let Some(f) = &first {
                f.lock().unwrap().get_or_insert_with(Instant::now);
            }
            buf.lock().unwrap().extend_from_slice(&b[..n]);
        }
    });
}

impl Vmm {
    /// `tide run --kernel <test guest> --cmdline <cmdline> <extra>`.
    fn start(tide: &Path, cmdline: &str, extra: &[&str], sock: Option<&Path>) -> Res<Vmm> {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--kernel".into(),
            test_guest().display().to_string(),
            "--cmdline".into(),
            cmdline.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        if let Some(s) = sock {
            args.push("--api-socket".into());
            args.push(s.display().to_string());
        }
        let started = Instant::now();
        let mut child = Command::new(tide)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", tide.display()))?;
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let first_byte = Arc::new(Mutex::new(None));
        pump(
            child.stdout.take().unwrap(),
            out.clone(),
            Some(first_byte.clone()),
        );
        pump(child.stderr.take().unwrap(), err.clone(), None);
        Ok(Vmm {
            child,
            out,
            err,
            started,
            first_byte,
            sock: sock.map(Path::to_path_buf),
        })
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `cond` holds; fails when tide exits first or on timeout.
    fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&Vmm) -> bool,
    ) -> Res<()> {
        let end = Instant::now() + timeout;
        loop {
            if cond(self) {
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
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

    fn wait_out(&mut self, needle: &str, timeout: Duration) -> Res<()> {
        self.wait_until(&format!("{needle:?} on the console"), timeout, |v| {
            v.stdout().contains(needle)
        })
    }

    fn wait_err(&mut self, needle: &str, timeout: Duration) -> Res<()> {
        self.wait_until(&format!("{needle:?} on stderr"), timeout, |v| {
            v.stderr().contains(needle)
        })
    }

    /// Starts the mem-follow guest with an API socket and waits for its virtio-mem driver.
    fn start_follow(tide: &Path, sock: &Path, kind: Kind, hotplug: &str) -> Res<Vmm> {
        Self::start_follow_with(tide, sock, kind, hotplug, FOLLOW, &[])
    }

    /// [`Vmm::start_follow`] with another guest command line and more `tide` arguments.
    fn start_follow_with(
        tide: &Path,
        sock: &Path,
        kind: Kind,
        hotplug: &str,
        cmdline: &str,
        more: &[&str],
    ) -> Res<Vmm> {
        let mut extra = vec![
            "--memory",
            "512M",
            "--hotplug-size",
            hotplug,
            "--block-size",
            "2M",
            "--requested",
            START_REQUESTED,
            "--log-level",
            "info",
        ];
        extra.extend_from_slice(kind.tide_args());
        extra.extend_from_slice(more);
        let mut v = Vmm::start(tide, cmdline, &extra, Some(sock))?;
        v.wait_until("the API socket", LONG, |_| sock.exists())?;
        v.wait_out("virtio-mem: usable", LONG)?;
        // Back to nothing plugged before anything is measured.
        settle(sock, START_REQUESTED_BYTES)?;
        patch(sock, 0)?;
        settle(sock, 0)?;
        std::thread::sleep(Duration::from_millis(100));
        Ok(v)
    }

    /// Asks for a clean shutdown (through the API socket if any), then kills.
    fn stop(mut self) {
        if let Some(s) = &self.sock {
            let _ = api(s, "PUT", "/vm/shutdown", None);
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Drop kills it.
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// One request on the API socket; (status, body), or an error instead of a panic.
fn api(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Res<(u16, String)> {
    std::panic::catch_unwind(|| http(sock, method, path, body))
        .map_err(|_| format!("{method} {path}: the API socket did not answer"))
}

fn get_mem(sock: &Path) -> Res<Value> {
    let (code, body) = api(sock, "GET", "/hotplug/memory", None)?;
    if code != 200 {
        return Err(format!("GET /hotplug/memory: {code} {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET /hotplug/memory: {e}: {body}"))
}

fn patch(sock: &Path, bytes: u64) -> Res<()> {
    let body = format!("{{\"requested_size\": {bytes}}}");
    let (code, resp) = api(sock, "PATCH", "/hotplug/memory", Some(&body))?;
    if code != 204 {
        return Err(format!("PATCH requested_size {bytes}: {code} {resp}"));
    }
    Ok(())
}

/// The long poll until `plugged_size == requested_size`; the answer, which must be settled at
/// `bytes`.
fn settle(sock: &Path, bytes: u64) -> Res<Value> {
    let (code, body) = api(
        sock,
        "GET",
        "/hotplug/memory?wait_for=plugged_size&timeout_ms=600000",
        None,
    )?;
    if code == 0 && body.is_empty() {
        let now = get_mem(sock).map(|v| v.to_string()).unwrap_or_else(|e| e);
        return Err(format!(
            "long poll for plugged_size {bytes}: no answer within the 60 s read timeout; now {now}"
        ));
    }
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("long poll: {e}: {body}"))?;
    if code != 200 || v["settled"] != true || v["plugged_size"].as_u64() != Some(bytes) {
        return Err(format!(
            "long poll did not settle at {bytes}: {code} {body}"
        ));
    }
    Ok(v)
}

fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn meminfo_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// MemAvailable in bytes: the median of three reads 20 ms apart.
fn mem_available() -> u64 {
    let mut v: Vec<u64> = (0..3)
        .map(|i| {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
            meminfo_kib("MemAvailable:").unwrap_or(0) * 1024
        })
        .collect();
    v.sort_unstable();
    v[1]
}

// ------------------------------------------------------------------------------------------------
// Results

struct Row {
    name: String,
    backend: String,
    bytes: u64,
    seconds: Option<f64>,
    /// Whether `bytes / seconds` is a throughput.
    rate: bool,
    raw_gib_per_s: Option<f64>,
    extra: Vec<(&'static str, Value)>,
    note: String,
}

impl Row {
    fn new(name: &str, backend: &str, bytes: u64, seconds: Option<f64>, rate: bool) -> Row {
        Row {
            name: name.into(),
            backend: backend.into(),
            bytes,
            seconds,
            rate,
            raw_gib_per_s: None,
            extra: Vec::new(),
            note: String::new(),
        }
    }

    fn gib_per_s(&self) -> Option<f64> {
        match (self.rate, self.seconds) {
            (true, Some(s)) if s > 0.0 => Some(self.bytes as f64 / GIB as f64 / s),
            _ => None,
        }
    }

    fn ratio(&self) -> Option<f64> {
        Some(self.gib_per_s()? / self.raw_gib_per_s?)
    }

    fn json(&self) -> Value {
        let mut v = json!({
            "name": self.name,
            "backend": self.backend,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "gib_per_s": self.gib_per_s(),
        });
        let o = v.as_object_mut().unwrap();
        if self.raw_gib_per_s.is_some() {
            o.insert("raw_gib_per_s".into(), json!(self.raw_gib_per_s));
            o.insert("ratio_to_raw".into(), json!(self.ratio()));
        }
        for (k, x) in &self.extra {
            o.insert((*k).into(), x.clone());
        }
        if !self.note.is_empty() {
            o.insert("note".into(), json!(self.note));
        }
        v
    }
}

fn size_str(b: u64) -> String {
    if b >= GIB && b.is_multiple_of(GIB) {
        format!("{} GiB", b / GIB)
    } else if b >= MIB && b.is_multiple_of(MIB) {
        format!("{} MiB", b / MIB)
    } else {
        format!("{:.1} MiB", b as f64 / MIB as f64)
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB as f64)
}

fn secs_str(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.0} us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.3} s")
    }
}

fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| benchmark | backend | size | time | GiB/s | raw GiB/s | Tide / raw | notes |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let f = |x: Option<f64>, p: usize| x.map_or("".into(), |v| format!("{v:.p$}"));
    for r in rows {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.backend,
            if r.bytes > 0 {
                size_str(r.bytes)
            } else {
                String::new()
            },
            r.seconds.map_or(String::new(), secs_str),
            f(r.gib_per_s(), 2),
            f(r.raw_gib_per_s, 2),
            f(r.ratio(), 2),
            r.note
        );
    }
    t
}

/// UTC date and time of `t` (days-to-civil, proleptic Gregorian).
fn utc(t: SystemTime) -> String {
    let s = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (s.div_euclid(86400), s.rem_euclid(86400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn machine() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("?", |(_, m)| m.trim());
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let kvm = if Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm (emulating)"
    } else {
        "hardware-assisted"
    };
    format!(
        "{} (Linux {}), {cpus} x {model}, {} memory, KVM {kvm}",
        host.trim(),
        kernel.trim(),
        size_str(meminfo_kib("MemTotal:").unwrap_or(0) * 1024 / MIB * MIB)
    )
}

// ------------------------------------------------------------------------------------------------
// 2. Tide end to end, and 3b. the VMM's own resident memory

struct Raw {
    kind: Kind,
    bytes: u64,
    populate: f64,
    discard: f64,
}

fn raw_rate(raws: &[Raw], kind: Kind, bytes: u64, populate: bool) -> Option<f64> {
    let r = raws.iter().find(|r| r.kind == kind && r.bytes == bytes)?;
    let s = if populate { r.populate } else { r.discard };
    Some(bytes as f64 / GIB as f64 / s)
}

fn tide_e2e(
    tide: &Path,
    kind: Kind,
    sizes: &[u64],
    reps: usize,
    raws: &[Raw],
    rows: &mut Vec<Row>,
) -> Res<()> {
    let dir = TempDir::new("bench");
    let sock = dir.0.join("api.sock");
    let vmm = Vmm::start_follow(tide, &sock, kind, "8G")?;
    for &bytes in sizes {
        // (seconds, resident before, at the top, after) of the best repetition.
        let mut plug = (f64::MAX, 0, 0, 0);
        let mut unplug = (f64::MAX, 0, 0, 0);
        for _ in 0..reps {
            let before = u(&get_mem(&sock)?, "resident_bytes");
            let t = Instant::now();
            patch(&sock, bytes)?;
            let top = settle(&sock, bytes)?;
            let tp = t.elapsed().as_secs_f64();
            let top = u(&top, "resident_bytes");
            let t = Instant::now();
            patch(&sock, 0)?;
            let after = settle(&sock, 0)?;
            let tu = t.elapsed().as_secs_f64();
            let after = u(&after, "resident_bytes");
            if tp < plug.0 {
                plug = (tp, before, top, after);
            }
            if tu < unplug.0 {
                unplug = (tu, before, top, after);
            }
        }
        for (name, m, populate) in [("tide_plug", plug, true), ("tide_unplug", unplug, false)] {
            let mut r = Row::new(name, kind.name(), bytes, Some(m.0), true);
            r.raw_gib_per_s = raw_rate(raws, kind, bytes, populate);
            r.extra = vec![
                ("resident_before", json!(m.1)),
                ("resident_top", json!(m.2)),
                ("resident_after", json!(m.3)),
                ("repetitions", json!(reps)),
            ];
            r.note = format!("resident {} -> {} -> {}", mib(m.1), mib(m.2), mib(m.3));
            println!(
                "  {name} {} {}: {}",
                kind.name(),
                size_str(bytes),
                secs_str(m.0)
            );
            rows.push(r);
        }
    }

    // The VMM's own resident memory beside a 1 GiB plug, the guest idling.
    patch(&sock, GIB)?;
    settle(&sock, GIB)?;
    std::thread::sleep(Duration::from_millis(500));
    let vm_rss = proc_status_kib(vmm.pid(), "VmRSS:").unwrap_or(0) * 1024;
    let st = get_mem(&sock)?;
    let region = u(&st, "resident_bytes");
    let plugged = u(&st, "plugged_size");
    let own = vm_rss.saturating_sub(region);
    let mut r = Row::new("vmm_rss_minus_region", kind.name(), own, None, false);
    r.extra = vec![
        ("vm_rss", json!(vm_rss)),
        ("region_resident", json!(region)),
        ("plugged", json!(plugged)),
    ];
    r.note = format!(
        "VmRSS {} - region resident {} (plugged {}); includes the boot RAM the guest touched",
        mib(vm_rss),
        mib(region),
        size_str(plugged)
    );
    println!("  vmm rss {}: {}", kind.name(), r.note);
    rows.push(r);
    patch(&sock, 0)?;
    settle(&sock, 0)?;
    vmm.stop();
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// 2b. Linux's request pattern, Tide's own service time (GET /metrics), warm and cold raw limits

/// Best discard of `m` over `reps` cycles while a KVM VM (no vCPU) maps it as a memory slot:
/// what a VMM's discard costs at least, since KVM's MMU notifier drops the guest's view of the
/// range too. `None` without a usable `/dev/kvm`.
fn discard_under_kvm_slot(m: &RawMap, threads: usize, reps: usize) -> Option<f64> {
    let kvm = kvm_ioctls::Kvm::new().ok()?;
    let vm = kvm.create_vm().ok()?;
    let slot = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 1 << 32,
        memory_size: m.len as u64,
        userspace_addr: m.addr as u64,
    };
    // SAFETY: the range is our own mapping and outlives the VM (dropped at the end of this
    // function, before `m`); no vCPU ever runs, so nothing accesses it through KVM.
    unsafe { vm.set_user_memory_region(slot) }.ok()?;
    let mut best = f64::MAX;
    for _ in 0..reps {
        m.populate_n(threads).ok()?;
        best = best.min(m.discard().ok()?);
    }
    Some(best)
}

/// Raw limits of one backend for the goals: warm 128 MiB and 1 GiB at 1 thread and at all
/// threads, 128 MiB discard, and a cold 1 GiB first touch.
#[derive(Default, Clone, Copy)]
struct RawSet {
    threads: usize,
    p128_1: f64,
    p128_n: f64,
    d128: f64,
    /// The same discard while KVM maps the range as a memory slot (`None`: no KVM).
    d128_kvm: Option<f64>,
    p1g_1: f64,
    p1g_n: f64,
    cold_1g_n: f64,
}

fn raw_set(kind: Kind, reps: usize, rows: &mut Vec<Row>) -> Res<RawSet> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut set = RawSet {
        threads: n,
        p128_1: f64::MAX,
        p128_n: f64::MAX,
        d128: f64::MAX,
        d128_kvm: None,
        p1g_1: f64::MAX,
        p1g_n: f64::MAX,
        cold_1g_n: 0.0,
    };
    {
        let m = RawMap::new(kind, 128 * MIB as usize)?;
        m.populate()?;
        m.discard()?;
        // At least 5 cycles: freed huge pages here sometimes go back to the outer hypervisor
        // between two cycles, and one cold populate is 20-40 x slower than a warm one.
        for _ in 0..reps.max(5) {
            set.p128_1 = set.p128_1.min(m.populate_n(1)?);
            set.d128 = set.d128.min(m.discard()?);
            set.p128_n = set.p128_n.min(m.populate_n(n)?);
            m.discard()?;
        }
        set.d128_kvm = discard_under_kvm_slot(&m, n, reps);
        let m = RawMap::new(kind, GIB as usize)?;
        m.populate()?;
        m.discard()?;
        for _ in 0..reps {
            set.p1g_1 = set.p1g_1.min(m.populate_n(1)?);
            m.discard()?;
            set.p1g_n = set.p1g_n.min(m.populate_n(n)?);
            m.discard()?;
        }
    }
    // Cold: the first touch of fresh memory 3 s after 1 GiB was given back (the outer
    // hypervisor takes freed memory back; faulting it in again is slower and varies).
    std::thread::sleep(Duration::from_secs(3));
    let m = RawMap::new(kind, GIB as usize)?;
    set.cold_1g_n = m.populate_n(n)?;
    drop(m);
    for (name, bytes, secs, note) in [
        (
            "raw_populate_1t",
            128 * MIB,
            set.p128_1,
            "warm, 1 thread".to_string(),
        ),
        (
            "raw_populate_nt",
            128 * MIB,
            set.p128_n,
            format!("warm, {n} threads"),
        ),
        (
            "raw_discard",
            128 * MIB,
            set.d128,
            kind.discard_name().to_string(),
        ),
        (
            "raw_discard_kvm_slot",
            128 * MIB,
            set.d128_kvm.unwrap_or(f64::NAN),
            format!(
                "{} while a KVM VM maps the range as a memory slot (its MMU notifier runs too)",
                kind.discard_name()
            ),
        ),
        (
            "raw_populate_1t",
            GIB,
            set.p1g_1,
            "warm, 1 thread".to_string(),
        ),
        (
            "raw_populate_nt",
            GIB,
            set.p1g_n,
            format!("warm, {n} threads"),
        ),
        (
            "raw_populate_nt_cold",
            GIB,
            set.cold_1g_n,
            format!("cold (fresh memory 3 s after a 1 GiB discard), {n} threads"),
        ),
    ] {
        if secs.is_nan() {
            continue;
        }
        let mut r = Row::new(name, kind.name(), bytes, Some(secs), true);
        r.note = note;
        println!(
            "  {name} {} {}: {}",
            kind.name(),
            size_str(bytes),
            secs_str(secs)
        );
        rows.push(r);
    }
    Ok(set)
}

/// The per-request metrics of the running tide (`GET /metrics`).
fn metrics(sock: &Path) -> Res<Value> {
    let (code, body) = api(sock, "GET", "/metrics", None)?;
    if code != 200 {
        return Err(format!("GET /metrics: {code} {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET /metrics: {e}: {body}"))
}

/// `after - before` of one request type's sums.
#[derive(Default, Clone, Copy, Debug)]
struct Delta {
    count: u64,
    total: f64,
    validate: f64,
    protect: f64,
    syscall: f64,
    ahead_wait: f64,
    bookkeeping: f64,
    notify: f64,
    ahead: u64,
}

impl Delta {
    fn of(before: &Value, after: &Value, kind: &str) -> Delta {
        let g = |v: &Value, k: &str| v[kind][k].as_u64().unwrap_or(0);
        let d = |k: &str| g(after, k).saturating_sub(g(before, k));
        let s = |k: &str| d(k) as f64 * 1e-9;
        Delta {
            count: d("count"),
            total: s("total_ns"),
            validate: s("validate_ns"),
            protect: s("protect_ns"),
            syscall: s("syscall_ns"),
            ahead_wait: s("ahead_wait_ns"),
            bookkeeping: s("bookkeeping_ns"),
            notify: s("notify_ns"),
            ahead: d("ahead_bytes"),
        }
    }

    /// Average service time per request (s).
    fn avg(&self) -> f64 {
        self.total / self.count.max(1) as f64
    }

    /// Average fixed cost per request: service time less the system calls and the wait for
    /// populate ahead (s).
    fn fixed(&self) -> f64 {
        (self.validate + self.bookkeeping) / self.count.max(1) as f64
    }

    fn note(&self) -> String {
        let pct = |x: f64| 100.0 * x / self.total.max(1e-12);
        format!(
            "{} requests, service avg {} (syscalls {:.0}%, mprotect {:.0}%, waiting for populate \
             ahead {:.0}%, validation {:.0}%, bookkeeping {:.0}%), fixed {:.1} us/request, then \
             the interrupt {:.1} us/request, {} populated ahead",
            self.count,
            secs_str(self.avg()),
            pct(self.syscall),
            pct(self.protect),
            pct(self.ahead_wait),
            pct(self.validate),
            pct(self.bookkeeping),
            self.fixed() * 1e6,
            self.notify / self.count.max(1) as f64 * 1e6,
            mib(self.ahead)
        )
    }
}

/// Tier 3: Linux's own virtio-mem driver resizes 0 -> 1 GiB -> 0 (anon, 2 MiB blocks); per
/// direction, the host's service time of each request (queue pop to used ring, from
/// `GET /metrics`), how many requests and of what size, and the share in the memory system calls.
/// Returns the lines for results.md.
fn linux_driver(rows: &mut Vec<Row>) -> Res<Vec<String>> {
    use tests::linux::{guest_dir, LinuxGuest};
    let dir = guest_dir()?;
    let t = Instant::now();
    let mut g = LinuxGuest::boot(
        &dir,
        "bench-linux",
        &["--hotplug-size", "2G", "--block-size", "2M"],
    );
    println!(
        "  booted to a shell in {}",
        secs_str(t.elapsed().as_secs_f64())
    );
    let mut lines = Vec::new();
    for (target, kind) in [(GIB, "plug"), (0, "unplug")] {
        let before = metrics(&g.sock)?;
        let t = Instant::now();
        patch(&g.sock, target)?;
        settle(&g.sock, target)?;
        let device_done = t.elapsed().as_secs_f64();
        g.wait_mem_total(g.boot_mem_total_kib + target / 1024);
        let guest_done = t.elapsed().as_secs_f64();
        let after = metrics(&g.sock)?;
        let d = Delta::of(&before, &after, kind);
        let field = |k: &str| after[kind][k].as_u64().unwrap_or(0);
        let bytes = field("bytes").saturating_sub(before[kind]["bytes"].as_u64().unwrap_or(0));
        let per_request = bytes / d.count.max(1);
        let line = format!(
            "Linux driver, {kind} to {}: {} requests of {} on average; service time per request min {} / avg {} / max {} (since boot); {:.0}% of the service time in the memory system calls, {:.0}% in mprotect; device done {} after the PATCH, guest's MemTotal {} after it (the rest is Linux's own work, emulated here)",
            size_str(target),
            d.count,
            mib(per_request),
            secs_str(field("min_ns") as f64 * 1e-9),
            secs_str(d.avg()),
            secs_str(field("max_ns") as f64 * 1e-9),
            100.0 * d.syscall / d.total.max(1e-12),
            100.0 * d.protect / d.total.max(1e-12),
            secs_str(device_done),
            secs_str(guest_done),
        );
        println!("  {line}");
        let mut r = Row::new(
            &format!("linux_driver_{kind}"),
            "anon_thp",
            GIB,
            Some(device_done),
            true,
        );
        r.extra.push(("requests", json!(d.count)));
        r.extra.push(("bytes_per_request", json!(per_request)));
        r.extra.push(("service_avg_s", json!(d.avg())));
        r.extra.push(("service_total_s", json!(d.total)));
        r.extra
            .push(("syscall_share", json!(d.syscall / d.total.max(1e-12))));
        r.extra.push(("guest_memtotal_s", json!(guest_done)));
        r.note = "Linux's virtio-mem driver (tier-3 guest), PATCH to settled".into();
        rows.push(r);
        lines.push(line);
    }
    let st = g.power_off();
    if !st.success() {
        return Err(format!("the Linux guest's tide exited with {st:?}"));
    }
    Ok(lines)
}

/// One measured pattern: end-to-end plug and unplug of 1 GiB and the device's service times.
#[derive(Default, Clone, Copy)]
struct Pattern {
    plug: f64,
    unplug: f64,
    plug_m: Delta,
    unplug_m: Delta,
}

/// Tide end to end, 0 -> 1 GiB -> 0, best of `reps`, with the guest command line `cmdline` and
/// `more` tide arguments.
#[allow(clippy::too_many_arguments)]
fn tide_pattern(
    tide: &Path,
    kind: Kind,
    name: &str,
    cmdline: &str,
    more: &[&str],
    reps: usize,
    raw: &RawSet,
    rows: &mut Vec<Row>,
) -> Res<Pattern> {
    let dir = TempDir::new("bench-pattern");
    let sock = dir.0.join("api.sock");
    let vmm = Vmm::start_follow_with(tide, &sock, kind, "8G", cmdline, more)?;
    let mut best = Pattern {
        plug: f64::MAX,
        unplug: f64::MAX,
        ..Default::default()
    };
    for _ in 0..reps {
        let m0 = metrics(&sock)?;
        let t = Instant::now();
        patch(&sock, GIB)?;
        settle(&sock, GIB)?;
        let tp = t.elapsed().as_secs_f64();
        let m1 = metrics(&sock)?;
        let t = Instant::now();
        patch(&sock, 0)?;
        settle(&sock, 0)?;
        let tu = t.elapsed().as_secs_f64();
        let m2 = metrics(&sock)?;
        if tp < best.plug {
            best.plug = tp;
            best.plug_m = Delta::of(&m0, &m1, "plug");
        }
        if tu < best.unplug {
            best.unplug = tu;
            best.unplug_m = Delta::of(&m1, &m2, "unplug");
        }
    }
    // Cold: the same plug 3 s after the last unplug, like the raw cold figure (the outer
    // hypervisor takes freed memory back meanwhile; faulting it in again is slower).
    std::thread::sleep(Duration::from_secs(3));
    let m0 = metrics(&sock)?;
    let t = Instant::now();
    patch(&sock, GIB)?;
    settle(&sock, GIB)?;
    let cold = t.elapsed().as_secs_f64();
    let cold_m = Delta::of(&m0, &metrics(&sock)?, "plug");
    patch(&sock, 0)?;
    settle(&sock, 0)?;
    vmm.stop();
    for (what, secs, d, raw_s) in [
        ("plug", best.plug, best.plug_m, raw.p1g_n),
        ("unplug", best.unplug, best.unplug_m, 8.0 * raw.d128),
        ("plug_cold", cold, cold_m, raw.cold_1g_n),
    ] {
        let mut r = Row::new(
            &format!("tide_{what}_{name}"),
            kind.name(),
            GIB,
            Some(secs),
            true,
        );
        r.raw_gib_per_s = Some(1.0 / raw_s);
        r.note = format!("end to end; device: {}", d.note());
        r.extra = vec![
            ("requests", json!(d.count)),
            ("service_avg_s", json!(d.avg())),
            ("service_total_s", json!(d.total)),
            ("syscall_s", json!(d.syscall)),
            ("protect_s", json!(d.protect)),
            ("validate_s", json!(d.validate)),
            ("bookkeeping_s", json!(d.bookkeeping)),
            ("ahead_wait_s", json!(d.ahead_wait)),
            ("notify_s", json!(d.notify)),
            ("ahead_bytes", json!(d.ahead)),
        ];
        println!(
            "  {} {}: {} ({})",
            r.name,
            kind.name(),
            secs_str(secs),
            d.note()
        );
        rows.push(r);
    }
    Ok(best)
}

/// Everything of section 2b for one backend, and the goals' verdicts.
fn linux_pattern(
    tide: &Path,
    kind: Kind,
    reps: usize,
    rows: &mut Vec<Row>,
    goals: &mut Vec<String>,
) -> Res<()> {
    let raw = raw_set(kind, reps, rows)?;
    let linux = "console=ttyS0 tide.test=mem-follow tide.verify=0 tide.chunk=128M";
    let one = tide_pattern(
        tide,
        kind,
        "one_request",
        FOLLOW,
        &["--no-populate-ahead"],
        reps,
        &raw,
        rows,
    )?;
    let lin = tide_pattern(
        tide,
        kind,
        "linux",
        linux,
        &["--no-populate-ahead"],
        reps,
        &raw,
        rows,
    )?;
    let ahead = tide_pattern(tide, kind, "linux_ahead", linux, &[], reps, &raw, rows)?;
    let _ = one;
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let k = kind.name();
    let g1 = lin.plug_m.avg() / raw.p128_n;
    goals.push(format!(
        "{k}: 128 MiB PLUG service {} = {g1:.2} x raw {}-thread populate {} (goal <= 1.15: {}); \
         with populate ahead {} of which waiting for populate ahead {:.0}%, syscalls {:.0}%, \
         bookkeeping+validation {:.0}%",
        secs_str(lin.plug_m.avg()),
        raw.threads,
        secs_str(raw.p128_n),
        met(g1 <= 1.15),
        secs_str(ahead.plug_m.avg()),
        100.0 * ahead.plug_m.ahead_wait / ahead.plug_m.total.max(1e-12),
        100.0 * ahead.plug_m.syscall / ahead.plug_m.total.max(1e-12),
        100.0 * (ahead.plug_m.bookkeeping + ahead.plug_m.validate) / ahead.plug_m.total.max(1e-12),
    ));
    let fixed = [
        lin.plug_m.fixed(),
        lin.unplug_m.fixed(),
        ahead.plug_m.fixed(),
    ]
    .into_iter()
    .fold(0.0, f64::max);
    goals.push(format!(
        "{k}: fixed cost per request (service less syscalls, mprotect and the wait for populate ahead) at most {:.1} us (goal <= 50 us: {})",
        fixed * 1e6,
        met(fixed <= 50e-6)
    ));
    let g3 = ahead.plug / raw.p1g_n;
    goals.push(format!(
        "{k}: end to end, Linux's pattern with populate ahead, 1 GiB: {} = {g3:.2} x raw {}-thread {} \
         (goal <= 1.3 for 4 KiB pages{}); the device's service time is {} of it, the rest is the \
         emulated guest and the API",
        secs_str(ahead.plug),
        raw.threads,
        secs_str(raw.p1g_n),
        if kind == Kind::Anon4k { format!(": {}", met(g3 <= 1.3)) } else { String::new() },
        secs_str(ahead.plug_m.total),
    ));
    let g4 = lin.unplug_m.avg() / (1.1 * raw.d128 + 50e-6);
    goals.push(format!(
        "{k}: 128 MiB UNPLUG service {} vs 1.1 x raw discard {} + 50 us = {} (goal: {}); \
         raw discard while KVM maps the range as a memory slot: {}; the UNPLUG's phases: \
         discards {}, mprotect {}, the rest {}",
        secs_str(lin.unplug_m.avg()),
        secs_str(raw.d128),
        secs_str(1.1 * raw.d128 + 50e-6),
        met(g4 <= 1.0),
        raw.d128_kvm
            .map_or("not measured (no KVM)".into(), secs_str),
        secs_str(lin.unplug_m.syscall / lin.unplug_m.count.max(1) as f64),
        secs_str(lin.unplug_m.protect / lin.unplug_m.count.max(1) as f64),
        secs_str(
            (lin.unplug_m.validate + lin.unplug_m.bookkeeping) / lin.unplug_m.count.max(1) as f64
        ),
    ));
    Ok(())
}

/// Raises the 2 MiB huge page pool to `pages` free pages; returns the old `nr_hugepages` to
/// restore, or why it cannot.
fn raise_hugetlb_pool(pages: u64) -> Res<Option<String>> {
    let free = |k: &str| {
        std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{k}"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let have = free("free_hugepages");
    if have >= pages {
        return Ok(None);
    }
    let old = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .map_err(|e| format!("cannot read nr_hugepages: {e}"))?;
    let want = old.trim().parse::<u64>().unwrap_or(0) + pages - have;
    std::fs::write("/proc/sys/vm/nr_hugepages", want.to_string())
        .map_err(|e| format!("cannot raise nr_hugepages to {want}: {e}"))?;
    if free("free_hugepages") < pages {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", &old);
        return Err(format!(
            "asked for {pages} free 2 MiB pages, got {}",
            free("free_hugepages")
        ));
    }
    Ok(Some(old))
}

// ------------------------------------------------------------------------------------------------
// 3a. Start to the first serial byte

fn startup(tide: &Path, runs: usize, rows: &mut Vec<Row>) -> Res<()> {
    let mut times = Vec::new();
    for _ in 0..runs {
        let mut v = Vmm::start(tide, "console=ttyS0", &["--memory", "512M"], None)?;
        v.wait_until("the first console byte", LONG, |v| {
            v.first_byte.lock().unwrap().is_some()
        })?;
        let first = v.first_byte.lock().unwrap().unwrap();
        times.push((first - v.started).as_secs_f64());
        v.wait_out("power off", LONG)?;
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let mut r = Row::new("start_to_first_serial_byte", "none", 0, Some(median), false);
    r.extra = vec![("runs_seconds", json!(times))];
    r.note = format!(
        "median of {runs}; min {}, max {}",
        secs_str(times[0]),
        secs_str(times[times.len() - 1])
    );
    println!("  start to first serial byte: {}", secs_str(median));
    rows.push(r);
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// 4. The KVM slot

/// Starts a halting guest with `hotplug` (or none), returns (slot ms, MemAvailable drop).
fn slot_run(tide: &Path, hotplug: Option<&str>) -> Res<(Option<f64>, u64)> {
    let before = mem_available();
    let mut extra = vec!["--memory", "512M", "--log-level", "info"];
    if let Some(h) = hotplug {
        extra.extend_from_slice(&["--hotplug-size", h]);
    }
    let mut v = Vmm::start(tide, HANG, &extra, None)?;
    let ms = if hotplug.is_some() {
        v.wait_err("KVM slot registered in", LONG)?;
        let err = v.stderr();
        let tail = err.split("registered in ").nth(1).unwrap_or("");
        Some(
            tail.split_whitespace()
                .next()
                .and_then(|n| n.parse::<f64>().ok())
                .ok_or_else(|| format!("cannot parse the slot time in {err:?}"))?,
        )
    } else {
        None
    };
    v.wait_out("hanging", LONG)?;
    std::thread::sleep(Duration::from_millis(300));
    let during = mem_available();
    drop(v);
    std::thread::sleep(Duration::from_millis(300));
    Ok((ms, before.saturating_sub(during)))
}

fn slot_cost(tide: &Path, sizes: &[u64], rows: &mut Vec<Row>) -> Res<()> {
    let (_, base) = slot_run(tide, None)?;
    let mut r = Row::new("memavailable_drop_no_hotplug", "none", base, None, false);
    r.note = format!("tide with no hotplug region: MemAvailable -{}", mib(base));
    println!("  {}", r.note);
    rows.push(r);
    for &size in sizes {
        let arg = format!("{}G", size / GIB);
        let (ms, drop) = slot_run(tide, Some(&arg))?;
        let ms = ms.unwrap_or(0.0);
        let mut r = Row::new("kvm_slot_register", "anon-thp", size, Some(ms / 1e3), false);
        r.extra = vec![
            ("memavailable_drop", json!(drop)),
            (
                "memavailable_drop_minus_no_hotplug",
                json!(drop as i64 - base as i64),
            ),
        ];
        r.note = format!(
            "MemAvailable -{} (-{} over no hotplug)",
            mib(drop),
            mib(drop.saturating_sub(base))
        );
        println!("  slot {}: {ms:.1} ms, {}", size_str(size), r.note);
        rows.push(r);
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// The resize plot

/// What one plotted line shows of a sample.
type Series = (&'static str, (u8, u8, u8), u32, fn(&Sample) -> u64);

struct Sample {
    t: f64,
    requested: u64,
    plugged: u64,
    resident: u64,
}

fn resize_trace(tide: &Path, seq: &[u64], out: &Path) -> Res<usize> {
    let dir = TempDir::new("bench-resize");
    let sock = dir.0.join("api.sock");
    let vmm = Vmm::start_follow(tide, &sock, Kind::AnonThp, "8G")?;
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let sampler = {
        let (samples, stop, sock) = (samples.clone(), stop.clone(), sock.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let next = Instant::now() + Duration::from_millis(10);
                if let Ok(v) = get_mem(&sock) {
                    samples.lock().unwrap().push(Sample {
                        t: t0.elapsed().as_secs_f64(),
                        requested: u(&v, "requested_size"),
                        plugged: u(&v, "plugged_size"),
                        resident: u(&v, "resident_bytes"),
                    });
                }
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        })
    };
    let hold = Duration::from_millis(400);
    std::thread::sleep(hold);
    let mut res = Ok(());
    for &b in seq {
        if let Err(e) = patch(&sock, b).and_then(|_| settle(&sock, b)) {
            res = Err(e);
            break;
        }
        std::thread::sleep(hold);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    vmm.stop();
    res?;
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    let mut csv = String::from("seconds,requested_bytes,plugged_bytes,resident_bytes\n");
    for s in &samples {
        let _ = writeln!(
            csv,
            "{:.4},{},{},{}",
            s.t, s.requested, s.plugged, s.resident
        );
    }
    std::fs::write(out.join("resize.csv"), csv).map_err(|e| format!("resize.csv: {e}"))?;
    draw(&samples, seq, &out.join("resize.png"))?;
    Ok(samples.len())
}

/// Registers a system TrueType font for plotters' `ab_glyph` text; false when none is found.
fn load_font() -> bool {
    const FONTS: &[&str] = &[
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    ];
    for f in FONTS {
        if let Ok(bytes) = std::fs::read(f) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(
                "sans-serif",
                plotters::style::FontStyle::Normal,
                bytes,
            )
            .is_ok()
            {
                return true;
            }
        }
    }
    false
}

fn draw(samples: &[Sample], seq: &[u64], png: &Path) -> Res<()> {
    use plotters::prelude::*;
    let e = |e: &dyn std::fmt::Display| format!("resize.png: {e}");
    let font = load_font();
    if !font {
        println!("  note: no TrueType font found; resize.png has no labels");
    }
    let t_max = samples.last().map_or(1.0, |s| s.t).max(0.1);
    let y_max = samples
        .iter()
        .map(|s| s.plugged.max(s.resident).max(s.requested))
        .chain(seq.iter().copied())
        .max()
        .unwrap_or(GIB) as f64
        / MIB as f64
        * 1.08;
    let root = BitMapBackend::new(png, (1200, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut b = ChartBuilder::on(&root);
    b.margin(20);
    if font {
        let steps: Vec<String> = std::iter::once("0".to_string())
            .chain(
                seq.iter()
                    .map(|&b| if b == 0 { "0".into() } else { size_str(b) }),
            )
            .collect();
        let caption = format!(
            "Tide, anon THP backend: requested {} (GET /hotplug/memory every ~10 ms)",
            steps.join(" -> ")
        );
        b.caption(caption, ("sans-serif", 22))
            .x_label_area_size(50)
            .y_label_area_size(80);
    }
    let mut chart = b
        .build_cartesian_2d(0.0..t_max * 1.02, 0.0..y_max)
        .map_err(|x| e(&x))?;
    if font {
        chart
            .configure_mesh()
            .x_desc("seconds since the first sample")
            .y_desc("MiB")
            .y_label_formatter(&|y| format!("{y:.0}"))
            .x_label_formatter(&|x| format!("{x:.1}"))
            .label_style(("sans-serif", 18))
            .axis_desc_style(("sans-serif", 20))
            .draw()
            .map_err(|x| e(&x))?;
    }
    let series: [Series; 3] = [
        ("requested_size", (150, 150, 150), 2, |s| s.requested),
        ("plugged_size (guest)", (20, 90, 200), 3, |s| s.plugged),
        ("resident_bytes (host)", (220, 50, 30), 2, |s| s.resident),
    ];
    for (label, (r, g, b), width, f) in series {
        let color = RGBColor(r, g, b);
        let pts = samples
            .iter()
            .map(|s| (s.t, f(s) as f64 / MIB as f64))
            .collect::<Vec<_>>();
        let drawn = chart
            .draw_series(LineSeries::new(pts, color.stroke_width(width)))
            .map_err(|x| e(&x))?;
        if font {
            drawn.label(label).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 24, y)], color.stroke_width(3))
            });
        }
    }
    if font {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 18))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

// ------------------------------------------------------------------------------------------------

/// Sections 1-5: the raw host limits, Tide with the test guest per backend and pattern, start-up,
/// the KVM slot's cost and the resize trace.
fn host_and_test_guest(
    tide: &Path,
    quick: bool,
    reps: usize,
    out: &Path,
    rows: &mut Vec<Row>,
    goals: &mut Vec<String>,
    skipped: &mut Vec<String>,
) {
    let tide = tide.to_path_buf();
    let out = out.to_path_buf();
    let sizes: Vec<u64> = vec![GIB];
    let mut kinds = vec![Kind::Anon4k, Kind::AnonThp, Kind::Memfd];
    let free_huge =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
    // hugetlb: 2 GiB for the guest's warm-up (plugs and populate ahead stay under requested),
    // and a little more; the pool is raised here and restored at the end, as the tests do.
    let mut restore_pool = None;
    match raise_hugetlb_pool(1100) {
        Ok(old) => {
            restore_pool = old;
            kinds.push(Kind::Hugetlb);
        }
        Err(e) => {
            let s = format!("SKIP hugetlb: {free_huge} free 2 MiB huge pages, 1100 needed: {e}");
            println!("{s}");
            skipped.push(s);
        }
    }

    // Per backend, the raw limit right before Tide's run, so that both see the same host state.
    println!(
        "1-2. per backend: the raw host limit, then Tide end to end (test guest mem-follow, \
         8 GiB region, long poll); best of {reps}"
    );
    let mut raws = Vec::new();
    for &k in &kinds {
        println!(" {}", k.name());
        for &b in &sizes {
            match raw_limit(k, b, reps) {
                Ok((p, d)) => {
                    println!(
                        "  {} {}: populate {}, {} {}",
                        k.name(),
                        size_str(b),
                        secs_str(p),
                        k.discard_name(),
                        secs_str(d)
                    );
                    let mut r = Row::new("raw_populate", k.name(), b, Some(p), true);
                    r.note = "MADV_POPULATE_WRITE".into();
                    rows.push(r);
                    let mut r = Row::new("raw_discard", k.name(), b, Some(d), true);
                    r.note = k.discard_name().into();
                    rows.push(r);
                    raws.push(Raw {
                        kind: k,
                        bytes: b,
                        populate: p,
                        discard: d,
                    });
                }
                Err(e) => {
                    let s = format!("raw {} {}: {e}", k.name(), size_str(b));
                    println!("  FAILED {s}");
                    skipped.push(s);
                }
            }
        }
        if let Err(e) = tide_e2e(&tide, k, &sizes, reps, &raws, rows) {
            let s = format!("tide {}: {e}", k.name());
            println!("  FAILED {s}");
            skipped.push(s);
        }
    }

    println!(
        "2b. per backend: raw warm/cold at 1 and all threads, Tide in one request and in \
         Linux's pattern (128 MiB per request), with and without populate ahead; best of {reps}"
    );
    for &k in &kinds {
        println!(" {}", k.name());
        if let Err(e) = linux_pattern(&tide, k, reps, rows, goals) {
            let s = format!("linux pattern {}: {e}", k.name());
            println!("  FAILED {s}");
            skipped.push(s);
        }
    }
    if let Some(old) = restore_pool {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", old);
    }

    println!("3. start to the first serial byte");
    if let Err(e) = startup(&tide, 5, rows) {
        println!("  FAILED {e}");
        skipped.push(format!("startup: {e}"));
    }

    println!("4. KVM slot of the hotplug region");
    let slot_sizes: Vec<u64> = if quick {
        vec![GIB]
    } else {
        vec![GIB, 64 * GIB, 256 * GIB]
    };
    if let Err(e) = slot_cost(&tide, &slot_sizes, rows) {
        println!("  FAILED {e}");
        skipped.push(format!("slot: {e}"));
    }

    println!("5. resize trace (anon THP)");
    let seq: Vec<u64> = if quick {
        vec![GIB, 512 * MIB, 0]
    } else {
        vec![GIB, 4 * GIB, 512 * MIB, 0]
    };
    match resize_trace(&tide, &seq, &out) {
        Ok(n) => println!("  {n} samples -> {}", out.join("resize.png").display()),
        Err(e) => {
            println!("  FAILED {e}");
            skipped.push(format!("resize trace: {e}"));
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut out = None;
    let mut quick = false;
    let mut linux_only = false;
    let mut ahead_only = false;
    let mut linux_ahead = false;
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--out" if i + 1 < args.len() => {
                out = Some(PathBuf::from(&args[i + 1]));
                i += 1;
            }
            "--quick" => quick = true,
            "--linux-only" => linux_only = true,
            "--ahead-only" => ahead_only = true,
            "--linux-ahead" => linux_ahead = true,
            "-h" | "--help" => {
                println!("usage: bench --out DIR [--quick] [--linux-only] [--ahead-only] [--linux-ahead]");
                println!("  --linux-only   only Linux's own driver (tier 3)");
                println!("  --ahead-only   only section 7: populate ahead with and without, quiet and beside two busy loops");
                println!("  --linux-ahead  also Linux's own driver with and without populate ahead (two more guests)");
                return;
            }
            a => {
                eprintln!("bench: unknown argument {a:?}; usage: bench --out DIR [--quick] [--linux-only] [--ahead-only] [--linux-ahead]");
                std::process::exit(2);
            }
        }
        i += 1;
    }
    let Some(out) = out else {
        eprintln!("bench: --out DIR is required; usage: bench --out DIR [--quick] [--linux-only]");
        std::process::exit(2);
    };
    std::fs::create_dir_all(&out).expect("create the output directory");
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        eprintln!("bench: /dev/kvm is not usable ({e}); the Tide rows need KVM");
        std::process::exit(1);
    }

    let start = Instant::now();
    let date = utc(SystemTime::now());
    let command = format!("bench {}", args[1..].join(" "));
    let tide = tide_path();
    let reps = if quick { 1 } else { 3 };
    let mut skipped: Vec<String> = Vec::new();

    let mut rows: Vec<Row> = Vec::new();
    let mut goals = Vec::new();
    if !linux_only && !ahead_only {
        host_and_test_guest(
            &tide,
            quick,
            reps,
            &out,
            &mut rows,
            &mut goals,
            &mut skipped,
        );
    }

    let linux_lines = if ahead_only {
        Vec::new()
    } else {
        println!(
            "6. Linux's virtio-mem driver (tier-3 guest from TIDE_GUEST_DIR; boot takes minutes on \
             an emulating KVM)"
        );
        match linux_driver(&mut rows) {
            Ok(l) => l,
            Err(e) => {
                println!("  SKIP {e}");
                skipped.push(format!("Linux driver: {e}"));
                Vec::new()
            }
        }
    };
    if !linux_only {
        ahead::populate_ahead_section(&tide, reps, &mut rows, &mut goals, &mut skipped);
    }
    if linux_ahead {
        println!("8. Linux's own driver with and without populate ahead (two tier-3 guests)");
        if let Err(e) = ahead::linux_driver_ahead(reps.min(2), &mut rows, &mut goals) {
            println!("  SKIP {e}");
            skipped.push(format!("Linux driver with and without populate ahead: {e}"));
        }
    }

    let elapsed = start.elapsed().as_secs_f64();
    let json = Value::Array(rows.iter().map(Row::json).collect());
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json).unwrap() + "\n",
    )
    .expect("write results.json");
    let t = table(&rows);
    let mut md = format!(
        "Tide benchmark on {}, {date}; command: `{command}`; took {elapsed:.0} s.\n\n\
         Best of {reps} repetition(s) each (shared, noisy host: compare ratios within one run). \
         Tide times run from the PATCH to the long poll's answer (woken when the device has \
         handled the guest's requests), and include the guest's side: the config interrupt, \
         its config reads and its request, all emulated on this host's KVM. `raw` rows: this \
         process on a fresh mapping of the same kind, after one untimed warm-up cycle. Tide: \
         512 MiB boot RAM, one 8 GiB region of 2 MiB blocks, test guest with `tide.verify=0`, \
         started at requested 4 GiB and brought back to 0 before measuring (warm-up). \
         hugetlb needs 2048 free 2 MiB pages.\n\n{t}",
        machine()
    );
    md.push_str("\nGoals (issue 12), from this run:\n\n");
    for g in &goals {
        let _ = writeln!(md, "- {g}");
    }
    if !linux_lines.is_empty() {
        md.push_str("\nLinux's own virtio-mem driver (tier 3):\n\n");
        for l in &linux_lines {
            let _ = writeln!(md, "- {l}");
        }
    }
    if !skipped.is_empty() {
        md.push_str("\nNot measured:\n\n");
        for s in &skipped {
            let _ = writeln!(md, "- {s}");
        }
    }
    std::fs::write(out.join("results.md"), &md).expect("write results.md");
    println!("\n{md}");
    println!(
        "wrote {}/results.json, results.md, resize.png, resize.csv",
        out.display()
    );
}

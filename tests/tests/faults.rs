//! Tier 2: Tide under host faults and hostile clients, with the test guest following
//! `requested_size`: a memory cgroup too small for the plug, an empty or tiny hugetlb pool,
//! resizes and shutdowns in the middle of a long plug, and API clients that hang up halfway.

use memory::{GIB, MIB};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tests::{
    field, http, patch, require_kvm, status, temp_dir, wait_for_path, wait_settled, TempDir, Tide,
};

const T: Duration = Duration::from_secs(120);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn vm_running(sock: &Path) -> bool {
    let (code, body) = http(sock, "GET", "/vm", None);
    code == 200 && body.contains(r#""state":"running""#)
}

/// Starts the test guest in `mem-follow` with an API socket in `tmp`.
fn follow_guest(tmp: &TempDir, extra: &[&str]) -> (Tide, PathBuf) {
    let sock = tmp.as_path().join("api.sock");
    let mut args = vec!["--api-socket", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut tide = Tide::run_guest("console=ttyS0 tide.test=mem-follow", &args);
    wait_for_path(&sock, T);
    tide.wait_for("tide-guest: virtio-mem: usable", T);
    (tide, sock)
}

// ---- (a) a memory cgroup too small for the plug ----

/// A child memory cgroup with a limit, removed on drop (after the processes in it are gone).
struct MemCgroup {
    dir: PathBuf,
    /// cgroup v2 (`memory.max`, `memory.events`) or v1 (`memory.limit_in_bytes`, `memory.oom_control`).
    v2: bool,
}

impl MemCgroup {
    /// Creates a child group limited to `limit` bytes, under the unified hierarchy when it has
    /// the memory controller, else under this process's v1 memory group. `Err(why)` if neither.
    fn create(tag: &str, limit: u64) -> Result<MemCgroup, String> {
        if !is_root() {
            return Err("not root".into());
        }
        let name = format!("tide-{tag}-{}", std::process::id());
        let mut why = Vec::new();
        for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
            let controllers = Path::new(root).join("cgroup.controllers");
            let Ok(c) = std::fs::read_to_string(&controllers) else {
                continue;
            };
            if !c.split_whitespace().any(|w| w == "memory") {
                why.push(format!("{root}: no memory controller (has: {})", c.trim()));
                continue;
            }
            // At the root of the hierarchy, which may hold processes and still delegate.
            let _ = std::fs::write(Path::new(root).join("cgroup.subtree_control"), "+memory");
            let dir = Path::new(root).join(&name);
            match std::fs::create_dir(&dir)
                .and_then(|_| std::fs::write(dir.join("memory.max"), limit.to_string()))
                .and_then(|_| std::fs::write(dir.join("memory.swap.max"), "0").or(Ok(())))
            {
                Ok(()) => return Ok(MemCgroup { dir, v2: true }),
                Err(e) => {
                    let _ = std::fs::remove_dir(&dir);
                    why.push(format!("{}: {e}", dir.display()));
                }
            }
        }
        let v1 = Path::new("/sys/fs/cgroup/memory");
        if v1.join("memory.limit_in_bytes").exists() {
            // Under our own group, so that whatever limits apply to us apply to the child too.
            let own = std::fs::read_to_string("/proc/self/cgroup")
                .ok()
                .and_then(|s| {
                    s.lines().find_map(|l| {
                        let mut parts = l.splitn(3, ':');
                        let (_, ctl, path) = (parts.next()?, parts.next()?, parts.next()?);
                        ctl.split(',')
                            .any(|c| c == "memory")
                            .then(|| path.trim_start_matches('/').to_string())
                    })
                })
                .unwrap_or_default();
            let dir = v1.join(own).join(&name);
            match std::fs::create_dir(&dir)
                .and_then(|_| std::fs::write(dir.join("memory.limit_in_bytes"), limit.to_string()))
            {
                Ok(()) => return Ok(MemCgroup { dir, v2: false }),
                Err(e) => {
                    let _ = std::fs::remove_dir(&dir);
                    why.push(format!("{}: {e}", dir.display()));
                }
            }
        } else {
            why.push("no v1 memory controller at /sys/fs/cgroup/memory".into());
        }
        Err(why.join("; "))
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("cannot move {pid} into {}: {e}", self.dir.display()));
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// Number of OOM kills in the group.
    fn oom_kills(&self) -> u64 {
        let text = self.read(if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        });
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Peak usage of the group, in bytes (0 where the kernel does not say).
    fn peak(&self) -> u64 {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        self.read(file).trim().parse().unwrap_or(0)
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("warning: cannot remove {}", self.dir.display());
    }
}

#[test]
fn plug_past_a_memory_cgroup_limit_gets_busy_and_a_fitting_one_works() {
    let name = "plug_past_a_memory_cgroup_limit_gets_busy_and_a_fitting_one_works";
    if !require_kvm(name) {
        return;
    }
    const LIMIT: u64 = 300 * MIB;
    let cg = match MemCgroup::create("faults-cg", LIMIT) {
        Ok(cg) => cg,
        Err(why) => {
            println!("SKIP {name}: cannot create a memory cgroup with a limit ({why})");
            return;
        }
    };
    let tmp = temp_dir("cgroup");
    let sock = tmp.as_path().join("api.sock");
    let mut tide = Tide::run_guest(
        "console=ttyS0 tide.test=mem-follow",
        &[
            "--hotplug-size",
            "2G",
            "--requested",
            "0",
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    );
    // Nothing is plugged before the first PATCH (requested 0), so moving it now is early
    // enough: every block populated from here on is charged to the group.
    cg.add(tide.pid());
    wait_for_path(&sock, T);
    tide.wait_for("tide-guest: virtio-mem: usable", T);
    let before = wait_settled(&sock, T);
    let resident0 = field(&before, "resident_bytes");

    patch(&sock, GIB);
    tide.wait_for("n=512 -> BUSY", T);
    // No resize comes, yet the guest tries again: the device's retry timer raised a config
    // change after the BUSY (Linux would otherwise back off for 50 s or more).
    let end = std::time::Instant::now() + T;
    while tide.stdout().matches("n=512 -> BUSY").count() < 2 {
        assert!(
            std::time::Instant::now() < end,
            "no retry after BUSY: {}",
            tide.stdout()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let s = status(&sock);
    assert_eq!(field(&s, "plugged_size"), 0, "{s}");
    assert_eq!(field(&s, "requested_size"), GIB, "{s}");
    assert!(
        field(&s, "resident_bytes") <= resident0 + 2 * MIB,
        "the failed plug left memory resident: {s} (before: {before})"
    );
    assert!(
        vm_running(&sock),
        "tide stopped answering:\n{}",
        tide.stderr()
    );
    assert_eq!(
        cg.oom_kills(),
        0,
        "the OOM killer ran in the group:\n{}",
        tide.stderr()
    );
    assert!(cg.peak() <= LIMIT);

    // A size that fits: the PATCH raises a config change and the guest plugs it.
    patch(&sock, 64 * MIB);
    tide.wait_for("tide-guest: plugged 67108864 requested 67108864", T);
    let s = wait_settled(&sock, T);
    let resident = field(&s, "resident_bytes");
    assert!(
        (64 * MIB..=64 * MIB + resident0 + 4 * MIB).contains(&resident),
        "resident {resident} after plugging 64 MiB: {s}"
    );
    assert_eq!(cg.oom_kills(), 0);
    let peak = cg.peak();
    assert!(peak <= LIMIT, "group peak {peak} over its limit {LIMIT}");
    let out = tide.stdout();
    assert!(!out.contains("FAIL"), "{out}");
    println!(
        "{name}: BUSY at 1 GiB under a {} MiB limit (group peak {} MiB), 64 MiB plugged after",
        LIMIT / MIB,
        peak / MIB
    );

    let (code, _) = http(&sock, "PUT", "/vm/shutdown", None);
    assert_eq!(code, 204);
    assert!(tide.wait_exit(T).success(), "{}", tide.stderr());
}

// ---- (b) hugetlb pool empty or too small ----

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
const FREE_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

fn read_num(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The hugetlb tests change the host's pool: one at a time.
static POOL_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn pool_lock() -> std::sync::MutexGuard<'static, ()> {
    POOL_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sets the 2 MiB huge page pool and puts the old size back on drop (also when a test panics).
struct HugePool {
    old: u64,
}

impl HugePool {
    fn set(pages: u64) -> std::io::Result<(HugePool, u64)> {
        let old = read_num(NR_HUGEPAGES);
        std::fs::write(NR_HUGEPAGES, pages.to_string())?;
        Ok((HugePool { old }, read_num(NR_HUGEPAGES)))
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(NR_HUGEPAGES, self.old.to_string()) {
            eprintln!(
                "warning: cannot restore {NR_HUGEPAGES} to {}: {e}",
                self.old
            );
        }
    }
}

#[test]
fn hugetlb_backend_with_an_empty_pool_fails_at_start_with_one_clear_line() {
    let name = "hugetlb_backend_with_an_empty_pool_fails_at_start_with_one_clear_line";
    if !require_kvm(name) {
        return;
    }
    let _lock = pool_lock();
    // Empty the pool for the test if we may (and it is not already empty).
    let _pool = if read_num(FREE_HUGEPAGES) != 0 {
        if !is_root() {
            println!("SKIP {name}: the huge page pool is not empty and only root can empty it");
            return;
        }
        match HugePool::set(0) {
            Ok((p, 0)) => Some(p),
            _ => {
                println!("SKIP {name}: cannot empty the huge page pool");
                return;
            }
        }
    } else {
        None
    };
    let mut tide = Tide::run_guest(
        "console=ttyS0 tide.test=mem-follow",
        &["--hotplug-size", "64M", "--backend", "hugetlb"],
    );
    let status = tide.wait_exit(T);
    assert!(!status.success(), "tide started on an empty pool");
    let err = tide.stderr();
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains("huge page"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !tide.stdout().contains("tide-guest: hello"),
        "the guest ran"
    );
}

/// Waits until the huge page pool has `free` free pages (panics with `what` after [`T`]).
fn wait_free_hugepages(free: u64, what: &str) {
    let end = Instant::now() + T;
    loop {
        let now = read_num(FREE_HUGEPAGES);
        if now == free {
            return;
        }
        assert!(
            Instant::now() < end,
            "{what}: {now} free huge pages, not {free}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn tiny_hugetlb_pool_busy_for_a_big_plug_and_a_small_one_works() {
    let name = "tiny_hugetlb_pool_busy_for_a_big_plug_and_a_small_one_works";
    if !require_kvm(name) {
        return;
    }
    if !is_root() {
        println!("SKIP {name}: needs root to size the huge page pool");
        return;
    }
    let _lock = pool_lock();
    let (pool, pages) = match HugePool::set(16) {
        Ok(p) => p,
        Err(e) => {
            println!("SKIP {name}: cannot set {NR_HUGEPAGES}: {e}");
            return;
        }
    };
    if !(8..32).contains(&pages) {
        drop(pool);
        println!("SKIP {name}: asked for 16 huge pages, the kernel gave {pages}");
        return;
    }
    let tmp = temp_dir("hugetlb");
    let (mut tide, sock) = follow_guest(
        &tmp,
        &[
            "--hotplug-size",
            "1G",
            "--requested",
            "0",
            "--backend",
            "hugetlb",
        ],
    );
    assert_eq!(status(&sock)["backend"], "hugetlb");
    let pool_bytes = pages * 2 * MIB;

    // 64 MiB: more than the pool holds.
    patch(&sock, 64 * MIB);
    tide.wait_for("n=32 -> BUSY", T);
    // The failed plug gives its pages back (a populate ahead of the same blocks may hold some
    // for a moment after the BUSY: wait for the pool to be whole, an event, not an instant).
    wait_free_hugepages(pages, "the failed plug kept huge pages");
    let s = status(&sock);
    assert_eq!(field(&s, "plugged_size"), 0, "{s}");
    // Never counted: memory populated ahead, done or under way.
    assert!(field(&s, "resident_bytes") <= 2 * MIB, "{s}");
    assert!(vm_running(&sock), "{}", tide.stderr());

    // 16 MiB fits.
    assert!(16 * MIB <= pool_bytes);
    patch(&sock, 16 * MIB);
    tide.wait_for("tide-guest: plugged 16777216 requested 16777216", T);
    let s = wait_settled(&sock, T);
    assert_eq!(field(&s, "resident_bytes"), 16 * MIB, "{s}");
    wait_free_hugepages(pages - 8, "the 16 MiB plug");

    // Unplugging gives the pages back to the pool.
    patch(&sock, 0);
    tide.wait_for("tide-guest: plugged 0 requested 0", T);
    wait_settled(&sock, T);
    wait_free_hugepages(pages, "the unplug");
    assert!(!tide.stdout().contains("FAIL"), "{}", tide.stdout());

    let (code, _) = http(&sock, "PUT", "/vm/shutdown", None);
    assert_eq!(code, 204);
    assert!(tide.wait_exit(T).success(), "{}", tide.stderr());
    drop(pool);
}

// ---- (c) resize and shutdown in the middle of a long plug ----

/// Waits until a plug of `target` bytes is under way: memory is becoming resident while
/// `plugged_size` has not moved yet. Returns the resident bytes seen.
///
/// Resident memory is read from the process's own counters (`RssAnon` in /proc/PID/status, O(1)),
/// not from the API: the API's anon `resident_bytes` is a reading taken off the event loop that
/// can lag a plug in progress by one page-table walk.
fn wait_mid_plug(tide: &Tide, sock: &Path, plugged_before: u64, target: u64) -> u64 {
    let end = Instant::now() + T;
    loop {
        let resident = rss_anon(tide.pid());
        let s = status(sock);
        let plugged = field(&s, "plugged_size");
        assert_eq!(
            plugged, plugged_before,
            "the plug of {target} finished before we could catch it in the middle: {s}"
        );
        // 32 MiB for the VMM itself and the guest's boot RAM.
        if resident >= plugged_before + 96 * MIB {
            return resident;
        }
        assert!(Instant::now() < end, "the plug never started: {s}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn rss_anon(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("RssAnon:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

#[test]
fn resize_and_shutdown_in_the_middle_of_a_4g_plug() {
    let name = "resize_and_shutdown_in_the_middle_of_a_4g_plug";
    if !require_kvm(name) {
        return;
    }
    let tmp = temp_dir("midplug");
    // The test guest takes the usable region size once, at start (tests/guest/guest.c,
    // scenario_follow): start with 2 GiB requested so that it is 4 GiB, then go down to 0.
    let (mut tide, sock) = follow_guest(
        &tmp,
        &["--hotplug-size", "8G", "--requested", "2G", "--no-thp"],
    );
    tide.wait_for("tide-guest: plugged 2147483648 requested 2147483648", T);
    patch(&sock, 0);
    tide.wait_for("tide-guest: plugged 0 requested 0", T);
    wait_settled(&sock, T);

    // A PATCH while 4 GiB of 4 KiB pages are being populated is answered at once.
    let t0 = Instant::now();
    patch(&sock, 4 * GIB);
    let resident = wait_mid_plug(&tide, &sock, 0, 4 * GIB);
    let t1 = Instant::now();
    patch(&sock, 2 * GIB);
    let patch_latency = t1.elapsed();
    assert!(
        patch_latency < Duration::from_secs(1),
        "PATCH took {patch_latency:?} during a plug"
    );
    // The guest gets its 4 GiB, then follows the new size down to 2 GiB.
    tide.wait_for("tide-guest: plugged 2147483648 requested 2147483648", T);
    let s = wait_settled(&sock, T);
    assert_eq!(field(&s, "plugged_size"), 2 * GIB, "{s}");
    let settle = t0.elapsed();

    // Shut down while the next plug (2 GiB more) runs: tide stops in order and exits 0.
    patch(&sock, 4 * GIB);
    wait_mid_plug(&tide, &sock, 2 * GIB, 4 * GIB);
    let t2 = Instant::now();
    let (code, body) = http(&sock, "PUT", "/vm/shutdown", None);
    assert_eq!(code, 204, "{body}");
    let status = tide.wait_exit(Duration::from_secs(60));
    let exit_time = t2.elapsed();
    assert!(status.success(), "{status:?}: {}", tide.stderr());
    assert!(
        exit_time < Duration::from_secs(30),
        "shutdown mid-plug took {exit_time:?}"
    );
    assert!(!tide.stderr().contains("panicked"), "{}", tide.stderr());
    println!(
        "{name}: PATCH mid-plug (resident {} MiB) answered in {patch_latency:?}; 4G -> 2G settled \
         after {settle:?}; shutdown mid-plug exited 0 in {exit_time:?}",
        resident / MIB
    );
}

// ---- (d) clients that send half a request and hang up ----

#[test]
fn half_requests_and_hang_ups_during_a_plug_leak_nothing() {
    let name = "half_requests_and_hang_ups_during_a_plug_leak_nothing";
    if !require_kvm(name) {
        return;
    }
    let tmp = temp_dir("halfreq");
    let (mut tide, sock) = follow_guest(
        &tmp,
        &["--hotplug-size", "2G", "--requested", "0", "--no-thp"],
    );
    wait_settled(&sock, T);
    let baseline = tide.threads_and_fds();

    patch(&sock, GIB);
    let halves: [&[u8]; 5] = [
        b"PATCH /hotplug/memory HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"requested_",
        b"GET /hotplug/memory?wait_for=plugged_size HTTP/1.1\r\nHost: x",
        b"GET /vm HTTP/1.1\r\n",
        b"PUT /vm/shut",
        b"",
    ];
    for i in 0..50 {
        let mut s = UnixStream::connect(&sock).expect("connect");
        let _ = s.write_all(halves[i % halves.len()]);
        drop(s);
        if i % 10 == 9 {
            assert!(vm_running(&sock), "GET /vm failed after {} hang-ups", i + 1);
        }
    }
    // A long poll that hangs up while waiting must be dropped too.
    {
        let mut s = UnixStream::connect(&sock).expect("connect");
        s.write_all(b"GET /hotplug/memory?wait_for=plugged_size&timeout_ms=60000 HTTP/1.1\r\n\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    tide.wait_for("tide-guest: plugged 1073741824 requested 1073741824", T);
    let s = wait_settled(&sock, T);
    assert_eq!(field(&s, "plugged_size"), GIB);
    assert!(vm_running(&sock));

    // The server closes each of those connections when it sees the hang-up.
    let end = Instant::now() + Duration::from_secs(10);
    let mut now = tide.threads_and_fds();
    while now != baseline && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
        now = tide.threads_and_fds();
    }
    assert_eq!(now, baseline, "(threads, fds) after the hang-ups vs before");

    let (code, _) = http(&sock, "PUT", "/vm/shutdown", None);
    assert_eq!(code, 204);
    assert!(tide.wait_exit(T).success(), "{}", tide.stderr());
}

//! Populate and discard throughput of `HotplugRegion` beside raw `madvise` on a fresh mapping of
//! the same kind. Run with `cargo bench -p memory --bench populate`.

use memory::{GIB, MIB};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::Instant;

use memory::{Backend, GuestAddress, HotplugLayout, HotplugRegion, RegionOptions};

const SIZE: u64 = GIB;
const ROUNDS: usize = 3;

/// One measured backend: the crate's `Backend` and whether anon memory asks for huge pages.
struct Case {
    name: &'static str,
    backend: Backend,
    thp: bool,
}

fn gib_s(secs: f64) -> f64 {
    SIZE as f64 / GIB as f64 / secs
}

fn time<F: FnOnce()>(f: F) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

/// Best (populate, discard) seconds through `HotplugRegion`.
fn through_region(case: &Case) -> (f64, f64) {
    let (backend, thp) = (case.backend.clone(), case.thp);
    let layout = HotplugLayout {
        base: GuestAddress(4 * GIB),
        size: SIZE,
        block_size: 2 * MIB,
    };
    let r = HotplugRegion::with_options(&layout, backend, RegionOptions { thp }).unwrap();
    assert_eq!(r.thp(), thp);
    let (mut pop, mut dis) = (f64::MAX, f64::MAX);
    for _ in 0..ROUNDS {
        pop = pop.min(time(|| r.populate(layout.base, SIZE).unwrap()));
        dis = dis.min(time(|| r.discard(layout.base, SIZE).unwrap()));
    }
    (pop, dis)
}

/// Best (populate, discard) seconds with raw syscalls on a fresh read-write mapping.
fn raw(case: &Case) -> (f64, f64) {
    let len = SIZE as usize;
    let (flags, fd, file) = match case.backend {
        Backend::Anon => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, None),
        _ => {
            let mut mfd = libc::MFD_CLOEXEC;
            if case.backend == Backend::Hugetlb {
                mfd |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
            }
            // SAFETY: valid NUL-terminated name; result checked.
            let fd = unsafe { libc::memfd_create(c"bench".as_ptr(), mfd) };
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            // SAFETY: fd is fresh and owned by nobody else.
            let f = unsafe { std::fs::File::from_raw_fd(fd) };
            f.set_len(SIZE).unwrap();
            (libc::MAP_SHARED, f.as_raw_fd(), Some(f))
        }
    };
    // Over-map anonymous memory to align it for THP; a file mapping must stay within the file.
    let over = if file.is_some() {
        len
    } else {
        len + 2 * MIB as usize
    };
    // SAFETY: fresh mapping at a kernel-chosen address; result checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            over,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_NORESERVE,
            fd,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    let aligned = if file.is_some() {
        p
    } else {
        (p as usize).next_multiple_of(2 * MIB as usize) as *mut libc::c_void
    };
    if case.thp {
        // SAFETY: inside our own mapping.
        let r = unsafe { libc::madvise(aligned, len, libc::MADV_HUGEPAGE) };
        assert_eq!(r, 0);
    }
    let (mut pop, mut dis) = (f64::MAX, f64::MAX);
    for _ in 0..ROUNDS {
        pop = pop.min(time(|| {
            // SAFETY: inside our own mapping.
            let r = unsafe { libc::madvise(aligned, len, libc::MADV_POPULATE_WRITE) };
            assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        }));
        dis = dis.min(time(|| {
            let r = match &file {
                // SAFETY: inside our own mapping.
                None => unsafe { libc::madvise(aligned, len, libc::MADV_DONTNEED) },
                // SAFETY: plain syscall on our own descriptor.
                Some(f) => unsafe {
                    libc::fallocate(
                        f.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        0,
                        SIZE as libc::off_t,
                    )
                },
            };
            assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        }));
    }
    // SAFETY: unmapping our own mapping.
    unsafe { libc::munmap(p, over) };
    (pop, dis)
}

/// Mean seconds per call of `f` over `n` calls.
fn per_call(n: u32, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_secs_f64() / f64::from(n)
}

/// The cost of one-block requests in a region of `size` bytes (2 MiB blocks, THP): STATE of
/// one block; PLUG + UNPLUG of one block through the region beside the same syscalls done raw
/// on the same block (mprotect, MADV_POPULATE_WRITE, mprotect, MADV_DONTNEED). The difference is
/// the region's bookkeeping (bitmap, run budget, listeners, the cgroup headroom check).
/// Returns (state, region cycle, raw cycle) in seconds.
fn one_block(size: u64) -> (f64, f64, f64) {
    let layout = HotplugLayout {
        base: GuestAddress(4 * GIB),
        size,
        block_size: 2 * MIB,
    };
    let r = HotplugRegion::new(&layout, Backend::Anon).unwrap();
    // Some plugged blocks at both ends, as a guest that plugged and unplugged would leave.
    for i in 0..8 {
        r.populate(GuestAddress(4 * GIB + i * 2 * MIB), 2 * MIB)
            .unwrap();
        r.populate(GuestAddress(4 * GIB + size - (i + 1) * 2 * MIB), 2 * MIB)
            .unwrap();
    }
    let block = GuestAddress(4 * GIB + size / 2);
    let state = per_call(100_000, || {
        r.state(block, 2 * MIB).unwrap();
    });
    let cycle = per_call(500, || {
        r.populate(block, 2 * MIB).unwrap();
        r.discard(block, 2 * MIB).unwrap();
    });
    let host = (r.host_addr() + size / 2) as *mut libc::c_void;
    let len = (2 * MIB) as usize;
    let raw = per_call(500, || {
        // SAFETY: one unplugged block of the region's own reservation, left as it was found
        // (PROT_NONE, no memory); nothing else uses it meanwhile.
        unsafe {
            assert_eq!(
                libc::mprotect(host, len, libc::PROT_READ | libc::PROT_WRITE),
                0
            );
            assert_eq!(libc::madvise(host, len, libc::MADV_POPULATE_WRITE), 0);
            assert_eq!(libc::mprotect(host, len, libc::PROT_NONE), 0);
            assert_eq!(libc::madvise(host, len, libc::MADV_DONTNEED), 0);
        }
    });
    r.discard_all().unwrap();
    (state, cycle, raw)
}

fn main() {
    println!("one 2 MiB block (anon THP), mean us per call");
    println!(
        "{:<8} {:>10} {:>22} {:>18} {:>14}",
        "region", "STATE", "PLUG+UNPLUG (region)", "same syscalls raw", "bookkeeping"
    );
    for (name, size) in [("64 MiB", 64 * MIB), ("1 TiB", 1 << 40)] {
        let (state, cycle, raw) = one_block(size);
        println!(
            "{:<8} {:>10.2} {:>22.1} {:>18.1} {:>14.1}",
            name,
            state * 1e6,
            cycle * 1e6,
            raw * 1e6,
            (cycle - raw) * 1e6
        );
    }
    if std::env::args().any(|a| a == "--one-block") {
        return;
    }
    let free_huge: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
    let case = |name, backend, thp| Case { name, backend, thp };
    let mut cases = vec![
        case("anon 4K", Backend::Anon, false),
        case("anon THP", Backend::Anon, true),
        case("memfd", Backend::Memfd, false),
    ];
    if free_huge >= SIZE / (2 * MIB) {
        cases.push(case("hugetlb", Backend::Hugetlb, false));
    } else {
        println!("hugetlb: skipped, {free_huge} free 2 MiB pages (need 512)");
    }
    println!("1 GiB populate / discard, best of {ROUNDS}, GiB/s");
    println!(
        "{:<10} {:>14} {:>14} {:>14} {:>14}",
        "backend", "region pop", "raw pop", "region discard", "raw discard"
    );
    for c in &cases {
        let (rp, rd) = through_region(c);
        let (wp, wd) = raw(c);
        println!(
            "{:<10} {:>14.2} {:>14.2} {:>14.2} {:>14.2}",
            c.name,
            gib_s(rp),
            gib_s(wp),
            gib_s(rd),
            gib_s(wd)
        );
    }
}

//! Section 1: the raw host limit, in this process.

use super::*;

/// A fresh mapping of one backend's kind, unmapped (and its memfd closed) on drop.
pub(crate) struct RawMap {
    pub(crate) base: *mut libc::c_void,
    pub(crate) map_len: usize,
    pub(crate) addr: *mut libc::c_void,
    pub(crate) len: usize,
    pub(crate) fd: i32,
    pub(crate) kind: Kind,
}

impl RawMap {
    pub(crate) fn new(kind: Kind, len: usize) -> Res<RawMap> {
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
    pub(crate) fn populate(&self) -> Res<f64> {
        let t = Instant::now();
        // SAFETY: the range is our own mapping; populating it changes no contents.
        if unsafe { libc::madvise(self.addr, self.len, MADV_POPULATE_WRITE) } != 0 {
            return Err(errno("madvise(MADV_POPULATE_WRITE)"));
        }
        Ok(t.elapsed().as_secs_f64())
    }

    /// Populates the whole range on `threads` of the [`RawThreads`] (2 MiB-aligned pieces, the
    /// caller waiting); returns the seconds it took.
    pub(crate) fn populate_n(&self, threads: usize) -> Res<f64> {
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
    pub(crate) fn discard(&self) -> Res<f64> {
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
pub(crate) struct RawThreads(Vec<Mutex<Sender<RawPiece>>>);

/// A piece to populate (address, length) and where to say whether it worked.
pub(crate) type RawPiece = (usize, usize, Sender<bool>);

impl RawThreads {
    pub(crate) fn get() -> &'static RawThreads {
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
pub(crate) fn raw_limit(kind: Kind, bytes: u64, reps: usize) -> Res<(f64, f64)> {
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

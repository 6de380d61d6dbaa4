//! Hotplug region tests against real host syscalls (no KVM).

use memory::{GIB, KIB, MIB};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use memory::{
    Backend, Error, GuestAddress, HotplugLayout, HotplugRegion, RamDiscardListener, RangeState,
    RegionOptions, UnpluggedAccess,
};
use vm_memory::{Bytes, GuestMemoryRegion, MemoryRegionAddress};

const TIB: u64 = 1 << 40;
const BASE: u64 = 4 * GIB;

fn layout(size: u64, block_size: u64) -> HotplugLayout {
    HotplugLayout {
        base: GuestAddress(BASE),
        size,
        block_size,
    }
}

fn ga(off: u64) -> GuestAddress {
    GuestAddress(BASE + off)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// `(start, end, perms)` of every /proc/self/maps entry overlapping the region.
fn vmas(r: &HotplugRegion) -> Vec<(u64, u64, String)> {
    let start = r.host_addr();
    let end = start + r.size();
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (s, e) = w.next()?.split_once('-')?;
            let (s, e) = (
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            );
            let perms = w.next()?.to_string();
            (s < end && e > start).then_some((s, e, perms))
        })
        .collect()
}

/// Writes `pattern` at a few places of `[off, off + len)` through a vm-memory region.
fn write_pattern(r: &HotplugRegion, off: u64, len: u64, pattern: u64) {
    // SAFETY: `g` is dropped at the end of this function, before `r`.
    let g = unsafe { r.guest_region() }.unwrap();
    for o in (off..off + len).step_by((MIB) as usize) {
        g.write_obj(pattern, MemoryRegionAddress(o)).unwrap();
        g.write_obj(pattern, MemoryRegionAddress(o + MIB - 8))
            .unwrap();
    }
}

fn read_u64(r: &HotplugRegion, off: u64) -> u64 {
    // SAFETY: the region is used and dropped within this expression, before `r`.
    unsafe { r.guest_region() }
        .unwrap()
        .read_obj(MemoryRegionAddress(off))
        .unwrap()
}

#[test]
fn reserve_1tib_anon() {
    let r = HotplugRegion::new(&layout(TIB, 2 * MIB), Backend::Anon).unwrap();
    assert_eq!(r.size(), TIB);
    assert!(r.thp());
    assert_eq!(r.host_addr() & (2 * MIB - 1), 0);
    assert_eq!(r.plugged_bytes(), 0);
    assert!(r.resident_bytes().unwrap() < MIB);
    assert_eq!(r.state(ga(0), TIB).unwrap(), RangeState::Unplugged);
    // The whole reservation is one PROT_NONE mapping.
    assert_eq!(
        vmas(&r),
        vec![(r.host_addr(), r.host_addr() + TIB, "---p".into())]
    );
    // Plug the first and the last block.
    r.populate(ga(0), 2 * MIB).unwrap();
    r.populate(ga(TIB - 2 * MIB), 2 * MIB).unwrap();
    assert_eq!(r.plugged_bytes(), 4 * MIB);
    assert_eq!(r.state(ga(0), TIB).unwrap(), RangeState::Mixed);
    assert_eq!(
        r.plugged_ranges(),
        vec![(ga(0), 2 * MIB), (ga(TIB - 2 * MIB), 2 * MIB)]
    );
    write_pattern(&r, TIB - 2 * MIB, MIB, 0xfeed);
    assert_eq!(vmas(&r).len(), 3);
    r.discard_all().unwrap();
    assert_eq!(r.plugged_bytes(), 0);
    assert!(r.plugged_ranges().is_empty());
    assert_eq!(vmas(&r).len(), 1);
}

/// The hugetlb tests change the host's pool: one at a time.
static POOL_LOCK: Mutex<()> = Mutex::new(());

fn pool_lock() -> std::sync::MutexGuard<'static, ()> {
    POOL_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Restores /proc/sys/vm/nr_hugepages on drop.
struct HugePool(Option<String>);

impl Drop for HugePool {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = std::fs::write("/proc/sys/vm/nr_hugepages", old);
        }
    }
}

fn free_hugepages() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Makes sure 128 free 2 MiB pages exist, or says why not.
fn huge_pool() -> Result<HugePool, String> {
    if free_hugepages() >= 128 {
        return Ok(HugePool(None));
    }
    if !is_root() {
        return Err("hugetlb pool has fewer than 128 free 2 MiB pages and not root".into());
    }
    let old = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .map_err(|e| format!("cannot read nr_hugepages: {e}"))?;
    let want = old.trim().parse::<u64>().unwrap_or(0) + 128;
    let guard = HugePool(Some(old));
    std::fs::write("/proc/sys/vm/nr_hugepages", want.to_string())
        .map_err(|e| format!("cannot write nr_hugepages: {e}"))?;
    if free_hugepages() < 128 {
        return Err(format!(
            "asked for {want} huge pages, only {} free",
            free_hugepages()
        ));
    }
    Ok(guard)
}

fn populate_discard_cycle(backend: Backend, options: RegionOptions) {
    let r = HotplugRegion::with_options(&layout(GIB, 2 * MIB), backend, options).unwrap();
    let size = 256 * MIB;
    let before = r.resident_bytes().unwrap();
    assert!(before < MIB, "resident {before} before populate");
    r.populate(ga(0), size).unwrap();
    assert_eq!(r.plugged_bytes(), size);
    let after = r.resident_bytes().unwrap();
    assert!(
        after >= before + size - MIB && after <= before + size + 4 * MIB,
        "{:?}: resident {after} after populating {size}",
        r.backend()
    );
    write_pattern(&r, 0, size, 0x5a5a_5a5a_dead_beef);
    assert_eq!(read_u64(&r, 17 * MIB), 0x5a5a_5a5a_dead_beef);
    r.discard(ga(0), size).unwrap();
    assert_eq!(r.plugged_bytes(), 0);
    let discarded = r.resident_bytes().unwrap();
    assert!(
        discarded <= before + MIB,
        "{:?}: resident {discarded} after discard",
        r.backend()
    );
    // Hugetlb mappings never merge back (their VMAs have a close hook).
    let max_vmas = if *r.backend() == Backend::Hugetlb {
        2
    } else {
        1
    };
    assert!(
        vmas(&r).len() <= max_vmas,
        "{:?}: {:?}",
        r.backend(),
        vmas(&r)
    );
    r.populate(ga(0), size).unwrap();
    for off in [0, 17 * MIB, size - 8] {
        assert_eq!(
            read_u64(&r, off),
            0,
            "{:?}: stale data at {off:#x}",
            r.backend()
        );
    }
}

#[test]
fn anon_thp_populate_discard() {
    populate_discard_cycle(Backend::Anon, RegionOptions::default());
}

#[test]
fn anon_4k_populate_discard() {
    populate_discard_cycle(Backend::Anon, RegionOptions { thp: false });
}

#[test]
fn memfd_populate_discard() {
    populate_discard_cycle(Backend::Memfd, RegionOptions::default());
}

#[test]
fn hugetlb_populate_discard() {
    let _lock = pool_lock();
    let _pool = match huge_pool() {
        Ok(p) => p,
        Err(why) => {
            println!("SKIP: hugetlb: {why}");
            return;
        }
    };
    populate_discard_cycle(Backend::Hugetlb, RegionOptions::default());
    assert!(matches!(
        HotplugRegion::new(&layout(GIB, 4 * KIB), Backend::Hugetlb),
        Err(Error::HugetlbBlockSize { .. })
    ));
}

/// Unmounts and removes the directory on drop.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn mount_tmpfs(size: &str) -> Result<Tmpfs, String> {
    if !is_root() {
        return Err("not root, cannot mount a tmpfs".into());
    }
    let dir = std::env::temp_dir().join(format!("tide-memory-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let guard = Tmpfs(dir.clone());
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(&dir)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir(&dir);
        std::mem::forget(guard);
        return Err(format!(
            "mount -t tmpfs failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(guard)
}

#[test]
fn file_on_full_tmpfs_fails_cleanly() {
    let tmpfs = match mount_tmpfs("64m") {
        Ok(t) => t,
        Err(why) => {
            println!("SKIP: tmpfs limit: {why}");
            return;
        }
    };
    let path = tmpfs.0.join("guest-ram");
    {
        let r = HotplugRegion::new(&layout(GIB, 2 * MIB), Backend::File(path.clone())).unwrap();
        assert_eq!(r.backend(), &Backend::File(path.clone()));
        match r.populate(ga(0), 128 * MIB) {
            Err(Error::Populate { addr, len, source }) => {
                assert_eq!((addr, len), (BASE, 128 * MIB));
                println!("populate beyond tmpfs size: {source}");
            }
            other => panic!("expected Error::Populate, got {other:?}"),
        }
        assert_eq!(r.plugged_bytes(), 0);
        assert!(r.resident_bytes().unwrap() < MIB);
        assert_eq!(r.state(ga(0), GIB).unwrap(), RangeState::Unplugged);
        assert_eq!(vmas(&r).len(), 1);
        // Large enough to be populated by several threads at once: one of them fails, the
        // whole range is rolled back.
        assert!(matches!(
            r.populate(ga(0), 512 * MIB),
            Err(Error::Populate { .. })
        ));
        assert_eq!(r.plugged_bytes(), 0);
        assert!(r.resident_bytes().unwrap() < MIB);
        assert_eq!(vmas(&r).len(), 1);
        r.populate(ga(0), 32 * MIB).unwrap();
        assert_eq!(r.plugged_bytes(), 32 * MIB);
        let res = r.resident_bytes().unwrap();
        assert!((31 * MIB..=34 * MIB).contains(&res), "resident {res}");
        write_pattern(&r, 0, 32 * MIB, 7);
        r.discard(ga(0), 32 * MIB).unwrap();
        assert!(r.resident_bytes().unwrap() < MIB);
        assert!(Path::new(&path).exists());
    }
    assert!(!Path::new(&path).exists(), "backing file left behind");
}

#[test]
fn rejects_bad_ranges() {
    let r = HotplugRegion::new(&layout(64 * MIB, 2 * MIB), Backend::Anon).unwrap();
    let b = 2 * MIB;
    let bad = |res: memory::Result<()>| {
        let e = res.unwrap_err();
        assert!(e.is_invalid_request(), "{e}");
        e
    };
    // Out of range: below, above, straddling the end, overflow.
    assert!(matches!(
        bad(r.populate(GuestAddress(BASE - b), b)),
        Error::OutOfRange { .. }
    ));
    assert!(matches!(
        bad(r.populate(ga(64 * MIB), b)),
        Error::OutOfRange { .. }
    ));
    assert!(matches!(
        bad(r.populate(ga(62 * MIB), 2 * b)),
        Error::OutOfRange { .. }
    ));
    assert!(matches!(
        bad(r.populate(ga(0), u64::MAX)),
        Error::OutOfRange { .. }
    ));
    assert!(matches!(
        bad(r.populate(GuestAddress(u64::MAX - b + 1), b)),
        Error::OutOfRange { .. }
    ));
    assert!(matches!(
        bad(r.discard(GuestAddress(!(b - 1)), u64::MAX)),
        Error::OutOfRange { .. }
    ));
    // Misaligned and empty.
    assert!(matches!(
        bad(r.populate(ga(4096), b)),
        Error::Misaligned { .. }
    ));
    assert!(matches!(
        bad(r.populate(ga(0), b + 4096)),
        Error::Misaligned { .. }
    ));
    assert!(matches!(
        bad(r.populate(ga(0), 0)),
        Error::Misaligned { .. }
    ));
    assert!(matches!(bad(r.discard(ga(0), 0)), Error::Misaligned { .. }));
    assert!(matches!(r.state(ga(0), 0), Err(Error::Misaligned { .. })));
    assert!(matches!(
        r.state(ga(0), 128 * MIB),
        Err(Error::OutOfRange { .. })
    ));
    // Overlaps.
    assert!(matches!(bad(r.discard(ga(0), b)), Error::NotPlugged { .. }));
    r.populate(ga(2 * b), 2 * b).unwrap();
    assert!(matches!(
        bad(r.populate(ga(2 * b), 2 * b)),
        Error::NotUnplugged { .. }
    ));
    assert!(matches!(
        bad(r.populate(ga(b), 2 * b)),
        Error::NotUnplugged { .. }
    ));
    assert!(matches!(
        bad(r.populate(ga(3 * b), 2 * b)),
        Error::NotUnplugged { .. }
    ));
    assert!(matches!(
        bad(r.discard(ga(b), 2 * b)),
        Error::NotPlugged { .. }
    ));
    assert!(matches!(
        bad(r.discard(ga(0), 64 * MIB)),
        Error::NotPlugged { .. }
    ));
    assert_eq!(r.state(ga(b), 2 * b).unwrap(), RangeState::Mixed);
    assert_eq!(r.state(ga(2 * b), 2 * b).unwrap(), RangeState::Plugged);
    assert_eq!(r.state(ga(0), 2 * b).unwrap(), RangeState::Unplugged);
    assert_eq!(r.plugged_bytes(), 2 * b);
    // Error messages name the range.
    let msg = r.populate(ga(b), 2 * b).unwrap_err().to_string();
    assert!(msg.contains(&format!("{:#x}", BASE + b)), "{msg}");
    // A discard of part of a plugged run is fine.
    r.discard(ga(3 * b), b).unwrap();
    assert_eq!(r.plugged_ranges(), vec![(ga(2 * b), b)]);
}

#[test]
fn rejects_bad_region_layouts() {
    let e = |l: HotplugLayout| HotplugRegion::new(&l, Backend::Anon).unwrap_err();
    assert!(matches!(e(layout(0, 2 * MIB)), Error::HotplugSize { .. }));
    assert!(matches!(
        e(layout(3 * MIB, 2 * MIB)),
        Error::HotplugSize { .. }
    ));
    assert!(matches!(e(layout(GIB, 3 * MIB)), Error::BlockSize { .. }));
    assert!(matches!(e(layout(GIB, 512)), Error::BlockSize { .. }));
    let unaligned = HotplugLayout {
        base: GuestAddress(BASE + 4096),
        size: GIB,
        block_size: 2 * MIB,
    };
    assert!(matches!(e(unaligned), Error::BlockSize { .. }));
    let overflow = HotplugLayout {
        base: GuestAddress(u64::MAX - 2 * MIB + 1),
        size: GIB,
        block_size: 2 * MIB,
    };
    assert!(matches!(e(overflow), Error::AddressSpace { .. }));
}

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<(char, u64, u64)>>,
    veto: Option<String>,
}

impl RamDiscardListener for Recorder {
    fn on_populate(&self, addr: GuestAddress, len: u64) -> Result<(), memory::ListenerError> {
        self.events.lock().unwrap().push(('p', addr.0 - BASE, len));
        match &self.veto {
            Some(v) => Err(v.clone().into()),
            None => Ok(()),
        }
    }

    fn on_discard(&self, addr: GuestAddress, len: u64) {
        self.events.lock().unwrap().push(('d', addr.0 - BASE, len));
    }
}

impl Recorder {
    fn take(&self) -> Vec<(char, u64, u64)> {
        std::mem::take(&mut self.events.lock().unwrap())
    }
}

#[test]
fn listeners() {
    let r = HotplugRegion::new(&layout(64 * MIB, 2 * MIB), Backend::Memfd).unwrap();
    let b = 2 * MIB;
    let first = Arc::new(Recorder::default());
    let id1 = r.add_listener(first.clone());
    assert!(first.take().is_empty());
    r.populate(ga(0), 2 * b).unwrap();
    r.populate(ga(2 * b), b).unwrap();
    r.populate(ga(8 * b), b).unwrap();
    r.discard(ga(b), b).unwrap();
    assert_eq!(
        first.take(),
        vec![
            ('p', 0, 2 * b),
            ('p', 2 * b, b),
            ('p', 8 * b, b),
            ('d', b, b)
        ]
    );
    // Replay of coalesced plugged runs.
    let second = Arc::new(Recorder::default());
    let id2 = r.add_listener(second.clone());
    assert_eq!(
        second.take(),
        vec![('p', 0, b), ('p', 2 * b, b), ('p', 8 * b, b)]
    );
    assert_eq!(
        r.plugged_ranges(),
        vec![(ga(0), b), (ga(2 * b), b), (ga(8 * b), b)]
    );

    // A veto rolls back: the earlier listeners see the discard, nothing stays plugged.
    let vetoer = Arc::new(Recorder {
        veto: Some("no slot left".into()),
        ..Default::default()
    });
    let id3 = r.add_listener(vetoer.clone());
    assert_eq!(vetoer.take().len(), 3);
    let err = r.populate(ga(16 * b), 4 * b).unwrap_err();
    match &err {
        Error::ListenerVeto { addr, len, reason } => {
            assert_eq!(
                (*addr, *len, reason.to_string().as_str()),
                (BASE + 16 * b, 4 * b, "no slot left")
            );
        }
        other => panic!("expected ListenerVeto, got {other:?}"),
    }
    assert!(!err.is_invalid_request());
    assert_eq!(
        first.take(),
        vec![('p', 16 * b, 4 * b), ('d', 16 * b, 4 * b)]
    );
    assert_eq!(
        second.take(),
        vec![('p', 16 * b, 4 * b), ('d', 16 * b, 4 * b)]
    );
    assert_eq!(vetoer.take(), vec![('p', 16 * b, 4 * b)]);
    assert_eq!(r.state(ga(16 * b), 4 * b).unwrap(), RangeState::Unplugged);
    assert_eq!(r.plugged_bytes(), 3 * b);
    assert!(r.resident_bytes().unwrap() <= 3 * b + MIB);
    r.remove_listener(id3);

    r.remove_listener(id1);
    r.discard_all().unwrap();
    assert!(first.take().is_empty());
    assert_eq!(
        second.take(),
        vec![('d', 0, b), ('d', 2 * b, b), ('d', 8 * b, b)]
    );
    r.remove_listener(id2);
    r.remove_listener(id2);
    assert_eq!(r.plugged_bytes(), 0);
}

#[test]
fn checkerboard_of_1000_blocks() {
    // 4 KiB blocks keep the memory small (4 MiB plugged).
    let block = 4 * KIB;
    let r = HotplugRegion::with_options(
        &layout(2000 * block, block),
        Backend::Anon,
        RegionOptions { thp: false },
    )
    .unwrap();
    assert!(!r.thp());
    for i in (0..2000).step_by(2) {
        r.populate(ga(i * block), block).unwrap();
    }
    assert_eq!(r.plugged_bytes(), 1000 * block);
    assert_eq!(r.plugged_ranges().len(), 1000);
    let v = vmas(&r);
    assert_eq!(v.len(), 2000);
    assert_eq!(v[0].2, "rw-p");
    assert_eq!(v[1].2, "---p");
    assert_eq!(r.state(ga(0), 2000 * block).unwrap(), RangeState::Mixed);
    // Fill the holes: everything merges into one read-write mapping.
    for i in (1..2000).step_by(2) {
        r.populate(ga(i * block), block).unwrap();
    }
    assert_eq!(r.plugged_ranges(), vec![(ga(0), 2000 * block)]);
    assert_eq!(vmas(&r).len(), 1);
    // Unplug every other block, then everything.
    for i in (0..2000).step_by(2) {
        r.discard(ga(i * block), block).unwrap();
    }
    assert_eq!(vmas(&r).len(), 2000);
    r.discard_all().unwrap();
    assert_eq!(vmas(&r).len(), 1);
    assert_eq!(r.plugged_bytes(), 0);
    assert!(r.resident_bytes().unwrap() < MIB);
}

#[test]
fn too_fragmented_is_refused() {
    let block = 4 * KIB;
    let blocks = 2 * (r_budget() + 8);
    let r = HotplugRegion::with_options(
        &layout(blocks * block, block),
        Backend::Anon,
        RegionOptions { thp: false },
    )
    .unwrap();
    let budget = r.fragmentation_budget();
    let mut refused = None;
    for i in (1..blocks).step_by(2) {
        if let Err(e) = r.populate(ga(i * block), block) {
            refused = Some((i, e));
            break;
        }
    }
    let (i, e) = refused.expect("fragmentation never refused");
    assert!(matches!(e, Error::TooFragmented { .. }), "{e}");
    assert!(!e.is_invalid_request());
    assert!(vmas(&r).len() as u64 <= budget);
    assert!(vmas(&r).len() as u64 >= budget - 2);
    // Populating next to a plugged block adds no run and still works.
    r.populate(ga((i - 1) * block), block).unwrap();
    r.discard_all().unwrap();
    assert_eq!(vmas(&r).len(), 1);
}

fn r_budget() -> u64 {
    let n: u64 = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (n / 2).min(32768)
}

#[test]
fn unplugged_access_readable() {
    let r = HotplugRegion::new(&layout(64 * MIB, 2 * MIB), Backend::Anon).unwrap();
    assert_eq!(r.unplugged_access(), UnpluggedAccess::Inaccessible);
    r.populate(ga(4 * MIB), 2 * MIB).unwrap();
    r.set_unplugged_access(UnpluggedAccess::Readable).unwrap();
    assert_eq!(r.unplugged_access(), UnpluggedAccess::Readable);
    let perms: Vec<String> = vmas(&r).into_iter().map(|v| v.2).collect();
    assert_eq!(perms, vec!["r--p", "rw-p", "r--p"]);
    // Unplugged memory reads as zeros and costs nothing.
    assert_eq!(read_u64(&r, 32 * MIB), 0);
    r.discard(ga(4 * MIB), 2 * MIB).unwrap();
    let perms: Vec<String> = vmas(&r).into_iter().map(|v| v.2).collect();
    assert_eq!(perms, vec!["r--p"]);
    assert!(r.resident_bytes().unwrap() < MIB);
    r.set_unplugged_access(UnpluggedAccess::Inaccessible)
        .unwrap();
    let perms: Vec<String> = vmas(&r).into_iter().map(|v| v.2).collect();
    assert_eq!(perms, vec!["---p"]);
}

#[test]
fn plugged_bytes_while_populating_elsewhere() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<HotplugRegion>();
    let r = HotplugRegion::new(&layout(256 * MIB, 2 * MIB), Backend::Anon).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let r = &r;
            s.spawn(move || {
                for i in 0..16u64 {
                    let off = (t * 16 + i) * 4 * MIB;
                    r.populate(ga(off), 2 * MIB).unwrap();
                    let _ = r.plugged_bytes();
                }
            });
        }
    });
    assert_eq!(r.plugged_bytes(), 128 * MIB);
    assert_eq!(r.plugged_ranges().len(), 64);
}

#[test]
fn guest_region_covers_reservation() {
    let r = HotplugRegion::new(&layout(64 * MIB, 2 * MIB), Backend::Memfd).unwrap();
    // SAFETY: `g` is declared after `r`, so it is dropped first.
    let g = unsafe { r.guest_region() }.unwrap();
    assert_eq!(g.start_addr(), ga(0));
    assert_eq!(g.len(), 64 * MIB);
    r.populate(ga(2 * MIB), 2 * MIB).unwrap();
    g.write_obj(0xabcd_u32, MemoryRegionAddress(2 * MIB + 64))
        .unwrap();
    assert_eq!(read_u64(&r, 2 * MIB + 64), 0xabcd);
}

/// The protection of the host range `[start, end)` from /proc/self/maps: the perms of every
/// entry overlapping it.
fn perms_of(start: u64, end: u64) -> Vec<String> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (s, e) = w.next()?.split_once('-')?;
            let (s, e) = (
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            );
            (s < end && e > start).then(|| w.next().map(str::to_string))?
        })
        .collect()
}

/// Whether every page of the host range `[start, start + len)` is resident (`mincore`).
fn all_resident(start: u64, len: u64) -> bool {
    let mut vec = vec![0u8; (len / 4096) as usize];
    // SAFETY: `vec` has one byte per page of the range; mincore only reads the page tables.
    let r = unsafe { libc::mincore(start as *mut libc::c_void, len as usize, vec.as_mut_ptr()) };
    r == 0 && vec.iter().all(|v| v & 1 == 1)
}

/// Records, at each `on_discard`, whether the discarded range still had all its memory: the
/// listeners must be told before the memory goes.
struct ResidentAtDiscard {
    host: u64,
    base: u64,
    seen: Mutex<Vec<bool>>,
    veto: bool,
}

impl RamDiscardListener for ResidentAtDiscard {
    fn on_populate(&self, _addr: GuestAddress, _len: u64) -> Result<(), memory::ListenerError> {
        if self.veto {
            Err("vetoed".into())
        } else {
            Ok(())
        }
    }
    fn on_discard(&self, addr: GuestAddress, len: u64) {
        let start = self.host + (addr.0 - self.base);
        self.seen.lock().unwrap().push(all_resident(start, len));
    }
}

/// Listeners hear of a discard before the memory goes: on UNPLUG, UNPLUG_ALL and a
/// rolled-back PLUG.
#[test]
fn listeners_are_told_before_the_memory_goes() {
    for backend in [Backend::Anon, Backend::Memfd] {
        let r = HotplugRegion::new(&layout(64 * MIB, 2 * MIB), backend.clone()).unwrap();
        let watch = Arc::new(ResidentAtDiscard {
            host: r.host_addr(),
            base: BASE,
            seen: Mutex::new(Vec::new()),
            veto: false,
        });
        r.add_listener(watch.clone());
        r.populate(ga(0), 8 * MIB).unwrap();
        r.discard(ga(2 * MIB), 2 * MIB).unwrap();
        r.discard_all().unwrap();
        // A populate vetoed by a later listener is rolled back: the first one is told.
        let veto = Arc::new(ResidentAtDiscard {
            host: r.host_addr(),
            base: BASE,
            seen: Mutex::new(Vec::new()),
            veto: true,
        });
        r.add_listener(veto);
        assert!(matches!(
            r.populate(ga(16 * MIB), 4 * MIB),
            Err(Error::ListenerVeto { .. })
        ));
        let seen = watch.seen.lock().unwrap();
        assert_eq!(*seen, [true; 4], "{backend}");
        assert!(r.resident_bytes().unwrap() < MIB);
    }
}

/// An unplugged range ends inaccessible and without host memory even while something keeps
/// writing to it during the unplug (a vCPU of a driver that unplugs memory it still uses):
/// writes the discard raced with are given back after the protection.
#[test]
fn unplug_leaves_nothing_behind_a_writer_racing_with_it() {
    for backend in [Backend::Anon, Backend::Memfd] {
        let r = HotplugRegion::new(&layout(64 * MIB, 2 * MIB), backend.clone()).unwrap();
        let len = 32 * MIB;
        let host = r.host_addr();
        for _ in 0..20 {
            r.populate(ga(0), len).unwrap();
            let stop = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|s| {
                s.spawn(|| {
                    let zero = std::fs::File::open("/dev/zero").unwrap();
                    let mut off = 0;
                    // The kernel writes into the range for us: once it is PROT_NONE the read
                    // fails with EFAULT instead of killing the test with SIGSEGV.
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        // SAFETY: a 4 KiB page inside the region's reservation; the kernel
                        // checks the protection and fails the read if the page is not writable.
                        unsafe {
                            libc::read(
                                std::os::fd::AsRawFd::as_raw_fd(&zero),
                                (host + off) as *mut libc::c_void,
                                4096,
                            )
                        };
                        off = (off + 4096) % len;
                    }
                });
                r.discard(ga(0), len).unwrap();
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            });
            assert!(
                perms_of(host, host + len)
                    .iter()
                    .all(|p| p.starts_with("---")),
                "{backend}: unplugged range accessible"
            );
            assert_eq!(r.resident_bytes().unwrap(), 0, "{backend}");
        }
    }
}

/// Which backends allocate host memory when unplugged memory is read: the device refuses a
/// driver without VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE on those. Measured here: a read of every
/// page of an unplugged, readable block leaves anonymous memory at zero resident and makes a
/// memfd allocate.
#[test]
fn unplugged_reads_allocate_on_shared_backends_only() {
    for backend in [Backend::Anon, Backend::Memfd] {
        let r = HotplugRegion::with_options(
            &layout(64 * MIB, 2 * MIB),
            backend.clone(),
            RegionOptions { thp: false },
        )
        .unwrap();
        r.set_unplugged_access(UnpluggedAccess::Readable).unwrap();
        let mut sum = 0;
        for off in (0..8 * MIB).step_by(4096) {
            sum += read_u64(&r, off);
        }
        assert_eq!(sum, 0);
        let resident = r.resident_bytes().unwrap();
        let allocates = backend != Backend::Anon;
        assert_eq!(r.unplugged_reads_allocate(), allocates, "{backend}");
        if allocates {
            assert!(resident >= 4 * MIB, "{backend}: resident {resident}");
        } else {
            assert!(resident < MIB, "{backend}: resident {resident}");
        }
    }
    let dir = std::env::temp_dir().join(format!("tide-reads-{}", std::process::id()));
    let file = HotplugRegion::new(&layout(4 * MIB, 2 * MIB), Backend::File(dir)).unwrap();
    assert!(file.unplugged_reads_allocate());
}

/// Populate ahead: the next blocks the guest will plug are backed outside its view (they stay
/// unplugged and inaccessible, and not resident in the reservation), a PLUG takes them as they
/// are (zeroed, read-write), and what is left is given back.
fn populate_ahead_cycle(backend: Backend, options: RegionOptions) {
    let r = HotplugRegion::with_options(&layout(GIB, 2 * MIB), backend.clone(), options).unwrap();
    // The guest has the lowest 4 MiB plugged and will plug 256 MiB + 6 MiB more.
    r.populate(ga(0), 4 * MIB).unwrap();
    let want = 262 * MIB;
    let mut got = Vec::new();
    loop {
        let n = r.populate_ahead_next(GIB, want, 128 * MIB).unwrap();
        if n == 0 {
            break;
        }
        got.push(n);
    }
    // Chunks end at 128 MiB-aligned guest addresses: 124 + 128 + 10 MiB.
    assert_eq!(got, vec![124 * MIB, 128 * MIB, 10 * MIB], "{backend:?}");
    assert_eq!(r.ahead_bytes(), want);
    assert_eq!(r.plugged_bytes(), 4 * MIB);
    assert_eq!(r.state(ga(4 * MIB), want).unwrap(), RangeState::Unplugged);
    // Invisible: the reservation keeps the blocks inaccessible and not resident.
    for (s, e, perms) in vmas(&r) {
        if s >= r.host_addr() + 4 * MIB {
            assert!(
                perms.starts_with("---"),
                "{backend:?} {s:#x}-{e:#x} {perms}"
            );
        }
    }
    let resident = r.resident_bytes().unwrap();
    assert!(resident <= 6 * MIB, "{backend:?}: resident {resident}");
    // The PLUG of the first 128 MiB memory block takes its part populated ahead.
    let mut times = memory::OpTimes::default();
    r.populate_timed(ga(4 * MIB), 124 * MIB, &mut times)
        .unwrap();
    assert_eq!(times.ahead_bytes, 124 * MIB);
    assert_eq!(r.ahead_bytes(), want - 124 * MIB);
    for off in [4 * MIB, 64 * MIB, 128 * MIB - 8] {
        assert_eq!(read_u64(&r, off), 0, "{backend:?}: not zero at {off:#x}");
    }
    write_pattern(&r, 4 * MIB, 124 * MIB, 0x1234_5678_9abc_def0);
    assert_eq!(read_u64(&r, 100 * MIB), 0x1234_5678_9abc_def0);
    let resident = r.resident_bytes().unwrap();
    assert!(resident >= 127 * MIB, "{backend:?}: resident {resident}");
    // A PLUG across ahead and fresh blocks.
    r.populate(ga(128 * MIB), 160 * MIB).unwrap();
    assert_eq!(r.ahead_bytes(), 0);
    assert_eq!(read_u64(&r, 280 * MIB), 0);
    // A smaller want gives back what is beyond it, then everything.
    assert_eq!(
        r.populate_ahead_next(GIB, 256 * MIB, 128 * MIB).unwrap(),
        96 * MIB
    );
    assert_eq!(
        r.populate_ahead_next(GIB, 256 * MIB, 128 * MIB).unwrap(),
        128 * MIB
    );
    assert_eq!(r.release_ahead(100 * MIB), 124 * MIB);
    assert_eq!(r.ahead_bytes(), 100 * MIB);
    assert_eq!(r.release_ahead(0), 100 * MIB);
    assert_eq!(r.ahead_bytes(), 0);
    // The usable region bounds it.
    assert_eq!(r.populate_ahead_next(288 * MIB, GIB, 128 * MIB).unwrap(), 0);
    r.discard_all().unwrap();
    let resident = r.resident_bytes().unwrap();
    assert!(
        resident <= MIB,
        "{backend:?}: resident {resident} at the end"
    );
    assert_eq!(r.state(ga(0), GIB).unwrap(), RangeState::Unplugged);
}

#[test]
fn anon_thp_populate_ahead() {
    populate_ahead_cycle(Backend::Anon, RegionOptions::default());
}

#[test]
fn anon_4k_populate_ahead() {
    populate_ahead_cycle(Backend::Anon, RegionOptions { thp: false });
}

#[test]
fn memfd_populate_ahead() {
    populate_ahead_cycle(Backend::Memfd, RegionOptions::default());
}

/// Memory populated ahead for the lowest blocks never makes a valid PLUG elsewhere fail for
/// lack of huge pages: with a pool too small for both, the PLUG gives back what was populated
/// ahead and tries again.
#[test]
fn hugetlb_plug_elsewhere_gets_the_pages_populated_ahead() {
    let _lock = pool_lock();
    let mut _pool = HugePool(None);
    if free_hugepages() == 0 && is_root() {
        if let Ok(old) = std::fs::read_to_string("/proc/sys/vm/nr_hugepages") {
            let want = old.trim().parse::<u64>().unwrap_or(0) + 16;
            _pool = HugePool(Some(old));
            let _ = std::fs::write("/proc/sys/vm/nr_hugepages", want.to_string());
        }
    }
    let free = free_hugepages();
    if !(8..=256).contains(&free) {
        println!("SKIP: needs between 8 and 256 free huge pages (root can make 16), {free} free");
        return;
    }
    let r = HotplugRegion::new(&layout(4 * GIB, 2 * MIB), Backend::Hugetlb).unwrap();
    // All but two pages of the pool populated ahead for the lowest blocks.
    let ahead = (free - 2) * 2 * MIB;
    let mut got = 0;
    while got < ahead {
        let n = r.populate_ahead_next(4 * GIB, ahead, 128 * MIB).unwrap();
        assert!(n > 0, "populated ahead {got} of {ahead}");
        got += n;
    }
    assert_eq!(r.ahead_bytes(), ahead);
    assert_eq!(free_hugepages(), 2);
    // The driver may plug anywhere in the usable region: as much again, high up.
    r.populate(ga(2 * GIB), ahead)
        .expect("a PLUG that fits the pool once the memory populated ahead is given back");
    assert_eq!(r.ahead_bytes(), 0);
    assert_eq!(r.plugged_bytes(), ahead);
    assert_eq!(read_u64(&r, 2 * GIB + ahead - 8), 0);
    // A PLUG the pool cannot back fails; until a PLUG succeeds nothing is populated ahead: the
    // pages left are the guest's when it tries again.
    let left = free_hugepages();
    assert!(r.populate(ga(3 * GIB), (left + 1) * 2 * MIB).is_err());
    assert_eq!(
        r.populate_ahead_next(4 * GIB, 2 * MIB, 128 * MIB).unwrap(),
        0
    );
    assert_eq!(free_hugepages(), left);
    r.populate(ga(3 * GIB), 2 * MIB).unwrap();
    assert_eq!(
        r.populate_ahead_next(4 * GIB, 2 * MIB, 128 * MIB).unwrap(),
        2 * MIB
    );
    assert_eq!(r.release_ahead(0), 2 * MIB);
    r.discard_all().unwrap();
    assert_eq!(free_hugepages(), free);
}

//! Populate ahead, with and without, in one run: Linux's request pattern (the test guest with
//! `tide.chunk=128M`, one 128 MiB request at a time), 1 GiB, per backend, on a quiet host and
//! beside two busy loops at nice 0 (other VMs' vCPUs, say); and Linux's own driver (tier 3),
//! the time from the PATCH to the guest's `MemTotal`.
//!
//! The variants alternate (which one goes first changes every repetition) on two VMs started
//! side by side, so that both see the same host; each keeps its best of `reps`, and the spread
//! (worst / best) is reported with it.

use super::*;

/// Linux's pattern with the test guest: one 128 MiB request at a time.
const LINUX_PATTERN: &str = "console=ttyS0 tide.test=mem-follow tide.verify=0 tide.chunk=128M";

/// Busy loops at nice 0 beside Tide, until dropped.
struct BusyLoops {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BusyLoops {
    fn start(n: usize) -> BusyLoops {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        BusyLoops { stop, threads }
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The samples of one variant: seconds of each repetition, and the device's metrics of the best.
#[derive(Default)]
struct Samples {
    secs: Vec<f64>,
    best_m: Delta,
}

impl Samples {
    fn best(&self) -> f64 {
        self.secs.iter().copied().fold(f64::MAX, f64::min)
    }

    fn worst(&self) -> f64 {
        self.secs.iter().copied().fold(0.0, f64::max)
    }

    fn spread(&self) -> String {
        format!(
            "best {}, worst {} ({:.2}x), all: {}",
            secs_str(self.best()),
            secs_str(self.worst()),
            self.worst() / self.best().max(1e-12),
            self.secs
                .iter()
                .map(|&s| secs_str(s))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// One plug of 1 GiB and back to 0 on `sock`; returns the plug's seconds and its metrics.
fn one_plug(sock: &Path) -> Res<(f64, Delta)> {
    let m0 = metrics(sock)?;
    let t = Instant::now();
    patch(sock, GIB)?;
    settle(sock, GIB)?;
    let secs = t.elapsed().as_secs_f64();
    let d = Delta::of(&m0, &metrics(sock)?, "plug");
    patch(sock, 0)?;
    settle(sock, 0)?;
    Ok((secs, d))
}

/// Which variant goes first in repetition `rep` (true: with populate ahead): they alternate.
fn order(rep: usize) -> [bool; 2] {
    if rep.is_multiple_of(2) {
        [true, false]
    } else {
        [false, true]
    }
}

/// `reps` alternated repetitions on the two VMs: (with populate ahead, without).
fn alternate(with: &Path, without: &Path, reps: usize) -> Res<(Samples, Samples)> {
    let (mut a, mut n) = (Samples::default(), Samples::default());
    for rep in 0..reps {
        for ahead in order(rep) {
            let (s, sock) = if ahead {
                (&mut a, with)
            } else {
                (&mut n, without)
            };
            let (secs, d) = one_plug(sock)?;
            if secs < s.best() {
                s.best_m = d;
            }
            s.secs.push(secs);
        }
    }
    Ok((a, n))
}

/// Best of `reps` raw populates of 1 GiB of `kind` on every CPU's thread, after a warm-up.
fn raw_1g(kind: Kind, reps: usize) -> Res<f64> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let m = RawMap::new(kind, GIB as usize)?;
    m.populate()?;
    m.discard()?;
    let mut best = f64::MAX;
    for _ in 0..reps {
        best = best.min(m.populate_n(n)?);
        m.discard()?;
    }
    Ok(best)
}

/// The section for one backend: quiet and loaded, with and without populate ahead.
fn one_backend(
    tide: &Path,
    kind: Kind,
    reps: usize,
    rows: &mut Vec<Row>,
    goals: &mut Vec<String>,
) -> Res<()> {
    let k = kind.name();
    let raw = raw_1g(kind, reps)?;
    let dir = temp_dir("bench-ahead");
    let (s_with, s_without) = (
        dir.as_path().join("with.sock"),
        dir.as_path().join("without.sock"),
    );
    let with = Vmm::start_follow_with(tide, &s_with, kind, "8G", LINUX_PATTERN, &[])?;
    let without = Vmm::start_follow_with(
        tide,
        &s_without,
        kind,
        "8G",
        LINUX_PATTERN,
        &["--no-populate-ahead"],
    )?;
    let quiet = alternate(&s_with, &s_without, reps)?;
    let loaded = {
        let _busy = BusyLoops::start(2);
        alternate(&s_with, &s_without, reps)?
    };
    with.stop();
    without.stop();
    for (host, (a, n)) in [("quiet", &quiet), ("loaded", &loaded)] {
        for (variant, s) in [("ahead", a), ("no_ahead", n)] {
            let mut r = Row::new(
                &format!("ahead_{host}_linux_plug_{variant}"),
                k,
                GIB,
                Some(s.best()),
                true,
            );
            r.raw_gib_per_s = Some(1.0 / raw);
            r.extra = vec![
                ("samples_s", json!(s.secs)),
                ("worst_s", json!(s.worst())),
                ("ahead_wait_s", json!(s.best_m.ahead_wait)),
                ("ahead_bytes", json!(s.best_m.ahead)),
                ("service_total_s", json!(s.best_m.total)),
            ];
            r.note = format!(
                "{host} host{}, Linux's pattern, PATCH to settled; {}; device: {} taken \
                 populated ahead, {} waiting for it, service {}",
                if host == "loaded" {
                    " (two busy loops at nice 0)"
                } else {
                    ""
                },
                s.spread(),
                mib(s.best_m.ahead),
                secs_str(s.best_m.ahead_wait),
                secs_str(s.best_m.total),
            );
            println!("  {} {k}: {}", r.name, r.note);
            rows.push(r);
        }
        let ratio = a.best() / n.best();
        let met = if ratio <= 1.0 { "met" } else { "NOT met" };
        goals.push(format!(
            "{k}, {host} host: Linux's pattern, 1 GiB, with populate ahead {} against {} \
             without = {ratio:.2}x{} (spread with: {:.2}x, without: {:.2}x)",
            secs_str(a.best()),
            secs_str(n.best()),
            if host == "loaded" && kind == Kind::Anon4k {
                format!(" (goal <= 1.0: {met})")
            } else {
                String::new()
            },
            a.worst() / a.best().max(1e-12),
            n.worst() / n.best().max(1e-12),
        ));
    }
    let g = quiet.0.best() / raw;
    goals.push(format!(
        "{k}, quiet host: with populate ahead {} = {g:.2}x the raw all-threads populate of 1 GiB {}{}",
        secs_str(quiet.0.best()),
        secs_str(raw),
        if kind == Kind::Anon4k {
            format!(" (goal <= 1.3: {})", if g <= 1.3 { "met" } else { "NOT met" })
        } else {
            String::new()
        },
    ));
    Ok(())
}

/// The test-guest part of the section, every backend (hugetlb when its pool can be raised).
pub(super) fn populate_ahead_section(
    tide: &Path,
    reps: usize,
    rows: &mut Vec<Row>,
    goals: &mut Vec<String>,
    skipped: &mut Vec<String>,
) {
    println!(
        "7. Populate ahead, with and without, Linux's pattern (test guest, 128 MiB requests), \
         1 GiB, quiet and beside two busy loops at nice 0, alternated, best of {reps}"
    );
    let mut kinds = vec![Kind::Anon4k, Kind::AnonThp, Kind::Memfd];
    // Two VMs side by side, each warmed up to 2 GiB: 2 x 1100 pages.
    let restore = match raise_hugetlb_pool(2200) {
        Ok(old) => {
            kinds.push(Kind::Hugetlb);
            old
        }
        Err(e) => {
            let s = format!("populate ahead, hugetlb: {e}");
            println!("  SKIP {s}");
            skipped.push(s);
            None
        }
    };
    for kind in kinds {
        if let Err(e) = one_backend(tide, kind, reps, rows, goals) {
            let s = format!("populate ahead, {}: {e}", kind.name());
            println!("  SKIP {s}");
            skipped.push(s);
        }
    }
    if let Some(old) = restore {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", old);
    }
}

/// Tier 3: Linux's own driver, 0 -> 1 GiB, PATCH to the guest's `MemTotal`, with and without
/// populate ahead (one boot each, alternated `reps` times on the two guests side by side).
pub(super) fn linux_driver_ahead(
    reps: usize,
    rows: &mut Vec<Row>,
    goals: &mut Vec<String>,
) -> Res<()> {
    use tests::linux::{guest_dir, LinuxGuest};
    let dir = guest_dir()?;
    let args = ["--hotplug-size", "2G", "--block-size", "2M"];
    let mut with = LinuxGuest::boot(&dir, "bench-linux-ahead", &args);
    let mut no_args = args.to_vec();
    no_args.push("--no-populate-ahead");
    let mut without = LinuxGuest::boot(&dir, "bench-linux-no-ahead", &no_args);
    let (mut a, mut n) = (Samples::default(), Samples::default());
    for rep in 0..reps {
        for ahead in order(rep) {
            let (g, s) = if ahead {
                (&mut with, &mut a)
            } else {
                (&mut without, &mut n)
            };
            let m0 = metrics(&g.sock)?;
            let t = Instant::now();
            patch(&g.sock, GIB)?;
            settle_within(&g.sock, GIB, Duration::from_secs(600))?;
            g.wait_mem_total(g.boot_mem_total_kib + GIB / 1024);
            let secs = t.elapsed().as_secs_f64();
            let d = Delta::of(&m0, &metrics(&g.sock)?, "plug");
            println!(
                "  Linux driver, {} populate ahead: PATCH to MemTotal +1 GiB {} ({})",
                if ahead { "with" } else { "without" },
                secs_str(secs),
                d.note()
            );
            if secs < s.best() {
                s.best_m = d;
            }
            s.secs.push(secs);
            patch(&g.sock, 0)?;
            settle_within(&g.sock, 0, Duration::from_secs(600))?;
            g.wait_mem_total(g.boot_mem_total_kib);
        }
    }
    for (variant, s) in [("ahead", &a), ("no_ahead", &n)] {
        let mut r = Row::new(
            &format!("linux_driver_memtotal_{variant}"),
            "anon_thp",
            GIB,
            Some(s.best()),
            true,
        );
        r.extra = vec![
            ("samples_s", json!(s.secs)),
            ("ahead_bytes", json!(s.best_m.ahead)),
        ];
        r.note = format!(
            "Linux's virtio-mem driver (tier 3), PATCH to MemTotal; {}; {} taken populated ahead",
            s.spread(),
            mib(s.best_m.ahead)
        );
        rows.push(r);
    }
    goals.push(format!(
        "Linux's own driver (tier 3), 1 GiB, PATCH to MemTotal: with populate ahead {} against {} \
         without = {:.2}x (goal: not slower; spread with {:.2}x, without {:.2}x; two guests side \
         by side on an emulating KVM)",
        secs_str(a.best()),
        secs_str(n.best()),
        a.best() / n.best(),
        a.worst() / a.best().max(1e-12),
        n.worst() / n.best().max(1e-12),
    ));
    let (s1, s2) = (with.power_off(), without.power_off());
    if !s1.success() || !s2.success() {
        return Err(format!("a Linux guest's tide exited with {s1:?} / {s2:?}"));
    }
    Ok(())
}

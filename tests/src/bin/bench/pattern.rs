//! Section 2b: Linux's request pattern, Tide's own service time (`GET /metrics`), warm and cold raw limits.

use super::*;

/// Best discard of `m` over `reps` cycles while a KVM VM (no vCPU) maps it as a memory slot:
/// what a VMM's discard costs at least, since KVM's MMU notifier drops the guest's view of the
/// range too. `None` without a usable `/dev/kvm`.
pub(crate) fn discard_under_kvm_slot(m: &RawMap, threads: usize, reps: usize) -> Option<f64> {
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
pub(crate) struct RawSet {
    pub(crate) threads: usize,
    pub(crate) p128_1: f64,
    pub(crate) p128_n: f64,
    pub(crate) d128: f64,
    /// The same discard while KVM maps the range as a memory slot (`None`: no KVM).
    pub(crate) d128_kvm: Option<f64>,
    pub(crate) p1g_1: f64,
    pub(crate) p1g_n: f64,
    pub(crate) cold_1g_n: f64,
}

pub(crate) fn raw_set(kind: Kind, reps: usize, rows: &mut Vec<Row>) -> Res<RawSet> {
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
pub(crate) fn metrics(sock: &Path) -> Res<Value> {
    let (code, body) = api(sock, "GET", "/metrics", None)?;
    if code != 200 {
        return Err(format!("GET /metrics: {code} {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET /metrics: {e}: {body}"))
}

/// `after - before` of one request type's sums.
#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct Delta {
    pub(crate) count: u64,
    pub(crate) total: f64,
    pub(crate) validate: f64,
    pub(crate) protect: f64,
    pub(crate) syscall: f64,
    pub(crate) ahead_wait: f64,
    pub(crate) bookkeeping: f64,
    pub(crate) notify: f64,
    pub(crate) ahead: u64,
}

impl Delta {
    pub(crate) fn of(before: &Value, after: &Value, kind: &str) -> Delta {
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
    pub(crate) fn avg(&self) -> f64 {
        self.total / self.count.max(1) as f64
    }

    /// Average fixed cost per request: service time less the system calls and the wait for
    /// populate ahead (s).
    pub(crate) fn fixed(&self) -> f64 {
        (self.validate + self.bookkeeping) / self.count.max(1) as f64
    }

    pub(crate) fn note(&self) -> String {
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
pub(crate) fn linux_driver(rows: &mut Vec<Row>) -> Res<Vec<String>> {
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
pub(crate) struct Pattern {
    pub(crate) plug: f64,
    pub(crate) unplug: f64,
    pub(crate) plug_m: Delta,
    pub(crate) unplug_m: Delta,
}

/// Tide end to end, 0 -> 1 GiB -> 0, best of `reps`, with the guest command line `cmdline` and
/// `more` tide arguments.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tide_pattern(
    tide: &Path,
    kind: Kind,
    name: &str,
    cmdline: &str,
    more: &[&str],
    reps: usize,
    raw: &RawSet,
    rows: &mut Vec<Row>,
) -> Res<Pattern> {
    let dir = temp_dir("bench-pattern");
    let sock = dir.as_path().join("api.sock");
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
pub(crate) fn linux_pattern(
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
pub(crate) fn raise_hugetlb_pool(pages: u64) -> Res<Option<String>> {
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

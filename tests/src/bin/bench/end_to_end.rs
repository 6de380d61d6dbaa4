//! Section 2: Tide end to end; 3b: the VMM's own resident memory.

use super::*;

pub(crate) struct Raw {
    pub(crate) kind: Kind,
    pub(crate) bytes: u64,
    pub(crate) populate: f64,
    pub(crate) discard: f64,
}

pub(crate) fn raw_rate(raws: &[Raw], kind: Kind, bytes: u64, populate: bool) -> Option<f64> {
    let r = raws.iter().find(|r| r.kind == kind && r.bytes == bytes)?;
    let s = if populate { r.populate } else { r.discard };
    Some(bytes as f64 / GIB as f64 / s)
}

pub(crate) fn tide_e2e(
    tide: &Path,
    kind: Kind,
    sizes: &[u64],
    reps: usize,
    raws: &[Raw],
    rows: &mut Vec<Row>,
) -> Res<()> {
    let dir = temp_dir("bench");
    let sock = dir.as_path().join("api.sock");
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

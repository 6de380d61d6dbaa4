//! Section 4: the cost of the KVM memory slot.

use super::*;

/// Starts a halting guest with `hotplug` (or none), returns (slot ms, MemAvailable drop).
pub(crate) fn slot_run(tide: &Path, hotplug: Option<&str>) -> Res<(Option<f64>, u64)> {
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

pub(crate) fn slot_cost(tide: &Path, sizes: &[u64], rows: &mut Vec<Row>) -> Res<()> {
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

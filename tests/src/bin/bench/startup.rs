//! Section 3a: start to the first serial byte.

use super::*;

pub(crate) fn startup(tide: &Path, runs: usize, rows: &mut Vec<Row>) -> Res<()> {
    let mut times = Vec::new();
    for _ in 0..runs {
        let mut v = Vmm::start(tide, "console=ttyS0", &["--memory", "512M"], None)?;
        v.wait_until("the first console byte", LONG, |t| {
            t.first_output().is_some()
        })?;
        if let (started, Some(first)) = v.first_output() {
            times.push((first - started).as_secs_f64());
        }
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

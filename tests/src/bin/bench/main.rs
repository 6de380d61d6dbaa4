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
//! 5. the resize trace; 6. Linux's own driver (tier 3, `--linux-only` alone);
//! 7. populate ahead with and without, Linux's pattern, quiet and beside two busy loops at
//!    nice 0, per backend, alternated (`--ahead-only` alone);
//! 8. with `--linux-ahead` (alone, or with `--ahead-only`): Linux's own driver with and without
//!    populate ahead, PATCH to the guest's `MemTotal`;
//!
//! and writes `DIR/results.json`, `DIR/results.md`, `DIR/resize.png` (plugged size and host
//! resident memory over time) and `DIR/resize.csv` (its samples). `--quick` does 1 GiB and one
//! repetition only (a smoke test). Each measurement keeps the best of its repetitions: the host
//! is shared and noisy.

use memory::{GIB, MIB};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tests::{proc_status_kib, temp_dir, test_guest, try_http, Tide};

mod ahead;
mod backends;
mod end_to_end;
mod pattern;
mod plot;
mod raw;
mod results;
mod slot;
mod startup;
mod vmm;

use backends::*;
use end_to_end::*;
use pattern::*;
use plot::*;
use raw::*;
use results::*;
use slot::*;
use startup::*;
use vmm::*;

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
                println!("  --ahead-only   section 7 only: populate ahead with and without, quiet and beside two busy loops");
                println!("  --linux-ahead  section 8 only: Linux's own driver with and without populate ahead (two guests, needs TIDE_GUEST_DIR);");
                println!("                 with --ahead-only, sections 7 and 8");
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
    // --ahead-only and --linux-ahead pick their sections alone.
    let picked = ahead_only || linux_ahead;
    if !linux_only && !picked {
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

    let linux_lines = if picked && !linux_only {
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
    if ahead_only || !(linux_only || linux_ahead) {
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
    md.push_str("\nGoals, from this run:\n\n");
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

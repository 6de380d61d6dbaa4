//! `cargo run --release -p tests --bin bench_snapshot -- --out DIR [--repeat N]` measures
//! snapshot and restore of the test guest with 0, 512 MiB and 2 GiB plugged in a 64 GiB region
//! (128 MiB boot RAM), against a raw sequential write and read of the same number of bytes in
//! the same directory, in the same run: time, bytes written, the memory file's allocated size.
//! Writes `DIR/snapshot.md` and `DIR/snapshot.json`; snapshot files go to `DIR/work` (removed).
//!
//! Snapshot time is the API's own `elapsed_ms` (the memory copy with its CRC-32, the state
//! file); restore time is what `tide restore --log-level info` logs from reading the state
//! file to the vCPUs set (the region's plugs, the copy and its CRC-32 check included). The raw
//! read follows the raw write, as the restore follows the snapshot: both read from the page
//! cache when it holds the file.

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tests::{field, http, test_guest, wait_for_path, wait_settled, Tide};

const MIB: u64 = 1 << 20;
const BOOT: u64 = 128 * MIB;
const T: Duration = Duration::from_secs(600);

struct Row {
    plugged: u64,
    snapshot_ms: f64,
    restore_ms: f64,
    written: u64,
    allocated: u64,
    raw_write_ms: f64,
    raw_read_ms: f64,
}

fn raw_write_read(dir: &Path, bytes: u64) -> (f64, f64) {
    let p = dir.join("raw.bin");
    let buf = vec![0x5au8; MIB as usize];
    let t = Instant::now();
    {
        let mut f = std::fs::File::create(&p).expect("create the raw file");
        for _ in 0..bytes / MIB {
            f.write_all(&buf).expect("raw write");
        }
    }
    let w = t.elapsed().as_secs_f64() * 1e3;
    let mut rbuf = vec![0u8; MIB as usize];
    let t = Instant::now();
    {
        let mut f = std::fs::File::open(&p).expect("open the raw file");
        for _ in 0..bytes / MIB {
            f.read_exact(&mut rbuf).expect("raw read");
        }
    }
    let r = t.elapsed().as_secs_f64() * 1e3;
    let _ = std::fs::remove_file(&p);
    (w, r)
}

fn one(dir: &Path, plugged: u64) -> Row {
    let sock = dir.join("run.sock");
    let requested = format!("{}M", plugged / MIB);
    let mut tide = Tide::spawn([
        "run",
        "--kernel",
        test_guest().to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 tide.test=mem-follow tide.verify=0",
        "--memory",
        "128M",
        "--hotplug-size",
        "64G",
        "--requested",
        &requested,
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    wait_for_path(&sock, T);
    let s = wait_settled(&sock, T);
    assert_eq!(field(&s, "plugged_size"), plugged, "{s}");
    let (code, body) = http(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(code, 204, "{body}");
    let snap = dir.join("vm.snap");
    let mem = dir.join("vm.mem");
    let req = serde_json::json!({ "snapshot_path": snap, "mem_file_path": mem }).to_string();
    let (code, body) = http(&sock, "PUT", "/snapshot/create", Some(&req));
    assert_eq!(code, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    let snapshot_ms = info["elapsed_ms"].as_f64().unwrap();
    let written = field(&info, "memory_bytes_written");
    let allocated = std::fs::metadata(&mem).unwrap().blocks() * 512;
    let (code, body) = http(&sock, "PUT", "/vm/shutdown", None);
    assert_eq!(code, 204, "{body}");
    assert!(tide.wait_exit(T).success());

    let rsock = dir.join("restore.sock");
    let mut restored = Tide::spawn([
        "restore",
        "--snapshot",
        snap.to_str().unwrap(),
        "--mem-file",
        mem.to_str().unwrap(),
        "--api-socket",
        rsock.to_str().unwrap(),
        "--paused",
        "--log-level",
        "info",
    ]);
    wait_for_path(&rsock, T);
    // The line is logged before the socket is bound; its pipe may lag a little.
    let end = Instant::now() + T;
    let err = loop {
        let e = restored.stderr();
        if e.contains("tide: info: restored") || Instant::now() > end {
            break e;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let restore_ms = err
        .lines()
        .find(|l| l.contains("tide: info: restored"))
        .and_then(|l| l.split(" in ").nth(1))
        .and_then(|r| r.split(" ms").next())
        .and_then(|v| v.parse().ok())
        .expect("restore time in the log");
    let (code, body) = http(&rsock, "PUT", "/vm/shutdown", None);
    assert_eq!(code, 204, "{body}");
    assert!(restored.wait_exit(T).success());
    let _ = std::fs::remove_file(&snap);
    let _ = std::fs::remove_file(&mem);
    let (raw_write_ms, raw_read_ms) = raw_write_read(dir, written);
    Row {
        plugged,
        snapshot_ms,
        restore_ms,
        written,
        allocated,
        raw_write_ms,
        raw_read_ms,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut out: Option<PathBuf> = None;
    let mut repeat = 3;
    let mut i = 1;
    while i < args.len() {
        match (args[i].as_str(), args.get(i + 1)) {
            ("--out", Some(v)) => out = Some(PathBuf::from(v)),
            ("--repeat", Some(v)) => repeat = v.parse().expect("--repeat N"),
            _ => {
                eprintln!("usage: bench_snapshot --out DIR [--repeat N]");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    let Some(out) = out else {
        eprintln!("usage: bench_snapshot --out DIR [--repeat N]");
        std::process::exit(2);
    };
    let work = out.join("work");
    std::fs::create_dir_all(&work).expect("create the work directory");
    let mut rows = Vec::new();
    // Alternating sizes within each round, best of the rounds per size.
    for round in 0..repeat {
        for plugged in [0, 512 * MIB, 2048 * MIB] {
            let r = one(&work, plugged);
            println!(
                "round {round}: {} MiB plugged: snapshot {:.0} ms, restore {:.0} ms, raw write {:.0} ms, raw read {:.0} ms, written {} MiB, allocated {} MiB",
                plugged / MIB,
                r.snapshot_ms,
                r.restore_ms,
                r.raw_write_ms,
                r.raw_read_ms,
                r.written / MIB,
                r.allocated / MIB
            );
            rows.push(r);
        }
    }
    let _ = std::fs::remove_dir(&work);
    let mut md = String::from(
        "| plugged | bytes written | file allocated | snapshot | raw write | snapshot / raw | restore | raw read | restore / raw |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut json = Vec::new();
    for plugged in [0, 512 * MIB, 2048 * MIB] {
        let of: Vec<&Row> = rows.iter().filter(|r| r.plugged == plugged).collect();
        let best = |f: &dyn Fn(&Row) -> f64| of.iter().map(|r| f(r)).fold(f64::INFINITY, f64::min);
        let (s, w) = (best(&|r| r.snapshot_ms), best(&|r| r.raw_write_ms));
        let (rs, rr) = (best(&|r| r.restore_ms), best(&|r| r.raw_read_ms));
        let r = of[0];
        md.push_str(&format!(
            "| {} MiB | {} MiB | {} MiB | {s:.0} ms | {w:.0} ms | {:.2} | {rs:.0} ms | {rr:.0} ms | {:.2} |\n",
            plugged / MIB,
            r.written / MIB,
            r.allocated / MIB,
            s / w,
            rs / rr
        ));
        json.push(serde_json::json!({
            "plugged_bytes": plugged, "written_bytes": r.written, "allocated_bytes": r.allocated,
            "boot_bytes": BOOT, "snapshot_ms": s, "raw_write_ms": w, "restore_ms": rs, "raw_read_ms": rr,
        }));
    }
    println!("{md}");
    std::fs::write(out.join("snapshot.md"), &md).expect("write snapshot.md");
    std::fs::write(
        out.join("snapshot.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .expect("write snapshot.json");
}

//! Builds Tide's freestanding test guest (tests/guest) with gcc into
//! `$OUT_DIR/tide-test-guest.elf` and exports its path as `TIDE_TEST_GUEST`
//! (use it as `env!("TIDE_TEST_GUEST")`).
//!
//! The guest is a static ELF64 linked at physical 0x100000 (tests/guest/guest.ld), loaded by the VMM
//! with linux-loader's Elf loader and entered in 64-bit long mode. The compiler is `gcc` unless
//! `TIDE_GUEST_CC` names another gcc-compatible x86_64 compiler.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: &[&str] = &["guest/start.S", "guest/guest.c"];
const LINKER_SCRIPT: &str = "guest/guest.ld";

/// The flags of shared/probes/run.sh plus what a linked-at-1-MiB, no-libc, no-SSE guest needs.
const CFLAGS: &[&str] = &[
    "-O2",
    "-m64",
    "-march=x86-64",
    "-ffreestanding",
    "-fno-pic",
    "-no-pie",
    "-mgeneral-regs-only",
    "-mno-red-zone",
    "-mcmodel=small",
    "-nostdlib",
    "-static",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fcf-protection=none",
    "-fno-builtin",
    "-Wall",
    "-Wextra",
    "-Wno-unused-function",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
    "-Wl,-z,max-page-size=4096",
];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let out = out_dir.join("tide-test-guest.elf");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=guest");
    for f in SOURCES.iter().chain(std::iter::once(&LINKER_SCRIPT)) {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=TIDE_GUEST_CC");

    let target_arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if target_arch != "x86_64" {
        // Tide is x86_64 only; keep the crate compiling elsewhere, the tests that use it skip.
        println!("cargo:warning=test guest not built: target arch is {target_arch}, not x86_64");
        println!("cargo:rustc-env=TIDE_TEST_GUEST=");
        return;
    }

    let cc = env::var("TIDE_GUEST_CC").unwrap_or_else(|_| "gcc".to_string());
    match Command::new(&cc).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "tests/build.rs: `{cc} --version` failed ({}); the freestanding test guest in tests/guest \
             needs gcc for x86_64 (apt-get install gcc, or set TIDE_GUEST_CC)",
            o.status
        ),
        Err(e) => panic!(
            "tests/build.rs: cannot run `{cc}` ({e}). The freestanding test guest in tests/guest is built \
             with gcc: install it (apt-get install gcc) or set TIDE_GUEST_CC to a gcc-compatible x86_64 \
             compiler"
        ),
    }

    let mut cmd = Command::new(&cc);
    cmd.args(CFLAGS)
        .arg("-T")
        .arg(manifest_dir.join(LINKER_SCRIPT))
        .arg("-o")
        .arg(&out);
    for s in SOURCES {
        cmd.arg(manifest_dir.join(s));
    }
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("tests/build.rs: cannot run {cc}: {e}"));
    if !output.status.success() {
        panic!(
            "tests/build.rs: building the test guest failed ({}):\n{:?}\n{}{}",
            output.status,
            cmd,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let warnings = String::from_utf8_lossy(&output.stderr);
    for l in warnings.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=test guest: {l}");
    }

    check_elf(&out);
    println!("cargo:rustc-env=TIDE_TEST_GUEST={}", out.display());
}

/// A quick sanity check of what linux-loader will see: ELF64, little endian, x86-64, ET_EXEC,
/// entry and every PT_LOAD at or above 1 MiB, at least one PT_LOAD with file contents.
fn check_elf(path: &Path) {
    let b = std::fs::read(path)
        .unwrap_or_else(|e| panic!("tests/build.rs: read {}: {e}", path.display()));
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    assert!(
        b.len() >= 64 && &b[..4] == b"\x7fELF",
        "test guest: not an ELF file"
    );
    assert_eq!(b[4], 2, "test guest: not ELF64");
    assert_eq!(b[5], 1, "test guest: not little endian");
    assert_eq!(u16_at(16), 2, "test guest: not ET_EXEC");
    assert_eq!(u16_at(18), 62, "test guest: not x86-64");
    let entry = u64_at(24);
    assert!(
        entry >= 0x100000,
        "test guest: entry {entry:#x} below 1 MiB"
    );
    let (phoff, phentsize, phnum) = (
        u64_at(32) as usize,
        u16_at(54) as usize,
        u16_at(56) as usize,
    );
    let mut loads_with_data = 0;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph) != 1 {
            continue;
        }
        let (paddr, filesz) = (u64_at(ph + 24), u64_at(ph + 32));
        assert!(
            paddr >= 0x100000,
            "test guest: PT_LOAD at {paddr:#x} below 1 MiB"
        );
        if filesz != 0 {
            loads_with_data += 1;
        }
    }
    assert!(
        loads_with_data >= 1,
        "test guest: no PT_LOAD segment with contents"
    );
}

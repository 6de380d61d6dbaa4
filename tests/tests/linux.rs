//! Tier 3: the real Linux guest (built by resources/build-guest.sh) with a virtio-mem device.
//! On a hardware-assisted KVM it boots to user space, grows and shrinks over the API socket and
//! checks the guest's own /proc/meminfo. On an emulating KVM (this project's build machines) it
//! checks the early boot lines and then skips the rest with one loud line saying why.

use std::path::PathBuf;
use std::time::Duration;

use tests::{http, kvm_is_emulating, require_kvm, wait_for_path, TempDir, Tide};

fn guest_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("TIDE_GUEST_DIR")?);
    (dir.join("bzImage").exists() && dir.join("initramfs.cpio.gz").exists()).then_some(dir)
}

fn mem_total_kib(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.split("MemTotal:").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn linux_guest_boots_and_follows_virtio_mem_resizes() {
    if !require_kvm("linux_guest_boots_and_follows_virtio_mem_resizes") {
        return;
    }
    let Some(dir) = guest_dir() else {
        println!("SKIP linux_guest_boots_and_follows_virtio_mem_resizes: no Linux guest: set TIDE_GUEST_DIR to the output of resources/build-guest.sh (resources/test.sh does)");
        return;
    };
    let tmp = TempDir::new("linux");
    let sock = tmp.0.join("api.sock");
    let cmdline = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 pci=off noxsave memhp_default_state=online_movable tide.marker=tier3 tide.cmd=\"while true; do grep MemTotal /proc/meminfo; sleep 1; done\"";
    let mut tide = Tide::spawn([
        "run",
        "--kernel",
        dir.join("bzImage").to_str().unwrap(),
        "--initrd",
        dir.join("initramfs.cpio.gz").to_str().unwrap(),
        "--memory",
        "512M",
        "--cpus",
        "2",
        "--hotplug-size",
        "4G",
        "--block-size",
        "2M",
        "--api-socket",
        sock.to_str().unwrap(),
        "--cmdline",
        cmdline,
    ]);
    // Early boot: works on any KVM, emulating or not.
    tide.wait_for("Linux version", Duration::from_secs(120));
    // The console arrives byte by byte: wait for the end of each line we check.
    let out = tide.wait_for(
        "virtio_mmio.device=4K@0xd0000000:5",
        Duration::from_secs(120),
    );
    let line = out
        .lines()
        .find(|l| l.contains("Command line:"))
        .unwrap_or("");
    assert!(
        line.contains("tide.marker=tier3") && line.contains("virtio_mmio.device=4K@0xd0000000:5"),
        "{out}"
    );
    // e820: base memory and RAM from 1 MiB to the end of the 512 MiB of boot RAM; the hotplug
    // region is not in it.
    let out = tide.wait_for(
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
        Duration::from_secs(120),
    );
    assert!(
        out.contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"),
        "{out}"
    );
    assert!(
        !out.contains("BIOS-e820: [mem 0x0000000100000000"),
        "the hotplug region must not be in e820: {out}"
    );
    if let Some(why) = kvm_is_emulating() {
        println!("SKIP linux_guest_boots_and_follows_virtio_mem_resizes (after checking early boot: Linux version, command line, e820 map): {why}");
        return;
    }
    let out = tide.wait_for("TIDE-INIT-READY", Duration::from_secs(120));
    let before = *mem_total_kib(&out).last().unwrap_or(&0);
    wait_for_path(&sock, Duration::from_secs(5));
    let (code, body) = http(
        &sock,
        "PATCH",
        "/hotplug/memory",
        Some(r#"{"requested_size": 1073741824}"#),
    );
    assert_eq!(code, 204, "{body}");
    let grown = wait_mem_total(&mut tide, |kib| kib >= before + 1_000_000);
    let (_, status) = http(&sock, "GET", "/hotplug/memory", None);
    assert!(status.contains("\"plugged_size\":1073741824"), "{status}");
    let (code, _) = http(
        &sock,
        "PATCH",
        "/hotplug/memory",
        Some(r#"{"requested_size": 0}"#),
    );
    assert_eq!(code, 204);
    wait_mem_total(&mut tide, |kib| kib + 1_000_000 <= grown);
    let (code, _) = http(&sock, "PUT", "/vm/shutdown", None);
    assert_eq!(code, 204);
    assert!(tide.wait_exit(Duration::from_secs(30)).success());
}

fn wait_mem_total(tide: &mut Tide, ok: impl Fn(u64) -> bool) -> u64 {
    let end = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(&kib) = mem_total_kib(&tide.stdout()).last() {
            if ok(kib) {
                return kib;
            }
        }
        assert!(
            std::time::Instant::now() < end,
            "MemTotal never changed as expected:\n{}",
            tide.stdout()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

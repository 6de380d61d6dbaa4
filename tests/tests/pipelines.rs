//! Tier 3: shell pipelines in the real Linux guest. A CI user's test script runs several processes
//! at the same time (`dmesg | grep x | tail -5`); on this project's emulating KVM such pipelines of
//! busybox processes crashed often in 2026-11 (docs/testing.md). Booted under the conditions that
//! crashed then: 128 MiB of boot RAM, a hotplug region, two vCPUs. Any crash fails the test.

use tests::linux::LinuxGuest;

/// Pipelines run, ten to a command line (each line is bounded by the session's command timeout).
const PIPELINES: u32 = 100;
const PER_LINE: u32 = 10;

/// 100 pipelines of three busybox processes, none may fail; the kernel log must show no trap or
/// segfault. resources/probes/pipeline-probe.sh is the same check with more knobs.
#[test]
fn linux_pipelines_of_three_busybox_processes_do_not_crash() {
    let test = "linux_pipelines_of_three_busybox_processes_do_not_crash";
    let Some(dir) = tests::linux::guest_or_skip(test) else {
        return;
    };
    let mut g = LinuxGuest::boot(
        &dir,
        "linux-pipelines",
        &["--cpus", "2", "--hotplug-size", "1G"],
    );
    // pipefail: a pipeline fails when any of its three processes does (a crash is status 128+N);
    // `grep -i linux` always finds the kernel's banner in its log.
    g.sh("set -o pipefail; FAILED=0");
    let mut done = 0;
    while done < PIPELINES {
        let n = PER_LINE.min(PIPELINES - done);
        let out = g.sh(&format!(
            "i=0; while [ $i -lt {n} ]; do dmesg | grep -i linux | tail -1 >/dev/null || FAILED=$((FAILED+1)); i=$((i+1)); done; echo $FAILED"
        ));
        done += n;
        println!("linux: {done} pipelines, {} failed", out.trim());
    }
    let failed = g.sh("echo $FAILED");
    let traps = g.kernel_log_grep("traps:|segfault");
    assert_eq!(
        failed.trim(),
        "0",
        "pipelines failed of {PIPELINES}; kernel log:\n{traps}"
    );
    assert!(traps.trim().is_empty(), "processes crashed:\n{traps}");
    let st = g.power_off();
    assert!(st.success(), "tide exited with {st:?}");
}

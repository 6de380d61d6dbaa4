#!/usr/bin/env bash
# Probe for busybox processes that crash when they run at the same time in the Linux guest on an
# emulating KVM (docs/testing.md). Boots the project's guest (resources/build-guest.sh) with the
# probe programs added to its initramfs, runs fs-base-probe and then NPIPES pipelines of three
# busybox processes, counts the pipelines that failed (pipefail) and prints the kernel's trap
# lines, and powers off. The console goes to stdout.
#
#   resources/probes/pipeline-probe.sh [--pipes N] [--extra-cmdline 'PARAMS'] [tide run args...]
#   resources/probes/pipeline-probe.sh --pipes 40 --cpus 2 --hotplug-size 1G     # the crashing set-up
#   resources/probes/pipeline-probe.sh --pipes 40 --cpus 1 --hotplug-size 1G
#
# Environment: TIDE (the tide binary, default target/debug/tide), TIDE_GUEST_DIR (the guest
# artifacts; default: build-guest.sh's output). Boot RAM is 128 MiB unless given.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$(dirname "$here")")
pipes=40 extra=
while [ $# -gt 0 ]; do
    case $1 in
        --pipes) pipes=$2; shift 2 ;;
        --extra-cmdline) extra=$2; shift 2 ;;
        *) break ;;
    esac
done
tide=${TIDE:-$root/target/debug/tide}
guest=${TIDE_GUEST_DIR:-$("$root/resources/build-guest.sh" | tail -n 1)}
work=$(mktemp -d "${TMPDIR:-/tmp}/pipeline-probe.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/bin"
gcc -static -O2 -Wall -o "$work/root/bin/fs-base-probe" "$here/fs-base-probe.c"
# The kernel unpacks concatenated cpio archives: the guest's own, then the probe.
(cd "$work/root" && find . | cpio -o -H newc --owner 0:0 2>/dev/null) >"$work/extra.cpio"
cat "$guest/initramfs.cpio" "$work/extra.cpio" >"$work/initramfs.cpio"
cmd="cat /proc/uptime; fs-base-probe 3 1500 200000; cat /proc/uptime; set -o pipefail; i=0; f=0;"
cmd+=" while [ \$i -lt $pipes ]; do dmesg | grep -i linux | tail -2 >/dev/null || { f=\$((f+1)); echo PIPE-FAIL \$i; };"
cmd+=" i=\$((i+1)); done; echo PIPES $pipes FAILED \$f; cat /proc/uptime; dmesg >/tmp/k; grep -E 'traps:|segfault' /tmp/k"
cmdline="console=ttyS0 reboot=k panic=1 pci=off memhp_default_state=online_movable"
[ -e /sys/module/kvm_pvm ] && cmdline+=" $(cat "$guest/cmdline")"
[ -n "$extra" ] && cmdline+=" $extra"
"$tide" run --kernel "$guest/vmlinux" --initrd "$work/initramfs.cpio" --memory 128M "$@" \
    --cmdline "$cmdline tide.cmd=\"$cmd\""

#!/bin/sh
# A memory-hotplug scenario for a CI job (docs/ci.md): boots Tide's guest with --exec, grows its
# memory over the API socket, checks in the guest that the memory is there and usable, shrinks it
# again, and exits with tide's exit status: 0 when every step passed.
#
#   TIDE_GUEST_DIR=$(resources/build-guest.sh | tail -1) resources/ci-scenario.sh
#
# Environment: TIDE (the tide binary; default: tide on PATH), TIDE_GUEST_DIR (the guest's
# artifacts), TIDE_GUEST_CMDLINE (more kernel parameters: on an emulating KVM the contents of
# $TIDE_GUEST_DIR/cmdline), GROW_MIB (default 512), CHECK_MIB (MiB the guest writes and reads
# back, default 256), STEP_TIMEOUT (seconds one step may take, default 600).
set -eu
tide=${TIDE:-tide}
dir=${TIDE_GUEST_DIR:?set TIDE_GUEST_DIR to the directory resources/build-guest.sh printed}
grow_mib=${GROW_MIB:-512}
check_mib=${CHECK_MIB:-256}
step=${STEP_TIMEOUT:-600}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sock=$work/api.sock
log=$work/console.log

# The guest's side, which its init runs (--exec). mt sets MT to MemTotal in kB with shell
# builtins; MemTotal grows by exactly what Linux has onlined.
guest_script="grow_mib=$grow_mib check_mib=$check_mib"'
mt() { while read -r k v u; do [ "$k" = MemTotal: ] && { MT=$v; return; }; done </proc/meminfo; }
mt; boot=$MT
echo "GUEST-READY MemTotal $boot kB"
until mt; [ "$MT" -ge $((boot + grow_mib * 1024)) ]; do sleep 1; done
echo "GUEST-GREW MemTotal $MT kB"
memtest "$check_mib" 0x100000000 || exit 1
echo GUEST-CHECKED
until mt; [ "$MT" -le "$boot" ]; do sleep 1; done
echo "GUEST-SHRANK MemTotal $MT kB"
'

# The whole run may take four steps; --timeout makes sure the job never hangs on tide.
"$tide" run --kernel "$dir/vmlinux" --initrd "$dir/initramfs.cpio" --memory 128M \
    --hotplug-size 1G --api-socket "$sock" --timeout "$((4 * step))s" \
    --cmdline "console=ttyS0 reboot=k panic=1 pci=off ${TIDE_GUEST_CMDLINE:-}" \
    --exec "$guest_script" >"$log" 2>&1 &
pid=$!

# Shows the console and exits with tide's exit status.
finish() {
    rc=0
    wait "$pid" || rc=$?
    cat "$log"
    echo "scenario: tide exited with status $rc"
    exit "$rc"
}
# Waits until the console shows $1; stops if tide ended first or after STEP_TIMEOUT seconds.
wait_console() {
    n=0
    until grep -q "$1" "$log"; do
        kill -0 "$pid" 2>/dev/null || { echo "scenario: tide ended before $1" >&2; finish; }
        n=$((n + 1))
        [ "$n" -le "$step" ] || { echo "scenario: no $1 in ${step} s" >&2; kill "$pid"; finish; }
        sleep 1
    done
}
ctl() {
    "$tide" ctl --api-socket "$sock" "$@" || { echo "scenario: tide ctl $* failed" >&2; kill "$pid"; finish; }
}

wait_console GUEST-READY
# --wait answers once the device has plugged the size, and once the guest has onlined it where
# the guest reports what it onlined; the guest's own loop above waits for MemTotal either way.
ctl resize "${grow_mib}M" --wait --timeout "$step"
wait_console GUEST-CHECKED
ctl status
ctl resize 0 --wait --timeout "$step"
finish

#!/usr/bin/env bash
# Builds everything a first boot needs (the Linux guest from Debian's linux-source, cached in
# ~/.cache/tide, and tide itself) and boots the guest on /dev/kvm to a shell on this terminal,
# with a 4 GiB virtio-mem region and an API socket. Type `exit` in the guest's shell to power off.
# Usage: resources/boot.sh [extra tide run arguments]
# In another terminal:  target/release/tide ctl --api-socket /tmp/tide.sock resize 512M --wait
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
command -v cargo >/dev/null || { echo "boot.sh: cargo is missing: install a Rust toolchain (rustup)" >&2; exit 1; }
guest=$("$here/build-guest.sh" | tail -n 1)
(cd "$root" && cargo build --release -p vmm --bin tide)
sock=${TIDE_API_SOCKET:-/tmp/tide.sock}
cmdline="console=ttyS0 reboot=k panic=1 pci=off memhp_default_state=online_movable"
# An emulating KVM (the kvm_pvm software nested KVM; the tests' kvm_is_emulating() asks the same)
# cannot run some kernel instructions: the guest's cmdline file names the parameters that avoid them.
if [ -e /sys/module/kvm_pvm ]; then
    echo "boot.sh: this host's /dev/kvm emulates guest kernel code (kvm_pvm, about 1 us per instruction): the boot takes about 1-2 minutes" >&2
    cmdline="$cmdline $(cat "$guest/cmdline")"
fi
echo "boot.sh: booting $guest/vmlinux; API socket $sock" >&2
exec "$root/target/release/tide" run \
  --kernel "$guest/vmlinux" --initrd "$guest/initramfs.cpio" \
  --cpus 2 --memory 512M --hotplug-size 4G --api-socket "$sock" \
  --cmdline "$cmdline" \
  "$@"

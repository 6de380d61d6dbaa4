#!/usr/bin/env bash
# Builds everything a first boot needs (the Linux guest from Debian's linux-source, cached in
# ~/.cache/tide, and tide itself) and boots the guest on /dev/kvm with a 4 GiB virtio-mem region
# and an API socket. Usage: resources/boot.sh [extra tide run arguments]
# In another terminal:  target/release/tide ctl --api-socket /tmp/tide.sock resize 1G --wait
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
command -v cargo >/dev/null || { echo "boot.sh: cargo is missing: install a Rust toolchain (rustup)" >&2; exit 1; }
guest=$("$here/build-guest.sh" | tail -n 1)
(cd "$root" && cargo build --release -p vmm --bin tide)
sock=${TIDE_API_SOCKET:-/tmp/tide.sock}
echo "boot.sh: booting $guest/bzImage; API socket $sock" >&2
exec "$root/target/release/tide" run \
  --kernel "$guest/bzImage" --initrd "$guest/initramfs.cpio.gz" \
  --cpus 2 --memory 512M --hotplug-size 4G --api-socket "$sock" \
  --cmdline "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 pci=off noxsave memhp_default_state=online_movable" \
  "$@"

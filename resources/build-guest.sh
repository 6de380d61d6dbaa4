#!/usr/bin/env bash
# Builds Tide's minimal Linux guest: bzImage + vmlinux (PVH) from `make tinyconfig` plus
# resources/guest-kernel.config and resources/guest-kernel.patch, and a busybox initramfs whose
# /init is resources/init, with /bin/memtest (resources/memtest.c) and /bin/tide-exit
# (resources/tide-exit.c).
#
#   resources/build-guest.sh            # prints the artifact directory as its last line
#   nice -n 19 resources/build-guest.sh # on a shared machine
#
# Two caches under ${TIDE_CACHE:-$HOME/.cache/tide}, so that a change to the initramfs costs seconds:
#   kernel-<khash>/  the kernel alone: bzImage, vmlinux, config, gen_init_cpio, build.log, info.
#                    <khash> covers the fragment, the patch and KERNEL_RECIPE below (bump it when the
#                    kernel steps of this script change).
#   guest-<hash>/    what users and tests take: bzImage, vmlinux and config (hard links to or copies
#                    of the kernel cache's), initramfs.cpio.gz and initramfs.cpio (the same,
#                    uncompressed: no emulated inflation), cmdline (one line: the kernel parameters
#                    this guest needs on an emulating KVM, the one place every script and test takes
#                    them from), build.log, info. <hash> covers <khash>, this script, init, the C
#                    helpers and emulated-kvm.cmdline.
# A directory that is complete (has .complete) is reused as is.
#
# The patch adds three workarounds for a software nested KVM whose instruction emulator cannot run
# some kernel instructions (shared/README.md section 7), each behind a boot parameter that is off by
# default, so the same kernel runs unchanged on hardware-assisted KVM. Needs Debian's linux-source-6.12 and build tools: missing packages are installed
# with apt-get (as root, or through sudo).
#
# Environment: TIDE_CACHE (cache root), JOBS (make -j, default: nproc), KEEP_BUILD=1 (keep the kernel
# build tree), KERNEL_SOURCE (a linux-source tarball or unpacked tree instead of Debian's).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment=$here/guest-kernel.config
patch_file=$here/guest-kernel.patch
init=$here/init
memtest=$here/memtest.c
tide_exit=$here/tide-exit.c
emulated_cmdline=$here/emulated-kvm.cmdline
self=$here/$(basename "${BASH_SOURCE[0]}")
cache=${TIDE_CACHE:-$HOME/.cache/tide}
jobs=${JOBS:-$(nproc)}
kernel_source=${KERNEL_SOURCE:-/usr/src/linux-source-6.12.tar.xz}
# Bump when the kernel steps below (configure, build, what is kept) change.
KERNEL_RECIPE=1

die() { echo "build-guest.sh: error: $*" >&2; exit 1; }
log() { echo "build-guest.sh: $*" >&2; }

for f in "$fragment" "$patch_file" "$init" "$memtest" "$tide_exit" "$emulated_cmdline"; do
    [ -f "$f" ] || die "missing $f"
done

khash=$({ echo "recipe $KERNEL_RECIPE ${KERNEL_SOURCE:-}"; cat "$fragment" "$patch_file"; } |
    sha256sum | cut -c1-16)
kdir=$cache/kernel-$khash
hash=$({ echo "$khash"; cat "$self" "$init" "$memtest" "$tide_exit" "$emulated_cmdline"; } |
    sha256sum | cut -c1-16)
out=$cache/guest-$hash
if [ -f "$out/.complete" ]; then
    log "up to date: $out"
    echo "$out"
    exit 0
fi

# --- build dependencies --------------------------------------------------------------------------
need_pkgs=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
pkgs=(busybox-static cpio gzip gcc libc6-dev)
if [ ! -f "$kdir/.complete" ]; then
    pkgs+=(bc bison flex libelf-dev libssl-dev lz4 make patch)
    [ -n "${KERNEL_SOURCE:-}" ] || pkgs+=(linux-source-6.12)
fi
for p in "${pkgs[@]}"; do have_pkg "$p" || need_pkgs+=("$p"); done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing: ${need_pkgs[*]}"
    sudo=()
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || die "need root or sudo to install: ${need_pkgs[*]}"
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! "${sudo[@]}" apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2; then
        "${sudo[@]}" apt-get update >&2
        "${sudo[@]}" apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2 ||
            die "apt-get install ${need_pkgs[*]} failed"
    fi
fi
busybox=$(command -v busybox || true)
[ -n "$busybox" ] || busybox=/bin/busybox
[ -x "$busybox" ] || die "busybox not found (package busybox-static)"
if ldd "$busybox" >/dev/null 2>&1; then die "$busybox is dynamically linked: install busybox-static"; fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/build-$hash.XXXXXX")
cleanup() { [ "${KEEP_BUILD:-0}" = 1 ] || rm -rf "$work"; }
trap cleanup EXIT
buildlog=$work/build.log
t0=$(date +%s)

# --- kernel (its own cache) ----------------------------------------------------------------------
build_kernel() {
if [ -d "$kernel_source" ]; then
    ksrc=$kernel_source
    log "using kernel tree $ksrc (built out of tree in $work/obj)"
    # A tree that is not ours is never modified: it must carry the patch already.
    patch -d "$ksrc" -p1 -R --dry-run -s <"$patch_file" >/dev/null 2>&1 ||
        die "$ksrc does not carry $patch_file: apply it there (patch -p1 < $patch_file) or unset KERNEL_SOURCE"
else
    [ -f "$kernel_source" ] || die "no kernel source at $kernel_source"
    log "unpacking $kernel_source"
    tar -xf "$kernel_source" -C "$work"
    ksrc=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'linux*' | head -n1)
    [ -n "$ksrc" ] || die "no linux-* directory in $kernel_source"
    log "applying $(basename "$patch_file")"
    patch -d "$ksrc" -p1 -s --no-backup-if-mismatch <"$patch_file" >>"$buildlog" 2>&1 ||
        { tail -n 20 "$buildlog" >&2; die "$patch_file does not apply to $kernel_source"; }
fi
obj=$work/obj
mkdir -p "$obj"
kmake() { make -C "$ksrc" O="$obj" ARCH=x86_64 -j"$jobs" "$@" >>"$buildlog" 2>&1 ||
    { tail -n 40 "$buildlog" >&2; die "make $* failed (log: $buildlog)"; }; }

log "configuring (tinyconfig + $(basename "$fragment"))"
kmake tinyconfig
args=()
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=y) o=${line%%=*}; args+=(--enable "${o#CONFIG_}") ;;
        CONFIG_*=m) die "modules are not supported in the fragment: $line" ;;
        CONFIG_*=*) o=${line%%=*}; args+=(--set-val "${o#CONFIG_}" "${line#*=}") ;;
        "# CONFIG_"*" is not set") o=${line#\# CONFIG_}; args+=(--disable "${o%% is not set}") ;;
    esac
done <"$fragment"
"$ksrc/scripts/config" --file "$obj/.config" "${args[@]}"
kmake olddefconfig

# Every option of the fragment must have survived olddefconfig exactly.
bad=()
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*)
            grep -qxF -- "$line" "$obj/.config" ||
                bad+=("$line (got: $(grep -E "^(# )?${line%%=*}[= ]" "$obj/.config" || echo 'absent'))") ;;
        "# CONFIG_"*" is not set")
            o=${line#\# }; o=${o%% is not set}
            if grep -qE "^$o=" "$obj/.config"; then bad+=("$line (got: $(grep -E "^$o=" "$obj/.config"))"); fi ;;
    esac
done <"$fragment"
if [ ${#bad[@]} -gt 0 ]; then
    echo "build-guest.sh: error: these options of $fragment did not survive olddefconfig" \
        "(a dependency is missing or the option does not exist in this kernel):" >&2
    printf '  %s\n' "${bad[@]}" >&2
    exit 1
fi
log "all $(grep -cE '^(CONFIG_|# CONFIG_.* is not set)' "$fragment") fragment options present in .config"

log "building bzImage with -j$jobs (a few minutes)"
kmake bzImage
[ -x "$obj/usr/gen_init_cpio" ] || kmake usr/gen_init_cpio
t1=$(date +%s)
log "kernel built in $((t1 - t0)) s"

kstage=$work/kernel
mkdir -p "$kstage"
cp "$obj/arch/x86/boot/bzImage" "$obj/vmlinux" "$obj/usr/gen_init_cpio" "$kstage/"
cp "$obj/.config" "$kstage/config"
cp "$buildlog" "$kstage/build.log"
{
    echo "kernel: $(make -s -C "$ksrc" O="$obj" kernelversion 2>/dev/null || echo unknown)"
    echo "source: $kernel_source"
    echo "built: $(date -u +%FT%TZ) in $(( $(date +%s) - t0 )) s with -j$jobs"
} >"$kstage/info"
touch "$kstage/.complete"
rm -rf "$kdir"
mv "$kstage" "$kdir"
}
if [ -f "$kdir/.complete" ]; then
    log "kernel up to date: $kdir"
else
    build_kernel
fi

# --- initramfs -----------------------------------------------------------------------------------
# Only /bin/sh links to busybox: its shell runs every applet by name without a link (Debian's
# busybox-static is built with FEATURE_SH_STANDALONE), and each of the ~270 links would cost the
# emulated kernel time to unpack at every boot.
ti=$(date +%s)
gcc -static -O2 -Wall -o "$work/memtest" "$memtest" >>"$buildlog" 2>&1 ||
    { tail -n 20 "$buildlog" >&2; die "cannot build $memtest (gcc -static needs libc6-dev)"; }
# No libc: a few KB instead of a static glibc's ~800 KB for the kernel to unpack at every boot.
gcc -static -nostdlib -ffreestanding -fno-stack-protector -fno-pie -no-pie -Os -s -Wall \
    -o "$work/tide-exit" "$tide_exit" >>"$buildlog" 2>&1 ||
    { tail -n 20 "$buildlog" >&2; die "cannot build $tide_exit"; }
env -i PATH=/nonexistent "$busybox" sh -c 'mount --help' >/dev/null 2>&1 ||
    die "$busybox cannot run applets without links (no FEATURE_SH_STANDALONE)"
list=$work/initramfs.list
{
    echo "dir /dev 0755 0 0"
    echo "nod /dev/console 0600 0 0 c 5 1"
    echo "nod /dev/null 0666 0 0 c 1 3"
    echo "nod /dev/ttyS0 0600 0 0 c 4 64"
    for d in /bin /sbin /usr /usr/bin /usr/sbin /proc /sys /tmp /run /root /etc /mnt; do
        echo "dir $d 0755 0 0"
    done
    echo "file /bin/busybox $busybox 0755 0 0"
    echo "file /init $init 0755 0 0"
    echo "file /bin/memtest $work/memtest 0755 0 0"
    echo "file /bin/tide-exit $work/tide-exit 0755 0 0"
    echo "slink /bin/sh busybox 0777 0 0"
    echo "slink /sbin/init /init 0777 0 0"
} >"$list"
"$kdir/gen_init_cpio" "$list" >"$work/initramfs.cpio"
gzip -9n <"$work/initramfs.cpio" >"$work/initramfs.cpio.gz"

# --- publish -------------------------------------------------------------------------------------
stage=$work/out
mkdir -p "$stage"
for f in bzImage vmlinux config; do
    ln "$kdir/$f" "$stage/$f" 2>/dev/null || cp "$kdir/$f" "$stage/$f"
done
mv "$work/initramfs.cpio.gz" "$work/initramfs.cpio" "$stage/"
grep -v '^#' "$emulated_cmdline" | tr -s ' \n' ' ' | sed 's/^ //; s/ $//' >"$stage/cmdline"
echo >>"$stage/cmdline"
cat "$kdir/build.log" "$buildlog" >"$stage/build.log"
{
    cat "$kdir/info"
    echo "kernel cache: $kdir"
    echo "initramfs: $(date -u +%FT%TZ) in $(( $(date +%s) - ti )) s"
} >"$stage/info"
touch "$stage/.complete"
rm -rf "$out"
mv "$stage" "$out"
log "bzImage $(stat -c %s "$out/bzImage") bytes, vmlinux $(stat -c %s "$out/vmlinux") bytes," \
    "initramfs $(stat -c %s "$out/initramfs.cpio.gz") bytes"
echo "$out"

#!/usr/bin/env bash
# Runs all of Tide's tests on this machine, installing what they need first:
#   tier 1 (no KVM), tier 2 (the test guest on /dev/kvm) and tier 3 (the Linux guest and its own
#   virtio-mem driver, on any KVM: on an emulating one with the guest's workaround parameters;
#   the whole suite took 28.5 minutes on this project's 2-core emulating machine). Usage: resources/test.sh (TIDE_SKIP_LINUX=1 leaves tier 3 out)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
cd "$root"

need=()
command -v gcc >/dev/null || need+=(gcc)
command -v curl >/dev/null || need+=(curl)
command -v mount >/dev/null || need+=(mount)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${need[@]}"
  else
    echo "test.sh: missing ${need[*]}: install them (as root: apt-get install ${need[*]})" >&2
    exit 1
  fi
fi
command -v cargo >/dev/null || { echo "test.sh: cargo is missing: install a Rust toolchain (rustup)" >&2; exit 1; }

# The Linux guest for tier 3 (cached under ~/.cache/tide; rebuilt only when its recipe changes).
if [ "${TIDE_SKIP_LINUX:-0}" != 1 ]; then
  TIDE_GUEST_DIR=$("$here/build-guest.sh" | tail -n 1)
  export TIDE_GUEST_DIR
fi

cargo build --workspace --all-targets
# --show-output: SKIP lines and measured figures of passing tests stay visible.
cargo test --workspace -- --test-threads="${TIDE_TEST_THREADS:-2}" --show-output

#!/usr/bin/env bash
# Runs Tide's fuzz targets (tests/fuzz/: cargo fuzz + libFuzzer) for SECONDS each (default 60) and
# prints each one's number of executions. Exits non-zero if a target crashed (the input that
# did it is left in tests/fuzz/artifacts/<target>/).
#
#   resources/fuzz.sh [SECONDS] [TARGET...]      (targets: all of `cargo fuzz list` by default)
#
# Installs cargo-fuzz if it is missing. cargo fuzz needs nightly rustc flags (-Zsanitizer=...):
# on a stable toolchain this script sets RUSTC_BOOTSTRAP=1 for its own builds only.
# FUZZ_SANITIZER (default address; "none" is ~2x faster) and FUZZ_JOBS (default 1) override.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
cd "$root/tests/fuzz"

secs=${1:-60}
shift || true
case "$secs" in '' | *[!0-9]*) echo "fuzz.sh: SECONDS must be a number, not $secs" >&2; exit 2 ;; esac

command -v cargo >/dev/null || { echo "fuzz.sh: cargo is missing: install a Rust toolchain" >&2; exit 1; }
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi
if ! rustc --version | grep -q nightly; then
  export RUSTC_BOOTSTRAP=1
fi
sanitizer=${FUZZ_SANITIZER:-address}

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

cargo fuzz build --sanitizer "$sanitizer"

failed=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  args=(-max_total_time="$secs" -timeout=20 -print_final_stats=1 -jobs="${FUZZ_JOBS:-1}")
  [ -f "$t.dict" ] && args+=(-dict="$t.dict")
  corpora=("corpus/$t")
  [ -d "seeds/$t" ] && corpora+=("seeds/$t")
  log=$(mktemp)
  echo "== $t: ${secs}s" >&2
  set +e
  cargo fuzz run --sanitizer "$sanitizer" "$t" "${corpora[@]}" -- "${args[@]}" >"$log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  if [ -z "$execs" ]; then
    # Stopped before the final stats: the last status line has the count.
    execs=$(grep -o '^#[0-9]*' "$log" | tail -n 1 | tr -d '#')
  fi
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2)
  corpus_n=$(find "corpus/$t" -type f | wc -l)
  if [ "$rc" -eq 0 ]; then
    echo "$t: ok, ${execs:-?} executions in ${secs}s, coverage ${cov:-?}, corpus $corpus_n"
  else
    echo "$t: CRASH (exit $rc) after ${execs:-?} executions; log follows, input in tests/fuzz/artifacts/$t/"
    grep -E 'panicked|ERROR: libFuzzer|ERROR: AddressSanitizer|SUMMARY|Test unit written|^thread' "$log" | head -n 20
    failed+=("$t")
  fi
  rm -f "$log"
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: crashed: ${failed[*]}" >&2
  exit 1
fi

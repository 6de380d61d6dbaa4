#!/usr/bin/env bash
# Where a running Linux guest's emulated kernel code spends its time on an emulating KVM
# (kvm_pvm): records the host's kvm:kvm_emulate_insn tracepoint (one event per emulated guest
# instruction, with its RIP) on each vCPU thread of a running tide for SECONDS, and prints, per
# vCPU, the number of instructions and the guest functions that executed most of them (RIPs looked
# up in the guest's vmlinux). Needs perf and root. Reads only; the guest keeps running.
#
#   resources/probes/guest-profile.sh TIDE_PID VMLINUX [SECONDS] [TOP]
set -euo pipefail
pid=$1 vmlinux=$2 secs=${3:-5} top=${4:-25}
command -v perf >/dev/null || { echo "guest-profile.sh: perf is missing" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/guest-profile.XXXXXX")
trap 'rm -rf "$work"' EXIT
nm -n "$vmlinux" | awk '$2 ~ /^[tTwW]$/ {print $1, $3}' >"$work/syms"
for task in /proc/"$pid"/task/*; do
    comm=$(cat "$task/comm")
    case $comm in vcpu*) ;; *) continue ;; esac
    tid=$(basename "$task")
    perf record -q -e kvm:kvm_emulate_insn -t "$tid" -o "$work/$comm.data" -- sleep "$secs" >/dev/null 2>&1
    perf script -i "$work/$comm.data" -F trace 2>/dev/null |
        awk '{split($1, a, ":"); print a[2]}' >"$work/$comm.rips"
    echo "== $comm (thread $tid), $secs s:"
    python3 - "$work/syms" "$work/$comm.rips" "$top" <<'PY'
import bisect, collections, sys
syms = [(int(a, 16), n) for a, n in (l.split()[:2] for l in open(sys.argv[1]))]
addrs = [a for a, _ in syms]
count = collections.Counter()
for line in open(sys.argv[2]):
    line = line.strip()
    if not line:
        continue
    i = bisect.bisect_right(addrs, int(line, 16)) - 1
    count[syms[i][1] if i >= 0 else "?"] += 1
total = sum(count.values())
print(f"{total} emulated instructions")
for name, n in count.most_common(int(sys.argv[3])):
    print(f"{n:9d} {100 * n / total:5.1f}% {name}")
PY
done

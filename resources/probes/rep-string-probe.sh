#!/bin/sh
# What clearing and copying memory costs guest kernel code (CPL 0) on this KVM, per instruction
# choice: rep stosb (the kernel's clear_page_erms, memset with FSRS), rep stosq (clear_page_rep),
# an unrolled movq loop (clear_page_orig), and the same for copies (rep movsb: memcpy with FSRM,
# copy_user with ERMS/FSRM; rep movsq; movq loop: memcpy_orig). 1 MiB per phase, two rounds.
# Output: "<marker> <seconds>": the vCPU thread's CPU time of the phase BEFORE the marker:
#   q = rep stosb, l = rep stosq, m = movq clear loop, Q = rep movsb, L = rep movsq,
#   b (round 2) / . = movq copy loop.
set -e
here=$(cd "$(dirname "$0")" && pwd); d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
gcc -O2 -m64 -ffreestanding -fno-pic -no-pie -mgeneral-regs-only -mno-red-zone -nostdlib -static \
    -Wl,-Ttext=0x1000 -Wl,-e,_start -o "$d/g.elf" "$here/rep-string-guest.c"
objcopy -O binary -j .text -j .rodata "$d/g.elf" "$d/g.bin"
gcc -O2 -o "$d/run" "$here/rep-string-run.c"
cd "$d" && ./run

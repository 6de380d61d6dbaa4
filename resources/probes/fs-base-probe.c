// fs-base-probe NPROC TURNS SPINS: do guest user processes that take turns on the same vCPUs
// keep their own FS base? NPROC children pass a token round a ring of pipes (a guest context
// switch per turn, as in a shell pipeline). Each sets its FS base to its own slot (fixed addresses
// mapped in every child, slot k holding the magic of k), then on every turn reads %fs:-0x80 SPINS
// times (the way glibc reads a thread-local pointer) and, when the CPU lets user space, RDFSBASE;
// another slot's magic means another process's FS base was live in this one. Exit status 1 on any
// mismatch. Built static and added to the guest by resources/probes/pipeline-probe.sh.
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define BASE 0x200000000UL
#define SLOT 0x10000UL
#define MAGIC 0x7e57000000000000UL

static inline long raw3(long n, long a, long b, long c) {
    long r;
    asm volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}
static inline uint64_t fs_tls(void) {
    uint64_t v;
    asm volatile("mov %%fs:-0x80, %0" : "=r"(v));
    return v;
}
static inline uint64_t rdfsbase(void) {
    uint64_t v;
    asm volatile("rdfsbase %0" : "=r"(v));
    return v;
}

struct result { long bad_tls, bad_base, bad_mem, turns; uint64_t seen_tls, seen_base; };

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 3;
    long iters = argc > 2 ? atol(argv[2]) : 1000;
    long spins = argc > 3 ? atol(argv[3]) : 20000;
    int have_fsgsbase = (getauxval(AT_HWCAP2) & 2) != 0;
    for (int k = 0; k < n; k++) {
        uint64_t *p = mmap((void *)(BASE + k * SLOT), 2 * 4096, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (p == MAP_FAILED) { perror("mmap"); return 2; }
        p[(4096 - 0x80) / 8] = MAGIC | k;
    }
    int pipes[16][2];
    for (int k = 0; k < n; k++) if (pipe(pipes[k])) { perror("pipe"); return 2; }
    struct result *res = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    for (int i = 0; i < n; i++) {
        if (fork() == 0) {
            uint64_t mine = BASE + i * SLOT + 4096, orig = 0;
            volatile uint64_t *memslot = (uint64_t *)(mine - 0x80);
            struct result r = {0};
            raw3(SYS_arch_prctl, ARCH_GET_FS, (long)&orig, 0);
            raw3(SYS_arch_prctl, ARCH_SET_FS, mine, 0);
            /* No libc from here until FS is restored: it uses %fs for errno and the canary. */
            char tok = 0;
            int in = pipes[i][0], out = pipes[(i + 1) % n][1];
            if (i == 0) raw3(SYS_write, out, (long)&tok, 1);
            for (long t = 0; t < iters; t++) {
                if (raw3(SYS_read, in, (long)&tok, 1) != 1) break;
                for (long spin = 0; spin < spins; spin++) {
                    uint64_t v = fs_tls();
                    if (v != (MAGIC | i)) { r.bad_tls++; r.seen_tls = v; }
                    if (*memslot != (MAGIC | i)) r.bad_mem++;
                    if (have_fsgsbase && (spin & 255) == 0) {
                        uint64_t b = rdfsbase();
                        if (b != mine) { r.bad_base++; r.seen_base = b; }
                    }
                }
                r.turns++;
                raw3(SYS_write, out, (long)&tok, 1);
            }
            raw3(SYS_arch_prctl, ARCH_SET_FS, orig, 0);
            res[i].bad_tls = r.bad_tls; res[i].bad_base = r.bad_base; res[i].bad_mem = r.bad_mem;
            res[i].turns = r.turns; res[i].seen_tls = r.seen_tls; res[i].seen_base = r.seen_base;
            _exit(0);
        }
    }
    for (int k = 0; k < n; k++) { close(pipes[k][0]); close(pipes[k][1]); }
    int bad = 0, st;
    for (int i = 0; i < n; i++) {
        pid_t c = wait(&st);
        if (!WIFEXITED(st) || WEXITSTATUS(st)) { printf("fs-base-probe: child %d died: status %#x\n", c, st); bad = 1; }
    }
    for (int i = 0; i < n; i++) {
        printf("fs-base-probe: proc %d turns %ld bad_tls %ld (last %#lx) bad_base %ld (last %#lx) bad_mem %ld\n",
               i, res[i].turns, res[i].bad_tls, (unsigned long)res[i].seen_tls, res[i].bad_base,
               (unsigned long)res[i].seen_base, res[i].bad_mem);
        if (res[i].bad_tls || res[i].bad_base || res[i].bad_mem) bad = 1;
    }
    printf("fs-base-probe: fsgsbase in user space: %s; %s\n", have_fsgsbase ? "yes" : "no", bad ? "FAIL" : "ok");
    return bad;
}

/*
 * memtest: a user program for Tide's Linux guest that shows plugged memory is really usable.
 *
 *   memtest MIB
 *
 * Maps MIB MiB of anonymous memory, writes a pattern that depends on each word's address into
 * every 8-byte word, reads it all back, and prints one line:
 *   memtest: ok MIB MiB written and verified in T ms
 * or "memtest: FAIL ..." with exit status 1. User code runs natively even on an emulating KVM;
 * only the kernel's page-fault work is slow there, so the mapping asks for transparent huge pages.
 * Built statically by resources/build-guest.sh and installed as /bin/memtest in the initramfs.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static uint64_t pattern(const uint64_t *p) { return (uint64_t)(uintptr_t)p * 0x9e3779b97f4a7c15ull; }

static long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: memtest MIB\n");
		return 2;
	}
	char *end;
	unsigned long mib = strtoul(argv[1], &end, 10);
	if (*end || mib == 0) {
		fprintf(stderr, "memtest: bad size '%s'\n", argv[1]);
		return 2;
	}
	size_t len = (size_t)mib << 20, huge = 2u << 20;
	long t0 = now_ms();
	char *raw = mmap(NULL, len + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (raw == MAP_FAILED) {
		perror("memtest: mmap");
		return 1;
	}
	uint64_t *base = (uint64_t *)(((uintptr_t)raw + huge - 1) & ~(uintptr_t)(huge - 1));
	madvise(base, len, MADV_HUGEPAGE);
	size_t words = len / sizeof(uint64_t);
	for (size_t i = 0; i < words; i++)
		base[i] = pattern(&base[i]);
	for (size_t i = 0; i < words; i++) {
		if (base[i] != pattern(&base[i])) {
			printf("memtest: FAIL at offset %zu of %lu MiB\n", i * sizeof(uint64_t), mib);
			return 1;
		}
	}
	printf("memtest: ok %lu MiB written and verified in %ld ms\n", mib, now_ms() - t0);
	return 0;
}

/*
 * memtest: a user program for Tide's Linux guest that shows plugged memory is really usable.
 *
 *   memtest MIB [ADDR]
 *
 * Maps MIB MiB of anonymous memory, writes a pattern that depends on each word's address into
 * every 8-byte word, reads it all back, and prints one line:
 *   memtest: ok MIB MiB written and verified in T ms, H of P pages at or above ADDR
 * or "memtest: FAIL ..." with exit status 1. With ADDR (a guest physical address, e.g. the start
 * of the virtio-mem region) it also counts, from /proc/self/pagemap (root only), how many of the
 * P pages are backed by guest memory at or above ADDR: that is where hot-plugged memory lives. User code runs natively even on an emulating KVM;
 * only the kernel's page-fault work is slow there, so the mapping asks for transparent huge pages.
 * Built statically by resources/build-guest.sh and installed as /bin/memtest in the initramfs.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static uint64_t pattern(const uint64_t *p) { return (uint64_t)(uintptr_t)p * 0x9e3779b97f4a7c15ull; }

static long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

/* How many of the `pages` 4 KiB pages from `base` are present at a physical address >= min. */
static long pages_at_or_above(const void *base, size_t pages, uint64_t min)
{
	int fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0)
		return -1;
	long n = 0;
	uint64_t entry;
	off_t off = (off_t)((uintptr_t)base / 4096) * (off_t)sizeof(entry);
	for (size_t i = 0; i < pages; i++, off += sizeof(entry)) {
		if (pread(fd, &entry, sizeof(entry), off) != sizeof(entry)) {
			n = -1;
			break;
		}
		/* bit 63: present; bits 0-54: page frame number (zero without CAP_SYS_ADMIN) */
		if ((entry >> 63) & 1 && (entry & ((1ull << 55) - 1)) * 4096 >= min)
			n++;
	}
	close(fd);
	return n;
}

int main(int argc, char **argv)
{
	if (argc != 2 && argc != 3) {
		fprintf(stderr, "usage: memtest MIB [ADDR]\n");
		return 2;
	}
	char *end;
	unsigned long mib = strtoul(argv[1], &end, 10);
	if (*end || mib == 0) {
		fprintf(stderr, "memtest: bad size '%s'\n", argv[1]);
		return 2;
	}
	uint64_t min = 0;
	if (argc == 3) {
		min = strtoull(argv[2], &end, 0);
		if (*end) {
			fprintf(stderr, "memtest: bad address '%s'\n", argv[2]);
			return 2;
		}
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
	long ms = now_ms() - t0;
	if (argc == 3) {
		long high = pages_at_or_above(base, len / 4096, min);
		if (high < 0) {
			perror("memtest: /proc/self/pagemap");
			return 1;
		}
		printf("memtest: ok %lu MiB written and verified in %ld ms, %ld of %zu pages at or above %#llx\n",
		       mib, ms, high, len / 4096, (unsigned long long)min);
	} else {
		printf("memtest: ok %lu MiB written and verified in %ld ms\n", mib, ms);
	}
	return 0;
}

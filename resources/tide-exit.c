/*
 * tide-exit: ends the VM with an exit status that `tide` passes on as its own.
 *
 *   tide-exit STATUS      (0 to 255)
 *
 * Writes the one byte STATUS to Tide's debug-exit I/O port 0xf4; Tide stops the guest in order and
 * exits with STATUS. Uses /dev/port (the kernel does the port write) and falls back to ioperm() and
 * an OUT of its own. Under Tide the guest never runs past the write. Returns only on failure (not
 * root, no way to reach the port, or not under Tide: nothing stopped the guest), with exit status 1
 * and a message on stderr.
 *
 * Freestanding (x86_64 Linux system calls, no libc): a static glibc program would add ~800 KB to
 * the initramfs, which the guest kernel unpacks at every boot (slow on an emulating KVM).
 * Built by resources/build-guest.sh and installed as /bin/tide-exit in the initramfs.
 */

#define SYS_write 1
#define SYS_open 2
#define SYS_pwrite64 18
#define SYS_exit 60
#define SYS_ioperm 173
#define O_WRONLY 1
#define DEBUG_EXIT_PORT 0xf4

static long sys3(long n, long a, long b, long c)
{
	long r;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
	return r;
}

static long sys4(long n, long a, long b, long c, long d)
{
	long r;
	register long r10 __asm__("r10") = d;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
	return r;
}

static unsigned long len(const char *s)
{
	unsigned long n = 0;
	while (s[n])
		n++;
	return n;
}

__attribute__((noreturn)) static void fail(const char *why)
{
	sys3(SYS_write, 2, (long)"tide-exit: ", 11);
	sys3(SYS_write, 2, (long)why, (long)len(why));
	sys3(SYS_write, 2, (long)"\n", 1);
	for (;;)
		sys3(SYS_exit, 1, 0, 0);
}

__attribute__((noreturn, used)) void tide_exit_main(long *sp)
{
	long argc = sp[0];
	const char *arg = (const char *)sp[2];
	if (argc != 2)
		fail("usage: tide-exit STATUS (0 to 255)");
	unsigned status = 0, digits = 0;
	for (const char *p = arg; *p; p++, digits++) {
		if (*p < '0' || *p > '9' || digits == 3)
			fail("STATUS must be a number from 0 to 255");
		status = status * 10 + (unsigned)(*p - '0');
	}
	if (digits == 0 || status > 255)
		fail("STATUS must be a number from 0 to 255");
	unsigned char b = (unsigned char)status;
	long fd = sys3(SYS_open, (long)"/dev/port", O_WRONLY, 0);
	if (fd >= 0 && sys4(SYS_pwrite64, fd, (long)&b, 1, DEBUG_EXIT_PORT) == 1)
		fail("wrote to port 0xf4 but the VM did not stop (not Tide?)");
	if (sys3(SYS_ioperm, DEBUG_EXIT_PORT, 1, 1) != 0)
		fail("cannot reach I/O port 0xf4 (no /dev/port and no ioperm: not root?)");
	__asm__ volatile("outb %0, %1" : : "a"(b), "Nd"((unsigned short)DEBUG_EXIT_PORT));
	fail("wrote to port 0xf4 but the VM did not stop (not Tide?)");
}

/* The kernel enters with argc, argv... on the stack; align it and go to C. */
__asm__(".globl _start\n"
	"_start:\n"
	"  mov %rsp, %rdi\n"
	"  and $-16, %rsp\n"
	"  call tide_exit_main\n");

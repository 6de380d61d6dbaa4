/*
 * Tide's freestanding test guest.
 *
 * Runs under Tide (or any VMM following Linux's 64-bit boot protocol) as a static ELF64 linked at
 * 0x100000 (guest.ld), entered by start.S in long mode with the first 4 GiB identity-mapped.
 * Reports over the 8250 serial port at 0x3f8, one line per step, every line starting "tide-guest: ".
 * Ends with an i8042 reset (outb 0x64, 0xFE), which Tide treats as a clean power-off.
 *
 * The emulated /dev/kvm of the development machines runs 64-bit code at ~1 us per instruction, so this
 * code keeps its instruction count small and uses no SSE/AVX, xsave or int3 (see docs/testing.md).
 *
 * Command line (Linux's boot_params.hdr.cmd_line_ptr):
 *   tide.test=hang | triple | flood | mem-follow | mem-hostile | mem-touch-unplugged | mem-busy
 *             | mem-reset | mem-read-unplugged | mem-log-flood | mem-failed
 *             (flood: prints lines on the console for ever; mem-failed: the driver sets FAILED)
 *   tide.exit=<n>                            write n to the debug-exit port 0xf4 after the boot facts
 *   virtio_mmio.device=<size>@<addr>:<irq>   (Linux syntax; may appear several times)
 *   tide.accept_inaccessible=0               do not accept VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
 *   tide.exit_at_zero=1                      mem-follow: power off once requested and plugged are 0
 *                                            after requested was non-zero
 *   tide.irq=0                               wait by polling InterruptStatus instead of with interrupts
 *   tide.chunk=<size>                        mem-follow: at most this much per PLUG/UNPLUG request, one
 *                                            at a time (128M: Linux's pattern on x86_64)
 * Without tide.test and without a virtio-mem device it prints the boot facts and powers off; with a
 * virtio-mem device the default scenario is mem-follow.
 */

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define barrier() __asm__ volatile("" ::: "memory")

/* gcc may emit calls to these even with -ffreestanding. */
__attribute__((optimize("no-tree-loop-distribute-patterns"))) void *memset(void *d, int c, unsigned long n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

__attribute__((optimize("no-tree-loop-distribute-patterns"))) void *memcpy(void *d, const void *s, unsigned long n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

/* ------------------------------------------------------------------------------------------------ */
/* Port I/O, serial output, power off                                                               */

static inline void outb(u16 port, u8 v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static void putc_(char c)
{
    outb(0x3f8, (u8)c);
}

static void puts_(const char *s)
{
    while (*s)
        putc_(*s++);
}

static void put_dec(u64 v)
{
    char b[21];
    int i = 20;
    b[i] = 0;
    do {
        b[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts_(b + i);
}

static void put_hex(u64 v)
{
    char b[19];
    int i = 18;
    b[i] = 0;
    do {
        b[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    b[--i] = 'x';
    b[--i] = '0';
    puts_(b + i);
}

/* Starts a report line. */
static void say(const char *s)
{
    puts_("tide-guest: ");
    puts_(s);
}

static void nl(void)
{
    putc_('\n');
}

static void say_line(const char *s)
{
    say(s);
    nl();
}

__attribute__((noreturn)) static void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* i8042 "pulse reset line": Tide's clean exit. */
__attribute__((noreturn)) static void power_off(void)
{
    outb(0x64, 0xfe);
    halt_forever();
}

/* Empty IDT, then an exception: #UD -> #GP -> #DF -> triple fault (no int3: see the README). */
__attribute__((noreturn)) static void triple_fault(void)
{
    static const struct __attribute__((packed)) {
        u16 limit;
        u64 base;
    } empty_idt = { 0, 0 };
    __asm__ volatile("lidt %0; ud2" : : "m"(empty_idt));
    halt_forever();
}

/* ------------------------------------------------------------------------------------------------ */
/* Command line                                                                                    */

static const char *cmdline = "";

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n';
}

/* Finds "key=" as a whole word in the command line at or after `from`; returns the value or 0. */
static const char *find_param_from(const char *from, const char *key)
{
    const char *p = from;
    while (*p) {
        while (is_space(*p))
            p++;
        if (!*p)
            break;
        const char *k = key, *q = p;
        while (*k && *q == *k) {
            k++;
            q++;
        }
        if (!*k && *q == '=')
            return q + 1;
        while (*p && !is_space(*p))
            p++;
    }
    return 0;
}

static const char *find_param(const char *key)
{
    return find_param_from(cmdline, key);
}

/* Whether the value of `key` (its last occurrence wins, as in Linux) is exactly `val`. */
static int param_is(const char *key, const char *val)
{
    const char *v = 0, *p = cmdline, *f;
    while ((f = find_param_from(p, key))) {
        v = f;
        p = f;
    }
    if (!v)
        return 0;
    while (*val && *v == *val) {
        v++;
        val++;
    }
    return !*val && (!*v || is_space(*v));
}

/* Parses a number (decimal or 0x-hex) with an optional K/M/G suffix; advances *pp. */
static u64 parse_num(const char **pp, int suffix)
{
    const char *p = *pp;
    u64 v = 0;
    if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
        p += 2;
        for (;;) {
            char c = *p;
            if (c >= '0' && c <= '9')
                v = v * 16 + (u64)(c - '0');
            else if (c >= 'a' && c <= 'f')
                v = v * 16 + (u64)(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F')
                v = v * 16 + (u64)(c - 'A' + 10);
            else
                break;
            p++;
        }
    } else {
        while (*p >= '0' && *p <= '9')
            v = v * 10 + (u64)(*p++ - '0');
    }
    if (suffix) {
        switch (*p) {
        case 'k': case 'K': v <<= 10; p++; break;
        case 'm': case 'M': v <<= 20; p++; break;
        case 'g': case 'G': v <<= 30; p++; break;
        }
    }
    *pp = p;
    return v;
}

/* ------------------------------------------------------------------------------------------------ */
/* Boot facts: MP table, e820                                                                      */

static inline u32 rd32(u64 a)
{
    return *(volatile u32 *)a;
}

static inline u16 rd16(u64 a)
{
    return *(volatile u16 *)a;
}

static inline u8 rd8(u64 a)
{
    return *(volatile u8 *)a;
}

static inline u64 rd64(u64 a)
{
    return *(volatile u64 *)a;
}

static u64 find_mp_floating(u64 start, u64 end)
{
    for (u64 a = start; a < end; a += 16) {
        if (rd32(a) != 0x5f504d5fu) /* "_MP_" */
            continue;
        u32 len = rd8(a + 8) * 16u;
        if (len < 16 || len > 64)
            continue;
        u8 sum = 0;
        for (u32 i = 0; i < len; i++)
            sum = (u8)(sum + rd8(a + i));
        if (sum == 0)
            return a;
    }
    return 0;
}

/* Number of processor entries in the MP configuration table; 0 when there is none. */
static u32 mp_cpu_count(void)
{
    u64 fp = find_mp_floating(0xf0000, 0x100000);
    if (!fp)
        fp = find_mp_floating(0x9fc00, 0xa0000); /* last KiB of base memory, also allowed by the spec */
    if (!fp)
        return 0;
    u64 cfg = rd32(fp + 4);
    if (!cfg || rd32(cfg) != 0x504d4350u) /* "PCMP" */
        return 0;
    u64 end = cfg + rd16(cfg + 4);
    u32 entries = rd16(cfg + 34), cpus = 0;
    u64 e = cfg + 44;
    for (u32 i = 0; i < entries && e < end; i++) {
        u8 type = rd8(e);
        if (type == 0) {
            cpus++;
            e += 20;
        } else if (type <= 4) {
            e += 8;
        } else {
            break;
        }
    }
    return cpus;
}

static void report_e820(u64 bp)
{
    u32 n = rd8(bp + 0x1e8);
    if (n > 128)
        n = 128;
    u64 ram = 0;
    for (u32 i = 0; i < n; i++) {
        u64 e = bp + 0x2d0 + 20 * i;
        if (rd32(e + 16) == 1)
            ram += rd64(e + 8);
    }
    say("e820: ");
    put_dec(n);
    puts_(" entries, ");
    put_dec(ram >> 20);
    puts_(" MiB");
    nl();
    for (u32 i = 0; i < n; i++) {
        u64 e = bp + 0x2d0 + 20 * i;
        say("e820 entry ");
        put_hex(rd64(e));
        putc_(' ');
        put_hex(rd64(e + 8));
        putc_(' ');
        put_dec(rd32(e + 16));
        nl();
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Page tables: identity-map the hotplug region with 2 MiB pages, lazily                           */

#define SZ_2M (2ul << 20)
#define SZ_1G (1ul << 30)
#define MAP_CAP (64ul << 30) /* at most 64 GiB of the region is mapped (and pattern-checked) */
#define PT_POOL_PAGES 68
#define PTE_P 1ul
#define PTE_W 2ul
#define PTE_PS 0x80ul
#define PTE_ADDR 0x000ffffffffff000ul

extern u64 pt_pool[PT_POOL_PAGES][512];
static u32 pt_used;

static u64 read_cr3(void)
{
    u64 v;
    __asm__ volatile("mov %%cr3, %0" : "=r"(v));
    return v;
}

static u64 *pt_alloc(void)
{
    if (pt_used >= PT_POOL_PAGES)
        return 0;
    u64 *p = pt_pool[pt_used++];
    for (int i = 0; i < 512; i++)
        p[i] = 0;
    return p;
}

/* Returns the next-level table of entry *e, allocating it when absent; 0 when the pool is empty or
 * *e is a large page (then the address is already mapped). */
static u64 *pt_next(u64 *e, int *large)
{
    if (*e & PTE_P) {
        if (*e & PTE_PS) {
            *large = 1;
            return 0;
        }
        return (u64 *)(*e & PTE_ADDR);
    }
    u64 *p = pt_alloc();
    if (p)
        *e = (u64)p | PTE_P | PTE_W;
    return p;
}

/* Identity-maps the 2 MiB page holding pa; 0 on success. */
static int map_2m(u64 pa)
{
    if (pa >= (1ul << 47))
        return -1;
    int large = 0;
    u64 *pml4 = (u64 *)(read_cr3() & PTE_ADDR);
    u64 *pdpt = pt_next(&pml4[(pa >> 39) & 511], &large);
    if (!pdpt)
        return large ? 0 : -1;
    u64 *pd = pt_next(&pdpt[(pa >> 30) & 511], &large);
    if (!pd)
        return large ? 0 : -1;
    u64 *e = &pd[(pa >> 21) & 511];
    if (!(*e & PTE_P))
        *e = (pa & ~(SZ_2M - 1)) | PTE_P | PTE_W | PTE_PS;
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* virtio-mmio transport                                                                           */

#define VM_MAGIC 0x000
#define VM_VERSION 0x004
#define VM_DEVICE_ID 0x008
#define VM_DEV_FEATURES 0x010
#define VM_DEV_FEATURES_SEL 0x014
#define VM_DRV_FEATURES 0x020
#define VM_DRV_FEATURES_SEL 0x024
#define VM_QUEUE_SEL 0x030
#define VM_QUEUE_NUM_MAX 0x034
#define VM_QUEUE_NUM 0x038
#define VM_QUEUE_READY 0x044
#define VM_QUEUE_NOTIFY 0x050
#define VM_INT_STATUS 0x060
#define VM_INT_ACK 0x064
#define VM_STATUS 0x070
#define VM_QUEUE_DESC 0x080
#define VM_QUEUE_DRIVER 0x090
#define VM_QUEUE_DEVICE 0x0a0
#define VM_CONFIG_GEN 0x0fc
#define VM_CONFIG 0x100

#define ST_ACK 1u
#define ST_DRIVER 2u
#define ST_DRIVER_OK 4u
#define ST_FEATURES_OK 8u
#define ST_NEEDS_RESET 64u
#define ST_FAILED 128u

#define VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE 1
#define VIRTIO_F_VERSION_1 32

#define QSIZE 8
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

struct vdesc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct vavail {
    u16 flags;
    u16 idx;
    u16 ring[QSIZE];
    u16 used_event;
};

struct vused {
    u16 flags;
    u16 idx;
    struct {
        u32 id;
        u32 len;
    } ring[QSIZE];
    u16 avail_event;
};

extern u8 vq_desc_page[4096], vq_avail_page[4096], vq_used_page[4096], vq_buf_page[4096];

static u64 mmio;      /* base of the virtio-mem device */
static u64 mmio_irq;  /* its interrupt (IOAPIC pin), from the command line */
static u16 qsize;     /* negotiated queue size */
static u16 avail_idx; /* next avail index to publish */
static u16 used_idx;  /* next used index to consume */
static volatile u32 isr_seen; /* InterruptStatus bits acknowledged (by the interrupt handler or a poll)
                               * and not consumed yet: bit 1 config change, bit 0 used buffer */

static inline u32 mr(u32 off)
{
    return *(volatile u32 *)(mmio + off);
}

static inline void mw(u32 off, u32 v)
{
    *(volatile u32 *)(mmio + off) = v;
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline void cpu_pause(void)
{
    __asm__ volatile("pause" ::: "memory");
}

/* Waits about `cycles` TSC cycles (~1 ms per 2^21..2^22 on today's hosts, emulated or not). */
static void delay_tsc(u64 cycles)
{
    u64 t0 = rdtsc();
    while (rdtsc() - t0 < cycles)
        cpu_pause();
}

static inline void irq_off(void)
{
    __asm__ volatile("cli" ::: "memory");
}

static inline void irq_on(void)
{
    __asm__ volatile("sti" ::: "memory");
}

/* Interrupts off; returns whether they were on. */
static inline u64 irq_save(void)
{
    u64 f;
    __asm__ volatile("pushfq; popq %0; cli" : "=r"(f) : : "memory");
    return f & 0x200;
}

static inline void irq_restore(u64 was_on)
{
    if (was_on)
        irq_on();
}

/* Reads and acknowledges the interrupt status, adds it to isr_seen (with interrupts off, so the
 * read-modify-write cannot race with the handler, which does the same). */
static u32 ack_interrupts_locked(void)
{
    u32 isr = mr(VM_INT_STATUS);
    if (isr) {
        mw(VM_INT_ACK, isr);
        isr_seen |= isr;
    }
    return isr;
}

static u32 ack_interrupts(void)
{
    u64 f = irq_save();
    u32 isr = ack_interrupts_locked();
    irq_restore(f);
    return isr;
}

/* Takes (clears and returns) the isr_seen bits in `mask`. */
static u32 take_isr(u32 mask)
{
    u64 f = irq_save();
    u32 v = isr_seen & mask;
    isr_seen &= ~mask;
    irq_restore(f);
    return v;
}

/* ------------------------------------------------------------------------------------------------ */
/* Interrupts: IDT, LAPIC (timer, spurious vector), in-kernel IOAPIC pin of the virtio-mmio device   */

#define LAPIC_BASE 0xfee00000ul
#define LAPIC_ID 0x020
#define LAPIC_TPR 0x080
#define LAPIC_SVR 0x0f0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3e0
#define IOAPIC_BASE 0xfec00000ul

#define VEC_VIRTIO 0x30
#define VEC_TIMER 0x31
#define VEC_SPURIOUS 0xff
/* LAPIC timer counts with divide-by-16 (divide configuration 3) of KVM's 1 GHz APIC bus clock. */
#define TIMER_TICK 6250000u /* the periodic safety-net tick: 100 ms */
#define TIMER_PROBE 62500u  /* the one-shot start-up probe: 1 ms */

struct idt_gate {
    u16 off0;
    u16 sel;
    u8 ist;
    u8 type; /* 0x8e: present, DPL 0, 64-bit interrupt gate */
    u16 off1;
    u32 off2;
    u32 zero;
};

extern struct idt_gate idt[256];
extern u8 isr_stubs[]; /* start.S: 16 bytes per vector */

static volatile u32 ticks;       /* LAPIC timer interrupts */
static volatile u32 virtio_irqs; /* interrupts on VEC_VIRTIO */
static volatile u32 stray_irqs;  /* interrupts on vectors nobody programmed */
static int irq_mode;             /* 1: waits halt until an interrupt (virtio or timer tick); 0: polling */

static inline void lapic_w(u32 reg, u32 v)
{
    *(volatile u32 *)(LAPIC_BASE + reg) = v;
}

static inline u32 lapic_r(u32 reg)
{
    return *(volatile u32 *)(LAPIC_BASE + reg);
}

static void ioapic_w(u32 reg, u32 v)
{
    *(volatile u32 *)IOAPIC_BASE = reg;
    *(volatile u32 *)(IOAPIC_BASE + 0x10) = v;
}

static u32 ioapic_r(u32 reg)
{
    *(volatile u32 *)IOAPIC_BASE = reg;
    return *(volatile u32 *)(IOAPIC_BASE + 0x10);
}

/* Called by isr_common (start.S) with interrupts off; returns whether to send the LAPIC EOI.
 * frame: see start.S (frame[10] error code, frame[11] RIP). */
__attribute__((used)) u32 isr_dispatch(u64 vec, u64 *frame)
{
    vec &= 0xff;
    if (vec == VEC_VIRTIO) {
        virtio_irqs++;
        if (mmio)
            ack_interrupts_locked();
        return 1;
    }
    if (vec == VEC_TIMER) {
        ticks++;
        return 1;
    }
    if (vec == VEC_SPURIOUS) /* no EOI for the spurious vector */
        return 0;
    if (vec < 32) {
        u64 cr2 = 0;
        if (vec == 14)
            __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
        say("exception ");
        put_dec(vec);
        puts_(" rip ");
        put_hex(frame[11]);
        puts_(" error ");
        put_hex(frame[10]);
        if (vec == 14) {
            puts_(" cr2 ");
            put_hex(cr2);
        }
        nl();
        power_off();
    }
    if (!stray_irqs++) {
        say("note: unexpected interrupt vector ");
        put_dec(vec);
        nl();
    }
    return 1;
}

/* Fills the IDT (every vector goes to its stub; CS is the code selector we run on, 0x10 under Tide)
 * and loads it, so that any exception is reported instead of ending in a silent triple fault.  Also
 * masks the 8259 PIC: the in-kernel irqchip routes every GSI to the PIC as well as to the IOAPIC. */
static void idt_init(void)
{
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    for (u32 i = 0; i < 256; i++) {
        u64 a = (u64)isr_stubs + 16 * i;
        idt[i].off0 = (u16)a;
        idt[i].sel = cs;
        idt[i].ist = 0;
        idt[i].type = 0x8e;
        idt[i].off1 = (u16)(a >> 16);
        idt[i].off2 = (u32)(a >> 32);
        idt[i].zero = 0;
    }
    struct __attribute__((packed)) {
        u16 limit;
        u64 base;
    } d = { sizeof(struct idt_gate) * 256 - 1, (u64)idt };
    __asm__ volatile("lidt %0" : : "m"(d) : "memory");
    outb(0x21, 0xff); /* OCW1: mask every 8259 input */
    outb(0xa1, 0xff);
}

static u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}

/* Sets up the LAPIC (spurious vector, LINT0 masked, timer) and the IOAPIC redirection entry of `pin`
 * (edge, fixed, physical destination = our APIC ID, VEC_VIRTIO), checks that the LAPIC timer really
 * interrupts us, and then runs with interrupts on.  Leaves irq_mode 0 (polling) when something is off. */
static void irq_init(u64 pin)
{
    const char *why = 0;
    u64 apic_base = rdmsr(0x1b);
    u32 max_pin = 0;
    if (param_is("tide.irq", "0"))
        why = "tide.irq=0";
    else if (!pin)
        why = "no irq given for the device";
    else if ((apic_base & 0xc00) != 0x800 || (apic_base & 0xfffff000ul) != LAPIC_BASE)
        why = "LAPIC not enabled in xAPIC mode at 0xfee00000";
    if (!why) {
        max_pin = (ioapic_r(0x01) >> 16) & 0xff;
        if (pin > max_pin)
            why = "irq beyond the IOAPIC's pins";
    }
    if (!why) {
        lapic_w(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
        lapic_w(LAPIC_TPR, 0);
        lapic_w(LAPIC_LVT_LINT0, 0x10700); /* ExtINT, masked: the PIC is not used */
        lapic_w(LAPIC_TIMER_DIV, 3);       /* divide by 16 */
        lapic_w(LAPIC_LVT_TIMER, VEC_TIMER); /* one-shot for the probe */
        u32 dest = lapic_r(LAPIC_ID) >> 24;
        ioapic_w(0x11 + 2 * (u32)pin, dest << 24);
        ioapic_w(0x10 + 2 * (u32)pin, VEC_VIRTIO); /* fixed, physical, active high, edge, unmasked */
        /* Probe: a 1 ms one-shot, waited for by polling (a halt could wait forever). */
        lapic_w(LAPIC_TIMER_INIT, TIMER_PROBE);
        irq_on();
        u64 t0 = rdtsc();
        while (!ticks && rdtsc() - t0 < (1ul << 28))
            cpu_pause();
        irq_off();
        if (!ticks)
            why = "no LAPIC timer interrupt within ~100 ms";
    }
    if (why) {
        lapic_w(LAPIC_TIMER_INIT, 0);
        say("interrupts: off, waiting by polling (");
        puts_(why);
        puts_(")");
        nl();
        return;
    }
    lapic_w(LAPIC_LVT_TIMER, 0x20000 | VEC_TIMER); /* periodic */
    lapic_w(LAPIC_TIMER_INIT, TIMER_TICK);
    irq_mode = 1;
    say("interrupts: on, IOAPIC pin ");
    put_dec(pin);
    puts_(" vector ");
    put_hex(VEC_VIRTIO);
    puts_(", LAPIC timer tick 100 ms vector ");
    put_hex(VEC_TIMER);
    nl();
    irq_on();
    ack_interrupts(); /* an edge that came before the IOAPIC was set up is lost: catch up */
}

/* ------------------------------------------------------------------------------------------------ */
/* virtio-mem                                                                                      */

#define REQ_PLUG 0
#define REQ_UNPLUG 1
#define REQ_UNPLUG_ALL 2
#define REQ_STATE 3

#define RESP_ACK 0
#define RESP_NACK 1
#define RESP_BUSY 2
#define RESP_ERROR 3
#define RESP_NONE 0xffff    /* the device wrote no response */
#define RESP_TIMEOUT 0xfffe /* the device did not complete the request */

struct vmem_cfg {
    u64 block_size, addr, region_size, usable, plugged, requested;
    u16 node;
    u32 gen;
};

static struct vmem_cfg cfg;
static u64 mapped_end;  /* the region is mapped in [cfg.addr, mapped_end) */
static u64 map_limit;   /* cfg.addr + min(usable, MAP_CAP) */
static int map_failed;

static u64 cfg64(u32 off)
{
    u64 lo = mr(VM_CONFIG + off);
    u64 hi = mr(VM_CONFIG + off + 4);
    return lo | (hi << 32);
}

static void read_config(void)
{
    u32 g;
    do {
        g = mr(VM_CONFIG_GEN);
        cfg.block_size = cfg64(0x00);
        cfg.node = (u16)mr(VM_CONFIG + 0x08);
        cfg.addr = cfg64(0x10);
        cfg.region_size = cfg64(0x18);
        cfg.usable = cfg64(0x20);
        cfg.plugged = cfg64(0x28);
        cfg.requested = cfg64(0x30);
    } while (g != mr(VM_CONFIG_GEN));
    cfg.gen = g;
}

static void print_config(void)
{
    say("virtio-mem: region ");
    put_hex(cfg.addr);
    puts_(" size ");
    put_dec(cfg.region_size);
    puts_(" block ");
    put_dec(cfg.block_size);
    puts_(" requested ");
    put_dec(cfg.requested);
    puts_(" plugged ");
    put_dec(cfg.plugged);
    nl();
    say("virtio-mem: usable ");
    put_dec(cfg.usable);
    puts_(" node ");
    put_dec(cfg.node);
    puts_(" generation ");
    put_dec(cfg.gen);
    nl();
}

/* Maps [cfg.addr, end) (capped at map_limit) if not mapped yet. */
static void map_region_to(u64 end)
{
    if (end > map_limit)
        end = map_limit;
    if (end <= mapped_end)
        return;
    u64 a = mapped_end & ~(SZ_2M - 1);
    for (; a < end; a += SZ_2M) {
        if (map_2m(a)) {
            if (!map_failed) {
                say("virtio-mem: cannot map ");
                put_hex(a);
                puts_(" (page-table pool exhausted or address too high)");
                nl();
            }
            map_failed = 1;
            map_limit = a;
            break;
        }
    }
    mapped_end = a < end ? a : end;
    __asm__ volatile("mov %0, %%cr3" : : "r"(read_cr3()) : "memory");
}

static const char *resp_name(u32 t)
{
    switch (t) {
    case RESP_ACK: return "ACK";
    case RESP_NACK: return "NACK";
    case RESP_BUSY: return "BUSY";
    case RESP_ERROR: return "ERROR";
    case RESP_NONE: return "NONE";
    case RESP_TIMEOUT: return "TIMEOUT";
    default: return "?";
    }
}

static const char *state_name(u32 s)
{
    switch (s) {
    case 0: return "PLUGGED";
    case 1: return "UNPLUGGED";
    case 2: return "MIXED";
    default: return "?";
    }
}

struct vmem_result {
    u32 type;     /* response type, RESP_NONE or RESP_TIMEOUT */
    u32 state;    /* for STATE */
    u32 used_len; /* bytes the device says it wrote */
};

static int hostile;  /* mem-hostile: requests time out instead of waiting forever */

/* Sends one request and waits for it.  req_len: length of the request descriptor (24 normally);
 * with_resp: whether a writable response descriptor follows. */
static struct vmem_result vmem_request_raw(u16 type, u64 addr, u16 nb, u32 req_len, int with_resp)
{
    struct vmem_result r = { RESP_NONE, 0xffff, 0 };
    volatile struct vdesc *d = (volatile struct vdesc *)vq_desc_page;
    volatile struct vavail *av = (volatile struct vavail *)vq_avail_page;
    volatile struct vused *us = (volatile struct vused *)vq_used_page;
    volatile u8 *req = vq_buf_page;
    volatile u8 *resp = vq_buf_page + 64;

    for (int i = 0; i < 24; i++)
        req[i] = 0;
    *(volatile u16 *)req = type;
    *(volatile u64 *)(req + 8) = addr;
    *(volatile u16 *)(req + 16) = nb;
    for (int i = 0; i < 10; i++)
        resp[i] = 0xff;

    d[0].addr = (u64)req;
    d[0].len = req_len;
    d[0].flags = with_resp ? VRING_DESC_F_NEXT : 0;
    d[0].next = 1;
    d[1].addr = (u64)resp;
    d[1].len = 10;
    d[1].flags = VRING_DESC_F_WRITE;
    d[1].next = 0;

    av->ring[avail_idx % qsize] = 0;
    barrier();
    avail_idx++;
    av->idx = avail_idx;
    barrier();
    mw(VM_QUEUE_NOTIFY, 0);

    /* Completion: the used ring is polled; with interrupts the guest halts in between and wakes on
     * the used-buffer interrupt (or the timer tick, which also drives the time-outs). */
    u64 t0 = rdtsc();
    u32 tk = ticks;
    int warned = 0;
    for (;;) {
        if (irq_mode) {
            irq_off();
            if (us->idx != used_idx) {
                irq_on();
                break;
            }
            if (ticks == tk) {
                __asm__ volatile("sti; hlt" ::: "memory"); /* no wake-up lost between the check and hlt */
                continue;
            }
            tk = ticks;
            irq_on();
        } else {
            if (us->idx != used_idx)
                break;
            cpu_pause();
        }
        u64 dt = rdtsc() - t0;
        if (hostile && dt > (1ul << 34)) { /* ~5 s */
            r.type = RESP_TIMEOUT;
            return r;
        }
        if (!warned && dt > (1ul << 36)) { /* ~20 s */
            say_line("virtio-mem: still waiting for the device to complete a request");
            warned = 1;
        }
    }
    barrier();
    r.used_len = us->ring[used_idx % qsize].len;
    used_idx++;
    if (!irq_mode)
        ack_interrupts();
    r.type = *(volatile u16 *)resp;
    r.state = *(volatile u16 *)(resp + 8);
    return r;
}

static struct vmem_result vmem_request(u16 type, u64 addr, u16 nb)
{
    return vmem_request_raw(type, addr, nb, 24, 1);
}

/* ------------------------------------------------------------------------------------------------ */
/* Patterns in plugged memory: one word at the start and one at the end of every 2 MiB (or block)   */

#define PATTERN_KEY 0x7469646567756573ul /* "tideguest" */

static u64 pattern(u64 a)
{
    return a ^ PATTERN_KEY;
}

static u64 chunk_size(void)
{
    return cfg.block_size < SZ_2M ? cfg.block_size : SZ_2M;
}

/* After a plug: checks the range reads zero where we look (a note otherwise), writes the pattern,
 * reads it back.  Returns the number of bad words. */
static u64 pattern_fill(u64 start, u64 len)
{
    u64 end = start + len, step = chunk_size(), bad = 0, stale = 0;
    map_region_to(end);
    if (end > mapped_end)
        end = mapped_end;
    for (u64 a = start; a < end; a += step) {
        volatile u64 *lo = (volatile u64 *)a, *hi = (volatile u64 *)(a + step - 8);
        if (*lo || *hi)
            stale++;
        *lo = pattern(a);
        *hi = pattern(a + step - 8);
        if (*lo != pattern(a) || *hi != pattern(a + step - 8)) {
            if (!bad) {
                say("PATTERN FAIL after plug at ");
                put_hex(a);
                nl();
            }
            bad++;
        }
    }
    if (stale) {
        say("note: freshly plugged memory not zero in ");
        put_dec(stale);
        puts_(" chunks from ");
        put_hex(start);
        nl();
    }
    return bad;
}

/* Before an unplug: checks the pattern is still there. */
static u64 pattern_check(u64 start, u64 len)
{
    u64 end = start + len, step = chunk_size(), bad = 0;
    if (end > mapped_end)
        end = mapped_end;
    for (u64 a = start; a < end; a += step) {
        u64 lo = *(volatile u64 *)a, hi = *(volatile u64 *)(a + step - 8);
        if (lo != pattern(a) || hi != pattern(a + step - 8)) {
            if (!bad) {
                say("PATTERN FAIL before unplug at ");
                put_hex(a);
                puts_(" got ");
                put_hex(lo);
                puts_(" want ");
                put_hex(pattern(a));
                nl();
            }
            bad++;
        }
    }
    return bad;
}

/* ------------------------------------------------------------------------------------------------ */
/* Requests with their report lines                                                                */

static void print_req(const char *what, u64 addr, u32 nb, struct vmem_result r, int with_state)
{
    say(what);
    putc_(' ');
    put_hex(addr);
    puts_(" n=");
    put_dec(nb);
    puts_(" -> ");
    puts_(resp_name(r.type));
    if (r.type != RESP_NONE && r.type != RESP_TIMEOUT && r.type > RESP_ERROR)
        put_dec(r.type);
    if (with_state && r.type == RESP_ACK) {
        putc_(' ');
        puts_(state_name(r.state));
    }
    nl();
}

/* `tide.verify=0` skips the pattern write and check around plugs and unplugs (benchmarks: they
 * time the VMM, not this guest's emulated loops). Kept in .data, which is loaded, not zeroed. */
static int verify_state = -1;

static int verify_patterns(void)
{
    if (verify_state < 0)
        verify_state = !param_is("tide.verify", "0");
    return verify_state;
}

static u32 do_plug(u64 addr, u16 nb)
{
    struct vmem_result r = vmem_request(REQ_PLUG, addr, nb);
    print_req("plug", addr, nb, r, 0);
    if (r.type == RESP_ACK && verify_patterns()) {
        u64 len = (u64)nb * cfg.block_size;
        u64 bad = pattern_fill(addr, len);
        say("pattern ");
        put_hex(addr);
        puts_(" n=");
        put_dec(nb);
        puts_(bad ? " FAIL" : " ok");
        nl();
    }
    return r.type;
}

static u32 do_unplug(u64 addr, u16 nb)
{
    u64 bad = verify_patterns() ? pattern_check(addr, (u64)nb * cfg.block_size) : 0;
    if (bad) {
        say("pattern before unplug FAIL in ");
        put_dec(bad);
        puts_(" chunks");
        nl();
    }
    struct vmem_result r = vmem_request(REQ_UNPLUG, addr, nb);
    print_req("unplug", addr, nb, r, 0);
    return r.type;
}

static u32 do_unplug_all(void)
{
    struct vmem_result r = vmem_request(REQ_UNPLUG_ALL, 0, 0);
    say("unplug-all -> ");
    puts_(resp_name(r.type));
    nl();
    return r.type;
}

/* ------------------------------------------------------------------------------------------------ */
/* Device discovery and initialisation                                                             */

/* Finds the first virtio_mmio.device= on the command line that is a virtio-mem device (ID 24). */
static int find_device(void)
{
    const char *p = cmdline, *v;
    while ((v = find_param_from(p, "virtio_mmio.device"))) {
        p = v;
        const char *q = v;
        u64 size = parse_num(&q, 1), base = 0, irq = 0;
        if (*q == '@') {
            q++;
            base = parse_num(&q, 0);
        }
        if (*q == ':') {
            q++;
            irq = parse_num(&q, 0);
        }
        say("virtio-mmio: device at ");
        put_hex(base);
        puts_(" size ");
        put_hex(size);
        puts_(" irq ");
        put_dec(irq);
        if (!size || !base || base >= (4ul << 30)) {
            puts_(": not usable (must lie in the first 4 GiB)");
            nl();
            continue;
        }
        u64 b = base;
        u32 magic = *(volatile u32 *)b, ver = *(volatile u32 *)(b + 4), id = *(volatile u32 *)(b + 8);
        puts_(" magic ");
        put_hex(magic);
        puts_(" version ");
        put_dec(ver);
        puts_(" id ");
        put_dec(id);
        nl();
        if (magic != 0x74726976u || ver != 2 || id != 24)
            continue;
        mmio = b;
        mmio_irq = irq;
        return 1;
    }
    return 0;
}

__attribute__((noreturn)) static void fail(const char *why)
{
    say("virtio-mem: FAIL: ");
    puts_(why);
    nl();
    if (mmio)
        mw(VM_STATUS, mr(VM_STATUS) | ST_FAILED);
    power_off();
}

static void device_init(void)
{
    mw(VM_STATUS, 0);
    for (int i = 0; mr(VM_STATUS) != 0; i++) { /* the reset may complete asynchronously */
        if (i == 100)
            fail("reset did not clear the status");
        delay_tsc(1ul << 20);
    }
    mw(VM_STATUS, ST_ACK);
    mw(VM_STATUS, ST_ACK | ST_DRIVER);

    mw(VM_DEV_FEATURES_SEL, 0);
    u64 dev_features = mr(VM_DEV_FEATURES);
    mw(VM_DEV_FEATURES_SEL, 1);
    dev_features |= (u64)mr(VM_DEV_FEATURES) << 32;
    u64 drv = 0;
    if (dev_features & (1ul << VIRTIO_F_VERSION_1))
        drv |= 1ul << VIRTIO_F_VERSION_1;
    if ((dev_features & (1ul << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE)) && !param_is("tide.accept_inaccessible", "0"))
        drv |= 1ul << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE;
    say("virtio-mem: device features ");
    put_hex(dev_features);
    puts_(" driver features ");
    put_hex(drv);
    nl();
    if (!(drv & (1ul << VIRTIO_F_VERSION_1)))
        fail("device does not offer VIRTIO_F_VERSION_1");
    mw(VM_DRV_FEATURES_SEL, 0);
    mw(VM_DRV_FEATURES, (u32)drv);
    mw(VM_DRV_FEATURES_SEL, 1);
    mw(VM_DRV_FEATURES, (u32)(drv >> 32));
    mw(VM_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK);
    u32 st = mr(VM_STATUS);
    if (!(st & ST_FEATURES_OK)) {
        say("virtio-mem: FEATURES_OK not accepted, status ");
        put_hex(st);
        nl();
        fail("feature negotiation");
    }

    mw(VM_QUEUE_SEL, 0);
    if (mr(VM_QUEUE_READY))
        fail("queue 0 already ready after reset");
    u32 max = mr(VM_QUEUE_NUM_MAX);
    if (!max)
        fail("queue 0 not available");
    qsize = max < QSIZE ? (u16)max : QSIZE;
    mw(VM_QUEUE_NUM, qsize);
    for (int i = 0; i < 4096; i += 8) {
        *(volatile u64 *)(vq_desc_page + i) = 0;
        *(volatile u64 *)(vq_avail_page + i) = 0;
        *(volatile u64 *)(vq_used_page + i) = 0;
    }
    mw(VM_QUEUE_DESC, (u32)(u64)vq_desc_page);
    mw(VM_QUEUE_DESC + 4, (u32)((u64)vq_desc_page >> 32));
    mw(VM_QUEUE_DRIVER, (u32)(u64)vq_avail_page);
    mw(VM_QUEUE_DRIVER + 4, (u32)((u64)vq_avail_page >> 32));
    mw(VM_QUEUE_DEVICE, (u32)(u64)vq_used_page);
    mw(VM_QUEUE_DEVICE + 4, (u32)((u64)vq_used_page >> 32));
    mw(VM_QUEUE_READY, 1);
    avail_idx = used_idx = 0;
    mw(VM_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
    st = mr(VM_STATUS);
    say("virtio-mem: ready, queue size ");
    put_dec(qsize);
    puts_(" status ");
    put_hex(st);
    nl();
    if (st & (ST_NEEDS_RESET | ST_FAILED))
        fail("device needs reset after DRIVER_OK");

    read_config();
    print_config();
    if (!cfg.block_size || (cfg.block_size & (cfg.block_size - 1)) || (cfg.addr & (cfg.block_size - 1)))
        fail("bad block size or region address");
    u64 cap = cfg.usable < MAP_CAP ? cfg.usable : MAP_CAP;
    mapped_end = cfg.addr;
    map_limit = cfg.addr + cap;
}

static void warn_no_config_irq(void)
{
    say_line("virtio-mem: WARN config generation changed without a config interrupt");
}

/* Waits for a config change (InterruptStatus bit 1; one seen since the last wait counts).
 * With interrupts (irq_mode): `cli; check; sti; hlt` until the handler has seen bit 1; every timer
 * tick (100 ms) reads the config generation, and a generation that has changed for two ticks with no
 * config interrupt is reported and followed, so that a lost interrupt shows up as a warning line
 * instead of a hang.  Polling (no interrupts): reads InterruptStatus every ~2-4 ms (2^23 TSC cycles),
 * with the same generation check every 16 polls. */
static void wait_config_change(void)
{
    if (irq_mode) {
        u32 tk = ticks, changed_ticks = 0;
        for (;;) {
            irq_off();
            if (isr_seen & 2) {
                isr_seen &= ~2u;
                irq_on();
                return;
            }
            if (ticks == tk) {
                __asm__ volatile("sti; hlt" ::: "memory"); /* no wake-up lost between the check and hlt */
                continue;
            }
            tk = ticks;
            irq_on();
            if (mr(VM_CONFIG_GEN) == cfg.gen) {
                changed_ticks = 0;
                continue;
            }
            if (++changed_ticks < 2) /* an interrupt may be on its way: give it one more tick */
                continue;
            ack_interrupts();
            take_isr(2);
            warn_no_config_irq();
            return;
        }
    }
    for (u32 i = 1;; i++) {
        if (take_isr(2))
            return;
        delay_tsc(1ul << 23);
        ack_interrupts();
        if (isr_seen & 2)
            continue;
        if ((i & 15) == 0 && mr(VM_CONFIG_GEN) != cfg.gen) {
            warn_no_config_irq();
            return;
        }
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Scenarios                                                                                       */

static void unplug_all_if_needed(void)
{
    if (cfg.plugged) {
        if (do_unplug_all() != RESP_ACK)
            fail("UNPLUG_ALL not acknowledged");
        read_config();
        if (cfg.plugged)
            fail("plugged size not 0 after UNPLUG_ALL");
    }
}

/* Follows requested_size in whole blocks, like Linux's driver (plugged blocks stay contiguous from
 * the region start: plug upwards, unplug from the top). */
__attribute__((noreturn)) static void scenario_follow(void)
{
    int exit_at_zero = param_is("tide.exit_at_zero", "1"), seen_nonzero = 0, retries = 0;
    u64 nplugged = 0, max_n = 0xffff;
    const char *chunk = find_param("tide.chunk");
    if (chunk) {
        u64 c = parse_num(&chunk, 1) / cfg.block_size;
        if (c && c < max_n)
            max_n = c;
    }
    u64 last_plugged = ~0ul, last_requested = ~0ul;

    unplug_all_if_needed();
    for (;;) {
        read_config();
        /* usable_region_size follows requested_size: read it again with every config read. */
        u64 usable_blocks = cfg.usable / cfg.block_size;
        if (cfg.requested)
            seen_nonzero = 1;
        u64 target = cfg.requested / cfg.block_size;
        if (target > usable_blocks)
            target = usable_blocks;

        if (nplugged != target) {
            u64 n;
            u32 t;
            if (nplugged < target) {
                n = target - nplugged;
                if (n > max_n)
                    n = max_n;
                t = do_plug(cfg.addr + nplugged * cfg.block_size, (u16)n);
                if (t == RESP_ACK)
                    nplugged += n;
            } else {
                n = nplugged - target;
                if (n > max_n)
                    n = max_n;
                t = do_unplug(cfg.addr + (nplugged - n) * cfg.block_size, (u16)n);
                if (t == RESP_ACK)
                    nplugged -= n;
            }
            if (t == RESP_ACK) {
                retries = 0;
                continue;
            }
            if (t == RESP_NACK && retries++ < 3) /* Linux retries at once: the config may have changed */
                continue;
            if (t == RESP_NACK || t == RESP_BUSY) {
                retries = 0;
                wait_config_change();
                continue;
            }
            fail("request failed");
        }

        if (cfg.plugged != nplugged * cfg.block_size) {
            say("virtio-mem: MISMATCH device plugged ");
            put_dec(cfg.plugged);
            puts_(" guest ");
            put_dec(nplugged * cfg.block_size);
            nl();
        }
        if (cfg.plugged != last_plugged || cfg.requested != last_requested) {
            say("plugged ");
            put_dec(cfg.plugged);
            puts_(" requested ");
            put_dec(cfg.requested);
            nl();
            last_plugged = cfg.plugged;
            last_requested = cfg.requested;
        }
        if (exit_at_zero && seen_nonzero && !cfg.requested && !cfg.plugged) {
            say_line("requested and plugged are 0: exiting");
            power_off();
        }
        wait_config_change();
    }
}

static void hostile_req(const char *name, u16 type, u64 addr, u16 nb, u32 req_len, int with_resp)
{
    struct vmem_result r = vmem_request_raw(type, addr, nb, req_len, with_resp);
    say("hostile ");
    puts_(name);
    puts_(": type ");
    put_dec(type);
    putc_(' ');
    put_hex(addr);
    puts_(" n=");
    put_dec(nb);
    puts_(" -> ");
    puts_(resp_name(r.type));
    if (r.type != RESP_NONE && r.type != RESP_TIMEOUT && r.type > RESP_ERROR)
        put_dec(r.type);
    if (type == REQ_STATE && r.type == RESP_ACK) {
        putc_(' ');
        puts_(state_name(r.state));
    }
    puts_(" len=");
    put_dec(r.used_len);
    nl();
    if (r.type == RESP_TIMEOUT) {
        say_line("hostile: the device did not complete the request: giving up");
        power_off();
    }
}

__attribute__((noreturn)) static void scenario_hostile(void)
{
    u64 a = cfg.addr, bs = cfg.block_size, u = cfg.usable;
    hostile = 1;
    unplug_all_if_needed();
    if (u < 2 * bs || cfg.requested < bs)
        say_line("hostile: note: needs usable >= 2 blocks and requested >= 1 block");
    hostile_req("misaligned", REQ_PLUG, a + (bs > 4096 ? 4096 : bs / 2), 1, 24, 1);
    hostile_req("beyond-region", REQ_PLUG, a + u, 1, 24, 1);
    hostile_req("zero-blocks", REQ_PLUG, a, 0, 24, 1);
    hostile_req("past-end", REQ_PLUG, a + u - bs, 2, 24, 1);
    hostile_req("past-requested", REQ_PLUG, a + u - bs, 0xffff, 24, 1); /* NACK first, whatever the range */
    hostile_req("plug", REQ_PLUG, a, 1, 24, 1);
    hostile_req("double-plug", REQ_PLUG, a, 1, 24, 1);
    hostile_req("unplug-unplugged", REQ_UNPLUG, a + bs, 1, 24, 1);
    hostile_req("unknown-type", 7, a, 1, 24, 1);
    hostile_req("state-plugged", REQ_STATE, a, 1, 24, 1);
    hostile_req("state-unplugged", REQ_STATE, a + bs, 1, 24, 1);
    hostile_req("state-mixed", REQ_STATE, a, 2, 24, 1);
    hostile_req("short-request", REQ_PLUG, a + bs, 1, 4, 1);
    hostile_req("no-writable", REQ_PLUG, a + bs, 1, 24, 0);
    u32 st = mr(VM_STATUS);
    if (st & (ST_NEEDS_RESET | ST_FAILED)) {
        say("hostile: device status ");
        put_hex(st);
        nl();
    }
    hostile_req("unplug", REQ_UNPLUG, a, 1, 24, 1);
    read_config();
    say("hostile: plugged ");
    put_dec(cfg.plugged);
    nl();
    u32 t = do_plug(a, 1);
    say(t == RESP_ACK ? "hostile final plug ACK" : "hostile final plug FAIL");
    nl();
    say_line("hostile done");
    power_off();
}

__attribute__((noreturn)) static void scenario_touch_unplugged(void)
{
    unplug_all_if_needed();
    u64 a = cfg.addr;
    if (map_2m(a))
        fail("cannot map the region");
    __asm__ volatile("mov %0, %%cr3" : : "r"(read_cr3()) : "memory");
    say("touching unplugged ");
    put_hex(a);
    nl();
    u64 v = *(volatile u64 *)a;
    say("read unplugged ");
    put_hex(a);
    puts_(" = ");
    put_hex(v);
    puts_(" (the guest was not stopped)");
    nl();
    power_off();
}

__attribute__((noreturn)) static void scenario_busy(void)
{
    unplug_all_if_needed();
    u64 n = cfg.requested / cfg.block_size, ub = cfg.usable / cfg.block_size;
    if (n > ub)
        n = ub;
    if (n > 0xffff)
        n = 0xffff;
    if (!n)
        fail("mem-busy needs requested >= 1 block");
    if (do_plug(cfg.addr, (u16)n) == RESP_BUSY) {
        /* No resize comes: the device's retry timer must tell us when to try again. */
        wait_config_change();
        say_line("config change after BUSY");
    }
    do_plug(cfg.addr, 1);
    read_config();
    say("plugged ");
    put_dec(cfg.plugged);
    puts_(" requested ");
    put_dec(cfg.requested);
    nl();
    power_off();
}

/* A device reset with memory plugged (Linux: driver unbind, kexec): the plug state survives it,
 * and the re-initialised driver finds plugged_size != 0 and sends UNPLUG_ALL, as Linux's does. */
__attribute__((noreturn)) static void scenario_reset(void)
{
    unplug_all_if_needed();
    u64 n = cfg.requested / cfg.block_size;
    if (!n || n > 0xffff)
        fail("mem-reset needs 1..65535 requested blocks");
    if (do_plug(cfg.addr, (u16)n) != RESP_ACK)
        fail("plug before reset");
    device_init();
    say("after reset plugged ");
    put_dec(cfg.plugged);
    nl();
    struct vmem_result r = vmem_request(REQ_STATE, cfg.addr, (u16)n);
    print_req("state after reset", cfg.addr, (u32)n, r, 1);
    unplug_all_if_needed();
    say("after UNPLUG_ALL plugged ");
    put_dec(cfg.plugged);
    nl();
    power_off();
}

/* Reads every 4 KiB page of the first unplugged block (a driver without
 * VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE may), then follows requested_size so that the host can
 * look at its resident memory. */
__attribute__((noreturn)) static void scenario_read_unplugged(void)
{
    unplug_all_if_needed();
    u64 a = cfg.addr, sum = 0;
    if (map_2m(a))
        fail("cannot map the region");
    __asm__ volatile("mov %0, %%cr3" : : "r"(read_cr3()) : "memory");
    for (u64 off = 0; off < (2ul << 20); off += 4096)
        sum += *(volatile u64 *)(a + off);
    say("read unplugged block ");
    put_hex(a);
    puts_(" sum ");
    put_hex(sum);
    nl();
    scenario_follow();
}

/* Makes the device log as fast as it can: an invalid (misaligned) PLUG and an out-of-order
 * status write per round, for ever.  Every 1024 rounds it prints how many requests were answered,
 * so a host test sees that the device keeps answering whatever happens to Tide's log. */
__attribute__((noreturn)) static void scenario_log_flood(void)
{
    u64 a = cfg.addr, bs = cfg.block_size;
    hostile = 1;
    say_line("log-flood: flooding the device with invalid requests");
    for (u64 n = 1;; n++) {
        struct vmem_result r = vmem_request(REQ_PLUG, a + (bs > 4096 ? 4096 : bs / 2), 1);
        if (r.type != RESP_ERROR) {
            say("log-flood: unexpected answer ");
            puts_(resp_name(r.type));
            nl();
            power_off();
        }
        mw(VM_STATUS, ST_ACK); /* clears bits: refused and logged by the transport */
        if (!(n % 1024)) {
            say("log-flood: ");
            put_dec(n);
            puts_(" requests answered");
            nl();
        }
    }
}

static void virtio_mem_main(void)
{
    int want = param_is("tide.test", "mem-follow") || param_is("tide.test", "mem-hostile") ||
               param_is("tide.test", "mem-touch-unplugged") || param_is("tide.test", "mem-busy") ||
               param_is("tide.test", "mem-reset") || param_is("tide.test", "mem-read-unplugged") ||
               param_is("tide.test", "mem-log-flood") || param_is("tide.test", "mem-failed");
    if (!find_device()) {
        if (want)
            fail("no virtio-mem device (virtio_mmio.device=) on the command line");
        return;
    }
    if (param_is("tide.test", "mem-failed")) {
        /* A driver that gives up during its probe, as Linux's does when the probe fails. */
        mw(VM_STATUS, 0);
        mw(VM_STATUS, ST_ACK);
        mw(VM_STATUS, ST_ACK | ST_DRIVER);
        say_line("virtio-mem: driver gives up: status FAILED");
        mw(VM_STATUS, ST_ACK | ST_DRIVER | ST_FAILED);
        power_off();
    }
    irq_init(mmio_irq);
    device_init();
    if (param_is("tide.test", "mem-hostile"))
        scenario_hostile();
    if (param_is("tide.test", "mem-touch-unplugged"))
        scenario_touch_unplugged();
    if (param_is("tide.test", "mem-busy"))
        scenario_busy();
    if (param_is("tide.test", "mem-reset"))
        scenario_reset();
    if (param_is("tide.test", "mem-read-unplugged"))
        scenario_read_unplugged();
    if (param_is("tide.test", "mem-log-flood"))
        scenario_log_flood();
    scenario_follow();
}

/* ------------------------------------------------------------------------------------------------ */

void guest_main(u64 boot_params)
{
    say_line("hello");
    idt_init();

    u32 cmd = rd32(boot_params + 0x228);
    if (cmd)
        cmdline = (const char *)(u64)cmd;
    say("cmdline: ");
    puts_(cmdline);
    nl();

    say("cpus: ");
    put_dec(mp_cpu_count());
    nl();

    report_e820(boot_params);

    const char *exit_code = find_param("tide.exit");
    if (exit_code) {
        u64 n = parse_num(&exit_code, 0);
        say("debug-exit ");
        put_dec(n);
        nl();
        outb(0xf4, (u8)n);
        say_line("debug-exit returned (the VM was not stopped)");
        power_off();
    }
    if (param_is("tide.test", "hang")) {
        say_line("hanging (hlt with interrupts off)");
        halt_forever();
    }
    if (param_is("tide.test", "flood")) {
        say_line("flooding the console");
        for (;;)
            puts_("tide-guest: flood flood flood flood flood flood flood flood flood flood flood\n");
    }
    if (param_is("tide.test", "triple")) {
        say_line("triple fault");
        triple_fault();
    }

    virtio_mem_main();

    say_line("power off");
    power_off();
}

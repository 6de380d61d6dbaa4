/*
 * Entry point of Tide's freestanding test guest (see guest.ld and guest.c).
 *
 * Entered in 64-bit long mode at CPL0 with interrupts off, RSI = boot_params (0x7000),
 * RSP = 0x8ff0 (not used: we switch to our own stack first thing).
 */
    .code64

    .section .text.start, "ax", @progbits
    .globl _start
    .type _start, @function
_start:
    cli
    cld
    /* Only one vCPU runs the test: should a VMM start more than one at the entry point (it should
     * not: APs wait for INIT/SIPI), the first one through wins and the others park here. */
    movl    $1, %eax
    lock xchgl %eax, started(%rip)
    testl   %eax, %eax
    jnz     park
    movq    %rsi, %r12              /* boot_params */
    leaq    stack_top(%rip), %rsp
    /* Zero .bss (small: the big page pools live in .pool and are cleared on use). */
    leaq    __bss_start(%rip), %rdi
    leaq    __bss_end(%rip), %rcx
    subq    %rdi, %rcx
    shrq    $3, %rcx
    xorl    %eax, %eax
    rep stosq
    movq    %r12, %rdi
    call    guest_main
park:
    cli
    hlt
    jmp     park
    .size _start, . - _start

/*
 * Interrupt and exception entry: one 16-byte stub per vector (isr_stubs + 16 * vector, so guest.c can
 * fill the IDT with a loop), each pushing a dummy error code where the CPU pushes none, then the vector,
 * then jumping to isr_common.  isr_common saves the caller-saved registers (the C code is built with
 * -mgeneral-regs-only -mno-red-zone, so nothing else can be clobbered and an interrupt cannot overwrite
 * live stack data), calls `u32 isr_dispatch(u64 vector, u64 *frame)` with RSP 16-byte aligned, sends the
 * LAPIC EOI when it returns non-zero (not for the spurious vector) and returns with iretq.
 * Stack at the call: frame[0..8] = r11 r10 r9 r8 rdi rsi rdx rcx rax, frame[9] = vector,
 * frame[10] = error code, frame[11] = RIP, frame[12] = CS, frame[13] = RFLAGS, frame[14] = RSP.
 */
    .section .text, "ax", @progbits
    .globl isr_stubs
    .balign 16
isr_stubs:
    .set vec, 0
    .rept 256
1:
    .if vec == 8 || (vec >= 10 && vec <= 14) || vec == 17 || vec == 21 || vec == 29 || vec == 30
    pushq   $vec                    /* the CPU pushed an error code */
    .else
    pushq   $0
    pushq   $vec
    .endif
    jmp     isr_common
    .org    1b + 16                 /* pads to 16 bytes; an error if a stub were longer */
    .set vec, vec + 1
    .endr

isr_common:
    /* Entry RSP was 16-byte aligned before the CPU's 5 pushes; +2 (vector, error code) +9 = 16 qwords. */
    pushq   %rax
    pushq   %rcx
    pushq   %rdx
    pushq   %rsi
    pushq   %rdi
    pushq   %r8
    pushq   %r9
    pushq   %r10
    pushq   %r11
    cld
    movq    72(%rsp), %rdi          /* vector */
    movq    %rsp, %rsi              /* frame */
    call    isr_dispatch
    testl   %eax, %eax
    jz      1f
    movl    $0xfee000b0, %edx       /* LAPIC EOI (via a register: a disp32 would be sign-extended) */
    movl    $0, (%rdx)
1:
    popq    %r11
    popq    %r10
    popq    %r9
    popq    %r8
    popq    %rdi
    popq    %rsi
    popq    %rdx
    popq    %rcx
    popq    %rax
    addq    $16, %rsp               /* vector, error code */
    iretq

    /* Keeps .data (and so the "data" PT_LOAD segment) non-empty: see guest.ld. */
    .section .data, "aw", @progbits
    .globl guest_marker
    .balign 8
guest_marker:
    .ascii  "TIDEGST\0"
started:
    .long   0

    .section .pool, "aw", @nobits
    .balign 4096
    .globl stack_bottom, stack_top
stack_bottom:
    .skip   16384
stack_top:
    /* Virtqueue: descriptor table, driver (avail) ring, device (used) ring, request/response buffers. */
    .globl vq_desc_page, vq_avail_page, vq_used_page, vq_buf_page
vq_desc_page:
    .skip   4096
vq_avail_page:
    .skip   4096
vq_used_page:
    .skip   4096
vq_buf_page:
    .skip   4096
    /* Page-table pages for mapping the hotplug region: 64 page directories (64 GiB of 2 MiB pages)
     * plus slack for an unaligned region start and PDPTs when the region lies beyond 512 GiB. */
    .globl pt_pool
pt_pool:
    .skip   4096 * 68
    /* The IDT: 256 16-byte gates, all written by idt_init() in guest.c. */
    .globl idt
idt:
    .skip   4096

    .section .note.GNU-stack, "", @progbits

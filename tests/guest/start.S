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

    .section .note.GNU-stack, "", @progbits

//! Boot code, descriptor tables and the ring-0 handlers (assembly).
//!
//! Guest ring-0 code is instruction-emulated on PVM hosts (~1 µs per
//! instruction), so everything that runs at CPL 0 is a few lines of assembly:
//!
//! - `pvh_start32`: the PVH entry (32-bit protected mode, paging off,
//!   `ebx` = `hvm_start_info`): loads the GDT, enables PAE + long mode with the
//!   static page tables below, loads the TSS and IDT and drops to ring 3
//!   (`iretq`) at `user_entry`, which calls [`crate::guest_main`].
//! - `guest_irq_entry` (vector [`crate::IRQ_VECTOR`]): `rdtsc` as its first
//!   instruction, stores the TSC and bumps a counter, EOIs the LAPIC. It saves
//!   no registers: the ring-3 code only lets interrupts in (through the LAPIC
//!   TPR) inside a wait loop that keeps nothing in `rax`/`rdx`.
//! - `guest_syscall_entry` (the #UD vector, entered by `ud2` from ring 3
//!   with a magic `rax`): ring 3 cannot do port I/O on PVM (guest ring 3 runs
//!   with IOPL 0 whatever RFLAGS says), so serial output and power-off go
//!   through ring 0. (`int 0x80` through a DPL-3 gate is no option either:
//!   PVM turns a guest ring-3 `int 0x80` into #UD.)
//! - `guest_fault_stubs`: one 16-byte stub per vector that pushes its number
//!   and calls [`crate::guest_fault`].
//!
//! Page tables: 4 GiB identity map with 2 MiB pages, all user-accessible (the
//! the guest's ring-3 code touches the virtio-mmio window, the IOAPIC and the
//! LAPIC directly); the top GiB (MMIO) is mapped uncached.

core::arch::global_asm!(
    r#"
    .pushsection .note.pvh, "a"
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4
    .popsection

    .pushsection .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, guest_start_info
    lgdt guest_gdt_ptr
    /* CR4: PAE | OSFXSR | OSXMMEXCPT */
    movl $0x620, %eax
    movl %eax, %cr4
    movl $guest_pml4, %eax
    movl %eax, %cr3
    /* EFER.LME */
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    /* CR0: PG | WP | NE | MP | PE */
    movl $0x80010023, %eax
    movl %eax, %cr0
    ljmp $0x08, $1f

    .code64
1:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movq $guest_kstack_top, %rsp
    /* 64-bit TSS descriptor (available, present) for guest_tss < 4 GiB */
    movq $guest_tss, %rax
    movq %rax, %rdx
    andq $0xffffff, %rdx
    shlq $16, %rdx
    movq %rax, %rcx
    shrq $24, %rcx
    shlq $56, %rcx
    orq %rcx, %rdx
    movabsq $0x0000890000000067, %rcx
    orq %rcx, %rdx
    movq %rdx, guest_gdt + 0x28
    movw $0x28, %ax
    ltr %ax
    lidt guest_idt_ptr
    /* to ring 3: SS, RSP, RFLAGS (IF set; the LAPIC is still disabled), CS, RIP */
    pushq $0x23
    pushq $guest_ustack_top
    pushq $0x202
    pushq $0x1b
    pushq $user_entry
    iretq

user_entry:
    call guest_main
2:
    jmp 2b

    .balign 16
    .global guest_irq_entry
guest_irq_entry:
    rdtsc
    movl %eax, GUEST_IRQ_TSC
    movl %edx, GUEST_IRQ_TSC + 4
    incq GUEST_IRQ_COUNT
    movl $0xfee000b0, %eax
    movl $0, (%rax)
    iretq

    .balign 16
    .global guest_spurious_entry
guest_spurious_entry:
    iretq

    /* #UD (vector 6) doubles as the service gate: `ud2` from ring 3 with
     * rax = 0x50520001: write rcx bytes at rsi to COM1 (clobbers rax, rcx,
     * rdx, rsi, r8); rax = 0x50520002: power off (never returns); 0x50520003:
     * one port access; 0x50520004: idle (never returns). Any other #UD is a
     * fault. */
    .balign 16
    .global guest_syscall_entry
guest_syscall_entry:
    cmpq $0x50520001, %rax
    je 3f
    cmpq $0x50520002, %rax
    je 6f
    cmpq $0x50520003, %rax
    je 10f
    cmpq $0x50520004, %rax
    je 14f
    pushq $6
    jmp guest_fault_common
3:
    /* resume after the 2-byte ud2 */
    addq $2, (%rsp)
    testq %rcx, %rcx
    jz 5f
4:
    /* wait for THRE (TX FIFO empty), then send up to 16 bytes */
    movw $0x3fd, %dx
    inb %dx, %al
    testb $0x20, %al
    jz 4b
    movl $16, %r8d
    movw $0x3f8, %dx
7:
    movb (%rsi), %al
    outb %al, %dx
    incq %rsi
    decq %rcx
    jz 5f
    decl %r8d
    jnz 7b
    jmp 4b
5:
    iretq

6:
    /* evmm: ACPI sleep control port 0x600, SLP_TYP 5 | SLP_EN */
    movw $0x600, %dx
    movb $0x34, %al
    outb %al, %dx
    /* QEMU microvm: ACPI GED sleep control register (MMIO) */
    movl $0xfea00200, %eax
    movb $0x34, (%rax)
    /* i8042 pulse reset */
    movb $0xfe, %al
    outb %al, $0x64
    /* triple fault: no IDT, then a #GP (non-canonical address) */
    lidt guest_null_idt_ptr
    movabsq $0x8000000000000000, %rax
    movq (%rax), %rax
8:
    hlt
    jmp 8b

    /* rax = 0x50520003: one port access (chaos mode's sweeps; ring 3 picks
     * the port and keeps off the serial, i8042 and ACPI sleep ports):
     * dx = port, ecx = 0/1/2 in byte/word/dword, 4/5/6 out byte/word/dword
     * of esi; the value read comes back in rax (clobbers rax). */
10:
    addq $2, (%rsp)
    movl %esi, %eax
    cmpl $1, %ecx
    je 11f
    cmpl $2, %ecx
    je 12f
    cmpl $4, %ecx
    je 13f
    cmpl $5, %ecx
    je 15f
    cmpl $6, %ecx
    je 16f
    inb %dx, %al
    iretq
11:
    inw %dx, %ax
    iretq
12:
    inl %dx, %eax
    iretq
13:
    outb %al, %dx
    iretq
15:
    outw %ax, %dx
    iretq
16:
    outl %eax, %dx
    iretq

    /* rax = 0x50520004: idle for good (hlt with interrupts off: the vCPU
     * sleeps in KVM until the VMM stops it). */
14:
    hlt
    jmp 14b

    /* One 16-byte stub per vector: push the vector, go to the common path. */
    .balign 16
    .global guest_fault_stubs
guest_fault_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    pushq $vec
    jmp guest_fault_common
    .set vec, vec + 1
    .endr

guest_fault_common:
    movq (%rsp), %rdi
    leaq 8(%rsp), %rsi
    andq $-16, %rsp
    call guest_fault
9:
    jmp 9b
    .popsection

    /* The second vCPU's way in (chaos mode). `guest_ap_tramp` ..
     * `guest_ap_tramp_end` is copied to AP_TRAMP_BASE (below 1 MiB) and the
     * AP is started there by INIT/SIPI in real mode: its own small GDT,
     * protected mode, the same page tables and long mode as the boot vCPU,
     * then `guest_ap_entry64` in the image. */
    .pushsection .text.ap, "ax"
    .set AP_TRAMP_BASE, 0x10000
    .code16
    .global guest_ap_tramp
guest_ap_tramp:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (ap_gdt_ptr - guest_ap_tramp)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $(AP_TRAMP_BASE + ap_pm32 - guest_ap_tramp)
    .code32
ap_pm32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $0x620, %eax
    movl %eax, %cr4
    movl $guest_pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl $0x80010023, %eax
    movl %eax, %cr0
    ljmp $0x18, $(AP_TRAMP_BASE + ap_lm64 - guest_ap_tramp)
    .code64
ap_lm64:
    movq $guest_ap_entry64, %rax
    jmp *%rax
    .balign 8
ap_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00af9a000000ffff
ap_gdt_ptr:
    .word 31
    .long AP_TRAMP_BASE + ap_gdt - guest_ap_tramp
    .global guest_ap_tramp_end
guest_ap_tramp_end:

    /* 64-bit, ring 0, on the AP: the boot vCPU's GDT and IDT, a TSS of its
     * own (GDT entry 0x38), then ring 3 at `guest_ap_main`. */
guest_ap_entry64:
    lgdt guest_gdt_ptr
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movq $guest_ap_kstack_top, %rsp
    pushq $0x08
    movq $22f, %rax
    pushq %rax
    lretq
22:
    movq $guest_ap_tss, %rax
    movq %rax, %rdx
    andq $0xffffff, %rdx
    shlq $16, %rdx
    movq %rax, %rcx
    shrq $24, %rcx
    shlq $56, %rcx
    orq %rcx, %rdx
    movabsq $0x0000890000000067, %rcx
    orq %rcx, %rdx
    movq %rdx, guest_gdt + 0x38
    movw $0x38, %ax
    ltr %ax
    lidt guest_idt_ptr
    pushq $0x23
    pushq $guest_ap_ustack_top
    pushq $0x202
    pushq $0x1b
    pushq $ap_user_entry
    iretq
ap_user_entry:
    call guest_ap_main
23:
    jmp 23b
    .popsection

    .pushsection .data.guest_tables, "aw"
    .balign 4096
    .global guest_pml4
guest_pml4:
    .quad guest_pdpt + 7
    .fill 511, 8, 0
guest_pdpt:
    .quad guest_pd + 7
    .quad guest_pd + 0x1000 + 7
    .quad guest_pd + 0x2000 + 7
    .quad guest_pd + 0x3000 + 7
    .fill 508, 8, 0
guest_pd:
    .set page, 0
    .rept 2048
    .if page >= 1536
    /* P | RW | US | PWT | PCD | PS */
    .quad (page << 21) | 0x9f
    .else
    /* P | RW | US | PS */
    .quad (page << 21) | 0x87
    .endif
    .set page, page + 1
    .endr

    .balign 16
    .global guest_gdt
guest_gdt:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
    .quad 0x00affb000000ffff
    .quad 0x00cff3000000ffff
    .quad 0
    .quad 0
    .quad 0
    .quad 0
guest_gdt_end:
    .balign 16
guest_gdt_ptr:
    .word guest_gdt_end - guest_gdt - 1
    .quad guest_gdt
    .balign 16
guest_idt_ptr:
    .word 256 * 16 - 1
    .quad guest_idt
    .balign 16
guest_null_idt_ptr:
    .word 0
    .quad 0

    .balign 16
guest_tss:
    .long 0
    .quad guest_kstack_top
    .fill 11, 8, 0
    .word 0
    .word 0x68

    .balign 16
guest_ap_tss:
    .long 0
    .quad guest_ap_kstack_top
    .fill 11, 8, 0
    .word 0
    .word 0x68

    .balign 8
    .global guest_start_info
guest_start_info:
    .quad 0
    .global GUEST_IRQ_COUNT
GUEST_IRQ_COUNT:
    .quad 0
    .global GUEST_IRQ_TSC
GUEST_IRQ_TSC:
    .quad 0
    .popsection

    .pushsection .bss.guest_stacks, "aw", @nobits
    .balign 4096
    .global guest_idt
guest_idt:
    .skip 4096
guest_kstack:
    .skip 16384
guest_kstack_top:
guest_ustack:
    .skip 65536
guest_ustack_top:
guest_ap_kstack:
    .skip 16384
guest_ap_kstack_top:
guest_ap_ustack:
    .skip 65536
guest_ap_ustack_top:
    .popsection
"#,
    options(att_syntax)
);

extern "C" {
    /// Physical address of `hvm_start_info` (from `ebx` at the PVH entry).
    pub static guest_start_info: u64;
    /// Interrupts taken on [`crate::IRQ_VECTOR`].
    pub static GUEST_IRQ_COUNT: u64;
    /// TSC at the last interrupt handler entry.
    pub static GUEST_IRQ_TSC: u64;
    /// The 256-entry IDT (filled by ring 3 before the LAPIC is enabled).
    pub static mut guest_idt: [u64; 512];
    /// First byte past the loaded image (end of `.bss`, from `linker.ld`).
    pub static guest_image_end: u8;
    /// The AP trampoline (copied below 1 MiB), and its end.
    pub static guest_ap_tramp: u8;
    /// End of the AP trampoline.
    pub static guest_ap_tramp_end: u8;
    /// Handlers.
    pub static guest_irq_entry: u8;
    pub static guest_spurious_entry: u8;
    pub static guest_syscall_entry: u8;
    pub static guest_fault_stubs: u8;
}

//! `evmm-notify-floor`: the raw KVM floor of the guest notify path.
//!
//! A minimal program that drives `/dev/kvm` directly (no VMM, no virtio):
//! it creates a VM with the in-kernel irqchip, a single vCPU that starts
//! directly in 64-bit long mode at CPL 3 (set up through `KVM_SET_SREGS`, the
//! same way the capability probe does, with `evmm_kvm_probe::long_mode`), an ioeventfd on an MMIO address and an
//! irqfd on a GSI. The guest loop, per request:
//!
//! 1. `rdtsc` (start),
//! 2. a 32-bit MMIO write to [`KICK_ADDR`]: caught by the ioeventfd, no exit
//!    to userspace,
//! 3. waits, by mode:
//!    - `poll`: spins in ring 3 until a counter in guest memory changes; a
//!      host thread blocked in `read()` on the ioeventfd increments it;
//!    - `irq`: spins in ring 3 (interrupts enabled) until the interrupt
//!      handler has run; the host thread answers the ioeventfd by writing the
//!      irqfd (GSI [`IRQ_GSI`], IOAPIC pin programmed edge-triggered to vector
//!      [`IRQ_VECTOR`]); the ring-0 handler's first instruction is `rdtsc`.
//!
//! and a third mode without the kick: `shm`, where step 2 is a store of the
//! request number into guest memory ([`DATA_SHM_REQUEST`]) that a host thread
//! spinning on it sees, answering through the same counter as `poll`. No eventfd,
//! no exit, no system call: the physical floor of a polled round trip, what a
//! polling device with the guest's kicks turned off could reach at best.
//!
//! It prints the same machine-readable lines as the notify guest
//! (`crates/notify-guest`), so the benchmark parses both alike:
//!
//! ```text
//! NOTIFY-INFO source=floor tsc_khz=2600000 gsi=5 vector=0x40
//! NOTIFY-RESULT kind=floor mode=poll n=1000 irqs=0 min=.. p50=.. p90=.. p99=.. p999=.. max=.. mean=.. cycles=c1,c2,...
//! NOTIFY-DONE requests=1000
//! ```
//!
//! In `irq` mode two series are printed: `mode=irq` (kick → interrupt
//! handler entry) and `mode=irq_wake` (kick → the ring-3 loop sees that the
//! handler ran). All figures are guest TSC cycles; `tsc_khz` is KVM's guest
//! TSC frequency (`KVM_GET_TSC_KHZ`).
//!
//! Guest ring-0 code is instruction-emulated on PVM hosts, so the handler is
//! kept to a handful of instructions, and its first instruction is `rdtsc`.
//! To let it clobber `rax`/`rdx` without saving them, interrupts can only be
//! taken inside the ring-3 wait loop, which keeps nothing live in those
//! registers: `RFLAGS.IF` stays set in ring 3, but the LAPIC task priority
//! register (written through the user-mapped LAPIC page) blocks every vector
//! except while the guest waits for its interrupt. (`sti`/`cli` in ring 3
//! with IOPL 3 is no option: PVM runs guest ring 3 with IOPL 0 whatever the
//! guest's RFLAGS say, so they fault.) The two TPR writes per request lie
//! outside the timed interval.

mod echo_tap;

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use clap::{Parser, ValueEnum};
use evmm_kvm_probe::long_mode::{FlatLayout, FlatTables, SEL_CODE0};
use kvm_bindings::{
    kvm_irqchip, kvm_regs, kvm_sregs, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC,
};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

// Guest-physical (= guest-virtual, identity-mapped) layout.
const GDT_ADDR: u64 = 0x1000;
const PML4_ADDR: u64 = 0x2000;
const PDPT_ADDR: u64 = 0x3000;
/// Four page directories (0x4000..0x8000): identity map of 4 GiB.
const PD_ADDR: u64 = 0x4000;
const IDT_ADDR: u64 = 0x8000;
const TSS_ADDR: u64 = 0x9000;
/// Data page shared by the guest code and the host thread; the offsets
/// below are hard-coded in the guest assembly.
const DATA_ADDR: u64 = 0xa000;
/// Interrupt count, incremented by the ring-0 handler (the TSC at handler
/// entry follows it at `DATA_ADDR + 8`).
const DATA_IRQ_COUNT: u64 = DATA_ADDR;
/// Poll-mode answer count, incremented by the host thread.
const DATA_POLL_FLAG: u64 = DATA_ADDR + 0x10;
/// Shared-memory mode: the guest's request number, which the host thread polls.
const DATA_SHM_REQUEST: u64 = DATA_ADDR + 0x18;
/// Ring-0 stack top (TSS.RSP0).
const KSTACK_TOP: u64 = 0xc000;
const USTACK_TOP: u64 = 0xe000;
const CODE_ADDR: u64 = 0x10000;
/// Samples: N u64 for the first series, then N for the second.
const SAMPLES_ADDR: u64 = 0x10_0000;

/// The kick: an unbacked MMIO address with an ioeventfd on it.
const KICK_ADDR: u64 = 0xd000_0000;
/// The guest writes here when done: unbacked, no ioeventfd, so KVM_EXIT_MMIO.
const DONE_ADDR: u64 = 0xd000_1000;
/// The guest's exception handler writes the vector here.
const FAULT_ADDR: u64 = 0xd000_2000;

/// LAPIC register offsets: task priority, spurious interrupt vector.
const APIC_TPR: usize = 0x80;
const APIC_SVR: usize = 0xf0;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_LVT_MASKED: u32 = 1 << 16;
/// A TPR that blocks every vector (priority class 15).
const TPR_BLOCK_ALL: u32 = 0xf0;

/// GSI of the irqfd (IOAPIC pin).
const IRQ_GSI: u32 = 5;
/// Interrupt vector the IOAPIC pin is routed to.
const IRQ_VECTOR: u8 = 0x40;
/// The guest's `[rdi + 8*N]` addressing and the memory size bound N.
const MAX_REQUESTS: u64 = 10_000_000;

// RFLAGS bits.
const RFLAGS_FIXED: u64 = 1 << 1;
const RFLAGS_IF: u64 = 1 << 9;

// The guest code. Position independent (relative jumps only); data is
// addressed through absolute addresses below 2 GiB (the DATA_* constants)
// and registers set by the host:
//   rdi = samples (series 1), r14 = samples (series 2), rcx = N,
//   rsi = KICK_ADDR, r12 = DONE_ADDR, r13 = mode (0 poll, 1 irq, 2 shm).
// Guest entry (ring 3) is at offset 0; the interrupt handler and the
// exception handler are at the offsets of their labels.
std::arch::global_asm!(
    r#"
    .pushsection .rodata.evmm_floor_guest, "a"
    .balign 16
    .global evmm_floor_guest_start
evmm_floor_guest_start:
    xor r9d, r9d
    test rcx, rcx
    jz 9f
    cmp r13, 2
    je 7f
    test r13, r13
    jnz 5f
1:
    mov r10, qword ptr [0xa010]
    lfence
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r8, rax
    mov dword ptr [rsi], r9d
2:
    cmp qword ptr [0xa010], r10
    je 2b
    rdtsc
    shl rdx, 32
    or rax, rdx
    sub rax, r8
    mov qword ptr [rdi + r9*8], rax
    inc r9
    cmp r9, rcx
    jne 1b
    jmp 9f
5:
    mov r10, qword ptr [0xa000]
    mov eax, 0xfee00080
    mov dword ptr [rax], 0
    lfence
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r8, rax
    mov dword ptr [rsi], r9d
6:
    cmp qword ptr [0xa000], r10
    je 6b
    rdtsc
    shl rdx, 32
    or rax, rdx
    sub rax, r8
    mov qword ptr [r14 + r9*8], rax
    mov eax, 0xfee00080
    mov dword ptr [rax], 0xf0
    mov rax, qword ptr [0xa008]
    sub rax, r8
    mov qword ptr [rdi + r9*8], rax
    inc r9
    cmp r9, rcx
    jne 5b
    jmp 9f
7:
    mov r10, qword ptr [0xa010]
    lfence
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r8, rax
    lea rax, [r9 + 1]
    mov qword ptr [0xa018], rax
8:
    cmp qword ptr [0xa010], r10
    je 8b
    rdtsc
    shl rdx, 32
    or rax, rdx
    sub rax, r8
    mov qword ptr [rdi + r9*8], rax
    inc r9
    cmp r9, rcx
    jne 7b
9:
    mov dword ptr [r12], 0x656e6f64
    jmp 9b

    .balign 16
    .global evmm_floor_guest_isr
evmm_floor_guest_isr:
    rdtsc
    mov dword ptr [0xa008], eax
    mov dword ptr [0xa00c], edx
    inc qword ptr [0xa000]
    mov eax, 0xfee000b0
    mov dword ptr [rax], 0
    iretq

    .balign 16
    .global evmm_floor_guest_fault
evmm_floor_guest_fault:
    .set vec, 0
    .rept 256
    .balign 16
    mov eax, 0xd0002000
    mov dword ptr [rax], vec
2:
    jmp 2b
    .set vec, vec + 1
    .endr

    .global evmm_floor_guest_end
evmm_floor_guest_end:
    .popsection
"#
);

extern "C" {
    static evmm_floor_guest_start: u8;
    static evmm_floor_guest_isr: u8;
    static evmm_floor_guest_fault: u8;
    static evmm_floor_guest_end: u8;
}

/// The guest code blob and the offsets of its two handlers.
fn guest_code() -> (&'static [u8], u64, u64) {
    // SAFETY: the four symbols are labels in one read-only section defined by
    // the global_asm! above, in this order, so `start..end` is one
    // contiguous, initialised, immutable byte range that lives for the whole
    // program.
    unsafe {
        let start = std::ptr::addr_of!(evmm_floor_guest_start);
        let isr = std::ptr::addr_of!(evmm_floor_guest_isr);
        let fault = std::ptr::addr_of!(evmm_floor_guest_fault);
        let end = std::ptr::addr_of!(evmm_floor_guest_end);
        let len = end as usize - start as usize;
        (
            std::slice::from_raw_parts(start, len),
            (isr as usize - start as usize) as u64,
            (fault as usize - start as usize) as u64,
        )
    }
}

/// How the host answers a kick.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// The host thread increments a counter in guest memory; the guest polls it.
    Poll,
    /// The host thread writes an irqfd; the guest's interrupt handler records
    /// the TSC.
    Irq,
    /// No kick: the guest stores a request number in memory, a host thread spinning
    /// on it answers through the poll counter.
    Shm,
}

/// The raw KVM notify-path floor: ioeventfd kick, answer through guest
/// memory (poll) or an irqfd (irq). Prints NOTIFY-RESULT lines in the notify
/// guest's format.
#[derive(Parser, Debug)]
#[command(name = "evmm-notify-floor", version)]
struct Args {
    /// Number of round trips to measure.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=MAX_REQUESTS))]
    requests: u64,
    /// How the host answers; without it every mode runs: poll, irq, shm.
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Print only the summary statistics, not every sample.
    #[arg(long)]
    no_samples: bool,
    /// The network floor: each kick sends the notify guest's probe frame on this tap
    /// and the answer waits for its echo (`evmm-net-echo` on the tap's other side);
    /// poll and irq modes only.
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
}

/// An error with its context, printed by `main`.
type Error = String;

fn ctx<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> Error {
    move |e| format!("{what}: {e}")
}

/// Anonymous, private guest memory mapped at guest-physical 0.
struct GuestMem {
    ptr: NonNull<u8>,
    size: usize,
}

// SAFETY: the mapping is plain memory; concurrent access from the host thread
// goes through atomics only (see `atomic_u64`).
unsafe impl Send for GuestMem {}
// SAFETY: as above.
unsafe impl Sync for GuestMem {}

impl GuestMem {
    fn new(size: usize) -> Result<Self, Error> {
        // SAFETY: an anonymous private mapping with no address hint; the
        // result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap of {size} bytes: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(GuestMem {
            ptr: NonNull::new(p.cast()).ok_or("mmap returned null")?,
            size,
        })
    }

    fn write(&self, addr: u64, data: &[u8]) {
        let addr = addr as usize;
        assert!(addr + data.len() <= self.size, "guest write out of range");
        // SAFETY: the range was checked to lie inside the mapping, and
        // `data` cannot overlap it (it is host memory owned elsewhere).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(addr), data.len())
        }
    }

    fn write_u64(&self, addr: u64, v: u64) {
        self.write(addr, &v.to_le_bytes());
    }

    fn read_u64(&self, addr: u64) -> u64 {
        let addr = addr as usize;
        assert!(addr + 8 <= self.size && addr.is_multiple_of(8));
        // SAFETY: in range and 8-byte aligned; the vCPU is stopped when the
        // host reads results.
        unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(addr).cast::<u64>()) }
    }

    /// The u64 at `addr` as an atomic shared with the guest.
    fn atomic_u64(&self, addr: u64) -> &AtomicU64 {
        let addr = addr as usize;
        assert!(addr + 8 <= self.size && addr.is_multiple_of(8));
        // SAFETY: in range, 8-byte aligned, lives as long as `self`, and all
        // host accesses to it go through this atomic.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(addr).cast::<u64>()) }
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; the VM that
        // used it as a memslot is dropped before (field order of `Floor`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.size) };
    }
}

/// The VM. Field order matters for drop order: vCPU and VM fds before memory.
struct Floor {
    vcpu: VcpuFd,
    vm: VmFd,
    mem: Arc<GuestMem>,
    tsc_khz: u32,
}

fn build(requests: u64) -> Result<Floor, Error> {
    let kvm = Kvm::new().map_err(ctx("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(ctx("KVM_CREATE_VM"))?;
    vm.create_irq_chip().map_err(ctx("KVM_CREATE_IRQCHIP"))?;
    // The in-kernel irqchip needs the TSS area below 4 GiB and away from RAM.
    vm.set_tss_address(0xfffb_d000)
        .map_err(ctx("KVM_SET_TSS_ADDR"))?;

    let size = (SAMPLES_ADDR + 2 * 8 * requests).next_multiple_of(2 << 20) as usize;
    let mem = Arc::new(GuestMem::new(size)?);
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: size as u64,
        userspace_addr: mem.ptr.as_ptr() as u64,
    };
    // SAFETY: the region is the mapping owned by `mem`, which outlives the VM
    // fd (`Floor` field order drops the VM first).
    unsafe { vm.set_user_memory_region(region) }.map_err(ctx("KVM_SET_USER_MEMORY_REGION"))?;

    write_guest(&mem);

    // IOAPIC pin IRQ_GSI → IRQ_VECTOR, fixed delivery, physical destination
    // APIC 0, active high, edge triggered, unmasked.
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(ctx("KVM_GET_IRQCHIP"))?;
    // SAFETY: chip_id is KVM_IRQCHIP_IOAPIC, so `ioapic` is the union member
    // KVM filled in and reads back.
    unsafe { chip.chip.ioapic.redirtbl[IRQ_GSI as usize].bits = u64::from(IRQ_VECTOR) };
    vm.set_irqchip(&chip).map_err(ctx("KVM_SET_IRQCHIP"))?;

    let vcpu = vm.create_vcpu(0).map_err(ctx("KVM_CREATE_VCPU"))?;
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(ctx("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(ctx("KVM_SET_CPUID2"))?;

    // Software-enable the LAPIC (spurious vector register, bit 8; vector
    // 0xff) and block every interrupt through the task priority register;
    // the guest lowers the TPR only while it waits for an interrupt.
    let mut lapic = vcpu.get_lapic().map_err(ctx("KVM_GET_LAPIC"))?;
    // LINT0 (KVM resets it to ExtINT on the BSP, which would deliver the
    // 8259's view of the irqfd's GSI as well) and LINT1 are masked.
    for (reg, val) in [
        (APIC_SVR, 0x1ffu32),
        (APIC_TPR, TPR_BLOCK_ALL),
        (APIC_LVT0, APIC_LVT_MASKED),
        (APIC_LVT1, APIC_LVT_MASKED),
    ] {
        for (i, b) in val.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as libc::c_char;
        }
    }
    vcpu.set_lapic(&lapic).map_err(ctx("KVM_SET_LAPIC"))?;

    let base = vcpu.get_sregs().map_err(ctx("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&long_mode_sregs(&base))
        .map_err(ctx("KVM_SET_SREGS"))?;
    let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
    Ok(Floor {
        vcpu,
        vm,
        mem,
        tsc_khz,
    })
}

/// The guest's tables: 4 GiB identity-mapped (uncached from 3 GiB: MMIO), the IDT,
/// and the ring-0 stack for interrupts taken in ring 3.
const TABLES: FlatTables = FlatTables {
    layout: FlatLayout {
        gdt: GDT_ADDR,
        pml4: PML4_ADDR,
        tss: TSS_ADDR,
        idt: Some((IDT_ADDR, 256 * 16 - 1)),
    },
    pdpt: PDPT_ADDR,
    pd: PD_ADDR,
    gib: 4,
    uncached_from_gib: 3,
    kernel_stack: Some(KSTACK_TOP),
};

/// Writes the GDT, TSS, IDT, page tables and code into guest memory.
fn write_guest(mem: &GuestMem) {
    for (addr, value) in TABLES.writes() {
        mem.write_u64(addr, value);
    }
    let (code, isr_off, fault_off) = guest_code();
    mem.write(CODE_ADDR, code);

    // IDT: every vector to the fault stub except IRQ_VECTOR; interrupt gates
    // (IF cleared on entry), DPL 0.
    for v in 0..256u64 {
        // One 16-byte stub per vector: it writes its vector to FAULT_ADDR.
        let off = if v == u64::from(IRQ_VECTOR) {
            isr_off
        } else {
            fault_off + 16 * v
        };
        let (lo, hi) = idt_gate(CODE_ADDR + off, SEL_CODE0);
        mem.write_u64(IDT_ADDR + 16 * v, lo);
        mem.write_u64(IDT_ADDR + 16 * v + 8, hi);
    }
}

/// A 64-bit interrupt gate (type 0xe, present, DPL 0) as two u64.
fn idt_gate(handler: u64, sel: u16) -> (u64, u64) {
    let lo = (handler & 0xffff)
        | (u64::from(sel) << 16)
        | (0x8e << 40)
        | (((handler >> 16) & 0xffff) << 48);
    (lo, handler >> 32)
}

/// Special registers for 64-bit long mode at CPL 3, with the guest's IDT.
fn long_mode_sregs(base: &kvm_sregs) -> kvm_sregs {
    TABLES.sregs(base, 3)
}

/// One measured series: its `mode=` name and the samples (cycles).
type Series = (&'static str, Vec<u64>);

/// Runs one mode; returns the series and the interrupt count.
fn run_mode(
    floor: &mut Floor,
    mode: Mode,
    requests: u64,
    tap: Option<&str>,
) -> Result<(Vec<Series>, u64), Error> {
    let mut echo = tap
        .map(echo_tap::EchoTap::open)
        .transpose()
        .map_err(ctx("the tap"))?;
    let kick = EventFd::new(0).map_err(ctx("eventfd"))?;
    let irq = EventFd::new(0).map_err(ctx("eventfd"))?;
    floor
        .vm
        .register_ioevent(&kick, &IoEventAddress::Mmio(KICK_ADDR), NoDatamatch)
        .map_err(ctx("KVM_IOEVENTFD"))?;
    floor
        .vm
        .register_irqfd(&irq, IRQ_GSI)
        .map_err(ctx("KVM_IRQFD"))?;

    let irq_count_before = floor.mem.read_u64(DATA_IRQ_COUNT);
    floor.mem.write_u64(DATA_SHM_REQUEST, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let answerer = {
        let kick = kick.try_clone().map_err(ctx("eventfd clone"))?;
        let irq = irq.try_clone().map_err(ctx("eventfd clone"))?;
        let mem = Arc::clone(&floor.mem);
        let stop = Arc::clone(&stop);
        thread::Builder::new()
            .name("floor-answer".into())
            .spawn(move || {
                let flag = mem.atomic_u64(DATA_POLL_FLAG);
                if mode == Mode::Shm {
                    let request = mem.atomic_u64(DATA_SHM_REQUEST);
                    // Not what the counter holds when this thread starts: the guest may
                    // already have written its first request (it was reset to 0).
                    let mut seen = 0;
                    while !stop.load(Ordering::Acquire) {
                        let now = request.load(Ordering::Acquire);
                        if now != seen {
                            seen = now;
                            flag.fetch_add(1, Ordering::Release);
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                    return;
                }
                let mut seq = 0u64;
                while kick.read().is_ok() && !stop.load(Ordering::Acquire) {
                    if let Some(tap) = echo.as_mut() {
                        if let Err(e) = tap.round_trip(seq) {
                            eprintln!("evmm-notify-floor: the tap round trip {seq}: {e}");
                            break;
                        }
                        seq += 1;
                    }
                    match mode {
                        Mode::Poll | Mode::Shm => {
                            flag.fetch_add(1, Ordering::Release);
                        }
                        Mode::Irq => {
                            if irq.write(1).is_err() {
                                break;
                            }
                        }
                    }
                }
            })
            .map_err(ctx("spawn"))?
    };

    let regs = kvm_regs {
        rip: CODE_ADDR,
        rdi: SAMPLES_ADDR,
        r14: SAMPLES_ADDR + 8 * requests,
        rcx: requests,
        rsi: KICK_ADDR,
        r12: DONE_ADDR,
        r13: match mode {
            Mode::Poll => 0,
            Mode::Irq => 1,
            Mode::Shm => 2,
        },
        rsp: USTACK_TOP,
        rflags: RFLAGS_FIXED | RFLAGS_IF,
        ..Default::default()
    };
    floor.vcpu.set_regs(&regs).map_err(ctx("KVM_SET_REGS"))?;
    let result = run_until_done(&mut floor.vcpu);

    stop.store(true, Ordering::Release);
    let _ = kick.write(1);
    let _ = answerer.join();
    floor
        .vm
        .unregister_ioevent(&kick, &IoEventAddress::Mmio(KICK_ADDR), NoDatamatch)
        .map_err(ctx("KVM_IOEVENTFD deassign"))?;
    floor
        .vm
        .unregister_irqfd(&irq, IRQ_GSI)
        .map_err(ctx("KVM_IRQFD deassign"))?;
    if let Err(e) = result {
        // The exception frame (error code if any, RIP, CS, RFLAGS, RSP, SS)
        // sits at the top of the ring-0 stack.
        let frame: Vec<String> = (1..=6)
            .rev()
            .map(|i| format!("{:#x}", floor.mem.read_u64(KSTACK_TOP - 8 * i)))
            .collect();
        return Err(format!("{e}; ring-0 stack top: {}", frame.join(" ")));
    }

    let read = |base: u64| -> Vec<u64> {
        (0..requests)
            .map(|i| floor.mem.read_u64(base + 8 * i))
            .collect()
    };
    let irqs = floor.mem.read_u64(DATA_IRQ_COUNT) - irq_count_before;
    let series = match mode {
        Mode::Poll => vec![("poll", read(SAMPLES_ADDR))],
        Mode::Shm => vec![("shm", read(SAMPLES_ADDR))],
        Mode::Irq => vec![
            ("irq", read(SAMPLES_ADDR)),
            ("irq_wake", read(SAMPLES_ADDR + 8 * requests)),
        ],
    };
    Ok((series, irqs))
}

/// Runs the vCPU until the guest writes [`DONE_ADDR`].
fn run_until_done(vcpu: &mut VcpuFd) -> Result<(), Error> {
    loop {
        match vcpu.run() {
            Ok(VcpuExit::MmioWrite(DONE_ADDR, _)) => return Ok(()),
            Ok(VcpuExit::MmioWrite(FAULT_ADDR, data)) => {
                let vector = data[0];
                return Err(format!(
                    "the guest took an unexpected exception or interrupt, vector {vector}"
                ));
            }
            Ok(other) => {
                let what = format!("{other:?}");
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                return Err(format!("unexpected vCPU exit {what} at rip {rip:#x}"));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
    }
}

/// Summary statistics of one series, as printed on a NOTIFY-RESULT line.
fn summary(samples: &[u64]) -> String {
    let mut s = samples.to_vec();
    s.sort_unstable();
    let n = s.len();
    // Nearest-rank percentile: the smallest sample with at least p% of the
    // samples at or below it (same definition as the notify guest).
    let pct = |p10: usize| s[((p10 * n).div_ceil(1000)).clamp(1, n) - 1];
    let mean = s.iter().map(|&v| u128::from(v)).sum::<u128>() / n as u128;
    format!(
        "min={} p50={} p90={} p99={} p999={} max={} mean={}",
        s[0],
        pct(500),
        pct(900),
        pct(990),
        pct(999),
        s[n - 1],
        mean
    )
}

fn run(args: &Args) -> Result<(), Error> {
    let mut floor = build(args.requests)?;
    println!(
        "NOTIFY-INFO source=floor tsc_khz={} gsi={IRQ_GSI} vector={IRQ_VECTOR:#x} kick={KICK_ADDR:#x}",
        floor.tsc_khz
    );
    let modes = match (args.mode, &args.tap) {
        (Some(Mode::Shm), Some(_)) => return Err("--tap needs a kick: poll or irq mode".into()),
        (Some(m), _) => vec![m],
        (None, None) => vec![Mode::Poll, Mode::Irq, Mode::Shm],
        (None, Some(_)) => vec![Mode::Poll, Mode::Irq],
    };
    let kind = if args.tap.is_some() {
        "floor_echo"
    } else {
        "floor"
    };
    for mode in modes {
        let (series, irqs) = run_mode(&mut floor, mode, args.requests, args.tap.as_deref())?;
        for (name, samples) in series {
            let mut line = format!(
                "NOTIFY-RESULT kind={kind} mode={name} n={} irqs={irqs} {}",
                samples.len(),
                summary(&samples)
            );
            if !args.no_samples {
                line.push_str(" cycles=");
                let list: Vec<String> = samples.iter().map(u64::to_string).collect();
                line.push_str(&list.join(","));
            }
            println!("{line}");
        }
    }
    println!("NOTIFY-DONE requests={}", args.requests);
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("evmm-notify-floor: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_encoding() {
        let (lo, hi) = idt_gate(0x1234_5678_9abc_def0, 0x08);
        assert_eq!(lo, 0x9abc_8e00_0008_def0);
        assert_eq!(hi, 0x1234_5678);
    }

    #[test]
    fn summary_percentiles() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(
            summary(&v),
            "min=1 p50=500 p90=900 p99=990 p999=999 max=1000 mean=500"
        );
        assert_eq!(summary(&[7]), "min=7 p50=7 p90=7 p99=7 p999=7 max=7 mean=7");
    }

    #[test]
    fn guest_code_is_present() {
        let (code, isr, fault) = guest_code();
        assert!(!code.is_empty());
        assert!(isr < fault && (fault as usize) < code.len());
        // The handler's first instruction is rdtsc (0f 31).
        assert_eq!(&code[isr as usize..isr as usize + 2], &[0x0f, 0x31]);
    }
}

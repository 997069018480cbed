//! Initial vCPU state: general registers, segment and control registers for
//! the 64-bit or PVH entry, the boot GDT and identity page tables, the FPU
//! and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::layout::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};
use crate::boot::KernelEntry;
use crate::vstate::memory::GuestMemoryMmap;

use evmm_kvm_probe::long_mode::{
    set_flat_segments, CR0_CD, CR0_ET, CR0_NW, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME,
};

/// Local APIC register offsets and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Number of GiB the boot page tables identity-map (2 MiB pages).
const IDENTITY_MAPPED_GIB: u64 = 4;

/// Errors while setting up a vCPU's registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM ioctl failed.
    #[error("cannot set {what}: {source}")]
    Kvm {
        /// Which state.
        what: &'static str,
        /// Underlying error.
        source: kvm_ioctls::Error,
    },
    /// Writing the GDT or page tables failed.
    #[error("cannot write {what} to guest memory: {source}")]
    Memory {
        /// Which structure.
        what: &'static str,
        /// Underlying error.
        source: vm_memory::GuestMemoryError,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

fn mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> RegsError {
    move |source| RegsError::Memory { what, source }
}

/// Encodes a GDT descriptor from its access/flags word, base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// Decodes a GDT descriptor into the KVM segment it describes.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: limit as u32,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT: null, code, data, TSS. The code segment is 64-bit for the
/// Linux 64-bit entry and 32-bit for PVH.
pub fn boot_gdt(long_mode: bool) -> [u64; 4] {
    let code_flags = if long_mode { 0xa09b } else { 0xc09b };
    [
        gdt_entry(0, 0, 0),
        gdt_entry(code_flags, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

fn write_gdt_and_idt(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), RegsError> {
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_START + 8 * i as u64))
            .map_err(mem_err("the GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(mem_err("the IDT"))
}

/// Writes identity-mapping page tables for the first 4 GiB (2 MiB pages).
pub fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let err = mem_err("the boot page tables");
    mem.write_obj(PDPTE_START | 0x3, GuestAddress(PML4_START))
        .map_err(err)?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PDE_START + gib * 0x1000;
        mem.write_obj(pd | 0x3, GuestAddress(PDPTE_START + gib * 8))
            .map_err(mem_err("the boot page tables"))?;
        for i in 0..512u64 {
            let page = ((gib * 512 + i) << 21) | 0x83; // present, writable, 2 MiB
            mem.write_obj(page, GuestAddress(pd + i * 8))
                .map_err(mem_err("the boot page tables"))?;
        }
    }
    Ok(())
}

/// Sets the boot vCPU's segment and control registers for `entry` and
/// writes the GDT, IDT and (for long mode) the page tables.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    vcpu: &VcpuFd,
    entry: &KernelEntry,
) -> Result<(), RegsError> {
    let long_mode = matches!(entry, KernelEntry::Linux64 { .. });
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_err("special registers"))?;
    let gdt = boot_gdt(long_mode);
    write_gdt_and_idt(mem, &gdt)?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;

    set_flat_segments(
        &mut sregs,
        segment_from_gdt(gdt[1], 1),
        segment_from_gdt(gdt[2], 2),
        segment_from_gdt(gdt[3], 3),
    );

    sregs.cr0 = (sregs.cr0 & !(CR0_CD | CR0_NW)) | CR0_PE | CR0_ET;
    if long_mode {
        write_identity_page_tables(mem)?;
        sregs.cr3 = PML4_START;
        sregs.cr4 |= CR4_PAE;
        sregs.cr0 |= CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    } else {
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    vcpu.set_sregs(&sregs).map_err(kvm_err("special registers"))
}

/// The boot vCPU's general registers for `entry`.
pub fn boot_regs(entry: &KernelEntry) -> kvm_regs {
    match entry {
        KernelEntry::Linux64 { entry, .. } => kvm_regs {
            rflags: 0x2,
            rip: entry.0,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        KernelEntry::Pvh { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry.0,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
    }
}

/// Sets the boot vCPU's general registers.
pub fn setup_regs(vcpu: &VcpuFd, entry: &KernelEntry) -> Result<(), RegsError> {
    vcpu.set_regs(&boot_regs(entry))
        .map_err(kvm_err("general registers"))
}

/// Initialises the FPU: control word 0x37f, MXCSR 0x1f80 (the reset values).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("FPU state"))
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = src as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Routes LINT0 to ExtINT (the PIC) and LINT1 to NMI, as a BIOS does.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("local APIC state"))?;
    let lvt0 = lapic_reg(&lapic, APIC_LVT0);
    set_lapic_reg(
        &mut lapic,
        APIC_LVT0,
        with_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = lapic_reg(&lapic, APIC_LVT1);
    set_lapic_reg(
        &mut lapic,
        APIC_LVT1,
        with_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic).map_err(kvm_err("local APIC state"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::GuestRam;

    #[test]
    fn gdt_round_trip() {
        let gdt = boot_gdt(true);
        assert_eq!(gdt[0], 0);
        assert_eq!(gdt[1], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[2], 0x00cf_9300_0000_ffff);
        let cs = segment_from_gdt(gdt[1], 1);
        assert_eq!(cs.selector, 8);
        assert_eq!(cs.l, 1);
        assert_eq!(cs.db, 0);
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.present, 1);
        assert_eq!(cs.unusable, 0);
        let ds = segment_from_gdt(gdt[2], 2);
        assert_eq!(ds.db, 1);
        assert_eq!(ds.type_, 3);
        let tr = segment_from_gdt(gdt[3], 3);
        assert_eq!(tr.selector, 0x18);
        assert_eq!(tr.s, 0);
        let null = segment_from_gdt(gdt[0], 0);
        assert_eq!(null.unusable, 1);
        // PVH uses a 32-bit code segment.
        let cs32 = segment_from_gdt(boot_gdt(false)[1], 1);
        assert_eq!((cs32.l, cs32.db), (0, 1));
    }

    #[test]
    fn gdt_entry_base_and_limit() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let s = segment_from_gdt(e, 5);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
        assert_eq!(s.g, 0);
    }

    #[test]
    fn page_tables_identity_map_4gib() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mem = ram.memory();
        write_identity_page_tables(mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        for gib in 0..4u64 {
            let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START + gib * 8)).unwrap();
            assert_eq!(pdpte, (PDE_START + gib * 0x1000) | 3);
        }
        let first: u64 = mem.read_obj(GuestAddress(PDE_START)).unwrap();
        assert_eq!(first, 0x83);
        let last: u64 = mem
            .read_obj(GuestAddress(PDE_START + 4 * 0x1000 - 8))
            .unwrap();
        assert_eq!(last, ((4u64 << 30) - (2 << 20)) | 0x83);
    }

    #[test]
    fn entry_registers() {
        let linux = KernelEntry::Linux64 {
            entry: GuestAddress(0x100200),
            setup_header: None,
        };
        let r = boot_regs(&linux);
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rflags),
            (0x100200, 0x7000, 0x8ff0, 2)
        );
        let pvh = KernelEntry::Pvh {
            entry: GuestAddress(0x1000000),
        };
        let r = boot_regs(&pvh);
        assert_eq!((r.rip, r.rbx), (0x1000000, PVH_INFO_START));
    }

    #[test]
    fn lint_delivery_modes() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x0001_0700);
        let v = with_delivery_mode(lapic_reg(&lapic, APIC_LVT0), APIC_MODE_NMI);
        assert_eq!(v, 0x0001_0400);
        assert_eq!(with_delivery_mode(0, APIC_MODE_EXTINT), 0x700);
    }
}

//! A flat 64-bit long-mode vCPU state for tiny hand-built guests (the capability probe
//! and the raw KVM notify floor): GDT selectors, control-register and page-table bits,
//! the tables in guest memory ([`FlatTables`]) and the special registers. evmm's Linux
//! boot set-up shares the control-register bits.

use kvm_bindings::{kvm_segment, kvm_sregs};

/// Ring-0 code selector (GDT entry 1).
pub const SEL_CODE0: u16 = 0x08;
/// Ring-0 data selector (GDT entry 2).
pub const SEL_DATA0: u16 = 0x10;
/// Ring-3 code selector (GDT entry 3, RPL 3).
pub const SEL_CODE3: u16 = 0x18 | 3;
/// Ring-3 data selector (GDT entry 4, RPL 3).
pub const SEL_DATA3: u16 = 0x20 | 3;
/// 64-bit TSS selector (GDT entries 5 and 6).
pub const SEL_TSS: u16 = 0x28;
/// GDT limit for the seven 8-byte entries above (null, 4 segments, 16-byte TSS).
pub const GDT_LIMIT: u16 = 7 * 8 - 1;

/// CR0 bits.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.MP.
pub const CR0_MP: u64 = 1 << 1;
/// CR0.ET.
pub const CR0_ET: u64 = 1 << 4;
/// CR0.NE.
pub const CR0_NE: u64 = 1 << 5;
/// CR0.WP.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.NW.
pub const CR0_NW: u64 = 1 << 29;
/// CR0.CD.
pub const CR0_CD: u64 = 1 << 30;
/// CR0.PG.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE.
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.OSFXSR.
pub const CR4_OSFXSR: u64 = 1 << 9;
/// CR4.OSXMMEXCPT.
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// EFER.LME.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA.
pub const EFER_LMA: u64 = 1 << 10;

/// Page-table entry: present.
pub const PTE_P: u64 = 1 << 0;
/// Page-table entry: writable.
pub const PTE_RW: u64 = 1 << 1;
/// Page-table entry: user-accessible.
pub const PTE_US: u64 = 1 << 2;
/// Page-table entry: write-through.
pub const PTE_PWT: u64 = 1 << 3;
/// Page-table entry: cache disabled.
pub const PTE_PCD: u64 = 1 << 4;
/// Page-directory entry: a large (2 MiB) page.
pub const PTE_PS: u64 = 1 << 7;

/// Where a flat guest keeps its tables (guest-physical = guest-virtual addresses).
#[derive(Debug, Clone, Copy)]
pub struct FlatLayout {
    /// The GDT (entries as the selectors above).
    pub gdt: u64,
    /// The PML4 of identity-mapped page tables.
    pub pml4: u64,
    /// The 64-bit TSS.
    pub tss: u64,
    /// The IDT and its limit; None: no IDT, so any exception is a triple fault.
    pub idt: Option<(u64, u16)>,
}

/// The tables of a flat guest: a GDT with ring-0 and ring-3 segments and a 64-bit TSS,
/// and page tables that identity-map the first `gib` GiB with 2 MiB pages, all
/// user-accessible so that the same tables serve CPL 0 and CPL 3.
#[derive(Debug, Clone, Copy)]
pub struct FlatTables {
    /// Where the GDT, PML4, TSS and IDT go.
    pub layout: FlatLayout,
    /// The page-directory-pointer table (one page).
    pub pdpt: u64,
    /// The page directories, one page per GiB, consecutive.
    pub pd: u64,
    /// GiB identity-mapped (at most 512).
    pub gib: u64,
    /// GiB from which pages are mapped uncached (MMIO); `gib` for none.
    pub uncached_from_gib: u64,
    /// The stack the CPU switches to on an interrupt from ring 3 (the TSS's RSP0).
    pub kernel_stack: Option<u64>,
}

impl FlatTables {
    /// The 64-bit values to write into guest memory, as (guest address, value).
    pub fn writes(&self) -> Vec<(u64, u64)> {
        let tss = self.layout.tss;
        // Null, code DPL 0, data DPL 0, code DPL 3, data DPL 3, 64-bit TSS (two slots).
        let gdt = [
            0,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            0x00af_fb00_0000_ffff,
            0x00cf_f300_0000_ffff,
            tss_descriptor_low(tss, 0x67),
            tss >> 32,
        ];
        let mut w: Vec<(u64, u64)> = gdt
            .iter()
            .enumerate()
            .map(|(i, &e)| (self.layout.gdt + 8 * i as u64, e))
            .collect();
        if let Some(rsp0) = self.kernel_stack {
            // RSP0 at offset 4 (an unaligned u64: bytes 4..12).
            w.push((tss + 4, rsp0));
        }
        // The I/O map base (u16 at 0x66) past the limit: no I/O bitmap.
        w.push((tss + 0x60, 0x68 << 48));
        let flags = PTE_P | PTE_RW | PTE_US;
        w.push((self.layout.pml4, self.pdpt | flags));
        for g in 0..self.gib {
            w.push((self.pdpt + 8 * g, (self.pd + 0x1000 * g) | flags));
        }
        for i in 0..512 * self.gib {
            let uc = if i >= 512 * self.uncached_from_gib {
                PTE_PCD | PTE_PWT
            } else {
                0
            };
            w.push((self.pd + 8 * i, (i << 21) | flags | PTE_PS | uc));
        }
        w
    }

    /// The special registers at `cpl` (0 or 3), from the vCPU's reset state `base`.
    pub fn sregs(&self, base: &kvm_sregs, cpl: u8) -> kvm_sregs {
        long_mode_sregs(base, cpl, &self.layout)
    }
}

/// Low half of a 16-byte 64-bit TSS descriptor (type 0xb: busy, present).
pub fn tss_descriptor_low(base: u64, limit: u64) -> u64 {
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x8b << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56)
}

/// Loads `code` into CS, `data` into DS, ES, FS, GS and SS, and `tss` into TR.
pub fn set_flat_segments(
    sregs: &mut kvm_sregs,
    code: kvm_segment,
    data: kvm_segment,
    tss: kvm_segment,
) {
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
}

/// Special registers for 64-bit long mode at `cpl` (0 or 3) with flat segments,
/// starting from the vCPU's reset state `base`.
pub fn long_mode_sregs(base: &kvm_sregs, cpl: u8, layout: &FlatLayout) -> kvm_sregs {
    let (code_sel, data_sel) = if cpl == 0 {
        (SEL_CODE0, SEL_DATA0)
    } else {
        (SEL_CODE3, SEL_DATA3)
    };
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: code_sel,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: cpl,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: data_sel,
        type_: 0x3, // read/write, accessed
        db: 1,
        l: 0,
        ..code
    };
    let tss = kvm_segment {
        base: layout.tss,
        limit: 0x67,
        selector: SEL_TSS,
        type_: 0xb, // 64-bit TSS, busy
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let mut sregs = *base;
    set_flat_segments(&mut sregs, code, data, tss);
    sregs.gdt.base = layout.gdt;
    sregs.gdt.limit = GDT_LIMIT;
    let (idt_base, idt_limit) = layout.idt.unwrap_or((0, 0));
    sregs.idt.base = idt_base;
    sregs.idt.limit = idt_limit;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = layout.pml4;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tss_descriptor_encoding() {
        let d = tss_descriptor_low(0x1234_5678, 0x67);
        assert_eq!(d & 0xffff, 0x67);
        assert_eq!((d >> 16) & 0xff_ffff, 0x34_5678);
        assert_eq!((d >> 40) & 0xff, 0x8b);
        assert_eq!(d >> 56, 0x12);
    }

    #[test]
    fn tables_map_identity_with_user_pages() {
        let t = FlatTables {
            layout: FlatLayout {
                gdt: 0x1000,
                pml4: 0x2000,
                tss: 0x6000,
                idt: None,
            },
            pdpt: 0x3000,
            pd: 0x4000,
            gib: 2,
            uncached_from_gib: 1,
            kernel_stack: Some(0x8000),
        };
        let w = t.writes();
        let at = |a| w.iter().find(|(addr, _)| *addr == a).map(|(_, v)| *v);
        assert_eq!(at(0x1008), Some(0x00af_9b00_0000_ffff));
        assert_eq!(at(0x6004), Some(0x8000));
        assert_eq!(at(0x2000), Some(0x3000 | PTE_P | PTE_RW | PTE_US));
        assert_eq!(at(0x3008), Some(0x5000 | PTE_P | PTE_RW | PTE_US));
        // 2 MiB page 1 maps 2 MiB, cached; page 512 (1 GiB) is uncached.
        assert_eq!(
            at(0x4008),
            Some((1 << 21) | PTE_P | PTE_RW | PTE_US | PTE_PS)
        );
        assert_eq!(at(0x4000 + 8 * 512).unwrap() & PTE_PCD, PTE_PCD);
        assert_eq!(
            w.iter()
                .filter(|(a, _)| (0x4000..0x6000).contains(a))
                .count(),
            1024
        );
    }

    #[test]
    fn ring3_state() {
        let layout = FlatLayout {
            gdt: 0x1000,
            pml4: 0x2000,
            tss: 0x6000,
            idt: Some((0x7000, 4095)),
        };
        let s = long_mode_sregs(&kvm_sregs::default(), 3, &layout);
        assert_eq!((s.cs.selector, s.cs.dpl, s.cs.l), (SEL_CODE3, 3, 1));
        assert_eq!((s.ss.selector, s.ss.db), (SEL_DATA3, 1));
        assert_eq!((s.tr.base, s.gdt.base, s.cr3), (0x6000, 0x1000, 0x2000));
        assert_eq!((s.idt.base, s.idt.limit), (0x7000, 4095));
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        let s = long_mode_sregs(
            &kvm_sregs::default(),
            0,
            &FlatLayout {
                idt: None,
                ..layout
            },
        );
        assert_eq!((s.cs.selector, s.cs.dpl, s.idt.limit), (SEL_CODE0, 0, 0));
    }
}

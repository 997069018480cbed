//! The guest physical address map: where evmm puts boot structures,
//! firmware tables and devices.
//!
//! ```text
//! 0x0000_0500  GDT                     0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH hvm_start_info, module list and memory map
//! 0x0000_7000  zero page (boot_params) 0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, PDPT, 4 PDs (identity map of the first 4 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  ACPI tables (RSDP first)  0x000f_0000 MP table
//! 0x000f_fff0  reset vector stub (see crate::arch::bios)
//! 0x0010_0000  kernel (bzImage protected-mode part / vmlinux segments)
//! ...          RAM up to min(memory, 3 GiB); initramfs at its top
//! 0xc000_0000  32-bit MMIO hole: virtio-mmio window, IOAPIC, LAPIC, TSS
//! 0x1_0000_0000 RAM above 4 GiB when memory is larger than 3 GiB
//! ```

/// Global descriptor table used for the 64-bit and PVH entry.
pub const GDT_START: u64 = 0x500;
/// Interrupt descriptor table (left empty; the kernel installs its own).
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (one entry: the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map table.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4 table.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories (2 MiB pages), one per GiB.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line evmm accepts when the kernel does not say.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the area where the ACPI tables are written.
pub const ACPI_START: u64 = 0xe0000;
/// End (exclusive) of the ACPI area.
pub const ACPI_END: u64 = MPTABLE_START;
/// MP floating pointer and configuration table.
pub const MPTABLE_START: u64 = 0xf0000;
/// End (exclusive) of the legacy BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// First address of "high" memory; the kernel is loaded here.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole below 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First address above 4 GiB.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// Start of the window where virtio-mmio devices are placed.
pub const VIRTIO_MMIO_START: u64 = MMIO_HOLE_START;
/// Size of the virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000_0000;
/// Size of one virtio-mmio device slot in that window.
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// IOAPIC register window.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC register window.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM's three-page TSS area (must not overlap guest RAM).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity-map page (one page below the TSS).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Number of IOAPIC pins KVM's in-kernel IOAPIC has.
pub const IOAPIC_PINS: u32 = 24;
/// First GSI handed to devices other than the legacy ones (serial uses 4).
pub const FIRST_DEVICE_GSI: u32 = 5;
/// Most virtio-mmio devices: one IOAPIC pin each from [`FIRST_DEVICE_GSI`]
/// (their windows fit the virtio-mmio window many times over).
pub const MAX_VIRTIO_MMIO_DEVICES: u32 = IOAPIC_PINS - FIRST_DEVICE_GSI;
const _: () = assert!(
    MAX_VIRTIO_MMIO_DEVICES as u64 * VIRTIO_MMIO_SLOT_SIZE <= VIRTIO_MMIO_SIZE
        && VIRTIO_MMIO_START + VIRTIO_MMIO_SIZE <= IOAPIC_ADDR
);

/// I/O port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// IRQ (GSI) of COM1.
pub const COM1_GSI: u32 = 4;
/// First I/O port of the i8042 controller (0x60..=0x64).
pub const I8042_PORT: u16 = 0x60;
/// I/O port of the exit device (`--exit-device`), where QEMU's isa-debug-exit usually sits.
pub const EXIT_PORT: u16 = 0xf4;
/// ACPI sleep control register (FADT `SLEEP_CONTROL_REG`).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI sleep status register (FADT `SLEEP_STATUS_REG`).
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;

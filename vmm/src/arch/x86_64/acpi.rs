//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT and a DSDT built
//! from a list of devices.
//!
//! The guest powers off through the FADT sleep control register (an I/O
//! port handled by [`crate::devices::acpi_pm`]) with the `\_S5_` sleep type
//! the DSDT announces, and resets through the FADT reset register, which
//! points at the i8042 command port.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::layout::{
    ACPI_END, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, ACPI_START, COM1_GSI, COM1_PORT,
    I8042_PORT, IOAPIC_ADDR, LAPIC_ADDR,
};
use crate::vstate::memory::GuestMemoryMmap;

/// OEM id written into every table.
pub const OEM_ID: [u8; 6] = *b"EVMM  ";
/// The sleep type (SLP_TYP) the DSDT gives for S5; the guest writes it to
/// the sleep control register to power off.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Value written to the reset register (the i8042 "pulse reset" command).
pub const RESET_VALUE: u8 = 0xfe;
/// IOAPIC id used in the MADT and the MP table: the first id after the
/// vCPUs' APIC ids.
pub fn ioapic_id(vcpus: u8) -> u8 {
    vcpus
}

/// IA-PC boot architecture flags (FADT): no VGA, no CMOS RTC.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// Errors while writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in the ACPI area.
    #[error("the ACPI tables ({0} bytes) do not fit in the ACPI area")]
    TooLarge(u64),
    /// Writing guest memory failed.
    #[error("cannot write the ACPI tables: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// The `_HID` of a DSDT device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HardwareId {
    /// A compressed EISA id such as "PNP0501".
    Eisa(&'static str),
    /// A string id such as "LNRO0005".
    String(&'static str),
}

/// One resource in a device's `_CRS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// A range of I/O ports.
    Io {
        /// First port.
        base: u16,
        /// Number of ports.
        len: u8,
    },
    /// A 32-bit MMIO range.
    Mmio {
        /// First address.
        base: u32,
        /// Length in bytes.
        len: u32,
    },
    /// An interrupt (GSI), active high.
    Interrupt {
        /// The GSI.
        gsi: u32,
        /// Edge (true) or level (false) triggered.
        edge: bool,
    },
}

/// A device the DSDT announces under `\_SB_`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DsdtDevice {
    /// Four-character ACPI name, e.g. "COM1" or "VR00".
    pub name: String,
    /// `_HID`.
    pub hid: HardwareId,
    /// `_UID`.
    pub uid: u32,
    /// `_CRS` entries.
    pub resources: Vec<Resource>,
}

impl DsdtDevice {
    /// COM1: the 8250 UART at 0x3f8, IRQ 4.
    pub fn com1() -> Self {
        DsdtDevice {
            name: "COM1".into(),
            hid: HardwareId::Eisa("PNP0501"),
            uid: 0,
            resources: vec![
                Resource::Io {
                    base: COM1_PORT,
                    len: 8,
                },
                Resource::Interrupt {
                    gsi: COM1_GSI,
                    edge: true,
                },
            ],
        }
    }

    /// A virtio-mmio transport (`LNRO0005`) the way Linux's virtio_mmio
    /// driver finds it through ACPI: a memory window and an interrupt.
    pub fn virtio_mmio(index: u32, base: u64, len: u64, gsi: u32, edge: bool) -> Self {
        DsdtDevice {
            name: format!("VR{index:02X}"),
            hid: HardwareId::String("LNRO0005"),
            uid: index,
            resources: vec![
                Resource::Mmio {
                    base: base as u32,
                    len: len as u32,
                },
                Resource::Interrupt { gsi, edge },
            ],
        }
    }
}

impl Aml for DsdtDevice {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let hid: Box<dyn Aml> = match &self.hid {
            HardwareId::Eisa(id) => Box::new(aml::EISAName::new(id)),
            HardwareId::String(id) => Box::new(aml::AmlString::from(*id)),
        };
        let resources: Vec<Box<dyn Aml>> = self
            .resources
            .iter()
            .map(|r| -> Box<dyn Aml> {
                match *r {
                    Resource::Io { base, len } => Box::new(aml::IO::new(base, base, 1, len)),
                    Resource::Mmio { base, len } => {
                        Box::new(aml::Memory32Fixed::new(true, base, len))
                    }
                    Resource::Interrupt { gsi, edge } => {
                        Box::new(aml::Interrupt::new(true, edge, false, false, gsi))
                    }
                }
            })
            .collect();
        let crs = aml::ResourceTemplate::new(resources.iter().map(|r| r.as_ref()).collect());
        let hid_name = aml::Name::new("_HID".into(), hid.as_ref());
        let uid_name = aml::Name::new("_UID".into(), &self.uid);
        let crs_name = aml::Name::new("_CRS".into(), &crs);
        aml::Device::new(
            self.name.as_str().into(),
            vec![&hid_name, &uid_name, &crs_name],
        )
        .to_aml_bytes(sink);
    }
}

/// The AML body of the DSDT: `\_S5_` and one `\_SB_` device per entry of
/// `devices`.
pub fn dsdt_aml(devices: &[DsdtDevice]) -> Vec<u8> {
    let mut bytes = Vec::new();
    let s5_type = S5_SLEEP_TYPE;
    let s5 = aml::Package::new(vec![&s5_type, &s5_type, &aml::ZERO, &aml::ZERO]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut bytes);
    let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    aml::Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut bytes);
    bytes
}

fn table_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The DSDT table.
pub fn dsdt(devices: &[DsdtDevice]) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"EVMMDSDT", 1);
    sdt.append_slice(&dsdt_aml(devices));
    sdt.as_slice().to_vec()
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

/// The FADT: hardware-reduced ACPI, sleep control/status registers for
/// S5, reset register on the i8042 command port.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut builder = FADTBuilder::new(OEM_ID, *b"EVMMFACP", 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    builder.reset_reg = io_register(I8042_PORT + 4);
    builder.reset_value = RESET_VALUE;
    builder.sleep_control_reg = io_register(ACPI_SLEEP_CONTROL_PORT);
    builder.sleep_status_reg = io_register(ACPI_SLEEP_STATUS_PORT);
    builder.iapc_boot_arch =
        (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT).into();
    builder.hypervisor_vendor_identity = u64::from_le_bytes(*b"EVMM\0\0\0\0").into();
    table_bytes(&builder.finalize())
}

/// The MADT: one enabled local APIC per vCPU (APIC id = index) and the
/// IOAPIC with GSI base 0.
pub fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"EVMMAPIC",
        1,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for i in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(ioapic_id(vcpus), IOAPIC_ADDR as u32, 0));
    table_bytes(&madt)
}

fn align8(addr: u64) -> u64 {
    addr.next_multiple_of(8)
}

/// Builds every table, writes them from [`ACPI_START`] and returns the
/// address of the RSDP.
pub fn write_acpi_tables(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    devices: &[DsdtDevice],
) -> Result<GuestAddress, AcpiError> {
    let rsdp_addr = ACPI_START;
    let dsdt_addr = align8(rsdp_addr + Rsdp::len() as u64);
    let dsdt = dsdt(devices);
    let fadt_addr = align8(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align8(fadt_addr + fadt.len() as u64);
    let madt = madt(vcpus);
    let xsdt_addr = align8(madt_addr + madt.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, *b"EVMMXSDT", 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = table_bytes(&xsdt);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge(end - ACPI_START));
    }
    let rsdp = table_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    for (addr, bytes) in [
        (rsdp_addr, &rsdp),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (xsdt_addr, &xsdt),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))?;
    }
    log::debug!(
        "ACPI: RSDP {rsdp_addr:#x} XSDT {xsdt_addr:#x} FADT {fadt_addr:#x} \
         MADT {madt_addr:#x} DSDT {dsdt_addr:#x} ({} bytes)",
        dsdt.len()
    );
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::GuestRam;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn madt_lists_each_cpu_and_the_ioapic() {
        let t = madt(3);
        assert_eq!(&t[..4], b"APIC");
        assert_eq!(u32_at(&t, 4) as usize, t.len());
        assert_eq!(sum(&t), 0);
        assert_eq!(u32_at(&t, 36), 0xfee0_0000);
        // 44-byte header, 3 x 8-byte LAPIC, 12-byte IOAPIC.
        assert_eq!(t.len(), 44 + 3 * 8 + 12);
        for i in 0..3usize {
            let e = &t[44 + 8 * i..44 + 8 * (i + 1)];
            assert_eq!((e[0], e[1], e[2], e[3]), (0, 8, i as u8, i as u8));
            assert_eq!(u32_at(e, 4), 1);
        }
        let io = &t[44 + 24..];
        assert_eq!((io[0], io[1], io[2]), (1, 12, 3));
        assert_eq!(u32_at(io, 4), 0xfec0_0000);
    }

    #[test]
    fn fadt_is_hw_reduced_with_sleep_registers() {
        let t = fadt(0xe0040);
        assert_eq!(&t[..4], b"FACP");
        assert_eq!(sum(&t), 0);
        assert_eq!(u32_at(&t, 4) as usize, t.len());
        assert_eq!(t.len(), 276);
        let flags = u32_at(&t, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // RESET_REG at 116 (GAS), RESET_VALUE at 128.
        assert_eq!(t[116], 1);
        assert_eq!(u64_at(&t, 120), 0x64);
        assert_eq!(t[128], 0xfe);
        // X_DSDT at 140.
        assert_eq!(u64_at(&t, 140), 0xe0040);
        // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256.
        assert_eq!(t[244], 1);
        assert_eq!(u64_at(&t, 248), 0x600);
        assert_eq!(u64_at(&t, 260), 0x601);
    }

    #[test]
    fn dsdt_announces_devices_and_s5() {
        let devices = vec![
            DsdtDevice::com1(),
            DsdtDevice::virtio_mmio(0, 0xc000_0000, 0x1000, 5, true),
            DsdtDevice::virtio_mmio(1, 0xc000_1000, 0x1000, 6, true),
        ];
        let t = dsdt(&devices);
        assert_eq!(&t[..4], b"DSDT");
        assert_eq!(u32_at(&t, 4) as usize, t.len());
        assert_eq!(sum(&t), 0);
        assert!(contains(&t, b"_S5_"));
        assert!(contains(&t, b"_SB_"));
        assert!(contains(&t, b"COM1"));
        assert!(contains(&t, b"VR00"));
        assert!(contains(&t, b"VR01"));
        assert!(contains(&t, b"LNRO0005\0"));
        // Memory32Fixed descriptor for VR01: 0x86, len 9, rw, base, size.
        let mut mem32 = vec![0x86, 0x09, 0x00, 0x01];
        mem32.extend_from_slice(&0xc000_1000u32.to_le_bytes());
        mem32.extend_from_slice(&0x1000u32.to_le_bytes());
        assert!(contains(&t, &mem32));
        // Extended interrupt descriptor for GSI 6: consumer, edge.
        let irq = [0x89, 0x06, 0x00, 0x03, 0x01, 0x06, 0x00, 0x00, 0x00];
        assert!(contains(&t, &irq));
        // An empty device list is still a valid table.
        assert_eq!(sum(&dsdt(&[])), 0);
    }

    #[test]
    fn tables_are_linked_from_the_rsdp() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mem = ram.memory();
        let rsdp_addr = write_acpi_tables(mem, 2, &[DsdtDevice::com1()]).unwrap();
        assert_eq!(rsdp_addr.0, 0xe0000);
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, rsdp_addr).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        assert_eq!(rsdp[15], 2);
        let xsdt_addr = u64_at(&rsdp, 24);

        let read_table = |addr: u64| {
            let mut hdr = [0u8; 8];
            mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
            let mut t = vec![0u8; u32_at(&hdr, 4) as usize];
            mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
            assert_eq!(
                sum(&t),
                0,
                "checksum of {:?}",
                String::from_utf8_lossy(&t[..4])
            );
            t
        };
        let xsdt = read_table(xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        let fadt = read_table(u64_at(&xsdt, 36));
        assert_eq!(&fadt[..4], b"FACP");
        let madt = read_table(u64_at(&xsdt, 44));
        assert_eq!(&madt[..4], b"APIC");
        let dsdt = read_table(u64_at(&fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
    }
}

//! The Linux 64-bit boot protocol: the zero page (`struct boot_params`).

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::GuestAddress;

use super::loader::LoadedInitramfs;
use crate::arch::layout::ZERO_PAGE_START;
use crate::vstate::memory::{E820Entry, GuestMemoryMmap};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;

/// Errors while writing the zero page.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    /// More e820 entries than the zero page holds.
    #[error("too many e820 entries ({0})")]
    TooManyE820Entries(usize),
    /// Writing guest memory failed.
    #[error("cannot write the zero page: {0}")]
    Write(#[from] linux_loader::configurator::Error),
}

/// Builds the zero page for the 64-bit boot protocol.
///
/// `header` is the bzImage's setup header (None for an ELF vmlinux, in which
/// case a minimal header is made up).
pub fn build_boot_params(
    header: Option<setup_header>,
    cmdline_addr: GuestAddress,
    cmdline_size: usize,
    initramfs: Option<LoadedInitramfs>,
    e820: &[E820Entry],
    rsdp_addr: GuestAddress,
) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params {
        hdr: header.unwrap_or_else(|| setup_header {
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            header: KERNEL_HDR_MAGIC,
            kernel_alignment: KERNEL_MIN_ALIGNMENT_BYTES,
            ..Default::default()
        }),
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = cmdline_addr.0 as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    if let Some(initrd) = initramfs {
        params.hdr.ramdisk_image = initrd.addr.0 as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = rsdp_addr.0;

    if e820.len() > params.e820_table.len() {
        return Err(BootParamsError::TooManyE820Entries(e820.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind as u32,
        };
    }
    params.e820_entries = e820.len() as u8;
    Ok(params)
}

/// Writes the zero page at [`ZERO_PAGE_START`].
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    params: &boot_params,
) -> Result<(), BootParamsError> {
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::{e820_map, GuestRam};
    use vm_memory::Bytes;

    #[test]
    fn zero_page_fields() {
        let e820 = e820_map(512 << 20);
        let initrd = LoadedInitramfs {
            addr: GuestAddress(0x1f00_0000),
            size: 0x12345,
        };
        let p = build_boot_params(
            None,
            GuestAddress(0x20000),
            42,
            Some(initrd),
            &e820,
            GuestAddress(0xe0000),
        )
        .unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!(p.hdr.type_of_loader, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.ramdisk_image }, 0x1f00_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x12345);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries as usize, e820.len());
        assert_eq!({ p.e820_table[3].addr }, 0x10_0000);
        assert_eq!({ p.e820_table[3].r#type }, 1);

        let ram = GuestRam::new(16 << 20).unwrap();
        write_boot_params(ram.memory(), &p).unwrap();
        let back: boot_params = ram
            .memory()
            .read_obj(GuestAddress(ZERO_PAGE_START))
            .unwrap();
        assert_eq!({ back.hdr.ramdisk_size }, 0x12345);
        // e820_entries lives at offset 0x1e8 of the zero page.
        let n: u8 = ram
            .memory()
            .read_obj(GuestAddress(ZERO_PAGE_START + 0x1e8))
            .unwrap();
        assert_eq!(n as usize, e820.len());
    }

    #[test]
    fn keeps_bzimage_header() {
        let hdr = setup_header {
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            header: KERNEL_HDR_MAGIC,
            version: 0x20f,
            init_size: 0x100_0000,
            ..Default::default()
        };
        let p = build_boot_params(
            Some(hdr),
            GuestAddress(0x20000),
            1,
            None,
            &[],
            GuestAddress(0),
        )
        .unwrap();
        assert_eq!({ p.hdr.version }, 0x20f);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
        assert_eq!(p.e820_entries, 0);
    }
}

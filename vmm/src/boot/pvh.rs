//! The PVH boot protocol: `hvm_start_info`, module list and memory map.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::GuestAddress;

use super::loader::LoadedInitramfs;
use crate::arch::layout::{PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START};
use crate::vstate::memory::{E820Entry, GuestMemoryMmap};

/// Errors while writing the PVH structures.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the PVH start info: {0}")]
pub struct PvhError(#[from] linux_loader::configurator::Error);

/// The PVH structures, ready to be written.
pub struct PvhInfo {
    /// The start info.
    pub start_info: hvm_start_info,
    /// The memory map.
    pub memmap: Vec<hvm_memmap_table_entry>,
    /// The module list (the initramfs, if any).
    pub modules: Vec<hvm_modlist_entry>,
}

/// Builds the PVH start info for the given command line, initramfs, memory
/// map and RSDP.
pub fn build_pvh_info(
    cmdline_addr: GuestAddress,
    initramfs: Option<LoadedInitramfs>,
    e820: &[E820Entry],
    rsdp_addr: GuestAddress,
) -> PvhInfo {
    let memmap: Vec<_> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let modules: Vec<_> = initramfs
        .iter()
        .map(|i| hvm_modlist_entry {
            paddr: i.addr.0,
            size: i.size,
            ..Default::default()
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_START
        },
        cmdline_paddr: cmdline_addr.0,
        rsdp_paddr: rsdp_addr.0,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    PvhInfo {
        start_info,
        memmap,
        modules,
    }
}

/// Writes the PVH structures at their fixed addresses.
pub fn write_pvh_info(mem: &GuestMemoryMmap, info: &PvhInfo) -> Result<(), PvhError> {
    let mut params = BootParams::new(&info.start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&info.memmap, GuestAddress(PVH_MEMMAP_START));
    if !info.modules.is_empty() {
        params.set_modules(&info.modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::{e820_map, GuestRam};
    use vm_memory::Bytes;

    #[test]
    fn start_info_is_written() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let e820 = e820_map(64 << 20);
        let initrd = LoadedInitramfs {
            addr: GuestAddress(0x300_0000),
            size: 4096,
        };
        let info = build_pvh_info(
            GuestAddress(0x20000),
            Some(initrd),
            &e820,
            GuestAddress(0xe0000),
        );
        write_pvh_info(ram.memory(), &info).unwrap();
        let si: hvm_start_info = ram.memory().read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(si.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(si.nr_modules, 1);
        assert_eq!(si.memmap_entries as usize, e820.len());
        assert_eq!(si.rsdp_paddr, 0xe0000);
        let m: hvm_modlist_entry = ram
            .memory()
            .read_obj(GuestAddress(PVH_MODLIST_START))
            .unwrap();
        assert_eq!(m.paddr, 0x300_0000);
        let e: hvm_memmap_table_entry = ram
            .memory()
            .read_obj(GuestAddress(PVH_MEMMAP_START + 24 * 3))
            .unwrap();
        assert_eq!(e.addr, 0x10_0000);
        assert_eq!(e.type_, 1);
    }
}

//! Putting a kernel, its command line and initramfs into guest memory, and
//! the boot-protocol structures (zero page or PVH start info) that tell the
//! kernel where everything is.

pub mod bootparams;
pub mod loader;
pub mod pvh;

use std::path::Path;

use linux_loader::loader::{load_cmdline, Cmdline};
use vm_memory::GuestAddress;

pub use loader::{KernelEntry, LoadedInitramfs, LoadedKernel};

use crate::arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START};
use crate::vstate::memory::{E820Entry, GuestMemoryMmap};

/// Highest initramfs end address for kernels that do not say
/// (`initrd_addr_max` of boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Errors while preparing the guest for boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Loading the kernel or initramfs failed.
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    /// The command line is too long.
    #[error("--cmdline is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command line cannot be used.
    #[error("invalid --cmdline: {0}")]
    Cmdline(String),
    /// Writing the zero page failed.
    #[error(transparent)]
    BootParams(#[from] bootparams::BootParamsError),
    /// Writing the PVH structures failed.
    #[error(transparent)]
    Pvh(#[from] pvh::PvhError),
}

/// What the caller hands to [`prepare_boot`].
pub struct BootSpec<'a> {
    /// Kernel image.
    pub kernel: &'a Path,
    /// Optional initramfs.
    pub initramfs: Option<&'a Path>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// The guest's memory map.
    pub e820: &'a [E820Entry],
    /// Where the ACPI RSDP is.
    pub rsdp_addr: GuestAddress,
}

/// Loads everything into `mem` and returns how to enter the kernel.
pub fn prepare_boot(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<KernelEntry, BootError> {
    let kernel = loader::load_kernel(mem, spec.kernel)?;

    // The kernel's own limits, from its setup header when it has one.
    let (cmdline_max, initrd_max) = match kernel.entry {
        KernelEntry::Linux64 {
            setup_header: Some(hdr),
            ..
        } => {
            let cmdline_max = if hdr.cmdline_size > 0 {
                hdr.cmdline_size as usize + 1
            } else {
                256
            };
            let initrd_max = if hdr.initrd_addr_max > 0 {
                u64::from(hdr.initrd_addr_max)
            } else {
                DEFAULT_INITRD_ADDR_MAX
            };
            (cmdline_max, initrd_max)
        }
        _ => (CMDLINE_MAX_SIZE, u64::from(u32::MAX)),
    };

    if spec.cmdline.len() + 1 > cmdline_max {
        return Err(BootError::CmdlineTooLong {
            len: spec.cmdline.len(),
            max: cmdline_max - 1,
        });
    }
    let cmdline = Cmdline::try_from(spec.cmdline, cmdline_max)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    let initramfs = spec
        .initramfs
        .map(|path| loader::load_initramfs(mem, path, kernel.end, initrd_max + 1))
        .transpose()?;

    match kernel.entry {
        KernelEntry::Linux64 { setup_header, .. } => {
            let params = bootparams::build_boot_params(
                setup_header,
                GuestAddress(CMDLINE_START),
                spec.cmdline.len() + 1,
                initramfs,
                spec.e820,
                spec.rsdp_addr,
            )?;
            bootparams::write_boot_params(mem, &params)?;
        }
        KernelEntry::Pvh { .. } => {
            let info = pvh::build_pvh_info(
                GuestAddress(CMDLINE_START),
                initramfs,
                spec.e820,
                spec.rsdp_addr,
            );
            pvh::write_pvh_info(mem, &info)?;
        }
    }
    Ok(kernel.entry)
}

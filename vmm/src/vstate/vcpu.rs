//! vCPUs: creation, initial state, the run loop on a thread of its own, and
//! the signal that kicks a vCPU out of KVM_RUN when the VM stops.

use std::cell::Cell;
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{kvm_run, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::cpuid::{patch_cpuid, VcpuTopology};
use crate::arch::{msr, regs};
use crate::boot::KernelEntry;
use crate::devices::bus::Bus;
use crate::vstate::exit::{ExitReason, VmExit};
use crate::vstate::memory::GuestMemoryMmap;

/// Errors while creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {index}: {source}")]
    Create {
        /// vCPU index.
        index: u8,
        /// Underlying error.
        source: kvm_ioctls::Error,
    },
    /// A configuration ioctl failed.
    #[error("cannot configure vCPU {index}: {what}: {source}")]
    Configure {
        /// vCPU index.
        index: u8,
        /// What was being set.
        what: &'static str,
        /// Underlying error.
        source: kvm_ioctls::Error,
    },
    /// The CPUID table could not be extended.
    #[error("cannot build the CPUID of vCPU {index}: {source:?}")]
    Cpuid {
        /// vCPU index.
        index: u8,
        /// Underlying error.
        source: vmm_sys_util::fam::Error,
    },
    /// Initial registers could not be set.
    #[error("cannot set up vCPU {index}: {source}")]
    Regs {
        /// vCPU index.
        index: u8,
        /// Underlying error.
        source: regs::RegsError,
    },
    /// KVM refused a boot MSR that it had listed as supported.
    #[error(
        "cannot configure vCPU {index}: this host's KVM refused MSR {msr:#x} ({name}) = {value:#x}"
    )]
    MsrRefused {
        /// vCPU index.
        index: u8,
        /// The MSR's index.
        msr: u32,
        /// Its name.
        name: &'static str,
        /// The value refused.
        value: u64,
    },
    /// Starting the thread failed.
    #[error("cannot start the thread of vCPU {index}: {source}")]
    Spawn {
        /// vCPU index.
        index: u8,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Registering the kick signal failed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

/// What every vCPU is configured from.
pub struct VcpuSetup<'a> {
    /// KVM_GET_SUPPORTED_CPUID.
    pub supported_cpuid: &'a CpuId,
    /// Number of vCPUs in the VM.
    pub count: u8,
    /// Whether KVM has the TSC deadline timer.
    pub tsc_deadline: bool,
    /// The boot MSRs this host's KVM offers ([`msr::boot_msr_entries`]).
    pub msrs: &'a [msr::BootMsr],
    /// Guest memory (for the boot vCPU's GDT and page tables).
    pub memory: &'a GuestMemoryMmap,
    /// How the boot vCPU enters the kernel.
    pub entry: &'a KernelEntry,
}

/// One vCPU, ready to run.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<VmExit>,
}

impl Vcpu {
    /// Creates vCPU `index` (APIC id = index) and sets its initial state.
    /// Only the boot vCPU (index 0) gets registers: the others wait for
    /// INIT/SIPI from the guest in the in-kernel local APIC.
    pub fn new(
        vm: &VmFd,
        index: u8,
        setup: &VcpuSetup,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<VmExit>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        let configure = |what| {
            move |source| VcpuError::Configure {
                index,
                what,
                source,
            }
        };

        let mut cpuid = setup.supported_cpuid.clone();
        patch_cpuid(
            &mut cpuid,
            VcpuTopology {
                index,
                count: setup.count,
                tsc_deadline: setup.tsc_deadline,
            },
        )
        .map_err(|source| VcpuError::Cpuid { index, source })?;
        fd.set_cpuid2(&cpuid).map_err(configure("CPUID"))?;

        let msrs =
            msr::to_kvm_msrs(setup.msrs).map_err(|source| VcpuError::Cpuid { index, source })?;
        let set = fd.set_msrs(&msrs).map_err(configure("MSRs"))?;
        if let Some(refused) = setup.msrs.get(set) {
            return Err(VcpuError::MsrRefused {
                index,
                msr: refused.index,
                name: refused.name,
                value: refused.value,
            });
        }

        regs::setup_fpu(&fd).map_err(|source| VcpuError::Regs { index, source })?;
        regs::setup_lint(&fd).map_err(|source| VcpuError::Regs { index, source })?;
        if index == 0 {
            regs::setup_sregs(setup.memory, &fd, setup.entry)
                .map_err(|source| VcpuError::Regs { index, source })?;
            regs::setup_regs(&fd, setup.entry)
                .map_err(|source| VcpuError::Regs { index, source })?;
        }
        Ok(Vcpu {
            index,
            fd,
            pio,
            mmio,
            exit,
        })
    }

    /// Starts the run loop on a thread named `vcpu<index>`, confined to the vCPU's
    /// seccomp filter in `seccomp` mode before it first enters the guest.
    pub fn spawn(self, seccomp: evmm_seccomp::Mode) -> Result<JoinHandle<()>, VcpuError> {
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                if let Err(e) = evmm_seccomp::confine(evmm_seccomp::ThreadKind::Vcpu, seccomp) {
                    self.exit.request(ExitReason::Error(e.to_string()));
                    return;
                }
                self.run()
            })
            .map_err(|source| VcpuError::Spawn { index, source })
    }

    fn run(mut self) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|p| p.set(run_ptr));
        while !self.exit.is_stopping() {
            if let Err(reason) = self.run_once() {
                self.exit.request(reason);
            }
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        log::debug!("vCPU {} stopped", self.index);
    }

    /// The vCPU's state in one line, for a guest that died without a word (a triple
    /// fault): where it was, its paging and descriptor tables, and the event KVM was
    /// delivering. What cannot be read is left out.
    fn state_line(&self) -> String {
        let mut line = String::new();
        if let Ok(r) = self.fd.get_regs() {
            line += &format!("rip {:#x} rsp {:#x} rflags {:#x}", r.rip, r.rsp, r.rflags);
        }
        if let Ok(s) = self.fd.get_sregs() {
            line += &format!(
                " cs {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} idt {:#x}/{:#x} gdt {:#x}/{:#x} tr {:#x}",
                s.cs.selector,
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer,
                s.idt.base,
                s.idt.limit,
                s.gdt.base,
                s.gdt.limit,
                s.tr.base
            );
        }
        if let Ok(e) = self.fd.get_vcpu_events() {
            line += &format!(
                " exception {}:{} (error code {:#x}) interrupt {}:{} nmi {}",
                e.exception.injected,
                e.exception.nr,
                e.exception.error_code,
                e.interrupt.injected,
                e.interrupt.nr,
                e.nmi.injected
            );
        }
        line
    }

    /// Runs the guest until its next exit and handles it. An `Err` stops
    /// the VM with that reason.
    fn run_once(&mut self) -> Result<(), ExitReason> {
        let index = self.index;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                self.pio.read(u64::from(port), data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                self.pio.write(u64::from(port), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.mmio.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.mmio.write(addr, data);
            }
            Ok(VcpuExit::Hlt) => {
                // With the in-kernel LAPIC KVM handles HLT itself.
                log::debug!("vCPU {index}: HLT exit");
            }
            Ok(VcpuExit::Shutdown) => {
                log::warn!("vCPU {index} triple-faulted: {}", self.state_line());
                return Err(ExitReason::TripleFault);
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                log::debug!("vCPU {index}: system event {kind}");
                return Err(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                    _ => ExitReason::Reset,
                });
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Err(ExitReason::Error(format!(
                    "vCPU {index}: KVM entry failed (hardware reason {reason:#x}, cpu {cpu})"
                )));
            }
            Ok(VcpuExit::InternalError) => {
                let suberror = self.fd.get_kvm_run().__bindgen_anon_1;
                // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member
                // of the exit union is the one KVM filled in.
                let suberror = unsafe { suberror.internal.suberror };
                let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or_default();
                return Err(ExitReason::Error(format!(
                    "vCPU {index}: KVM internal error (suberror {suberror}) at rip {rip:#x}"
                )));
            }
            Ok(other) => {
                log::debug!("vCPU {index}: ignoring exit {other:?}");
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked (or a spurious signal): clear immediate_exit and
                // let the loop check whether the VM is stopping.
                self.fd.set_kvm_immediate_exit(0);
            }
            Err(e) => {
                return Err(ExitReason::Error(format!(
                    "vCPU {index}: KVM_RUN failed: {e}"
                )));
            }
        }
        Ok(())
    }
}

thread_local! {
    /// The kvm_run area of the vCPU running on this thread, so the kick
    /// signal handler can set `immediate_exit`.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|p| p.get());
    if !run.is_null() {
        // SAFETY: `run` points to this thread's mmapped kvm_run, which stays
        // mapped while the vCPU thread runs (it is cleared before the VcpuFd
        // is dropped); a byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick signal handler (once per process is enough).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::Signal)
}

/// Sends the kick signal to a vCPU thread.
pub fn kick(handle: &JoinHandle<()>) {
    if let Err(e) = handle.kill(kick_signal()) {
        log::debug!("cannot kick vCPU thread: {e}");
    }
}

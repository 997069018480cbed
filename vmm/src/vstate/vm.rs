//! Building a VM from a [`VmConfig`] and running it until it stops.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use evmm_seccomp::ThreadKind;
use evmm_virtio::worker::WorkerKind;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::acpi::{self, DsdtDevice};
use crate::arch::layout::{
    ACPI_SLEEP_CONTROL_PORT, COM1_GSI, COM1_PORT, I8042_PORT, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR,
};
use crate::arch::{bios, mptable};
use crate::boot::{self, BootSpec, KernelEntry};
use crate::config::VmConfig;
use crate::device_manager::{self, DeviceError, PendingDevice, VirtioDevices};
use crate::devices::acpi_pm::AcpiSleep;
use crate::devices::bus::{Bus, BusError};
use crate::devices::exit_port::{ExitPort, EXIT_PORT};
use crate::devices::i8042::I8042;
use crate::devices::serial::{IrqTrigger, SerialDevice};
use crate::event_loop;
use crate::signals::StopSignals;
use crate::terminal::RawModeGuard;
use crate::vstate::exit::{ExitReason, ExitTrigger, VmExit};
use crate::vstate::memory::{e820_map, GuestRam, MemoryError};
use crate::vstate::vcpu::{self, Vcpu, VcpuError, VcpuSetup};

/// The KVM device evmm opens unless told otherwise.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";
/// How long to wait for vCPU threads to leave KVM_RUN when stopping.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors while building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The KVM device cannot be opened.
    #[error("cannot open {path}: {source}{hint}")]
    OpenKvm {
        /// The device path.
        path: PathBuf,
        /// Underlying error.
        source: kvm_ioctls::Error,
        /// Advice for common causes.
        hint: &'static str,
    },
    /// KVM lacks something evmm needs.
    #[error("KVM does not support {0}, which evmm needs")]
    MissingCapability(&'static str),
    /// More vCPUs than KVM allows.
    #[error("--cpus {requested} is more than this host's KVM allows ({max})")]
    TooManyVcpus {
        /// Requested vCPUs.
        requested: u8,
        /// KVM's limit.
        max: usize,
    },
    /// A VM-level KVM ioctl failed.
    #[error("cannot {what}: {source}")]
    Kvm {
        /// What failed.
        what: &'static str,
        /// Underlying error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel or initramfs could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// Devices overlap.
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    /// A vCPU could not be created or started.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A virtio device could not be created or wired to KVM.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The `--metrics` file could not be written.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// An OS facility (eventfd, signalfd, epoll) failed.
    #[error("cannot {what}: {source}")]
    Io {
        /// What failed.
        what: &'static str,
        /// Underlying error.
        source: std::io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// A built VM: memory loaded, devices on their buses, vCPUs configured.
pub struct Vm {
    // Field order is drop order: vCPUs (which share the devices through the
    // MMIO bus) first, then the devices, the VM fd, memory last.
    vcpus: Vec<Vcpu>,
    devices: VirtioDevices,
    metrics_path: Option<PathBuf>,
    seccomp: evmm_seccomp::Mode,
    /// Whether standard input is the console's (see [`VmConfig::console_input`]).
    console_input: bool,
    serial: Arc<Mutex<SerialDevice>>,
    exit: Arc<VmExit>,
    _vm: VmFd,
    _kvm: Kvm,
    ram: GuestRam,
}

/// Opens the KVM device at `path`, with a hint for the usual failures.
pub fn open_kvm(path: &std::path::Path) -> Result<Kvm, VmError> {
    use std::os::unix::ffi::OsStrExt;
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| VmError::OpenKvm {
            path: path.to_path_buf(),
            source: kvm_ioctls::Error::new(libc::EINVAL),
            hint: "",
        })?;
    Kvm::new_with_path(&c_path).map_err(|source| {
        let hint = match source.errno() {
            libc::ENOENT => " (KVM is not available: is the kvm module loaded?)",
            libc::EACCES | libc::EPERM => {
                " (evmm needs read and write access to it, e.g. membership of the kvm group)"
            }
            _ => "",
        };
        VmError::OpenKvm {
            path: path.to_path_buf(),
            source,
            hint,
        }
    })
}

fn check_capabilities(kvm: &Kvm) -> Result<(), VmError> {
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip (KVM_CAP_IRQCHIP)"),
        (Cap::Pit2, "the in-kernel PIT (KVM_CAP_PIT2)"),
        (Cap::UserMemory, "user memory regions (KVM_CAP_USER_MEMORY)"),
        (Cap::Irqfd, "irqfds (KVM_CAP_IRQFD)"),
        (
            Cap::ImmediateExit,
            "immediate exit (KVM_CAP_IMMEDIATE_EXIT)",
        ),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCapability(name));
        }
    }
    Ok(())
}

impl Vm {
    /// Builds the VM: loads the kernel, writes the firmware tables, opens
    /// KVM, creates the irqchip, devices and vCPUs. Nothing runs yet.
    pub fn new(config: &VmConfig, kvm_device: &std::path::Path) -> Result<Self, VmError> {
        // Files first: bad input is reported before anything touches KVM.
        let ram = GuestRam::new(config.memory_bytes)?;
        let mem = ram.memory();
        let e820 = e820_map(config.memory_bytes);
        let disk_configs = &config.devices.disks;
        let vhost_user_configs = &config.devices.vhost_user_blk;
        let slots = device_manager::mmio_slots(config.devices.count())?;
        let disks = device_manager::open_disks(disk_configs)?;
        let (disk_slots, rest) = slots.split_at(disk_configs.len());
        let (vhost_user_slots, rest) = rest.split_at(vhost_user_configs.len());
        let (net_slots, fs_slots) = rest.split_at(config.devices.nets.len());
        let nets = device_manager::open_nets(&config.devices.nets, net_slots, mem)?;
        start_worker_spawner(config.seccomp)?;
        let vhost_user = device_manager::connect_vhost_user(vhost_user_configs, vhost_user_slots)?;
        let fs = device_manager::connect_fs(&config.devices.fs, fs_slots)?;
        let mut dsdt_devices = vec![DsdtDevice::com1()];
        dsdt_devices.extend(slots.iter().map(|s| s.dsdt_device()));
        let cmdline = device_manager::kernel_cmdline(&config.cmdline, &slots);
        let rsdp = acpi::write_acpi_tables(mem, config.vcpus, &dsdt_devices)?;
        mptable::write_mptable(mem, config.vcpus)?;
        bios::write_reset_vector(mem).map_err(|e| VmError::Io {
            what: "write the reset vector",
            source: std::io::Error::other(e.to_string()),
        })?;
        let entry = boot::prepare_boot(
            mem,
            &BootSpec {
                kernel: &config.kernel,
                initramfs: config.initramfs.as_deref(),
                cmdline: &cmdline,
                e820: &e820,
                rsdp_addr: rsdp,
            },
        )?;

        let kvm = open_kvm(kvm_device)?;
        check_capabilities(&kvm)?;
        let max = kvm.get_max_vcpus();
        if usize::from(config.vcpus) > max {
            return Err(VmError::TooManyVcpus {
                requested: config.vcpus,
                max,
            });
        }
        let vm = crate::eintr::retry(|| kvm.create_vm()).map_err(kvm_err("create the VM"))?;
        register_memory(&vm, &ram)?;
        vm.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(kvm_err("set the TSS address"))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm_err("set the identity map address"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(kvm_err("create the in-kernel PIT"))?;

        let exit = VmExit::new().map_err(io_err("create the exit eventfd"))?;
        let serial_evt = EventFd::new(EFD_NONBLOCK).map_err(io_err("create an eventfd"))?;
        vm.register_irqfd(&serial_evt, COM1_GSI)
            .map_err(kvm_err("register the serial irqfd"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            IrqTrigger::new(serial_evt),
            Box::new(std::io::stdout()),
        )));
        let mut pio = Bus::new("pio");
        pio.insert(u64::from(COM1_PORT), 8, serial.clone())?;
        pio.insert(
            u64::from(I8042_PORT),
            5,
            Arc::new(Mutex::new(I8042::new(ExitTrigger::new(
                exit.clone(),
                ExitReason::Reset,
            )))),
        )?;
        pio.insert(
            u64::from(ACPI_SLEEP_CONTROL_PORT),
            2,
            Arc::new(Mutex::new(AcpiSleep::new(exit.clone()))),
        )?;
        if config.exit_device {
            pio.insert(
                u64::from(EXIT_PORT),
                1,
                Arc::new(Mutex::new(ExitPort::new(exit.clone()))),
            )?;
        }
        let pio = Arc::new(pio);
        let mut mmio = Bus::new("mmio");
        let pending = disk_slots
            .iter()
            .zip(disk_configs)
            .zip(disks)
            .map(|((&slot, config), block)| PendingDevice::block(slot, config, block))
            .chain(
                vhost_user_slots
                    .iter()
                    .zip(vhost_user)
                    .map(|(&slot, dev)| PendingDevice::vhost_user_blk(slot, dev)),
            )
            .chain(nets)
            .chain(
                fs_slots
                    .iter()
                    .zip(&config.devices.fs)
                    .zip(fs)
                    .map(|((&slot, c), dev)| PendingDevice::vhost_user_fs(slot, c, dev)),
            )
            .collect();
        let devices =
            VirtioDevices::attach(&kvm, &vm, &mut mmio, mem, config.devices.notify, pending)?;
        let mmio = Arc::new(mmio);

        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get the supported CPUID"))?;
        let host_msrs = crate::arch::msr::HostMsrs::query(&kvm, &supported_cpuid)
            .map_err(kvm_err("list the MSRs KVM supports"))?;
        let msrs = crate::arch::msr::boot_msr_entries(&host_msrs);
        let setup = VcpuSetup {
            supported_cpuid: &supported_cpuid,
            count: config.vcpus,
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
            msrs: &msrs,
            memory: mem,
            entry: &entry,
        };
        let vcpus = (0..config.vcpus)
            .map(|i| Vcpu::new(&vm, i, &setup, pio.clone(), mmio.clone(), exit.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        log_entry(&entry, config);

        Ok(Vm {
            vcpus,
            devices,
            metrics_path: config.devices.metrics.clone(),
            seccomp: config.seccomp,
            console_input: config.console_input,
            serial,
            exit,
            _vm: vm,
            _kvm: kvm,
            ram,
        })
    }

    /// Runs the VM until the guest powers off or resets, a vCPU fails, or
    /// evmm gets a stop signal. Every vCPU thread is joined before this
    /// returns.
    pub fn run(mut self) -> Result<ExitReason, VmError> {
        let mut signals = StopSignals::new().map_err(io_err("set up signal handling"))?;
        vcpu::install_kick_handler()?;
        let raw_mode = match self
            .console_input
            .then(|| RawModeGuard::new(libc::STDIN_FILENO))
        {
            None => None,
            Some(Ok(guard)) => guard,
            Some(Err(e)) => {
                log::warn!("cannot put the terminal in raw mode: {e}");
                None
            }
        };

        let seccomp = self.seccomp;
        let mut handles = Vec::new();
        let mut spawn_error = None;
        for vcpu in self.vcpus.drain(..) {
            match vcpu.spawn(seccomp) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    spawn_error = Some(e);
                    self.exit
                        .request(ExitReason::Error("vCPU start failed".into()));
                    break;
                }
            }
        }

        if let Err(e) = evmm_seccomp::confine(ThreadKind::Main, seccomp) {
            self.exit.request(ExitReason::Error(e.to_string()));
        }
        let loop_result =
            event_loop::run(&self.exit, &self.serial, &mut signals, self.console_input);
        if loop_result.is_err() {
            self.exit
                .request(ExitReason::Error("main event loop failed".into()));
        }
        stop_vcpus(handles);
        drop(raw_mode);

        // The vCPUs are stopped, so the guest sends no more requests: write
        // the counters, then drop the devices, which stops and joins their
        // workers.
        let metrics_result = match &self.metrics_path {
            Some(path) => self.devices.metrics().write_to(path),
            None => Ok(()),
        };
        drop(self.devices);

        if let Some(e) = spawn_error {
            return Err(e.into());
        }
        loop_result.map_err(io_err("run the main event loop"))?;
        metrics_result?;
        let reason = self
            .exit
            .reason()
            .unwrap_or(ExitReason::Error("VM stopped for no reason".into()));
        log::info!(
            "VM stopped: {reason} ({} MiB guest RAM)",
            self.ram.size() >> 20
        );
        Ok(reason)
    }
}

/// From here on device workers (the first: a vhost-user device's backend monitor)
/// are started by a spawner thread of their own and confined to their kind, so
/// that a vCPU activating a device needs no right to create threads.
fn start_worker_spawner(mode: evmm_seccomp::Mode) -> Result<(), VmError> {
    if mode == evmm_seccomp::Mode::Off {
        return Ok(());
    }
    let probe = std::env::var(SECCOMP_PROBE_ENV).ok();
    evmm_virtio::worker::start_worker_spawner(
        move || confine(ThreadKind::Spawner, mode),
        Box::new(move |kind| {
            confine(worker_thread_kind(kind), mode)?;
            if probe.as_deref() == Some(worker_name(kind)) {
                forbidden_syscall(kind);
            }
            Ok(())
        }),
    )
    .map_err(io_err("start the worker spawner"))
}

/// For the tests of the filters: a worker of the kind this names ("blk", "net",
/// "takeover", "monitor", "control") makes a syscall no worker may make once it is confined.
/// Read once at start-up, from the environment of whoever starts evmm.
pub const SECCOMP_PROBE_ENV: &str = "EVMM_SECCOMP_PROBE";

fn worker_name(kind: WorkerKind) -> &'static str {
    match kind {
        WorkerKind::Block { .. } => "blk",
        WorkerKind::Net => "net",
        WorkerKind::Takeover => "takeover",
        WorkerKind::BackendMonitor => "monitor",
        WorkerKind::BackendControl => "control",
    }
}

/// Creates (and closes) a socket: no worker's filter allows it.
fn forbidden_syscall(kind: WorkerKind) {
    log::warn!("{SECCOMP_PROBE_ENV}: the {kind:?} worker makes a forbidden syscall");
    // SAFETY: a syscall without pointers; a descriptor it returns is closed at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        // SAFETY: `fd` was just created and is owned by nobody else.
        unsafe { libc::close(fd) };
    }
}

/// Confines the calling thread, as an I/O error (the spawner's and workers' type).
fn confine(kind: ThreadKind, mode: evmm_seccomp::Mode) -> std::io::Result<()> {
    evmm_seccomp::confine(kind, mode).map_err(std::io::Error::other)
}

/// The filter of a device worker of `kind`.
fn worker_thread_kind(kind: WorkerKind) -> ThreadKind {
    match kind {
        WorkerKind::Block { io_uring: false } => ThreadKind::BlockWorker,
        WorkerKind::Block { io_uring: true } => ThreadKind::BlockWorkerUring,
        WorkerKind::Net => ThreadKind::NetWorker,
        WorkerKind::Takeover => ThreadKind::Takeover,
        WorkerKind::BackendMonitor => ThreadKind::BackendMonitor,
        WorkerKind::BackendControl => ThreadKind::BackendControl,
    }
}

fn log_entry(entry: &KernelEntry, config: &VmConfig) {
    let how = match entry {
        KernelEntry::Linux64 { .. } => "64-bit Linux boot protocol",
        KernelEntry::Pvh { .. } => "PVH",
    };
    log::info!(
        "booting {} via {how}: {} vCPU(s), {} MiB",
        config.kernel.display(),
        config.vcpus,
        config.memory_bytes >> 20
    );
}

fn register_memory(vm: &VmFd, ram: &GuestRam) -> Result<(), VmError> {
    for (slot, region) in ram.memory().iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| {
                VmError::Memory(MemoryError::Memfd(std::io::Error::other(
                    "guest region has no host mapping",
                )))
            })?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is mapped for as long as `ram` lives, and the
        // Vm struct drops the VM fd before `ram`.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(kvm_err("register guest memory with KVM"))?;
    }
    Ok(())
}

/// Kicks every vCPU thread out of KVM_RUN until it ends, and joins it.
fn stop_vcpus(handles: Vec<JoinHandle<()>>) {
    let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
    for handle in handles {
        let name = handle.thread().name().unwrap_or("vcpu").to_string();
        while !handle.is_finished() {
            if Instant::now() > deadline {
                log::error!("{name} did not stop within {VCPU_STOP_TIMEOUT:?}; not joined");
                break;
            }
            vcpu::kick(&handle);
            std::thread::sleep(Duration::from_millis(1));
        }
        if handle.is_finished() && handle.join().is_err() {
            log::error!("{name} panicked");
        }
    }
}

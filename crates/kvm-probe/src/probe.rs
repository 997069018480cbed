//! KVM capability probe: does this host's `/dev/kvm` run guest ring-0 code
//! natively, or does it emulate it instruction by instruction?
//!
//! Some KVMs (PVM, the hypervisor that backs `/dev/kvm` when the host kernel
//! is itself a guest) run guest ring-3 code natively but emulate every guest
//! ring-0 instruction. A Linux guest kernel is then unusably slow, while a
//! bare-metal guest whose hot loop runs at CPL 3 still runs at full speed.
//!
//! The probe builds a tiny long-mode guest (identity-mapped 4-level page
//! tables, a GDT with 64-bit code segments for DPL 0 and DPL 3, everything set
//! up through `KVM_SET_SREGS`, so the vCPU starts directly in long mode) and
//! times `KVM_RUN` over the loop
//!
//! ```text
//! 1: dec rcx        ; rcx = N, set through KVM_SET_REGS
//!    jnz 1b
//!    mov [rdx], eax ; rdx = an unbacked guest-physical address: KVM_EXIT_MMIO
//! ```
//!
//! once at CPL 0 and once at CPL 3. The exit is an MMIO write rather than
//! `out` or `hlt` because both of those fault at CPL 3 (IOPL 0). Each CPL is
//! timed at N and 2N iterations (the minimum of a few runs each) and the
//! difference divided by N gives the cost of one iteration with the fixed
//! cost of entering and leaving the guest cancelled out. Without an explicit
//! iteration count, N is calibrated so that one N-iteration run takes at
//! least [`TARGET_RUN_TIME`].

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::long_mode::{FlatLayout, FlatTables};
use kvm_bindings::{kvm_regs, kvm_sregs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use log::{debug, info};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// A ring-0 loop iteration slower than this (in ns) is emulated whatever the
/// ring-3 figure: `dec rcx; jnz` is one or two cycles on any real x86 CPU
/// (under 2 ns even at 1 GHz), and even a fully software-emulated (TCG) L1
/// running a genuine hardware-virtualisation KVM runs it in ~2 ns.
/// PVM's instruction emulator takes ~450-1,200 ns.
pub const EMULATED_ABS_NS: f64 = 50.0;

/// A ring-0 loop iteration more than this many times slower than the same loop
/// at ring 3 is emulated (provided it is also slower than
/// [`EMULATED_RATIO_FLOOR_NS`]). Natively both rings run the loop at the same
/// speed (ratio ~1); PVM shows a ratio of ~2,000-4,000.
pub const EMULATED_RATIO: f64 = 20.0;

/// The ratio test only applies when the ring-0 figure is above this many ns,
/// so that a noisy, too-small ring-3 figure on a fast native host cannot
/// produce a false "emulated" verdict.
pub const EMULATED_RATIO_FLOOR_NS: f64 = 5.0;

/// Calibration grows the iteration count until one run takes at least this.
pub const TARGET_RUN_TIME: Duration = Duration::from_millis(20);

/// Largest iteration count accepted from a caller.
pub const MAX_ITERATIONS: u64 = 1 << 32;

/// Calibration never goes beyond this many iterations (~0.3 s at 0.3 ns).
const MAX_CALIBRATED_ITERATIONS: u64 = 1 << 30;

/// Calibration starts here.
const START_ITERATIONS: u64 = 1024;

/// Each of the N and 2N runs is repeated this many times; the minimum counts.
const REPEATS: usize = 3;

/// How often a calibrated measurement that noise swamped is made again with more iterations.
const NOISE_RETRIES: usize = 3;

/// How often a `KVM_RUN` interrupted by a signal (EINTR) is retried.
const MAX_EINTR_RETRIES: usize = 10;

// Guest-physical (= guest-virtual, identity-mapped) layout.
const MEM_SIZE: usize = 1 << 20;
const GDT_ADDR: u64 = 0x1000;
const PML4_ADDR: u64 = 0x2000;
const PDPT_ADDR: u64 = 0x3000;
const PD_ADDR: u64 = 0x4000;
const CODE_ADDR: u64 = 0x5000;
const TSS_ADDR: u64 = 0x6000;
const STACK_TOP: u64 = 0x8000;
/// Inside the identity map (first GiB), outside the only memslot (first MiB).
const MMIO_ADDR: u64 = 0x1000_0000;
/// The value the guest writes to [`MMIO_ADDR`].
const MMIO_MAGIC: u32 = 0x6576_6d6d; // "evmm"

/// `1: dec rcx; jnz 1b; mov [rdx], eax; hlt; jmp $`.
/// The `hlt`/`jmp` are never reached: the probe does not resume the vCPU
/// after the MMIO exit.
const GUEST_CODE: [u8; 10] = [
    0x48, 0xff, 0xc9, // dec rcx
    0x75, 0xfb, // jnz -5
    0x89, 0x02, // mov [rdx], eax
    0xf4, // hlt
    0xeb, 0xfe, // jmp $
];

/// Whether guest ring-0 code runs natively or is instruction-emulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ring0 {
    /// Ring-0 code runs at hardware speed: a Linux guest kernel is usable.
    Native,
    /// Ring-0 code is emulated instruction by instruction (PVM): a Linux
    /// guest kernel is unusably slow; only ring-3 guest code runs natively.
    Emulated,
}

impl fmt::Display for Ring0 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ring0::Native => "native",
            Ring0::Emulated => "emulated",
        })
    }
}

/// Which KVM implementation backs `/dev/kvm`, from the loaded kernel modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmFlavor {
    /// `kvm_pvm`: the PVM hypervisor (the host kernel is itself a guest).
    Pvm,
    /// `kvm_intel`: Intel VMX.
    Vmx,
    /// `kvm_amd`: AMD SVM.
    Svm,
    /// None of the above modules is visible in `/sys/module`.
    Unknown,
}

impl KvmFlavor {
    /// Guess the flavour from `/sys/module`.
    pub fn detect() -> Self {
        let loaded = |m: &str| Path::new("/sys/module").join(m).exists();
        if loaded("kvm_pvm") {
            KvmFlavor::Pvm
        } else if loaded("kvm_intel") {
            KvmFlavor::Vmx
        } else if loaded("kvm_amd") {
            KvmFlavor::Svm
        } else {
            KvmFlavor::Unknown
        }
    }
}

impl fmt::Display for KvmFlavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvmFlavor::Pvm => "PVM",
            KvmFlavor::Vmx => "VMX",
            KvmFlavor::Svm => "SVM",
            KvmFlavor::Unknown => "unknown",
        })
    }
}

/// The result of a probe.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeReport {
    /// The verdict, from [`classify`].
    pub ring0: Ring0,
    /// ns per `dec rcx; jnz` iteration at CPL 0.
    pub cpl0_ns_per_iteration: f64,
    /// ns per `dec rcx; jnz` iteration at CPL 3.
    pub cpl3_ns_per_iteration: f64,
    /// N used at CPL 0 (runs of N and 2N iterations were timed).
    pub cpl0_iterations: u64,
    /// N used at CPL 3.
    pub cpl3_iterations: u64,
    /// Which KVM this is.
    pub kvm: KvmFlavor,
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ring 0 {}: {} ns/iteration at CPL0, {} ns/iteration at CPL3 (kvm: {})",
            self.ring0,
            fmt_ns(self.cpl0_ns_per_iteration),
            fmt_ns(self.cpl3_ns_per_iteration),
            self.kvm
        )
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 10.0 {
        format!("{ns:.1}")
    } else {
        format!("{ns:.2}")
    }
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// `/dev/kvm` does not exist.
    #[error("no /dev/kvm: KVM is not available on this host")]
    NoKvm,
    /// `/dev/kvm` exists but this process may not open it.
    #[error("permission denied opening /dev/kvm (is this user in the kvm group?)")]
    PermissionDenied,
    /// Opening `/dev/kvm` failed for another reason.
    #[error("cannot open /dev/kvm: {0}")]
    Open(kvm_ioctls::Error),
    /// `KVM_GET_API_VERSION` returned something other than 12.
    #[error("unsupported KVM API version {0} (expected 12)")]
    ApiVersion(i32),
    /// An ioctl failed.
    #[error("{ioctl} failed: {errno}")]
    Ioctl {
        /// The ioctl, e.g. `KVM_CREATE_VM`.
        ioctl: &'static str,
        /// What the kernel said.
        errno: kvm_ioctls::Error,
    },
    /// Allocating or writing the guest memory failed.
    #[error("guest memory setup failed: {0}")]
    GuestMemory(String),
    /// The guest left `KVM_RUN` other than through the expected MMIO write.
    #[error("unexpected exit from the CPL{cpl} guest: {reason} at RIP {rip:#x}")]
    UnexpectedExit {
        /// The CPL the guest was started at.
        cpl: u8,
        /// The exit, as kvm-ioctls decodes it.
        reason: String,
        /// The guest RIP after the exit.
        rip: u64,
    },
    /// The 2N-iteration run was not slower than the N-iteration run.
    #[error(
        "timing noise swamped the CPL{cpl} loop at {iterations} iterations \
         (N: {t1_ns} ns, 2N: {t2_ns} ns); use more iterations"
    )]
    Noise {
        /// The CPL measured.
        cpl: u8,
        /// N.
        iterations: u64,
        /// Best time of the N-iteration runs.
        t1_ns: u128,
        /// Best time of the 2N-iteration runs.
        t2_ns: u128,
    },
    /// The requested iteration count is out of range.
    #[error("iteration count {0} is out of range 1..={MAX_ITERATIONS}")]
    InvalidIterations(u64),
}

fn ioctl_err(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ProbeError {
    move |errno| ProbeError::Ioctl { ioctl, errno }
}

/// Classify from the two per-iteration figures (ns).
///
/// Ring 0 is [`Ring0::Emulated`] if its figure is at least
/// [`EMULATED_ABS_NS`] (no hardware needs 50 ns for `dec; jnz`), or if it is
/// at least [`EMULATED_RATIO`] times the ring-3 figure *and* at least
/// [`EMULATED_RATIO_FLOOR_NS`]. With the figures seen so far:
///
/// | host | CPL0 | CPL3 | verdict |
/// | --- | --- | --- | --- |
/// | PVM | ~450-1,180 ns | ~0.25 ns | emulated (both tests) |
/// | SVM KVM in a TCG L1 | ~2.2 ns | ~2.2 ns | native |
/// | bare-metal VMX/SVM | ~0.3 ns | ~0.3 ns | native |
///
/// so the thresholds sit orders of magnitude away from every case.
pub fn classify(cpl0_ns: f64, cpl3_ns: f64) -> Ring0 {
    let by_ratio = cpl0_ns >= EMULATED_RATIO_FLOOR_NS && cpl0_ns >= EMULATED_RATIO * cpl3_ns;
    if cpl0_ns >= EMULATED_ABS_NS || by_ratio {
        Ring0::Emulated
    } else {
        Ring0::Native
    }
}

/// Run the probe on `/dev/kvm`.
///
/// `iterations`: N for both CPLs; `None` calibrates N per CPL so that one
/// run takes at least [`TARGET_RUN_TIME`] (the whole probe then takes about
/// half a second).
pub fn probe(iterations: Option<u64>) -> Result<ProbeReport, ProbeError> {
    if let Some(n) = iterations {
        if n == 0 || n > MAX_ITERATIONS {
            return Err(ProbeError::InvalidIterations(n));
        }
    }
    probe_for(iterations, TARGET_RUN_TIME)
}

/// Calibration target of [`probe_native_quickly`]'s first look.
pub const QUICK_RUN_TIME: Duration = Duration::from_millis(2);

/// A ring-0 figure of the quick look at or under this (ns) is taken as native
/// without the full probe. Noise only lengthens a run, so an emulated ring 0
/// (hundreds of ns per iteration) cannot come out this fast.
pub const QUICK_NATIVE_NS: f64 = 10.0;

/// For a caller that needs only "does ring 0 run natively" at start-up (`evmm run`):
/// a look with runs of [`QUICK_RUN_TIME`] (a tenth of [`probe`]'s), accepted when it
/// finds ring 0 native and under [`QUICK_NATIVE_NS`]; anything else (emulated, or
/// noise) is settled by the full [`probe`].
pub fn probe_native_quickly() -> Result<ProbeReport, ProbeError> {
    match probe_for(None, QUICK_RUN_TIME) {
        Ok(r) if quick_look_settles_it(&r) => Ok(r),
        Ok(r) => {
            debug!("quick probe not conclusive ({r}); running the full probe");
            probe(None)
        }
        Err(e) => {
            debug!("quick probe failed ({e}); running the full probe");
            probe(None)
        }
    }
}

/// A quick look is trusted only when it says native, with a ring-0 figure no
/// emulator reaches.
fn quick_look_settles_it(r: &ProbeReport) -> bool {
    r.ring0 == Ring0::Native && r.cpl0_ns_per_iteration <= QUICK_NATIVE_NS
}

fn probe_for(iterations: Option<u64>, target: Duration) -> Result<ProbeReport, ProbeError> {
    let kvm_flavor = KvmFlavor::detect();
    let mut guest = ProbeVm::new()?;

    let cpl0 = guest.measure(0, iterations, target)?;
    let cpl3 = guest.measure(3, iterations, target)?;
    let ring0 = classify(cpl0.ns_per_iteration, cpl3.ns_per_iteration);

    let report = ProbeReport {
        ring0,
        cpl0_ns_per_iteration: cpl0.ns_per_iteration,
        cpl3_ns_per_iteration: cpl3.ns_per_iteration,
        cpl0_iterations: cpl0.iterations,
        cpl3_iterations: cpl3.iterations,
        kvm: kvm_flavor,
    };
    info!("{report}");
    Ok(report)
}

struct Measurement {
    iterations: u64,
    ns_per_iteration: f64,
}

/// Time `run` (one guest run of N iterations) for N and 2N iterations and return the cost of
/// one iteration. A calibrated N that noise swamped (the 2N runs were not slower) is tried
/// again with 4x the iterations, up to [`NOISE_RETRIES`] times; an N the caller chose is not.
fn measure_with(
    mut run: impl FnMut(u64) -> Result<Duration, ProbeError>,
    cpl: u8,
    iterations: Option<u64>,
    target: Duration,
) -> Result<Measurement, ProbeError> {
    let (mut n, retries) = match iterations {
        Some(n) => (n, 0),
        None => (calibrate_with(&mut run, cpl, target)?, NOISE_RETRIES),
    };
    let mut attempt = 0;
    loop {
        let mut t1 = Duration::MAX;
        let mut t2 = Duration::MAX;
        // Interleave the N and 2N runs so slow drift affects both alike.
        for _ in 0..REPEATS {
            t1 = t1.min(run(n)?);
            t2 = t2.min(run(2 * n)?);
        }
        debug!("CPL{cpl}: N = {n}: {t1:?}, 2N: {t2:?}");
        if t2 > t1 {
            let ns_per_iteration = (t2 - t1).as_nanos() as f64 / n as f64;
            return Ok(Measurement {
                iterations: n,
                ns_per_iteration,
            });
        }
        if attempt == retries || n >= MAX_CALIBRATED_ITERATIONS {
            return Err(ProbeError::Noise {
                cpl,
                iterations: n,
                t1_ns: t1.as_nanos(),
                t2_ns: t2.as_nanos(),
            });
        }
        attempt += 1;
        n = n.saturating_mul(4).min(MAX_CALIBRATED_ITERATIONS);
        debug!("CPL{cpl}: noise swamped the loop; trying again with N = {n}");
    }
}

/// Grow N until one run takes at least `target` ([`TARGET_RUN_TIME`] for [`probe`]). The first run of a fresh vCPU
/// pays for faulting in its memory (far more under nested paging), so it is a warm-up, not a
/// measurement; each step then takes the faster of two runs, so that one run delayed by the
/// host cannot end the calibration early.
fn calibrate_with(
    run: &mut impl FnMut(u64) -> Result<Duration, ProbeError>,
    cpl: u8,
    target_time: Duration,
) -> Result<u64, ProbeError> {
    let target = target_time.as_secs_f64();
    run(START_ITERATIONS)?;
    let mut n = START_ITERATIONS;
    loop {
        let t = run(n)?.min(run(n)?);
        debug!("CPL{cpl} calibration: {n} iterations in {t:?}");
        if t >= target_time || n >= MAX_CALIBRATED_ITERATIONS {
            return Ok(n);
        }
        // Aim 25% past the target; grow at least 10%, at most 16x a step.
        let scale = (target / t.as_secs_f64().max(1e-9) * 1.25).clamp(1.1, 16.0);
        n = ((n as f64 * scale).ceil() as u64).min(MAX_CALIBRATED_ITERATIONS);
    }
}

/// The probe guest. Field order matters for drop order: the vCPU and VM go
/// before the memory that backs the memslot.
struct ProbeVm {
    vcpu: VcpuFd,
    _vm: VmFd,
    _mem: GuestMemoryMmap,
    sregs_cpl0: kvm_sregs,
    sregs_cpl3: kvm_sregs,
}

impl ProbeVm {
    fn new() -> Result<Self, ProbeError> {
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT | libc::ENODEV | libc::ENXIO => ProbeError::NoKvm,
            libc::EACCES | libc::EPERM => ProbeError::PermissionDenied,
            _ => ProbeError::Open(e),
        })?;
        let api = kvm.get_api_version();
        if api != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(ProbeError::ApiVersion(api));
        }
        let vm = kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;

        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .map_err(|e| ProbeError::GuestMemory(e.to_string()))?;
        let host_addr = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| ProbeError::GuestMemory(e.to_string()))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: `host_addr` is the start of a MEM_SIZE-byte mapping owned by
        // `mem`, which lives in the returned `ProbeVm` and is dropped only
        // after the VM fd (field order), so the memslot never outlives it.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;

        write_guest(&mem)?;

        let vcpu = vm.create_vcpu(0).map_err(ioctl_err("KVM_CREATE_VCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(ioctl_err("KVM_SET_CPUID2"))?;

        let base = vcpu.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
        Ok(ProbeVm {
            sregs_cpl0: long_mode_sregs(&base, 0),
            sregs_cpl3: long_mode_sregs(&base, 3),
            vcpu,
            _vm: vm,
            _mem: mem,
        })
    }

    /// Time the loop at `cpl` for N and 2N iterations.
    fn measure(
        &mut self,
        cpl: u8,
        iterations: Option<u64>,
        target: Duration,
    ) -> Result<Measurement, ProbeError> {
        measure_with(|n| self.run_loop(cpl, n), cpl, iterations, target)
    }

    /// Run the loop once at `cpl` for `n` iterations; returns the time spent
    /// in `KVM_RUN`.
    fn run_loop(&mut self, cpl: u8, n: u64) -> Result<Duration, ProbeError> {
        let sregs = if cpl == 0 {
            &self.sregs_cpl0
        } else {
            &self.sregs_cpl3
        };
        let regs = kvm_regs {
            rip: CODE_ADDR,
            rcx: n,
            rdx: MMIO_ADDR,
            rax: u64::from(MMIO_MAGIC),
            rsp: STACK_TOP,
            rflags: 0x2,
            ..Default::default()
        };
        let mut retries = 0;
        loop {
            self.vcpu
                .set_sregs(sregs)
                .map_err(ioctl_err("KVM_SET_SREGS"))?;
            self.vcpu
                .set_regs(&regs)
                .map_err(ioctl_err("KVM_SET_REGS"))?;
            let start = Instant::now();
            let exit = self.vcpu.run();
            let elapsed = start.elapsed();
            let unexpected = match exit {
                Ok(VcpuExit::MmioWrite(addr, data))
                    if addr == MMIO_ADDR && data == MMIO_MAGIC.to_le_bytes() =>
                {
                    return Ok(elapsed);
                }
                Err(e) if e.errno() == libc::EINTR && retries < MAX_EINTR_RETRIES => {
                    retries += 1;
                    debug!("KVM_RUN interrupted, retrying");
                    continue;
                }
                Err(e) => return Err(ioctl_err("KVM_RUN")(e)),
                Ok(other) => format!("{other:?}"),
            };
            let rip = self.vcpu.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?.rip;
            return Err(ProbeError::UnexpectedExit {
                cpl,
                reason: unexpected,
                rip,
            });
        }
    }
}

/// The probe guest's tables: the first GiB identity-mapped, no IDT (any exception
/// escalates to a triple fault, i.e. KVM_EXIT_SHUTDOWN, which the probe reports as an
/// unexpected exit).
const TABLES: FlatTables = FlatTables {
    layout: FlatLayout {
        gdt: GDT_ADDR,
        pml4: PML4_ADDR,
        tss: TSS_ADDR,
        idt: None,
    },
    pdpt: PDPT_ADDR,
    pd: PD_ADDR,
    gib: 1,
    uncached_from_gib: 1,
    kernel_stack: None,
};

/// Write the GDT, the page tables and the loop into guest memory.
fn write_guest(mem: &GuestMemoryMmap) -> Result<(), ProbeError> {
    let err = |e: vm_memory::GuestMemoryError| ProbeError::GuestMemory(e.to_string());
    for (addr, value) in TABLES.writes() {
        mem.write_obj(value, GuestAddress(addr)).map_err(err)?;
    }
    mem.write_slice(&GUEST_CODE, GuestAddress(CODE_ADDR))
        .map_err(err)
}

/// Special registers for 64-bit long mode at `cpl` (0 or 3).
fn long_mode_sregs(base: &kvm_sregs, cpl: u8) -> kvm_sregs {
    TABLES.sregs(base, cpl)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest loop costing `ns_per_iteration` plus a fixed entry/exit cost, whose runs listed
    /// in `slow` (by call number) are delayed by 30 ms as a descheduled or faulting run is.
    fn fake_loop(
        ns_per_iteration: f64,
        slow: &'static [usize],
    ) -> impl FnMut(u64) -> Result<Duration, ProbeError> {
        let mut call = 0;
        move |n| {
            let mut ns = 10_000.0 + ns_per_iteration * n as f64;
            if slow.contains(&call) {
                ns += 30_000_000.0;
            }
            call += 1;
            Ok(Duration::from_nanos(ns as u64))
        }
    }

    #[test]
    fn a_slow_first_run_does_not_end_the_calibration() {
        // The first run (the warm-up) and one run of the first step are slow: calibration
        // still grows N until a run really takes the target time.
        let mut run = fake_loop(2.0, &[0, 1]);
        let n = calibrate_with(&mut run, 0, TARGET_RUN_TIME).unwrap();
        assert!(
            Duration::from_nanos((2.0 * n as f64) as u64)
                >= TARGET_RUN_TIME - Duration::from_micros(10),
            "calibrated N {n} is too small"
        );
    }

    #[test]
    fn noise_at_a_calibrated_n_is_measured_again_with_more_iterations() {
        // Calibration: warm-up + two runs per step. Find how many calls it makes, then slow
        // down every N run of the first measurement so that the 2N runs are not slower.
        let mut probe_run = fake_loop(2.0, &[]);
        let mut calls = 0;
        let mut counting = |n| {
            calls += 1;
            probe_run(n)
        };
        calibrate_with(&mut counting, 0, TARGET_RUN_TIME).unwrap();
        let first_n_runs: Vec<usize> = (0..REPEATS).map(|r| calls + 2 * r).collect();
        let slow: &'static [usize] = Vec::leak(first_n_runs);
        let m = measure_with(fake_loop(2.0, slow), 0, None, TARGET_RUN_TIME).unwrap();
        assert!(
            (m.ns_per_iteration - 2.0).abs() < 0.01,
            "{}",
            m.ns_per_iteration
        );
        let calibrated = {
            let mut run = fake_loop(2.0, &[]);
            calibrate_with(&mut run, 0, TARGET_RUN_TIME).unwrap()
        };
        assert_eq!(m.iterations, calibrated * 4);
    }

    #[test]
    fn noise_at_the_callers_n_is_reported() {
        // Runs 0, 2, 4 are the N runs: slow them all.
        let err = measure_with(fake_loop(2.0, &[0, 2, 4]), 3, Some(1000), TARGET_RUN_TIME).err();
        assert!(
            matches!(
                err,
                Some(ProbeError::Noise {
                    cpl: 3,
                    iterations: 1000,
                    ..
                })
            ),
            "{err:?}"
        );
    }

    #[test]
    fn classify_pvm_is_emulated() {
        assert_eq!(classify(1183.2, 0.31), Ring0::Emulated);
    }

    #[test]
    fn classify_native_hosts() {
        // Bare-metal VMX/SVM: both rings alike.
        assert_eq!(classify(0.30, 0.29), Ring0::Native);
        // Genuine KVM inside a TCG L1: slow but uniform.
        assert_eq!(classify(2.2, 2.1), Ring0::Native);
    }

    #[test]
    fn only_a_clearly_native_quick_look_skips_the_full_probe() {
        let report = |cpl0, cpl3| ProbeReport {
            ring0: classify(cpl0, cpl3),
            cpl0_ns_per_iteration: cpl0,
            cpl3_ns_per_iteration: cpl3,
            cpl0_iterations: 1,
            cpl3_iterations: 1,
            kvm: KvmFlavor::Pvm,
        };
        assert!(quick_look_settles_it(&report(0.3, 0.3)));
        assert!(quick_look_settles_it(&report(2.2, 2.1)));
        // Emulated, or native by the rules but slow enough to want a closer look.
        assert!(!quick_look_settles_it(&report(841.4, 0.53)));
        assert!(!quick_look_settles_it(&report(30.0, 20.0)));
    }

    #[test]
    fn classify_absolute_threshold() {
        // Slow everywhere but ring 0 far beyond anything hardware does.
        assert_eq!(classify(60.0, 40.0), Ring0::Emulated);
        assert_eq!(classify(49.0, 40.0), Ring0::Native);
    }

    #[test]
    fn classify_ratio_threshold() {
        assert_eq!(classify(30.0, 1.0), Ring0::Emulated);
        assert_eq!(classify(15.0, 1.0), Ring0::Native);
        // A too-small ring-3 figure (noise) on a fast host is not enough.
        assert_eq!(classify(0.3, 0.001), Ring0::Native);
        assert_eq!(classify(4.0, 0.01), Ring0::Native);
    }

    #[test]
    fn report_display_and_json() {
        let report = ProbeReport {
            ring0: Ring0::Emulated,
            cpl0_ns_per_iteration: 1183.24,
            cpl3_ns_per_iteration: 0.3123,
            cpl0_iterations: 20_000,
            cpl3_iterations: 80_000_000,
            kvm: KvmFlavor::Pvm,
        };
        assert_eq!(
            report.to_string(),
            "ring 0 emulated: 1183.2 ns/iteration at CPL0, 0.31 ns/iteration at CPL3 (kvm: PVM)"
        );
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["ring0"], "emulated");
        assert_eq!(json["kvm"], "pvm");
        assert_eq!(json["cpl0_iterations"], 20_000);
    }

    #[test]
    fn zero_iterations_rejected() {
        assert!(matches!(
            probe(Some(0)),
            Err(ProbeError::InvalidIterations(0))
        ));
    }

    /// Runs the real probe. Needs /dev/kvm: without it this test fails (it
    /// never skips silently).
    #[test]
    fn probe_real_kvm() {
        let report = match probe(None) {
            Ok(r) => r,
            Err(ProbeError::NoKvm) => panic!(
                "no /dev/kvm: KVM is not available on this host, so the KVM probe cannot run"
            ),
            Err(e) => panic!("KVM probe failed: {e}"),
        };
        for (what, v) in [
            ("CPL0 ns/iteration", report.cpl0_ns_per_iteration),
            ("CPL3 ns/iteration", report.cpl3_ns_per_iteration),
        ] {
            assert!(v.is_finite() && v > 0.0, "{what} is {v}: {report}");
        }
        assert_eq!(
            report.ring0,
            classify(report.cpl0_ns_per_iteration, report.cpl3_ns_per_iteration)
        );
        // PVM always emulates a non-PVM guest's ring 0.
        if report.kvm == KvmFlavor::Pvm {
            assert_eq!(report.ring0, Ring0::Emulated, "{report}");
        }
    }
}

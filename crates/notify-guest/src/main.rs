//! The notify-latency notify guest.
//!
//! A bare-metal x86-64 guest (no Linux) that boots through the PVH ELF note
//! (so it runs under evmm and QEMU `-M microvm` alike), finds a virtio-blk
//! device from `virtio_mmio.device=<size>@<base>:<gsi>` on its command line,
//! drives it itself (virtio-mmio version 2, one split queue) and measures the
//! notify path with the TSC from ring 3; with a virtio-net device instead
//! (or `notify.net=1`) it times UDP echoes through it ([`net`]). See
//! `README.md` next to this file for the output format and the measurement
//! definitions.
#![no_std]
#![no_main]

mod boot;
mod chaos;
mod net;
mod virtio;

use core::fmt::Write;
use core::panic::PanicInfo;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use net::NetDevice;
use virtio::{BlkDevice, ReqKind};

/// Vector the device's IOAPIC pin is routed to.
pub const IRQ_VECTOR: u8 = 0x40;
/// `ud2` (#UD) with a magic `rax` is the ring-0 service gate.
const SYSCALL_VECTOR: u8 = 6;
/// Service numbers (in `rax` at the `ud2`).
const SVC_WRITE: u64 = 0x5052_0001;
const SVC_POWER_OFF: u64 = 0x5052_0002;
/// LAPIC spurious vector.
const SPURIOUS_VECTOR: u8 = 0xff;

const LAPIC_BASE: usize = 0xfee0_0000;
const LAPIC_TPR: usize = 0x80;
const LAPIC_SVR: usize = 0xf0;
const LAPIC_LVT_LINT0: usize = 0x350;
const LAPIC_LVT_LINT1: usize = 0x360;
const LAPIC_LVT_MASKED: u32 = 1 << 16;
/// A TPR that blocks every vector; interrupts are let in only while the
/// ring-3 loop waits for one.
const TPR_BLOCK_ALL: u32 = 0xf0;
const IOAPIC_BASE: usize = 0xfec0_0000;
/// QEMU microvm's second IOAPIC (GSIs 24..48), when it has one.
const IOAPIC2_BASE: usize = 0xfec1_0000;

/// `hvm_start_info.magic`.
const PVH_MAGIC: u32 = 0x336e_c578;

/// Most requests per series.
pub const MAX_REQUESTS: usize = 100_000;
/// Default number of requests per series.
const DEFAULT_REQUESTS: usize = 10_000;

/// The series measured: (kind, mode) in the order they run and print.
/// Each wait mode yields two series from the same requests: poll and kick, irq and
/// irq_wake.
const SERIES: [(ReqKind, Mode); 8] = [
    (ReqKind::GetId, Mode::Poll),
    (ReqKind::GetId, Mode::Kick),
    (ReqKind::GetId, Mode::Irq),
    (ReqKind::GetId, Mode::IrqWake),
    (ReqKind::Read, Mode::Poll),
    (ReqKind::Read, Mode::Kick),
    (ReqKind::Read, Mode::Irq),
    (ReqKind::Read, Mode::IrqWake),
];

/// What a sample measures.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Kick → the ring-3 poll loop sees `used.idx` change (no interrupt:
    /// `VIRTQ_AVAIL_F_NO_INTERRUPT` is set, and the TPR blocks it anyway).
    Poll,
    /// The kick itself: from before the QueueNotify write until the vCPU runs the
    /// next instruction (an ioeventfd signal, or a whole exit to the VMM). Measured
    /// in the poll requests.
    Kick,
    /// Kick → first instruction of the interrupt handler.
    Irq,
    /// Kick → the ring-3 wait loop sees that the handler ran.
    IrqWake,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Poll => "poll",
            Mode::Kick => "kick",
            Mode::Irq => "irq",
            Mode::IrqWake => "irq_wake",
        }
    }
}

/// Sample storage: one array of cycle counts per series.
static mut SAMPLES: [[u32; MAX_REQUESTS]; 8] = [[0; MAX_REQUESTS]; 8];
/// Scratch copy for sorting.
static mut SORTED: [u32; MAX_REQUESTS] = [0; MAX_REQUESTS];

// ---------------------------------------------------------------------------
// Ring-0 services, serial output.

/// Writes `bytes` to COM1 through the ring-0 service gate.
fn serial_write(bytes: &[u8]) {
    // SAFETY: `ud2` with rax = SVC_WRITE runs `guest_syscall_entry`, which
    // only reads `rcx` bytes at `rsi` (valid: a live slice), clobbers the
    // registers declared here and resumes after the `ud2`.
    unsafe {
        core::arch::asm!(
            "ud2",
            inout("rax") SVC_WRITE => _,
            inout("rsi") bytes.as_ptr() => _,
            inout("rcx") bytes.len() => _,
            out("rdx") _,
            out("r8") _,
        );
    }
}

/// Powers the machine off (ACPI sleep through port 0x600 for evmm, the GED
/// sleep register for QEMU microvm, i8042 reset, then a triple fault).
fn power_off() -> ! {
    // SAFETY: `ud2` with rax = SVC_POWER_OFF never returns.
    unsafe { core::arch::asm!("ud2", in("rax") SVC_POWER_OFF, options(noreturn)) }
}

/// A line buffer flushed to the serial port when full or on demand.
pub struct Out {
    buf: [u8; 4096],
    len: usize,
}

static mut OUT: Out = Out {
    buf: [0; 4096],
    len: 0,
};

impl Out {
    /// Sends the buffered bytes.
    pub fn flush(&mut self) {
        if self.len > 0 {
            serial_write(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl Write for Out {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

/// The output buffer (ring 3 is single-threaded and handlers never print).
pub fn out() -> &'static mut Out {
    // SAFETY: only ring-3 code touches OUT, from one thread of control, and no
    // caller keeps the reference across another call to `out()`.
    unsafe { &mut *addr_of_mut!(OUT) }
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        let o = $crate::out();
        let _ = core::fmt::Write::write_fmt(o, format_args!("{}\n", format_args!($($arg)*)));
        o.flush();
    }};
}

// ---------------------------------------------------------------------------
// Small MMIO helpers.

/// Reads a 32-bit MMIO register.
///
/// # Safety
/// `addr` must be a mapped device register.
unsafe fn mmio_read(addr: usize) -> u32 {
    // SAFETY: per the caller's contract.
    unsafe { read_volatile(addr as *const u32) }
}

/// Writes a 32-bit MMIO register.
///
/// # Safety
/// `addr` must be a mapped device register.
unsafe fn mmio_write(addr: usize, v: u32) {
    // SAFETY: per the caller's contract.
    unsafe { write_volatile(addr as *mut u32, v) }
}

/// Reads the TSC (after an `lfence`).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc is allowed at CPL 3 (CR4.TSD is clear).
    unsafe { core::arch::asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Interrupts taken so far.
pub fn irq_count() -> u64 {
    // SAFETY: a naturally aligned u64 written only by the interrupt handler.
    unsafe { read_volatile(addr_of!(boot::GUEST_IRQ_COUNT)) }
}

/// TSC recorded by the last interrupt handler entry.
pub fn irq_tsc() -> u64 {
    // SAFETY: as above.
    unsafe { read_volatile(addr_of!(boot::GUEST_IRQ_TSC)) }
}

/// Lets pending interrupts in for a moment (lower the TPR, spin briefly,
/// raise it again). Returns how many were taken.
fn drain_interrupts() -> u64 {
    let before = irq_count();
    // SAFETY: the LAPIC page is identity-mapped and user-accessible.
    unsafe {
        mmio_write(LAPIC_BASE + LAPIC_TPR, 0);
        for _ in 0..1000 {
            core::hint::spin_loop();
        }
        mmio_write(LAPIC_BASE + LAPIC_TPR, TPR_BLOCK_ALL);
    }
    irq_count() - before
}

// ---------------------------------------------------------------------------
// Descriptor tables, interrupt controllers.

/// Writes IDT gate `vector` (64-bit interrupt gate, present, `dpl`).
fn set_gate(vector: u8, handler: u64, dpl: u64) {
    let lo = (handler & 0xffff)
        | (0x08 << 16)
        | ((0x8e | (dpl << 5)) << 40)
        | (((handler >> 16) & 0xffff) << 48);
    let hi = handler >> 32;
    // SAFETY: guest_idt is a 4 KiB, user-writable table; no interrupt can be
    // taken while ring 3 fills it (the LAPIC is disabled, no exception is
    // pending).
    unsafe {
        let idt = addr_of_mut!(boot::guest_idt) as *mut u64;
        write_volatile(idt.add(2 * vector as usize), lo);
        write_volatile(idt.add(2 * vector as usize + 1), hi);
    }
}

fn setup_idt() {
    let (stubs, irq, spurious, syscall) = (
        addr_of!(boot::guest_fault_stubs) as u64,
        addr_of!(boot::guest_irq_entry) as u64,
        addr_of!(boot::guest_spurious_entry) as u64,
        addr_of!(boot::guest_syscall_entry) as u64,
    );
    for v in 0..=255u8 {
        set_gate(v, stubs + 16 * u64::from(v), 0);
    }
    set_gate(IRQ_VECTOR, irq, 0);
    set_gate(SPURIOUS_VECTOR, spurious, 0);
    set_gate(SYSCALL_VECTOR, syscall, 0);
}

/// Enables the LAPIC with every vector blocked by the TPR, LINT0/1 masked.
fn setup_lapic() {
    // SAFETY: the LAPIC page is identity-mapped and user-accessible.
    unsafe {
        mmio_write(LAPIC_BASE + LAPIC_TPR, TPR_BLOCK_ALL);
        mmio_write(LAPIC_BASE + LAPIC_LVT_LINT0, LAPIC_LVT_MASKED);
        mmio_write(LAPIC_BASE + LAPIC_LVT_LINT1, LAPIC_LVT_MASKED);
        mmio_write(LAPIC_BASE + LAPIC_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
    }
}

/// Routes `gsi` to [`IRQ_VECTOR`] on APIC 0: fixed, physical, active high,
/// edge triggered, unmasked.
fn setup_ioapic(gsi: u32) {
    let (base, pin) = if gsi < 24 {
        (IOAPIC_BASE, gsi)
    } else {
        (IOAPIC2_BASE, gsi - 24)
    };
    // SAFETY: the IOAPIC window is identity-mapped and user-accessible.
    unsafe {
        mmio_write(base, 0x10 + 2 * pin + 1);
        mmio_write(base + 0x10, 0);
        mmio_write(base, 0x10 + 2 * pin);
        mmio_write(base + 0x10, u32::from(IRQ_VECTOR));
    }
}

// ---------------------------------------------------------------------------
// Command line.

/// A `virtio_mmio.device=` entry.
#[derive(Clone, Copy)]
struct DevSpec {
    base: u64,
    gsi: u32,
}

struct Config {
    devices: [Option<DevSpec>; 32],
    requests: usize,
    raw: bool,
    /// `notify.chaos=SEED`: run the chaos mode instead of the benchmark.
    chaos: Option<u64>,
    /// `notify.chaos.steps=N`.
    chaos_steps: u64,
    /// `notify.net=1`: use a virtio-net device only.
    net: bool,
}

fn parse_num(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)?;
        v = v.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some(v)
}

/// Parses `<size>@<base>:<gsi>[:<id>]`.
fn parse_device(v: &[u8]) -> Option<DevSpec> {
    let at = v.iter().position(|&c| c == b'@')?;
    let rest = &v[at + 1..];
    let colon = rest.iter().position(|&c| c == b':')?;
    let base = parse_num(&rest[..colon])?;
    let gsi_part = &rest[colon + 1..];
    let end = gsi_part
        .iter()
        .position(|&c| c == b':')
        .unwrap_or(gsi_part.len());
    let gsi = u32::try_from(parse_num(&gsi_part[..end])?).ok()?;
    Some(DevSpec { base, gsi })
}

fn parse_cmdline(cmdline: &[u8]) -> Config {
    let mut cfg = Config {
        devices: [None; 32],
        requests: DEFAULT_REQUESTS,
        raw: true,
        chaos: None,
        chaos_steps: chaos::DEFAULT_STEPS,
        net: false,
    };
    let mut n = 0;
    for tok in cmdline.split(|c| c.is_ascii_whitespace()) {
        if let Some(v) = tok.strip_prefix(b"virtio_mmio.device=") {
            if let Some(d) = parse_device(v) {
                if n < cfg.devices.len() {
                    cfg.devices[n] = Some(d);
                    n += 1;
                }
            }
        } else if let Some(v) = tok.strip_prefix(b"notify.requests=") {
            if let Some(r) = parse_num(v) {
                cfg.requests = (r as usize).clamp(1, MAX_REQUESTS);
            }
        } else if let Some(v) = tok.strip_prefix(b"notify.raw=") {
            cfg.raw = v != b"0";
        } else if let Some(v) = tok.strip_prefix(b"notify.net=") {
            cfg.net = v != b"0";
        } else if let Some(v) = tok.strip_prefix(b"notify.chaos.steps=") {
            if let Some(n) = parse_num(v) {
                cfg.chaos_steps = n.min(chaos::MAX_STEPS);
            }
        } else if let Some(v) = tok.strip_prefix(b"notify.chaos=") {
            cfg.chaos = parse_num(v);
        }
    }
    cfg
}

/// The command line from the PVH start info (empty if there is none).
fn cmdline() -> &'static [u8] {
    // SAFETY: guest_start_info holds the physical address the VMM passed in
    // ebx; RAM is identity-mapped. The start info and the NUL-terminated
    // command line are in guest RAM and never written after boot. A bad
    // magic means no start info: an empty command line.
    unsafe {
        let si = read_volatile(addr_of!(boot::guest_start_info)) as usize;
        if si == 0 || read_volatile(si as *const u32) != PVH_MAGIC {
            return &[];
        }
        let p = read_volatile((si + 24) as *const u64) as usize;
        if p == 0 {
            return &[];
        }
        let mut len = 0;
        while len < 4096 && read_volatile((p + len) as *const u8) != 0 {
            len += 1;
        }
        core::slice::from_raw_parts(p as *const u8, len)
    }
}

// ---------------------------------------------------------------------------
// Statistics and output.

/// In-place heapsort (no allocation, O(n log n)).
fn heapsort(v: &mut [u32]) {
    fn sift(v: &mut [u32], mut root: usize, end: usize) {
        loop {
            let mut child = 2 * root + 1;
            if child >= end {
                return;
            }
            if child + 1 < end && v[child + 1] > v[child] {
                child += 1;
            }
            if v[root] >= v[child] {
                return;
            }
            v.swap(root, child);
            root = child;
        }
    }
    let n = v.len();
    for i in (0..n / 2).rev() {
        sift(v, i, n);
    }
    for end in (1..n).rev() {
        v.swap(0, end);
        sift(v, 0, end);
    }
}

/// Prints one `NOTIFY-RESULT` line.
fn print_series(
    kind: &str,
    mode: &str,
    samples: &[u32],
    irqs: u64,
    kicks: u64,
    errors: u64,
    raw: bool,
) {
    // SAFETY: SORTED is only used here, by ring-3 code, one call at a time.
    let sorted = unsafe { &mut (&mut *addr_of_mut!(SORTED))[..samples.len()] };
    sorted.copy_from_slice(samples);
    heapsort(sorted);
    let n = sorted.len();
    // Nearest rank: the smallest sample with at least p of them at or below.
    let pct = |per_mille: usize| sorted[(per_mille * n).div_ceil(1000).clamp(1, n) - 1];
    let mean = sorted.iter().map(|&v| u64::from(v)).sum::<u64>() / n as u64;
    let o = out();
    let _ = write!(
        o,
        "NOTIFY-RESULT kind={} mode={} n={} irqs={} kicks={} errors={} min={} p50={} p90={} p99={} p999={} max={} mean={}",
        kind,
        mode,
        n,
        irqs,
        kicks,
        errors,
        sorted[0],
        pct(500),
        pct(900),
        pct(990),
        pct(999),
        sorted[n - 1],
        mean
    );
    if raw {
        let _ = o.write_str(" cycles=");
        for (i, v) in samples.iter().enumerate() {
            if i > 0 {
                let _ = o.write_str(",");
            }
            let _ = write!(o, "{v}");
        }
    }
    let _ = o.write_str("\n");
    o.flush();
}

/// Writes `bytes` as printable ASCII, `%xx` for anything else.
fn write_escaped(o: &mut Out, bytes: &[u8]) {
    for &b in bytes {
        if b.is_ascii_graphic() && b != b'%' {
            let _ = o.write_char(b as char);
        } else {
            let _ = write!(o, "%{b:02x}");
        }
    }
}

// ---------------------------------------------------------------------------
// Entry points.

/// Ring-3 main, called from `user_entry` in [`boot`].
#[no_mangle]
pub extern "C" fn guest_main() -> ! {
    setup_idt();
    let cmdline = cmdline();
    println!("NOTIFY-BOOT cmdline_len={}", cmdline.len());
    let cfg = parse_cmdline(cmdline);
    if let Some(seed) = cfg.chaos {
        let mut bases = [0u64; 32];
        let mut n = 0;
        for spec in cfg.devices.iter().flatten() {
            bases[n] = spec.base;
            n += 1;
        }
        chaos::run(&bases[..n], seed, cfg.chaos_steps);
    }

    let mut dev = None;
    for spec in cfg.devices.iter().flatten() {
        let base = spec.base as usize;
        let found = virtio::identify(base).and_then(|ids| {
            if !cfg.net {
                if let Some(d) = BlkDevice::check(base, ids)? {
                    return Ok(Some(Found::Blk(d)));
                }
            }
            Ok(NetDevice::check(base, ids)?.map(Found::Net))
        });
        match found {
            Ok(Some(d)) => {
                dev = Some((d, *spec));
                break;
            }
            Ok(None) => {}
            Err(e) => {
                println!("NOTIFY-ERROR device={:#x} {e}", spec.base);
            }
        }
    }
    let (mut dev, spec) = match dev {
        Some((Found::Blk(d), spec)) => (d, spec),
        Some((Found::Net(d), spec)) => run_net(d, spec, &cfg),
        None if cfg.net => {
            println!("NOTIFY-ERROR no virtio-net device (virtio-mmio version 2) in virtio_mmio.device= on the command line");
            power_off();
        }
        None => {
            println!("NOTIFY-ERROR no virtio-blk or virtio-net device (virtio-mmio version 2) in virtio_mmio.device= on the command line");
            power_off();
        }
    };

    setup_lapic();
    setup_ioapic(spec.gsi);

    if let Err(e) = dev.init() {
        println!("NOTIFY-ERROR device={:#x} init: {e}", spec.base);
        power_off();
    }
    println!(
        "NOTIFY-INFO source=guest device={:#x} gsi={} vector={:#x} queue_size={} capacity_sectors={} requests={} features=version_1",
        spec.base,
        spec.gsi,
        IRQ_VECTOR,
        virtio::QUEUE_SIZE,
        dev.capacity(),
        cfg.requests
    );

    let n = cfg.requests;
    let mut id_printed = false;
    let mut i = 0;
    while i < SERIES.len() {
        let (kind, mode) = SERIES[i];
        if kind == ReqKind::Read && dev.capacity() < 8 {
            println!("NOTIFY-SKIP kind=read reason=disk_smaller_than_4k");
            i += 2 + 2 * usize::from(mode == Mode::Poll);
            continue;
        }
        let irq_mode = mode != Mode::Poll;
        // Start clean: acknowledge and let in anything left from before.
        dev.ack_interrupt();
        drain_interrupts();
        let irqs_before = irq_count();
        let mut errors = 0u64;
        let mut kicks = 0u64;
        let mut timeouts = 0u32;
        for r in 0..n {
            let sector = if kind == ReqKind::Read {
                (r as u64 * 8) % (dev.capacity() & !7)
            } else {
                0
            };
            let m = dev.request(kind, sector, irq_mode);
            kicks += u64::from(m.kicked);
            if !m.ok {
                errors += 1;
            }
            if m.timeout {
                println!(
                    "NOTIFY-ERROR kind={} mode={} request={r} timeout (no completion{})",
                    kind.name(),
                    mode.name(),
                    if irq_mode { " or no interrupt" } else { "" }
                );
                timeouts += 1;
                if timeouts >= 3 {
                    println!("NOTIFY-ERROR giving up after {timeouts} timeouts");
                    power_off();
                }
            }
            if kind == ReqKind::GetId {
                if !id_printed {
                    let o = out();
                    let _ = o.write_str("NOTIFY-ID id=");
                    // The id is NUL-padded to 20 bytes: print up to the first NUL.
                    let id = dev.id_bytes();
                    let len = id.iter().position(|&b| b == 0).unwrap_or(id.len());
                    write_escaped(o, &id[..len]);
                    let _ = o.write_str("\n");
                    o.flush();
                    id_printed = true;
                    dev.remember_id();
                } else if !dev.id_matches() {
                    errors += 1;
                }
            }
            let (a, b) = match mode {
                Mode::Poll => (m.poll, m.kick),
                _ => (m.irq, m.wake),
            };
            // SAFETY: ring-3-only storage; r < n <= MAX_REQUESTS.
            unsafe {
                (*addr_of_mut!(SAMPLES))[i][r] = a;
                (*addr_of_mut!(SAMPLES))[i + 1][r] = b;
            }
            if irq_mode {
                dev.ack_interrupt();
            }
        }
        // Interrupts the device raised during a poll series show up here
        // (collapsed: the LAPIC keeps at most one pending per vector).
        dev.ack_interrupt();
        drain_interrupts();
        let irqs = irq_count() - irqs_before;
        let series = 2;
        for (s, &(kind, mode)) in SERIES.iter().enumerate().skip(i).take(series) {
            // SAFETY: ring-3-only storage, no other reference alive.
            let samples = unsafe { &(&*addr_of!(SAMPLES))[s][..n] };
            print_series(
                kind.name(),
                mode.name(),
                samples,
                irqs,
                kicks,
                errors,
                cfg.raw,
            );
        }
        i += series;
    }
    println!("NOTIFY-DONE requests={n}");
    power_off();
}

/// The device the benchmark drives.
enum Found {
    Blk(BlkDevice),
    Net(NetDevice),
}

/// The net mode: sets the device up, runs both passes, prints, powers off.
fn run_net(mut dev: NetDevice, spec: DevSpec, cfg: &Config) -> ! {
    setup_lapic();
    setup_ioapic(spec.gsi);
    if let Err(e) = dev.init() {
        println!("NOTIFY-ERROR device={:#x} init: {e}", spec.base);
        power_off();
    }
    let d = net::MAC_DST;
    println!(
        "NOTIFY-INFO source=guest device={:#x} gsi={} vector={:#x} queue_size={} requests={} features=version_1 kind=net mac_dst={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        spec.base,
        spec.gsi,
        IRQ_VECTOR,
        dev.queue_size(),
        cfg.requests,
        d[0],
        d[1],
        d[2],
        d[3],
        d[4],
        d[5]
    );
    dev.bench(cfg.requests, cfg.raw);
    println!("NOTIFY-DONE requests={}", cfg.requests);
    power_off();
}

/// Writes one byte to COM1 (CPL 0 only).
#[inline(never)]
fn ring0_putc(b: u8) {
    // SAFETY: only called at CPL 0, where port I/O is allowed; COM1 data.
    unsafe { core::arch::asm!("out dx, al", in("dx") 0x3f8u16, in("al") b, options(nostack)) };
}

/// Writes `v` as 16 hex digits (CPL 0 only). Plain integer code: this runs
/// under PVM's instruction emulator, which cannot emulate SSE.
#[inline(never)]
fn ring0_puthex(v: u64) {
    let mut i = 16;
    while i > 0 {
        i -= 1;
        let d = ((v >> (i * 4)) & 0xf) as u8;
        ring0_putc(if d < 10 { b'0' + d } else { b'a' + d - 10 });
    }
}

/// Called (at CPL 0) by the fault stubs for any unexpected vector: prints
/// `NOTIFY-FAULT vector=<hex> frame=<6 hex words>` (error code if the vector
/// has one, then RIP, CS, RFLAGS, RSP, SS) and ends the VM.
///
/// # Safety
/// `frame` must point at an interrupt frame (six readable words); only the
/// fault stubs call this.
#[no_mangle]
pub unsafe extern "C" fn guest_fault(vector: u64, frame: *const u64) -> ! {
    for &b in b"NOTIFY-FAULT vector=" {
        ring0_putc(b);
    }
    ring0_puthex(vector);
    for &b in b" frame=" {
        ring0_putc(b);
    }
    let mut i = 0;
    while i < 6 {
        // SAFETY: `frame` points at the interrupt frame on the ring-0 stack;
        // 6 words stay inside the 16 KiB kernel stack.
        ring0_puthex(unsafe { read_volatile(frame.add(i)) });
        ring0_putc(if i == 5 { b'\n' } else { b',' });
        i += 1;
    }
    // SAFETY: port 0x600 sleep control (evmm), then a triple fault through
    // an empty IDT: the VMM ends the VM.
    unsafe {
        core::arch::asm!(
            "out dx, al",
            "push 0",
            "push 0",
            "lidt [rsp + 6]",
            "mov rax, 0x8000000000000000",
            "mov rax, [rax]",
            "2: hlt",
            "jmp 2b",
            in("dx") 0x600u16,
            in("al") 0x34u8,
            options(noreturn)
        )
    }
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    let o = out();
    o.len = 0;
    let _ = writeln!(o, "NOTIFY-PANIC {info}");
    o.flush();
    power_off();
}

// The compiler may emit calls to these; no libc here. `rep movsb`/`stosb`
// keep them from being compiled into calls to themselves.

/// `memcpy`.
///
/// # Safety
/// The usual `memcpy` contract.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and disjoint.
    unsafe {
        core::arch::asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _,
            inout("rcx") n => _, options(nostack, preserves_flags));
    }
    dst
}

/// `memmove`.
///
/// # Safety
/// The usual `memmove` contract.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is correct when dst is below src or the
        // ranges do not overlap.
        unsafe { memcpy(dst, src, n) }
    } else {
        // SAFETY: backward copy (DF set, then cleared) for dst above src.
        unsafe {
            core::arch::asm!("std", "rep movsb", "cld",
                inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
                inout("rcx") n => _, options(nostack));
        }
        dst
    }
}

/// `memset`.
///
/// # Safety
/// The usual `memset` contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid.
    unsafe {
        core::arch::asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _,
            in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

/// `memcmp`.
///
/// # Safety
/// The usual `memcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, both ranges valid for n bytes per the contract.
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// `bcmp`.
///
/// # Safety
/// The usual `bcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

//! Chaos mode (`notify.chaos=SEED`): a hostile driver against the VMM.
//!
//! For `notify.chaos.steps=N` steps (default [`DEFAULT_STEPS`]) a seeded
//! generator picks, with the weights in [`WEIGHTS`], one of: a plausible
//! register access on a random virtio-mmio window, an access at any offset
//! and width, a device bring-up (status sequence with skipped and illegal
//! steps, random feature words, queue sizes, rings placed anywhere [`mem`]
//! allows), descriptor chains (mostly valid requests; loops, indirect
//! tables, addresses outside RAM, huge lengths, sectors past the end, wrong
//! directions, bad DISCARD/WRITE_ZEROES ranges) and a kick, a bare
//! QueueNotify, a reset in the middle of outstanding I/O, a sweep of
//! unclaimed MMIO addresses, a sweep of I/O ports, or InterruptStatus and
//! InterruptACK. Meanwhile a second vCPU, if the VM has one ([`ap`]),
//! publishes chains and kicks on the first device's second queue. Then it
//! prints `CHAOS-DONE ...` and idles (HLT in ring 0): the VMM must still be up
//! and stop when asked.
//!
//! The guest stays alive whatever the device does with what it is told
//! (see [`mem`]); a fault prints `NOTIFY-FAULT` and ends the VM.

/// `rng.pick(&[...])` for items that draw from `rng` themselves.
macro_rules! pick {
    ($rng:expr, [$($e:expr),+ $(,)?]) => {{
        let items = [$($e),+];
        $rng.pick(&items)
    }};
}

mod ap;
mod chain;
mod device;
mod mem;
mod rng;
mod sweep;

use device::Device;
use mem::Layout;
use rng::Rng;

/// Steps when `notify.chaos.steps=` is not given.
pub const DEFAULT_STEPS: u64 = 2000;
/// Most steps.
pub const MAX_STEPS: u64 = 10_000_000;
/// Devices driven (the first ones on the command line).
const MAX_DEVICES: usize = mem::SLOTS / device::QUEUES;
/// `ud2` service: idle for good.
const SVC_IDLE: u64 = 0x5052_0004;

/// Step kinds, in [`WEIGHTS`] order.
const KINDS: [&str; 9] = [
    "register",
    "arbitrary",
    "bring_up",
    "chains",
    "notify",
    "reset_io",
    "mmio_sweep",
    "port_sweep",
    "interrupt",
];
/// How often each step kind is picked (out of their sum, 100).
pub const WEIGHTS: [u32; 9] = [24, 6, 10, 30, 6, 8, 6, 4, 6];

/// What the run did, printed in the `CHAOS-DONE` line.
#[derive(Default)]
pub struct Stats {
    /// Steps of each kind.
    kinds: [u64; 9],
    /// Plausible register accesses.
    pub registers: u64,
    /// Accesses at any offset.
    pub arbitrary: u64,
    /// Chains published.
    pub chains: u64,
    /// QueueNotify writes.
    pub notifies: u64,
    /// Device resets (status 0).
    pub resets: u64,
    /// Used-index moves the guest saw while it waited.
    pub completions: u64,
    /// Unclaimed MMIO accesses.
    pub mmio_accesses: u64,
    /// Port accesses.
    pub port_accesses: u64,
}

/// Runs the chaos mode on the virtio-mmio windows at `bases`; never returns.
pub fn run(bases: &[u64], seed: u64, steps: u64) -> ! {
    let Some(mem) = Layout::detect() else {
        crate::println!("NOTIFY-ERROR chaos: no PVH memory map, or too little RAM after the image");
        crate::power_off();
    };
    mem.init_tables();
    // The LAPIC on with LINT0/LINT1 masked and every vector blocked: port
    // sweeps reprogram the in-kernel PIC and PIT, whose interrupts would
    // otherwise arrive through LINT0 (ExtINT) at vectors the guest does not
    // handle.
    crate::setup_lapic();
    let mut rng = Rng::new(seed);
    let mut devs: [Option<Device>; MAX_DEVICES] = [const { None }; MAX_DEVICES];
    let mut n = 0;
    let mut devices_end = mem::MMIO_HOLE;
    for &base in bases.iter().take(MAX_DEVICES) {
        if crate::virtio::BlkDevice::probe(base as usize)
            .ok()
            .flatten()
            .is_none()
        {
            continue;
        }
        let d = Device::new(base as usize, n * device::QUEUES, &mem);
        let (capacity, features) = d.info();
        crate::println!(
            "CHAOS-DEVICE base={base:#x} capacity_sectors={capacity} features={features:#x}"
        );
        devices_end = devices_end.max(base + 0x1000);
        devs[n] = Some(d);
        n += 1;
    }
    if n == 0 {
        crate::println!("NOTIFY-ERROR chaos: no virtio-blk device on the command line");
        crate::power_off();
    }
    crate::println!(
        "CHAOS-START seed={seed} steps={steps} devices={n} ram_end={:#x} image_end={:#x} buffers={:#x}",
        mem.ram_end,
        mem.image_end,
        mem.buffers
    );
    // The second vCPU publishes on the first device's second queue.
    let ap_up = devs[0].as_ref().is_some_and(|d| {
        let (base, slot) = d.place();
        ap::start(ap::ApConfig {
            mem,
            base,
            queue: 1,
            slot: slot + 1,
            capacity: d.info().0,
            seed,
        })
    });
    crate::println!("CHAOS-AP started={}", u8::from(ap_up));
    let mut st = Stats::default();
    for _ in 0..steps {
        let kind = rng.weighted(&WEIGHTS);
        st.kinds[kind] += 1;
        let Some(d) = devs[rng.below(n as u64) as usize].as_mut() else {
            continue;
        };
        match kind {
            0 => d.register_op(&mut rng, &mem, &mut st),
            1 => d.arbitrary_op(&mut rng, &mut st),
            2 => d.bring_up(&mut rng, &mem, &mut st, false),
            3 => {
                // Mostly on a live device (else the chains only test the
                // checks for a device that is down).
                if !d.live() && rng.chance(80) {
                    d.bring_up(&mut rng, &mem, &mut st, true);
                }
                if let Some(q) = d.chains_and_kick(&mut rng, &mem, &mut st, 8) {
                    if rng.chance(50) {
                        st.completions += u64::from(d.wait_used(q, rng.below(200_000)));
                    }
                }
            }
            4 => {
                let q = rng.below(3) as u32;
                d.kick(&mut rng, q, &mut st)
            }
            5 => {
                // Reset with I/O in flight: a bring-up if need be, a batch, a
                // moment, status 0, and a bring-up now and then.
                if !d.live() {
                    let clean = rng.chance(70);
                    d.bring_up(&mut rng, &mem, &mut st, clean);
                }
                let _ = d.chains_and_kick(&mut rng, &mem, &mut st, 16);
                for _ in 0..rng.below(20_000) {
                    core::hint::spin_loop();
                }
                d.reset();
                st.resets += 1;
                if rng.chance(50) {
                    d.bring_up(&mut rng, &mem, &mut st, false);
                }
            }
            6 => {
                let n = rng.range(16, 257);
                sweep::mmio(&mut rng, &mem, devices_end, n, &mut st)
            }
            7 => {
                let n = rng.range(8, 65);
                sweep::ports(&mut rng, n, &mut st)
            }
            _ => d.ack(),
        }
    }
    let ap_stopped = ap_up && ap::stop();
    let o = crate::out();
    let _ = core::fmt::Write::write_fmt(
        o,
        format_args!(
            "CHAOS-DONE seed={seed} steps={steps} notifies={} resets={} chains={} completions={} registers={} arbitrary={} mmio={} ports={} ap={} ap_stopped={} ap_chains={} ap_notifies={}",
            st.notifies, st.resets, st.chains, st.completions, st.registers, st.arbitrary, st.mmio_accesses, st.port_accesses,
            u8::from(ap_up), u8::from(ap_stopped), ap::CHAINS.load(core::sync::atomic::Ordering::SeqCst), ap::NOTIFIES.load(core::sync::atomic::Ordering::SeqCst)
        ),
    );
    let _ = core::fmt::Write::write_str(o, " kinds=");
    for (i, k) in KINDS.iter().enumerate() {
        let _ = core::fmt::Write::write_fmt(
            o,
            format_args!("{}{k}:{}", if i > 0 { "," } else { "" }, st.kinds[i]),
        );
    }
    let _ = core::fmt::Write::write_str(o, "\n");
    o.flush();
    idle()
}

/// Halts for good in ring 0 (the VMM stops the VM from outside).
pub(crate) fn idle() -> ! {
    // SAFETY: `ud2` with rax = SVC_IDLE never returns.
    unsafe { core::arch::asm!("ud2", in("rax") SVC_IDLE, options(noreturn)) }
}

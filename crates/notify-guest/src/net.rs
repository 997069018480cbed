//! A minimal virtio-net driver over virtio-mmio version 2 and the UDP echo
//! benchmark on it: queue 0 receives, queue 1 transmits, one frame in flight.
//!
//! Features: only `VIRTIO_F_VERSION_1` (no `MRG_RXBUF`, offloads, `CTRL_VQ` or
//! `EVENT_IDX`), so every buffer starts with the 12-byte `virtio_net_hdr_v1`
//! (all zero on transmit). Kicks are skipped, as Linux does without EVENT_IDX,
//! while the queue's `used.flags` has `VIRTQ_USED_F_NO_NOTIFY`. The transmit
//! queue never interrupts (`VIRTQ_AVAIL_F_NO_INTERRUPT`); the receive queue
//! interrupts in the irq pass only.
//!
//! Each request sends one 60-byte UDP frame to port 7 with a magic and a
//! sequence number; an echo program on the host side of the tap sends it
//! back with the addresses and ports swapped.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

use crate::virtio::{
    negotiate_version_1, sat, Avail, Desc, DeviceIds, Used, UsedElem, AVAIL_F_NO_INTERRUPT,
    DESC_F_WRITE, MAGIC, QUEUE_SIZE, REG_INTERRUPT_ACK, REG_INTERRUPT_STATUS, REG_QUEUE_DESC_HIGH,
    REG_QUEUE_DESC_LOW, REG_QUEUE_DEVICE_HIGH, REG_QUEUE_DEVICE_LOW, REG_QUEUE_DRIVER_HIGH,
    REG_QUEUE_DRIVER_LOW, REG_QUEUE_NOTIFY, REG_QUEUE_NUM, REG_QUEUE_NUM_MAX, REG_QUEUE_READY,
    REG_QUEUE_SEL, REG_STATUS, SPIN_LIMIT, STATUS_DRIVER_OK, STATUS_FAILED, USED_F_NO_NOTIFY,
};
use crate::{irq_count, irq_tsc, mmio_read, mmio_write, LAPIC_BASE, LAPIC_TPR, TPR_BLOCK_ALL};

/// The virtio device ID of a network device.
pub const DEVICE_ID_NET: u32 = 1;
/// `DEVICE_NEEDS_RESET` status bit.
const STATUS_NEEDS_RESET: u32 = 64;
const RX_QUEUE: u32 = 0;
const TX_QUEUE: u32 = 1;

/// `struct virtio_net_hdr_v1`.
const HDR_LEN: usize = 12;
/// Ethernet (14) + IPv4 (20) + UDP (8) + payload (18).
pub const FRAME_LEN: usize = 60;
const RX_BUF_LEN: usize = 2048;
/// Receive buffers posted (or half the queue if that is smaller).
const RX_BUFS: usize = QUEUE_SIZE as usize / 2;

/// Where the frames go (the echo program's side).
pub const MAC_DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// The guest's address; the echo comes back to it.
const MAC_SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const IP_SRC: [u8; 4] = [198, 18, 0, 2];
const IP_DST: [u8; 4] = [198, 18, 0, 1];
const UDP_SRC_PORT: u16 = 40000;
const UDP_DST_PORT: u16 = 7;
/// The payload's first 8 bytes; a sequence number (u64 LE) and 2 zero bytes follow.
pub const PAYLOAD_MAGIC: [u8; 8] = *b"EVMMNET1";
/// Offset of the payload in a frame.
const PAYLOAD_OFF: usize = 14 + 20 + 8;

/// The series' mode names, by row in `SAMPLES` (also the order they print):
/// the poll pass fills rows 0..3, the irq pass rows 3..5.
const SERIES: [&str; 5] = ["kick", "tx_used", "rx_used", "rx_irq", "rx_irq_wake"];

/// A split queue's three parts, each on its own page.
#[repr(C, align(4096))]
struct Ring {
    desc: [Desc; QUEUE_SIZE as usize],
    _pad0: [u8; 4096 - 16 * QUEUE_SIZE as usize],
    avail: Avail,
    _pad1: [u8; 4096 - core::mem::size_of::<Avail>()],
    used: Used,
    _pad2: [u8; 4096 - core::mem::size_of::<Used>()],
}

const RING_ZERO: Ring = Ring {
    desc: [Desc {
        addr: 0,
        len: 0,
        flags: 0,
        next: 0,
    }; QUEUE_SIZE as usize],
    _pad0: [0; 4096 - 16 * QUEUE_SIZE as usize],
    avail: Avail {
        flags: 0,
        idx: 0,
        ring: [0; QUEUE_SIZE as usize],
        used_event: 0,
    },
    _pad1: [0; 4096 - core::mem::size_of::<Avail>()],
    used: Used {
        flags: 0,
        idx: 0,
        ring: [UsedElem { id: 0, len: 0 }; QUEUE_SIZE as usize],
        avail_event: 0,
    },
    _pad2: [0; 4096 - core::mem::size_of::<Used>()],
};

/// Both queues and the buffers.
#[repr(C, align(4096))]
struct NetMem {
    rx: Ring,
    tx: Ring,
    /// Header + frame of the request in flight.
    tx_buf: [u8; 4096],
    rx_bufs: [[u8; RX_BUF_LEN]; RX_BUFS],
}

static mut NMEM: NetMem = NetMem {
    rx: RING_ZERO,
    tx: RING_ZERO,
    tx_buf: [0; 4096],
    rx_bufs: [[0; RX_BUF_LEN]; RX_BUFS],
};

fn nmem() -> *mut NetMem {
    addr_of_mut!(NMEM)
}

/// One request's timings (cycles, `u32::MAX` if not seen) and outcome.
struct Measurement {
    /// The transmit used element was descriptor 0 and the first frame received
    /// was the echo of this request.
    ok: bool,
    /// Whether the transmit queue was kicked.
    kicked: bool,
    /// Poll pass: the QueueNotify write itself.
    kick: u32,
    /// Poll pass: kick → transmit `used.idx` seen.
    tx_used: u32,
    /// Poll pass: kick → receive `used.idx` seen.
    rx_used: u32,
    /// Irq pass: kick → handler entry.
    irq: u32,
    /// Irq pass: kick → ring 3 sees the handler ran.
    wake: u32,
    /// Frames received in this request that were not its echo.
    foreign: u32,
    /// Irq pass: the wait ended on an interrupt with nothing received.
    stale_irq: bool,
    /// The echo (or its interrupt) did not come within [`SPIN_LIMIT`] wait-loop
    /// iterations.
    timeout: bool,
}

/// A virtio-net device on virtio-mmio.
pub struct NetDevice {
    base: usize,
    /// Size of both queues.
    qsize: u16,
    /// Receive buffers posted.
    rx_bufs: u16,
    rx_avail: u16,
    rx_used: u16,
    tx_avail: u16,
    tx_used: u16,
}

/// The Internet checksum of `bytes` (even length).
fn ip_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks_exact(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The frame of request `seq`.
fn build_frame(seq: u64) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&MAC_DST);
    f[6..12].copy_from_slice(&MAC_SRC);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((FRAME_LEN - 14) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&IP_SRC);
    ip[16..20].copy_from_slice(&IP_DST);
    let sum = ip_checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&UDP_SRC_PORT.to_be_bytes());
    udp[2..4].copy_from_slice(&UDP_DST_PORT.to_be_bytes());
    udp[4..6].copy_from_slice(&((FRAME_LEN - 34) as u16).to_be_bytes());
    f[PAYLOAD_OFF..PAYLOAD_OFF + 8].copy_from_slice(&PAYLOAD_MAGIC);
    f[PAYLOAD_OFF + 8..PAYLOAD_OFF + 16].copy_from_slice(&seq.to_le_bytes());
    f
}

/// Spins until `done(*idx)`; false after [`SPIN_LIMIT`] iterations.
fn wait_until(idx: *const u16, done: impl Fn(u16) -> bool) -> bool {
    let mut spins = 0u64;
    // SAFETY: `idx` is a used index in NMEM, which the device writes.
    while !done(unsafe { read_volatile(idx) }) {
        spins += 1;
        if spins > SPIN_LIMIT {
            return false;
        }
    }
    true
}

impl NetDevice {
    /// `Ok(None)` if `ids` are not a network device's, an error if it is one
    /// this driver cannot drive.
    pub fn check(base: usize, ids: DeviceIds) -> Result<Option<Self>, &'static str> {
        if ids.magic != MAGIC || ids.id != DEVICE_ID_NET {
            return Ok(None);
        }
        if ids.version != 2 {
            return Err("legacy virtio-mmio (version 1) is not supported (QEMU: -global virtio-mmio.force-legacy=false)");
        }
        Ok(Some(NetDevice {
            base,
            qsize: QUEUE_SIZE,
            rx_bufs: 0,
            rx_avail: 0,
            rx_used: 0,
            tx_avail: 0,
            tx_used: 0,
        }))
    }

    fn rd(&self, off: usize) -> u32 {
        // SAFETY: `base` was checked by `identify` to be a virtio-mmio window
        // below 4 GiB (identity-mapped).
        unsafe { mmio_read(self.base + off) }
    }

    fn wr(&self, off: usize, v: u32) {
        // SAFETY: as in `rd`.
        unsafe { mmio_write(self.base + off, v) }
    }

    /// Size of both queues.
    pub fn queue_size(&self) -> u16 {
        self.qsize
    }

    /// Resets the device, negotiates VERSION_1 only, sets up both queues,
    /// posts the receive buffers and sets DRIVER_OK.
    pub fn init(&mut self) -> Result<(), &'static str> {
        let s = negotiate_version_1(|off| self.rd(off), |off, v| self.wr(off, v))?;

        // One size for both queues: the smaller of QUEUE_SIZE and either
        // maximum, rounded down to a power of two.
        let mut size = u32::from(QUEUE_SIZE);
        for q in [RX_QUEUE, TX_QUEUE] {
            self.wr(REG_QUEUE_SEL, q);
            if self.rd(REG_QUEUE_READY) != 0 {
                return Err("queue already ready after reset");
            }
            let max = self.rd(REG_QUEUE_NUM_MAX);
            if max == 0 {
                return Err("receive or transmit queue not available");
            }
            size = size.min(max);
        }
        self.qsize = 1 << (15 - (size as u16).leading_zeros());
        if self.qsize < 2 {
            return Err("queues too small (fewer than 2 entries)");
        }
        self.rx_bufs = (self.qsize / 2).min(RX_BUFS as u16);

        let m = nmem();
        // SAFETY: NMEM is used only by this (single) driver instance from
        // ring 3; the device only accesses it after QueueReady / DRIVER_OK.
        unsafe {
            for k in 0..usize::from(self.rx_bufs) {
                write_volatile(
                    addr_of_mut!((*m).rx.desc[k]),
                    Desc {
                        addr: addr_of!((*m).rx_bufs[k]) as u64,
                        len: RX_BUF_LEN as u32,
                        flags: DESC_F_WRITE,
                        next: 0,
                    },
                );
                write_volatile(addr_of_mut!((*m).rx.avail.ring[k]), k as u16);
            }
            write_volatile(addr_of_mut!((*m).rx.avail.flags), AVAIL_F_NO_INTERRUPT);
            self.rx_avail = self.rx_bufs;
            write_volatile(addr_of_mut!((*m).rx.avail.idx), self.rx_avail);
            write_volatile(
                addr_of_mut!((*m).tx.desc[0]),
                Desc {
                    addr: addr_of!((*m).tx_buf) as u64,
                    len: (HDR_LEN + FRAME_LEN) as u32,
                    flags: 0,
                    next: 0,
                },
            );
            write_volatile(addr_of_mut!((*m).tx.avail.flags), AVAIL_F_NO_INTERRUPT);
        }
        for q in [RX_QUEUE, TX_QUEUE] {
            // SAFETY: pointers into NMEM, not dereferenced.
            let ring = unsafe {
                if q == RX_QUEUE {
                    addr_of!((*m).rx)
                } else {
                    addr_of!((*m).tx)
                }
            };
            // SAFETY: as above (addresses only).
            let (desc, avail, used) = unsafe {
                (
                    addr_of!((*ring).desc) as u64,
                    addr_of!((*ring).avail) as u64,
                    addr_of!((*ring).used) as u64,
                )
            };
            self.wr(REG_QUEUE_SEL, q);
            self.wr(REG_QUEUE_NUM, u32::from(self.qsize));
            self.wr(REG_QUEUE_DESC_LOW, desc as u32);
            self.wr(REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
            self.wr(REG_QUEUE_DRIVER_LOW, avail as u32);
            self.wr(REG_QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
            self.wr(REG_QUEUE_DEVICE_LOW, used as u32);
            self.wr(REG_QUEUE_DEVICE_HIGH, (used >> 32) as u32);
            self.wr(REG_QUEUE_READY, 1);
        }
        self.wr(REG_STATUS, s | STATUS_DRIVER_OK);
        if self.rd(REG_STATUS) & (STATUS_FAILED | STATUS_NEEDS_RESET) != 0 {
            return Err("device set FAILED or DEVICE_NEEDS_RESET");
        }
        self.kick_rx();
        Ok(())
    }

    /// Reads and acknowledges the interrupt status (outside timed intervals).
    pub fn ack_interrupt(&self) {
        let isr = self.rd(REG_INTERRUPT_STATUS);
        if isr != 0 {
            self.wr(REG_INTERRUPT_ACK, isr);
        }
    }

    /// Kicks the receive queue unless the device turned its kicks off.
    fn kick_rx(&self) {
        fence(Ordering::SeqCst);
        // SAFETY: used.flags of NMEM's receive queue, written by the device.
        let flags = unsafe { read_volatile(addr_of!((*nmem()).rx.used.flags)) };
        if flags & USED_F_NO_NOTIFY == 0 {
            self.wr(REG_QUEUE_NOTIFY, RX_QUEUE);
        }
    }

    /// Whether the receive queue interrupts (irq pass) or not (poll pass).
    fn set_rx_interrupts(&self, on: bool) {
        // SAFETY: avail.flags of NMEM's receive queue, driver-owned.
        unsafe {
            write_volatile(
                addr_of_mut!((*nmem()).rx.avail.flags),
                if on { 0 } else { AVAIL_F_NO_INTERRUPT },
            );
        }
    }

    /// Whether the device has published receive used elements not taken yet.
    fn rx_pending(&self) -> bool {
        // SAFETY: NMEM's receive used index, written by the device.
        unsafe { read_volatile(addr_of!((*nmem()).rx.used.idx)) != self.rx_used }
    }

    /// Takes the next receive used element (which must be published),
    /// reposts its buffer (kicking if the device wants kicks) and says
    /// whether it is the echo of `seq`.
    fn take_frame(&mut self, seq: u64) -> bool {
        let m = nmem();
        let slot = usize::from(self.rx_used % self.qsize);
        self.rx_used = self.rx_used.wrapping_add(1);
        // SAFETY: the device published this element before used.idx.
        let elem = unsafe { read_volatile(addr_of!((*m).rx.used.ring[slot])) };
        if elem.id >= u32::from(self.rx_bufs) {
            // Not a buffer of ours: nothing to repost.
            return false;
        }
        let k = elem.id as usize;
        let mut got = [0u8; HDR_LEN + FRAME_LEN];
        for (j, b) in got.iter_mut().enumerate() {
            // SAFETY: buffer k is the driver's again (the device used it).
            *b = unsafe { read_volatile(addr_of!((*m).rx_bufs[k][j])) };
        }
        let f = &got[HDR_LEN..];
        let ours = elem.len as usize >= HDR_LEN + FRAME_LEN
            && elem.len as usize <= RX_BUF_LEN
            && f[0..6] == MAC_SRC
            && f[PAYLOAD_OFF..PAYLOAD_OFF + 8] == PAYLOAD_MAGIC
            && f[PAYLOAD_OFF + 8..PAYLOAD_OFF + 16] == seq.to_le_bytes();
        let aslot = usize::from(self.rx_avail % self.qsize);
        self.rx_avail = self.rx_avail.wrapping_add(1);
        // SAFETY: driver-owned avail ring of NMEM's receive queue; the index
        // is written last.
        unsafe {
            write_volatile(addr_of_mut!((*m).rx.avail.ring[aslot]), k as u16);
            write_volatile(addr_of_mut!((*m).rx.avail.idx), self.rx_avail);
        }
        self.kick_rx();
        ours
    }

    /// Takes receive used elements until the echo of `seq` (true) or a
    /// timeout (false); counts the other frames in `foreign`.
    fn take_echo(&mut self, seq: u64, foreign: &mut u32) -> bool {
        loop {
            let old = self.rx_used;
            // SAFETY: address of NMEM's receive used index.
            if !wait_until(unsafe { addr_of!((*nmem()).rx.used.idx) }, |v| v != old) {
                return false;
            }
            if self.take_frame(seq) {
                return true;
            }
            *foreign += 1;
        }
    }

    /// Takes (and reposts) every receive used element already published;
    /// returns how many.
    fn take_leftovers(&mut self) -> u32 {
        let mut n = 0;
        while self.rx_pending() {
            self.take_frame(u64::MAX);
            n += 1;
        }
        n
    }

    /// Leaves the interrupt state clean for the next irq-pass request: no
    /// interrupt pending (drained first when `drain`), InterruptStatus
    /// acknowledged, then nothing left in the receive ring, so the next frame
    /// interrupts (the device sends none while InterruptStatus is set). Returns
    /// the frames taken.
    fn settle(&mut self, mut drain: bool) -> u32 {
        let mut taken = 0;
        loop {
            if drain {
                crate::drain_interrupts();
            }
            self.ack_interrupt();
            let n = self.take_leftovers();
            if n == 0 {
                return taken;
            }
            taken += n;
            drain = true;
        }
    }

    /// Sends the frame of `seq` and waits for its echo; times it per `irq_mode`.
    fn request(&mut self, seq: u64, irq_mode: bool) -> Measurement {
        let m = nmem();
        let frame = build_frame(seq);
        let slot = usize::from(self.tx_avail % self.qsize);
        // SAFETY: no frame is in flight (the previous one's used element was
        // taken), so the driver owns the transmit buffer and ring; the
        // available index is written last (x86 keeps stores in order).
        unsafe {
            for j in 0..HDR_LEN {
                write_volatile(addr_of_mut!((*m).tx_buf[j]), 0);
            }
            for (j, &b) in frame.iter().enumerate() {
                write_volatile(addr_of_mut!((*m).tx_buf[HDR_LEN + j]), b);
            }
            write_volatile(addr_of_mut!((*m).tx.avail.ring[slot]), 0);
            self.tx_avail = self.tx_avail.wrapping_add(1);
            write_volatile(addr_of_mut!((*m).tx.avail.idx), self.tx_avail);
        }
        let tx_expect = self.tx_avail;
        let rx_old = self.rx_used;
        let notify = self.base + REG_QUEUE_NOTIFY;
        // As virtqueue_kick_prepare: publish, full barrier, then the flags.
        fence(Ordering::SeqCst);
        // SAFETY: used.flags of NMEM's transmit queue, written by the device.
        let used_flags = unsafe { read_volatile(addr_of!((*m).tx.used.flags)) };
        let skip_kick = u64::from(used_flags & USED_F_NO_NOTIFY != 0);
        // SAFETY: addresses of the used indexes (read by the loops below).
        let (tx_used_ptr, rx_used_ptr) =
            unsafe { (addr_of!((*m).tx.used.idx), addr_of!((*m).rx.used.idx)) };
        let mut r = Measurement {
            ok: false,
            kicked: skip_kick == 0,
            kick: u32::MAX,
            tx_used: u32::MAX,
            rx_used: u32::MAX,
            irq: u32::MAX,
            wake: u32::MAX,
            foreign: 0,
            stale_irq: false,
            timeout: false,
        };
        if irq_mode {
            let old = irq_count();
            let start: u64;
            let wake: u64;
            let rx_now: u64;
            let spin_left: u64;
            // SAFETY: the kick is a 32-bit write of the transmit queue's index
            // to QueueNotify, the TPR is the user-mapped LAPIC register,
            // GUEST_IRQ_COUNT is read-only here. Interrupts are let in only
            // between the two TPR writes, where rax/rdx hold nothing live (the
            // handler clobbers them).
            unsafe {
                core::arch::asm!(
                    "mov dword ptr [{tpr}], 0",
                    "lfence",
                    "rdtsc",
                    "shl rdx, 32",
                    "or rax, rdx",
                    "mov {start}, rax",
                    "test {skip}, {skip}",
                    "jnz 4f",
                    "mov dword ptr [{notify}], 1",
                    "4:",
                    "2:",
                    "cmp qword ptr [{cnt}], {old}",
                    "jne 3f",
                    "dec {spin}",
                    "jnz 2b",
                    "3:",
                    "rdtsc",
                    "shl rdx, 32",
                    "or rax, rdx",
                    "mov {wake}, rax",
                    "movzx {rxu:e}, word ptr [{rxu}]",
                    "mov dword ptr [{tpr}], {block:e}",
                    rxu = inout(reg) rx_used_ptr => rx_now,
                    tpr = in(reg) LAPIC_BASE + LAPIC_TPR,
                    notify = in(reg) notify,
                    skip = in(reg) skip_kick,
                    cnt = in(reg) addr_of!(crate::boot::GUEST_IRQ_COUNT),
                    old = in(reg) old,
                    block = in(reg) TPR_BLOCK_ALL,
                    spin = inout(reg) SPIN_LIMIT => spin_left,
                    start = out(reg) start,
                    wake = out(reg) wake,
                    out("rax") _,
                    out("rdx") _,
                    options(nostack),
                );
            }
            if spin_left == 0 {
                r.timeout = true;
            } else {
                // A stale interrupt may have run before `start`: 0, not a wrap.
                r.irq = sat(irq_tsc().saturating_sub(start));
                r.wake = sat(wake.wrapping_sub(start));
                // The device publishes used.idx before it interrupts: an
                // interrupt with nothing received is a stale one (or not for
                // the receive queue), and its sample is wrong.
                r.stale_irq = rx_now == u64::from(rx_old);
            }
        } else {
            let start: u64;
            let kick: u64;
            let tx_t: u64;
            let rx_t: u64;
            let spin_left: u64;
            // SAFETY: the kick is a 32-bit write of the transmit queue's index
            // to QueueNotify; the used indexes are read-only here. The loop
            // records the TSC when each index first changes (0: not yet) and
            // ends when both have.
            unsafe {
                core::arch::asm!(
                    "lfence",
                    "rdtsc",
                    "shl rdx, 32",
                    "or rax, rdx",
                    "mov {start}, rax",
                    "test {skip}, {skip}",
                    "jnz 4f",
                    "mov dword ptr [{notify}], 1",
                    "4:",
                    "rdtsc",
                    "shl rdx, 32",
                    "or rax, rdx",
                    "sub rax, {start}",
                    "mov {skip}, rax",
                    "xor {txt:e}, {txt:e}",
                    "xor {rxt:e}, {rxt:e}",
                    "2:",
                    "test {txt}, {txt}",
                    "jnz 5f",
                    "movzx eax, word ptr [{txu}]",
                    "cmp eax, {txe:e}",
                    "jne 5f",
                    "rdtsc",
                    "shl rdx, 32",
                    "or rax, rdx",
                    "mov {txt}, rax",
                    "5:",
                    "test {rxt}, {rxt}",
                    "jnz 6f",
                    "movzx eax, word ptr [{rxu}]",
                    "cmp eax, {rxo:e}",
                    "je 6f",
                    "rdtsc",
                    "shl rdx, 32",
                    "or rax, rdx",
                    "mov {rxt}, rax",
                    "6:",
                    "test {txt}, {txt}",
                    "jz 7f",
                    "test {rxt}, {rxt}",
                    "jnz 3f",
                    "7:",
                    "dec {spin}",
                    "jnz 2b",
                    "3:",
                    notify = in(reg) notify,
                    skip = inout(reg) skip_kick => kick,
                    txu = in(reg) tx_used_ptr,
                    txe = in(reg) u32::from(tx_expect),
                    rxu = in(reg) rx_used_ptr,
                    rxo = in(reg) u32::from(rx_old),
                    spin = inout(reg) SPIN_LIMIT => spin_left,
                    start = out(reg) start,
                    txt = out(reg) tx_t,
                    rxt = out(reg) rx_t,
                    out("rax") _,
                    out("rdx") _,
                    options(nostack),
                );
            }
            r.kick = sat(kick);
            if tx_t != 0 {
                r.tx_used = sat(tx_t.wrapping_sub(start));
            }
            if rx_t != 0 {
                r.rx_used = sat(rx_t.wrapping_sub(start));
            }
            r.timeout = spin_left == 0;
        }

        // Reclaim the transmit descriptor.
        let mut tx_ok = false;
        if wait_until(tx_used_ptr, |v| v == tx_expect) {
            let tslot = usize::from(tx_expect.wrapping_sub(1) % self.qsize);
            self.tx_used = tx_expect;
            // SAFETY: the device published this element before used.idx.
            let elem = unsafe { read_volatile(addr_of!((*m).tx.used.ring[tslot])) };
            tx_ok = elem.id == 0;
        } else {
            r.timeout = true;
        }
        // After a timeout with nothing received, don't wait again: a late
        // echo is taken (as a foreign frame) by a later request.
        if r.timeout && !self.rx_pending() {
            if irq_mode {
                self.settle(true);
            }
            return r;
        }
        let echoed = self.take_echo(seq, &mut r.foreign);
        if !echoed {
            r.timeout = true;
        }
        // Frames that came after the echo count against this request too.
        r.foreign += if irq_mode {
            self.settle(r.foreign > 0 || r.timeout || r.stale_irq)
        } else {
            self.take_leftovers()
        };
        r.ok = tx_ok && echoed && r.foreign == 0 && !r.stale_irq;
        r
    }

    /// Runs the poll pass and the irq pass of `n` requests each and prints
    /// their series.
    pub fn bench(&mut self, n: usize, raw: bool) {
        let mut seq = 0u64;
        for irq_mode in [false, true] {
            let pass = if irq_mode { "irq" } else { "poll" };
            self.set_rx_interrupts(irq_mode);
            // Start clean: nothing pending, acknowledged, nothing received.
            self.settle(true);
            let irqs_before = irq_count();
            let (mut errors, mut kicks, mut timeouts) = (0u64, 0u64, 0u32);
            for i in 0..n {
                let m = self.request(seq, irq_mode);
                seq += 1;
                kicks += u64::from(m.kicked);
                if !m.ok {
                    errors += 1;
                }
                if m.timeout {
                    crate::println!(
                        "NOTIFY-ERROR kind=udp_echo pass={pass} request={i} timeout (no echo{})",
                        if irq_mode { " or no interrupt" } else { "" }
                    );
                    timeouts += 1;
                    if timeouts >= 3 {
                        crate::println!("NOTIFY-ERROR giving up after {timeouts} timeouts");
                        crate::power_off();
                    }
                }
                let row: &[(usize, u32)] = if irq_mode {
                    &[(3, m.irq), (4, m.wake)]
                } else {
                    &[(0, m.kick), (1, m.tx_used), (2, m.rx_used)]
                };
                for &(s, v) in row {
                    // SAFETY: ring-3-only storage; i < n <= MAX_REQUESTS.
                    unsafe { (*addr_of_mut!(crate::SAMPLES))[s][i] = v };
                }
            }
            // Interrupts raised during the poll pass show up here (collapsed:
            // at most one pending per vector).
            self.ack_interrupt();
            crate::drain_interrupts();
            let irqs = irq_count() - irqs_before;
            let rows = if irq_mode { 3..5 } else { 0..3 };
            for s in rows {
                // SAFETY: ring-3-only storage, no other reference alive.
                let samples = unsafe { &(&*addr_of!(crate::SAMPLES))[s][..n] };
                crate::print_series("udp_echo", SERIES[s], samples, irqs, kicks, errors, raw);
            }
        }
    }
}

//! The virtio-mmio transport (version 2): the register file the VMM maps at the
//! device's MMIO window.
//!
//! The transport knows the [`VirtioDevice`] trait and nothing of KVM. It owns one kick
//! eventfd per queue (the VMM binds them as ioeventfds on [`QUEUE_NOTIFY`], or with
//! `--notify exit` lets [`MmioTransport::write`] signal them) and the device's irqfd,
//! wrapped in an [`MmioInterrupt`] that the device's worker uses to raise interrupts.
//!
//! # InterruptStatus of devices with an external data path
//!
//! A device may say ([`VirtioDevice::interrupt_status_always_used`]) that its
//! used-buffer interrupts bypass the transport (a vhost-user backend writes the irqfd
//! itself). For such a device InterruptStatus reads with the VRING bit always set
//! while the device is activated, plus the CONFIG bit when the VMM raised a
//! configuration interrupt; InterruptACK clears CONFIG as usual and is harmless for
//! VRING. Before activation and after a reset the register reads as for any device.
//!
//! Register accesses of the wrong width (everything below the config space is 32-bit),
//! unaligned, to unknown offsets, or that break the initialization order are ignored
//! and logged; reads of such return zeros. Nothing the driver writes can panic.

use crate::device::{ActivateContext, ActivateError, VirtioDevice};
use crate::interrupt::{InterruptKind, InterruptSignal};
use crate::metrics::Counter;
use crate::status::{self, StatusChange};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Size of a device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// "virt" in little endian.
pub const MAGIC_VALUE: u64 = 0x000;
/// Device version number (2: modern).
pub const VERSION: u64 = 0x004;
/// Virtio subsystem device ID.
pub const DEVICE_ID: u64 = 0x008;
/// Virtio subsystem vendor ID.
pub const VENDOR_ID: u64 = 0x00c;
/// Features the device supports (32 bits selected by DeviceFeaturesSel).
pub const DEVICE_FEATURES: u64 = 0x010;
/// Selects the 32-bit word of DeviceFeatures.
pub const DEVICE_FEATURES_SEL: u64 = 0x014;
/// Features the driver accepted (32 bits selected by DriverFeaturesSel).
pub const DRIVER_FEATURES: u64 = 0x020;
/// Selects the 32-bit word of DriverFeatures.
pub const DRIVER_FEATURES_SEL: u64 = 0x024;
/// Selects the queue the Queue* registers refer to.
pub const QUEUE_SEL: u64 = 0x030;
/// Maximum size of the selected queue (0: no such queue).
pub const QUEUE_NUM_MAX: u64 = 0x034;
/// Size of the selected queue.
pub const QUEUE_NUM: u64 = 0x038;
/// The selected queue is ready.
pub const QUEUE_READY: u64 = 0x044;
/// Offset of the QueueNotify register within the window.
pub const QUEUE_NOTIFY: u64 = 0x50;
/// Pending interrupt reasons.
pub const INTERRUPT_STATUS: u64 = 0x060;
/// Clears interrupt reasons.
pub const INTERRUPT_ACK: u64 = 0x064;
/// Device status.
pub const STATUS: u64 = 0x070;
/// Descriptor table address, low 32 bits.
pub const QUEUE_DESC_LOW: u64 = 0x080;
/// Descriptor table address, high 32 bits.
pub const QUEUE_DESC_HIGH: u64 = 0x084;
/// Available (driver) ring address, low 32 bits.
pub const QUEUE_DRIVER_LOW: u64 = 0x090;
/// Available (driver) ring address, high 32 bits.
pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
/// Used (device) ring address, low 32 bits.
pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
/// Used (device) ring address, high 32 bits.
pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
/// Shared memory region select (SHMSel).
pub const SHM_SEL: u64 = 0x0ac;
/// Shared memory region length, low 32 bits (SHMLenLow).
pub const SHM_LEN_LOW: u64 = 0x0b0;
/// Shared memory region length, high 32 bits.
pub const SHM_LEN_HIGH: u64 = 0x0b4;
/// Shared memory region base, low 32 bits (SHMBaseLow).
pub const SHM_BASE_LOW: u64 = 0x0b8;
/// Shared memory region base, high 32 bits.
pub const SHM_BASE_HIGH: u64 = 0x0bc;
/// Changes whenever the config space changes.
pub const CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device-specific configuration space.
pub const CONFIG: u64 = 0x100;

/// The transport-level feature bits (24 to 40) this transport implements: split
/// virtqueues with indirect descriptors and EVENT_IDX (VIRTIO_F_RING_INDIRECT_DESC,
/// VIRTIO_F_RING_EVENT_IDX) and VIRTIO_F_VERSION_1. No packed rings, no IN_ORDER,
/// no ACCESS_PLATFORM, no NOTIFICATION_DATA (a QueueNotify write carries the queue
/// index only), no RING_RESET.
pub const TRANSPORT_FEATURES: u64 =
    (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_F_VERSION_1);

/// The device-type-specific feature bits (0 to 23).
pub const DEVICE_SPECIFIC_FEATURES: u64 = (1 << 24) - 1;

/// What this transport can offer of `features` (e.g. the features of an external
/// backend): the device-specific bits 0 to 23 and the transport bits in
/// [`TRANSPORT_FEATURES`]; everything else (legacy bits such as NOTIFY_ON_EMPTY and
/// ANY_LAYOUT, vhost's LOG_ALL and PROTOCOL_FEATURES, bits this transport does not
/// implement) is dropped.
pub fn transport_supported(features: u64) -> u64 {
    features & (DEVICE_SPECIFIC_FEATURES | TRANSPORT_FEATURES)
}

/// The value of MagicValue.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The value of Version.
pub const MMIO_VERSION: u32 = 2;
/// The value of VendorID ("EVMM").
pub const MMIO_VENDOR: u32 = 0x4d4d_5645;

/// The transport's side of the device interrupt: the InterruptStatus bits (shared
/// with the device's worker) and the irqfd.
///
/// An interrupt whose InterruptStatus bit is still set is not sent again: the driver
/// has not acknowledged the last one yet, and a driver handles the queues after its
/// InterruptACK (Linux's `vm_interrupt` reads the status, acknowledges it, then scans
/// the queues), so it sees whatever was published before the ACK. This is what
/// virtio-mmio's level-triggered line does in QEMU (a line already high stays high);
/// with an edge-triggered irqfd it spares the guest an interrupt, and with it the two
/// exits of reading InterruptStatus and writing InterruptACK.
#[derive(Debug)]
pub struct MmioInterrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irqfd: EventFd,
    coalesced: Counter,
}

impl MmioInterrupt {
    /// Wraps `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irqfd,
            coalesced: Counter::default(),
        }
    }

    /// The InterruptStatus register.
    pub fn interrupt_status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The irqfd.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// Interrupts not sent because the driver had not acknowledged the last one yet.
    pub fn coalesced(&self) -> u64 {
        self.coalesced.get()
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

impl InterruptSignal for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        let bit = match kind {
            InterruptKind::Vring => VIRTIO_MMIO_INT_VRING,
            InterruptKind::Config => VIRTIO_MMIO_INT_CONFIG,
        };
        if self.status.fetch_or(bit, Ordering::SeqCst) & bit != 0 {
            self.coalesced.inc();
            return Ok(());
        }
        self.irqfd.write(1)
    }

    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        if let Err(e) = self.trigger(InterruptKind::Config) {
            log::error!("cannot signal DEVICE_NEEDS_RESET: {e}");
        }
    }

    fn call_eventfd(&self) -> Option<&EventFd> {
        Some(&self.irqfd)
    }
}

/// The transport's counters.
#[derive(Debug, Serialize)]
struct TransportMetrics {
    device_type: u32,
    notify_exits: u64,
    interrupts_coalesced: u64,
    device: serde_json::Value,
}

/// A virtio device behind the virtio-mmio register file.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<MmioInterrupt>,
    kicks: Vec<EventFd>,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
    notify_exits: u64,
}

impl MmioTransport {
    /// Wraps `device`. `irqfd` is the device's interrupt (the VMM registers it as a
    /// KVM irqfd); the transport creates one kick eventfd per queue.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irqfd: EventFd,
    ) -> std::io::Result<Self> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| {
                Queue::new(max).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("bad queue size {max}: {e}"),
                    )
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let kicks = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(MmioInterrupt::new(irqfd)),
            kicks,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            notify_exits: 0,
        })
    }

    /// Each queue's kick eventfd, in queue-index order: the VMM registers them as KVM
    /// ioeventfds on QueueNotify with the index as datamatch (or, with
    /// `--notify exit`, the transport writes them itself on a QueueNotify write).
    pub fn queue_kicks(&self) -> &[EventFd] {
        &self.kicks
    }

    /// The interrupt the device raises (InterruptStatus and the irqfd).
    pub fn interrupt(&self) -> &Arc<MmioInterrupt> {
        &self.interrupt
    }

    /// The device status as the driver reads it (with DEVICE_NEEDS_RESET).
    pub fn device_status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// The InterruptStatus register as the driver reads it: the bits raised through
    /// the [`MmioInterrupt`], plus the VRING bit while an activated device says
    /// its used-buffer interrupts bypass the transport
    /// ([`VirtioDevice::interrupt_status_always_used`]).
    pub fn interrupt_status(&self) -> u32 {
        let raised = self.interrupt.interrupt_status();
        if self.activated && self.device.interrupt_status_always_used() {
            raised | VIRTIO_MMIO_INT_VRING
        } else {
            raised
        }
    }

    /// Whether the device is live (DRIVER_OK and activated).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Tells the driver the config space changed: bumps ConfigGeneration and raises a
    /// configuration interrupt.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Err(e) = self.interrupt.trigger(InterruptKind::Config) {
            log::error!("cannot signal a config change: {e}");
        }
    }

    /// A read of the register file at `offset` within the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG {
            if !matches!(data.len(), 1 | 2 | 4 | 8) {
                crate::guest_warn!("virtio-mmio: config read of {} bytes ignored", data.len());
                return;
            }
            self.device.read_config(offset - CONFIG, data);
            return;
        }
        let Some(out) = reg_bytes_mut(offset, data) else {
            crate::guest_warn!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored (registers are 32-bit, aligned)",
                data.len()
            );
            return;
        };
        let value = match offset {
            MAGIC_VALUE => MMIO_MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID => MMIO_VENDOR,
            DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => self.interrupt_status(),
            STATUS => self.device_status(),
            CONFIG_GENERATION => self.config_generation,
            // No device has shared memory regions (no virtio-fs DAX window): every
            // region reads as absent, a length (and base) of all ones.
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            _ => {
                crate::guest_warn!(
                    "virtio-mmio: read of unknown or write-only register {offset:#x}"
                );
                0
            }
        };
        out.copy_from_slice(&value.to_le_bytes());
    }

    /// A write to the register file at `offset` within the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            if !matches!(data.len(), 1 | 2 | 4 | 8) {
                crate::guest_warn!("virtio-mmio: config write of {} bytes ignored", data.len());
                return;
            }
            self.device.write_config(offset - CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Some(value) = reg_value(offset, data) else {
            crate::guest_warn!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored (registers are 32-bit, aligned)",
                data.len()
            );
            return;
        };
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_select = value,
            DRIVER_FEATURES_SEL => self.driver_features_select = value,
            DRIVER_FEATURES => self.write_driver_features(value),
            QUEUE_SEL => self.queue_select = value,
            // Selects a shared memory region; none exists (see the reads).
            SHM_SEL => {}
            QUEUE_NUM | QUEUE_READY | QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW
            | QUEUE_DRIVER_HIGH | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH => {
                self.write_queue_register(offset, value)
            }
            QUEUE_NOTIFY => self.notify(value),
            INTERRUPT_ACK => self.interrupt.ack(value),
            STATUS => self.write_status(value),
            _ => crate::guest_warn!(
                "virtio-mmio: write of unknown or read-only register {offset:#x}"
            ),
        }
    }

    /// QueueNotify writes that reached this transport (exits to the vCPU thread).
    pub fn notify_exits(&self) -> u64 {
        self.notify_exits
    }

    /// The device's counters plus the transport's, as JSON.
    pub fn metrics(&self) -> serde_json::Value {
        let m = TransportMetrics {
            device_type: self.device.device_type(),
            notify_exits: self.notify_exits,
            interrupts_coalesced: self.interrupt.coalesced(),
            device: self.device.metrics(),
        };
        serde_json::to_value(m).unwrap_or(serde_json::Value::Null)
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_select as usize)
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & status::FEATURES_OK != 0 || self.status & status::DRIVER == 0 {
            crate::guest_warn!(
                "virtio-mmio: DriverFeatures write in status {:#x} ignored",
                self.status
            );
            return;
        }
        let (shift, mask) = match self.driver_features_select {
            0 => (0, 0xffff_ffffu64),
            1 => (32, 0xffff_ffff_0000_0000u64),
            sel => {
                crate::guest_warn!(
                    "virtio-mmio: DriverFeatures write with DriverFeaturesSel {sel} ignored"
                );
                return;
            }
        };
        self.acked_features = (self.acked_features & !mask) | (u64::from(value) << shift);
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if self.status & status::DRIVER_OK != 0 || self.status & status::FAILED != 0 {
            crate::guest_warn!(
                "virtio-mmio: queue register {offset:#x} written in status {:#x}; ignored",
                self.status
            );
            return;
        }
        let sel = self.queue_select;
        let Some(q) = self.queues.get_mut(sel as usize) else {
            crate::guest_warn!(
                "virtio-mmio: queue register {offset:#x} written for missing queue {sel}"
            );
            return;
        };
        match offset {
            QUEUE_NUM => match u16::try_from(value).map(|v| q.try_set_size(v)) {
                Ok(Ok(())) => {}
                _ => crate::guest_warn!(
                    "virtio-mmio: queue {sel} size {value} refused (max {}, power of two)",
                    q.max_size()
                ),
            },
            QUEUE_READY => q.set_ready(value == 1),
            // The try_ setters: virtio-queue's plain ones log each refusal at error,
            // which a guest could repeat at will.
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH => {
                let addr = with_half(q.desc_table(), offset == QUEUE_DESC_HIGH, value);
                if q.try_set_desc_table_address(GuestAddress(addr)).is_err() {
                    crate::guest_warn!(
                        "virtio-mmio: queue {sel}: descriptor table {addr:#x} misaligned"
                    );
                }
            }
            QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH => {
                let addr = with_half(q.avail_ring(), offset == QUEUE_DRIVER_HIGH, value);
                if q.try_set_avail_ring_address(GuestAddress(addr)).is_err() {
                    crate::guest_warn!(
                        "virtio-mmio: queue {sel}: available ring {addr:#x} misaligned"
                    );
                }
            }
            QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH => {
                let addr = with_half(q.used_ring(), offset == QUEUE_DEVICE_HIGH, value);
                if q.try_set_used_ring_address(GuestAddress(addr)).is_err() {
                    crate::guest_warn!("virtio-mmio: queue {sel}: used ring {addr:#x} misaligned");
                }
            }
            _ => {}
        }
    }

    fn notify(&mut self, value: u32) {
        self.notify_exits += 1;
        match self.kicks.get(value as usize) {
            Some(kick) => {
                if let Err(e) = kick.write(1) {
                    log::error!("virtio-mmio: cannot signal queue {value}: {e}");
                }
            }
            None => crate::guest_warn!("virtio-mmio: notify of missing queue {value} ignored"),
        }
    }

    fn write_status(&mut self, value: u32) {
        match status::transition(self.status, value) {
            StatusChange::Reset => self.reset(),
            StatusChange::Unchanged => {}
            StatusChange::Failed(s) => {
                crate::guest_warn!("virtio-mmio: driver set FAILED (status {s:#x})");
                self.status = s;
            }
            StatusChange::Advance(s) => {
                let added = s & !self.status;
                if added == status::FEATURES_OK && !self.features_acceptable() {
                    return;
                }
                self.status = s;
                if added == status::DRIVER_OK {
                    self.activate();
                }
            }
            StatusChange::Illegal => crate::guest_warn!(
                "virtio-mmio: illegal status change {:#x} -> {value:#x} ignored",
                self.status
            ),
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.avail_features();
        let unknown = self.acked_features & !offered;
        if unknown != 0 {
            crate::guest_warn!(
                "virtio-mmio: FEATURES_OK refused: driver accepted unoffered features {unknown:#x}"
            );
            return false;
        }
        if self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            crate::guest_warn!(
                "virtio-mmio: FEATURES_OK refused: legacy driver (no VIRTIO_F_VERSION_1)"
            );
            return false;
        }
        true
    }

    fn activate(&mut self) {
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter_mut().enumerate() {
            q.set_event_idx(event_idx);
            if q.ready() && !rings_in_memory(q, &self.mem) {
                crate::guest_warn!("virtio-mmio: queue {i} is not usable in guest memory");
                self.interrupt.set_needs_reset();
                return;
            }
            match Queue::try_from(q.state()) {
                Ok(copy) => queues.push(copy),
                Err(e) => {
                    crate::guest_warn!("virtio-mmio: queue {i}: {e}");
                    self.interrupt.set_needs_reset();
                    return;
                }
            }
        }
        let kicks = match self
            .kicks
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
        {
            Ok(k) => k,
            Err(e) => {
                log::error!("virtio-mmio: cannot clone kick eventfds: {e}");
                self.interrupt.set_needs_reset();
                return;
            }
        };
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            acked_features: self.acked_features,
            queues,
            kicks,
            interrupt: self.interrupt.clone(),
        };
        match self.device.activate(ctx) {
            Ok(()) => self.activated = true,
            Err(e) => {
                // A driver setup the device cannot use is the guest's doing, and a
                // guest can repeat it at will (DRIVER_OK with no queue ready, reset,
                // again): rate-limited. A worker that cannot start is the host's.
                match e {
                    ActivateError::BadSetup(_) => {
                        crate::guest_warn!("virtio-mmio: device activation failed: {e}")
                    }
                    ActivateError::Worker(_) => {
                        log::error!("virtio-mmio: device activation failed: {e}")
                    }
                }
                self.interrupt.set_needs_reset();
            }
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        self.activated = false;
        for q in &mut self.queues {
            q.reset();
        }
        for k in &self.kicks {
            // Drop kicks that arrived while the device was down (EAGAIN when none).
            let _ = k.read();
        }
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.status = 0;
        self.interrupt.clear();
    }
}

/// The 4 bytes of a register access, if it is one (32-bit, aligned).
fn reg_bytes_mut(offset: u64, data: &mut [u8]) -> Option<&mut [u8; 4]> {
    if !offset.is_multiple_of(4) {
        return None;
    }
    data.try_into().ok()
}

/// The value of a 32-bit aligned register write.
fn reg_value(offset: u64, data: &[u8]) -> Option<u32> {
    if !offset.is_multiple_of(4) {
        return None;
    }
    let bytes: [u8; 4] = data.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

/// `current` with its low (or high) 32 bits replaced by `value`.
fn with_half(current: u64, high: bool, value: u32) -> u64 {
    if high {
        (current & 0xffff_ffff) | (u64::from(value) << 32)
    } else {
        (current & !0xffff_ffff) | u64::from(value)
    }
}

/// Whether a queue's rings lie in guest memory: virtio-queue's `is_valid` check,
/// without the line it logs at error each time (a guest could repeat it at will).
fn rings_in_memory(q: &Queue, mem: &GuestMemoryMmap) -> bool {
    let size = u64::from(q.size());
    let fits =
        |addr: u64, len: u64, access| mem.check_range(GuestAddress(addr), len as usize, access);
    fits(q.desc_table(), 16 * size, Permissions::Read)
        && fits(q.avail_ring(), 6 + 2 * size, Permissions::Read)
        && fits(q.used_ring(), 6 + 8 * size, Permissions::Write)
}

#[cfg(test)]
mod tests;

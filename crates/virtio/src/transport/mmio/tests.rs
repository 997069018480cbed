//! Unit tests of the virtio-mmio transport: registers, the status state machine,
//! feature negotiation, queue setup, out-of-order writes, interrupts, reset.

use super::*;
use crate::blk::{Block, BlockConfig};
use crate::device::{ActivateError, DeviceOffer};
use crate::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, FAILED, FEATURES_OK};
use crate::test_utils::mmio_driver::*;
use crate::test_utils::*;
use std::io::Write;
use std::sync::Mutex;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const VERSION_1: u64 = 1 << 32;
const OFFERED: u64 = VERSION_1 | (1 << 29) | 1;

/// (ready, size, event_idx) of a queue handed to `activate`.
type QueueSeen = (bool, u16, bool);

#[derive(Default)]
struct Record {
    activations: Vec<(u64, Vec<QueueSeen>)>,
    resets: usize,
    config_writes: Vec<(u64, Vec<u8>)>,
    interrupt: Option<Arc<dyn InterruptSignal>>,
}

struct MockDevice {
    offer: DeviceOffer,
    record: Arc<Mutex<Record>>,
    fail: bool,
    always_used: bool,
}

impl VirtioDevice for MockDevice {
    fn offer(&self) -> &DeviceOffer {
        &self.offer
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as u8).wrapping_add(i as u8);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.record
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.fail {
            return Err(ActivateError::BadSetup("mock".into()));
        }
        let mut r = self.record.lock().unwrap();
        let qs = ctx
            .queues
            .iter()
            .map(|q| (q.ready(), q.size(), q.event_idx_enabled()))
            .collect();
        assert_eq!(ctx.kicks.len(), ctx.queues.len());
        r.activations.push((ctx.acked_features, qs));
        r.interrupt = Some(ctx.interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        self.record.lock().unwrap().resets += 1;
    }
    fn interrupt_status_always_used(&self) -> bool {
        self.always_used
    }
    fn metrics(&self) -> serde_json::Value {
        serde_json::json!({"mock": true})
    }
}

fn transport_with(fail: bool) -> (MmioTransport, Arc<Mutex<Record>>) {
    mock_transport(fail, false)
}

fn mock_transport(fail: bool, always_used: bool) -> (MmioTransport, Arc<Mutex<Record>>) {
    let record = Arc::new(Mutex::new(Record::default()));
    let dev = MockDevice {
        offer: DeviceOffer {
            device_type: 42,
            queue_sizes: vec![QSIZE, QSIZE],
            avail_features: OFFERED,
            config_space: Vec::new(),
        },
        record: record.clone(),
        fail,
        always_used,
    };
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let t = MmioTransport::new(Box::new(dev), guest_memory(), irq).unwrap();
    (t, record)
}

fn transport() -> (MmioTransport, Arc<Mutex<Record>>) {
    transport_with(false)
}

/// Sets up queue `i` at the layout of a MockSplitQueue at `base`, used ring at `used`.
fn setup_mock_queue(t: &mut MmioTransport, i: u32, base: u64, used: u64) {
    let mem = guest_memory();
    let vq = MockSplitQueue::create(&mem, GuestAddress(base), QSIZE);
    let mut ring = DriverRing::of_mock(&vq);
    ring.used = used;
    setup_queue(t, i, &ring);
}

fn init(t: &mut MmioTransport, features: u64) {
    negotiate(t, features);
    setup_mock_queue(t, 0, 0, USED_ADDR);
    w32(t, STATUS, LIVE);
}

#[test]
fn identification_registers() {
    let (mut t, _) = transport();
    assert_eq!(r32(&mut t, MAGIC_VALUE), 0x7472_6976);
    assert_eq!(&r32(&mut t, MAGIC_VALUE).to_le_bytes(), b"virt");
    assert_eq!(r32(&mut t, VERSION), 2);
    assert_eq!(r32(&mut t, DEVICE_ID), 42);
    assert_eq!(r32(&mut t, VENDOR_ID), MMIO_VENDOR);
    assert_eq!(r32(&mut t, STATUS), 0);
    w32(&mut t, QUEUE_SEL, 1);
    assert_eq!(r32(&mut t, QUEUE_NUM_MAX), u32::from(QSIZE));
    w32(&mut t, QUEUE_SEL, 2);
    assert_eq!(r32(&mut t, QUEUE_NUM_MAX), 0);
    assert_eq!(t.queue_kicks().len(), 2);
}

#[test]
fn shared_memory_regions_read_as_absent() {
    // A driver (virtio-fs looking for its DAX window) takes a length of all ones as
    // "no such region"; a length of 0 would make it fail the device.
    let (mut t, _) = transport();
    for sel in [0, 1, u32::MAX] {
        w32(&mut t, SHM_SEL, sel);
        let len = u64::from(r32(&mut t, SHM_LEN_LOW)) | u64::from(r32(&mut t, SHM_LEN_HIGH)) << 32;
        assert_eq!(len, u64::MAX);
        assert_eq!(r32(&mut t, SHM_BASE_LOW), u32::MAX);
        assert_eq!(r32(&mut t, SHM_BASE_HIGH), u32::MAX);
    }
    assert_eq!(r32(&mut t, STATUS), 0);
}

#[test]
fn device_features_by_select() {
    let (mut t, _) = transport();
    w32(&mut t, DEVICE_FEATURES_SEL, 0);
    assert_eq!(r32(&mut t, DEVICE_FEATURES), OFFERED as u32);
    w32(&mut t, DEVICE_FEATURES_SEL, 1);
    assert_eq!(r32(&mut t, DEVICE_FEATURES), (OFFERED >> 32) as u32);
    w32(&mut t, DEVICE_FEATURES_SEL, 7);
    assert_eq!(r32(&mut t, DEVICE_FEATURES), 0);
}

#[test]
fn full_initialization_activates_the_device() {
    let (mut t, rec) = transport();
    init(&mut t, OFFERED);
    assert!(t.is_activated());
    assert_eq!(r32(&mut t, STATUS), LIVE);
    let r = rec.lock().unwrap();
    assert_eq!(r.activations.len(), 1);
    let (acked, qs) = &r.activations[0];
    assert_eq!(*acked, OFFERED);
    // Queue 0 ready with EVENT_IDX on; queue 1 not set up but passed (not ready).
    assert_eq!(qs[0], (true, QSIZE, true));
    assert!(!qs[1].0);
}

#[test]
fn illegal_status_transitions_are_ignored() {
    let (mut t, rec) = transport();
    w32(&mut t, STATUS, DRIVER);
    assert_eq!(r32(&mut t, STATUS), 0);
    w32(&mut t, STATUS, ACKNOWLEDGE);
    w32(&mut t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(r32(&mut t, STATUS), ACKNOWLEDGE);
    w32(&mut t, STATUS, ACKNOWLEDGE | DRIVER);
    ack_features(&mut t, OFFERED);
    // DRIVER_OK without FEATURES_OK.
    w32(&mut t, STATUS, ACKNOWLEDGE | DRIVER | status::DRIVER_OK);
    assert_eq!(r32(&mut t, STATUS), ACKNOWLEDGE | DRIVER);
    // Dropping a bit.
    w32(&mut t, STATUS, ACKNOWLEDGE);
    assert_eq!(r32(&mut t, STATUS), ACKNOWLEDGE | DRIVER);
    assert!(rec.lock().unwrap().activations.is_empty());
    // The state is not corrupted: initialization still completes.
    w32(&mut t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    setup_mock_queue(&mut t, 0, 0, USED_ADDR);
    w32(&mut t, STATUS, LIVE);
    assert!(t.is_activated());
}

#[test]
fn failed_sticks_until_reset() {
    let (mut t, _) = transport();
    w32(&mut t, STATUS, ACKNOWLEDGE);
    w32(&mut t, STATUS, ACKNOWLEDGE | FAILED);
    assert_eq!(r32(&mut t, STATUS), ACKNOWLEDGE | FAILED);
    w32(&mut t, STATUS, ACKNOWLEDGE | FAILED | DRIVER);
    assert_eq!(r32(&mut t, STATUS), ACKNOWLEDGE | FAILED);
    w32(&mut t, STATUS, 0);
    assert_eq!(r32(&mut t, STATUS), 0);
}

#[test]
fn features_ok_refused_for_unoffered_features() {
    let (mut t, _) = transport();
    w32(&mut t, STATUS, ACKNOWLEDGE);
    w32(&mut t, STATUS, ACKNOWLEDGE | DRIVER);
    ack_features(&mut t, OFFERED | (1 << 5));
    w32(&mut t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(r32(&mut t, STATUS), ACKNOWLEDGE | DRIVER);
    // Fixing the features lets it through.
    ack_features(&mut t, OFFERED);
    w32(&mut t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(r32(&mut t, STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
}

#[test]
fn features_ok_refused_without_version_1() {
    let (mut t, _) = transport();
    w32(&mut t, STATUS, ACKNOWLEDGE);
    w32(&mut t, STATUS, ACKNOWLEDGE | DRIVER);
    ack_features(&mut t, OFFERED & !VERSION_1);
    w32(&mut t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(r32(&mut t, STATUS) & FEATURES_OK, 0);
}

#[test]
fn driver_features_after_features_ok_are_ignored() {
    let (mut t, rec) = transport();
    w32(&mut t, STATUS, ACKNOWLEDGE);
    w32(&mut t, STATUS, ACKNOWLEDGE | DRIVER);
    ack_features(&mut t, VERSION_1);
    w32(&mut t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    ack_features(&mut t, OFFERED);
    assert_eq!(t.acked_features(), VERSION_1);
    setup_mock_queue(&mut t, 0, 0, USED_ADDR);
    w32(&mut t, STATUS, LIVE);
    let r = rec.lock().unwrap();
    assert_eq!(r.activations[0].0, VERSION_1);
    // No EVENT_IDX negotiated: the queue does not use it.
    assert!(!r.activations[0].1[0].2);
}

#[test]
fn queue_setup_after_driver_ok_is_ignored() {
    let (mut t, _) = transport();
    init(&mut t, OFFERED);
    w32(&mut t, QUEUE_SEL, 0);
    w32(&mut t, QUEUE_NUM, 8);
    w32(&mut t, QUEUE_READY, 0);
    w32(&mut t, QUEUE_DESC_LOW, 0x1234_0000);
    assert_eq!(r32(&mut t, QUEUE_READY), 1);
    assert_eq!(t.queues[0].size(), QSIZE);
    assert_eq!(t.queues[0].desc_table(), 0);
}

#[test]
fn bad_queue_sizes_are_refused() {
    let (mut t, _) = transport();
    w32(&mut t, STATUS, ACKNOWLEDGE);
    w32(&mut t, QUEUE_SEL, 0);
    for bad in [0, 3, u32::from(QSIZE) * 2, 0x1_0000 + 8] {
        w32(&mut t, QUEUE_NUM, bad);
        assert_eq!(t.queues[0].size(), QSIZE, "size {bad}");
    }
    w32(&mut t, QUEUE_NUM, 8);
    assert_eq!(t.queues[0].size(), 8);
    // A queue that does not exist.
    w32(&mut t, QUEUE_SEL, 9);
    w32(&mut t, QUEUE_NUM, 8);
    w32(&mut t, QUEUE_READY, 1);
    assert_eq!(r32(&mut t, QUEUE_READY), 0);
}

#[test]
fn invalid_queue_addresses_fail_activation_with_needs_reset() {
    let (mut t, rec) = transport();
    w32(&mut t, STATUS, ACKNOWLEDGE);
    w32(&mut t, STATUS, ACKNOWLEDGE | DRIVER);
    ack_features(&mut t, OFFERED);
    w32(&mut t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    // Used ring beyond guest memory.
    setup_mock_queue(&mut t, 0, 0, MEM_SIZE as u64 + 0x1000);
    w32(&mut t, STATUS, LIVE);
    assert!(!t.is_activated());
    assert!(rec.lock().unwrap().activations.is_empty());
    assert_ne!(r32(&mut t, STATUS) & DEVICE_NEEDS_RESET, 0);
    assert_ne!(r32(&mut t, INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG, 0);
    // Reset clears it.
    w32(&mut t, STATUS, 0);
    assert_eq!(r32(&mut t, STATUS), 0);
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), 0);
}

#[test]
fn device_activation_error_sets_needs_reset() {
    let (mut t, _) = transport_with(true);
    init(&mut t, OFFERED);
    assert!(!t.is_activated());
    assert_eq!(r32(&mut t, STATUS), LIVE | DEVICE_NEEDS_RESET);
}

#[test]
fn a_guest_that_loops_on_a_refused_activation_gets_a_bounded_number_of_log_lines() {
    use crate::ratelimit::{BURST, WINDOW_MS};
    let (mut t, _) = transport_with(true);
    const ROUNDS: u64 = 20_000;
    let start = std::time::Instant::now();
    let lines = log_lines::warnings_of(|| {
        for _ in 0..ROUNDS {
            w32(&mut t, STATUS, 0);
            init(&mut t, OFFERED);
            assert!(!t.is_activated());
        }
    });
    let windows = start.elapsed().as_millis() as u64 / WINDOW_MS + 2;
    assert!(lines >= 1, "the first refusal is logged");
    assert!(
        lines <= BURST * windows,
        "{lines} lines for {ROUNDS} refused activations: {:?}",
        log_lines::busiest_sites()
    );
}

#[test]
fn queue_notify_before_activation_is_harmless() {
    let (mut t, _) = transport();
    w32(&mut t, QUEUE_NOTIFY, 0);
    w32(&mut t, QUEUE_NOTIFY, 1);
    w32(&mut t, QUEUE_NOTIFY, 77);
    assert_eq!(t.notify_exits(), 3);
    assert_eq!(t.queue_kicks()[0].read().unwrap(), 1);
    assert_eq!(t.queue_kicks()[1].read().unwrap(), 1);
    init(&mut t, OFFERED);
    assert!(t.is_activated());
}

#[test]
fn queue_notify_writes_the_kick_eventfd() {
    let (mut t, _) = transport();
    init(&mut t, OFFERED);
    w32(&mut t, QUEUE_NOTIFY, 0);
    w32(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(t.queue_kicks()[0].read().unwrap(), 2);
    assert_eq!(t.notify_exits(), 2);
}

#[test]
fn interrupt_status_and_ack() {
    let (mut t, rec) = transport();
    init(&mut t, OFFERED);
    let irq = rec.lock().unwrap().interrupt.clone().unwrap();
    irq.trigger(InterruptKind::Vring).unwrap();
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    irq.trigger(InterruptKind::Config).unwrap();
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), 3);
    assert_eq!(t.interrupt().irqfd().read().unwrap(), 2);
    w32(&mut t, INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
    w32(&mut t, INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), 0);
    // InterruptStatus is read-only.
    w32(&mut t, INTERRUPT_STATUS, 3);
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), 0);
}

/// A used-buffer interrupt the driver has not acknowledged yet is not sent again (the
/// driver scans the queues after its ACK); once acknowledged, the next one is sent.
#[test]
fn an_unacknowledged_interrupt_is_not_sent_twice() {
    let (mut t, rec) = transport();
    init(&mut t, OFFERED);
    let irq = rec.lock().unwrap().interrupt.clone().unwrap();
    irq.trigger(InterruptKind::Vring).unwrap();
    irq.trigger(InterruptKind::Vring).unwrap();
    irq.trigger(InterruptKind::Vring).unwrap();
    assert_eq!(t.interrupt().irqfd().read().unwrap(), 1, "one interrupt");
    assert_eq!(t.interrupt().coalesced(), 2);
    // A configuration change is a bit of its own: it is sent.
    irq.trigger(InterruptKind::Config).unwrap();
    assert_eq!(t.interrupt().irqfd().read().unwrap(), 1);
    w32(&mut t, INTERRUPT_ACK, 3);
    irq.trigger(InterruptKind::Vring).unwrap();
    assert_eq!(
        t.interrupt().irqfd().read().unwrap(),
        1,
        "sent after the ACK"
    );
    assert_eq!(t.metrics()["interrupts_coalesced"], 2);
}

#[test]
fn interrupt_status_of_a_device_with_an_external_data_path() {
    // A vhost-user device: its backend writes the irqfd itself, so the VRING bit
    // reads as always set while the device is live, and acking it is harmless.
    let (mut t, rec) = mock_transport(false, true);
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), 0, "not before activation");
    init(&mut t, OFFERED);
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    w32(&mut t, INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    // A configuration interrupt the VMM raises shows beside it and acks as usual.
    t.config_changed();
    assert_eq!(
        r32(&mut t, INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
    );
    assert_eq!(t.interrupt().irqfd().read().unwrap(), 1);
    w32(
        &mut t,
        INTERRUPT_ACK,
        VIRTIO_MMIO_INT_CONFIG | VIRTIO_MMIO_INT_VRING,
    );
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    // The device's own trigger sets nothing more.
    let irq = rec.lock().unwrap().interrupt.clone().unwrap();
    irq.trigger(InterruptKind::Vring).unwrap();
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    // Reset: the device is no longer live, the register reads 0 again.
    w32(&mut t, STATUS, 0);
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), 0);
    init(&mut t, OFFERED);
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);

    // An ordinary device: the bit is there only when raised.
    let (mut t, _) = transport();
    init(&mut t, OFFERED);
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), 0);
}

#[test]
fn the_interrupt_hands_out_its_irqfd_as_call_eventfd() {
    let (mut t, rec) = transport();
    init(&mut t, OFFERED);
    let irq = rec.lock().unwrap().interrupt.clone().unwrap();
    // What a vhost-user backend would write: the very irqfd, no InterruptStatus bit.
    irq.call_eventfd().expect("an irqfd").write(1).unwrap();
    assert_eq!(t.interrupt().irqfd().read().unwrap(), 1);
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), 0);
}

#[test]
fn transport_feature_filter() {
    let all = u64::MAX;
    let f = transport_supported(all);
    assert_eq!(f & DEVICE_SPECIFIC_FEATURES, DEVICE_SPECIFIC_FEATURES);
    assert_eq!(f & !DEVICE_SPECIFIC_FEATURES, TRANSPORT_FEATURES);
    // VHOST_USER_F_PROTOCOL_FEATURES (30), VHOST_F_LOG_ALL (26),
    // NOTIFY_ON_EMPTY (24), packed rings (34) are not offered.
    for bit in [24, 26, 27, 30, 33, 34, 35, 38, 40] {
        assert_eq!(transport_supported(1 << bit), 0, "bit {bit}");
    }
    for bit in [28, 29, 32] {
        assert_eq!(transport_supported(1 << bit), 1 << bit, "bit {bit}");
    }
}

#[test]
fn needs_reset_from_the_device_shows_in_status() {
    let (mut t, rec) = transport();
    init(&mut t, OFFERED);
    let irq = rec.lock().unwrap().interrupt.clone().unwrap();
    irq.set_needs_reset();
    assert_eq!(r32(&mut t, STATUS), LIVE | DEVICE_NEEDS_RESET);
    assert_ne!(r32(&mut t, INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG, 0);
    // The driver writing the status back with NEEDS_RESET is not a transition.
    w32(&mut t, STATUS, LIVE | DEVICE_NEEDS_RESET);
    assert_eq!(r32(&mut t, STATUS), LIVE | DEVICE_NEEDS_RESET);
}

#[test]
fn config_space_and_generation() {
    let (mut t, rec) = transport();
    let mut b = [0u8; 4];
    t.read(CONFIG + 4, &mut b);
    assert_eq!(b, [4, 5, 6, 7]);
    let mut one = [0u8; 1];
    t.read(CONFIG + 9, &mut one);
    assert_eq!(one, [9]);
    let g0 = r32(&mut t, CONFIG_GENERATION);
    t.write(CONFIG + 2, &[1, 2]);
    assert_eq!(r32(&mut t, CONFIG_GENERATION), g0 + 1);
    assert_eq!(rec.lock().unwrap().config_writes, vec![(2, vec![1, 2])]);
    t.config_changed();
    assert_eq!(r32(&mut t, CONFIG_GENERATION), g0 + 2);
    assert_ne!(r32(&mut t, INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG, 0);
    // Odd widths in config space are ignored.
    let mut three = [0xaau8; 3];
    t.read(CONFIG, &mut three);
    assert_eq!(three, [0; 3]);
    t.write(CONFIG, &[1, 2, 3]);
    assert_eq!(rec.lock().unwrap().config_writes.len(), 1);
}

#[test]
fn bad_accesses_are_ignored() {
    let (mut t, _) = transport();
    // Wrong width.
    let mut two = [0xaau8; 2];
    t.read(MAGIC_VALUE, &mut two);
    assert_eq!(two, [0, 0]);
    t.write(STATUS, &[1]);
    assert_eq!(r32(&mut t, STATUS), 0);
    let mut eight = [0xaau8; 8];
    t.read(VERSION, &mut eight);
    assert_eq!(eight, [0; 8]);
    // Unaligned.
    let mut four = [0xaau8; 4];
    t.read(MAGIC_VALUE + 1, &mut four);
    assert_eq!(four, [0; 4]);
    t.write(STATUS + 2, &[1, 0, 0, 0]);
    assert_eq!(r32(&mut t, STATUS), 0);
    // Unknown (0x0b0 is SHMLenLow now: see shared_memory_regions_read_as_absent) and
    // write-only registers.
    assert_eq!(r32(&mut t, 0x0d0), 0);
    assert_eq!(r32(&mut t, QUEUE_NOTIFY), 0);
    assert_eq!(r32(&mut t, DRIVER_FEATURES), 0);
    w32(&mut t, 0x0d0, 1);
    w32(&mut t, MAGIC_VALUE, 1);
    assert_eq!(r32(&mut t, MAGIC_VALUE), 0x7472_6976);
    // Empty and huge accesses, offsets far out.
    t.read(0x20, &mut []);
    t.write(0x20, &[]);
    let mut big = [0u8; 64];
    t.read(u64::MAX - 8, &mut big);
    t.write(u64::MAX - 3, &[0; 4]);
    t.read(u64::MAX, &mut four);
}

#[test]
fn reset_clears_everything_and_allows_reinitialization() {
    let (mut t, rec) = transport();
    init(&mut t, OFFERED);
    let irq = rec.lock().unwrap().interrupt.clone().unwrap();
    irq.trigger(InterruptKind::Vring).unwrap();
    w32(&mut t, QUEUE_SEL, 1);
    w32(&mut t, QUEUE_NOTIFY, 0);

    w32(&mut t, STATUS, 0);
    assert!(!t.is_activated());
    assert_eq!(rec.lock().unwrap().resets, 1);
    assert_eq!(r32(&mut t, STATUS), 0);
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), 0);
    assert_eq!(t.acked_features(), 0);
    assert_eq!(t.queue_select, 0);
    assert_eq!(r32(&mut t, QUEUE_READY), 0);
    assert_eq!(t.queues[0].size(), QSIZE);
    // Stale kicks were dropped.
    assert!(t.queue_kicks()[0].read().is_err());

    init(&mut t, VERSION_1);
    assert!(t.is_activated());
    let r = rec.lock().unwrap();
    assert_eq!(r.activations.len(), 2);
    assert_eq!(r.activations[1].0, VERSION_1);
}

#[test]
fn metrics_json() {
    let (mut t, _) = transport();
    w32(&mut t, QUEUE_NOTIFY, 0);
    let m = t.metrics();
    assert_eq!(m["device_type"], 42);
    assert_eq!(m["notify_exits"], 1);
    assert_eq!(m["device"]["mock"], true);
}

#[test]
fn block_device_through_the_transport() {
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let disk: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
    f.write_all(&disk).unwrap();
    let blk = Block::new(BlockConfig {
        path: f.path().into(),
        readonly: false,
        id: None,
        queues: 1,
        direct: false,
        poll: Default::default(),
        engine: Default::default(),
    })
    .unwrap();
    let mem = guest_memory();
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let irq_probe = irqfd.try_clone().unwrap();
    let mut t = MmioTransport::new(Box::new(blk), mem.clone(), irqfd).unwrap();
    assert_eq!(r32(&mut t, DEVICE_ID), 2);
    let mut cap = [0u8; 8];
    t.read(CONFIG, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 16);

    // The driver: full init with a 16-entry queue (max is 256).
    let vq = MockSplitQueue::new(&mem, QSIZE);
    w32(&mut t, STATUS, ACKNOWLEDGE);
    w32(&mut t, STATUS, ACKNOWLEDGE | DRIVER);
    w32(&mut t, DEVICE_FEATURES_SEL, 0);
    let lo = r32(&mut t, DEVICE_FEATURES);
    w32(&mut t, DEVICE_FEATURES_SEL, 1);
    let hi = r32(&mut t, DEVICE_FEATURES);
    ack_features(&mut t, (u64::from(hi) << 32) | u64::from(lo));
    w32(&mut t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(r32(&mut t, STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    setup_mock_queue(&mut t, 0, 0, USED_ADDR);
    w32(&mut t, STATUS, LIVE);
    assert!(t.is_activated());

    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    h[8..].copy_from_slice(&2u64.to_le_bytes());
    mem.write_slice(&h, GuestAddress(0x10_0000)).unwrap();
    add_chain(
        &vq,
        0,
        &[
            Desc(0x10_0000, 16, false),
            Desc(0x20_0000, 1024, true),
            Desc(0x30_0000, 1, true),
        ],
    );
    // `--notify exit`: the vCPU thread's QueueNotify write kicks the worker.
    w32(&mut t, QUEUE_NOTIFY, 0);
    assert!(wait_readable(&irq_probe));
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    assert_eq!(used_idx(&mem), 1);
    assert_eq!(used_elem(&mem, 0), (0, 1025));
    let s: u8 = mem.read_obj(GuestAddress(0x30_0000)).unwrap();
    assert_eq!(s, VIRTIO_BLK_S_OK as u8);
    let mut back = vec![0u8; 1024];
    mem.read_slice(&mut back, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(back, disk[1024..2048]);

    let m = t.metrics();
    assert_eq!(m["device_type"], 2);
    assert_eq!(m["notify_exits"], 1);
    assert_eq!(m["device"]["queues"][0]["req_in"], 1);
    assert_eq!(m["device"]["queues"][0]["kicks"], 1);

    // Reset stops the worker; the driver can bring the device up again.
    w32(&mut t, STATUS, 0);
    assert!(!t.is_activated());
    w32(&mut t, STATUS, ACKNOWLEDGE);
    w32(&mut t, STATUS, ACKNOWLEDGE | DRIVER);
    ack_features(&mut t, VERSION_1);
    w32(&mut t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    setup_mock_queue(&mut t, 0, 0x40_0000, 0x50_0000);
    w32(&mut t, STATUS, LIVE);
    assert!(t.is_activated());
}

#[test]
fn a_guest_that_loops_on_bad_register_accesses_gets_a_bounded_number_of_log_lines() {
    use crate::ratelimit::{BURST, WINDOW_MS};
    let (mut t, _) = transport();
    const ROUNDS: u64 = 50_000;
    const SITES: u64 = 4;
    let start = std::time::Instant::now();
    let lines = log_lines::warnings_of(|| {
        for _ in 0..ROUNDS {
            r32(&mut t, 0x0f0); // an unknown register
            w32(&mut t, 0x0f0, 1); // the same, written
            t.write(STATUS, &[0xff]); // a 1-byte register write
            w32(&mut t, STATUS, status::DRIVER_OK); // an illegal status change
        }
    });
    let windows = start.elapsed().as_millis() as u64 / WINDOW_MS + 2;
    assert!(lines >= SITES, "the first of each kind is logged: {lines}");
    assert!(
        lines <= SITES * BURST * windows,
        "{lines} lines for {} bad accesses",
        SITES * ROUNDS
    );
}

/// The registers a driver writes, and a value for each that is often a sensible one.
fn plausible_write(rng: &mut SeededRng, status: u32) -> (u64, u32) {
    const STEPS: [u32; 5] = [
        0,
        ACKNOWLEDGE,
        ACKNOWLEDGE | DRIVER,
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | status::DRIVER_OK,
    ];
    let regs = [
        DEVICE_FEATURES_SEL,
        DRIVER_FEATURES_SEL,
        DRIVER_FEATURES,
        QUEUE_SEL,
        QUEUE_NUM,
        QUEUE_READY,
        QUEUE_NOTIFY,
        INTERRUPT_ACK,
        STATUS,
        QUEUE_DESC_LOW,
        QUEUE_DESC_HIGH,
        QUEUE_DRIVER_LOW,
        QUEUE_DRIVER_HIGH,
        QUEUE_DEVICE_LOW,
        QUEUE_DEVICE_HIGH,
        CONFIG,
    ];
    let reg = regs[rng.below(regs.len() as u64) as usize];
    let value = match reg {
        STATUS => {
            // The next step of the init sequence, a reset, FAILED, or anything.
            match rng.below(4) {
                0 | 1 => {
                    let at = STEPS
                        .iter()
                        .position(|&s| s == status & !DEVICE_NEEDS_RESET);
                    STEPS[at.map_or(0, |i| (i + 1) % STEPS.len())]
                }
                2 => status | FAILED,
                _ => rng.next_u64() as u32,
            }
        }
        DRIVER_FEATURES => {
            if rng.chance(70) {
                (OFFERED >> (32 * rng.below(2))) as u32
            } else {
                rng.next_u64() as u32
            }
        }
        QUEUE_SEL | QUEUE_NOTIFY | DRIVER_FEATURES_SEL | DEVICE_FEATURES_SEL => rng.below(4) as u32,
        QUEUE_NUM => 1 << rng.below(6),
        QUEUE_READY => rng.below(2) as u32,
        QUEUE_DESC_HIGH | QUEUE_DRIVER_HIGH | QUEUE_DEVICE_HIGH => {
            if rng.chance(80) {
                0
            } else {
                rng.next_u64() as u32
            }
        }
        _ => rng.below(MEM_SIZE as u64) as u32,
    };
    (reg, value)
}

#[test]
fn generated_register_sequences_keep_the_status_machine_legal() {
    use crate::ratelimit::{BURST, WINDOW_MS};
    let seeds = soak_seeds(40);
    let start = std::time::Instant::now();
    let mut accesses = 0u64;
    let lines = log_lines::warnings_of(|| {
        for seed in 0..seeds {
            let mut rng = SeededRng::new(seed);
            let (mut t, record) = transport();
            let mut status = 0u32;
            let mut resets = 0usize;
            let mut activations = 0usize;
            let mut activations_since_reset = 0usize;
            for step in 0..2000 {
                accesses += 1;
                let what = format!("seed {seed}, step {step}");
                if rng.chance(20) {
                    // A read of anything, of any width.
                    let mut buf = [0u8; 8];
                    let len = [1, 2, 3, 4, 4, 4, 8][rng.below(7) as usize];
                    t.read(rng.below(0x200), &mut buf[..len]);
                } else if rng.chance(5) {
                    // A write of an odd width anywhere.
                    let len = [1, 2, 3, 8][rng.below(4) as usize];
                    t.write(rng.below(0x200), &rng.next_u64().to_le_bytes()[..len]);
                } else {
                    let (reg, value) = plausible_write(&mut rng, status);
                    w32(&mut t, reg, value);
                }
                let now = r32(&mut t, STATUS);
                let (before, after) = (status & !DEVICE_NEEDS_RESET, now & !DEVICE_NEEDS_RESET);
                if after != before {
                    let legal = after == 0
                        || matches!(
                            status::transition(before, after),
                            StatusChange::Advance(_) | StatusChange::Failed(_)
                        );
                    assert!(legal, "{what}: status {before:#x} -> {after:#x}");
                }
                status = now;
                let r = record.lock().unwrap();
                if r.resets > resets {
                    resets = r.resets;
                    activations_since_reset = 0;
                }
                if r.activations.len() > activations {
                    activations_since_reset += r.activations.len() - activations;
                    activations = r.activations.len();
                    assert!(
                        activations_since_reset <= 1,
                        "{what}: activated twice without a reset"
                    );
                    assert_ne!(
                        after & status::DRIVER_OK,
                        0,
                        "{what}: activated before DRIVER_OK"
                    );
                }
            }
        }
    });
    // Every guest_warn! site of the transport logs at most BURST lines a window.
    let windows = start.elapsed().as_millis() as u64 / WINDOW_MS + 2;
    assert!(
        lines <= 25 * BURST * windows,
        "{lines} log lines for {accesses} register accesses: {:?}",
        log_lines::busiest_sites()
    );
}

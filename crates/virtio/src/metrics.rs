//! Per-queue counters of a device, lock-free so the worker can bump them while the
//! VMM reads them.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The counters of one queue.
#[derive(Debug, Default)]
pub struct QueueMetrics {
    /// Sum of the kick eventfd values the worker read (coalesced kicks count each).
    pub kicks: Counter,
    /// Times the worker woke up for this queue.
    pub wakeups: Counter,
    /// VIRTIO_BLK_T_IN requests.
    pub req_in: Counter,
    /// VIRTIO_BLK_T_OUT requests.
    pub req_out: Counter,
    /// VIRTIO_BLK_T_FLUSH requests.
    pub req_flush: Counter,
    /// VIRTIO_BLK_T_GET_ID requests.
    pub req_get_id: Counter,
    /// VIRTIO_BLK_T_DISCARD requests.
    pub req_discard: Counter,
    /// VIRTIO_BLK_T_WRITE_ZEROES requests.
    pub req_write_zeroes: Counter,
    /// Requests of a type the device does not know.
    pub req_unsupported: Counter,
    /// Bytes read from the disk into guest memory.
    pub bytes_read: Counter,
    /// Bytes written from guest memory to the disk.
    pub bytes_written: Counter,
    /// Used-buffer interrupts raised.
    pub interrupts: Counter,
    /// Used-buffer interrupts EVENT_IDX let the device skip.
    pub interrupts_suppressed: Counter,
    /// Descriptor chains rejected as malformed.
    pub malformed_chains: Counter,
}

/// A point-in-time copy of [`QueueMetrics`], serialized as JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[allow(missing_docs)]
pub struct QueueMetricsSnapshot {
    pub kicks: u64,
    pub wakeups: u64,
    pub req_in: u64,
    pub req_out: u64,
    pub req_flush: u64,
    pub req_get_id: u64,
    pub req_discard: u64,
    pub req_write_zeroes: u64,
    pub req_unsupported: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub interrupts: u64,
    pub interrupts_suppressed: u64,
    pub malformed_chains: u64,
}

impl QueueMetrics {
    /// Reads every counter.
    pub fn snapshot(&self) -> QueueMetricsSnapshot {
        QueueMetricsSnapshot {
            kicks: self.kicks.get(),
            wakeups: self.wakeups.get(),
            req_in: self.req_in.get(),
            req_out: self.req_out.get(),
            req_flush: self.req_flush.get(),
            req_get_id: self.req_get_id.get(),
            req_discard: self.req_discard.get(),
            req_write_zeroes: self.req_write_zeroes.get(),
            req_unsupported: self.req_unsupported.get(),
            bytes_read: self.bytes_read.get(),
            bytes_written: self.bytes_written.get(),
            interrupts: self.interrupts.get(),
            interrupts_suppressed: self.interrupts_suppressed.get(),
            malformed_chains: self.malformed_chains.get(),
        }
    }
}

/// A device's counters as serialized by [`crate::VirtioDevice::metrics`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeviceMetricsSnapshot {
    /// One entry per queue, in queue-index order.
    pub queues: Vec<QueueMetricsSnapshot>,
}

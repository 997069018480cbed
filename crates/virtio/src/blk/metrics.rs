//! The counters of one virtio-blk queue.

crate::counters! {
    /// The counters of one virtio-blk queue.
    BlockQueueMetrics => BlockQueueSnapshot {
        /// Sum of the kick eventfd values the worker read (coalesced kicks count each).
        kicks,
        /// Times the worker woke up for this queue.
        wakeups,
        /// VIRTIO_BLK_T_IN requests.
        req_in,
        /// VIRTIO_BLK_T_OUT requests.
        req_out,
        /// VIRTIO_BLK_T_FLUSH requests.
        req_flush,
        /// VIRTIO_BLK_T_GET_ID requests.
        req_get_id,
        /// VIRTIO_BLK_T_DISCARD requests.
        req_discard,
        /// VIRTIO_BLK_T_WRITE_ZEROES requests.
        req_write_zeroes,
        /// Requests of a type the device does not know.
        req_unsupported,
        /// Bytes read from the disk into guest memory.
        bytes_read,
        /// Bytes written from guest memory to the disk.
        bytes_written,
        /// Used-buffer interrupts raised.
        interrupts,
        /// Used-buffer interrupts EVENT_IDX let the device skip.
        interrupts_suppressed,
        /// Descriptor chains rejected as malformed.
        malformed_chains,
    }
}

/// A block device's counters as serialized by [`crate::VirtioDevice::metrics`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlockMetricsSnapshot {
    /// One entry per queue, in queue-index order.
    pub queues: Vec<BlockQueueSnapshot>,
}

impl BlockMetricsSnapshot {
    /// Reads the counters of every queue.
    pub fn of(queues: &[BlockQueueMetrics]) -> Self {
        Self {
            queues: queues.iter().map(BlockQueueMetrics::snapshot).collect(),
        }
    }
}

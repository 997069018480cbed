//! The counters of one virtio-net queue pair.

crate::counters! {
    /// The counters of one queue pair (its receive and transmit queue; the control
    /// queue's commands count on pair 0).
    NetQueueMetrics => NetQueueSnapshot {
        /// Sum of the receive queue's kick eventfd values (the driver added buffers).
        rx_kicks,
        /// Sum of the transmit queue's kick eventfd values.
        tx_kicks,
        /// Times the worker woke up.
        wakeups,
        /// Frames handed to the guest.
        rx_packets,
        /// Their bytes (without the virtio-net header).
        rx_bytes,
        /// Frames sent to the tap.
        tx_packets,
        /// Their bytes (without the virtio-net header).
        tx_bytes,
        /// Frames from the tap larger than the buffers the driver posted, dropped.
        rx_dropped_too_big,
        /// Frames the tap refused (link down, malformed offload header), dropped.
        tx_dropped_tap_error,
        /// Times a frame waited for the tap to take it (EAGAIN).
        tx_waits_for_tap,
        /// Failures reading the tap other than "nothing to read".
        tap_errors,
        /// Control-queue commands answered.
        ctrl_commands,
        /// Used-buffer interrupts raised.
        interrupts,
        /// Used-buffer interrupts EVENT_IDX or VRING_AVAIL_F_NO_INTERRUPT let the device skip.
        interrupts_suppressed,
        /// Descriptor chains rejected as malformed.
        malformed_chains,
    }
}

/// A net device's counters as serialized by [`crate::VirtioDevice::metrics`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetMetricsSnapshot {
    /// Who moves the frames: `evmm` (its own workers) or `vhost-net` (the kernel's
    /// vhost worker; evmm serves the control queue only).
    pub backend: &'static str,
    /// The tap's name.
    pub tap: String,
    /// Times the driver activated the device.
    pub activations: u64,
    /// One entry per queue pair.
    pub queues: Vec<NetQueueSnapshot>,
}

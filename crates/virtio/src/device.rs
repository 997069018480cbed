//! The small trait the transport drives, and what a device gets when it is activated.

use crate::interrupt::InterruptSignal;
use std::sync::Arc;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Copies the bytes of a configuration space `space` at `offset` into `data`; bytes
/// past its end (or at an offset that does not fit in memory) read as zero.
pub fn read_config_bytes(space: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    for (i, b) in data.iter_mut().enumerate() {
        if let Some(v) = start.checked_add(i).and_then(|o| space.get(o)) {
            *b = *v;
        }
    }
}

/// What a device shows the driver before it is activated: its type, its queues, its
/// features and its configuration space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceOffer {
    /// The virtio device ID (2 for block, 1 for network).
    pub device_type: u32,
    /// The maximum size of each queue; its length is the number of queues.
    pub queue_sizes: Vec<u16>,
    /// The features offered (including VIRTIO_F_VERSION_1).
    pub avail_features: u64,
    /// The device-specific configuration space.
    pub config_space: Vec<u8>,
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// The queues the driver set up, in queue-index order.
    pub queues: Vec<Queue>,
    /// Each queue's kick eventfd (the same index as `queues`).
    pub kicks: Vec<EventFd>,
    /// Raises the device's interrupt, and NEEDS_RESET.
    pub interrupt: Arc<dyn InterruptSignal>,
}

/// A queue the driver made ready, with its kick eventfd.
pub struct ReadyQueue {
    /// The virtio queue index.
    pub index: usize,
    /// The queue, EVENT_IDX set as negotiated.
    pub queue: Queue,
    /// Its kick eventfd.
    pub kick: EventFd,
}

impl ReadyQueue {
    /// An independent copy (the same ring addresses and indices, a dup of the kick).
    pub fn try_clone(&self) -> Result<Self, ActivateError> {
        Ok(ReadyQueue {
            index: self.index,
            queue: Queue::try_from(self.queue.state())
                .map_err(|e| ActivateError::BadSetup(format!("queue {}: {e}", self.index)))?,
            kick: self.kick.try_clone().map_err(ActivateError::Worker)?,
        })
    }
}

impl ActivateContext {
    /// Whether the driver accepted feature `bit`.
    pub fn has_feature(&self, bit: u32) -> bool {
        self.acked_features & (1u64 << bit) != 0
    }

    /// [`Self::take_ready_queues`] with the queues placed at their index (`None`: not
    /// ready), for devices whose queues have different jobs.
    pub fn take_queues_by_index(
        &mut self,
        expected: usize,
    ) -> Result<Vec<Option<ReadyQueue>>, ActivateError> {
        let mut by_index: Vec<Option<ReadyQueue>> = (0..expected).map(|_| None).collect();
        for q in self.take_ready_queues(expected)? {
            let i = q.index;
            if let Some(slot) = by_index.get_mut(i) {
                *slot = Some(q);
            }
        }
        Ok(by_index)
    }

    /// The start of every activation: checks that the transport handed over `expected`
    /// queues and kicks, and returns the ready ones with EVENT_IDX as negotiated; fails
    /// when none is ready.
    pub fn take_ready_queues(&mut self, expected: usize) -> Result<Vec<ReadyQueue>, ActivateError> {
        if self.queues.len() != expected || self.kicks.len() != expected {
            return Err(ActivateError::BadSetup(format!(
                "{} queues and {} kick eventfds for a device with {expected} queues",
                self.queues.len(),
                self.kicks.len()
            )));
        }
        let event_idx = self.has_feature(VIRTIO_RING_F_EVENT_IDX);
        let ready: Vec<ReadyQueue> = std::mem::take(&mut self.queues)
            .into_iter()
            .zip(std::mem::take(&mut self.kicks))
            .enumerate()
            .filter(|(_, (q, _))| q.ready())
            .map(|(index, (mut queue, kick))| {
                queue.set_event_idx(event_idx);
                ReadyQueue { index, queue, kick }
            })
            .collect();
        if ready.is_empty() {
            return Err(ActivateError::BadSetup("no queue is ready".into()));
        }
        Ok(ready)
    }
}

/// Errors of activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The worker could not be started.
    #[error("cannot start the device worker: {0}")]
    Worker(#[source] std::io::Error),
    /// The driver's setup is not usable (e.g. a queue count the device does not have).
    #[error("unusable driver setup: {0}")]
    BadSetup(String),
}

/// A virtio device as the transport sees it.
pub trait VirtioDevice: Send {
    /// What the device offers the driver.
    fn offer(&self) -> &DeviceOffer;
    /// The virtio device ID.
    fn device_type(&self) -> u32 {
        self.offer().device_type
    }
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16] {
        &self.offer().queue_sizes
    }
    /// The features the device offers (including VIRTIO_F_VERSION_1).
    fn avail_features(&self) -> u64 {
        self.offer().avail_features
    }
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.offer().config_space, offset, data);
    }
    /// Writes the device-specific configuration space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device's worker on the given queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the worker and returns the device to its initial state, reusable.
    fn reset(&mut self);
    /// Whether the transport must report a used-buffer interrupt (the VRING bit of
    /// virtio-mmio's InterruptStatus) as always pending while the device is live.
    ///
    /// A device whose backend signals the guest directly (vhost-user: the backend
    /// writes the irqfd it got with SET_VRING_CALL) never tells the VMM that it
    /// raised an interrupt, so the VMM cannot keep InterruptStatus up to date. Such a
    /// device answers `true`: InterruptStatus then reads with the VRING bit set
    /// whenever the device is activated (plus the CONFIG bit when the VMM itself
    /// raised a configuration interrupt), and an InterruptACK of the VRING bit is
    /// accepted but does not clear it. A driver that finds the bit set scans its used
    /// rings and finds nothing new at worst (Linux's `vring_interrupt` returns
    /// IRQ_NONE), which costs a spurious scan, never a lost interrupt. This is also
    /// what Firecracker does for its vhost-user devices. The default is `false`: the
    /// bit reflects the interrupts the device raised through
    /// [`crate::InterruptSignal::trigger`].
    fn interrupt_status_always_used(&self) -> bool {
        false
    }
    /// The device's counters as JSON (Null when it has none).
    fn metrics(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let space = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_bytes(&space, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&space, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }
}

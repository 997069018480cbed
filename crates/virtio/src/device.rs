//! The small trait the transport drives.

use crate::interrupt::InterruptSignal;
use std::sync::Arc;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

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
    /// The virtio device ID (2 for block).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features the device offers (including VIRTIO_F_VERSION_1).
    fn avail_features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device's worker on the given queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the worker and returns the device to its initial state, reusable.
    fn reset(&mut self);
    /// The device's counters as JSON (Null when it has none).
    fn metrics(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

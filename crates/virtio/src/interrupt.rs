//! How a device tells the driver that something happened.

use vmm_sys_util::eventfd::EventFd;

/// The reason for an interrupt: the bits of the InterruptStatus register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// A used buffer notification (bit 0).
    Vring,
    /// A configuration change (bit 1).
    Config,
}

/// Raises the device's interrupt. The transport implements it: it sets the bit in
/// InterruptStatus, then writes the irqfd.
pub trait InterruptSignal: Send + Sync {
    /// Sets the bit of `kind` in InterruptStatus and signals the guest.
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()>;
    /// Marks the device as needing a reset (DEVICE_NEEDS_RESET in the status) and
    /// signals a configuration change: the device's answer to a guest fault it cannot
    /// report in a request's status.
    fn set_needs_reset(&self);
    /// The eventfd behind the interrupt (the VMM binds it as a KVM irqfd), for a
    /// device whose data path runs outside the VMM: a vhost-user frontend hands it to
    /// its backend with SET_VRING_CALL, so the backend interrupts the guest without
    /// the VMM (and without InterruptStatus being updated: see
    /// [`crate::VirtioDevice::interrupt_status_always_used`]). `None` (the default)
    /// when the interrupt has no such eventfd.
    fn call_eventfd(&self) -> Option<&EventFd> {
        None
    }
}

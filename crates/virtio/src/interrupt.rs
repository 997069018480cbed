//! How a device tells the driver that something happened.

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
}

//! The virtio device-status state machine, driven by a table of legal transitions.
//!
//! The driver moves the device through ACKNOWLEDGE → DRIVER → FEATURES_OK →
//! DRIVER_OK, each write keeping the earlier bits. It may add FAILED at any time and
//! writes 0 to reset. Anything else is illegal: the transport ignores it (and logs
//! it), the status stays as it was. DEVICE_NEEDS_RESET belongs to the device and is
//! masked out of what the driver writes.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};

/// The guest OS noticed the device.
pub const ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
/// The guest has a driver for it.
pub const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
/// Feature negotiation is complete.
pub const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
/// The driver is ready: the device goes live.
pub const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
/// The device hit an error it cannot recover from without a reset (device-owned).
pub const DEVICE_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
/// The driver gave up on the device.
pub const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;

/// The legal (from, to) steps of initialization.
pub const VALID_TRANSITIONS: &[(u32, u32)] = &[
    (0, ACKNOWLEDGE),
    (ACKNOWLEDGE, ACKNOWLEDGE | DRIVER),
    (ACKNOWLEDGE | DRIVER, ACKNOWLEDGE | DRIVER | FEATURES_OK),
    (
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    ),
];

/// What a driver's status write means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusChange {
    /// 0: reset the device.
    Reset,
    /// The same status again: nothing to do.
    Unchanged,
    /// FAILED added to the current status.
    Failed(u32),
    /// A legal step; the new status.
    Advance(u32),
    /// Not allowed from the current status.
    Illegal,
}

/// Classifies the driver writing `requested` while the status is `current`
/// (DEVICE_NEEDS_RESET is ignored on both sides).
pub fn transition(current: u32, requested: u32) -> StatusChange {
    let current = current & !DEVICE_NEEDS_RESET;
    let requested = requested & !DEVICE_NEEDS_RESET;
    if requested == 0 {
        StatusChange::Reset
    } else if requested == current {
        StatusChange::Unchanged
    } else if requested == current | FAILED {
        StatusChange::Failed(requested)
    } else if current & FAILED == 0 && VALID_TRANSITIONS.contains(&(current, requested)) {
        StatusChange::Advance(requested)
    } else {
        StatusChange::Illegal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_sequence_is_legal() {
        let mut s = 0;
        for next in [
            ACKNOWLEDGE,
            ACKNOWLEDGE | DRIVER,
            ACKNOWLEDGE | DRIVER | FEATURES_OK,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        ] {
            assert_eq!(transition(s, next), StatusChange::Advance(next));
            s = next;
        }
    }

    #[test]
    fn skipping_or_dropping_bits_is_illegal() {
        assert_eq!(transition(0, DRIVER), StatusChange::Illegal);
        assert_eq!(transition(0, ACKNOWLEDGE | DRIVER), StatusChange::Illegal);
        assert_eq!(
            transition(ACKNOWLEDGE, ACKNOWLEDGE | DRIVER | FEATURES_OK),
            StatusChange::Illegal
        );
        assert_eq!(
            transition(ACKNOWLEDGE | DRIVER, ACKNOWLEDGE | DRIVER | DRIVER_OK),
            StatusChange::Illegal
        );
        assert_eq!(
            transition(ACKNOWLEDGE | DRIVER, ACKNOWLEDGE),
            StatusChange::Illegal
        );
    }

    #[test]
    fn failed_any_time_reset_any_time() {
        assert_eq!(transition(0, FAILED), StatusChange::Failed(FAILED));
        let s = ACKNOWLEDGE | DRIVER;
        assert_eq!(transition(s, s | FAILED), StatusChange::Failed(s | FAILED));
        assert_eq!(
            transition(s | FAILED, s | FAILED | FEATURES_OK),
            StatusChange::Illegal
        );
        assert_eq!(transition(s | FAILED, 0), StatusChange::Reset);
        assert_eq!(transition(s, s), StatusChange::Unchanged);
    }

    #[test]
    fn needs_reset_bit_is_device_owned() {
        let s = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
        assert_eq!(
            transition(s | DEVICE_NEEDS_RESET, s | DEVICE_NEEDS_RESET),
            StatusChange::Unchanged
        );
        assert_eq!(
            transition(s | DEVICE_NEEDS_RESET, s | DEVICE_NEEDS_RESET | FAILED),
            StatusChange::Failed(s | FAILED)
        );
    }
}

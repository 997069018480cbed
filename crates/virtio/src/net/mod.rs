//! virtio-net on a Linux tap, driven only by eventfds and the tap's descriptor.
//!
//! The device offers VERSION_1, MAC, STATUS (link up), the checksum and segmentation
//! offloads (CSUM, GUEST_CSUM, GUEST/HOST_TSO4/6, GUEST/HOST_UFO), MRG_RXBUF, EVENT_IDX,
//! INDIRECT_DESC, MTU when one is given, and with several queue pairs MQ and the control
//! queue (CTRL_VQ, with CTRL_GUEST_OFFLOADS and CTRL_RX for the commands Linux sends).
//! Frames move between the guest's buffers and the tap with `readv`/`writev` on iovecs
//! into guest memory, the 12-byte virtio-net header included: no copy. The tap's
//! offloads follow what the driver accepted (TUNSETOFFLOAD at activation, and again on
//! a control-queue GUEST_OFFLOADS_SET).
//!
//! Files: `config` (features, configuration space, offload mapping), `tap` (opening and
//! checking taps), `chain` (chains as iovecs), `rx`, `tx`, `ctrl` (the three kinds of
//! queue), `worker` (one thread per queue pair, the one place it waits), `device` (the
//! [`VirtioDevice`](crate::VirtioDevice)), `metrics`.
//!
//! # Guest-fault policy
//!
//! As for the block device, nothing in a chain can bring the VMM down, and each kind of
//! fault is logged once per device at `warn` and counted (`malformed_chains`).
//!
//! * **A chain that cannot carry a frame** (a transmit chain with a device-writable
//!   buffer or shorter than the virtio-net header, a receive chain with a device-readable
//!   buffer, a buffer outside guest memory, a chain cut short by a loop or a bad index):
//!   returned to the driver with length 0 (the frame is not sent; the receive buffer is
//!   not filled) and the queue goes on.
//! * **A control command without a device-writable byte to answer in**, and **broken
//!   rings** (an available index too far ahead, rings outside memory): the device sets
//!   DEVICE_NEEDS_RESET and stops serving that queue until the driver resets it.
//!
//! A frame from the tap larger than the buffers the driver posted is dropped and counted
//! (`rx_dropped_too_big`); the buffers stay posted.

pub mod chain;
pub mod config;
pub mod ctrl;
pub mod device;
pub mod metrics;
pub mod rx;
pub mod tap;
pub mod tx;
pub(crate) mod worker;

pub use device::Net;
pub use tap::{Tap, TapError, TapQueue};

/// The virtio device ID of a network device.
pub const VIRTIO_ID_NET: u32 = 1;

/// How a network device is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The MAC address the guest is given.
    pub mac: [u8; 6],
    /// Queue pairs (MQ and the control queue when more than 1).
    pub queue_pairs: u16,
    /// The MTU offered (VIRTIO_NET_F_MTU); `None`: not offered (Linux takes 1500).
    pub mtu: Option<u16>,
    /// After serving a wake-up, the workers poll for this many microseconds before they
    /// block (0: block at once).
    pub poll_us: u32,
}

/// Errors of setting a network device up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap cannot be opened or is not usable.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// A bad setting.
    #[error("bad network setting: {0}")]
    Config(String),
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A locally administered unicast MAC for device `index` of process `pid`: 52:54:00
/// (the range QEMU uses) then three bytes from both.
pub fn default_mac(index: u32, pid: u32) -> [u8; 6] {
    let v = (pid << 8) ^ index;
    [0x52, 0x54, 0x00, (v >> 16) as u8, (v >> 8) as u8, v as u8]
}

#[cfg(test)]
mod tests;

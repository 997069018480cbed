//! The virtio-net feature bits, configuration space (`struct virtio_net_config`), queue
//! numbering, and how acked offloads map onto the tap.

use super::{NetConfig, NetError, VIRTIO_ID_NET};
use crate::device::DeviceOffer;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Size of every queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most queue pairs a device may have.
pub const MAX_QUEUE_PAIRS: u16 = 8;
/// The virtio-net header in front of every frame, with VIRTIO_F_VERSION_1
/// (`struct virtio_net_hdr_v1`); the tap is set to the same size.
pub const HDR_LEN: usize = 12;
/// Offset of `num_buffers` (le16) in the header.
pub const HDR_NUM_BUFFERS: usize = 10;
/// The largest frame a tap hands over with GSO offloads on: a 64 KiB GSO packet plus
/// the Ethernet header, and the virtio-net header in front.
pub const MAX_GSO_FRAME: usize = HDR_LEN + 65550;
/// Ethernet header plus a VLAN tag.
const ETH_OVERHEAD: usize = 14 + 4;
/// The MTU Linux assumes without VIRTIO_NET_F_MTU.
pub const DEFAULT_MTU: u16 = 1500;
/// The smallest and largest MTU offered (a tap takes up to 65521).
pub const MTU_RANGE: std::ops::RangeInclusive<u16> = 68..=65521;

// Field offsets in `struct virtio_net_config`.
const OFF_MAC: usize = 0;
const OFF_STATUS: usize = 6;
const OFF_MAX_PAIRS: usize = 8;
const OFF_MTU: usize = 10;
/// Size of the configuration space evmm shows (up to and including `mtu`).
pub const CONFIG_SIZE: usize = 12;

/// Offloads the driver may ask the device to put on frames it receives (GUEST_*),
/// and to honour on frames it sends (HOST_* with CSUM).
const OFFLOADS: [u32; 8] = [
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO,
];

/// The features a device with `pairs` queue pairs offers (`mtu` given: VIRTIO_NET_F_MTU).
/// Several pairs bring the control queue (MQ, CTRL_VQ, and the commands Linux sends on
/// it: CTRL_GUEST_OFFLOADS, CTRL_RX).
pub fn features(pairs: u16, mtu: Option<u16>) -> u64 {
    let mut bits = vec![
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
    ];
    bits.extend(OFFLOADS);
    if mtu.is_some() {
        bits.push(VIRTIO_NET_F_MTU);
    }
    if pairs > 1 {
        bits.extend([
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_MQ,
            VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
            VIRTIO_NET_F_CTRL_RX,
        ]);
    }
    bits.into_iter().fold(0u64, |acc, b| acc | (1u64 << b))
}

/// Whether `features` has `bit`.
pub fn has(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// The configuration space: MAC, status (link up), the queue pairs, the MTU.
pub fn config_space(mac: [u8; 6], pairs: u16, mtu: Option<u16>) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    c[OFF_MAC..OFF_MAC + 6].copy_from_slice(&mac);
    c[OFF_STATUS..OFF_STATUS + 2].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    c[OFF_MAX_PAIRS..OFF_MAX_PAIRS + 2].copy_from_slice(&pairs.to_le_bytes());
    c[OFF_MTU..OFF_MTU + 2].copy_from_slice(&mtu.unwrap_or(DEFAULT_MTU).to_le_bytes());
    c
}

/// The tap offload flags (TUNSETOFFLOAD) for the GUEST_* features in `features`: which
/// partly checksummed or segmentation-offloaded frames the tap may hand the device.
pub fn tap_offloads(features: u64) -> u32 {
    if !has(features, VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    for (bit, flag) in [
        (VIRTIO_NET_F_GUEST_TSO4, libc::TUN_F_TSO4),
        (VIRTIO_NET_F_GUEST_TSO6, libc::TUN_F_TSO6),
        (VIRTIO_NET_F_GUEST_UFO, libc::TUN_F_UFO),
    ] {
        if has(features, bit) {
            flags |= flag;
        }
    }
    if has(features, VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        flags |= libc::TUN_F_TSO_ECN;
    }
    flags
}

/// The GUEST_* offload feature bits a CTRL_GUEST_OFFLOADS_SET may name.
pub fn guest_offload_bits() -> u64 {
    [
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_GUEST_UFO,
    ]
    .into_iter()
    .fold(0u64, |acc, b| acc | (1u64 << b))
}

/// The largest frame (with its virtio-net header) the tap may hand over with the
/// acked `features` and `mtu`: a GSO packet when the driver takes them, else one MTU.
pub fn max_rx_frame(features: u64, mtu: u16) -> usize {
    if tap_offloads(features) & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO) != 0 {
        MAX_GSO_FRAME
    } else {
        HDR_LEN + ETH_OVERHEAD + usize::from(mtu)
    }
}

/// The queues of a device with `pairs` queue pairs: receive queue of pair `p` is `2p`,
/// its transmit queue `2p + 1`, and the control queue (several pairs only) last.
pub fn queue_count(pairs: u16) -> usize {
    2 * usize::from(pairs) + usize::from(pairs > 1)
}

/// What a network device with `config` on `taps` tap queues offers the driver, after
/// checking the settings (queue pairs, one tap queue each, the MTU).
pub fn offer(config: &NetConfig, taps: usize) -> Result<DeviceOffer, NetError> {
    let pairs = config.queue_pairs;
    if pairs == 0 || pairs > MAX_QUEUE_PAIRS || taps != usize::from(pairs) {
        return Err(NetError::Config(format!(
            "queues={pairs} with {taps} tap queue(s) (must be 1..={MAX_QUEUE_PAIRS})"
        )));
    }
    if let Some(mtu) = config.mtu {
        if !MTU_RANGE.contains(&mtu) {
            return Err(NetError::Config(format!(
                "mtu={mtu} (must be {}..={})",
                MTU_RANGE.start(),
                MTU_RANGE.end()
            )));
        }
    }
    Ok(DeviceOffer {
        device_type: VIRTIO_ID_NET,
        queue_sizes: vec![QUEUE_SIZE; queue_count(pairs)],
        avail_features: features(pairs, config.mtu),
        config_space: config_space(config.mac, pairs, config.mtu).to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pair_has_no_control_queue() {
        let f = features(1, None);
        assert!(!has(f, VIRTIO_NET_F_CTRL_VQ) && !has(f, VIRTIO_NET_F_MQ));
        assert!(has(f, VIRTIO_NET_F_MRG_RXBUF) && has(f, VIRTIO_F_VERSION_1));
        assert!(!has(f, VIRTIO_NET_F_MTU));
        assert_eq!(queue_count(1), 2);
        let f = features(4, Some(9000));
        assert!(
            has(f, VIRTIO_NET_F_CTRL_VQ) && has(f, VIRTIO_NET_F_MQ) && has(f, VIRTIO_NET_F_MTU)
        );
        assert_eq!(queue_count(4), 9);
    }

    #[test]
    fn config_space_layout() {
        let c = config_space([0x52, 0x54, 0, 1, 2, 3], 2, Some(9000));
        assert_eq!(&c[..6], &[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "link up");
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 2);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 9000);
    }

    #[test]
    fn offloads_follow_the_guest_features_and_the_kernels_rules() {
        let f = |bits: &[u32]| bits.iter().fold(0u64, |a, b| a | (1 << b));
        assert_eq!(
            tap_offloads(f(&[VIRTIO_NET_F_GUEST_TSO4])),
            0,
            "TSO needs CSUM"
        );
        assert_eq!(
            tap_offloads(f(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4])),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4
        );
        assert_eq!(
            tap_offloads(f(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN])),
            libc::TUN_F_CSUM,
            "ECN needs TSO"
        );
        assert_eq!(max_rx_frame(0, 1500), 12 + 18 + 1500);
        assert_eq!(
            max_rx_frame(f(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_UFO]), 1500),
            MAX_GSO_FRAME
        );
    }
}

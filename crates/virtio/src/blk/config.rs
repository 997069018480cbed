//! The virtio-blk feature bits and configuration space (`struct virtio_blk_config`).

use super::request::RequestLimits;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Size of every request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments per request: the queue size minus header and status.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data segment.
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest IN/OUT request: `SEG_MAX` segments of `SIZE_MAX`.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// The logical block size offered to the driver.
pub const BLK_SIZE: u32 = 512;
/// Largest DISCARD range, in sectors (256 MiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 19;
/// Ranges per DISCARD request.
pub const MAX_DISCARD_SEG: u32 = 1;
/// Largest WRITE_ZEROES range, in sectors (256 MiB).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 19;
/// Ranges per WRITE_ZEROES request.
pub const MAX_WRITE_ZEROES_SEG: u32 = 1;
/// Most request queues a disk may have, in evmm, in the vhost-user-blk daemon, and as
/// evmm's vhost-user-blk frontend takes them from a backend.
pub const MAX_QUEUES: u16 = 16;

// Field offsets in `struct virtio_blk_config`.
const OFF_CAPACITY: usize = 0;
const OFF_SIZE_MAX: usize = 8;
const OFF_SEG_MAX: usize = 12;
const OFF_BLK_SIZE: usize = 20;
/// Offset of `writeback` (u8).
pub const OFF_WRITEBACK: usize = 32;
/// Offset of `num_queues` (le16).
pub const OFF_NUM_QUEUES: usize = 34;
const OFF_MAX_DISCARD_SECTORS: usize = 36;
const OFF_MAX_DISCARD_SEG: usize = 40;
const OFF_DISCARD_SECTOR_ALIGNMENT: usize = 44;
const OFF_MAX_WRITE_ZEROES_SECTORS: usize = 48;
const OFF_MAX_WRITE_ZEROES_SEG: usize = 52;
const OFF_WRITE_ZEROES_MAY_UNMAP: usize = 56;
/// Size of the configuration space.
pub const CONFIG_SIZE: usize = 60;

/// The features a disk offers.
pub fn features(readonly: bool, queues: u16) -> u64 {
    let mut bits = vec![
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
    ];
    if readonly {
        bits.push(VIRTIO_BLK_F_RO);
    } else {
        bits.extend([VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]);
    }
    if queues > 1 {
        bits.push(VIRTIO_BLK_F_MQ);
    }
    bits.into_iter().fold(0u64, |acc, b| acc | (1u64 << b))
}

/// The limits requests are checked against on a disk of `capacity_sectors`.
pub fn limits(capacity_sectors: u64) -> RequestLimits {
    RequestLimits {
        capacity_sectors,
        seg_max: SEG_MAX,
        size_max: SIZE_MAX,
        max_request_bytes: MAX_REQUEST_BYTES,
        max_discard_sectors: MAX_DISCARD_SECTORS,
        max_discard_seg: MAX_DISCARD_SEG,
        max_write_zeroes_sectors: MAX_WRITE_ZEROES_SECTORS,
        max_write_zeroes_seg: MAX_WRITE_ZEROES_SEG,
    }
}

/// The little-endian bytes of the configuration space; `blk_size` is the disk's
/// logical block size ([`crate::blk::disk::DiskFile::block_size`]).
pub fn config_space(capacity_sectors: u64, queues: u16, blk_size: u32) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    let mut put = |off: usize, bytes: &[u8]| {
        if let Some(dst) = c.get_mut(off..off + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    };
    put(OFF_CAPACITY, &capacity_sectors.to_le_bytes());
    put(OFF_SIZE_MAX, &SIZE_MAX.to_le_bytes());
    put(OFF_SEG_MAX, &SEG_MAX.to_le_bytes());
    put(OFF_BLK_SIZE, &blk_size.max(BLK_SIZE).to_le_bytes());
    put(OFF_NUM_QUEUES, &queues.to_le_bytes());
    put(OFF_MAX_DISCARD_SECTORS, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(OFF_MAX_DISCARD_SEG, &MAX_DISCARD_SEG.to_le_bytes());
    put(
        OFF_DISCARD_SECTOR_ALIGNMENT,
        &(blk_size.max(BLK_SIZE) / BLK_SIZE).to_le_bytes(),
    );
    put(
        OFF_MAX_WRITE_ZEROES_SECTORS,
        &MAX_WRITE_ZEROES_SECTORS.to_le_bytes(),
    );
    put(
        OFF_MAX_WRITE_ZEROES_SEG,
        &MAX_WRITE_ZEROES_SEG.to_le_bytes(),
    );
    put(OFF_WRITE_ZEROES_MAY_UNMAP, &[1]);
    c
}

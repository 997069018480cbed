//! vhost-user-blk: the per-device parts of a disk served by a vhost-user backend.
//!
//! The guest reads the backend's own configuration space (GET_CONFIG, which needs the
//! CONFIG protocol feature; MQ too), with `num_queues` set to the queue count in use,
//! and is offered the backend's features without SECURE_ERASE and ZONED, whose
//! configuration fields lie beyond the 60 bytes evmm reads. The one configuration
//! field the driver writes, `writeback` (with VIRTIO_BLK_F_CONFIG_WCE), goes to the
//! backend with SET_CONFIG. Once the backend is lost, the takeover answers every
//! request VIRTIO_BLK_S_IOERR in its status byte.

use std::path::PathBuf;

use vhost::vhost_user::VhostUserProtocolFeatures;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_SECURE_ERASE, VIRTIO_BLK_F_ZONED,
    VIRTIO_BLK_S_IOERR,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::frontend::FrontendError;
use super::user::connection::{BackendInfo, HandshakeNeeds};
use super::user::{UserDeviceKind, VhostUserDevice};
use crate::blk::config::{CONFIG_SIZE, MAX_QUEUES, OFF_NUM_QUEUES, OFF_WRITEBACK, QUEUE_SIZE};
use crate::blk::request::status_byte;
use crate::blk::VIRTIO_ID_BLOCK;

/// Feature bits never offered: their configuration fields are beyond what evmm reads.
const UNSUPPORTED_FEATURES: u64 = (1 << VIRTIO_BLK_F_SECURE_ERASE) | (1 << VIRTIO_BLK_F_ZONED);
/// VIRTIO_BLK_F_MQ.
const BLK_F_MQ: u64 = 1 << VIRTIO_BLK_F_MQ;

/// One vhost-user-blk device: where its backend listens and how many queues to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserBlkConfig {
    /// The backend's Unix socket.
    pub socket: PathBuf,
    /// Request queues; `None`: the backend's `num_queues` (its config space, when it
    /// offers VIRTIO_BLK_F_MQ) or 1, at most [`MAX_QUEUES`].
    pub queues: Option<u16>,
}

/// The block parts of a vhost-user device.
#[derive(Debug, Clone, Copy, Default)]
pub struct BlkKind;

/// A disk served by a vhost-user backend.
pub type VhostUserBlk = VhostUserDevice<BlkKind>;

impl VhostUserBlkConfig {
    /// Connects to the backend and does the handshake; see
    /// [`VhostUserDevice::connect`].
    pub fn connect(&self, name: &str) -> Result<VhostUserBlk, super::user::VhostUserError> {
        VhostUserDevice::connect(BlkKind, &self.socket, self.queues, name)
    }
}

impl VhostUserBlk {
    /// The disk's capacity in 512-byte sectors, as the backend reported it.
    pub fn capacity_sectors(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.config_space()[..8]);
        u64::from_le_bytes(b)
    }
}

impl UserDeviceKind for BlkKind {
    fn name(&self) -> &'static str {
        "vhost-user-blk"
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn handshake_needs(&self) -> HandshakeNeeds {
        HandshakeNeeds {
            protocol_features: VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG,
            config_size: CONFIG_SIZE,
        }
    }

    fn guest_features(&self, backend: u64) -> u64 {
        backend & !UNSUPPORTED_FEATURES
    }

    fn queue_count(
        &self,
        info: &BackendInfo,
        requested: Option<u16>,
    ) -> Result<u16, FrontendError> {
        let mq = info.features & BLK_F_MQ != 0;
        let max = info.max_queues;
        match requested {
            Some(n) if u64::from(n) > max => {
                Err(FrontendError::TooManyQueues { requested: n, max })
            }
            Some(n) if n > 1 && !mq => Err(FrontendError::NoMultiqueue(n)),
            Some(n) => Ok(n),
            None => {
                let from_config = if mq { num_queues(&info.config) } else { 1 };
                let cap = u16::try_from(max).unwrap_or(u16::MAX).min(MAX_QUEUES);
                Ok(from_config.clamp(1, cap.max(1)))
            }
        }
    }

    fn config_space(&self, info: &BackendInfo, queues: u16) -> Vec<u8> {
        let mut config = info.config.clone();
        config.resize(CONFIG_SIZE, 0);
        if info.features & BLK_F_MQ != 0 {
            config[OFF_NUM_QUEUES..OFF_NUM_QUEUES + 2].copy_from_slice(&queues.to_le_bytes());
        }
        config
    }

    fn forwards_config_write(&self, offset: u64, len: usize, features: u64) -> bool {
        features & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0 && offset == OFF_WRITEBACK as u64 && len == 1
    }

    fn fail_request(&self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> Result<u32, String> {
        let status = status_byte(descs, mem).map_err(|f| f.to_string())?;
        mem.write_obj(VIRTIO_BLK_S_IOERR as u8, status)
            .map_err(|e| format!("status byte: {e}"))?;
        Ok(1)
    }
}

/// `num_queues` of a configuration space.
fn num_queues(config: &[u8]) -> u16 {
    config
        .get(OFF_NUM_QUEUES..OFF_NUM_QUEUES + 2)
        .map_or(1, |b| u16::from_le_bytes([b[0], b[1]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(features: u64, num_queues: u16, max_queues: u64) -> BackendInfo {
        let mut config = vec![0u8; CONFIG_SIZE];
        config[OFF_NUM_QUEUES..OFF_NUM_QUEUES + 2].copy_from_slice(&num_queues.to_le_bytes());
        BackendInfo {
            features,
            protocol_features: VhostUserProtocolFeatures::MQ,
            max_queues,
            config,
        }
    }

    #[test]
    fn queue_count_defaults_and_limits() {
        let k = BlkKind;
        assert_eq!(k.queue_count(&info(BLK_F_MQ, 4, 4), None).unwrap(), 4);
        assert_eq!(k.queue_count(&info(BLK_F_MQ, 4, 2), None).unwrap(), 2);
        assert_eq!(k.queue_count(&info(BLK_F_MQ, 0, 2), None).unwrap(), 1);
        // A backend's num_queues beyond evmm's limit is capped.
        assert_eq!(
            k.queue_count(&info(BLK_F_MQ, 32768, 32768), None).unwrap(),
            MAX_QUEUES
        );
        // Without VIRTIO_BLK_F_MQ num_queues means nothing.
        assert_eq!(k.queue_count(&info(0, 4, 4), None).unwrap(), 1);
        assert_eq!(k.queue_count(&info(BLK_F_MQ, 4, 4), Some(3)).unwrap(), 3);
        assert!(matches!(
            k.queue_count(&info(BLK_F_MQ, 4, 4), Some(5)),
            Err(FrontendError::TooManyQueues {
                requested: 5,
                max: 4
            })
        ));
        assert!(matches!(
            k.queue_count(&info(0, 1, 4), Some(2)),
            Err(FrontendError::NoMultiqueue(2))
        ));
        assert_eq!(k.queue_count(&info(0, 1, 1), Some(1)).unwrap(), 1);
        let msg = k
            .queue_count(&info(BLK_F_MQ, 1, 1), Some(2))
            .unwrap_err()
            .to_string();
        assert_eq!(msg, "queues=2 but the backend supports at most 1");
    }

    #[test]
    fn config_space_shows_the_queues_in_use() {
        let c = BlkKind.config_space(&info(BLK_F_MQ, 8, 8), 2);
        assert_eq!(num_queues(&c), 2);
        assert_eq!(c.len(), CONFIG_SIZE);
    }

    #[test]
    fn only_writeback_is_forwarded() {
        let wce = 1 << VIRTIO_BLK_F_CONFIG_WCE;
        assert!(BlkKind.forwards_config_write(OFF_WRITEBACK as u64, 1, wce));
        assert!(!BlkKind.forwards_config_write(OFF_WRITEBACK as u64, 1, 0));
        assert!(!BlkKind.forwards_config_write(0, 8, wce));
        assert!(!BlkKind.forwards_config_write(OFF_WRITEBACK as u64, 2, wce));
    }
}

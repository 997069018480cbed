//! The disk and everything about it that outlives a frontend connection: the open
//! file, the features and configuration space it offers, the request limits, the
//! counters and the fault log.

use evmm_virtio::blk::config::{self, CONFIG_SIZE, MAX_QUEUES};
use evmm_virtio::blk::disk::DiskFile;
use evmm_virtio::blk::metrics::{BlockMetricsSnapshot, BlockQueueMetrics};
use evmm_virtio::blk::request::RequestLimits;
use evmm_virtio::blk::{BlockConfig, BlockError, EngineKind};
use evmm_virtio::fault::FaultLog;
use evmm_virtio::poll::{PollMetrics, PollMode};
use std::sync::Arc;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};

/// Largest configuration space read served: the frontend asks for its own
/// `sizeof(struct virtio_blk_config)`, which grows with new kernel headers; bytes past
/// this device's fields read as zero. Reads reaching beyond this are refused.
pub const MAX_CONFIG_READ: usize = 256;

/// The vhost-user protocol features offered: several queues, the configuration space
/// (QEMU's vhost-user-blk refuses backends without it) and acknowledged requests.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
}

/// The virtio features offered: exactly those of evmm's in-VMM disk
/// ([`config::features`]) plus VHOST_USER_F_PROTOCOL_FEATURES.
pub fn virtio_features(readonly: bool, queues: u16) -> u64 {
    config::features(readonly, queues) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// `size` bytes of `space` from `offset`, zero past its end; empty (which the
/// frontend sees as an error) when the range reaches beyond [`MAX_CONFIG_READ`].
pub fn read_config(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let range = usize::try_from(offset)
        .ok()
        .zip(usize::try_from(size).ok())
        .and_then(|(off, len)| Some(off..off.checked_add(len)?));
    match range {
        Some(r) if r.end <= MAX_CONFIG_READ => {
            r.map(|i| space.get(i).copied().unwrap_or(0)).collect()
        }
        _ => Vec::new(),
    }
}

/// An open disk served to one frontend at a time.
pub struct BlockDevice {
    disk: Arc<DiskFile>,
    queues: u16,
    features: u64,
    config_space: [u8; CONFIG_SIZE],
    limits: RequestLimits,
    metrics: Arc<[BlockQueueMetrics]>,
    faults: Arc<FaultLog>,
    engine: EngineKind,
    poll: PollMode,
    poll_metrics: Arc<PollMetrics>,
}

impl BlockDevice {
    /// Opens the disk as evmm's in-VMM device does.
    pub fn open(config: &BlockConfig) -> Result<Self, BlockError> {
        if config.queues == 0 || config.queues > MAX_QUEUES {
            return Err(BlockError::Config(format!(
                "queues={} (must be 1..={MAX_QUEUES})",
                config.queues
            )));
        }
        let disk = DiskFile::open(
            &config.path,
            config.readonly,
            config.direct,
            config.id.as_deref().unwrap_or(""),
        )?;
        let capacity = disk.capacity_sectors();
        let queues = config.queues;
        let engine = config.engine.resolve()?;
        log::info!("{engine} engine, poll={}", config.poll);
        let config_space = config::config_space(capacity, queues, disk.block_size());
        Ok(Self {
            engine,
            poll: config.poll,
            poll_metrics: Arc::default(),
            disk: Arc::new(disk),
            queues,
            features: virtio_features(config.readonly, queues),
            config_space,
            limits: config::limits(capacity),
            metrics: (0..queues).map(|_| BlockQueueMetrics::default()).collect(),
            faults: Arc::new(FaultLog::new("virtio-blk")),
        })
    }

    /// The open file.
    pub fn disk(&self) -> &Arc<DiskFile> {
        &self.disk
    }

    /// What executes the requests.
    pub fn engine(&self) -> EngineKind {
        self.engine
    }

    /// How the queue threads wait for requests.
    pub fn poll(&self) -> PollMode {
        self.poll
    }

    /// What polling did (kept across connections).
    pub fn poll_metrics(&self) -> &Arc<PollMetrics> {
        &self.poll_metrics
    }

    /// Number of request queues.
    pub fn queues(&self) -> u16 {
        self.queues
    }

    /// The virtio features offered.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The configuration space.
    pub fn config_space(&self) -> &[u8; CONFIG_SIZE] {
        &self.config_space
    }

    /// The limits requests are checked against.
    pub fn limits(&self) -> &RequestLimits {
        &self.limits
    }

    /// The per-queue counters (kept across connections).
    pub fn metrics(&self) -> &Arc<[BlockQueueMetrics]> {
        &self.metrics
    }

    /// The once-per-kind guest fault log (kept across connections).
    pub fn faults(&self) -> &Arc<FaultLog> {
        &self.faults
    }

    /// The counters, typed.
    pub fn metrics_snapshot(&self) -> BlockMetricsSnapshot {
        BlockMetricsSnapshot::of(&self.metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use virtio_bindings::virtio_blk::*;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

    fn bit(b: u32) -> u64 {
        1 << b
    }

    fn disk_file(len: usize) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![0u8; len]).unwrap();
        f
    }

    fn open(f: &tempfile::NamedTempFile, readonly: bool, queues: u16) -> BlockDevice {
        BlockDevice::open(&BlockConfig {
            path: f.path().to_path_buf(),
            readonly,
            id: Some("vu-disk".into()),
            queues,
            direct: false,
            poll: Default::default(),
            engine: Default::default(),
        })
        .unwrap()
    }

    #[test]
    fn features_are_what_qemu_vhost_user_blk_needs() {
        let f = virtio_features(false, 2);
        for b in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_BLK_F_MQ,
        ] {
            assert_ne!(f & bit(b), 0, "feature bit {b} missing");
        }
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_RO), 0);
        // The same set as evmm's own device, plus the vhost-user bit.
        assert_eq!(
            f & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            config::features(false, 2)
        );
    }

    #[test]
    fn a_readonly_single_queue_disk_offers_ro_and_no_mq() {
        let f = virtio_features(true, 1);
        assert_ne!(f & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_MQ), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }

    #[test]
    fn protocol_features_include_config_and_mq() {
        let p = protocol_features();
        assert!(p.contains(VhostUserProtocolFeatures::CONFIG));
        assert!(p.contains(VhostUserProtocolFeatures::MQ));
        assert!(p.contains(VhostUserProtocolFeatures::REPLY_ACK));
        // vhost-user-backend cannot serve these.
        assert!(!p.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    }

    #[test]
    fn config_space_holds_capacity_queues_and_limits() {
        let f = disk_file(3 << 20);
        let dev = open(&f, false, 3);
        let c = read_config(dev.config_space(), 0, 60);
        let u32_at = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 6144);
        assert_eq!(u32_at(8), config::SIZE_MAX);
        assert_eq!(u32_at(12), config::SEG_MAX);
        assert_eq!(u32_at(20), 512);
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 3);
        assert_eq!(dev.queues(), 3);
        assert_eq!(dev.limits().capacity_sectors, 6144);
        assert_eq!(dev.metrics().len(), 3);
    }

    #[test]
    fn config_reads_are_bounded_and_zero_filled() {
        let space = [7u8; CONFIG_SIZE];
        assert_eq!(read_config(&space, 34, 2), vec![7, 7]);
        // QEMU's struct is larger than this device's fields: the tail reads as zero.
        let r = read_config(&space, 0, 96);
        assert_eq!(r.len(), 96);
        assert!(r[..CONFIG_SIZE].iter().all(|&b| b == 7));
        assert!(r[CONFIG_SIZE..].iter().all(|&b| b == 0));
        assert_eq!(read_config(&space, 200, 56).len(), 56);
        assert!(read_config(&space, 200, 57).is_empty());
        assert!(read_config(&space, u32::MAX, 2).is_empty());
        assert!(read_config(&space, 0, u32::MAX).is_empty());
        assert!(read_config(&space, 0, 0).is_empty());
    }

    #[test]
    fn bad_settings_are_refused() {
        let f = disk_file(1 << 20);
        for queues in [0, MAX_QUEUES + 1] {
            let r = BlockDevice::open(&BlockConfig {
                path: f.path().to_path_buf(),
                readonly: false,
                id: None,
                queues,
                direct: false,
                poll: Default::default(),
                engine: Default::default(),
            });
            assert!(matches!(r, Err(BlockError::Config(_))), "queues={queues}");
        }
        let r = BlockDevice::open(&BlockConfig {
            path: "/nonexistent/disk.img".into(),
            readonly: false,
            id: None,
            queues: 1,
            direct: false,
            poll: Default::default(),
            engine: Default::default(),
        });
        let e = r.err().unwrap().to_string();
        assert!(e.contains("/nonexistent/disk.img"), "{e}");
        let r = BlockDevice::open(&BlockConfig {
            path: f.path().to_path_buf(),
            readonly: false,
            id: Some("x".repeat(21)),
            queues: 1,
            direct: false,
            poll: Default::default(),
            engine: Default::default(),
        });
        assert!(matches!(r, Err(BlockError::Config(_))));
    }
}

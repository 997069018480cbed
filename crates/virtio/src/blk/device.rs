//! The virtio-blk device on a raw host file: its feature bits and configuration space,
//! and the worker thread it starts on activation.

use std::sync::Arc;

use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;

use super::backend::{BlockBackend, DiskFile};
use super::metrics::{BlockMetricsSnapshot, BlockQueueMetrics};
use super::worker::{BlockWorker, WorkerQueue};
use super::{config, BlockConfig, BlockError, VIRTIO_ID_BLOCK};
use crate::device::{ActivateContext, ActivateError, DeviceOffer, VirtioDevice};
use crate::fault::FaultLog;
use crate::worker::WorkerHandle;

/// A virtio-blk device.
pub struct Block {
    config: BlockConfig,
    disk: Arc<DiskFile>,
    offer: DeviceOffer,
    metrics: Arc<[BlockQueueMetrics]>,
    faults: Arc<FaultLog>,
    /// A backend handed back by a stopped worker, reused on the next activation.
    spare_backend: Option<BlockBackend>,
    worker: Option<WorkerHandle<BlockBackend>>,
}

impl Block {
    /// Opens the disk.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        if config.queues == 0 || config.queues > config::MAX_QUEUES {
            return Err(BlockError::Config(format!(
                "queues={} (must be 1..={})",
                config.queues,
                config::MAX_QUEUES
            )));
        }
        let id = config.id.as_deref().unwrap_or("");
        let disk = Arc::new(DiskFile::open(
            &config.path,
            config.readonly,
            config.direct,
            id,
        )?);
        let queues = config.queues;
        Ok(Self {
            offer: DeviceOffer {
                device_type: VIRTIO_ID_BLOCK,
                queue_sizes: vec![config::QUEUE_SIZE; usize::from(queues)],
                avail_features: config::features(config.readonly, queues),
                config_space: config::config_space(disk.capacity_sectors(), queues).to_vec(),
            },
            metrics: (0..queues).map(|_| BlockQueueMetrics::default()).collect(),
            faults: Arc::new(FaultLog::new("virtio-blk")),
            spare_backend: None,
            worker: None,
            disk,
            config,
        })
    }

    /// The settings the disk was opened with.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_sectors()
    }

    /// The counters, typed.
    pub fn metrics_snapshot(&self) -> BlockMetricsSnapshot {
        BlockMetricsSnapshot {
            queues: self
                .metrics
                .iter()
                .map(BlockQueueMetrics::snapshot)
                .collect(),
        }
    }

    /// Whether a worker thread is running.
    pub fn is_active(&self) -> bool {
        self.worker.as_ref().is_some_and(|w| w.is_running())
    }
}

impl VirtioDevice for Block {
    fn offer(&self) -> &DeviceOffer {
        &self.offer
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::BadSetup("device is already active".into()));
        }
        let queues: Vec<WorkerQueue> = ctx
            .take_ready_queues(self.offer.queue_sizes.len())?
            .into_iter()
            .map(|ready| WorkerQueue {
                ready,
                broken: false,
            })
            .collect();
        let mut backend = self
            .spare_backend
            .take()
            .unwrap_or_else(|| BlockBackend::new(self.disk.clone()));
        backend.set_writeback(ctx.has_feature(VIRTIO_BLK_F_FLUSH));
        let worker = BlockWorker {
            mem: ctx.mem,
            queues,
            backend,
            limits: config::limits(self.disk.capacity_sectors()),
            interrupt: ctx.interrupt,
            metrics: self.metrics.clone(),
            faults: self.faults.clone(),
            poll: std::time::Duration::from_micros(u64::from(self.config.poll_us)),
        };
        let epoll = worker.epoll().map_err(ActivateError::Worker)?;
        let handle = WorkerHandle::spawn("evmm-blk", move |kill| worker.run(epoll, kill))
            .map_err(ActivateError::Worker)?;
        self.worker = Some(handle);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            self.spare_backend = worker.stop();
        }
    }

    fn metrics(&self) -> serde_json::Value {
        serde_json::to_value(self.metrics_snapshot()).unwrap_or(serde_json::Value::Null)
    }
}

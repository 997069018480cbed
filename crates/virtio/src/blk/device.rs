//! The virtio-blk device on a raw host file: its feature bits and configuration space,
//! and the worker thread it starts on activation.

use std::sync::Arc;

use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use virtio_queue::QueueT;

use super::disk::DiskFile;
use super::engine::{self, EngineKind};
use super::metrics::{BlockMetricsSnapshot, BlockQueueMetrics};
use super::worker::{BlockWorker, WorkerQueue};
use super::{config, BlockConfig, BlockError, VIRTIO_ID_BLOCK};
use crate::device::{ActivateContext, ActivateError, DeviceOffer, VirtioDevice};
use crate::fault::FaultLog;
use crate::poll::{PollMetrics, PollWindow};
use crate::worker::{WorkerHandle, WorkerKind};

/// A virtio-blk device.
pub struct Block {
    config: BlockConfig,
    disk: Arc<DiskFile>,
    offer: DeviceOffer,
    metrics: Arc<[BlockQueueMetrics]>,
    faults: Arc<FaultLog>,
    poll_metrics: Arc<PollMetrics>,
    engine: EngineKind,
    worker: Option<WorkerHandle<()>>,
}

impl Block {
    /// Opens the disk and picks its engine ([`engine::EngineChoice::resolve`]).
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
        let engine = config.engine.resolve()?;
        log::info!(
            "disk {}: {} engine, {queues} queue(s), poll={}",
            config.path.display(),
            engine,
            config.poll
        );
        Ok(Self {
            offer: DeviceOffer {
                device_type: VIRTIO_ID_BLOCK,
                queue_sizes: vec![config::QUEUE_SIZE; usize::from(queues)],
                avail_features: config::features(config.readonly, queues),
                config_space: config::config_space(
                    disk.capacity_sectors(),
                    queues,
                    disk.block_size(),
                )
                .to_vec(),
            },
            metrics: (0..queues).map(|_| BlockQueueMetrics::default()).collect(),
            faults: Arc::new(FaultLog::new("virtio-blk")),
            engine,
            poll_metrics: Arc::default(),
            worker: None,
            disk,
            config,
        })
    }

    /// The settings the disk was opened with.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// The engine that executes the requests.
    pub fn engine(&self) -> EngineKind {
        self.engine
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
        let writeback = ctx.has_feature(VIRTIO_BLK_F_FLUSH);
        let queues: Vec<WorkerQueue> = ctx
            .take_ready_queues(self.offer.queue_sizes.len())?
            .into_iter()
            .map(|ready| {
                let mut engine = engine::open(self.engine, &self.disk, ready.queue.size());
                engine.set_writeback(writeback);
                WorkerQueue {
                    ready,
                    broken: false,
                    engine,
                    scratch: Default::default(),
                    more: false,
                }
            })
            .collect();
        let worker = BlockWorker {
            mem: Arc::new(ctx.mem),
            disk: self.disk.clone(),
            queues,
            limits: config::limits(self.disk.capacity_sectors()),
            interrupt: ctx.interrupt,
            metrics: self.metrics.clone(),
            faults: self.faults.clone(),
            poll: PollWindow::new(self.config.poll),
            poll_metrics: self.poll_metrics.clone(),
            checks: 0,
            finished: Vec::with_capacity(usize::from(config::QUEUE_SIZE)),
        };
        let epoll = worker.epoll().map_err(ActivateError::Worker)?;
        let interrupt = worker.interrupt.clone();
        let kind = WorkerKind::Block {
            io_uring: self.engine == EngineKind::IoUring,
        };
        let handle = WorkerHandle::spawn_guarded(
            kind,
            "evmm-blk",
            move || interrupt.set_needs_reset(),
            move |kill| worker.run(epoll, kill),
        )
        .map_err(ActivateError::Worker)?;
        self.worker = Some(handle);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
    }

    /// The per-queue counters, the engine and polling:
    /// `{"engine": "io_uring", "poll": "adaptive", "polling": {...}, "queues": [...]}`.
    fn metrics(&self) -> serde_json::Value {
        let mut v =
            serde_json::to_value(self.metrics_snapshot()).unwrap_or(serde_json::Value::Null);
        if let Some(map) = v.as_object_mut() {
            map.insert("engine".into(), serde_json::json!(self.engine));
            map.insert(
                "poll".into(),
                serde_json::json!(self.config.poll.to_string()),
            );
            map.insert(
                "polling".into(),
                serde_json::to_value(self.poll_metrics.snapshot()).unwrap_or_default(),
            );
        }
        v
    }
}

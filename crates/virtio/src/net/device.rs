//! The virtio-net device on a tap: feature bits and configuration space, and one worker
//! thread per queue pair started on activation.

use std::sync::Arc;

use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;

use super::config::{self, has, max_rx_frame, tap_offloads, DEFAULT_MTU};
use super::ctrl::enable_pairs;
use super::metrics::{NetMetricsSnapshot, NetQueueMetrics};
use super::rx::Receiver;
use super::tap::{Tap, TapQueue};
use super::tx::Transmitter;
use super::worker::{NetWorker, WorkerQueue};
use super::{NetConfig, NetError, VIRTIO_ID_NET};
use crate::device::{ActivateContext, ActivateError, ReadyQueue, VirtioDevice};
use crate::fault::FaultLog;
use crate::metrics::Counter;
use crate::worker::WorkerHandle;

/// A virtio-net device on tap queues of type `T` (a [`Tap`] outside tests).
pub struct Net<T: TapQueue = Tap> {
    config: NetConfig,
    tap_name: String,
    taps: Arc<[T]>,
    queue_sizes: Vec<u16>,
    avail_features: u64,
    config_space: [u8; config::CONFIG_SIZE],
    metrics: Arc<[NetQueueMetrics]>,
    faults: Arc<FaultLog>,
    activations: Counter,
    workers: Vec<WorkerHandle<()>>,
}

impl<T: TapQueue> Net<T> {
    /// A device on `taps`, one per queue pair of `config`.
    pub fn new(config: NetConfig, tap_name: &str, taps: Vec<T>) -> Result<Self, NetError> {
        let pairs = config.queue_pairs;
        if pairs == 0 || pairs > config::MAX_QUEUE_PAIRS || taps.len() != usize::from(pairs) {
            return Err(NetError::Config(format!(
                "queues={pairs} with {} tap queue(s) (must be 1..={})",
                taps.len(),
                config::MAX_QUEUE_PAIRS
            )));
        }
        if let Some(mtu) = config.mtu {
            if !config::MTU_RANGE.contains(&mtu) {
                return Err(NetError::Config(format!(
                    "mtu={mtu} (must be {}..={})",
                    config::MTU_RANGE.start(),
                    config::MTU_RANGE.end()
                )));
            }
        }
        Ok(Self {
            queue_sizes: vec![config::QUEUE_SIZE; config::queue_count(pairs)],
            avail_features: config::features(pairs, config.mtu),
            config_space: config::config_space(config.mac, pairs, config.mtu),
            metrics: (0..pairs).map(|_| NetQueueMetrics::default()).collect(),
            faults: Arc::new(FaultLog::new("virtio-net")),
            activations: Counter::default(),
            workers: Vec::new(),
            tap_name: tap_name.to_string(),
            taps: taps.into(),
            config,
        })
    }

    /// The settings the device was made with.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The counters, typed.
    pub fn metrics_snapshot(&self) -> NetMetricsSnapshot {
        NetMetricsSnapshot {
            backend: "evmm",
            tap: self.tap_name.clone(),
            activations: self.activations.get(),
            queues: self.metrics.iter().map(NetQueueMetrics::snapshot).collect(),
        }
    }

    /// Whether worker threads are running.
    pub fn is_active(&self) -> bool {
        self.workers.iter().any(WorkerHandle::is_running)
    }
}

impl<T: TapQueue> VirtioDevice for Net<T> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::device::read_config_bytes(&self.config_space, offset, data);
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        if !self.workers.is_empty() {
            return Err(ActivateError::BadSetup("device is already active".into()));
        }
        let pairs = usize::from(self.config.queue_pairs);
        let mut by_index: Vec<Option<ReadyQueue>> =
            (0..self.queue_sizes.len()).map(|_| None).collect();
        for q in ctx.take_ready_queues(self.queue_sizes.len())? {
            let i = q.index;
            by_index[i] = Some(q);
        }
        let acked = ctx.acked_features;
        let offloads = tap_offloads(acked);
        self.taps[0]
            .set_offloads(offloads)
            .map_err(|e| ActivateError::BadSetup(e.to_string()))?;
        // Until the driver sets the pairs it uses, only pair 0 carries traffic.
        enable_pairs(&self.taps, 1);
        let mut ctrl = if pairs > 1 {
            by_index[2 * pairs].take()
        } else {
            None
        };
        let max_frame = max_rx_frame(acked, self.config.mtu.unwrap_or(DEFAULT_MTU));
        let mergeable = has(acked, VIRTIO_NET_F_MRG_RXBUF);
        for pair in 0..pairs {
            let rx = by_index[2 * pair].take();
            let tx = by_index[2 * pair + 1].take();
            let ctrl = if pair == 0 { ctrl.take() } else { None };
            if rx.is_none() && tx.is_none() && ctrl.is_none() {
                continue;
            }
            let worker = NetWorker {
                pair,
                tap_name: self.tap_name.clone(),
                mem: ctx.mem.clone(),
                rx: rx.map(WorkerQueue::new),
                tx: tx.map(WorkerQueue::new),
                ctrl: ctrl.map(WorkerQueue::new),
                taps: self.taps.clone(),
                acked,
                receiver: Receiver::new(mergeable, max_frame),
                transmitter: Transmitter::default(),
                interrupt: ctx.interrupt.clone(),
                metrics: self.metrics.clone(),
                faults: self.faults.clone(),
                poll: std::time::Duration::from_micros(u64::from(self.config.poll_us)),
            };
            let (epoll, tap_out) = worker.epoll().map_err(ActivateError::Worker)?;
            let handle = WorkerHandle::spawn(&format!("evmm-net{pair}"), move |kill| {
                worker.run(epoll, tap_out, kill)
            })
            .map_err(ActivateError::Worker)?;
            self.workers.push(handle);
        }
        if self.workers.is_empty() {
            return Err(ActivateError::BadSetup("no queue is ready".into()));
        }
        self.activations.inc();
        Ok(())
    }

    fn reset(&mut self) {
        for w in self.workers.drain(..) {
            w.stop();
        }
    }

    fn metrics(&self) -> serde_json::Value {
        serde_json::to_value(self.metrics_snapshot()).unwrap_or(serde_json::Value::Null)
    }
}

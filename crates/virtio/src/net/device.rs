//! The virtio-net device on a tap: feature bits and configuration space, and one worker
//! thread per queue pair started on activation.

use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;

use super::config::{self, has, max_rx_frame, tap_offloads, DEFAULT_MTU};
use super::ctrl::enable_pairs;
use super::metrics::{NetMetricsSnapshot, NetQueueMetrics};
use super::rx::Receiver;
use super::tap::{Tap, TapQueue};
use super::tx::Transmitter;
use super::worker::{NetWorker, WorkerQueue};
use super::{NetConfig, NetError};
use crate::device::{ActivateContext, ActivateError, DeviceOffer, ReadyQueue, VirtioDevice};
use crate::fault::FaultLog;
use crate::metrics::Counter;
use crate::worker::{WorkerHandle, WorkerKind};

/// What a network device has whether evmm or the kernel moves its frames: the settings,
/// the tap, the offer, the counters, and the way a worker thread starts.
pub(crate) struct NetBase<T: TapQueue> {
    pub config: NetConfig,
    pub tap_name: String,
    pub taps: Arc<[T]>,
    pub offer: DeviceOffer,
    pub metrics: Arc<[NetQueueMetrics]>,
    pub faults: Arc<FaultLog>,
    pub activations: Counter,
}

/// The queues one worker serves.
pub(crate) struct PairQueues {
    pub rx: Option<ReadyQueue>,
    pub tx: Option<ReadyQueue>,
    pub ctrl: Option<ReadyQueue>,
}

impl<T: TapQueue> NetBase<T> {
    /// The settings checked and the offer made, on `taps` (one per queue pair).
    pub fn new(config: NetConfig, tap_name: &str, taps: Vec<T>) -> Result<Self, NetError> {
        let offer = config::offer(&config, taps.len())?;
        Ok(Self {
            offer,
            metrics: (0..config.queue_pairs)
                .map(|_| NetQueueMetrics::default())
                .collect(),
            faults: Arc::new(FaultLog::new("virtio-net")),
            activations: Counter::default(),
            tap_name: tap_name.to_string(),
            taps: taps.into(),
            config,
        })
    }

    /// The counters, typed, with who moves the frames (`backend`).
    pub fn snapshot(&self, backend: &'static str) -> NetMetricsSnapshot {
        NetMetricsSnapshot {
            backend,
            tap: self.tap_name.clone(),
            activations: self.activations.get(),
            queues: self.metrics.iter().map(NetQueueMetrics::snapshot).collect(),
        }
    }

    /// The start of an activation: the queues by index, the tap's offloads as the
    /// driver acked them, and only pair 0 carrying traffic until the driver sets the
    /// pairs it uses.
    pub fn activate_tap(
        &self,
        ctx: &mut ActivateContext,
    ) -> Result<Vec<Option<ReadyQueue>>, ActivateError> {
        let by_index = ctx.take_queues_by_index(self.offer.queue_sizes.len())?;
        self.taps[0]
            .set_offloads(tap_offloads(ctx.acked_features))
            .map_err(|e| ActivateError::BadSetup(e.to_string()))?;
        enable_pairs(&self.taps, 1);
        Ok(by_index)
    }

    /// Starts thread `name`, the worker of `queues` of pair `pair`.
    pub fn spawn_worker(
        &self,
        name: &str,
        pair: usize,
        queues: PairQueues,
        ctx: &ActivateContext,
        receiver: Receiver,
        poll: Duration,
    ) -> Result<WorkerHandle<()>, ActivateError> {
        let worker = NetWorker {
            pair,
            tap_name: self.tap_name.clone(),
            mem: ctx.mem.clone(),
            rx: queues.rx.map(WorkerQueue::new),
            tx: queues.tx.map(WorkerQueue::new),
            ctrl: queues.ctrl.map(WorkerQueue::new),
            taps: self.taps.clone(),
            acked: ctx.acked_features,
            receiver,
            transmitter: Transmitter::default(),
            interrupt: ctx.interrupt.clone(),
            metrics: self.metrics.clone(),
            faults: self.faults.clone(),
            poll,
        };
        let (epoll, tap_out) = worker.epoll().map_err(ActivateError::Worker)?;
        let interrupt = ctx.interrupt.clone();
        WorkerHandle::spawn_guarded(
            WorkerKind::Net,
            name,
            move || interrupt.set_needs_reset(),
            move |kill| worker.run(epoll, tap_out, kill),
        )
        .map_err(ActivateError::Worker)
    }
}

/// A virtio-net device on tap queues of type `T` (a [`Tap`] outside tests).
pub struct Net<T: TapQueue = Tap> {
    base: NetBase<T>,
    workers: Vec<WorkerHandle<()>>,
}

impl<T: TapQueue> Net<T> {
    /// A device on `taps`, one per queue pair of `config`.
    pub fn new(config: NetConfig, tap_name: &str, taps: Vec<T>) -> Result<Self, NetError> {
        Ok(Self {
            base: NetBase::new(config, tap_name, taps)?,
            workers: Vec::new(),
        })
    }

    /// The settings the device was made with.
    pub fn config(&self) -> &NetConfig {
        &self.base.config
    }

    /// The counters, typed.
    pub fn metrics_snapshot(&self) -> NetMetricsSnapshot {
        self.base.snapshot("evmm")
    }

    /// Whether worker threads are running.
    pub fn is_active(&self) -> bool {
        self.workers.iter().any(WorkerHandle::is_running)
    }
}

impl<T: TapQueue> VirtioDevice for Net<T> {
    fn offer(&self) -> &DeviceOffer {
        &self.base.offer
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        if !self.workers.is_empty() {
            return Err(ActivateError::BadSetup("device is already active".into()));
        }
        let base = &self.base;
        let pairs = usize::from(base.config.queue_pairs);
        let mut by_index = base.activate_tap(&mut ctx)?;
        let acked = ctx.acked_features;
        let mut ctrl = if pairs > 1 {
            by_index[2 * pairs].take()
        } else {
            None
        };
        let max_frame = max_rx_frame(acked, base.config.mtu.unwrap_or(DEFAULT_MTU));
        let mergeable = has(acked, VIRTIO_NET_F_MRG_RXBUF);
        let poll = Duration::from_micros(u64::from(base.config.poll_us));
        for pair in 0..pairs {
            let queues = PairQueues {
                rx: by_index[2 * pair].take(),
                tx: by_index[2 * pair + 1].take(),
                ctrl: if pair == 0 { ctrl.take() } else { None },
            };
            if queues.rx.is_none() && queues.tx.is_none() && queues.ctrl.is_none() {
                continue;
            }
            let receiver = Receiver::new(mergeable, max_frame);
            let handle = base.spawn_worker(
                &format!("evmm-net{pair}"),
                pair,
                queues,
                &ctx,
                receiver,
                poll,
            )?;
            self.workers.push(handle);
        }
        if self.workers.is_empty() {
            return Err(ActivateError::BadSetup("no queue is ready".into()));
        }
        base.activations.inc();
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

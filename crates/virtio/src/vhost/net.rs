//! virtio-net whose data path is the kernel's vhost-net: the per-device parts of the
//! vhost frontend for a network device.
//!
//! The configuration space, the features and the tap are the in-VMM device's
//! ([`crate::net`]). When the driver sets DRIVER_OK, each queue pair's rings go to its
//! own `/dev/vhost-net` descriptor through [`frontend::start`]: SET_FEATURES (the ring
//! features only: [`VHOST_NET_FEATURES`]; the offloads go to the tap with
//! TUNSETOFFLOAD), SET_MEM_TABLE with every guest memory region at its own address,
//! then per ring SET_VRING_NUM/ADDR/BASE, SET_VRING_CALL with **the eventfd KVM holds
//! as the device's irqfd**, SET_VRING_KICK with **the eventfd KVM holds as that queue's
//! ioeventfd**, and VHOST_NET_SET_BACKEND with the tap queue. From then on the
//! guest's kick wakes the kernel's vhost worker and its completion interrupts the guest,
//! with no evmm thread in between: evmm neither reads those kicks nor the tap. With
//! several pairs evmm serves the control queue itself (as [`crate::net::ctrl`]).
//!
//! A driver reset detaches the backends (SET_BACKEND -1) and reads the ring bases back;
//! the next DRIVER_OK starts them again. InterruptStatus follows the policy of devices
//! whose backend writes the irqfd itself
//! ([`VirtioDevice::interrupt_status_always_used`]).

use std::sync::Mutex;
use std::time::Duration;

use vm_memory::GuestMemoryMmap;

use super::frontend::{self, RingSetup};
use super::kernel::{KernelError, KernelNetConn, VHOST_NET_FEATURES};
use crate::device::{ActivateContext, ActivateError, DeviceOffer, ReadyQueue, VirtioDevice};
use crate::net::device::{NetBase, PairQueues};
use crate::net::metrics::NetMetricsSnapshot;
use crate::net::rx::Receiver;
use crate::net::{NetConfig, NetError, Tap};
use crate::worker::WorkerHandle;

/// A virtio-net device served by vhost-net.
pub struct VhostNet {
    base: NetBase<Tap>,
    /// One vhost-net descriptor per queue pair.
    conns: Vec<Mutex<KernelNetConn>>,
    /// Pairs whose rings vhost-net runs.
    started: Vec<usize>,
    ctrl: Option<WorkerHandle<()>>,
}

/// Errors of setting a vhost-net device up.
#[derive(Debug, thiserror::Error)]
pub enum VhostNetError {
    /// The device's settings or its tap.
    #[error(transparent)]
    Net(#[from] NetError),
    /// vhost-net itself.
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

impl VhostNet {
    /// A device on `taps` (one per queue pair of `config`), each pair with its own
    /// vhost-net descriptor, owned from now on, for guest memory `mem`.
    pub fn new(
        config: NetConfig,
        tap_name: &str,
        taps: Vec<Tap>,
        mem: &GuestMemoryMmap,
    ) -> Result<Self, VhostNetError> {
        let base = NetBase::new(config, tap_name, taps)?;
        let conns = base
            .taps
            .iter()
            .map(|t| {
                let fd = t.file().try_clone().map_err(|e| {
                    KernelError::Open(std::io::Error::new(
                        e.kind(),
                        format!("dup of the tap: {e}"),
                    ))
                })?;
                KernelNetConn::open(mem, fd).map(Mutex::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            base,
            conns,
            started: Vec::new(),
            ctrl: None,
        })
    }

    /// The settings the device was made with.
    pub fn config(&self) -> &NetConfig {
        &self.base.config
    }

    /// The counters, typed: evmm's share (the control queue) only, the frames are
    /// vhost-net's.
    pub fn metrics_snapshot(&self) -> NetMetricsSnapshot {
        self.base.snapshot("vhost-net")
    }

    /// Starts queue pair `pair` on its vhost-net descriptor.
    fn start_pair(
        &self,
        pair: usize,
        rx: &ReadyQueue,
        tx: &ReadyQueue,
        mem: &GuestMemoryMmap,
        features: u64,
        call: &vmm_sys_util::eventfd::EventFd,
    ) -> Result<(), ActivateError> {
        let rings = [
            RingSetup {
                index: 0,
                queue: &rx.queue,
                kick: &rx.kick,
            },
            RingSetup {
                index: 1,
                queue: &tx.queue,
                kick: &tx.kick,
            },
        ];
        let mut conn = self.conns[pair].lock().unwrap_or_else(|e| e.into_inner());
        frontend::start(&mut *conn, mem, features, &rings, call)
            .map_err(|e| ActivateError::BadSetup(format!("vhost-net pair {pair}: {e}")))
    }
}

impl VirtioDevice for VhostNet {
    fn offer(&self) -> &DeviceOffer {
        &self.base.offer
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        if !self.started.is_empty() || self.ctrl.is_some() {
            return Err(ActivateError::BadSetup("device is already active".into()));
        }
        let Some(call) = ctx.interrupt.call_eventfd() else {
            return Err(ActivateError::BadSetup(
                "the transport has no irqfd to hand to vhost-net".into(),
            ));
        };
        let call = call.try_clone().map_err(ActivateError::Worker)?;
        let pairs = usize::from(self.base.config.queue_pairs);
        let mut by_index = self.base.activate_tap(&mut ctx)?;
        let features = ctx.acked_features & VHOST_NET_FEATURES;
        for pair in 0..pairs {
            let (Some(rx), Some(tx)) = (&by_index[2 * pair], &by_index[2 * pair + 1]) else {
                continue;
            };
            if let Err(e) = self.start_pair(pair, rx, tx, &ctx.mem, features, &call) {
                self.reset();
                return Err(e);
            }
            self.started.push(pair);
        }
        if self.started.is_empty() {
            return Err(ActivateError::BadSetup("no queue pair is ready".into()));
        }
        if let Some(ctrl) = by_index.get_mut(2 * pairs).and_then(Option::take) {
            // The control queue is evmm's: a worker with no frames to move.
            let queues = PairQueues {
                rx: None,
                tx: None,
                ctrl: Some(ctrl),
            };
            let receiver = Receiver::new(false, 0);
            match self
                .base
                .spawn_worker("evmm-net-ctrl", 0, queues, &ctx, receiver, Duration::ZERO)
            {
                Ok(handle) => self.ctrl = Some(handle),
                Err(e) => {
                    self.reset();
                    return Err(e);
                }
            }
        }
        self.base.activations.inc();
        log::info!(
            "virtio-net on {}: vhost-net runs {} queue pair(s), features {features:#x}",
            self.base.tap_name,
            self.started.len()
        );
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(ctrl) = self.ctrl.take() {
            ctrl.stop();
        }
        for pair in std::mem::take(&mut self.started) {
            let mut conn = self.conns[pair].lock().unwrap_or_else(|e| e.into_inner());
            match frontend::stop(&mut *conn, &[0, 1]) {
                Ok(bases) => log::debug!("vhost-net pair {pair} stopped at {bases:?}"),
                Err(e) => log::error!("vhost-net pair {pair}: stopping the rings: {e}"),
            }
        }
    }

    fn interrupt_status_always_used(&self) -> bool {
        true
    }

    fn metrics(&self) -> serde_json::Value {
        serde_json::to_value(self.metrics_snapshot()).unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for VhostNet {
    fn drop(&mut self) {
        self.reset();
    }
}

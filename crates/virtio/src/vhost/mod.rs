//! The vhost frontend: a device whose queues a backend outside evmm's threads serves.
//! evmm keeps the virtio-mmio transport and the configuration space; the backend gets
//! guest memory and, per queue, the ring addresses, **the kick eventfd KVM signals as
//! the queue's ioeventfd** and **the call eventfd KVM injects as the device's irqfd**,
//! so no evmm thread is on the data path.
//!
//! * [`frontend`]: the memory table and the ring handover (start and stop), written
//!   once over the vhost crate's [`vhost::VhostBackend`] for every kind of backend;
//! * [`user`]: vhost-user (a backend process on a Unix socket): the connection and its
//!   handshake, the monitor that notices a dead backend, the takeover that answers the
//!   guest's requests with errors from then on, and the generic device;
//! * per device, the small parts: [`blk`] (configuration space, feature mask, what the
//!   takeover answers).

pub mod blk;
pub mod frontend;
pub mod user;

pub use blk::{VhostUserBlk, VhostUserBlkConfig};

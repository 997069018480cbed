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
//! * [`kernel`]: the kernel's vhost-net (`/dev/vhost-net`), one descriptor per queue pair;
//! * [`shared_memory`]: guest memory both sides map: sealed against resizing by the VMM,
//!   checked before a backend maps it;
//! * per device, the small parts: [`blk`] (vhost-user-blk: configuration space, feature
//!   mask, what the takeover answers), [`fs`] (vhost-user-fs: the tag, the queues, the
//!   FUSE error the takeover answers), [`net`] (vhost-net: the rings of each pair to the
//!   kernel, the control queue kept).

pub mod blk;
pub mod frontend;
pub mod fs;
pub mod kernel;
pub mod net;
pub mod shared_memory;
pub mod user;

pub use blk::{VhostUserBlk, VhostUserBlkConfig};
pub use fs::{VhostUserFs, VhostUserFsConfig};
pub use net::VhostNet;

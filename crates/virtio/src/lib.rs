//! virtio devices for evmm, the virtio-mmio transport that drives them, and the vhost
//! frontend that hands a device's queues to a backend outside evmm.
//!
//! Nothing here knows KVM: the transport is a register file that the VMM maps into
//! guest-physical space, each queue's kick is an [`vmm_sys_util::eventfd::EventFd`]
//! (which the VMM binds as a KVM ioeventfd), and the device's interrupt is an eventfd
//! too (which the VMM binds as a KVM irqfd). Device workers block in epoll on those
//! eventfds and nothing else; a vhost backend gets the very same eventfds.
//!
//! * the device layer: [`device`] (the trait the transport drives, activation),
//!   [`interrupt`], [`status`], [`queue`] (the drain/notify loop every device runs),
//!   [`poll`] (polling the rings with the driver's kicks turned off),
//!   [`epoll`] and [`worker`] (every thread's wait and lifetime), [`fault`] (guest
//!   faults, logged once per kind), [`metrics`];
//! * [`transport::mmio`]: the virtio-mmio register file and status machine;
//! * devices: [`blk`], [`net`];
//! * [`vhost`]: the frontend for devices served by a vhost backend.

pub mod blk;
pub mod device;
pub mod epoll;
pub mod fault;
pub mod interrupt;
pub mod metrics;
pub mod net;
pub mod poll;
pub mod queue;
pub mod ratelimit;
pub mod status;
pub mod transport;
pub mod vhost;
pub mod worker;

#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

pub use device::{read_config_bytes, ActivateContext, DeviceOffer, ReadyQueue, VirtioDevice};
pub use interrupt::{InterruptKind, InterruptSignal};

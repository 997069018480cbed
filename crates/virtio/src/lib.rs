//! virtio devices for evmm and the virtio-mmio transport that drives them.
//!
//! Nothing here knows KVM: the transport is a register file that the VMM maps into
//! guest-physical space, each queue's kick is an [`vmm_sys_util::eventfd::EventFd`]
//! (which the VMM may bind as a KVM ioeventfd), and the device's interrupt is an
//! eventfd too (which the VMM binds as a KVM irqfd). Device workers block in epoll on
//! those eventfds and nothing else.

pub mod blk;
pub mod device;
mod epoll;
pub mod interrupt;
pub mod metrics;
pub mod mmio;
pub mod status;
pub mod worker;

#[cfg(test)]
mod test_utils;

pub use device::{read_config_bytes, ActivateContext, VirtioDevice};
pub use interrupt::{InterruptKind, InterruptSignal};

//! Transports: how a driver reaches a [`VirtioDevice`](crate::VirtioDevice). evmm has
//! one, virtio-mmio version 2.

pub mod mmio;

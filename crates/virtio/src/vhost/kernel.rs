//! The kernel's vhost-net backend (`/dev/vhost-net`, the vhost crate's
//! `vhost_kern::net::Net`) as a [`VhostConn`]: one connection per queue pair (vhost-net
//! serves one pair per descriptor: ring 0 receives, ring 1 transmits), the rings given
//! by guest-physical address (vhost translates them through the memory table), a ring
//! started by attaching the tap queue as its backend (VHOST_NET_SET_BACKEND) and
//! stopped by detaching it, before its base is read back.
//!
//! The owner (VHOST_SET_OWNER) is set when the connection opens, on evmm's main thread
//! before the guest runs, so the kernel's worker thread is `vhost-<evmm's pid>`.

use std::fs::File;
use std::io;
use std::sync::Arc;

use vhost::net::VhostNet;
use vhost::vhost_kern::net::Net;
use vhost::VhostBackend;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestMemoryMmap;

use super::frontend::{FrontendError, RingAddresses, VhostConn};

/// The device node.
pub const VHOST_NET: &str = "/dev/vhost-net";

/// The ring features vhost-net takes; the kernel refuses anything else
/// (EOPNOTSUPP), and the offloads are the tap's business, not vhost's. Bit 27 is
/// never passed: vhost-net reads it as VHOST_NET_F_VIRTIO_NET_HDR and would add and
/// strip the header itself, while the tap (IFF_VNET_HDR, 12 bytes) already does.
pub const VHOST_NET_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_NET_F_MRG_RXBUF);

/// Errors of opening vhost-net.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// `/dev/vhost-net` cannot be opened.
    #[error("cannot open {VHOST_NET}: {0}{hint}", hint = open_hint(.0))]
    Open(#[source] io::Error),
    /// VHOST_SET_OWNER failed.
    #[error("{VHOST_NET}: VHOST_SET_OWNER failed: {0}")]
    Owner(#[source] vhost::Error),
}

fn open_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::NotFound => {
            " (this kernel has no vhost-net: load the vhost_net module, or use vhost=off)"
        }
        io::ErrorKind::PermissionDenied => " (no permission: run as root, or use vhost=off)",
        _ => "",
    }
}

/// One vhost-net descriptor serving one queue pair on one tap queue.
pub struct KernelNetConn {
    net: Net<Arc<GuestMemoryMmap>>,
    tap: File,
}

impl KernelNetConn {
    /// Opens `/dev/vhost-net` for guest memory `mem`, takes ownership (SET_OWNER), and
    /// keeps `tap` (a queue of a tap opened with IFF_VNET_HDR) to attach as the rings'
    /// backend.
    pub fn open(mem: &GuestMemoryMmap, tap: File) -> Result<Self, KernelError> {
        let net = Net::new(Arc::new(mem.clone())).map_err(|e| match e {
            vhost::Error::VhostOpen(e) => KernelError::Open(e),
            other => KernelError::Open(io::Error::other(other.to_string())),
        })?;
        net.set_owner().map_err(KernelError::Owner)?;
        Ok(Self { net, tap })
    }
}

impl VhostConn for KernelNetConn {
    type Backend = Net<Arc<GuestMemoryMmap>>;
    const RING_ADDRESSES: RingAddresses = RingAddresses::Guest;

    fn call<T>(
        &mut self,
        request: &'static str,
        f: impl FnOnce(&Self::Backend) -> vhost::Result<T>,
    ) -> Result<T, FrontendError> {
        f(&self.net).map_err(|source| FrontendError::Request { request, source })
    }

    fn enable_ring(&mut self, index: usize) -> Result<(), FrontendError> {
        self.net
            .set_backend(index, Some(&self.tap))
            .map_err(|source| FrontendError::Request {
                request: "VHOST_NET_SET_BACKEND",
                source,
            })
    }

    fn disable_ring(&mut self, index: usize) -> Result<(), FrontendError> {
        self.call("VHOST_NET_SET_BACKEND", |n| n.set_backend(index, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ring_features_go_to_the_kernel() {
        assert_eq!(VHOST_NET_FEATURES & (1 << 27), 0);
        assert_eq!(VHOST_NET_FEATURES & (1 << 30), 0, "no vhost-user bit");
        assert_ne!(VHOST_NET_FEATURES & (1 << VIRTIO_F_VERSION_1), 0);
    }

    #[test]
    fn a_missing_device_is_a_clear_error() {
        let e = KernelError::Open(io::Error::from(io::ErrorKind::NotFound)).to_string();
        assert!(e.starts_with("cannot open /dev/vhost-net: "), "{e}");
        assert!(
            e.contains("load the vhost_net module, or use vhost=off"),
            "{e}"
        );
    }
}

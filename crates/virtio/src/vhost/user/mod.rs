//! vhost-user: the backend is another process, reached over a Unix socket.
//!
//! [`connection`] speaks the protocol (on the vhost crate's `Frontend`), [`monitor`]
//! notices a backend that hangs up or stops answering, [`takeover`] answers the
//! guest's requests with errors once it is gone, and [`device`] is the generic
//! [`VirtioDevice`](crate::VirtioDevice) every vhost-user device is, with the
//! per-device parts in a [`device::UserDeviceKind`].

pub mod connection;
pub mod control;
pub mod device;
pub mod monitor;
pub mod takeover;

pub use device::{BackendState, UserDeviceKind, VhostUserDevice, VhostUserError, VhostUserMetrics};

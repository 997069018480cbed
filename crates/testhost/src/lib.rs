//! Test support for evmm: the guest images, the nested KVM test host that boots Linux
//! guests on hosts whose /dev/kvm cannot, the route between the two, and parsing of
//! guest consoles.

pub mod boottime;
pub use evmm_cpio as cpio;
pub mod cputime;
pub mod echo_netns;
pub mod error;
pub mod evmm;
pub mod guest;
pub mod images;
pub mod nested;
pub mod net;
pub mod notify_output;
pub mod process;
pub mod qemu;
pub mod qemu_cpu;
pub mod route;
pub mod vhost_user;

pub use error::{Error, Result};
pub use evmm::EvmmGuest;
pub use guest::GuestConsole;
pub use images::GuestImages;
pub use nested::{NestedHost, RunOutput};
pub use net::{NetOutput, NetPlan, NetRun};
pub use qemu::QemuGuest;
pub use route::Route;
pub use vhost_user::{Backend, BackendKind};

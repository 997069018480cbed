//! The VM's state: the KVM VM and its memory ([`vm`], [`memory`]), its vCPUs on their
//! threads ([`vcpu`]), and how a run ends ([`exit`]).

pub mod exit;
pub mod memory;
pub mod vcpu;
pub mod vm;

//! The error type of [`crate::run`].

use crate::config::ConfigError;
use crate::vstate::vm::VmError;

/// Everything that can stop evmm before or while running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid command-line values.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Building or running the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
}

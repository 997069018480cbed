//! The seccomp filters of evmm's and evmm-vhost-user-blk's threads.
//!
//! Each kind of thread ([`ThreadKind`]) gets its own allow list, installed by the
//! thread itself once its set-up is done ([`confine`]): a vCPU may run KVM_RUN and
//! what its exits lead to, a block worker may read and write its disk and its
//! eventfds, and so on; anything else ends the process. Filters stack: a thread
//! inherits the filter of the thread that started it, and a syscall must pass every
//! filter on the thread. So threads are started by a thread whose own filter allows
//! what they need (evmm's worker spawner, [`ThreadKind::Spawner`]), and each then
//! narrows itself to its own list.
//!
//! [`Mode::Kill`] traps a forbidden syscall: a SIGSYS handler writes one line naming
//! the thread and the syscall number to stderr and ends the process with status
//! [`KILLED_STATUS`]. [`Mode::Log`] lets the syscall run and has the kernel log it
//! (dmesg, audit), which is how the lists are checked against a new workload.

mod handler;
mod rules;

use std::cell::Cell;
use std::str::FromStr;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use handler::KILLED_STATUS;
pub use rules::ThreadKind;

/// What a forbidden syscall does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// No filters.
    Off,
    /// Forbidden syscalls run and the kernel logs them.
    Log,
    /// A forbidden syscall ends the process (the default).
    #[default]
    Kill,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Mode::Off),
            "log" => Ok(Mode::Log),
            "kill" => Ok(Mode::Kill),
            other => Err(format!("'{other}' is not off, log or kill")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Off => "off",
            Mode::Log => "log",
            Mode::Kill => "kill",
        })
    }
}

/// Errors installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules did not compile (a bug in this crate).
    #[error("the {kind:?} seccomp filter does not compile: {source}")]
    Compile {
        /// The thread kind.
        kind: ThreadKind,
        /// What seccompiler said.
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter (no seccomp, or not allowed here).
    #[error(
        "the kernel refused the {kind:?} thread's seccomp filter ({source}); \
         --seccomp=off runs without filters"
    )]
    Refused {
        /// The thread kind.
        kind: ThreadKind,
        /// What the kernel said.
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler for seccomp: {0}")]
    Handler(#[source] std::io::Error),
}

/// Compiles the filter of `kind` for `mode` (`None` for [`Mode::Off`]).
pub fn compile(kind: ThreadKind, mode: Mode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        Mode::Off => return Ok(None),
        Mode::Log => SeccompAction::Log,
        Mode::Kill => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(
        rules::rules(kind).map_err(|source| SeccompError::Compile { kind, source })?,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|source| SeccompError::Compile { kind, source })?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|source| SeccompError::Compile { kind, source })?;
    Ok(Some(program))
}

/// Narrows the calling thread to the syscalls of `kind` (nothing for [`Mode::Off`]).
/// The first call in a process also installs the SIGSYS handler that reports a
/// forbidden syscall in [`Mode::Kill`].
pub fn confine(kind: ThreadKind, mode: Mode) -> Result<(), SeccompError> {
    let Some(program) = compile(kind, mode)? else {
        return Ok(());
    };
    if mode == Mode::Kill {
        handler::install().map_err(SeccompError::Handler)?;
    }
    handler::set_thread_kind(kind);
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Refused { kind, source })?;
    CONFINED.with(|c| c.set(true));
    log::debug!("thread confined to the {kind:?} seccomp filter ({mode})");
    Ok(())
}

thread_local! {
    /// Whether [`confine`] narrowed this thread already.
    static CONFINED: Cell<bool> = const { Cell::new(false) };
}

static PROCESS_MODE: OnceLock<Mode> = OnceLock::new();

/// Sets the mode of [`confine_once`] for the whole process (the first call wins).
pub fn set_process_mode(mode: Mode) {
    let _ = PROCESS_MODE.set(mode);
}

/// For threads a library starts (whose body cannot confine itself): narrows the
/// calling thread to `kind` in the mode of [`set_process_mode`] the first time it
/// is called on a thread; nothing if no mode was set or the thread is confined
/// already. Until then the thread has the filter it inherited.
pub fn confine_once(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(&mode) = PROCESS_MODE.get() else {
        return Ok(());
    };
    if CONFINED.with(|c| c.get()) {
        return Ok(());
    }
    confine(kind, mode)
}

#[cfg(test)]
mod tests;

//! Why and when the VM stops: the first reason reported wins, every thread
//! sees the stop flag, and the main loop is woken through an eventfd.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off through the ACPI sleep control register.
    PowerOff,
    /// The guest reset the machine (i8042 pulse-reset or ACPI reset
    /// register); evmm ends the VM instead of rebooting it.
    Reset,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN); treated as a reset.
    TripleFault,
    /// evmm received this signal (SIGTERM, SIGINT, SIGHUP).
    Signal(i32),
    /// The guest wrote this status to the exit device (`--exit-device`); evmm exits
    /// with it.
    GuestStatus(u8),
    /// A vCPU hit an error evmm cannot continue from.
    Error(String),
}

impl ExitReason {
    /// Whether this ends the VM as a failure of evmm (exit status 1).
    pub fn is_error(&self) -> bool {
        matches!(self, ExitReason::Error(_))
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::PowerOff => write!(f, "guest powered off"),
            ExitReason::Reset => write!(f, "guest reset"),
            ExitReason::TripleFault => write!(f, "guest triple fault (treated as reset)"),
            ExitReason::Signal(n) => write!(f, "stopped by signal {n}"),
            ExitReason::GuestStatus(n) => {
                write!(f, "the guest wrote status {n} to the exit device")
            }
            ExitReason::Error(e) => write!(f, "{e}"),
        }
    }
}

/// Shared stop state of a VM.
#[derive(Debug)]
pub struct VmExit {
    evt: EventFd,
    stopping: AtomicBool,
    reason: Mutex<Option<ExitReason>>,
}

impl VmExit {
    /// Creates the stop state.
    pub fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(VmExit {
            evt: EventFd::new(EFD_NONBLOCK)?,
            stopping: AtomicBool::new(false),
            reason: Mutex::new(None),
        }))
    }

    /// Asks the VM to stop for `reason`. Only the first request is kept.
    pub fn request(&self, reason: ExitReason) {
        {
            let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                log::info!("VM exit requested: {reason}");
                *slot = Some(reason);
            }
        }
        self.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            log::error!("cannot signal VM exit: {e}");
        }
    }

    /// Whether a stop was requested.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The reason given by the first request.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The eventfd that becomes readable on the first request.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// A [`vm_superio::Trigger`] that stops the VM with a fixed reason.
pub struct ExitTrigger {
    exit: Arc<VmExit>,
    reason: ExitReason,
}

impl ExitTrigger {
    /// A trigger that requests `reason` on `exit`.
    pub fn new(exit: Arc<VmExit>, reason: ExitReason) -> Self {
        ExitTrigger { exit, reason }
    }
}

impl vm_superio::Trigger for ExitTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.exit.request(self.reason.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_superio::Trigger;

    #[test]
    fn first_reason_wins() {
        let exit = VmExit::new().unwrap();
        assert!(!exit.is_stopping());
        assert_eq!(exit.reason(), None);
        ExitTrigger::new(exit.clone(), ExitReason::Reset)
            .trigger()
            .unwrap();
        exit.request(ExitReason::Error("late".into()));
        assert!(exit.is_stopping());
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
        assert_eq!(exit.eventfd().read().unwrap(), 2);
        assert!(!ExitReason::Reset.is_error());
        assert!(ExitReason::Error("x".into()).is_error());
    }
}

//! Guest faults are logged once per kind and device at `warn`, later ones at `debug`:
//! a guest that keeps sending bad chains cannot flood the log.

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::queue::QueueFault;

/// A kind of guest fault, numbered so that each kind is logged once.
pub trait FaultKind: Display {
    /// A number below 63 that identifies the kind.
    fn kind(&self) -> u32;
}

/// Logs each kind of guest fault once per device at `warn`, later ones at `debug`.
#[derive(Debug)]
pub struct FaultLog {
    device: &'static str,
    seen: AtomicU64,
}

impl FaultLog {
    /// A log for the faults of a `device` ("virtio-blk", ...).
    pub fn new(device: &'static str) -> Self {
        Self {
            device,
            seen: AtomicU64::new(0),
        }
    }

    /// Logs `fault` seen on queue `queue`.
    pub fn report<F: FaultKind>(&self, queue: usize, fault: &QueueFault<F>) {
        match fault {
            QueueFault::Chain(f) => self.log(queue, f.kind().min(62), f),
            QueueFault::Ring(s) => self.log(queue, 63, s),
        }
    }

    /// Logs a chain fault the device answered in the chain itself.
    pub fn report_chain<F: FaultKind>(&self, queue: usize, fault: &F) {
        self.log(queue, fault.kind().min(62), fault);
    }

    fn log(&self, queue: usize, bit: u32, text: &dyn Display) {
        let first = self.seen.fetch_or(1 << bit, Ordering::Relaxed) & (1 << bit) == 0;
        if first {
            log::warn!(
                "{} queue {queue}: guest fault: {text} (further ones of this kind are logged at debug)",
                self.device
            );
        } else {
            log::debug!("{} queue {queue}: guest fault: {text}", self.device);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::request::Fault;

    #[test]
    fn each_kind_is_marked_once() {
        let log = FaultLog::new("virtio-blk");
        log.report(0, &QueueFault::Chain(Fault::HeaderTooShort));
        log.report(0, &QueueFault::Chain(Fault::HeaderTooShort));
        log.report_chain(1, &Fault::HeaderTooShort);
        log.report::<Fault>(1, &QueueFault::Ring("x".into()));
        let seen = log.seen.load(Ordering::Relaxed);
        assert_eq!(seen.count_ones(), 2);
    }
}

//! Transmitting: each chain the driver made available goes to the tap with one `writev`
//! straight from its buffers (virtio-net header first, as the tap expects it).
//!
//! A frame the tap cannot take now (EAGAIN) stays in the available ring, and the worker
//! waits for the tap to become writable instead of dropping it. A frame the tap refuses
//! (EIO while its link is down, EINVAL for a bad offload header) is dropped and
//! counted; its chain is returned, so the driver's ring never wedges.

use std::io;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::chain::{chain_iovecs, ChainFault};
use super::config::HDR_LEN;
use super::metrics::NetQueueMetrics;
use super::tap::TapQueue;
use crate::fault::FaultLog;
use crate::queue::{drain_queue, Drained, Served};

/// What transmitting needs, owned by a queue pair's worker.
pub struct Transmitter {
    iovs: Vec<libc::iovec>,
    /// A tap error was logged already.
    tap_error_logged: bool,
}

// SAFETY: the iovecs are scratch space, rebuilt before every use and only ever
// pointing into guest memory the worker holds; a Transmitter moves to its worker's
// thread once and is used there only.
unsafe impl Send for Transmitter {}

impl Default for Transmitter {
    fn default() -> Self {
        Self {
            iovs: Vec::with_capacity(64),
            tap_error_logged: false,
        }
    }
}

impl Transmitter {
    /// Sends every available frame of `queue` to `tap`, until the tap cannot take more
    /// ([`Drained::blocked`]).
    pub fn transmit<T: TapQueue>(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        tap: &T,
        index: usize,
        m: &NetQueueMetrics,
        faults: &FaultLog,
    ) -> Drained<ChainFault> {
        let Self {
            iovs,
            tap_error_logged,
        } = self;
        drain_queue(queue, mem, |chain| {
            iovs.clear();
            let checked = chain_iovecs(chain, mem, false, iovs).and_then(|len| {
                if len >= HDR_LEN {
                    Ok(len)
                } else {
                    Err(ChainFault::TooShort)
                }
            });
            let len = match checked {
                Ok(len) => len,
                Err(fault) => {
                    m.malformed_chains.inc();
                    faults.report_chain(index, &fault);
                    return Ok(Served::Used(0));
                }
            };
            match tap.writev(iovs) {
                Ok(_) => {
                    m.tx_packets.inc();
                    m.tx_bytes.add((len - HDR_LEN) as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    m.tx_waits_for_tap.inc();
                    return Ok(Served::Later);
                }
                Err(e) => {
                    m.tx_dropped_tap_error.inc();
                    if !*tap_error_logged {
                        *tap_error_logged = true;
                        log::warn!(
                            "virtio-net queue {index}: the tap refused a frame ({e}); dropped \
                             (further ones are counted in tx_dropped_tap_error)"
                        );
                    }
                }
            }
            Ok(Served::Used(0))
        })
    }
}

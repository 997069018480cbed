//! Receiving: frames from the tap `readv` straight into the buffers the driver posted.
//!
//! Without VIRTIO_NET_F_MRG_RXBUF a frame goes into one chain; with it, into as many
//! chains (one buffer each, the way Linux posts them) as it needs, with `num_buffers`
//! in the first one's header, and all of them published with one store of the used
//! index, so the driver never sees part of a frame. A frame's size is only known once
//! it is read, so with mergeable buffers nothing is read until the posted buffers can
//! hold the largest frame the tap may hand over (or the driver has posted the whole
//! ring): a driver still refilling its ring makes the frame wait, not drop. One extra
//! host buffer after the guest's catches a frame larger than what was posted: such a
//! frame is dropped and counted, and the buffers stay available for the next one.

use std::io;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::chain::{chain_iovecs, write_at, ChainFault};
use super::config::{HDR_LEN, HDR_NUM_BUFFERS};
use super::metrics::NetQueueMetrics;
use super::tap::TapQueue;
use crate::fault::FaultLog;
use crate::queue::{publish_used, QueueFault};

/// What one attempt to receive a frame did.
#[derive(Debug)]
pub enum Received {
    /// A frame went to the guest.
    Frame,
    /// A frame was dropped (too big for the posted buffers).
    Dropped,
    /// The driver has posted no buffer: stop reading the tap until it kicks.
    NoBuffers,
    /// The driver's mergeable buffers cannot hold the largest frame yet: nothing was
    /// read; wait for it to post more than it had posted, up to `posted` in the
    /// available ring ([`ask_for_more_buffers`]).
    TooFewBuffers {
        /// The available index the driver had reached.
        posted: u16,
    },
    /// The tap has nothing to read.
    TapEmpty,
    /// Reading the tap failed.
    TapFailed(io::Error),
    /// The ring is broken: the queue stops until the driver resets the device.
    Fault(QueueFault<ChainFault>),
}

/// What receiving needs, owned by a queue pair's worker and reused frame after frame.
pub struct Receiver {
    /// Mergeable receive buffers were negotiated.
    pub mergeable: bool,
    /// The largest frame the tap may hand over (virtio-net header included).
    pub max_frame: usize,
    /// The catch-all after the guest's buffers.
    overflow: Vec<u8>,
    /// iovecs of the chains being filled.
    iovs: Vec<libc::iovec>,
    /// The chains being filled: head, first iovec, number of iovecs, capacity.
    chains: Vec<(u16, usize, usize, usize)>,
    /// (head, length) of what is published.
    used: Vec<(u16, u32)>,
}

// SAFETY: the iovecs are scratch space, rebuilt before every use and only ever
// pointing into guest memory the worker holds; a Receiver moves to its worker's thread
// once and is used there only.
unsafe impl Send for Receiver {}

impl Receiver {
    /// A receiver for frames of up to `max_frame` bytes.
    pub fn new(mergeable: bool, max_frame: usize) -> Self {
        Self {
            mergeable,
            max_frame,
            overflow: vec![0; 64 << 10],
            iovs: Vec::with_capacity(64),
            chains: Vec::with_capacity(64),
            used: Vec::with_capacity(64),
        }
    }

    /// Receives one frame from `tap` into `queue`'s buffers.
    pub fn receive<T: TapQueue>(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        tap: &T,
        index: usize,
        m: &NetQueueMetrics,
        faults: &FaultLog,
    ) -> Received {
        self.iovs.clear();
        self.chains.clear();
        let start = queue.next_avail();
        let mut capacity = 0usize;
        let mut ring_ran_out = false;
        while capacity < self.max_frame && (self.mergeable || self.chains.is_empty()) {
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    return Received::Fault(QueueFault::Ring(format!("bad available ring: {e}")))
                }
            };
            let Some(chain) = chain else {
                ring_ran_out = true;
                break;
            };
            let head = chain.head_index();
            let first = self.iovs.len();
            let result = chain_iovecs(chain, mem, true, &mut self.iovs).and_then(|len| {
                if self.chains.is_empty() && len < HDR_LEN {
                    Err(ChainFault::TooShort)
                } else {
                    Ok(len)
                }
            });
            match result {
                Ok(len) => {
                    self.chains
                        .push((head, first, self.iovs.len() - first, len));
                    capacity += len;
                }
                Err(fault) if self.chains.is_empty() => {
                    // Returned unused, so the driver gets the buffer back.
                    m.malformed_chains.inc();
                    faults.report_chain(index, &fault);
                    if let Err(e) = publish_used(queue, mem, &[(head, 0)]) {
                        return Received::Fault(QueueFault::Ring(e));
                    }
                    return self.receive(queue, mem, tap, index, m, faults);
                }
                Err(_) => {
                    // Handled first next time, on its own.
                    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                    break;
                }
            }
        }
        if self.chains.is_empty() {
            return Received::NoBuffers;
        }
        if self.mergeable
            && ring_ran_out
            && capacity < self.max_frame
            && self.chains.len() < usize::from(queue.size())
        {
            let posted = queue.next_avail();
            queue.set_next_avail(start);
            return Received::TooFewBuffers { posted };
        }
        let guest_iovs = self.iovs.len();
        self.iovs.push(libc::iovec {
            iov_base: self.overflow.as_mut_ptr().cast(),
            iov_len: self.overflow.len(),
        });
        let n = match tap.readv(&self.iovs) {
            Ok(n) => n,
            Err(e) => {
                queue.set_next_avail(start);
                return if e.kind() == io::ErrorKind::WouldBlock {
                    Received::TapEmpty
                } else {
                    Received::TapFailed(e)
                };
            }
        };
        if n > capacity || n < HDR_LEN {
            queue.set_next_avail(start);
            // A read shorter than the header the tap always prepends is the tap's
            // fault, not a frame too big for the buffers.
            if n < HDR_LEN {
                m.tap_errors.inc();
            } else {
                m.rx_dropped_too_big.inc();
            }
            return Received::Dropped;
        }
        self.used.clear();
        let mut left = n;
        for &(head, _, _, cap) in &self.chains {
            if left == 0 {
                break;
            }
            let take = cap.min(left);
            self.used.push((head, take as u32));
            left -= take;
        }
        let buffers = self.used.len() as u16;
        queue.set_next_avail(start.wrapping_add(buffers));
        let (_, first, count, _) = self.chains[0];
        // SAFETY: the iovecs point into guest memory the worker holds.
        unsafe {
            write_at(
                &self.iovs[first..first + count.min(guest_iovs)],
                HDR_NUM_BUFFERS,
                &buffers.to_le_bytes(),
            )
        };
        if let Err(e) = publish_used(queue, mem, &self.used) {
            return Received::Fault(QueueFault::Ring(e));
        }
        m.rx_packets.inc();
        m.rx_bytes.add((n - HDR_LEN) as u64);
        Received::Frame
    }
}

/// Asks the driver for a kick once it posts buffers beyond available index `posted`
/// (with EVENT_IDX: `avail_event` set to the end of what it had posted, not to where
/// the device stopped taking buffers). True when it already has, so the caller looks
/// again.
pub fn ask_for_more_buffers(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    posted: u16,
) -> Result<bool, virtio_queue::Error> {
    let taken = queue.next_avail();
    queue.set_next_avail(posted);
    let more = queue.enable_notification(mem);
    queue.set_next_avail(taken);
    more
}

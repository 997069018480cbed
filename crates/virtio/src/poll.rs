//! Polling a device's queues instead of sleeping on their kicks.
//!
//! While a worker polls, it reads the available rings in guest memory (no system call
//! per look) and has asked the driver not to kick ([`suppress_kicks`]); before it
//! sleeps it allows kicks again and looks once more ([`allow_kicks`]), so that no
//! request is left behind. How long it polls is a [`PollWindow`]:
//!
//! * `off`: never (every request is a kick and a wake-up);
//! * `N` (µs): a fixed window after the last request found;
//! * `adaptive`: the window follows the gaps between requests, as QEMU's
//!   `poll-max-ns` does for its iothreads: it starts at 0; after a wait (poll plus
//!   sleep) that was shorter than the maximum, polling longer would have found the
//!   request without a sleep, so the window grows (to 4 µs, then doubling up to
//!   [`ADAPTIVE_MAX`], 64 µs); after a wait longer than the maximum it halves (below
//!   4 µs: 0).
//!   An idle device therefore stops polling after a few wake-ups.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Longest fixed window, in microseconds.
pub const MAX_POLL_US: u32 = 1000;
/// Where the adaptive window starts growing.
pub const ADAPTIVE_START: Duration = Duration::from_micros(4);
/// The adaptive window's maximum. QEMU's default is 32 µs; here a kick alone (the host
/// emulating the guest's MMIO write) takes 30–40 µs, so a request that came by kick
/// soon after the worker went to sleep looks like a 40 µs wait: with a 32 µs maximum
/// the window could never grow past the kick it is meant to spare.
pub const ADAPTIVE_MAX: Duration = Duration::from_micros(64);

/// How a worker waits for the next request. The default is adaptive: it polls only
/// while requests come closer together than [`ADAPTIVE_MAX`], so an idle disk costs
/// nothing (README, "Disks: engines and polling", has the measurements).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PollMode {
    /// Sleep at once.
    Off,
    /// Poll this many microseconds after the last request found.
    Fixed(u32),
    /// Poll for a window that follows the gaps between requests.
    #[default]
    Adaptive,
}

impl FromStr for PollMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" | "0" => Ok(PollMode::Off),
            "adaptive" => Ok(PollMode::Adaptive),
            n => n
                .parse::<u32>()
                .ok()
                .filter(|us| *us <= MAX_POLL_US)
                .map(PollMode::Fixed)
                .ok_or_else(|| {
                    format!("poll={s}: expected off, adaptive or microseconds up to {MAX_POLL_US}")
                }),
        }
    }
}

impl fmt::Display for PollMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PollMode::Off => f.write_str("off"),
            PollMode::Fixed(us) => write!(f, "{us}"),
            PollMode::Adaptive => f.write_str("adaptive"),
        }
    }
}

/// The current polling window of a worker.
#[derive(Debug, Clone, Copy)]
pub struct PollWindow {
    mode: PollMode,
    current: Duration,
}

impl PollWindow {
    /// The window for `mode` (adaptive starts at 0).
    pub fn new(mode: PollMode) -> Self {
        let current = match mode {
            PollMode::Fixed(us) => Duration::from_micros(u64::from(us)),
            PollMode::Off | PollMode::Adaptive => Duration::ZERO,
        };
        Self { mode, current }
    }

    /// How long to poll now (zero: sleep at once).
    pub fn current(&self) -> Duration {
        self.current
    }

    /// Whether polling can happen at all.
    pub fn enabled(&self) -> bool {
        self.mode != PollMode::Off
    }

    /// After a wait that polling did not end: `waited` from the start of the poll to
    /// the request that woke the worker. Adjusts an adaptive window.
    pub fn after_wait(&mut self, waited: Duration) {
        if self.mode != PollMode::Adaptive || waited <= self.current {
            return;
        }
        if waited > ADAPTIVE_MAX {
            self.current /= 2;
            if self.current < ADAPTIVE_START {
                self.current = Duration::ZERO;
            }
        } else if self.current < ADAPTIVE_MAX {
            self.current = if self.current.is_zero() {
                ADAPTIVE_START
            } else {
                (self.current * 2).min(ADAPTIVE_MAX)
            };
        }
    }
}

crate::counters! {
    /// What a device's polling did.
    PollMetrics => PollSnapshot {
        /// Drains started because polling saw a request (each spared the driver a kick
        /// and the worker a wake-up).
        polled_drains,
        /// Requests those drains served.
        polled_requests,
        /// Completions polling found (asynchronous engines).
        polled_completions,
        /// Time spent polling, in nanoseconds.
        poll_ns,
        /// Times the worker went to sleep after a poll found nothing.
        idle_polls,
    }
}

/// Asks the driver not to kick `queue` while the device polls it: without EVENT_IDX,
/// VRING_USED_F_NO_NOTIFY in the used ring's flags; with it, an `avail_event` the
/// driver has already passed (one before the next entry the device will take), so
/// that no new available index crosses it.
pub fn suppress_kicks<M: GuestMemory>(queue: &mut Queue, mem: &M) -> Result<(), String> {
    queue
        .disable_notification(mem)
        .map_err(|e| format!("cannot turn kicks off: {e}"))?;
    if queue.event_idx_enabled() {
        let at = queue
            .used_ring()
            .checked_add(4 + 8 * u64::from(queue.size()))
            .ok_or("used ring address overflows")?;
        mem.write_obj(queue.next_avail().wrapping_sub(1).to_le(), GuestAddress(at))
            .map_err(|e| format!("cannot write avail_event: {e}"))?;
    }
    Ok(())
}

/// Lets the driver kick `queue` again; returns whether chains were made available
/// meanwhile (serve them: no kick announces them).
pub fn allow_kicks<M: GuestMemory>(queue: &mut Queue, mem: &M) -> Result<bool, String> {
    queue
        .enable_notification(mem)
        .map_err(|e| format!("cannot turn kicks on: {e}"))
}

/// Whether the driver made chains available that the device has not taken (one read
/// of the available index in guest memory).
pub fn has_available<M: GuestMemory>(queue: &Queue, mem: &M) -> bool {
    queue
        .avail_idx(mem, Ordering::Acquire)
        .map(|idx| idx.0 != queue.next_avail())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::*;
    use virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY;
    use virtio_queue::mock::MockSplitQueue;

    #[test]
    fn modes_parse_and_print() {
        assert_eq!("off".parse(), Ok(PollMode::Off));
        assert_eq!("0".parse(), Ok(PollMode::Off));
        assert_eq!("adaptive".parse(), Ok(PollMode::Adaptive));
        assert_eq!("30".parse(), Ok(PollMode::Fixed(30)));
        assert_eq!("1000".parse(), Ok(PollMode::Fixed(1000)));
        for bad in ["1001", "-1", "", "fast", "30us"] {
            assert!(bad.parse::<PollMode>().is_err(), "{bad}");
        }
        assert_eq!(PollMode::Fixed(30).to_string(), "30");
        assert_eq!(PollMode::Adaptive.to_string(), "adaptive");
    }

    #[test]
    fn the_adaptive_window_grows_on_short_waits_and_shrinks_on_long_ones() {
        let us = Duration::from_micros;
        let mut w = PollWindow::new(PollMode::Adaptive);
        assert_eq!(w.current(), Duration::ZERO);
        // Requests 10 µs apart: polling would have caught them.
        let mut seen = Vec::new();
        for _ in 0..6 {
            w.after_wait(us(10));
            seen.push(w.current().as_micros());
        }
        // 4, 8, 16: from then on the poll covers the 10 µs gap and there is no
        // wait of more than the window to report.
        assert_eq!(seen, vec![4, 8, 16, 16, 16, 16]);
        // Gaps beyond the maximum: halve down to nothing.
        let mut seen = Vec::new();
        for _ in 0..4 {
            w.after_wait(us(5000));
            seen.push(w.current().as_micros());
        }
        assert_eq!(seen, vec![8, 4, 0, 0]);
        // Waits just under the maximum grow it to the maximum, never beyond.
        for _ in 0..10 {
            w.after_wait(ADAPTIVE_MAX - us(1));
        }
        assert_eq!(w.current(), ADAPTIVE_MAX);
    }

    #[test]
    fn fixed_and_off_windows_do_not_move() {
        let mut w = PollWindow::new(PollMode::Fixed(30));
        w.after_wait(Duration::from_secs(1));
        w.after_wait(Duration::from_micros(1));
        assert_eq!(w.current(), Duration::from_micros(30));
        let mut off = PollWindow::new(PollMode::Off);
        off.after_wait(Duration::from_micros(1));
        assert_eq!(off.current(), Duration::ZERO);
        assert!(!off.enabled());
    }

    #[test]
    fn kicks_off_and_on_without_event_idx() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QSIZE);
        let mut q = make_queue(&vq);
        suppress_kicks(&mut q, &mem).unwrap();
        let flags: u16 = mem.read_obj(GuestAddress(USED_ADDR)).unwrap();
        assert_eq!(flags, VRING_USED_F_NO_NOTIFY as u16);
        assert!(!has_available(&q, &mem));
        add_chain(&vq, 0, &[Desc(0x10_0000, 16, true)]);
        assert!(has_available(&q, &mem));
        // Allowing kicks reports the chain that came while they were off.
        assert!(allow_kicks(&mut q, &mem).unwrap());
        let flags: u16 = mem.read_obj(GuestAddress(USED_ADDR)).unwrap();
        assert_eq!(flags, 0);
    }

    #[test]
    fn with_event_idx_avail_event_lags_so_no_index_crosses_it() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QSIZE);
        let mut q = make_queue(&vq);
        q.set_event_idx(true);
        suppress_kicks(&mut q, &mem).unwrap();
        // next_avail is 0: avail_event 0xffff. A driver going from 0 to 1 checks
        // vring_need_event(0xffff, 1, 0): (1 - 0xffff - 1) = 1 < 1 is false.
        assert_eq!(avail_event(&mem), 0xffff);
        let need_event = |event: u16, new: u16, old: u16| {
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        };
        assert!(!need_event(avail_event(&mem), 1, 0));
        assert!(!need_event(avail_event(&mem), 5, 1));
        allow_kicks(&mut q, &mem).unwrap();
        assert_eq!(avail_event(&mem), 0);
        assert!(need_event(avail_event(&mem), 1, 0));
    }
}

//! Rate limiting of log lines a guest can trigger at will (bad register accesses,
//! illegal status changes): each call site of [`guest_warn!`](crate::guest_warn) logs at
//! most [`BURST`] lines per [`WINDOW_MS`] at `warn`; the lines over that are counted and
//! the count is reported with the next line the site logs. A guest that loops on a bad
//! access costs a few lines every few seconds, not a disk full of log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lines a call site may log per window.
pub const BURST: u64 = 10;
/// The window, in milliseconds.
pub const WINDOW_MS: u64 = 5_000;

/// The state of one call site.
#[derive(Debug, Default)]
pub struct RateLimit {
    /// Start of the current window (ms since the first use of any limit), plus one, so
    /// that 0 means "no window yet".
    window: AtomicU64,
    /// Lines logged in the current window.
    logged: AtomicU64,
    /// Lines not logged since the last line that was.
    suppressed: AtomicU64,
}

impl RateLimit {
    /// A limit with nothing logged yet.
    pub const fn new() -> Self {
        Self {
            window: AtomicU64::new(0),
            logged: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be logged now; `Some(n)`: yes, and `n` lines were suppressed
    /// before it.
    pub fn allow(&self) -> Option<u64> {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        let now = EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64;
        self.allow_at(now)
    }

    /// [`RateLimit::allow`] at `now_ms` on a clock of the caller's.
    pub fn allow_at(&self, now_ms: u64) -> Option<u64> {
        let window = self.window.load(Ordering::Relaxed);
        if window == 0 || now_ms.saturating_sub(window - 1) >= WINDOW_MS {
            // A new window. Racing callers may both reset; that only lets a few more
            // lines through, never fewer.
            self.window.store(now_ms + 1, Ordering::Relaxed);
            self.logged.store(0, Ordering::Relaxed);
        }
        if self.logged.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `log::warn!` for what a guest can trigger: rate-limited per call site (see the
/// [module](crate::ratelimit)).
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if let Some(suppressed) = LIMIT.allow() {
            if suppressed > 0 {
                log::warn!(
                    "{} ({suppressed} more like this were not logged)",
                    format_args!($($arg)+)
                );
            } else {
                log::warn!($($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_the_count_of_what_was_left_out() {
        let limit = RateLimit::new();
        for i in 0..BURST {
            assert_eq!(limit.allow_at(100 + i), Some(0), "line {i}");
        }
        for i in 0..1000 {
            assert_eq!(limit.allow_at(200 + i), None);
        }
        // Still the same window.
        assert_eq!(limit.allow_at(100 + WINDOW_MS - 1), None);
        // The next window logs again and says how many were left out.
        assert_eq!(limit.allow_at(100 + WINDOW_MS), Some(1001));
        assert_eq!(limit.allow_at(100 + WINDOW_MS + 1), Some(0));
    }

    #[test]
    fn a_flood_logs_a_bounded_number_of_lines() {
        let limit = RateLimit::new();
        // A million accesses over 60 s.
        let logged = (0..1_000_000u64)
            .filter(|i| limit.allow_at(i * 60_000 / 1_000_000).is_some())
            .count() as u64;
        assert!(logged <= BURST * (60_000 / WINDOW_MS + 1), "{logged}");
        assert!(logged >= BURST * (60_000 / WINDOW_MS), "{logged}");
    }

    #[test]
    fn the_macro_limits_each_call_site_on_its_own() {
        // Compiles and runs: two sites, each with its own static.
        for _ in 0..100 {
            crate::guest_warn!("site a {}", 1);
            crate::guest_warn!("site b");
        }
    }
}

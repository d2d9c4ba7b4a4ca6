//! Rate-limited logging for events a guest can trigger.
//!
//! A hostile guest can hit an error path millions of times a second; every log line it
//! causes goes through `guest_warn!`/`guest_debug!`, which let at most `BURST` lines per
//! call site through in each `WINDOW`, drop the rest and count them. The one rate
//! limiter of the VMM's logs (every device uses these macros).

// The macros serve the devices, which are built on Linux only.
#![cfg_attr(not(target_os = "linux"), allow(unused_macros, unused_imports))]

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lines allowed per call site and window.
pub const BURST: u32 = 10;
/// Length of a rate-limiting window.
pub const WINDOW: Duration = Duration::from_secs(5);

/// The number of the current window since the first use (windows start at 1).
fn current_window() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = BASE.get_or_init(Instant::now);
    base.elapsed().as_secs() / WINDOW.as_secs() + 1
}

/// One call site's budget.
#[derive(Debug)]
pub struct LogLimiter {
    window: AtomicU64,
    count: AtomicU32,
    dropped: AtomicU64,
}

impl LogLimiter {
    /// A fresh budget.
    pub const fn new() -> Self {
        Self {
            window: AtomicU64::new(0),
            count: AtomicU32::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// `Some(dropped)` when one more line may be logged in `window` (`dropped` lines
    /// were suppressed since the last one), `None` otherwise.
    pub fn allow_at(&self, window: u64) -> Option<u64> {
        if self.window.swap(window, Ordering::Relaxed) != window {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.dropped.swap(0, Ordering::Relaxed))
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// [`LogLimiter::allow_at`] the current window.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(current_window())
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing::warn!` with a per-call-site rate limit, for guest-triggered events; the
/// first line let through after a silence carries `suppressed`, the count dropped.
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::logging::LogLimiter = $crate::logging::LogLimiter::new();
        if let Some(suppressed) = LIMITER.allow() {
            tracing::warn!(suppressed, $($arg)+);
        }
    }};
}

/// `tracing::debug!` with a per-call-site rate limit, for guest-triggered events.
macro_rules! guest_debug {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::logging::LogLimiter = $crate::logging::LogLimiter::new();
        if let Some(suppressed) = LIMITER.allow() {
            tracing::debug!(suppressed, $($arg)+);
        }
    }};
}

pub(crate) use guest_debug;
pub(crate) use guest_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_silence_then_the_dropped_count() {
        let limiter = LogLimiter::new();

        let allowed = (0..100).filter(|_| limiter.allow_at(1).is_some()).count();
        let next_window = limiter.allow_at(2);

        assert_eq!(allowed, BURST as usize);
        assert_eq!(next_window, Some(100 - u64::from(BURST)));
    }
}

//! Rate-limited logging for events a guest can trigger.
//!
//! A hostile guest can hit an error path millions of times a second; every log line it
//! causes goes through `guest_warn!`/`guest_debug!`, which let at most `BURST` lines per
//! call site through in each `WINDOW` and drop the rest.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lines allowed per call site and window.
pub const BURST: u32 = 10;
/// Length of a rate-limiting window.
pub const WINDOW: Duration = Duration::from_secs(5);

fn now_window() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = BASE.get_or_init(Instant::now);
    base.elapsed().as_secs() / WINDOW.as_secs()
}

/// One call site's budget.
#[derive(Debug)]
pub struct LogLimiter {
    window: AtomicU64,
    count: AtomicU32,
}

impl LogLimiter {
    /// A fresh budget.
    pub const fn new() -> Self {
        Self {
            window: AtomicU64::new(0),
            count: AtomicU32::new(0),
        }
    }

    /// Whether one more line may be logged now.
    pub fn allow(&self) -> bool {
        let window = now_window();
        if self.window.swap(window, Ordering::Relaxed) != window {
            self.count.store(0, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed) < BURST
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing::warn!` with a per-call-site rate limit, for guest-triggered events.
macro_rules! guest_warn {
    ($($arg:tt)*) => {{
        static LIMITER: $crate::logging::LogLimiter = $crate::logging::LogLimiter::new();
        if LIMITER.allow() {
            tracing::warn!($($arg)*);
        }
    }};
}

/// `tracing::debug!` with a per-call-site rate limit, for guest-triggered events.
macro_rules! guest_debug {
    ($($arg:tt)*) => {{
        static LIMITER: $crate::logging::LogLimiter = $crate::logging::LogLimiter::new();
        if LIMITER.allow() {
            tracing::debug!($($arg)*);
        }
    }};
}

pub(crate) use guest_debug;
pub(crate) use guest_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_allowed_then_lines_are_dropped() {
        let limiter = LogLimiter::new();

        let allowed = (0..1000).filter(|_| limiter.allow()).count();

        assert_eq!(allowed, BURST as usize);
    }
}

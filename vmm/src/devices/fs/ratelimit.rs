//! Rate limiting for log lines the guest can trigger from the fs worker.
//!
//! Each `guest_warn!` call site has its own budget of [`BURST`] lines per [`WINDOW`]; the
//! first allowed line of a new window reports how many were dropped in between.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lines allowed per call site and window.
pub(crate) const BURST: u64 = 10;
/// Length of one window.
pub(crate) const WINDOW: Duration = Duration::from_secs(5);

/// One call site's budget.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    window: AtomicU64,
    count: AtomicU64,
    dropped: AtomicU64,
}

impl LogLimiter {
    pub(crate) const fn new() -> Self {
        Self {
            window: AtomicU64::new(0),
            count: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// `Some(dropped)` when a line may be logged now (`dropped` lines were suppressed since
    /// the last one), `None` otherwise.
    pub(crate) fn allow_at(&self, window: u64) -> Option<u64> {
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

    pub(crate) fn allow(&self) -> Option<u64> {
        self.allow_at(current_window())
    }
}

/// The number of the current window since the first use (windows start at 1).
fn current_window() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = BASE.get_or_init(Instant::now);
    base.elapsed().as_secs() / WINDOW.as_secs() + 1
}

/// `tracing::warn!` with a per-call-site budget, for events the guest can cause.
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::devices::fs::ratelimit::LogLimiter =
            $crate::devices::fs::ratelimit::LogLimiter::new();
        if let Some(suppressed) = LIMITER.allow() {
            tracing::warn!(suppressed, $($arg)+);
        }
    }};
}
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
        assert_eq!(next_window, Some(100 - BURST));
    }
}

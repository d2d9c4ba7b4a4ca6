//! Rate limiting for log lines the guest can trigger.
//!
//! A hostile guest can send millions of malformed packets a second; logging each one would
//! turn the VMM into a disk-filling machine. [`LogLimiter::allow`] lets a few lines through
//! per window and counts the rest, and the next allowed line reports how many were dropped.

use std::time::{Duration, Instant};

/// Lines allowed per window.
const BURST: u32 = 10;
/// Length of one window.
const WINDOW: Duration = Duration::from_secs(5);

/// A token bucket for guest-triggered log lines.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub(crate) const fn new() -> Self {
        Self {
            window_start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether a line may be logged now. `Some(n)`: yes, and `n` lines were suppressed
    /// since the last allowed one. `None`: no.
    pub(crate) fn allow(&mut self, now: Instant) -> Option<u64> {
        let expired = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= WINDOW);
        if expired {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used >= BURST {
            self.suppressed = self.suppressed.saturating_add(1);
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Log a guest-triggered warning through a [`LogLimiter`].
macro_rules! guest_warn {
    ($limiter:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $limiter.allow(std::time::Instant::now()) {
            tracing::warn!(suppressed, $($arg)+);
        }
    };
}
pub(crate) use guest_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_silence_then_report() {
        let mut limiter = LogLimiter::new();
        let t0 = Instant::now();

        let allowed = (0..100).filter(|_| limiter.allow(t0).is_some()).count();
        let later = limiter.allow(t0 + WINDOW);

        assert_eq!(allowed, BURST as usize);
        assert_eq!(later, Some(100 - u64::from(BURST)));
    }
}

//! The most bytes the guest may write into its shares, across every share of the VM
//! (`limits.diskMiB`): each write, file extension and allocation takes from it first, and
//! what a write did not use is given back. Past it the guest gets `ENOSPC`.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// A write budget shared by the shares of one VM.
#[derive(Debug)]
pub struct WriteBudget {
    left: AtomicU64,
}

impl WriteBudget {
    pub fn new(bytes: u64) -> Self {
        Self {
            left: AtomicU64::new(bytes),
        }
    }

    /// Takes `n` bytes, or fails with `ENOSPC` (taking nothing) when fewer are left.
    pub fn take(&self, n: u64) -> io::Result<()> {
        self.left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(n)
            })
            .map(|_| ())
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOSPC))
    }

    /// Returns `n` bytes taken but not used.
    pub fn give_back(&self, n: u64) {
        self.left.fetch_add(n, Ordering::SeqCst);
    }

    /// Bytes left.
    pub fn left(&self) -> u64 {
        self.left.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_until_empty_then_refuses_without_taking() {
        let b = WriteBudget::new(10);
        b.take(4).unwrap();
        b.take(6).unwrap();
        let e = b.take(1).unwrap_err();
        b.give_back(3);
        b.take(3).unwrap();

        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(b.left(), 0);
    }
}

//! Entry points for the fuzz targets in `vmm/fuzz` (feature `fuzzing`, which no build of
//! the VMM turns on): the queue work of the vsock and fs devices, driven by the caller
//! instead of the event loop or the fs worker thread, on the same code paths.

use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::fs::bridge::{self, BridgeError, GuestRam};
use crate::devices::fs::filter::PolicyFs;
use crate::devices::fs::queue_handler::Serving;
use crate::devices::fs::{share, FsError, FsLimits, FsShareConfig, WriteBudget};
use crate::devices::virtio::Interrupt;
use crate::devices::vsock::{Vsock, VsockBackend};

/// Why a [`FsServer`] could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FuzzSetupError {
    #[error("cannot set up the share")]
    Share(#[source] FsError),
    #[error("cannot view guest memory or the queue")]
    Bridge(#[source] BridgeError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// The tx queue work of [`Vsock`] (what a QUEUE_NOTIFY of the tx queue triggers).
pub fn vsock_process_tx<B: VsockBackend>(dev: &mut Vsock<B>) -> bool {
    dev.process_tx()
}

/// The rx queue work of [`Vsock`] (what a backend event or an rx notify triggers).
pub fn vsock_process_rx<B: VsockBackend>(dev: &mut Vsock<B>) -> bool {
    dev.process_rx()
}

/// One fs share served on the caller's thread: the worker's queue loop and request path
/// (`queue_handler`), without the thread, its epoll loop or its credential changes.
#[derive(Debug)]
pub struct FsServer {
    serving: Serving,
}

impl FsServer {
    /// Serve `share` (with `budget` bytes of writes) from the rings of `queues`, set up
    /// in `mem` as a driver would; queue 0 is the high-priority queue.
    pub fn new(
        share: &FsShareConfig,
        budget: u64,
        mem: &GuestMemoryMmap,
        queues: &[virtio_queue::Queue],
    ) -> Result<Self, FuzzSetupError> {
        let prepared = share::prepare(share).map_err(FuzzSetupError::Share)?;
        let fs = PolicyFs::new(prepared, FsLimits::default(), None)
            .map_err(FuzzSetupError::Share)?
            .with_budget(Some(Arc::new(WriteBudget::new(budget))));
        let ram = GuestRam::new(mem).map_err(FuzzSetupError::Bridge)?;
        let mut served = Vec::with_capacity(queues.len());
        for (index, queue) in queues.iter().enumerate() {
            let queue =
                bridge::convert_queue(index, queue, &ram).map_err(FuzzSetupError::Bridge)?;
            served.push((queue, eventfd()?));
        }
        let interrupt = Arc::new(Interrupt::new(
            Arc::new(AtomicU32::new(0)),
            Arc::new(eventfd()?),
        ));
        let serving = Serving::new(
            ram,
            served,
            interrupt,
            Arc::new(fs),
            Arc::new(AtomicBool::new(false)),
            Arc::default(),
        );
        Ok(Self { serving })
    }

    /// Serve what is available on queue `idx` (at most one batch, as the worker does per
    /// wake-up). Returns whether buffers were used.
    pub fn process_queue(&mut self, idx: usize) -> bool {
        self.serving.process_queue(idx)
    }
}

fn eventfd() -> Result<EventFd, FuzzSetupError> {
    EventFd::new(EFD_NONBLOCK).map_err(FuzzSetupError::EventFd)
}

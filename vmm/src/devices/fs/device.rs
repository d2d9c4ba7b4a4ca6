//! The virtio-fs device: features, config space, activation, and the life of its worker.

use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bridge::{self, GuestRam};
use super::creds::{self, RunAs};
use super::filter::{OwnerMap, PolicyFs};
use super::queue_handler::{Rebound, Serving};
use super::share::{self, PreparedShare};
use super::WriteBudget;
use super::{FsError, FsShareConfig, ServerOptions};
use crate::devices::virtio::{ActivateError, ActiveQueue, Interrupt, VirtioDevice};

/// Virtio device ID of a file system device.
pub const FS_DEVICE_TYPE: u32 = 26;
/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Request queues besides the high-priority queue. One: the worker serves requests one at
/// a time anyway.
pub const NUM_REQUEST_QUEUES: u32 = 1;
/// Queues in the order the driver sets them up: high priority (FORGET), then requests.
pub const NUM_QUEUES: usize = 1 + NUM_REQUEST_QUEUES as usize;
/// Bytes of the tag in the config space.
pub const TAG_LEN: usize = 36;
const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];
/// Config space: `tag[36]` then `num_request_queues` (le32).
const CONFIG_LEN: usize = TAG_LEN + 4;

/// VIRTIO_F_VERSION_1: a modern (virtio 1.x) device.
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

#[derive(Debug)]
struct Worker {
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
    /// The worker's report that it opened the share's root and confined itself, until it
    /// is taken ([`Fs::started`]).
    report: Option<Receiver<Result<(), FsError>>>,
    /// Hands the worker its queues at activation (dropped: the worker ends unused).
    serving: Option<SyncSender<Serving>>,
}

/// A virtio-fs device serving one share.
#[derive(Debug)]
pub struct Fs {
    tag: String,
    readonly: bool,
    config: [u8; CONFIG_LEN],
    fs: Arc<PolicyFs>,
    options: ServerOptions,
    acked_features: u64,
    exit_evt: EventFd,
    worker: Option<Worker>,
    activated: bool,
    /// The worker took a request off a queue (see `queue_positions`).
    served: Arc<AtomicBool>,
    /// Each queue's (next_avail, next_used) when the device was activated.
    start_positions: Vec<(u16, u16)>,
    /// A share bound after activation ([`Fs::rebind`]), for the worker to take up before
    /// its first request.
    rebound: Rebound,
}

impl Fs {
    /// A device for `share`, with the default limits and the VMM's own identity.
    pub fn new(share: &FsShareConfig) -> Result<Self, FsError> {
        Self::with_options(share, ServerOptions::default())
    }

    /// A device for `share`: resolves its paths, collects its denied inodes and opens its
    /// root now, so configuration errors surface before the VM boots.
    pub fn with_options(share: &FsShareConfig, options: ServerOptions) -> Result<Self, FsError> {
        Self::with_budget(share, options, None)
    }

    /// [`Fs::with_options`], with a write budget shared with the VM's other shares.
    pub fn with_budget(
        share: &FsShareConfig,
        options: ServerOptions,
        budget: Option<Arc<WriteBudget>>,
    ) -> Result<Self, FsError> {
        Self::start_prepared(share::prepare(share)?, options, budget)?.started()
    }

    /// Wait until the worker has opened the share's root and confined itself.
    pub fn started(mut self) -> Result<Self, FsError> {
        let report = self.worker.as_mut().and_then(|w| w.report.take());
        if let Some(report) = report {
            report.recv().unwrap_or_else(|_| {
                Err(FsError::Worker(io::Error::other(
                    "fs worker ended before it started",
                )))
            })?;
        }
        Ok(self)
    }

    /// [`Fs::with_budget`] of a share already prepared (`share::prepare_with`), without
    /// waiting for the worker: it opens the share's root and confines itself while the
    /// caller goes on (a VM's shares start side by side). The device serves nothing before
    /// that is done; [`Fs::started`] waits for it and reports its failure.
    pub fn start_prepared(
        prepared: PreparedShare,
        options: ServerOptions,
        budget: Option<Arc<WriteBudget>>,
    ) -> Result<Self, FsError> {
        if options.run_as.is_some() {
            // SAFETY: geteuid(2) has no preconditions and cannot fail.
            let uid = unsafe { libc::geteuid() };
            if uid != 0 {
                return Err(FsError::RunAsNeedsRoot(uid));
            }
        }
        let mut config = [0u8; CONFIG_LEN];
        let tag = prepared.tag.clone();
        let readonly = prepared.readonly;
        if let Some(dst) = config.get_mut(..tag.len()) {
            dst.copy_from_slice(tag.as_bytes());
        }
        if let Some(dst) = config.get_mut(TAG_LEN..) {
            dst.copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        }
        // The worker opens the root, on its own thread with its own umask.
        let fs =
            PolicyFs::unimported(prepared, options.limits, owner_map(options))?.with_budget(budget);
        let mut device = Self {
            tag,
            readonly,
            config,
            fs: Arc::new(fs),
            options,
            acked_features: 0,
            exit_evt: EventFd::new(EFD_NONBLOCK).map_err(FsError::EventFd)?,
            worker: None,
            activated: false,
            served: Arc::new(AtomicBool::new(false)),
            start_positions: Vec::new(),
            rebound: Arc::default(),
        };
        // The worker starts now, while the VMM may still start threads, and waits for
        // its queues (see `crate::seccomp::threads`).
        device.worker = Some(device.start_worker().map_err(FsError::Worker)?);
        Ok(device)
    }

    /// Serve `prepared` (with guest owner `guest_owner` and write budget `budget`)
    /// instead of what the device was made with: a slot of a VM restored before its
    /// policy was known gets its share. Only while the guest has sent no request (it has
    /// not mounted the slot), and only a share with this slot's tag.
    pub fn rebind(
        &mut self,
        prepared: PreparedShare,
        guest_owner: Option<u32>,
        budget: Option<Arc<WriteBudget>>,
    ) -> Result<(), FsError> {
        if prepared.tag != self.tag {
            return Err(FsError::RebindTag {
                slot: self.tag.clone(),
                tag: prepared.tag,
            });
        }
        let options = ServerOptions {
            guest_owner,
            ..self.options
        };
        let readonly = prepared.readonly;
        let fs = Arc::new(
            PolicyFs::new(prepared, options.limits, owner_map(options))?.with_budget(budget),
        );
        let mut rebound = self.rebound.lock().unwrap_or_else(|e| e.into_inner());
        if self.served.load(Ordering::SeqCst) {
            return Err(FsError::AlreadyServing(self.tag.clone()));
        }
        *rebound = Some(fs.clone());
        self.fs = fs;
        self.options = options;
        self.readonly = readonly;
        Ok(())
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// `(inodes, open handles)` the guest holds now.
    pub fn usage(&self) -> (usize, usize) {
        (self.fs.inode_count(), self.fs.handle_count())
    }

    /// Whether the worker thread has ended (it only ends on kill, a failure or a panic).
    pub fn worker_finished(&self) -> bool {
        self.worker
            .as_ref()
            .is_some_and(|w| w.thread.as_ref().is_none_or(|t| t.is_finished()))
    }

    pub(crate) fn exit_evt(&self) -> &EventFd {
        &self.exit_evt
    }

    /// Collect the worker thread if it ended.
    pub(crate) fn reap_worker(&mut self) {
        if let Some(worker) = self.worker.as_mut() {
            if worker.thread.as_ref().is_some_and(|t| t.is_finished()) {
                if let Some(thread) = worker.thread.take() {
                    let _ = thread.join();
                }
            }
        }
    }

    /// Stop serving: kill the worker and wait for it (it finishes the request in hand).
    /// The guest's later requests stay unanswered. Dropping the device does this too.
    pub fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.as_mut() {
            // A worker still waiting for its queues ends when this is gone.
            worker.serving = None;
            // If the kill cannot be sent the join would hang: leave the thread detached.
            if worker.kill.write(1).is_ok() {
                if let Some(thread) = worker.thread.take() {
                    let _ = thread.join();
                }
            }
        }
    }

    /// Start the worker; it reports through [`Worker::report`].
    fn start_worker(&self) -> io::Result<Worker> {
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let worker_kill = kill.try_clone()?;
        let exit = self.exit_evt.try_clone()?;
        let run_as = self.options.run_as;
        let root = self.fs.clone();
        let (report_tx, report_rx) = mpsc::sync_channel(1);
        let (serving_tx, serving_rx) = mpsc::sync_channel(1);
        let thread = thread::Builder::new()
            .name(format!("fs-{}", self.tag))
            .spawn(move || {
                let started = start_serving(&root, run_as);
                drop(root);
                worker_main(started, &serving_rx, &worker_kill, &exit, &report_tx);
            })?;
        Ok(Worker {
            kill,
            thread: Some(thread),
            report: Some(report_rx),
            serving: Some(serving_tx),
        })
    }
}

/// The host side of `guest_owner` for a server running with `options`.
fn owner_map(options: ServerOptions) -> Option<OwnerMap> {
    options.guest_owner.map(|guest| {
        let host = match options.run_as {
            Some(r) => (r.uid, r.gid),
            // SAFETY: geteuid(2) and getegid(2) have no preconditions and cannot fail.
            None => unsafe { (libc::geteuid(), libc::getegid()) },
        };
        OwnerMap {
            host,
            guest: (guest, guest),
        }
    })
}

/// The worker's first steps: the share's root opened with the VMM's credentials (as any
/// later-bound share is) and the worker's own umask, then the fewest credentials it can
/// have.
fn start_serving(fs: &PolicyFs, run_as: Option<RunAs>) -> Result<(), FsError> {
    fs.import_root()?;
    creds::drop_credentials(run_as).map_err(FsError::Worker)
}

/// The worker thread: report how its start went, wait for its queues, serve until killed.
fn worker_main(
    started: Result<(), FsError>,
    queues: &Receiver<Serving>,
    kill: &EventFd,
    exit: &EventFd,
    report: &SyncSender<Result<(), FsError>>,
) {
    let ok = started.is_ok();
    // The receiver waits for exactly this message.
    let _ = report.send(started);
    if !ok {
        return;
    }
    // The device was dropped before it was activated: nothing to report.
    let Ok(mut serving) = queues.recv() else {
        return;
    };
    // The thread filters itself when the guest first notifies a queue, before it reads
    // anything the guest wrote (`Serving::run`); without its filter it serves nothing.
    // Installing a filter costs about 3 µs per BPF instruction under kvm_pvm (~1.3 ms
    // for this list), and a VM's workers doing it at once held up the VM's setup until
    // its first vCPU entry; now it happens while the guest mounts its shares.
    let confine = || {
        crate::seccomp::threads::enter(crate::seccomp::threads::ThreadKind::FsWorker)
            .map_err(|e| io::Error::other(format!("the worker cannot filter itself: {e}")))
    };
    match panic::catch_unwind(AssertUnwindSafe(|| serving.run(kill, confine))) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "fs: worker stopped"),
        Err(_) => tracing::error!("fs: worker panicked; the share is no longer served"),
    }
    drop(serving);
    // Tell the event loop; nothing else can be done if this fails.
    let _ = exit.write(1);
}

impl Drop for Fs {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

fn backend_error(e: impl std::fmt::Display) -> ActivateError {
    ActivateError::Backend(io::Error::other(e.to_string()))
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        FS_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        let Some(end) = start.checked_add(data.len()) else {
            return;
        };
        if let Some(src) = self.config.get(start..end) {
            data.copy_from_slice(src);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The config space (tag, queue count) is read-only.
    }

    /// Only before the guest's first request (before it mounted the share): the FUSE
    /// session and the open inodes live in the worker and the host kernel, which a
    /// snapshot cannot hold. Until then every ring is where activation put it.
    fn queue_positions(&self) -> Option<Vec<(u16, u16)>> {
        if self.served.load(Ordering::SeqCst) {
            return None;
        }
        Some(self.start_positions.clone())
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if self.activated {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: queues.len(),
            });
        }
        let ram = GuestRam::new(&mem).map_err(backend_error)?;
        self.start_positions = queues
            .iter()
            .map(|q| {
                use virtio_queue::QueueT as _;
                (q.queue.next_avail(), q.queue.next_used())
            })
            .collect();
        let mut served = Vec::with_capacity(NUM_QUEUES);
        for (index, active) in queues.into_iter().enumerate() {
            let queue = bridge::convert_queue(index, &active.queue, &ram).map_err(backend_error)?;
            served.push((queue, active.notify));
        }
        // One activation per device: a failed start leaves it unusable rather than half up.
        self.activated = true;
        let serving = Serving::new(
            ram,
            served,
            interrupt,
            self.fs.clone(),
            self.served.clone(),
            self.rebound.clone(),
        );
        let handed = self
            .worker
            .as_mut()
            .and_then(|w| w.serving.take())
            .is_some_and(|tx| tx.send(serving).is_ok());
        if !handed {
            return Err(ActivateError::Backend(io::Error::other(
                "the fs worker is gone",
            )));
        }
        Ok(())
    }
}

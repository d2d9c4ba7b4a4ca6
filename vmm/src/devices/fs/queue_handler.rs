//! The worker thread of one fs device: it owns the queues once the device is active, waits
//! on their notify eventfds and on a kill eventfd, and serves one request at a time.
//!
//! The FUSE server runs here rather than in the VMM's shared event loop because host file
//! I/O can block for a long time (an `fsync` of a large file, a slow disk, a network file
//! system), which must not stall the other devices, and because the worker drops its
//! credentials for itself alone (see [`super::creds`]).

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseBuf, Reader, VirtioFsWriter, Writer};
use virtio_queue_017::{DescriptorChain, Queue, QueueT};
use vm_memory_017::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::bridge::{GuestMemory017, GuestRam};
use super::filter::PolicyFs;
use super::protocol::{self, InHeader, OpClass, Verdict, IN_HEADER_LEN, MAX_MESSAGE_LEN};
use crate::devices::virtio::{Interrupt, VIRTIO_MMIO_INT_VRING};
use crate::logging::guest_warn;

/// Chains served per queue per wake-up before the worker looks at its other fds (it
/// re-signals the queue to come back for the rest).
const MAX_CHAINS_PER_EVENT: usize = 64;
/// Events taken from epoll per wait.
const EVENTS_PER_WAIT: usize = 8;

/// What an epoll event stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Kill,
    Queue(usize),
}

impl Token {
    fn to_u64(self) -> u64 {
        match self {
            Token::Kill => 0,
            Token::Queue(i) => 1 + i as u64,
        }
    }

    fn from_u64(v: u64) -> Self {
        match v {
            0 => Token::Kill,
            n => Token::Queue((n - 1) as usize),
        }
    }
}

/// One queue in the worker's hands.
#[derive(Debug)]
struct ServedQueue {
    queue: Queue,
    notify: EventFd,
    /// The driver corrupted the ring; it is left alone for good.
    broken: bool,
}

type Chain<'a> = DescriptorChain<&'a GuestMemory017>;

/// A share waiting for the worker: the worker takes it, under this lock, when it takes its
/// first request, and a rebind is refused, under the same lock, once that happened.
pub(crate) type Rebound = Arc<Mutex<Option<Arc<PolicyFs>>>>;

/// Everything the worker needs to serve a share.
pub(crate) struct Serving {
    ram: GuestRam,
    queues: Vec<ServedQueue>,
    interrupt: Arc<Interrupt>,
    server: Server<Arc<PolicyFs>>,
    fs: Arc<PolicyFs>,
    /// The readable bytes of the request being served (at most [`MAX_MESSAGE_LEN`]).
    copy: Vec<u8>,
    /// Set once a request was taken off a queue (until then a snapshot can hold the
    /// device: its rings are where activation left them).
    served: Arc<AtomicBool>,
    /// A share bound after activation, taken up before the first request.
    rebound: Rebound,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving")
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

impl Serving {
    pub(crate) fn new(
        ram: GuestRam,
        queues: Vec<(Queue, EventFd)>,
        interrupt: Arc<Interrupt>,
        fs: Arc<PolicyFs>,
        served: Arc<AtomicBool>,
        rebound: Rebound,
    ) -> Self {
        Self {
            ram,
            queues: queues
                .into_iter()
                .map(|(queue, notify)| ServedQueue {
                    queue,
                    notify,
                    broken: false,
                })
                .collect(),
            interrupt,
            server: Server::new(fs.clone()),
            fs,
            copy: Vec::new(),
            served,
            rebound,
        }
    }

    /// Serve until `kill` is signalled. `confine` runs once, when a queue is first
    /// notified, before anything of the guest's is read; its failure ends the serving.
    pub(crate) fn run(
        &mut self,
        kill: &EventFd,
        confine: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        let mut confine = Some(confine);
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, Token::Kill.to_u64()),
        )?;
        for (i, q) in self.queues.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                q.notify.as_raw_fd(),
                EpollEvent::new(EventSet::IN, Token::Queue(i).to_u64()),
            )?;
        }
        let mut events = [EpollEvent::default(); EVENTS_PER_WAIT];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for event in events.iter().take(n) {
                match Token::from_u64(event.data()) {
                    Token::Kill => return Ok(()),
                    Token::Queue(i) => {
                        if let Some(confine) = confine.take() {
                            confine()?;
                        }
                        self.drain_notify(i);
                        if self.process_queue(i) {
                            self.signal_used();
                        }
                    }
                }
            }
        }
    }

    fn drain_notify(&self, idx: usize) {
        if let Some(q) = self.queues.get(idx) {
            // Readable, so this does not block even on a blocking eventfd.
            if q.notify.read().is_err() {
                guest_warn!(queue = idx, "fs: cannot read queue eventfd");
            }
        }
    }

    /// Serve the chains available on queue `idx`. Returns whether buffers were used.
    pub(crate) fn process_queue(&mut self, idx: usize) -> bool {
        let mem = self.ram.view();
        let copy = &mut self.copy;
        let Some(sq) = self.queues.get_mut(idx) else {
            return false;
        };
        let mut used = false;
        for _ in 0..MAX_CHAINS_PER_EVENT {
            let Some(chain) = pop_chain(sq, mem) else {
                return used;
            };
            if !self.served.load(Ordering::SeqCst) {
                // The first request: serve the share bound since activation, if any, and
                // from now on refuse a rebind (both under the rebind lock).
                let mut rebound = self.rebound.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(fs) = rebound.take() {
                    self.server = Server::new(fs.clone());
                    self.fs = fs;
                }
                self.served.store(true, Ordering::SeqCst);
            }
            let head = chain.head_index();
            let len = serve_chain(&self.server, &self.fs, mem, chain, copy);
            used |= add_used(sq, mem, head, len);
        }
        // More may be waiting: come back after the other fds had their turn.
        if sq.notify.write(1).is_err() {
            guest_warn!(queue = idx, "fs: cannot re-signal queue");
        }
        used
    }

    pub(crate) fn signal_used(&self) {
        if let Err(e) = self.interrupt.trigger(VIRTIO_MMIO_INT_VRING) {
            guest_warn!(error = %e, "fs: cannot raise interrupt");
        }
    }
}

/// Pop the next chain, unless the driver broke the queue (then leave it alone for good).
fn pop_chain<'a>(sq: &mut ServedQueue, mem: &'a GuestMemory017) -> Option<Chain<'a>> {
    if sq.broken {
        return None;
    }
    // The avail index may run at most one ring ahead of us; otherwise the queue is corrupt.
    match sq.queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) if idx.0.wrapping_sub(sq.queue.next_avail()) <= sq.queue.size() => {}
        _ => {
            guest_warn!("fs: driver corrupted a queue, ignoring it from now on");
            sq.broken = true;
            return None;
        }
    }
    sq.queue.pop_descriptor_chain(mem)
}

/// Return chain `head` to the driver with `len` bytes written. Returns whether it was.
fn add_used(sq: &mut ServedQueue, mem: &GuestMemory017, head: u16, len: u32) -> bool {
    if head >= sq.queue.size() {
        guest_warn!(head, "fs: descriptor head index out of range");
        return false;
    }
    match sq.queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            guest_warn!(error = %e, "fs: cannot add to the used ring");
            false
        }
    }
}

/// One request, read from guest memory once: the descriptors in one walk of the chain, the
/// readable bytes copied into the worker's buffer (the FUSE server parses that copy, never
/// guest memory, so the driver cannot change a request between its check and its use), and
/// the writer over the reply buffers.
struct Request<'m> {
    header: InHeader,
    /// Bytes of the readable part (the copy holds `min(readable, MAX_MESSAGE_LEN)`).
    readable: usize,
    writable: usize,
    writer: VirtioFsWriter<'m>,
}

/// Why a chain gets no reply at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unanswered {
    /// A readable descriptor after a writable one (the virtio spec forbids it).
    Order,
    /// Fewer readable bytes than a request header.
    NoHeader,
    /// A readable buffer outside guest memory.
    Outside,
    /// The writable buffers are outside guest memory, or the driver changed the chain
    /// between the walk and the writer's own.
    Writer,
}

/// Take the request in `chain`: one walk of its descriptors, then a bounded copy of its
/// readable bytes into `copy`.
fn take_request<'m>(
    mem: &'m GuestMemory017,
    chain: Chain<'m>,
    copy: &mut Vec<u8>,
) -> Result<Request<'m>, Unanswered> {
    // The descriptor iterator stops after as many descriptors as the queue has, so this
    // walk, and the vector, are bounded by the queue size.
    let descs: Vec<(GuestAddress, u32, bool)> = chain
        .clone()
        .map(|d| (d.addr(), d.len(), d.is_write_only()))
        .collect();
    let (mut readable, mut writable) = (0usize, 0usize);
    for &(_, len, write) in &descs {
        if write {
            writable = writable.saturating_add(len as usize);
        } else if writable > 0 {
            return Err(Unanswered::Order);
        } else {
            readable = readable.saturating_add(len as usize);
        }
    }
    if readable < IN_HEADER_LEN {
        return Err(Unanswered::NoHeader);
    }
    // An over-long request is refused after its header is read: copy no more than a
    // request may hold.
    let take = readable.min(MAX_MESSAGE_LEN);
    copy.clear();
    for &(addr, len, _) in descs.iter().filter(|d| !d.2) {
        let filled = copy.len();
        let n = (len as usize).min(take - filled);
        // Room is made only for bytes the guest has: a descriptor that claims more than
        // its memory holds is refused before anything is filled for it (the length is
        // the guest's word until then).
        if n > 0 && !mem.check_range(addr, n) {
            return Err(Unanswered::Outside);
        }
        copy.resize(filled + n, 0);
        let dst = copy.get_mut(filled..).ok_or(Unanswered::Outside)?;
        mem.read_slice(dst, addr).map_err(|_| Unanswered::Outside)?;
        if copy.len() == take {
            break;
        }
    }
    let mut raw = [0u8; IN_HEADER_LEN];
    raw.copy_from_slice(copy.get(..IN_HEADER_LEN).ok_or(Unanswered::NoHeader)?);
    // The writer walks the chain for itself; it must find what this walk found, or the
    // driver changed the chain meanwhile.
    let writer = VirtioFsWriter::new(mem, chain).map_err(|_| Unanswered::Writer)?;
    if writer.available_bytes() != writable {
        return Err(Unanswered::Writer);
    }
    Ok(Request {
        header: InHeader::parse(&raw),
        readable,
        writable,
        writer,
    })
}

/// Serve one request chain, with `copy` as the buffer for its readable bytes. Returns the
/// number of bytes written into it.
fn serve_chain(
    server: &Server<Arc<PolicyFs>>,
    fs: &PolicyFs,
    mem: &GuestMemory017,
    chain: Chain<'_>,
    copy: &mut Vec<u8>,
) -> u32 {
    let request = match take_request(mem, chain, copy) {
        Ok(r) => r,
        Err(why) => {
            guest_warn!(?why, "fs: request that cannot be answered, dropping it");
            return 0;
        }
    };
    let Request {
        header: hdr,
        readable,
        writable,
        writer,
    } = request;
    match protocol::check(Some(&hdr), readable, writable) {
        Verdict::Drop => {
            guest_warn!(
                opcode = hdr.opcode,
                readable,
                writable,
                "fs: malformed request without room for a reply, dropping it"
            );
            0
        }
        Verdict::Reply(errno) => {
            if errno != libc::ENOSYS {
                guest_warn!(
                    opcode = hdr.opcode,
                    len = hdr.len,
                    readable,
                    writable,
                    "fs: malformed request"
                );
            }
            reply_error(writer, hdr.unique, errno)
        }
        // The FUSE server answers DESTROY but reports 0 bytes written; answer it here.
        Verdict::Serve if hdr.opcode == protocol::opcode::DESTROY => {
            fs.destroy();
            reply_error(writer, hdr.unique, 0)
        }
        // `check` passed, so the copy holds the whole request.
        Verdict::Serve => serve(
            server,
            copy.get_mut(..readable).unwrap_or_default(),
            writer,
            &hdr,
        ),
    }
}

fn serve(
    server: &Server<Arc<PolicyFs>>,
    request: &mut [u8],
    writer: VirtioFsWriter<'_>,
    hdr: &InHeader,
) -> u32 {
    let wants_reply = protocol::classify(hdr.opcode) == OpClass::Reply;
    // A spare writer over the same buffers, for an error reply after a failure.
    let spare = writer.clone();
    let result = Reader::from_fuse_buffer(FuseBuf::new(request))
        .map_err(|e| e.to_string())
        .and_then(|r| {
            server
                .handle_message(r, Writer::from(writer), None, None)
                .map_err(|e| e.to_string())
        });
    match result {
        Ok(written) => u32::try_from(written).unwrap_or(0),
        Err(e) => {
            guest_warn!(opcode = hdr.opcode, error = %e, "fs: request failed");
            if wants_reply {
                reply_error(spare, hdr.unique, libc::EIO)
            } else {
                0
            }
        }
    }
}

/// Write a header-only reply (`errno` 0: success) through `writer`. Returns the bytes
/// written (0 if there is no room).
fn reply_error(mut writer: VirtioFsWriter<'_>, unique: u64, errno: i32) -> u32 {
    let out = protocol::error_reply(unique, errno);
    match writer.write_all(&out) {
        Ok(()) => out.len() as u32,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        let tokens = [
            Token::Kill,
            Token::Queue(0),
            Token::Queue(1),
            Token::Queue(7),
        ];

        let back = tokens.map(|t| Token::from_u64(t.to_u64()));

        assert_eq!(back, tokens);
    }
}

//! The worker thread of one fs device: it owns the queues once the device is active, waits
//! on their notify eventfds and on a kill eventfd, and serves one request at a time.
//!
//! The FUSE server runs here rather than in the VMM's shared event loop because host file
//! I/O can block for a long time (an `fsync` of a large file, a slow disk, a network file
//! system), which must not stall the other devices, and because the worker drops its
//! credentials for itself alone (see [`super::creds`]).

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use virtio_queue_017::{DescriptorChain, Queue, QueueT};
use vm_memory_017::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::bridge::{GuestMemory017, GuestRam};
use super::filter::PolicyFs;
use super::protocol::{self, InHeader, OpClass, Verdict, IN_HEADER_LEN};
use super::ratelimit::guest_warn;
use crate::devices::virtio::{Interrupt, VIRTIO_MMIO_INT_VRING};

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

/// Everything the worker needs to serve a share.
pub(crate) struct Serving {
    ram: GuestRam,
    queues: Vec<ServedQueue>,
    interrupt: Arc<Interrupt>,
    server: Server<Arc<PolicyFs>>,
    fs: Arc<PolicyFs>,
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
        }
    }

    /// Serve until `kill` is signalled.
    pub(crate) fn run(&mut self, kill: &EventFd) -> io::Result<()> {
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
        let server = &self.server;
        let fs = &*self.fs;
        let Some(sq) = self.queues.get_mut(idx) else {
            return false;
        };
        let mut used = false;
        for _ in 0..MAX_CHAINS_PER_EVENT {
            let Some(chain) = pop_chain(sq, mem) else {
                return used;
            };
            let head = chain.head_index();
            let len = serve_chain(server, fs, mem, chain);
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

/// Byte counts of a chain's two parts, or `None` if a readable descriptor follows a
/// writable one (the virtio spec forbids it, and the FUSE reader and writer would each take
/// their half from both sides of it).
fn chain_lengths(chain: &Chain<'_>) -> Option<(usize, usize)> {
    let (mut readable, mut writable) = (0usize, 0usize);
    for desc in chain.clone() {
        let len = desc.len() as usize;
        if desc.is_write_only() {
            writable = writable.saturating_add(len);
        } else if writable > 0 {
            return None;
        } else {
            readable = readable.saturating_add(len);
        }
    }
    Some((readable, writable))
}

/// The request header, copied from the chain's first readable bytes.
fn read_header(mem: &GuestMemory017, chain: &Chain<'_>) -> Option<InHeader> {
    let mut raw = [0u8; IN_HEADER_LEN];
    let mut filled = 0;
    for desc in chain.clone().readable() {
        let dst = raw.get_mut(filled..)?;
        let n = dst.len().min(desc.len() as usize);
        mem.read_slice(dst.get_mut(..n)?, desc.addr()).ok()?;
        filled += n;
        if filled == IN_HEADER_LEN {
            return Some(InHeader::parse(&raw));
        }
    }
    None
}

/// Serve one request chain. Returns the number of bytes written into it.
fn serve_chain(
    server: &Server<Arc<PolicyFs>>,
    fs: &PolicyFs,
    mem: &GuestMemory017,
    chain: Chain<'_>,
) -> u32 {
    let Some((readable, writable)) = chain_lengths(&chain) else {
        guest_warn!("fs: readable descriptor after a writable one, dropping request");
        return 0;
    };
    let header = if readable >= IN_HEADER_LEN {
        read_header(mem, &chain)
    } else {
        None
    };
    let Some(hdr) = header else {
        guest_warn!(
            readable,
            "fs: request without a readable header, dropping it"
        );
        return 0;
    };
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
            reply_error(mem, chain, hdr.unique, errno)
        }
        // The FUSE server answers DESTROY but reports 0 bytes written; answer it here.
        Verdict::Serve if hdr.opcode == protocol::opcode::DESTROY => {
            fs.destroy();
            reply_error(mem, chain, hdr.unique, 0)
        }
        Verdict::Serve => serve(server, mem, chain, &hdr),
    }
}

fn serve(
    server: &Server<Arc<PolicyFs>>,
    mem: &GuestMemory017,
    chain: Chain<'_>,
    hdr: &InHeader,
) -> u32 {
    let wants_reply = protocol::classify(hdr.opcode) == OpClass::Reply;
    let reader = Reader::from_descriptor_chain(mem, chain.clone());
    let writer = VirtioFsWriter::new(mem, chain.clone());
    let result = match (reader, writer) {
        (Ok(r), Ok(w)) => server
            .handle_message(r, Writer::from(w), None, None)
            .map_err(|e| e.to_string()),
        (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
    };
    match result {
        Ok(written) => u32::try_from(written).unwrap_or(0),
        Err(e) => {
            guest_warn!(opcode = hdr.opcode, error = %e, "fs: request failed");
            if wants_reply {
                reply_error(mem, chain, hdr.unique, libc::EIO)
            } else {
                0
            }
        }
    }
}

/// Write a header-only reply (`errno` 0: success) into `chain`. Returns the bytes written
/// (0 if there is no room).
fn reply_error(mem: &GuestMemory017, chain: Chain<'_>, unique: u64, errno: i32) -> u32 {
    let out = protocol::error_reply(unique, errno);
    let Ok(mut writer) = VirtioFsWriter::new(mem, chain) else {
        return 0;
    };
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

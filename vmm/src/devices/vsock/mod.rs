//! virtio-vsock in userspace, with Firecracker's hybrid-vsock Unix-socket backend.
//!
//! The guest talks AF_VSOCK to the host (CID 2); the VMM carries each stream connection
//! over a Unix socket, so host tools written for Firecracker or Cloud Hypervisor work
//! against us unchanged:
//!
//! - **Host → guest**: connect to the Unix socket at `uds_path`, write `CONNECT <port>\n`;
//!   the device opens a connection to the guest's vsock port `<port>`. When the guest
//!   accepts, the host reads `OK <host_port>\n` and the socket carries raw bytes both
//!   ways. When the guest refuses (RST), or does not answer in time, the socket is closed.
//! - **Guest → host**: a guest connection to CID 2 port `P` becomes a Unix connection to
//!   the listener at `<uds_path>_P` (e.g. `/run/vm.sock_1080`); with no listener there the
//!   guest gets a RST.
//!
//! # Layout
//! - [`device`]: the virtio device (features, config space, activation) and the queue work.
//! - [`packet`]: the packet header and the tx/rx descriptor-chain parser and writer.
//! - [`csm`]: the per-connection state machine and credit-based flow control.
//! - [`unix`]: the hybrid backend (listener, `CONNECT` handshake, `<uds>_P` connections).
//! - `event_handler`: the `event-manager` glue.
//!
//! The device speaks to its backend only through [`VsockBackend`], so a test double (or
//! another transport) can replace the Unix sockets.
//!
//! # Wiring it into the VMM
//! 1. Create it before boot: `let vsock = Arc::new(Mutex::new(Vsock::new(cid, &path)?))`.
//!    This binds the Unix listener at `path` (it must not exist yet; it is removed again
//!    when the device is dropped). `cid` is the guest's CID, at least 3.
//!    [`Vsock::with_config`] takes [`UnixBackendConfig`] limits and timeouts instead of the
//!    defaults (256 connections, 64 pending handshakes, 64 KiB per connection, 5 s to send
//!    `CONNECT`, 5 s for the guest to accept).
//! 2. Put it behind a virtio-mmio transport as a [`VirtioDevice`]: device type 19, three
//!    queues (rx, tx, event) of at most [`QUEUE_SIZE`] entries, 8 bytes of config space
//!    (the CID), and announce it on the kernel command line.
//! 3. Register the same object with the device thread's event loop:
//!    `event_manager.add_subscriber(vsock.clone())`. This can happen before activation:
//!    `init` then watches only an internal activation `EventFd`.
//! 4. When the driver sets DRIVER_OK, the transport calls
//!    [`VirtioDevice::activate`]`(mem, interrupt, queues)` with the queues in the order
//!    rx, tx, event; each [`ActiveQueue::notify`] is the `EventFd` the transport signals
//!    on a QUEUE_NOTIFY write for that queue (or wires up as a KVM ioeventfd). `activate`
//!    signals the activation `EventFd`; on the next loop iteration the device adds the
//!    three notify fds and its backend's fd (one epoll fd covering the listener, every
//!    Unix connection and a timer) to the loop, and from then on raises
//!    `VIRTIO_MMIO_INT_VRING` through the [`Interrupt`] whenever it used a buffer.
//! 5. Drive the loop (`event_manager.run()`) on one thread. The device never blocks it.
//!
//! Device reset is not supported ([`VirtioDevice::reset`] returns `false`).
//!
//! [`VirtioDevice`]: crate::devices::virtio::VirtioDevice
//! [`VirtioDevice::activate`]: crate::devices::virtio::VirtioDevice::activate
//! [`VirtioDevice::reset`]: crate::devices::virtio::VirtioDevice::reset
//! [`ActiveQueue::notify`]: crate::devices::virtio::ActiveQueue::notify
//! [`Interrupt`]: crate::devices::virtio::Interrupt

pub mod csm;
pub mod device;
mod event_handler;
pub mod packet;
pub mod unix;

#[cfg(test)]
mod tests;

use std::os::fd::AsRawFd;
use std::path::PathBuf;

pub use device::{Vsock, QUEUE_SIZE, VSOCK_DEVICE_TYPE};
pub use packet::PacketHeader;
pub use unix::{UnixBackend, UnixBackendConfig};

/// Errors creating a vsock device or its backend.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest cid {0} is reserved or out of range (use 3 to 4294967294)")]
    InvalidCid(u64),
    #[error("cannot listen on vsock socket {}", .path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the vsock listener")]
    Listener(#[source] std::io::Error),
    #[error("cannot create the vsock backend's epoll instance")]
    Epoll(#[source] std::io::Error),
    #[error("cannot create the vsock backend's timer")]
    Timer(#[source] std::io::Error),
    #[error("cannot create the vsock activation eventfd")]
    EventFd(#[source] std::io::Error),
}

/// The host end of the device: where guest packets go and host packets come from.
///
/// The backend owns all connection state. The device hands it packets whose header passed
/// [`packet::check_tx_header`], and asks it for packets whenever the guest has rx buffers
/// and [`VsockBackend::has_pending_rx`] says there is something to send. Its fd
/// ([`AsRawFd`]) is watched for readability by the event loop, which then calls
/// [`VsockBackend::process_events`]. No method may block.
pub trait VsockBackend: AsRawFd + Send {
    /// A validated packet from the guest. For RW, `data` holds its `hdr.len` payload
    /// bytes; otherwise it is empty.
    fn send_pkt(&mut self, hdr: &PacketHeader, data: &[u8]);

    /// The guest sent a malformed packet for the connection `hdr` addresses (cids already
    /// checked): reset that connection and answer with a RST (unless `hdr` is a RST).
    fn reset_peer(&mut self, hdr: &PacketHeader);

    /// The next packet for the guest, its payload (RW only) written to the front of
    /// `buf`, `hdr.len` bytes long and never longer than `buf`. `None`: nothing now.
    fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<PacketHeader>;

    /// Whether [`VsockBackend::recv_pkt`] would (probably) produce a packet.
    fn has_pending_rx(&self) -> bool;

    /// The backend's fd is readable: handle whatever is ready, without blocking.
    fn process_events(&mut self);

    /// No connection open or being set up and nothing queued for the guest: the device
    /// can be snapshotted (a restored VM starts with a fresh backend). `false` unless a
    /// backend knows better.
    fn is_idle(&self) -> bool {
        false
    }
}

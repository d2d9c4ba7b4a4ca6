//! The host <-> guest-agent wire protocol of mxc-vm.
//!
//! # Frames
//!
//! Every message travels in one frame:
//!
//! ```text
//! +-------------------+---------+------------------+-----------------+
//! | length: u32 BE    | kind u8 | stream id u32 BE | payload         |
//! +-------------------+---------+------------------+-----------------+
//!   counts every byte after itself (5 + payload length)
//! ```
//!
//! A whole frame, length prefix included, is at most `max_frame` bytes
//! ([`DEFAULT_MAX_FRAME`] = 1 MiB unless both sides agree on less in the handshake).
//! Kinds: [`FrameKind::Control`] carries one JSON [`Control`] message (stream id 0),
//! [`FrameKind::Stdin`], [`FrameKind::Stdout`] and [`FrameKind::Stderr`] carry raw bytes
//! of the exec whose id is the stream id.
//!
//! # Handshake
//!
//! On every new connection the agent speaks first with [`Control::Ready`] (its protocol
//! version and its maximum frame); the host answers [`Control::Hello`] with the version
//! and the negotiated maximum (the smaller of the two). A version mismatch is answered
//! with [`Control::Error`] and the connection is closed.
//!
//! # Messages (JSON in control frames, tagged by `"type"`)
//!
//! | direction | message | meaning |
//! |---|---|---|
//! | agent → host | `{"type":"ready","version":1,"agent_version":"0.1.0","max_frame":1048576}` | first frame of every connection |
//! | host → agent | `{"type":"hello","version":1,"max_frame":1048576}` | handshake answer (negotiated maximum) |
//! | host → agent | `{"type":"exec","id":1,"argv":["sh","-c","echo hi"],"env":{"PATH":"/bin"},"cwd":"/","stdin":false,"timeout_ms":5000,"rlimits":{"nofile":1024},"pty":false}` | start a process; its data frames use stream id 1 |
//! | host → agent | stdin data frame (kind 2, stream = exec id) | bytes for the process |
//! | agent → host | `{"type":"stdin_credit","id":1,"bytes":65536}` | stdin window credit |
//! | host → agent | `{"type":"stdin_close","id":1}` | end of stdin |
//! | host → agent | `{"type":"signal","id":1,"signo":15}` | signal the process group |
//! | agent → host | stdout/stderr data frames (kinds 3/4, ≤ 64 KiB each) | output as it is produced |
//! | agent → host | `{"type":"exit","id":1,"code":0,"timed_out":false,"duration_ms":12}` (or `"signal":9`) | the exec is over; after all its output |
//! | either | `{"type":"error","id":1,"message":"..."}` | with `id`: that exec failed to start or was refused |
//! | host → agent | `{"type":"shutdown"}` | power off the guest |
//! | either | `{"type":"ping"}` / `{"type":"pong"}` | liveness |
//!
//! # Flow control
//!
//! Output: the agent reads a child's stdout/stderr only while its outgoing buffer for
//! the connection is small, so a host that stops reading stops the child (its pipe
//! fills). Stdin: credit-based, see [`STDIN_WINDOW`].
//!
//! # Decoding untrusted input
//!
//! [`FrameReader`] (blocking, over any [`std::io::Read`]) and [`Decoder`] (incremental,
//! for event loops) check the length against the maximum before allocating, reject
//! unknown kinds, and report truncated input; nothing they are fed can make them panic
//! or allocate more than the maximum frame for one payload.

pub mod client;
mod error;
mod frame;
mod message;
pub mod mounts;

pub use error::ProtoError;
pub use frame::{
    encode_control, encode_frame, Decoder, Frame, FrameKind, FrameReader, FrameWriter, Frames,
    FRAME_HEADER_LEN, LENGTH_PREFIX_LEN,
};
pub use message::{
    negotiate_max_frame, Control, Exec, Exit, ExitStatus, Rlimits, MAX_EXEC_ENTROPY,
};

/// The protocol version both sides must agree on.
pub const PROTOCOL_VERSION: u32 = 1;

/// The vsock port the guest agent listens on (override with `mxc.port=` on the guest
/// kernel command line).
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// The unprivileged uid and gid (`nobody`, `nogroup`) the agent runs commands as unless
/// an exec asks for root.
pub const GUEST_USER: u32 = 65534;

/// The vsock port of the host-side network policy proxy (issue 4).
pub const PROXY_VSOCK_PORT: u32 = 1080;

/// The vsock context id of the host.
pub const HOST_CID: u32 = 2;

/// The vsock context id the VMM gives the guest.
pub const GUEST_CID: u32 = 3;

/// The guest image's own directory: no share may cover it (the host refuses such a
/// path), so what the image keeps there is always the image's.
pub const GUEST_PRIVATE_DIR: &str = "/.mxc";

/// Where the guest image holds busybox (under [`GUEST_PRIVATE_DIR`]).
pub const BUSYBOX_PATH: &str = "/.mxc/bin/busybox";

/// The guest image's list of busybox applets, one name per line (under
/// [`GUEST_PRIVATE_DIR`]): the agent runs a command named by one of them through busybox
/// when no `PATH` entry has it (the image holds only a few applet links).
pub const APPLET_LIST_PATH: &str = "/.mxc/applets";

/// Guest-physical address of the boot-timer MMIO register; the agent writes one stage
/// byte to it.
pub const BOOT_TIMER_ADDR: u64 = 0xD000_0000;

/// Boot-timer stage: the agent started (first thing it does as PID 1).
pub const STAGE_AGENT_START: u8 = 1;

/// Boot-timer stage: the agent listens and will answer connections.
pub const STAGE_AGENT_READY: u8 = 2;

/// Default and largest maximum frame size (whole frame, length prefix included).
pub const DEFAULT_MAX_FRAME: u32 = 1 << 20;

/// Smallest maximum frame size a peer may ask for.
pub const MIN_MAX_FRAME: u32 = 16 << 10;

/// Largest payload of one stdin/stdout/stderr data frame either side sends.
pub const DATA_CHUNK: usize = 64 << 10;

/// Stdin flow control: the host may have at most this many stdin bytes of one exec
/// that the agent has not yet credited back ([`Control::StdinCredit`]). Each exec starts
/// with the full window. The agent refuses a connection that overruns it; in return it
/// never has to stop reading the connection for stdin's sake, so `Signal` and other
/// control messages get through even while a process ignores its stdin.
pub const STDIN_WINDOW: usize = 256 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_s_own_files_lie_in_its_private_directory() {
        let inside = |path: &str| {
            path.strip_prefix(GUEST_PRIVATE_DIR)
                .is_some_and(|rest| rest.starts_with('/'))
        };

        assert!(inside(BUSYBOX_PATH), "{BUSYBOX_PATH}");
        assert!(inside(APPLET_LIST_PATH), "{APPLET_LIST_PATH}");
    }
}

//! The VMM's control socket: what the host asks of a VM that is already running.
//!
//! One request so far: bind the VM's share slots to the shares of a policy chosen after
//! the VM started. A warm pool restores VMs from the ready snapshot before anyone knows
//! which policy each will serve; when one is handed out, the host binds its slots here
//! and then tells the guest agent to mount them (`Control::Setup`). A slot can be bound
//! only while the guest has never used it (see [`crate::devices::fs::Fs::rebind`]), and
//! the shares of a VM are bound once.
//!
//! The socket is a Unix stream socket at [`crate::VmConfig::control_socket`], in the
//! caller's private runtime directory. A client sends one JSON line and reads one JSON
//! line back; requests are served one at a time on the socket's own thread.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::devices::fs::{self, Fs, FsError, FsShareConfig, WriteBudget};

/// The longest request line the VMM reads.
const MAX_REQUEST: u64 = 1 << 20;
/// The longest reply line a client reads.
const MAX_REPLY: u64 = 64 << 10;
/// How long either side waits for the other's line.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A request to the VMM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Serve `shares[i]` in share slot i (its tag must be the slot's, `mxcfs<i>`); the
    /// other slots keep serving their empty placeholder.
    BindShares {
        shares: Vec<FsShareConfig>,
        /// The uid the guest's commands run as (files the server owns are shown as
        /// theirs); `None`: as on the host.
        #[serde(default)]
        guest_owner: Option<u32>,
        /// The most bytes the guest may write into all shares together.
        #[serde(default)]
        write_limit: Option<u64>,
    },
}

/// The VMM's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlReply {
    Done,
    Failed { message: String },
}

/// Errors of the control socket, on either side.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on the control socket {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the VMM's control socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM's control socket {} failed mid-request", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM answered something unreadable: {0}")]
    BadReply(String),
    #[error("the VMM refused: {0}")]
    Refused(String),
    #[error("this VM has no share slots")]
    NoSlots,
    #[error("{shares} shares do not fit in this VM's {slots} share slots")]
    TooManyShares { shares: usize, slots: usize },
    #[error("share {index} must have tag {expected:?}, the tag of its slot")]
    SlotTag { index: usize, expected: String },
    #[error("the shares of this VM are bound already")]
    AlreadyBound,
    #[error("cannot bind the shares")]
    Share(#[from] FsError),
}

/// The share slots of a running VM and what binding them needs.
#[derive(Debug)]
pub(crate) struct ShareSlots {
    /// The fs devices, by slot.
    pub slots: Vec<Arc<Mutex<Fs>>>,
    /// Set by the first bind, whatever its outcome.
    pub bound: bool,
}

impl ShareSlots {
    /// Bind `shares` into the first slots. Every share is checked and opened before any
    /// slot changes; a refusal by a slot the guest already used leaves the VM's shares
    /// half bound, and the caller must discard the VM (no second bind is accepted).
    fn bind(
        &mut self,
        shares: &[FsShareConfig],
        guest_owner: Option<u32>,
        write_limit: Option<u64>,
    ) -> Result<(), ControlError> {
        if self.bound {
            return Err(ControlError::AlreadyBound);
        }
        if self.slots.is_empty() {
            return Err(ControlError::NoSlots);
        }
        if shares.len() > self.slots.len() {
            return Err(ControlError::TooManyShares {
                shares: shares.len(),
                slots: self.slots.len(),
            });
        }
        for (index, share) in shares.iter().enumerate() {
            let expected = fs::share_tag(index);
            if share.tag != expected {
                return Err(ControlError::SlotTag { index, expected });
            }
        }
        fs::validate_shares(shares)?;
        // The servers keep the limits their slots were made with. One read of the host's
        // mount table for all the shares, as at a VM's start.
        let mountinfo = fs::share::read_mountinfo()?;
        let prepared = shares
            .iter()
            .map(|share| fs::share::prepare_with(share, &mountinfo))
            .collect::<Result<Vec<_>, _>>()?;
        self.bound = true;
        let budget = write_limit.map(|bytes| Arc::new(WriteBudget::new(bytes)));
        for (slot, share) in self.slots.iter().zip(prepared) {
            slot.lock().unwrap_or_else(|e| e.into_inner()).rebind(
                share,
                guest_owner,
                budget.clone(),
            )?;
        }
        Ok(())
    }
}

/// Listen at `path` (a stale socket file there is replaced).
pub(crate) fn listen(path: &Path) -> Result<UnixListener, ControlError> {
    let listen_error = |source| ControlError::Listen {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(listen_error(e)),
        _ => {}
    }
    UnixListener::bind(path).map_err(listen_error)
}

/// Serve `listener` on a thread of its own, for as long as the process lives.
pub(crate) fn serve(listener: UnixListener, slots: ShareSlots) -> std::io::Result<()> {
    let mut slots = slots;
    std::thread::Builder::new()
        .name("mxc-control".into())
        .spawn(move || {
            use crate::seccomp::threads::{enter, ThreadKind};
            if let Err(e) = enter(ThreadKind::Control) {
                // No requests are served: a host's bind fails and it discards the VM.
                tracing::error!(error = %e, "control: not serving");
                return;
            }
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(e) = answer(stream, &mut slots) {
                            tracing::warn!(error = %e, "control: request not answered");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "control: accept failed"),
                }
            }
        })
        .map(drop)
}

/// Read one request from `stream`, carry it out, write the reply.
fn answer(stream: UnixStream, slots: &mut ShareSlots) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = Vec::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_until(b'\n', &mut line)?;
    let reply = match serde_json::from_slice::<ControlRequest>(&line) {
        Err(e) => ControlReply::Failed {
            message: format!("bad request: {e}"),
        },
        Ok(ControlRequest::BindShares {
            shares,
            guest_owner,
            write_limit,
        }) => match slots.bind(&shares, guest_owner, write_limit) {
            Ok(()) => ControlReply::Done,
            Err(e) => ControlReply::Failed { message: chain(&e) },
        },
    };
    let mut text = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    text.push(b'\n');
    (&stream).write_all(&text)
}

/// `error` and its causes, joined by ": ".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

/// Send `request` to the VMM listening at `path` and wait for its answer.
pub fn request(path: &Path, request: &ControlRequest) -> Result<(), ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    let mut text =
        serde_json::to_vec(request).map_err(|e| ControlError::BadReply(e.to_string()))?;
    text.push(b'\n');
    (&stream).write_all(&text).map_err(io)?;
    let mut line = Vec::new();
    BufReader::new((&stream).take(MAX_REPLY))
        .read_until(b'\n', &mut line)
        .map_err(io)?;
    match serde_json::from_slice(&line) {
        Ok(ControlReply::Done) => Ok(()),
        Ok(ControlReply::Failed { message }) => Err(ControlError::Refused(message)),
        Err(e) => Err(ControlError::BadReply(e.to_string())),
    }
}

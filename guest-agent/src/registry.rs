//! The event loop's epoll registry: which descriptor each token stands for. Below
//! `server`, `conn` and `exec`, which all hold [`Watched`] descriptors.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::log;
use crate::sys::Epoll;

/// What an epoll token stands for. Connections are numbered by the server; execs by
/// the host-chosen id, unique within their connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The listening socket.
    Listener,
    /// The signalfd.
    Signals,
    /// A connection socket.
    Conn(u32),
    /// An exec's stdin write end.
    Stdin(u32, u32),
    /// An exec's stdout read end.
    Stdout(u32, u32),
    /// An exec's stderr read end.
    Stderr(u32, u32),
    /// An exec's setup-report read end.
    Report(u32, u32),
    /// The network proxy forwarder (its own epoll instance).
    Forwarder,
}

/// A descriptor known to the [`Registry`], with the events it is watched for.
#[derive(Debug)]
pub struct Watched {
    fd: OwnedFd,
    token: u64,
    interest: u32,
}

impl AsRawFd for Watched {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The epoll instance and what each token means.
#[derive(Debug)]
pub struct Registry {
    epoll: Epoll,
    sources: HashMap<u64, Source>,
    next: u64,
}

impl Registry {
    /// A new, empty registry.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            epoll: Epoll::new()?,
            sources: HashMap::new(),
            next: 1,
        })
    }

    /// Takes ownership of `fd`; it is watched once [`Registry::set_interest`] asks.
    pub fn watch(&mut self, fd: OwnedFd, source: Source) -> Watched {
        let token = self.next;
        self.next += 1;
        self.sources.insert(token, source);
        Watched {
            fd,
            token,
            interest: 0,
        }
    }

    /// Watches `w` for `interest` (0: not at all).
    pub fn set_interest(&self, w: &mut Watched, interest: u32) {
        if w.interest == interest {
            return;
        }
        let fd = w.fd.as_raw_fd();
        let result = match (w.interest, interest) {
            (0, new) => self.epoll.add(fd, w.token, new),
            (_, 0) => self.epoll.delete(fd),
            (_, new) => self.epoll.modify(fd, w.token, new),
        };
        match result {
            Ok(()) => w.interest = interest,
            Err(e) => log!("epoll update failed: {e}"),
        }
    }

    /// Stops watching `w` and closes it.
    pub fn unwatch(&mut self, mut w: Watched) {
        self.set_interest(&mut w, 0);
        self.sources.remove(&w.token);
    }

    /// Waits up to `timeout_ms` (-1: forever) for events: `(token, events)` pairs.
    pub fn wait(&self, events: &mut Vec<(u64, u32)>, timeout_ms: i32) -> io::Result<()> {
        self.epoll.wait(events, timeout_ms)
    }

    pub(crate) fn source(&self, token: u64) -> Option<Source> {
        self.sources.get(&token).copied()
    }
}

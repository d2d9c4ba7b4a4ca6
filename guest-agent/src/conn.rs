//! One host connection: the handshake, the control messages, the outgoing buffer.
//!
//! A connection starts with our `Ready`; the host must answer `Hello` before anything
//! else. After that it may run several execs at once (each under its own id), send
//! stdin, signals and pings, and ask for a shutdown. A framing error is answered with
//! `Error` and ends the connection (there are no frame boundaries left to trust); a
//! well-framed but bad message is answered with `Error` and the connection goes on.

use std::collections::BTreeMap;
use std::io;

use proto::{
    encode_control, encode_frame, negotiate_max_frame, Control, Decoder, Exec, Frame, FrameKind,
    FRAME_HEADER_LEN, PROTOCOL_VERSION, STDIN_WINDOW,
};

use crate::exec::{Running, StdinAccept};
use crate::registry::Watched;
use crate::sys;

/// Above this many queued outgoing bytes the agent stops reading child output.
pub const OUT_HIGH_WATER: usize = 256 << 10;

/// Above this many queued outgoing bytes the agent stops reading the connection too
/// (a host that sends pings but never reads cannot make us buffer without bound).
pub const OUT_HARD_LIMIT: usize = 2 << 20;

/// Execs one connection may run at once.
pub const MAX_EXECS_PER_CONN: usize = 32;

/// Where the handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// `Ready` sent, waiting for the host's `Hello`.
    AwaitHello,
    /// Handshake done.
    Open,
}

/// Work a message asks of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start this exec (already validated, id free).
    Spawn(Box<Exec>),
    /// Power off (or, outside a VM, exit).
    Shutdown,
    /// Create links and mount shares (`Control::Setup`, encoded as on the command line).
    Setup { links: String, mounts: String },
}

/// One host connection.
#[derive(Debug)]
pub struct Conn {
    /// The socket (non-blocking).
    pub sock: Watched,
    decoder: Decoder,
    out: Vec<u8>,
    out_start: usize,
    phase: Phase,
    max_frame: u32,
    /// Running execs by id.
    pub execs: BTreeMap<u32, Running>,
    /// A fatal error happened: flush what we can, then close.
    pub closing: bool,
    /// The host closed its end, or the socket failed.
    pub peer_closed: bool,
    /// The host asked for a shutdown on this connection.
    pub shutdown_requested: bool,
}

impl Conn {
    /// A new connection; queues our `Ready`.
    pub fn new(sock: Watched, max_frame: u32, agent_version: &str) -> Self {
        let mut conn = Self {
            sock,
            decoder: Decoder::new(max_frame),
            out: Vec::new(),
            out_start: 0,
            phase: Phase::AwaitHello,
            max_frame,
            execs: BTreeMap::new(),
            closing: false,
            peer_closed: false,
            shutdown_requested: false,
        };
        conn.queue(&Control::Ready {
            version: PROTOCOL_VERSION,
            agent_version: agent_version.to_owned(),
            max_frame,
        });
        conn
    }

    /// The handshake phase.
    #[cfg(test)]
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The maximum frame in force.
    #[cfg(test)]
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// The largest data payload one frame may carry now.
    pub fn max_payload(&self) -> usize {
        (self.max_frame as usize).saturating_sub(FRAME_HEADER_LEN)
    }

    /// Queues a control message.
    pub fn queue(&mut self, msg: &Control) {
        if encode_control(&mut self.out, msg, self.max_frame).is_err() {
            // Only an `Error` with a huge message can be too large; send a short one.
            let short = Control::error(None, "message too large for the frame limit");
            let _ = encode_control(&mut self.out, &short, self.max_frame);
        }
    }

    /// Queues a data frame (`data` is at most [`Conn::max_payload`] bytes).
    pub fn queue_data(&mut self, kind: FrameKind, stream: u32, data: &[u8]) {
        let _ = encode_frame(&mut self.out, kind, stream, data, self.max_frame);
    }

    /// Queued outgoing bytes.
    pub fn out_len(&self) -> usize {
        self.out.len() - self.out_start
    }

    /// The queued bytes.
    #[cfg(test)]
    pub fn pending_out(&self) -> &[u8] {
        &self.out[self.out_start..]
    }

    /// Writes what the socket takes now; an error means the connection is dead.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.out_len() > 0 {
            match sys::write(&self.sock, &self.out[self.out_start..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_start += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.out_start == self.out.len() {
            self.out.clear();
            self.out_start = 0;
        } else if self.out_start > OUT_HIGH_WATER {
            self.out.drain(..self.out_start);
            self.out_start = 0;
        }
        Ok(())
    }

    /// Whether we want to read from the host now: not while replies it does not read
    /// pile up. (Stdin is bounded by its credit window instead, so a process that
    /// ignores its stdin never stops control messages.)
    pub fn wants_read(&self) -> bool {
        !self.closing && !self.peer_closed && self.out_len() < OUT_HARD_LIMIT
    }

    /// Reads once from the socket into the decoder; take the work with
    /// [`Conn::next_action`].
    pub fn on_readable(&mut self, scratch: &mut [u8]) {
        match sys::read(&self.sock, scratch) {
            Ok(0) => self.peer_closed = true,
            Ok(n) => self.decoder.push(&scratch[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => self.peer_closed = true,
        }
    }

    /// Handles buffered frames until one asks the server for work, and returns that
    /// work; `None` when no complete frame is left. The server must carry out each
    /// action before asking again, so that frames after an `Exec` (its stdin, a
    /// `StdinClose`, a `Signal`) find the exec running.
    pub fn next_action(&mut self) -> Option<Action> {
        while !self.closing {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => {
                    if let Some(action) = self.handle_frame(frame) {
                        return Some(action);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.queue(&Control::error(None, crate::error_chain(&e)));
                    self.closing = true;
                }
            }
        }
        None
    }

    /// Feeds bytes and collects the actions (tests only: nothing is carried out
    /// between frames here).
    #[cfg(test)]
    pub fn on_bytes(&mut self, bytes: &[u8]) -> Vec<Action> {
        self.decoder.push(bytes);
        std::iter::from_fn(|| self.next_action()).collect()
    }

    /// Handles one frame from the host.
    pub fn handle_frame(&mut self, frame: Frame) -> Option<Action> {
        if self.phase == Phase::AwaitHello {
            return self.handle_hello(&frame);
        }
        match frame.kind {
            FrameKind::Control => match frame.to_control() {
                Ok(msg) => self.handle_control(msg),
                Err(e) => {
                    self.queue(&Control::error(None, crate::error_chain(&e)));
                    None
                }
            },
            FrameKind::Stdin => {
                // Stdin for an exec that has ended (or never was) is dropped: the host's
                // stdin pump cannot know exactly when the process exits.
                let id = frame.stream;
                let outcome = self
                    .execs
                    .get_mut(&id)
                    .map(|e| e.accept_stdin(&frame.payload));
                match outcome {
                    Some(StdinAccept::Discarded(n)) if n > 0 => {
                        self.queue(&Control::StdinCredit {
                            id,
                            bytes: n as u64,
                        });
                    }
                    Some(StdinAccept::Overrun) => {
                        self.queue(&Control::error(
                            None,
                            format!("exec {id} overran its stdin window of {STDIN_WINDOW} bytes"),
                        ));
                        self.closing = true;
                    }
                    _ => {}
                }
                None
            }
            kind => {
                self.queue(&Control::error(
                    None,
                    format!("the host must not send {} frames", kind.name()),
                ));
                None
            }
        }
    }

    fn handle_hello(&mut self, frame: &Frame) -> Option<Action> {
        let result = match frame.to_control() {
            Ok(Control::Hello { version, max_frame }) => {
                negotiate_max_frame(self.max_frame, version, max_frame).map_err(|e| e.to_string())
            }
            Ok(other) => Err(format!("expected hello, got {} message", other.type_name())),
            Err(e) => Err(crate::error_chain(&e)),
        };
        match result {
            Ok(max) => {
                self.max_frame = max;
                self.decoder.set_max_frame(max);
                self.phase = Phase::Open;
            }
            Err(message) => {
                self.queue(&Control::error(None, message));
                self.closing = true;
            }
        }
        None
    }

    fn handle_control(&mut self, msg: Control) -> Option<Action> {
        match msg {
            Control::Exec(exec) => self.check_exec(exec).map(|e| Action::Spawn(Box::new(e))),
            Control::StdinClose { id } => {
                if let Some(exec) = self.execs.get_mut(&id) {
                    exec.request_stdin_close();
                }
                None
            }
            Control::Signal { id, signo } => {
                if !(1..=64).contains(&signo) {
                    self.queue(&Control::error(Some(id), format!("invalid signal {signo}")));
                } else if let Some(exec) = self.execs.get(&id) {
                    exec.signal(signo);
                }
                None
            }
            Control::Shutdown => {
                self.shutdown_requested = true;
                Some(Action::Shutdown)
            }
            Control::Ping => {
                self.queue(&Control::Pong);
                None
            }
            Control::Setup { links, mounts } => Some(Action::Setup { links, mounts }),
            // The host's own error report (e.g. before it hangs up): nothing to answer.
            Control::Error { .. } => None,
            other => {
                self.queue(&Control::error(
                    None,
                    format!("unexpected {} message", other.type_name()),
                ));
                None
            }
        }
    }

    fn check_exec(&mut self, exec: Exec) -> Option<Exec> {
        let id = exec.id;
        let refusal = if let Err(e) = exec.validate() {
            Some(e.to_string())
        } else if self.execs.contains_key(&id) {
            Some(format!("exec id {id} is already running"))
        } else if self.execs.len() >= MAX_EXECS_PER_CONN {
            Some(format!(
                "too many execs on this connection (at most {MAX_EXECS_PER_CONN})"
            ))
        } else {
            None
        };
        match refusal {
            Some(message) => {
                self.queue(&Control::error(Some(id), message));
                None
            }
            None => Some(exec),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Registry, Source};
    use proto::{FrameReader, DEFAULT_MAX_FRAME};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;

    fn conn() -> (Conn, Registry) {
        let mut reg = Registry::new().unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        let sock = reg.watch(OwnedFd::from(a), Source::Conn(1));
        (Conn::new(sock, DEFAULT_MAX_FRAME, "test"), reg)
    }

    fn control(msg: &Control) -> Vec<u8> {
        let mut out = Vec::new();
        encode_control(&mut out, msg, DEFAULT_MAX_FRAME).unwrap();
        out
    }

    fn hello() -> Vec<u8> {
        control(&Control::Hello {
            version: PROTOCOL_VERSION,
            max_frame: DEFAULT_MAX_FRAME,
        })
    }

    /// All control messages queued for the host, after the initial `Ready`.
    fn replies(conn: &Conn) -> Vec<Control> {
        let mut reader = FrameReader::new(conn.pending_out());
        let mut out = Vec::new();
        while let Some(frame) = reader.read_frame().unwrap() {
            out.push(frame.to_control().unwrap());
        }
        out.remove(0);
        out
    }

    fn exec(id: u32) -> Exec {
        Exec {
            id,
            argv: vec!["/bin/true".into()],
            ..Exec::default()
        }
    }

    #[test]
    fn new_connection_starts_with_ready() {
        let (conn, _reg) = conn();

        let first = FrameReader::new(conn.pending_out())
            .read_frame()
            .unwrap()
            .unwrap();

        assert!(matches!(
            first.to_control().unwrap(),
            Control::Ready {
                version: PROTOCOL_VERSION,
                ..
            }
        ));
    }

    #[test]
    fn hello_opens_the_connection_with_negotiated_max() {
        let (mut conn, _reg) = conn();

        conn.on_bytes(&control(&Control::Hello {
            version: PROTOCOL_VERSION,
            max_frame: 32 << 10,
        }));

        assert_eq!((conn.phase(), conn.max_frame()), (Phase::Open, 32 << 10));
        assert!(replies(&conn).is_empty());
    }

    #[test]
    fn wrong_version_gets_error_and_closes() {
        let (mut conn, _reg) = conn();

        conn.on_bytes(&control(&Control::Hello {
            version: 2,
            max_frame: DEFAULT_MAX_FRAME,
        }));

        assert!(conn.closing);
        assert!(matches!(
            replies(&conn).as_slice(),
            [Control::Error { id: None, .. }]
        ));
    }

    #[test]
    fn exec_before_hello_is_refused_and_closes() {
        let (mut conn, _reg) = conn();

        let actions = conn.on_bytes(&control(&Control::Exec(exec(1))));

        assert!(actions.is_empty());
        assert!(conn.closing);
        assert_eq!(
            replies(&conn),
            [Control::error(None, "expected hello, got exec message")]
        );
    }

    #[test]
    fn valid_exec_becomes_a_spawn_action() {
        let (mut conn, _reg) = conn();
        let mut bytes = hello();
        bytes.extend(control(&Control::Exec(exec(5))));

        let actions = conn.on_bytes(&bytes);

        assert_eq!(actions, [Action::Spawn(Box::new(exec(5)))]);
    }

    #[test]
    fn invalid_exec_gets_error_with_its_id_and_connection_stays() {
        let (mut conn, _reg) = conn();
        let mut bad = exec(5);
        bad.argv.clear();
        let mut bytes = hello();
        bytes.extend(control(&Control::Exec(bad)));

        let actions = conn.on_bytes(&bytes);

        assert!(actions.is_empty());
        assert!(!conn.closing);
        assert!(matches!(
            replies(&conn).as_slice(),
            [Control::Error { id: Some(5), .. }]
        ));
    }

    #[test]
    fn ping_gets_pong() {
        let (mut conn, _reg) = conn();
        let mut bytes = hello();
        bytes.extend(control(&Control::Ping));

        conn.on_bytes(&bytes);

        assert_eq!(replies(&conn), [Control::Pong]);
    }

    #[test]
    fn shutdown_is_an_action_and_remembered() {
        let (mut conn, _reg) = conn();
        let mut bytes = hello();
        bytes.extend(control(&Control::Shutdown));

        let actions = conn.on_bytes(&bytes);

        assert_eq!(actions, [Action::Shutdown]);
        assert!(conn.shutdown_requested);
    }

    #[test]
    fn bad_json_gets_error_and_connection_stays() {
        let (mut conn, _reg) = conn();
        let mut bytes = hello();
        encode_frame(
            &mut bytes,
            FrameKind::Control,
            0,
            b"{nope",
            DEFAULT_MAX_FRAME,
        )
        .unwrap();
        bytes.extend(control(&Control::Ping));

        conn.on_bytes(&bytes);

        let r = replies(&conn);
        assert!(matches!(
            r.as_slice(),
            [Control::Error { id: None, .. }, Control::Pong]
        ));
        assert!(!conn.closing);
    }

    #[test]
    fn unknown_frame_kind_gets_error_and_closes() {
        let (mut conn, _reg) = conn();
        let mut bytes = hello();
        bytes.extend([0, 0, 0, 5, 77, 0, 0, 0, 0]);
        bytes.extend(control(&Control::Ping));

        conn.on_bytes(&bytes);

        assert!(conn.closing);
        assert!(matches!(
            replies(&conn).as_slice(),
            [Control::Error { id: None, .. }]
        ));
    }

    #[test]
    fn oversized_frame_gets_error_and_closes() {
        let (mut conn, _reg) = conn();
        let mut bytes = hello();
        bytes.extend([0x7f, 0xff, 0xff, 0xff]);

        conn.on_bytes(&bytes);

        assert!(conn.closing);
        assert_eq!(replies(&conn).len(), 1);
    }

    #[test]
    fn stdout_frame_from_host_is_refused() {
        let (mut conn, _reg) = conn();
        let mut bytes = hello();
        encode_frame(&mut bytes, FrameKind::Stdout, 1, b"x", DEFAULT_MAX_FRAME).unwrap();

        conn.on_bytes(&bytes);

        assert_eq!(
            replies(&conn),
            [Control::error(None, "the host must not send stdout frames")]
        );
    }

    #[test]
    fn stdin_for_unknown_exec_is_dropped_quietly() {
        let (mut conn, _reg) = conn();
        let mut bytes = hello();
        encode_frame(&mut bytes, FrameKind::Stdin, 9, b"late", DEFAULT_MAX_FRAME).unwrap();

        conn.on_bytes(&bytes);

        assert!(replies(&conn).is_empty());
    }

    #[test]
    fn invalid_signal_number_is_refused() {
        let (mut conn, _reg) = conn();
        let mut bytes = hello();
        bytes.extend(control(&Control::Signal { id: 1, signo: 0 }));

        conn.on_bytes(&bytes);

        assert_eq!(
            replies(&conn),
            [Control::error(Some(1), "invalid signal 0")]
        );
    }

    #[test]
    fn agent_only_messages_from_host_are_refused() {
        let (mut conn, _reg) = conn();
        let mut bytes = hello();
        bytes.extend(control(&Control::Pong));

        conn.on_bytes(&bytes);

        assert_eq!(
            replies(&conn),
            [Control::error(None, "unexpected pong message")]
        );
    }

    #[test]
    fn frames_split_across_reads_are_reassembled() {
        let (mut conn, _reg) = conn();
        let mut bytes = hello();
        bytes.extend(control(&Control::Ping));

        for b in &bytes {
            conn.on_bytes(std::slice::from_ref(b));
        }

        assert_eq!(replies(&conn), [Control::Pong]);
    }
}

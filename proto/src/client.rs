//! The host side of the protocol: handshake, then run execs one at a time, streaming
//! their output as it arrives.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use proto::{client::{AgentClient, ExecIo}, Exec};
//! let stream = std::os::unix::net::UnixStream::connect("/tmp/agent.sock")?;
//! let mut client = AgentClient::over_unix(stream)?;
//! let exec = Exec { argv: vec!["/bin/echo".into(), "hello".into()], ..Exec::default() };
//! let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
//! let exit = client.exec(exec, ExecIo::new(&mut out, &mut err))?;
//! println!("exit code {}", exit.shell_code()?);
//! # Ok(()) }
//! ```
//!
//! Everything the agent sends is checked: frames against the negotiated maximum, data
//! frames against the running exec, the final [`Exit`] for consistency. Any violation
//! ends the exec with an error and leaves the client unusable ([`ClientError::Broken`]).
//! The client never times out on its own: set a read timeout on the stream, or rely on
//! the agent's `timeout_ms`, and tear the guest down if it stops answering.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::{
    negotiate_max_frame, Control, Exec, Exit, FrameKind, FrameReader, FrameWriter, ProtoError,
    DATA_CHUNK, DEFAULT_MAX_FRAME, PROTOCOL_VERSION, STDIN_WINDOW,
};

/// What can go wrong talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Framing, JSON, validation or the stream itself failed.
    #[error("agent protocol error")]
    Proto(#[from] ProtoError),
    /// The agent closed the connection.
    #[error("the agent closed the connection")]
    Closed,
    /// The agent sent something the protocol does not allow here.
    #[error("unexpected message from the agent: {0}")]
    Unexpected(String),
    /// The agent refused or could not run the request.
    #[error("the agent reported: {message}")]
    Remote {
        /// The exec it concerns, if any.
        id: Option<u32>,
        /// The agent's message.
        message: String,
    },
    /// Writing the exec's output to the caller's writer failed (the exec was killed).
    #[error("writing exec output failed")]
    Sink(#[source] std::io::Error),
    /// An earlier error left the connection in an unknown state.
    #[error("the agent connection is unusable after an earlier error")]
    Broken,
}

/// What the agent said about itself in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// Protocol version (equal to [`PROTOCOL_VERSION`]).
    pub version: u32,
    /// The agent's build version.
    pub agent_version: String,
    /// The negotiated maximum frame size.
    pub max_frame: u32,
}

/// Where an exec's streams come from and go to.
pub struct ExecIo<'a> {
    stdin: Option<Box<dyn Read + Send>>,
    stdout: &'a mut dyn Write,
    stderr: &'a mut dyn Write,
}

impl std::fmt::Debug for ExecIo<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecIo")
            .field("stdin", &self.stdin.is_some())
            .finish_non_exhaustive()
    }
}

impl<'a> ExecIo<'a> {
    /// Output goes to the two writers as it arrives; the process reads end-of-file.
    pub fn new(stdout: &'a mut dyn Write, stderr: &'a mut dyn Write) -> Self {
        Self {
            stdin: None,
            stdout,
            stderr,
        }
    }

    /// Sends everything `stdin` yields to the process, then closes its stdin. It is read
    /// on a separate thread, which ends at its next read after the exec has ended.
    pub fn with_stdin(mut self, stdin: Box<dyn Read + Send>) -> Self {
        self.stdin = Some(stdin);
        self
    }
}

/// An exec's full result from [`AgentClient::exec_output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// How it ended.
    pub exit: Exit,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

type SharedWriter<W> = Arc<Mutex<FrameWriter<W>>>;

/// Stdin credit of the running exec, shared by the output reader (which receives
/// `StdinCredit`) and the stdin pump (which spends it).
#[derive(Debug)]
struct Credit {
    state: Mutex<(usize, bool)>,
    cond: Condvar,
}

impl Credit {
    fn new() -> Self {
        Self {
            state: Mutex::new((STDIN_WINDOW, false)),
            cond: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, (usize, bool)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, bytes: u64) {
        let mut state = self.lock();
        state.0 = state
            .0
            .saturating_add(usize::try_from(bytes).unwrap_or(usize::MAX));
        self.cond.notify_all();
    }

    fn finish(&self) {
        self.lock().1 = true;
        self.cond.notify_all();
    }

    fn is_done(&self) -> bool {
        self.lock().1
    }

    /// Waits for credit and takes up to `want` bytes of it; 0 once the exec is over.
    fn take(&self, want: usize) -> usize {
        let mut state = self.lock();
        while state.0 == 0 && !state.1 {
            state = self.cond.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        if state.1 {
            return 0;
        }
        let n = want.min(state.0);
        state.0 -= n;
        n
    }
}

fn lock<W>(writer: &SharedWriter<W>) -> MutexGuard<'_, FrameWriter<W>> {
    writer
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Sends signals to the exec that is running on a client, from any thread.
#[derive(Debug)]
pub struct Signaller<W> {
    writer: SharedWriter<W>,
    current: Arc<AtomicU32>,
}

impl<W> Clone for Signaller<W> {
    fn clone(&self) -> Self {
        Self {
            writer: Arc::clone(&self.writer),
            current: Arc::clone(&self.current),
        }
    }
}

impl<W: Write> Signaller<W> {
    /// Sends `signo` to the process group of the running exec; `Ok(false)` when none runs.
    pub fn signal(&self, signo: i32) -> Result<bool, ClientError> {
        let id = self.current.load(Ordering::SeqCst);
        if id == 0 {
            return Ok(false);
        }
        lock(&self.writer).write_control(&Control::Signal { id, signo })?;
        Ok(true)
    }
}

/// A connection to the guest agent, after the handshake.
#[derive(Debug)]
pub struct AgentClient<R, W> {
    reader: FrameReader<R>,
    writer: SharedWriter<W>,
    info: AgentInfo,
    next_id: u32,
    current: Arc<AtomicU32>,
    broken: bool,
}

/// Connects to a guest vsock port through a Firecracker-style hybrid-vsock Unix socket:
/// writes `CONNECT <port>\n` and reads the `OK <host_port>\n` line one byte at a time,
/// so the agent's `Ready`, which may follow in the same segment, stays in the stream.
/// (Reading the line through a buffered reader and then handing over the raw stream
/// would lose it.)
#[cfg(unix)]
pub fn connect_hybrid_vsock(
    socket: &std::path::Path,
    port: u32,
) -> std::io::Result<std::os::unix::net::UnixStream> {
    connect_hybrid_vsock_within(socket, port, None)
}

/// [`connect_hybrid_vsock`], giving up when the `OK` line has not arrived within
/// `timeout` (a guest that never answers must not hang the host). The stream's read
/// timeout is left at `timeout`; clear it with `set_read_timeout(None)` when done.
#[cfg(unix)]
pub fn connect_hybrid_vsock_within(
    socket: &std::path::Path,
    port: u32,
    timeout: Option<std::time::Duration>,
) -> std::io::Result<std::os::unix::net::UnixStream> {
    use std::io::{Error, ErrorKind};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(timeout)?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::with_capacity(32);
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        if stream.read(&mut byte)? == 0 {
            return Err(Error::new(
                ErrorKind::UnexpectedEof,
                "hybrid vsock closed before OK",
            ));
        }
        if byte[0] == b'\n' {
            let text = String::from_utf8_lossy(&line);
            let ok = text
                .strip_prefix("OK ")
                .is_some_and(|p| p.trim().parse::<u32>().is_ok());
            if ok {
                return Ok(stream);
            }
            return Err(Error::new(
                ErrorKind::ConnectionRefused,
                format!("hybrid vsock refused port {port}: {text:?}"),
            ));
        }
        line.push(byte[0]);
    }
    Err(Error::new(
        ErrorKind::InvalidData,
        "hybrid vsock answer too long",
    ))
}

#[cfg(unix)]
impl AgentClient<std::os::unix::net::UnixStream, std::os::unix::net::UnixStream> {
    /// Handshake over a connected Unix stream (for hybrid vsock: after `CONNECT`/`OK`).
    pub fn over_unix(stream: std::os::unix::net::UnixStream) -> Result<Self, ClientError> {
        let writer = stream.try_clone().map_err(ProtoError::Io)?;
        Self::handshake(stream, writer)
    }
}

impl<R: Read, W: Write> AgentClient<R, W> {
    /// Reads the agent's `Ready`, answers `Hello`, and returns the connected client.
    pub fn handshake(reader: R, writer: W) -> Result<Self, ClientError> {
        Self::handshake_with_max_frame(reader, writer, DEFAULT_MAX_FRAME)
    }

    /// Like [`AgentClient::handshake`], offering at most `max_frame` bytes per frame.
    pub fn handshake_with_max_frame(
        reader: R,
        writer: W,
        max_frame: u32,
    ) -> Result<Self, ClientError> {
        let mut reader = FrameReader::with_max_frame(reader, max_frame);
        let mut writer = FrameWriter::with_max_frame(writer, max_frame);
        let frame = reader.read_frame()?.ok_or(ClientError::Closed)?;
        let (version, agent_version, agent_max) = match frame.to_control()? {
            Control::Ready {
                version,
                agent_version,
                max_frame,
            } => (version, agent_version, max_frame),
            Control::Error { id, message } => return Err(ClientError::Remote { id, message }),
            other => return Err(unexpected(&other)),
        };
        let negotiated = match negotiate_max_frame(max_frame, version, agent_max) {
            Ok(n) => n,
            Err(e) => {
                let _ = writer.write_control(&Control::error(None, e.to_string()));
                return Err(e.into());
            }
        };
        writer.write_control(&Control::Hello {
            version: PROTOCOL_VERSION,
            max_frame: negotiated,
        })?;
        reader.set_max_frame(negotiated);
        writer.set_max_frame(negotiated);
        Ok(Self {
            reader,
            writer: Arc::new(Mutex::new(writer)),
            info: AgentInfo {
                version,
                agent_version,
                max_frame: negotiated,
            },
            next_id: 1,
            current: Arc::new(AtomicU32::new(0)),
            broken: false,
        })
    }

    /// What the agent said in the handshake.
    pub fn info(&self) -> &AgentInfo {
        &self.info
    }

    /// A handle that signals the running exec from another thread (e.g. on Ctrl-C).
    pub fn signaller(&self) -> Signaller<W> {
        Signaller {
            writer: Arc::clone(&self.writer),
            current: Arc::clone(&self.current),
        }
    }

    /// Round trip to check the agent answers.
    pub fn ping(&mut self) -> Result<(), ClientError> {
        self.usable()?;
        lock(&self.writer).write_control(&Control::Ping)?;
        let result = self.wait_pong();
        self.broken |= result.is_err();
        result
    }

    fn wait_pong(&mut self) -> Result<(), ClientError> {
        let frame = self.reader.read_frame()?.ok_or(ClientError::Closed)?;
        match frame.to_control()? {
            Control::Pong => Ok(()),
            Control::Error { id, message } => Err(ClientError::Remote { id, message }),
            other => Err(unexpected(&other)),
        }
    }

    /// Has the agent create `links` and mount `mounts` (encoded as on the kernel command
    /// line, see [`crate::mounts`]) before any exec; waits for it to finish.
    pub fn setup(&mut self, links: &str, mounts: &str) -> Result<(), ClientError> {
        self.usable()?;
        let request = Control::Setup {
            links: links.to_string(),
            mounts: mounts.to_string(),
        };
        lock(&self.writer).write_control(&request)?;
        let result = (|| {
            let frame = self.reader.read_frame()?.ok_or(ClientError::Closed)?;
            match frame.to_control()? {
                Control::SetupDone => Ok(()),
                Control::Error { id, message } => Err(ClientError::Remote { id, message }),
                other => Err(unexpected(&other)),
            }
        })();
        // A refused setup leaves the connection in step; anything else breaks it.
        self.broken |= !matches!(result, Ok(()) | Err(ClientError::Remote { .. }));
        result
    }

    /// Asks the agent to power the guest off. The connection ends.
    pub fn shutdown(self) -> Result<(), ClientError> {
        lock(&self.writer).write_control(&Control::Shutdown)?;
        Ok(())
    }

    fn usable(&self) -> Result<(), ClientError> {
        if self.broken {
            Err(ClientError::Broken)
        } else {
            Ok(())
        }
    }

    fn take_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        id
    }
}

impl<R: Read, W: Write + Send + 'static> AgentClient<R, W> {
    /// Runs one process and waits for it, writing its output to `io` as chunks arrive.
    ///
    /// The client sets `exec.id` and `exec.stdin` itself. Returns the agent's [`Exit`];
    /// an exec the agent could not start is [`ClientError::Remote`] (the connection
    /// stays usable).
    pub fn exec(&mut self, mut exec: Exec, io: ExecIo<'_>) -> Result<Exit, ClientError> {
        self.usable()?;
        exec.id = self.take_id();
        exec.stdin = io.stdin.is_some();
        exec.validate()?;
        let id = exec.id;
        lock(&self.writer).write_control(&Control::Exec(exec))?;
        self.current.store(id, Ordering::SeqCst);
        let credit = Arc::new(Credit::new());
        if let Some(stdin) = io.stdin {
            spawn_stdin_pump(id, stdin, Arc::clone(&self.writer), Arc::clone(&credit));
        }
        let result = self.pump_output(id, io.stdout, io.stderr, &credit);
        credit.finish();
        self.current.store(0, Ordering::SeqCst);
        match &result {
            Ok(_) | Err(ClientError::Remote { id: Some(_), .. }) => {}
            Err(_) => {
                self.broken = true;
                let kill = Control::Signal {
                    id,
                    signo: libc_sigkill(),
                };
                let _ = lock(&self.writer).write_control(&kill);
            }
        }
        result
    }

    /// Runs one process, feeding it `stdin` (if any), and collects all its output in
    /// memory. Meant for small outputs and tests; stream large ones with [`Self::exec`].
    pub fn exec_output(
        &mut self,
        exec: Exec,
        stdin: Option<Vec<u8>>,
    ) -> Result<ExecOutput, ClientError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut io = ExecIo::new(&mut stdout, &mut stderr);
        if let Some(bytes) = stdin {
            io = io.with_stdin(Box::new(std::io::Cursor::new(bytes)));
        }
        let exit = self.exec(exec, io)?;
        Ok(ExecOutput {
            exit,
            stdout,
            stderr,
        })
    }

    fn pump_output(
        &mut self,
        id: u32,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
        credit: &Credit,
    ) -> Result<Exit, ClientError> {
        loop {
            let frame = self.reader.read_frame()?.ok_or(ClientError::Closed)?;
            let sink: &mut dyn Write = match frame.kind {
                FrameKind::Control => match frame.to_control()? {
                    Control::Exit(exit) if exit.id == id => {
                        exit.status()?;
                        return Ok(exit);
                    }
                    Control::Error {
                        id: Some(eid),
                        message,
                    } if eid == id => {
                        return Err(ClientError::Remote {
                            id: Some(id),
                            message,
                        })
                    }
                    Control::Error { id: None, message } => {
                        return Err(ClientError::Remote { id: None, message })
                    }
                    Control::StdinCredit { id: cid, bytes } if cid == id => {
                        credit.add(bytes);
                        continue;
                    }
                    Control::Pong => continue,
                    other => return Err(unexpected(&other)),
                },
                FrameKind::Stdout if frame.stream == id => &mut *stdout,
                FrameKind::Stderr if frame.stream == id => &mut *stderr,
                kind => {
                    return Err(ClientError::Unexpected(format!(
                        "{} frame for stream {}",
                        kind.name(),
                        frame.stream
                    )))
                }
            };
            sink.write_all(&frame.payload).map_err(ClientError::Sink)?;
        }
    }
}

/// SIGKILL is 9 on every Linux architecture; spelled out to keep `libc` out of proto.
const fn libc_sigkill() -> i32 {
    9
}

fn unexpected(msg: &Control) -> ClientError {
    ClientError::Unexpected(format!("{} message", msg.type_name()))
}

/// Copies `stdin` to the agent in data frames on a thread of its own, within the stdin
/// credit the agent grants, then sends `StdinClose`. Stops quietly when the exec is
/// over or the connection fails.
fn spawn_stdin_pump<W: Write + Send + 'static>(
    id: u32,
    mut stdin: Box<dyn Read + Send>,
    writer: SharedWriter<W>,
    credit: Arc<Credit>,
) {
    let chunk = DATA_CHUNK.min(lock(&writer).max_payload()).max(1);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; chunk];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => 0,
            };
            if n == 0 {
                if !credit.is_done() {
                    let _ = lock(&writer).write_control(&Control::StdinClose { id });
                }
                return;
            }
            let mut sent = 0;
            while sent < n {
                let allowed = credit.take(n - sent);
                if allowed == 0 {
                    return;
                }
                let piece = &buf[sent..sent + allowed];
                if lock(&writer)
                    .write_frame(FrameKind::Stdin, id, piece)
                    .is_err()
                {
                    return;
                }
                sent += allowed;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode_control;

    fn agent_bytes(msgs: &[Control]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            encode_control(&mut out, m, DEFAULT_MAX_FRAME).unwrap();
        }
        out
    }

    fn ready(version: u32, max_frame: u32) -> Control {
        Control::Ready {
            version,
            agent_version: "test".into(),
            max_frame,
        }
    }

    #[test]
    fn handshake_negotiates_and_answers_hello() {
        let input = agent_bytes(&[ready(PROTOCOL_VERSION, 64 << 10)]);
        let mut sent = Vec::new();

        let client = AgentClient::handshake(&input[..], &mut sent).unwrap();

        assert_eq!(client.info().max_frame, 64 << 10);
        drop(client);
        let hello = FrameReader::new(&sent[..]).read_frame().unwrap().unwrap();
        assert_eq!(
            hello.to_control().unwrap(),
            Control::Hello {
                version: PROTOCOL_VERSION,
                max_frame: 64 << 10
            }
        );
    }

    #[test]
    fn handshake_refuses_other_version_and_tells_the_agent() {
        let input = agent_bytes(&[ready(PROTOCOL_VERSION + 1, DEFAULT_MAX_FRAME)]);
        let mut sent = Vec::new();

        let err = AgentClient::handshake(&input[..], &mut sent).unwrap_err();

        assert!(matches!(
            err,
            ClientError::Proto(ProtoError::VersionMismatch { .. })
        ));
        let reply = FrameReader::new(&sent[..]).read_frame().unwrap().unwrap();
        assert!(matches!(reply.to_control().unwrap(), Control::Error { .. }));
    }

    fn fake_hybrid_vsock(
        answer: Vec<u8>,
    ) -> (std::path::PathBuf, std::thread::JoinHandle<Vec<u8>>) {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "proto-hv-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 13];
            conn.read_exact(&mut request).unwrap();
            conn.write_all(&answer).unwrap();
            request.to_vec()
        });
        (path, server)
    }

    #[test]
    fn hybrid_vsock_connect_keeps_bytes_after_the_ok_line() {
        let mut answer = b"OK 1073741824\n".to_vec();
        answer.extend(agent_bytes(&[ready(PROTOCOL_VERSION, DEFAULT_MAX_FRAME)]));
        let (path, server) = fake_hybrid_vsock(answer);

        let stream = connect_hybrid_vsock(&path, 1024).unwrap();
        let ready_frame = FrameReader::new(&stream).read_frame().unwrap().unwrap();

        assert_eq!(server.join().unwrap(), b"CONNECT 1024\n");
        assert!(matches!(
            ready_frame.to_control().unwrap(),
            Control::Ready { .. }
        ));
    }

    #[test]
    fn hybrid_vsock_refusal_is_an_error() {
        let (path, _server) = fake_hybrid_vsock(b"NO\n".to_vec());

        let err = connect_hybrid_vsock(&path, 1024).unwrap_err();

        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }

    #[test]
    fn handshake_on_closed_stream_is_closed() {
        let err = AgentClient::handshake(&[][..], Vec::new()).unwrap_err();

        assert!(matches!(err, ClientError::Closed));
    }

    #[test]
    fn exec_streams_output_and_returns_exit() {
        let mut input = agent_bytes(&[ready(PROTOCOL_VERSION, DEFAULT_MAX_FRAME)]);
        crate::encode_frame(
            &mut input,
            FrameKind::Stdout,
            1,
            b"hello\n",
            DEFAULT_MAX_FRAME,
        )
        .unwrap();
        crate::encode_frame(&mut input, FrameKind::Stderr, 1, b"oops", DEFAULT_MAX_FRAME).unwrap();
        input.extend(agent_bytes(&[Control::Exit(Exit {
            id: 1,
            code: Some(3),
            signal: None,
            timed_out: false,
            duration_ms: 1,
        })]));
        let mut client = AgentClient::handshake(std::io::Cursor::new(input), Vec::new()).unwrap();
        let exec = Exec {
            argv: vec!["x".into()],
            ..Exec::default()
        };

        let out = client.exec_output(exec, None).unwrap();

        assert_eq!(out.stdout, b"hello\n");
        assert_eq!(out.stderr, b"oops");
        assert_eq!(out.exit.code, Some(3));
    }

    #[test]
    fn data_for_another_stream_breaks_the_client() {
        let mut input = agent_bytes(&[ready(PROTOCOL_VERSION, DEFAULT_MAX_FRAME)]);
        crate::encode_frame(&mut input, FrameKind::Stdout, 7, b"x", DEFAULT_MAX_FRAME).unwrap();
        let mut client = AgentClient::handshake(std::io::Cursor::new(input), Vec::new()).unwrap();
        let exec = Exec {
            argv: vec!["x".into()],
            ..Exec::default()
        };

        let first = client.exec_output(exec.clone(), None).unwrap_err();
        let second = client.exec_output(exec, None).unwrap_err();

        assert!(matches!(first, ClientError::Unexpected(_)));
        assert!(matches!(second, ClientError::Broken));
    }

    #[test]
    fn exit_with_neither_code_nor_signal_is_refused() {
        let mut input = agent_bytes(&[ready(PROTOCOL_VERSION, DEFAULT_MAX_FRAME)]);
        input.extend(agent_bytes(&[Control::Exit(Exit {
            id: 1,
            code: None,
            signal: None,
            timed_out: false,
            duration_ms: 1,
        })]));
        let mut client = AgentClient::handshake(std::io::Cursor::new(input), Vec::new()).unwrap();
        let exec = Exec {
            argv: vec!["x".into()],
            ..Exec::default()
        };

        let err = client.exec_output(exec, None).unwrap_err();

        assert!(matches!(err, ClientError::Proto(ProtoError::Invalid(_))));
    }

    #[test]
    fn remote_error_for_the_exec_keeps_client_usable() {
        let mut input = agent_bytes(&[ready(PROTOCOL_VERSION, DEFAULT_MAX_FRAME)]);
        input.extend(agent_bytes(&[
            Control::error(Some(1), "exec /nope: not found"),
            Control::Pong,
        ]));
        let mut client = AgentClient::handshake(std::io::Cursor::new(input), Vec::new()).unwrap();
        let exec = Exec {
            argv: vec!["/nope".into()],
            ..Exec::default()
        };

        let err = client.exec_output(exec, None).unwrap_err();
        let ping = client.ping();

        assert!(matches!(err, ClientError::Remote { id: Some(1), .. }));
        assert!(ping.is_ok());
    }
}

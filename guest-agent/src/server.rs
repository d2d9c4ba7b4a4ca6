//! The event loop: one thread, level-triggered epoll over the listener, a signalfd,
//! every connection socket and every child pipe.
//!
//! One reaper owns `waitpid`: on SIGCHLD it looks at each ended child without reaping
//! it (`WNOWAIT`), kills the rest of an exec's process group while the group id cannot
//! be reused, then reaps it and hands the status to the exec that owns the pid; other
//! children (orphans reparented to us) are simply reaped.
//!
//! Flow control: a child's output is read only while its connection has less than
//! [`OUT_HIGH_WATER`] bytes queued, so a host that stops reading stops the child (its
//! pipe fills). Stdin is bounded by the credit window (`proto::STDIN_WINDOW`), so the
//! connection itself is always read (unless the host leaves our replies unread), and
//! `Signal` gets through even while a process ignores its stdin. A source we do not
//! want events from is removed from epoll altogether (level-triggered hang-ups would
//! otherwise spin).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::OwnedFd;
use std::time::Instant;

use proto::{Control, FrameKind, DATA_CHUNK};

use crate::cgroup::ExecCgroup;
use crate::conn::{Action, Conn, OUT_HIGH_WATER};
use crate::exec::{read_pipe, PipeRead, Running, SpawnContext, StdinPipe, DRAIN_GRACE};
use crate::proxy_forward::Forwarder;
use crate::registry::{Registry, Source, Watched};
use crate::sys::{self, EV_IN, EV_OUT};
use crate::{error_chain, log};

/// Decode a `Setup`'s links and mounts and carry them out.
fn apply_setup(links: &str, mounts: &str) -> Result<(), String> {
    let links = match links {
        "" => Vec::new(),
        l => proto::mounts::decode_links(l).map_err(|e| format!("links: {e}"))?,
    };
    let mounts = match mounts {
        "" => Vec::new(),
        m => proto::mounts::decode_mounts(m).map_err(|e| format!("mounts: {e}"))?,
    };
    crate::shares::set_up(&links, &mounts).map_err(|e| error_chain(&e))
}

/// The guest clock is left alone when it is this close to the host's (the exec's time
/// is already a little old when it arrives).
const WALL_CLOCK_SLACK_NS: u64 = 50_000_000;

/// Connections served at once; more are refused with an `Error`.
pub const MAX_CONNECTIONS: usize = 64;

/// Why the loop ended.
#[derive(Debug)]
pub enum StopReason {
    /// The host sent `Shutdown`.
    Shutdown,
    /// The first connection closed without `Shutdown` (and that ends the agent).
    HostGone,
    /// A termination signal arrived.
    Signal(u32),
    /// The event loop itself failed.
    Failed(io::Error),
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shutdown => f.write_str("the host asked for a shutdown"),
            Self::HostGone => f.write_str("the host connection closed"),
            Self::Signal(s) => write!(f, "signal {s}"),
            Self::Failed(e) => write!(f, "the event loop failed: {e}"),
        }
    }
}

/// How the server behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Stop when the first connection closes without `Shutdown`.
    pub stop_on_disconnect: bool,
    /// Running as PID 1 (SIGHUP is ignored then; it is a stop otherwise).
    pub pid1: bool,
    /// Largest frame we accept and offer.
    pub max_frame: u32,
    /// Reported in `Ready`.
    pub agent_version: String,
    /// Set when the guest could not be set up as the host asked (a share failed to
    /// mount): every connection is answered with this error instead of `Ready`.
    pub refusal: Option<String>,
    /// Accept one `Setup` (links and mounts) before the first exec: PID 1 of a VM
    /// restored from a snapshot gets its shares this way.
    pub accept_setup: bool,
}

/// The agent's event loop and everything it owns.
#[derive(Debug)]
pub struct Server {
    reg: Registry,
    listener: Watched,
    signals: Watched,
    conns: BTreeMap<u32, Conn>,
    pids: HashMap<libc::pid_t, (u32, u32)>,
    ctx: SpawnContext,
    opts: Options,
    next_conn: u32,
    first_conn: Option<u32>,
    pending_cgroups: Vec<ExecCgroup>,
    scratch: Vec<u8>,
    stop: Option<StopReason>,
    forwarder: Option<(Watched, Forwarder)>,
    /// A `Setup` was carried out, or an exec started (after which none is accepted).
    setup_closed: bool,
}

impl Server {
    /// A server on a listening, non-blocking socket.
    pub fn new(listener: OwnedFd, ctx: SpawnContext, opts: Options) -> io::Result<Self> {
        let mut reg = Registry::new()?;
        let signals = reg.watch(sys::signalfd()?, Source::Signals);
        let listener = reg.watch(listener, Source::Listener);
        Ok(Self {
            reg,
            listener,
            signals,
            conns: BTreeMap::new(),
            pids: HashMap::new(),
            ctx,
            opts,
            next_conn: 1,
            first_conn: None,
            pending_cgroups: Vec::new(),
            scratch: vec![0u8; DATA_CHUNK],
            stop: None,
            forwarder: None,
            setup_closed: false,
        })
    }

    /// Runs the network proxy forwarder in this loop too.
    pub fn add_forwarder(&mut self, forwarder: Forwarder) -> io::Result<()> {
        let watched = self.reg.watch(forwarder.ready_fd()?, Source::Forwarder);
        self.forwarder = Some((watched, forwarder));
        Ok(())
    }

    /// Serves until a stop; on the way out every exec is killed.
    pub fn run(&mut self) -> StopReason {
        let mut events = Vec::with_capacity(64);
        loop {
            self.update_interests();
            let timeout = self.next_timeout();
            if let Err(e) = self.reg.wait(&mut events, timeout) {
                self.stop = Some(StopReason::Failed(e));
            }
            for &(token, ev) in &events {
                self.dispatch(token, ev);
            }
            self.check_timers(Instant::now());
            self.finish_execs();
            self.close_conns();
            if let Some(reason) = self.stop.take() {
                self.kill_everything();
                return reason;
            }
        }
    }

    fn dispatch(&mut self, token: u64, ev: u32) {
        let Some(source) = self.reg.source(token) else {
            return;
        };
        match source {
            Source::Listener => self.accept(),
            Source::Signals => self.on_signals(),
            Source::Conn(c) => self.on_conn(c, ev),
            Source::Stdout(c, e) => self.on_output(c, e, FrameKind::Stdout),
            Source::Stderr(c, e) => self.on_output(c, e, FrameKind::Stderr),
            Source::Stdin(c, e) => self.on_stdin(c, e),
            Source::Report(c, e) => {
                if let Some(exec) = self.conns.get_mut(&c).and_then(|k| k.execs.get_mut(&e)) {
                    exec.read_report(&mut self.reg);
                }
            }
            Source::Forwarder => {
                if let Some((_, fwd)) = &mut self.forwarder {
                    if let Err(e) = fwd.run_ready() {
                        log!("proxy forwarder: {e}");
                    }
                }
            }
        }
    }

    fn accept(&mut self) {
        for _ in 0..16 {
            let fd = match sys::accept(&self.listener) {
                Ok(Some(fd)) => fd,
                Ok(None) => return,
                Err(e) => {
                    log!("accept failed: {e}");
                    return;
                }
            };
            let refusal = match &self.opts.refusal {
                Some(why) => Some(why.as_str()),
                None if self.conns.len() >= MAX_CONNECTIONS => Some("too many connections"),
                None => None,
            };
            if let Some(why) = refusal {
                let mut out = Vec::new();
                let refusal = Control::error(None, why);
                let _ = proto::encode_control(&mut out, &refusal, self.opts.max_frame);
                let _ = sys::write(&fd, &out);
                continue;
            }
            let id = self.next_conn;
            self.next_conn = self.next_conn.wrapping_add(1).max(1);
            let sock = self.reg.watch(fd, Source::Conn(id));
            let conn = Conn::new(sock, self.opts.max_frame, &self.opts.agent_version);
            self.conns.insert(id, conn);
            self.first_conn.get_or_insert(id);
        }
    }

    fn on_signals(&mut self) {
        loop {
            match sys::read_signal(&self.signals) {
                Ok(Some(signo)) => self.on_signal(signo),
                Ok(None) => return,
                Err(e) => {
                    log!("reading signals failed: {e}");
                    return;
                }
            }
        }
    }

    fn on_signal(&mut self, signo: u32) {
        let signo_i = signo as i32;
        if signo_i == libc::SIGCHLD {
            self.reap();
        } else if signo_i == libc::SIGHUP && self.opts.pid1 {
            // A console hang-up means nothing to PID 1.
        } else {
            self.stop.get_or_insert(StopReason::Signal(signo));
        }
    }

    /// The single reaper (see the module docs).
    fn reap(&mut self) {
        let now = Instant::now();
        while let Some(pid) = sys::peek_exited_child() {
            let owner = self.pids.remove(&pid);
            if owner.is_some() {
                // The leader is a zombie: its pid is still its group's id and cannot be
                // reused, so this reaches exactly the exec's leftovers.
                let _ = sys::kill(-pid, libc::SIGKILL);
            }
            let Some(status) = sys::reap(pid) else {
                break;
            };
            if let Some((c, e)) = owner {
                if let Some(exec) = self.conns.get_mut(&c).and_then(|k| k.execs.get_mut(&e)) {
                    exec.reaped(status, now);
                }
            }
        }
        self.pending_cgroups.retain(|c| !c.try_remove());
    }

    fn on_conn(&mut self, c: u32, ev: u32) {
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        if ev & EV_OUT != 0 && conn.flush().is_err() {
            conn.peer_closed = true;
            return;
        }
        if ev & !EV_OUT == 0 || !conn.wants_read() {
            return;
        }
        conn.on_readable(&mut self.scratch);
        while let Some(action) = self.conns.get_mut(&c).and_then(Conn::next_action) {
            match action {
                Action::Spawn(exec) => self.spawn(c, *exec),
                Action::Shutdown => {
                    self.stop.get_or_insert(StopReason::Shutdown);
                }
                Action::Setup { links, mounts } => self.setup(c, &links, &mounts),
            }
        }
    }

    /// `Control::Setup`: links and mounts, once, before any exec. A failure refuses every
    /// later exec and connection, as a failed setup at boot does.
    fn setup(&mut self, c: u32, links: &str, mounts: &str) {
        let reply = if !self.opts.accept_setup {
            Control::error(None, "setup is only accepted by the guest's PID 1")
        } else if self.setup_closed {
            Control::error(None, "setup comes once, before any exec")
        } else {
            self.setup_closed = true;
            match apply_setup(links, mounts) {
                Ok(()) => Control::SetupDone,
                Err(message) => {
                    log!("setup failed: {message}; refusing to run commands");
                    self.opts.refusal = Some(message.clone());
                    Control::error(None, message)
                }
            }
        };
        if let Some(conn) = self.conns.get_mut(&c) {
            conn.queue(&reply);
        }
    }

    fn spawn(&mut self, c: u32, exec: proto::Exec) {
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        let id = exec.id;
        self.setup_closed = true;
        if let Some(why) = &self.opts.refusal {
            conn.queue(&Control::error(Some(id), why.clone()));
            return;
        }
        // A restored VM first gets fresh randomness and the host's time. Without the
        // reseed two VMs from one snapshot would share their random state: refuse.
        if !exec.entropy.is_empty() {
            if let Err(e) = sys::reseed_random(&exec.entropy) {
                let message = format!("cannot reseed the guest's random generator: {e}");
                conn.queue(&Control::error(Some(id), message));
                return;
            }
        }
        if let Some(ns) = exec.wall_clock_ns {
            if let Err(e) = sys::set_wall_clock(ns, WALL_CLOCK_SLACK_NS) {
                log!("cannot set the clock: {e}");
            }
        }
        match Running::spawn(exec, c, &mut self.ctx, &mut self.reg) {
            Ok(running) => {
                self.pids.insert(running.pid, (c, id));
                conn.execs.insert(id, running);
            }
            Err(e) => conn.queue(&Control::error(Some(id), error_chain(&e))),
        }
    }

    fn on_output(&mut self, c: u32, e: u32, kind: FrameKind) {
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        let limit = DATA_CHUNK.min(conn.max_payload()).max(1);
        let Some(exec) = conn.execs.get_mut(&e) else {
            return;
        };
        let slot = match kind {
            FrameKind::Stdout => &mut exec.stdout,
            _ => &mut exec.stderr,
        };
        let Some(pipe) = slot else {
            return;
        };
        match read_pipe(pipe, &mut self.scratch[..limit]) {
            PipeRead::Data(n) => conn.queue_data(kind, e, &self.scratch[..n]),
            PipeRead::Empty => {}
            PipeRead::Closed => {
                if let Some(pipe) = slot.take() {
                    self.reg.unwatch(pipe);
                }
            }
        }
    }

    fn on_stdin(&mut self, c: u32, e: u32) {
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        let Some(exec) = conn.execs.get_mut(&e) else {
            return;
        };
        let Some(stdin) = &mut exec.stdin else {
            return;
        };
        let credit = match stdin.flush() {
            // The child closed its stdin: drop what it will never read, and give the
            // host its credit back so its stdin pump does not stall.
            Err(_) => exec.close_stdin(&mut self.reg),
            Ok(()) => exec.take_stdin_credit(),
        };
        if credit > 0 {
            conn.queue(&Control::StdinCredit {
                id: e,
                bytes: credit as u64,
            });
        }
    }

    /// Brings every watched descriptor's interest up to date, flushing first.
    fn update_interests(&mut self) {
        let reg = &mut self.reg;
        let accepting = if self.stop.is_none() { EV_IN } else { 0 };
        reg.set_interest(&mut self.listener, accepting);
        reg.set_interest(&mut self.signals, EV_IN);
        if let Some((watched, _)) = &mut self.forwarder {
            reg.set_interest(watched, EV_IN);
        }
        for conn in self.conns.values_mut() {
            if conn.out_len() > 0 && conn.flush().is_err() {
                conn.peer_closed = true;
            }
            let out_open = conn.out_len() < OUT_HIGH_WATER;
            for exec in conn.execs.values_mut() {
                if exec.stdin.as_ref().is_some_and(StdinPipe::can_close) {
                    // The host sent StdinClose and all is written: no credit is owed.
                    let _ = exec.close_stdin(reg);
                }
                if let Some(stdin) = &mut exec.stdin {
                    let interest = if stdin.pending() > 0 { EV_OUT } else { 0 };
                    reg.set_interest(&mut stdin.pipe, interest);
                }
                let out_interest = if out_open { EV_IN } else { 0 };
                for pipe in [&mut exec.stdout, &mut exec.stderr].into_iter().flatten() {
                    reg.set_interest(pipe, out_interest);
                }
                if let Some(report) = &mut exec.report {
                    reg.set_interest(report, EV_IN);
                }
            }
            let mut interest = 0;
            if conn.wants_read() {
                interest |= EV_IN;
            }
            if conn.out_len() > 0 {
                interest |= EV_OUT;
            }
            reg.set_interest(&mut conn.sock, interest);
        }
    }

    /// Milliseconds until the next timeout or drain deadline (-1: none).
    fn next_timeout(&self) -> i32 {
        if self.stop.is_some() {
            return 0;
        }
        let next = self
            .conns
            .values()
            .flat_map(|c| c.execs.values())
            .flat_map(|e| [e.deadline, e.drain_deadline])
            .flatten()
            .min();
        match next {
            None => -1,
            Some(t) => {
                let wait = t.saturating_duration_since(Instant::now());
                // Round up so we never wake just before the deadline and spin.
                let ms = wait.as_millis() + u128::from(wait.subsec_nanos() % 1_000_000 != 0);
                ms.min(i32::MAX as u128) as i32
            }
        }
    }

    fn check_timers(&mut self, now: Instant) {
        for conn in self.conns.values_mut() {
            let backpressured = conn.out_len() >= OUT_HIGH_WATER;
            for exec in conn.execs.values_mut() {
                if exec.deadline.is_some_and(|d| d <= now) {
                    exec.time_out();
                }
                if exec.drain_deadline.is_some_and(|d| d <= now) {
                    if backpressured {
                        // The host is slow, not the pipes: keep waiting.
                        exec.drain_deadline = Some(now + DRAIN_GRACE);
                        continue;
                    }
                    exec.drain_deadline = None;
                    for pipe in [exec.stdout.take(), exec.stderr.take(), exec.report.take()]
                        .into_iter()
                        .flatten()
                    {
                        self.reg.unwatch(pipe);
                    }
                }
            }
        }
    }

    /// Sends `Exit` (or `Error`) for every exec that is completely over.
    fn finish_execs(&mut self) {
        for conn in self.conns.values_mut() {
            let done: Vec<u32> = conn
                .execs
                .iter()
                .filter(|(_, e)| e.is_finished())
                .map(|(id, _)| *id)
                .collect();
            for id in done {
                let Some(exec) = conn.execs.remove(&id) else {
                    continue;
                };
                conn.queue(&exec.final_message());
                if let Some(cg) = exec.teardown(&mut self.reg) {
                    cg.kill();
                    if !cg.try_remove() {
                        self.pending_cgroups.push(cg);
                    }
                }
            }
        }
    }

    fn close_conns(&mut self) {
        let dead: Vec<u32> = self
            .conns
            .iter()
            .filter(|(_, c)| c.closing || c.peer_closed)
            .map(|(id, _)| *id)
            .collect();
        for c in dead {
            let Some(mut conn) = self.conns.remove(&c) else {
                continue;
            };
            let _ = conn.flush();
            self.pids.retain(|_, (owner, _)| *owner != c);
            for (_, exec) in std::mem::take(&mut conn.execs) {
                exec.kill_all();
                if let Some(cg) = exec.teardown(&mut self.reg) {
                    self.pending_cgroups.push(cg);
                }
            }
            self.reg.unwatch(conn.sock);
            if self.first_conn == Some(c)
                && !conn.shutdown_requested
                && self.opts.stop_on_disconnect
            {
                self.stop.get_or_insert(StopReason::HostGone);
            }
        }
    }

    /// Kills every exec and flushes what can still be sent.
    fn kill_everything(&mut self) {
        for conn in self.conns.values_mut() {
            for exec in conn.execs.values() {
                exec.kill_all();
            }
            let _ = conn.flush();
        }
        self.reap();
        for cg in &self.pending_cgroups {
            cg.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::client::{AgentClient, ClientError};

    #[test]
    fn a_refusal_answers_every_connection_with_the_error() {
        let path = serve("refusal", false, Some("cannot mount share mxcfs0 at /w"));
        let answers: Vec<String> = (0..2)
            .map(|_| {
                let stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
                match AgentClient::over_unix(stream) {
                    Err(ClientError::Remote { id: None, message }) => message,
                    other => format!("unexpected: {:?}", other.err()),
                }
            })
            .collect();
        let _ = std::fs::remove_file(&path);

        assert_eq!(answers, ["cannot mount share mxcfs0 at /w"; 2]);
    }

    /// A server on a fresh socket, on its own thread; returns the socket path.
    fn serve(name: &str, accept_setup: bool, refusal: Option<&str>) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("agent-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let opts = Options {
            stop_on_disconnect: false,
            pid1: false,
            max_frame: proto::DEFAULT_MAX_FRAME,
            agent_version: "test".into(),
            refusal: refusal.map(str::to_string),
            accept_setup,
        };
        std::thread::spawn(move || {
            let ctx = SpawnContext {
                cgroups: None,
                reset_oom_score: false,
                is_root: false,
                extra_env: Vec::new(),
                applets: Vec::new(),
            };
            let mut server = Server::new(OwnedFd::from(listener), ctx, opts).unwrap();
            server.run()
        });
        path
    }

    fn remote_message<T: std::fmt::Debug>(r: Result<T, ClientError>) -> String {
        match r {
            Err(ClientError::Remote { message, .. }) => message,
            other => format!("unexpected: {other:?}"),
        }
    }

    #[test]
    fn setup_comes_once_before_any_exec_and_a_failed_one_refuses_execs() {
        let connect = |path: &std::path::Path| {
            AgentClient::over_unix(std::os::unix::net::UnixStream::connect(path).unwrap()).unwrap()
        };
        let echo = || proto::Exec {
            argv: vec!["/bin/echo".into(), "hi".into()],
            ..proto::Exec::default()
        };

        let path = serve("setup-once", true, None);
        let mut client = connect(&path);
        client.setup("", "").unwrap();
        let mut again = connect(&path);
        assert!(remote_message(again.setup("", "")).contains("once"));
        let _ = std::fs::remove_file(&path);

        let path = serve("setup-bad", true, None);
        let mut client = connect(&path);
        let message = remote_message(client.setup("", "mxcfs0:relative:ro"));
        assert!(message.starts_with("mounts:"), "{message}");
        // The same connection may not run commands, and a new one is refused outright.
        let message = remote_message(client.exec_output(echo(), None));
        assert!(message.starts_with("mounts:"), "{message}");
        let stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let message = remote_message(AgentClient::over_unix(stream));
        assert!(message.starts_with("mounts:"), "{message}");
        let _ = std::fs::remove_file(&path);

        let path = serve("setup-refused", false, None);
        let mut client = connect(&path);
        assert!(remote_message(client.setup("", "")).contains("only accepted by the guest's PID 1"));
        let _ = std::fs::remove_file(&path);
    }
}

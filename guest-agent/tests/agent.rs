//! The real agent binary in `--unix` mode, driven by `proto::client::AgentClient` (and,
//! for the malformed-input cases, by hand-made frames on a raw socket).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use proto::client::{AgentClient, ClientError, ExecIo};
use proto::{
    encode_control, encode_frame, Control, Exec, FrameKind, FrameReader, DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
};

type Client = AgentClient<UnixStream, UnixStream>;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The agent under test: `GUEST_AGENT_BIN` (e.g. the static release build that goes
/// into the initramfs) or the binary cargo built for this test run.
fn agent_bin() -> PathBuf {
    std::env::var_os("GUEST_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_guest-agent")))
}

/// A running agent in its own temporary directory; killed on drop.
struct Agent {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl Agent {
    fn start() -> Self {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Self {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("mxc-agent-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        let child = Command::new(agent_bin())
            .arg("--unix")
            .arg(&sock)
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Self { child, dir, sock }
    }

    /// Connects, waiting for the agent to listen (a readiness wait, not a timing check).
    fn raw(&self) -> UnixStream {
        let give_up = Instant::now() + Duration::from_secs(20);
        loop {
            match UnixStream::connect(&self.sock) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    return s;
                }
                Err(e) if Instant::now() < give_up => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("agent never listened on {}: {e}", self.sock.display()),
            }
        }
    }

    fn client(&self) -> Client {
        AgentClient::over_unix(self.raw()).unwrap()
    }

    /// Waits for the agent process to exit on its own.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let give_up = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < give_up, "agent did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An exec as the agent's own user: these tests are about how commands run, and write
/// into the test's directory (`commands_run_as_nobody_unless_root_is_asked` is about who).
fn cmd(argv: &[&str]) -> Exec {
    Exec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::from([("PATH".to_string(), "/usr/bin:/bin".to_string())]),
        root: true,
        ..Exec::default()
    }
}

fn sh(script: &str) -> Exec {
    cmd(&["/bin/sh", "-c", script])
}

/// FNV-1a, 64 bit: enough to compare large outputs.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// Waits (bounded) until `pid` is gone: a SIGKILLed process dies as soon as the kernel
/// schedules it, which on a loaded machine is not instantly.
fn is_gone(pid: u32) -> bool {
    let give_up = Instant::now() + Duration::from_secs(10);
    while !is_gone_now(pid) {
        if Instant::now() > give_up {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Whether `pid` is gone (or dead and only waiting to be reaped).
fn is_gone_now(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn echo_prints_hello() {
    let agent = Agent::start();
    let mut client = agent.client();

    let out = client.exec_output(cmd(&["echo", "hello"]), None).unwrap();

    assert_eq!(out.stdout, b"hello\n");
    assert_eq!((out.exit.code, out.exit.signal), (Some(0), None));
}

#[test]
fn exit_code_comes_back() {
    let agent = Agent::start();
    let mut client = agent.client();

    let out = client
        .exec_output(sh("echo oops >&2; exit 3"), None)
        .unwrap();

    assert_eq!(out.exit.code, Some(3));
    assert_eq!(out.stderr, b"oops\n");
}

#[test]
fn stdin_is_piped_through_cat() {
    let agent = Agent::start();
    let mut client = agent.client();
    let input = b"line one\nline two\n".to_vec();

    let out = client
        .exec_output(cmd(&["cat"]), Some(input.clone()))
        .unwrap();

    assert_eq!(out.stdout, input);
}

#[test]
fn ten_megabytes_each_way_arrive_intact() {
    let agent = Agent::start();
    let mut client = agent.client();
    let input = pseudo_random(10 << 20, 0x9e37_79b9_7f4a_7c15);

    let out = client
        .exec_output(cmd(&["cat"]), Some(input.clone()))
        .unwrap();

    assert_eq!(out.stdout.len(), input.len());
    assert_eq!(fnv1a(&out.stdout), fnv1a(&input));
}

#[test]
fn ten_megabytes_of_output_arrive_intact() {
    let agent = Agent::start();
    let mut client = agent.client();
    let line = b"abcdefghijklmnopqrstuvwxyz0123456789\n";
    let expected: Vec<u8> = line.iter().copied().cycle().take(10_000_000).collect();

    let out = client
        .exec_output(
            sh("yes abcdefghijklmnopqrstuvwxyz0123456789 | head -c 10000000"),
            None,
        )
        .unwrap();

    assert_eq!(out.exit.code, Some(0));
    assert_eq!(out.stdout.len(), expected.len());
    assert_eq!(fnv1a(&out.stdout), fnv1a(&expected));
}

/// Stdin that hands over whatever the test sends, and ends when the sender is dropped.
struct ChannelReader(mpsc::Receiver<Vec<u8>>);

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.recv() {
            Ok(data) => {
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                Ok(n)
            }
            Err(_) => Ok(0),
        }
    }
}

/// Stdout that answers "go" on stdin once it has seen "ready".
struct Responder {
    seen: Vec<u8>,
    reply: Option<mpsc::Sender<Vec<u8>>>,
}

impl Write for Responder {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.seen.extend_from_slice(buf);
        if self.seen.starts_with(b"ready\n") {
            if let Some(tx) = self.reply.take() {
                tx.send(b"go\n".to_vec()).unwrap();
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn output_streams_while_the_process_runs() {
    // The process only finishes after the host reacts to its first line, so this
    // completes only if output is delivered as it is produced.
    let agent = Agent::start();
    let mut client = agent.client();
    let (tx, rx) = mpsc::channel();
    let mut stdout = Responder {
        seen: Vec::new(),
        reply: Some(tx),
    };
    let mut stderr = Vec::new();
    let mut exec = sh("echo ready; read x; echo \"got $x\"");
    exec.timeout_ms = Some(30_000);
    let io = ExecIo::new(&mut stdout, &mut stderr).with_stdin(Box::new(ChannelReader(rx)));

    let exit = client.exec(exec, io).unwrap();

    assert!(!exit.timed_out);
    assert_eq!(stdout.seen, b"ready\ngot go\n");
}

#[test]
fn timeout_kills_the_command_and_its_children() {
    let agent = Agent::start();
    let mut client = agent.client();
    let mut exec = sh("sleep 100 & echo $!; sleep 100");
    exec.timeout_ms = Some(300);

    let out = client.exec_output(exec, None).unwrap();

    let child: u32 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(out.exit.timed_out);
    assert_eq!(out.exit.signal, Some(libc::SIGKILL));
    assert!(
        is_gone(child),
        "background child {child} survived the timeout"
    );
}

#[test]
fn an_enormous_timeout_is_no_timeout() {
    let agent = Agent::start();
    let mut client = agent.client();
    let mut exec = cmd(&["true"]);
    exec.timeout_ms = Some(u64::MAX);

    let out = client.exec_output(exec, None).unwrap();

    assert_eq!((out.exit.code, out.exit.timed_out), (Some(0), false));
}

#[test]
fn leftover_background_processes_are_killed_when_the_command_exits() {
    let agent = Agent::start();
    let mut client = agent.client();

    let out = client
        .exec_output(sh("sleep 100 >/dev/null 2>&1 & echo $!"), None)
        .unwrap();

    let child: u32 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(out.exit.code, Some(0));
    assert!(is_gone(child), "background child {child} outlived its exec");
}

/// Stdout that sends a signal through the client's signaller once it sees "up".
struct SignalOnUp {
    seen: Vec<u8>,
    signaller: Option<proto::client::Signaller<UnixStream>>,
}

impl Write for SignalOnUp {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.seen.extend_from_slice(buf);
        if self.seen.starts_with(b"up\n") {
            if let Some(s) = self.signaller.take() {
                assert!(s.signal(libc::SIGTERM).unwrap());
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn signal_reaches_the_process() {
    let agent = Agent::start();
    let mut client = agent.client();
    let mut stdout = SignalOnUp {
        seen: Vec::new(),
        signaller: Some(client.signaller()),
    };
    let mut stderr = Vec::new();
    let mut exec = sh("echo up; exec sleep 100");
    exec.timeout_ms = Some(30_000);

    let exit = client
        .exec(exec, ExecIo::new(&mut stdout, &mut stderr))
        .unwrap();

    assert_eq!((exit.signal, exit.timed_out), (Some(libc::SIGTERM), false));
}

#[test]
fn environment_is_exactly_what_was_sent() {
    let agent = Agent::start();
    let mut client = agent.client();
    let mut exec = cmd(&["/usr/bin/env"]);
    exec.env = BTreeMap::from([
        ("A".to_string(), "1".to_string()),
        ("B".to_string(), "two words".to_string()),
    ]);

    let out = client.exec_output(exec, None).unwrap();

    let mut lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    assert_eq!(lines, ["A=1", "B=two words"]);
}

#[test]
fn empty_environment_gives_an_empty_env() {
    let agent = Agent::start();
    let mut client = agent.client();
    let mut exec = cmd(&["/usr/bin/env"]);
    exec.env.clear();

    let out = client.exec_output(exec, None).unwrap();

    assert_eq!(out.stdout, b"");
    assert_eq!(out.exit.code, Some(0));
}

#[test]
fn working_directory_is_applied() {
    let agent = Agent::start();
    let mut client = agent.client();
    let mut exec = sh("pwd");
    exec.cwd = Some(agent.dir.to_str().unwrap().to_owned());

    let out = client.exec_output(exec, None).unwrap();

    let expected = format!("{}\n", agent.dir.display());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expected);
}

#[test]
fn default_working_directory_is_root() {
    let agent = Agent::start();
    let mut client = agent.client();

    let out = client.exec_output(sh("pwd"), None).unwrap();

    assert_eq!(out.stdout, b"/\n");
}

#[test]
fn missing_working_directory_is_an_error_for_that_exec() {
    let agent = Agent::start();
    let mut client = agent.client();
    let mut exec = sh("pwd");
    exec.cwd = Some("/nonexistent/dir".into());

    let err = client.exec_output(exec, None).unwrap_err();

    let ClientError::Remote {
        id: Some(_),
        message,
    } = err
    else {
        panic!("expected a remote error, got {err:?}");
    };
    assert!(
        message.starts_with("cannot change to /nonexistent/dir"),
        "{message}"
    );
    assert!(client.ping().is_ok());
}

#[test]
fn missing_program_is_an_error_and_the_connection_goes_on() {
    let agent = Agent::start();
    let mut client = agent.client();

    let err = client
        .exec_output(cmd(&["no-such-program-xyz"]), None)
        .unwrap_err();
    let after = client.exec_output(cmd(&["true"]), None).unwrap();

    let ClientError::Remote { message, .. } = err else {
        panic!("expected a remote error, got {err:?}");
    };
    assert!(
        message.contains("cannot execute \"no-such-program-xyz\""),
        "{message}"
    );
    assert_eq!(after.exit.code, Some(0));
}

#[test]
fn rlimits_are_applied() {
    let agent = Agent::start();
    let mut client = agent.client();
    let mut exec = sh("ulimit -n; ulimit -f");
    exec.rlimits.nofile = Some(64);
    exec.rlimits.fsize = Some(512 * 100);

    let out = client.exec_output(exec, None).unwrap();

    assert_eq!(String::from_utf8(out.stdout).unwrap(), "64\n100\n");
}

#[test]
fn nproc_without_a_pids_cgroup_is_refused_as_root() {
    // Root ignores RLIMIT_NPROC, so without a pids cgroup the limit cannot be enforced
    // and the agent must refuse rather than run the command unlimited.
    assert!(
        nix_is_root(),
        "this test needs root (the agent's nproc rule for root is what it checks)"
    );
    let agent = Agent::start();
    let mut client = agent.client();
    let mut exec = cmd(&["true"]);
    exec.rlimits.nproc = Some(5);

    let err = client.exec_output(exec, None).unwrap_err();

    let ClientError::Remote { message, .. } = err else {
        panic!("expected a remote error, got {err:?}");
    };
    assert!(
        message.contains("rlimits.nproc cannot be enforced"),
        "{message}"
    );
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The attack: a command that kills (or traces, or replaces) the agent. As `nobody` it
/// cannot; as root (asked for) it runs as root. Only meaningful when the agent is root.
#[test]
fn commands_run_as_nobody_unless_root_is_asked() {
    if !nix_is_root() {
        eprintln!("skipped: the agent is not root here");
        return;
    }
    let agent = Agent::start();
    let mut client = agent.client();
    let agent_pid = agent.child.id();
    let as_nobody = Exec {
        root: false,
        ..sh(&format!(
            "id -u; id -g; kill -9 {agent_pid} 2>/dev/null && echo KILLED || echo REFUSED"
        ))
    };
    let nobody = client.exec_output(as_nobody, None).unwrap();
    let root = client.exec_output(sh("id -u"), None).unwrap();

    assert_eq!(
        String::from_utf8_lossy(&nobody.stdout),
        "65534\n65534\nREFUSED\n"
    );
    assert_eq!(String::from_utf8_lossy(&root.stdout), "0\n");
    still_serves(&agent);
}

#[test]
fn two_execs_run_concurrently() {
    // The reader blocks on a FIFO until the writer (on a second connection) opens it:
    // this only finishes if both execs run at the same time.
    let agent = Agent::start();
    let fifo = agent.dir.join("fifo");
    let mut setup = agent.client();
    let made = setup
        .exec_output(cmd(&["mkfifo", fifo.to_str().unwrap()]), None)
        .unwrap();
    assert_eq!(made.exit.code, Some(0));
    let mut reader_exec = cmd(&["cat", fifo.to_str().unwrap()]);
    reader_exec.timeout_ms = Some(30_000);
    let mut writer_exec = sh(&format!("echo through-the-fifo > {}", fifo.display()));
    writer_exec.timeout_ms = Some(30_000);
    let mut reader_client = agent.client();
    let mut writer_client = agent.client();

    let reader = std::thread::spawn(move || reader_client.exec_output(reader_exec, None));
    let writer = std::thread::spawn(move || writer_client.exec_output(writer_exec, None));
    let read = reader.join().unwrap().unwrap();
    let wrote = writer.join().unwrap().unwrap();

    assert_eq!(read.stdout, b"through-the-fifo\n");
    assert!(!read.exit.timed_out && !wrote.exit.timed_out);
}

#[test]
fn shutdown_stops_the_agent() {
    let mut agent = Agent::start();
    let client = agent.client();

    client.shutdown().unwrap();

    assert!(agent.wait_exit().success());
}

#[test]
fn exit_on_disconnect_stops_the_agent_when_the_first_connection_closes() {
    let mut agent = Agent::start_with(&["--exit-on-disconnect"]);
    let mut client = agent.client();
    client.ping().unwrap();

    drop(client);

    assert!(agent.wait_exit().success());
}

#[test]
fn without_exit_on_disconnect_the_agent_outlives_connections() {
    let agent = Agent::start();
    drop(agent.client());

    let mut second = agent.client();

    assert!(second.ping().is_ok());
}

// ---- malformed input on a raw socket ----

/// A raw connection after the handshake (or before it, with `hello = false`).
fn raw_conn(agent: &Agent, hello: bool) -> (UnixStream, FrameReader<UnixStream>) {
    let sock = agent.raw();
    let mut reader = FrameReader::new(sock.try_clone().unwrap());
    let ready = reader.read_frame().unwrap().unwrap().to_control().unwrap();
    assert!(matches!(
        ready,
        Control::Ready {
            version: PROTOCOL_VERSION,
            ..
        }
    ));
    if hello {
        send_control(
            &sock,
            &Control::Hello {
                version: PROTOCOL_VERSION,
                max_frame: DEFAULT_MAX_FRAME,
            },
        );
    }
    (sock, reader)
}

fn send_control(mut sock: &UnixStream, msg: &Control) {
    let mut out = Vec::new();
    encode_control(&mut out, msg, DEFAULT_MAX_FRAME).unwrap();
    sock.write_all(&out).unwrap();
}

fn next_control(reader: &mut FrameReader<UnixStream>) -> Option<Control> {
    reader
        .read_frame()
        .unwrap()
        .map(|f| f.to_control().unwrap())
}

/// The agent closed the connection: an end of stream or, when our bytes were still
/// unread in its queue as it closed, a reset (the kernel's way to say the same).
fn connection_ends(reader: &mut FrameReader<UnixStream>) {
    match reader.read_frame() {
        Ok(None) => {}
        Err(proto::ProtoError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection to end, got {other:?}"),
    }
}

/// The agent still serves a fresh connection.
fn still_serves(agent: &Agent) {
    let mut client = agent.client();
    let out = client.exec_output(cmd(&["echo", "alive"]), None).unwrap();
    assert_eq!(out.stdout, b"alive\n");
}

#[test]
fn unknown_frame_kind_gets_error_then_close() {
    let agent = Agent::start();
    let (mut sock, mut reader) = raw_conn(&agent, true);

    sock.write_all(&[0, 0, 0, 5, 42, 0, 0, 0, 0]).unwrap();

    assert!(matches!(
        next_control(&mut reader),
        Some(Control::Error { id: None, .. })
    ));
    connection_ends(&mut reader);
    still_serves(&agent);
}

#[test]
fn oversized_frame_gets_error_then_close() {
    let agent = Agent::start();
    let (mut sock, mut reader) = raw_conn(&agent, true);

    sock.write_all(&[0xff, 0xff, 0xff, 0xf0, 1]).unwrap();

    let Some(Control::Error { message, .. }) = next_control(&mut reader) else {
        panic!("expected an error");
    };
    assert!(message.contains("exceeds the maximum"), "{message}");
    connection_ends(&mut reader);
    still_serves(&agent);
}

#[test]
fn bad_json_gets_error_and_the_connection_goes_on() {
    let agent = Agent::start();
    let (mut sock, mut reader) = raw_conn(&agent, true);
    let mut bytes = Vec::new();
    encode_frame(
        &mut bytes,
        FrameKind::Control,
        0,
        b"{\"type\":\"exec\",",
        DEFAULT_MAX_FRAME,
    )
    .unwrap();
    encode_frame(
        &mut bytes,
        FrameKind::Control,
        0,
        br#"{"type":"rm_rf"}"#,
        DEFAULT_MAX_FRAME,
    )
    .unwrap();

    sock.write_all(&bytes).unwrap();
    send_control(&sock, &Control::Ping);

    assert!(matches!(
        next_control(&mut reader),
        Some(Control::Error { id: None, .. })
    ));
    assert!(matches!(
        next_control(&mut reader),
        Some(Control::Error { id: None, .. })
    ));
    assert_eq!(next_control(&mut reader), Some(Control::Pong));
}

#[test]
fn version_mismatch_gets_error_then_close() {
    let agent = Agent::start();
    let (sock, mut reader) = raw_conn(&agent, false);

    send_control(
        &sock,
        &Control::Hello {
            version: PROTOCOL_VERSION + 1,
            max_frame: DEFAULT_MAX_FRAME,
        },
    );

    let Some(Control::Error { message, .. }) = next_control(&mut reader) else {
        panic!("expected an error");
    };
    assert!(message.contains("version mismatch"), "{message}");
    connection_ends(&mut reader);
    still_serves(&agent);
}

#[test]
fn truncated_frame_then_hangup_does_not_hurt_the_agent() {
    let agent = Agent::start();
    let (mut sock, _reader) = raw_conn(&agent, true);

    sock.write_all(&[0, 0, 0, 100, 1, 0, 0]).unwrap();
    drop(sock);

    still_serves(&agent);
}

#[test]
fn random_garbage_never_crashes_the_agent() {
    let agent = Agent::start();
    for seed in 1..=50u64 {
        let (mut sock, _reader) = raw_conn(&agent, seed % 2 == 0);
        let mut garbage = pseudo_random(64 + (seed as usize * 37) % 4000, seed);
        if seed % 3 == 0 {
            // Plausible frame header so the body reaches the JSON parser.
            garbage[..9].copy_from_slice(&[0, 0, 0, 40, 1, 0, 0, 0, 0]);
        }
        let _ = sock.write_all(&garbage);
    }

    still_serves(&agent);
}

#[test]
fn hung_up_host_gets_its_exec_killed() {
    let agent = Agent::start();
    let pid_file = agent.dir.join("pid");
    let (sock, mut reader) = raw_conn(&agent, true);
    let mut exec = sh(&format!(
        "echo $$ > {}; echo started; exec sleep 100",
        pid_file.display()
    ));
    exec.id = 1;
    send_control(&sock, &Control::Exec(exec));
    let frame = reader.read_frame().unwrap().unwrap();
    assert_eq!(
        (frame.kind, frame.payload.as_slice()),
        (FrameKind::Stdout, &b"started\n"[..])
    );
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    drop(reader);
    drop(sock);
    // Another round trip: by the time it is answered, the agent has seen the hang-up.
    still_serves(&agent);

    assert!(is_gone(pid), "exec {pid} survived its connection");
}

fn find_cgroup2() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// A fresh cgroup directory for one agent, removed on drop.
struct TestCgroup(PathBuf);

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for e in entries.flatten().filter(|e| e.path().is_dir()) {
                let _ = std::fs::remove_dir(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn test_cgroup() -> Option<TestCgroup> {
    let Some(root) = find_cgroup2() else {
        eprintln!("NOT RUN: no cgroup2 mount on this machine");
        return None;
    };
    let dir = root.join(format!(
        "mxc-agent-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    match std::fs::create_dir(&dir) {
        Ok(()) => Some(TestCgroup(dir)),
        Err(e) => {
            eprintln!(
                "NOT RUN: cannot create a cgroup under {}: {e}",
                root.display()
            );
            None
        }
    }
}

#[test]
fn cgroup_kill_reaches_processes_that_left_the_group() {
    let Some(cg) = test_cgroup() else {
        return;
    };
    let agent = Agent::start_with(&["--cgroup", cg.0.to_str().unwrap()]);
    let mut client = agent.client();
    // setsid puts the sleeper in a new session: the process-group kill cannot reach it,
    // only the exec's cgroup can.
    let f = agent.dir.join("escaped.pid");
    let f = f.display();
    let mut exec = sh(&format!(
        "setsid sh -c 'echo $$ > {f}; exec sleep 100' >/dev/null 2>&1 </dev/null & \
         while [ ! -s {f} ]; do sleep 0.05; done; sleep 100"
    ));
    exec.timeout_ms = Some(2000);

    let out = client.exec_output(exec, None).unwrap();

    let pid_text = std::fs::read_to_string(agent.dir.join("escaped.pid")).unwrap();
    let pid: u32 = pid_text.trim().parse().unwrap();
    assert!(out.exit.timed_out);
    assert!(
        is_gone(pid),
        "escaped process {pid} survived the cgroup kill"
    );
}

#[test]
fn nproc_needs_the_pids_controller_in_the_cgroup() {
    let Some(cg) = test_cgroup() else {
        return;
    };
    let agent = Agent::start_with(&["--cgroup", cg.0.to_str().unwrap()]);
    let mut client = agent.client();
    let controllers = std::fs::read_to_string(cg.0.join("cgroup.subtree_control")).unwrap();
    let mut exec = sh("for i in 1 2 3 4 5 6 7 8; do sleep 1 & done; wait");
    exec.rlimits.nproc = Some(3);

    let result = client.exec_output(exec, None);

    if controllers.split_whitespace().any(|c| c == "pids") {
        let out = result.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("fork") || stderr.contains("Resource"),
            "{stderr}"
        );
    } else {
        let Err(ClientError::Remote { message, .. }) = result else {
            panic!("expected a refusal, got {result:?}");
        };
        assert!(
            message.contains("pids controller is not enabled"),
            "{message}"
        );
    }
}

#[test]
fn many_sequential_execs_on_one_connection() {
    let agent = Agent::start();
    let mut client = agent.client();

    let codes: Vec<i32> = (0..50)
        .map(|i| {
            client
                .exec_output(sh(&format!("exit {}", i % 7)), None)
                .unwrap()
                .exit
                .code
                .unwrap()
        })
        .collect();

    assert_eq!(codes, (0..50).map(|i| i % 7).collect::<Vec<_>>());
}

#[test]
fn agent_cleans_up_its_socket_on_shutdown() {
    let mut agent = Agent::start();
    let client = agent.client();

    client.shutdown().unwrap();
    agent.wait_exit();

    assert!(!Path::new(&agent.sock).exists());
}

#[test]
fn stdin_sent_in_the_same_write_as_its_exec_is_not_lost() {
    let agent = Agent::start();
    let (mut sock, mut reader) = raw_conn(&agent, true);
    let mut exec = cmd(&["cat"]);
    exec.id = 3;
    exec.stdin = true;
    let mut bytes = Vec::new();
    encode_control(&mut bytes, &Control::Exec(exec), DEFAULT_MAX_FRAME).unwrap();
    encode_frame(&mut bytes, FrameKind::Stdin, 3, b"abc", DEFAULT_MAX_FRAME).unwrap();
    encode_control(
        &mut bytes,
        &Control::StdinClose { id: 3 },
        DEFAULT_MAX_FRAME,
    )
    .unwrap();

    sock.write_all(&bytes).unwrap();

    let mut stdout = Vec::new();
    let exit = loop {
        let frame = reader.read_frame().unwrap().unwrap();
        match frame.kind {
            FrameKind::Stdout => stdout.extend(frame.payload),
            _ => match frame.to_control().unwrap() {
                Control::StdinCredit { .. } => {}
                other => break other,
            },
        }
    };
    assert_eq!(stdout, b"abc");
    assert!(matches!(
        exit,
        Control::Exit(proto::Exit {
            id: 3,
            code: Some(0),
            ..
        })
    ));
}

/// The next control message that is not a stdin credit.
fn next_non_credit(reader: &mut FrameReader<UnixStream>) -> Option<Control> {
    loop {
        match next_control(reader) {
            Some(Control::StdinCredit { .. }) => continue,
            other => return other,
        }
    }
}

#[test]
fn a_host_that_does_not_read_stalls_the_producer_not_the_agent_memory() {
    // `yes` writes as fast as it can; nobody reads the connection for a while. Without
    // backpressure the agent would buffer hundreds of megabytes in that time.
    let agent = Agent::start();
    let (sock, mut reader) = raw_conn(&agent, true);
    let mut exec = cmd(&["yes", "0123456789012345678901234567890123456789"]);
    exec.id = 1;
    send_control(&sock, &Control::Exec(exec));

    std::thread::sleep(Duration::from_secs(1));
    let rss = rss_kib(agent.child.id());
    let frame = reader.read_frame().unwrap().unwrap();
    send_control(
        &sock,
        &Control::Signal {
            id: 1,
            signo: libc::SIGKILL,
        },
    );

    assert!(
        rss < 32 * 1024,
        "agent grew to {rss} KiB while the host did not read"
    );
    assert_eq!((frame.kind, frame.stream), (FrameKind::Stdout, 1));
}

#[test]
fn stdin_the_process_does_not_read_stalls_the_host_but_not_signals() {
    // `sleep` never reads stdin. The client may only send one credit window, and then
    // waits; the agent keeps reading the connection, so a Signal still gets through.
    let agent = Agent::start();
    let mut client = agent.client();
    let signaller = client.signaller();
    let mut exec = cmd(&["sleep", "100"]);
    exec.timeout_ms = Some(60_000);
    let endless = Box::new(std::io::repeat(b'x'));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let io = ExecIo::new(&mut out, &mut err).with_stdin(endless);

    let killer = std::thread::spawn(move || {
        // Give the pump time to fill the window; then signal.
        std::thread::sleep(Duration::from_millis(500));
        signaller.signal(libc::SIGKILL).unwrap()
    });
    let exit = client.exec(exec, io).unwrap();
    let rss = rss_kib(agent.child.id());

    assert!(killer.join().unwrap());
    assert_eq!((exit.signal, exit.timed_out), (Some(libc::SIGKILL), false));
    assert!(rss < 32 * 1024, "agent grew to {rss} KiB of unread stdin");
}

#[test]
fn a_host_that_overruns_the_stdin_window_is_cut_off() {
    let agent = Agent::start();
    let (mut sock, mut reader) = raw_conn(&agent, true);
    let mut exec = cmd(&["sleep", "100"]);
    exec.id = 1;
    exec.stdin = true;
    send_control(&sock, &Control::Exec(exec));
    let chunk = vec![b'x'; 64 << 10];
    let mut bytes = Vec::new();
    // Four windows without waiting for credit: more than the window plus what the
    // pipe itself absorbs.
    for _ in 0..(4 * proto::STDIN_WINDOW / chunk.len()) {
        encode_frame(&mut bytes, FrameKind::Stdin, 1, &chunk, DEFAULT_MAX_FRAME).unwrap();
    }

    let _ = sock.write_all(&bytes);

    let Some(Control::Error { message, .. }) = next_non_credit(&mut reader) else {
        panic!("expected an error");
    };
    assert!(message.contains("overran its stdin window"), "{message}");
    connection_ends(&mut reader);
    still_serves(&agent);
}

/// Resident memory of a process, from `/proc/PID/status`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

//! The real agent binary in `--unix` mode with its network proxy relay on
//! (`--proxy-port P --proxy-unix PATH`): TCP connections to 127.0.0.1:P reach the Unix
//! socket at PATH (standing in for the host proxy behind vsock), while the same event
//! loop keeps running commands.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::client::AgentClient;
use proto::Exec;

fn agent_bin() -> PathBuf {
    std::env::var_os("GUEST_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_guest-agent")))
}

/// One agent at a time: each takes a port found free a moment before, and two tests
/// running side by side could be handed the same one (CI saw a relayed connection
/// reset: it had reached the other test's agent, whose host proxy is gone).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// An agent with its relay, in its own temporary directory; killed on drop.
struct Agent {
    child: Child,
    dir: PathBuf,
    port: u16,
    _alone: std::sync::MutexGuard<'static, ()>,
}

impl Agent {
    fn start(tag: &str) -> (Self, UnixListener) {
        let alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let dir = std::env::temp_dir().join(format!("mxc-fwd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let upstream = UnixListener::bind(dir.join("proxy.sock")).unwrap();
        // A free port: bound and released (the agent takes it right after).
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(agent_bin())
            .arg("--unix")
            .arg(dir.join("agent.sock"))
            .args(["--proxy-port", &port.to_string(), "--proxy-unix"])
            .arg(dir.join("proxy.sock"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        (
            Self {
                child,
                dir,
                port,
                _alone: alone,
            },
            upstream,
        )
    }

    /// Connects to the relay, waiting for the agent to listen (a readiness wait).
    fn connect(&self) -> TcpStream {
        let give_up = Instant::now() + Duration::from_secs(20);
        loop {
            match TcpStream::connect(("127.0.0.1", self.port)) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    return s;
                }
                Err(e) => {
                    assert!(Instant::now() < give_up, "the relay never listened: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Connects to the agent, waiting for it to listen (it may bind its relay's port
    /// first: a readiness wait, as for the relay).
    fn client(&self) -> AgentClient<UnixStream, UnixStream> {
        let give_up = Instant::now() + Duration::from_secs(20);
        let sock = loop {
            match UnixStream::connect(self.dir.join("agent.sock")) {
                Ok(sock) => break sock,
                Err(e) => {
                    assert!(Instant::now() < give_up, "the agent never listened: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        AgentClient::over_unix(sock).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_relay_carries_both_directions_while_commands_run() {
    let (agent, upstream) = Agent::start("both");
    let server = std::thread::spawn(move || {
        let (mut s, _) = upstream.accept().unwrap();
        let mut request = Vec::new();
        s.read_to_end(&mut request).unwrap();
        s.write_all(b"reply to ").unwrap();
        s.write_all(&request).unwrap();
    });
    let mut relayed = agent.connect();
    relayed
        .write_all(b"CONNECT a.test:443 HTTP/1.1\r\n\r\n")
        .unwrap();

    let out = agent
        .client()
        .exec_output(
            Exec {
                argv: vec!["echo".into(), "still serving".into()],
                env: BTreeMap::from([("PATH".into(), "/usr/bin:/bin".into())]),
                ..Exec::default()
            },
            None,
        )
        .unwrap();
    relayed.shutdown(Shutdown::Write).unwrap();
    let mut reply = String::new();
    relayed.read_to_string(&mut reply).unwrap();

    server.join().unwrap();
    assert_eq!(out.stdout, b"still serving\n");
    assert_eq!(reply, "reply to CONNECT a.test:443 HTTP/1.1\r\n\r\n");
}

#[test]
fn without_the_host_proxy_the_relay_answers_502() {
    let (agent, upstream) = Agent::start("gone");
    drop(upstream);
    std::fs::remove_file(agent.dir.join("proxy.sock")).unwrap();

    let mut relayed = agent.connect();
    let mut reply = String::new();
    relayed.read_to_string(&mut reply).unwrap();

    assert!(reply.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{reply}");
}

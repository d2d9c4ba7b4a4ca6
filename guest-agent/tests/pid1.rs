//! The agent as a real PID 1: run it as init of fresh user, PID, mount, UTS, IPC and
//! network namespaces (`unshare`), listening on a Unix socket (`--unix`, which PID 1
//! honours instead of vsock). It does its PID-1 work there: mounts (devtmpfs is refused
//! to a user namespace, so `/dev/mem` and the boot timer stay out of reach), host name,
//! loopback, and power-off — `reboot()` from the init of a PID namespace ends that
//! namespace, and its init dies of SIGHUP, which `unshare` passes on to us.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use proto::client::{AgentClient, ClientError};
use proto::Exec;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The agent under test: `GUEST_AGENT_BIN` (e.g. the static release build that goes
/// into the initramfs) or the binary cargo built for this test run.
fn agent_bin() -> PathBuf {
    std::env::var_os("GUEST_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_guest-agent")))
}

struct Init {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl Init {
    fn start() -> Self {
        // Under /tmp on purpose: the agent mounts fresh tmpfs on /tmp in its namespace,
        // so it must bind its socket first (a checkout under /tmp once broke this).
        let dir = std::env::temp_dir().join(format!(
            "pid1-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        let child = Command::new("unshare")
            .args([
                "--user",
                "--map-root-user",
                "--pid",
                "--fork",
                "--mount",
                "--uts",
                "--ipc",
                "--net",
                "--",
            ])
            .arg(agent_bin())
            .arg("--unix")
            .arg(&sock)
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare (util-linux) is needed to run the agent as PID 1");
        Self { child, dir, sock }
    }

    fn client(&self) -> AgentClient<UnixStream, UnixStream> {
        let give_up = Instant::now() + Duration::from_secs(20);
        loop {
            match UnixStream::connect(&self.sock) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    return AgentClient::over_unix(s).unwrap();
                }
                Err(e) => {
                    assert!(
                        Instant::now() < give_up,
                        "agent never listened on {}: {e}",
                        self.sock.display()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    fn wait(&mut self) -> ExitStatus {
        let give_up = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < give_up, "the namespace's init did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Init {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// As root: the agent runs in a user namespace that maps only root, so there is no
/// `nobody` to switch to (and the busybox-style poweroff below needs root).
fn sh(script: &str) -> Exec {
    Exec {
        root: true,
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: BTreeMap::from([(
            "PATH".to_string(),
            "/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        )]),
        ..Exec::default()
    }
}

/// How a PID namespace ends when its init calls `reboot(RB_AUTOBOOT)`.
const POWERED_OFF: Option<i32> = Some(libc::SIGHUP);

#[test]
fn pid1_sets_up_the_system_and_powers_off_on_shutdown() {
    let mut init = Init::start();
    let mut client = init.client();

    let out = client
        .exec_output(
            // A fresh /proc shows our PID namespace (PID 1 is the agent); fresh tmpfs
            // on /tmp and /run are empty.
            sh(
                "hostname; cat /proc/1/comm; ls -A /tmp | wc -l; ls -A /run | wc -l; \
                grep -c -E '^tmpfs /(tmp|run) tmpfs' /proc/mounts",
            ),
            None,
        )
        .unwrap();
    client.shutdown().unwrap();

    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "mxc-vm\nguest-agent\n0\n0\n2\n"
    );
    assert_eq!(init.wait().signal(), POWERED_OFF);
}

#[test]
fn pid1_powers_off_when_the_first_connection_closes() {
    let mut init = Init::start();
    let mut client = init.client();
    client.ping().unwrap();

    drop(client);

    assert_eq!(init.wait().signal(), POWERED_OFF);
}

#[test]
fn pid1_powers_off_on_busybox_style_poweroff_signal() {
    // busybox poweroff/halt/reboot signal PID 1 with SIGUSR2/SIGUSR1/SIGTERM.
    let mut init = Init::start();
    let mut client = init.client();

    let result = client.exec_output(sh("kill -USR2 1; sleep 100"), None);

    assert!(matches!(
        result,
        Err(ClientError::Closed) | Err(ClientError::Proto(_))
    ));
    assert_eq!(init.wait().signal(), POWERED_OFF);
}

#[test]
fn pid1_reaps_orphans() {
    // A grandchild whose parent exits is reparented to PID 1; without a reaper it stays
    // a zombie.
    let mut init = Init::start();
    let mut client = init.client();

    let out = client
        .exec_output(
            sh(
                "sh -c 'sleep 0.1 & echo $!' > /tmp/orphan; pid=$(cat /tmp/orphan); i=0; \
                while [ -e /proc/$pid ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done; \
                if [ -e /proc/$pid ]; then echo stuck; else echo gone; fi",
            ),
            None,
        )
        .unwrap();
    client.shutdown().unwrap();

    assert_eq!(String::from_utf8(out.stdout).unwrap(), "gone\n");
    assert_eq!(init.wait().signal(), POWERED_OFF);
}

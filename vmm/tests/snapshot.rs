//! Snapshots of the real guest (the cached `mxc-vm image build` kernel and initramfs):
//! boot once to the agent's Ready and save, then restore several VMs from that one
//! snapshot and run commands in them; and every way a snapshot can be unusable gives an
//! error naming it, before any guest code runs.
//!
//! One boot (about a minute under kvm_pvm, seconds on hardware KVM) serves every check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use proto::client::AgentClient;
use proto::Exec;
use vmm::{ConsoleMode, ExitReason, PvmMode, Vm, VmConfig, VmmError, VsockConfig};

/// Far above what a boot takes on a busy kvm_pvm host.
const BOOT_LIMIT: Duration = Duration::from_secs(1500);

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mxc-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(work: &Path, name: &str) -> VmConfig {
    let image = guest_image::cached(&guest_image::BuildOptions::default())
        .expect("no guest image is cached: run `mxc-vm image build` (scripts/test.sh does) first");
    let mut config = VmConfig::new(image.vmlinux, 256, 1);
    config.initrd = Some(image.initramfs);
    config.console = ConsoleMode::File(work.join(format!("{name}.console")));
    config.cmdline_extra = format!(
        "{} mxc.port={}",
        guest_image::kernel_cmdline(guest_image::GuestConsole::Logged, false),
        proto::AGENT_VSOCK_PORT
    );
    config.pvm = PvmMode::Auto;
    config.pvm_cmdline = guest_image::KERNEL_CMDLINE_PVM.into();
    config.vsock = Some(VsockConfig {
        guest_cid: proto::GUEST_CID,
        uds_path: work.join(format!("{name}.sock")),
    });
    config
}

/// Run `vm` on a thread, killed after `limit`.
fn spawn(vm: Vm, limit: Duration) -> std::thread::JoinHandle<Result<vmm::VmExitReport, VmmError>> {
    let handle = vm.handle();
    std::thread::spawn(move || {
        let (done, finished) = mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = finished.recv_timeout(limit) {
                handle.kill();
            }
        });
        let report = vm.run();
        drop(done);
        watchdog.join().unwrap();
        report
    })
}

fn connect(
    socket: &Path,
) -> AgentClient<std::os::unix::net::UnixStream, std::os::unix::net::UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let attempt = proto::client::connect_hybrid_vsock_within(
            socket,
            proto::AGENT_VSOCK_PORT,
            Some(Duration::from_secs(15)),
        )
        .map_err(|e| e.to_string())
        .and_then(|s| AgentClient::over_unix(s).map_err(|e| e.to_string()));
        match attempt {
            Ok(client) => return client,
            Err(e) if Instant::now() > deadline => panic!("no agent at {}: {e}", socket.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

type Client = AgentClient<std::os::unix::net::UnixStream, std::os::unix::net::UnixStream>;

/// Run `script` as the microVM backend does: with fresh host entropy and the host's
/// time (`fresh`), or as an exec without them.
fn sh_with(client: &mut Client, script: &str, fresh: bool) -> (i32, String) {
    let mut entropy = vec![0u8; 32];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").unwrap(),
        &mut entropy,
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let exec = Exec {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        cwd: Some("/".into()),
        root: true,
        entropy: if fresh { entropy } else { Vec::new() },
        wall_clock_ns: fresh.then_some(now.as_nanos() as u64),
        ..Exec::default()
    };
    let out = client.exec_output(exec, None).unwrap();
    (
        out.exit.code.unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn sh(client: &mut Client, script: &str) -> (i32, String) {
    sh_with(client, script, true)
}

fn snapshot_error(result: Result<Vm, VmmError>) -> String {
    match result {
        Err(VmmError::Snapshot(e)) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        }
        Err(other) => panic!("expected a snapshot error, got {other:?}"),
        Ok(_) => panic!("a bad snapshot was restored"),
    }
}

#[test]
fn one_snapshot_restores_into_many_separate_vms_and_bad_snapshots_are_refused() {
    let work = TempDir::new("e2e");
    let dir = work.0.join("ready");

    // Boot to Ready and save.
    let mut save = config(&work.0, "boot");
    save.snapshot = Some(vmm::SnapshotMode::SaveAtReady(dir.clone()));
    let started = Instant::now();
    let report = spawn(Vm::new(save).unwrap(), BOOT_LIMIT).join().unwrap();
    let console = std::fs::read_to_string(work.0.join("boot.console")).unwrap_or_default();
    let report = report.unwrap_or_else(|e| panic!("saving failed: {e:?}\n{console}"));
    assert_eq!(report.reason, ExitReason::Saved, "{console}");
    eprintln!("boot + save: {:?}", started.elapsed());
    for file in [vmm::snapshot::STATE_FILE, vmm::snapshot::MEMORY_FILE] {
        let mode = std::fs::metadata(dir.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }

    // Two VMs from the one snapshot, at the same time: each runs commands, and what one
    // writes the other does not see.
    let mut clients = Vec::new();
    let mut vms = Vec::new();
    for name in ["a", "b"] {
        let mut restore = config(&work.0, "boot");
        restore.vsock.as_mut().unwrap().uds_path = work.0.join(format!("{name}.sock"));
        restore.console = ConsoleMode::File(work.0.join(format!("{name}.console")));
        restore.snapshot = Some(vmm::SnapshotMode::Restore(dir.clone()));
        let started = Instant::now();
        let vm = Vm::new(restore).unwrap_or_else(|e| panic!("restore {name}: {e:?}"));
        vms.push(spawn(vm, Duration::from_secs(600)));
        let client = connect(&work.0.join(format!("{name}.sock")));
        eprintln!(
            "restore {name} to a connected agent: {:?}",
            started.elapsed()
        );
        clients.push(client);
    }
    // Restored from one snapshot, both guests start with one random state; what a
    // command reads must differ all the same, and the clock must be the host's.
    let random = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let stale: Vec<String> = clients
        .iter_mut()
        .map(|c| sh_with(c, random, false).1)
        .collect();
    eprintln!("without reseeding: {stale:?}");
    let fresh: Vec<String> = clients.iter_mut().map(|c| sh(c, random).1).collect();
    assert_ne!(
        fresh[0], fresh[1],
        "two restored VMs read the same random bytes"
    );
    assert_eq!(fresh[0].len(), 32, "{fresh:?}");
    for client in &mut clients {
        let host = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let (_, out) = sh(client, "date +%s");
        let guest: u64 = out.trim().parse().unwrap();
        assert!(
            guest.abs_diff(host) <= 5,
            "guest clock {guest}, host {host}"
        );
    }
    let (code, out) = sh(&mut clients[0], "echo secret > /tmp/mark && echo written");
    assert_eq!((code, out.trim()), (0, "written"));
    let (code, out) = sh(&mut clients[1], "cat /tmp/mark 2>/dev/null || echo absent");
    assert_eq!((code, out.trim()), (0, "absent"));
    for client in &mut clients {
        let (code, out) = sh(client, "echo hello; exit 3");
        assert_eq!((code, out.trim()), (3, "hello"));
    }
    drop(clients);
    for vm in vms {
        let report = vm.join().unwrap().unwrap();
        assert_eq!(report.reason, ExitReason::GuestReset, "{report:?}");
    }

    // Every unusable snapshot is refused before the guest runs, naming why.
    let restore_with = |edit: &dyn Fn(&mut VmConfig)| {
        let mut restore = config(&work.0, "boot");
        restore.vsock.as_mut().unwrap().uds_path = work.0.join("bad.sock");
        restore.snapshot = Some(vmm::SnapshotMode::Restore(dir.clone()));
        edit(&mut restore);
        let _ = std::fs::remove_file(work.0.join("bad.sock"));
        snapshot_error(Vm::new(restore))
    };
    let text = restore_with(&|c| c.mem_mib = 512);
    assert!(
        text.contains("guest memory (MiB) 256, but this VM has 512"),
        "{text}"
    );
    let text = restore_with(&|c| c.cmdline_extra.push_str(" quiet"));
    assert!(text.contains("guest command line"), "{text}");

    let memory = dir.join(vmm::snapshot::MEMORY_FILE);
    let state = dir.join(vmm::snapshot::STATE_FILE);
    let original = std::fs::read(&state).unwrap();

    std::fs::set_permissions(&memory, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = restore_with(&|_| {});
    assert!(text.contains("readable by other users"), "{text}");
    std::fs::set_permissions(&memory, std::fs::Permissions::from_mode(0o600)).unwrap();

    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&memory)
            .unwrap();
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, 0x10_0000).unwrap();
        file.write_all_at(&[byte[0] ^ 0xff], 0x10_0000).unwrap();
        let text = restore_with(&|_| {});
        assert!(
            text.contains("guest memory does not match its checksum"),
            "{text}"
        );
        file.write_all_at(&byte, 0x10_0000).unwrap();
    }

    std::fs::write(&state, &original[..original.len() / 2]).unwrap();
    let text = restore_with(&|_| {});
    assert!(text.contains("does not match its checksum"), "{text}");
    std::fs::write(&state, b"").unwrap();
    let text = restore_with(&|_| {});
    assert!(text.contains("no header line"), "{text}");
    std::fs::write(&state, &original).unwrap();

    std::fs::remove_file(&memory).unwrap();
    let text = restore_with(&|_| {});
    assert!(
        text.contains("cannot open") && text.contains("memory"),
        "{text}"
    );
}

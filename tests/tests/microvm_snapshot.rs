//! Warm start: `mxc-vm image build` boots the image once and saves its ready snapshot;
//! `mxc-vm run` then starts every VM it can from that snapshot, with the policy's shares
//! bound to the snapshot's slots and mounted after the restore. Each restored VM gets its
//! own random state and the host's clock, sees its own files only, and passes exit codes
//! and written files through; an unusable snapshot is said in one line and booted
//! around.
//!
//! The test keeps its snapshots in a cache of its own (the built kernel and initramfs
//! linked in), so it can damage them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use policy::{Policy, PolicySource};
use sandbox::microvm::{MicrovmBackend, MicrovmOptions};
use sandbox::output::{Collect, StdinMode};
use sandbox::{Backend, ExecIo, ExecRequest, ExitKind, SandboxSpec};
use tests::{code, mxc_vm_bin, require_kvm, stderr, stdout, TempDir};

/// A cache directory holding the built image (linked) and no snapshot.
fn private_cache(tmp: &TempDir) -> PathBuf {
    let image = guest_image::cached(&guest_image::BuildOptions::default())
        .expect("no guest image is cached: run `mxc-vm image build` (scripts/test.sh does) first");
    let cache = tmp.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let kernel_dir = image.vmlinux.parent().unwrap();
    let kernel_root = kernel_dir.parent().unwrap();
    std::fs::create_dir_all(cache.join("kernel")).unwrap();
    std::os::unix::fs::symlink(
        kernel_dir,
        cache
            .join("kernel")
            .join(kernel_dir.strip_prefix(kernel_root).unwrap()),
    )
    .unwrap();
    let initramfs_dir = image.initramfs.parent().unwrap();
    std::os::unix::fs::symlink(initramfs_dir, cache.join("initramfs")).unwrap();
    cache
}

fn mxc_vm(cache: &Path, args: &[&str]) -> Output {
    Command::new(mxc_vm_bin())
        .args(args)
        .env("MXC_VM_CACHE_DIR", cache)
        .stdin(Stdio::null())
        .output()
        .expect("spawn mxc-vm")
}

fn restored(out: &Output) -> bool {
    !stderr(out).contains("booting the guest kernel")
}

fn vm(cache: &Path, name: &str) -> MicrovmBackend {
    let spec = SandboxSpec {
        policy: Policy::empty(PolicySource::Cli),
        view: policy::FsView::default(),
        id: format!("snap-{name}-{}", std::process::id()),
        net: Default::default(),
    };
    let mut vm = MicrovmBackend::new(MicrovmOptions {
        vmm_binary: Some(mxc_vm_bin()),
        image: guest_image::BuildOptions {
            cache_dir: Some(cache.to_path_buf()),
            ..Default::default()
        },
        ..MicrovmOptions::default()
    });
    vm.provision(&spec).expect("provision");
    vm.start().expect("start");
    assert!(vm.timeline.restored, "{name} was booted, not restored");
    vm
}

fn sh(vm: &mut MicrovmBackend, script: &str) -> String {
    let req = ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec![],
        cwd: None,
        timeout: Some(Duration::from_secs(300)),
    };
    let mut out = Collect::default();
    let outcome = {
        let mut io = ExecIo {
            stdin: StdinMode::Null,
            sink: Some(&mut out),
            output_limit: None,
        };
        vm.exec(&req, &mut io).expect("exec")
    };
    assert_eq!(outcome.exit, ExitKind::Code(0), "{script}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_ready_snapshot_starts_many_separate_vms_and_a_bad_one_is_booted_around() {
    require_kvm();
    let tmp = TempDir::new("snapshot");
    let cache = private_cache(&tmp);

    // No snapshot yet: run says so in one line and boots.
    let started = Instant::now();
    let out = mxc_vm(&cache, &["run", "--backend", "microvm", "--", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no ready snapshot has been made"),
        "{}",
        stderr(&out)
    );
    let cold = started.elapsed();

    // image build finds the image cached and makes the snapshot.
    let out = mxc_vm(&cache, &["image", "build", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let dir: PathBuf = stdout(&out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["type"] == "snapshot")
        .and_then(|v| v["path"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("no snapshot line: {}", stdout(&out)));
    for file in ["vm.json", "memory"] {
        let mode = std::fs::metadata(dir.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }

    // A run with the default system view and a read-write grant starts from it: the
    // shares are mounted, what the command writes is on the host, its exit code comes
    // back.
    let work = tmp.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let script = format!(
        "echo from-guest > {w}/out && ls /usr/bin/env && exit 7",
        w = work.display()
    );
    let started = Instant::now();
    let out = mxc_vm(
        &cache,
        &[
            "run",
            "--backend",
            "microvm",
            "--rw",
            work.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            &script,
        ],
    );
    let warm = started.elapsed();
    eprintln!("run -- true booted: {cold:?}; run restored with shares: {warm:?}");
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert!(restored(&out), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "/usr/bin/env");
    assert_eq!(
        std::fs::read_to_string(work.join("out")).unwrap(),
        "from-guest\n"
    );

    // Two VMs at once from the one snapshot: their own /tmp, their own random bytes,
    // the host's time.
    let mut a = vm(&cache, "a");
    let mut b = vm(&cache, "b");
    assert_eq!(
        sh(&mut a, "echo secret > /tmp/mark && cat /tmp/mark"),
        "secret"
    );
    assert_eq!(
        sh(&mut b, "cat /tmp/mark 2>/dev/null || echo absent"),
        "absent"
    );
    let random = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let (ra, rb) = (sh(&mut a, random), sh(&mut b, random));
    assert_eq!(ra.len(), 32, "{ra}");
    assert_ne!(ra, rb, "two restored VMs read the same random bytes");
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    for vm in [&mut a, &mut b] {
        let before = now();
        let guest: u64 = sh(vm, "date +%s").parse().unwrap();
        let after = now();
        assert!(
            (before.saturating_sub(1)..=after + 1).contains(&guest),
            "guest {guest}, host {before}..{after}"
        );
    }
    for mut vm in [a, b] {
        vm.stop().unwrap();
        vm.deprovision().unwrap();
    }

    // A snapshot others could read is not used: said in one line, booted around.
    let memory = dir.join("memory");
    std::fs::set_permissions(&memory, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = mxc_vm(&cache, &["run", "--backend", "microvm", "--", "echo", "hi"]);
    assert_eq!(
        (code(&out), stdout(&out).trim()),
        (0, "hi"),
        "{}",
        stderr(&out)
    );
    let notice = stderr(&out);
    assert!(
        notice.contains("the ready snapshot cannot be used")
            && notice.contains("readable by other users"),
        "{notice}"
    );
    std::fs::set_permissions(&memory, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A damaged memory file is caught by its checksum before the guest runs.
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
    }
    let out = mxc_vm(&cache, &["run", "--backend", "microvm", "--", "true"]);
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("guest memory does not match its checksum"),
        "{}",
        stderr(&out)
    );

    // --cold never looks at the snapshot.
    let out = mxc_vm(
        &cache,
        &[
            "run",
            "--backend",
            "microvm",
            "--cold",
            "--",
            "echo",
            "cold",
        ],
    );
    assert_eq!(
        (code(&out), stdout(&out).trim()),
        (0, "cold"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("snapshot"), "{}", stderr(&out));
}

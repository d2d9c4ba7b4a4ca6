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
use sandbox::microvm::{MicrovmBackend, MicrovmOptions, PoolOptions, WarmPool};
use sandbox::output::{Collect, StdinMode};
use sandbox::{Backend, ExecIo, ExecRequest, ExitKind, SandboxSpec};
use tests::{code, mxc_vm_bin, pids_with, require_kvm, stderr, stdout, TempDir};

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
            signals: None,
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

    // Where only other versions' snapshots are, run says so too (the boot is cut short:
    // the line comes before it).
    let hidden = dir.with_extension("other-version");
    std::fs::rename(&dir, &hidden).unwrap();
    let out = mxc_vm(
        &cache,
        &[
            "run",
            "--backend",
            "microvm",
            "--boot-timeout",
            "1s",
            "--",
            "true",
        ],
    );
    std::fs::rename(&hidden, &dir).unwrap();
    assert!(
        stderr(&out).contains("no ready snapshot for this version of mxc-vm"),
        "{}",
        stderr(&out)
    );

    // A run with the default system view and a read-write grant starts from it: the
    // shares are mounted, what the command writes is on the host, its exit code comes
    // back.
    let work = tmp.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let script = format!(
        "echo from-guest > {w}/out && ls /usr/bin/env && cut -d' ' -f1 /proc/uptime && exit 7",
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
    let printed = stdout(&out);
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.first(), Some(&"/usr/bin/env"), "{printed}");
    let first_uptime: f64 = lines[1].parse().unwrap();
    let first_restored = Instant::now();
    assert_eq!(
        std::fs::read_to_string(work.join("out")).unwrap(),
        "from-guest\n"
    );

    // The guest's monotonic clock goes on from where the snapshot left it: time the
    // snapshot lay on disk does not pass inside a restored VM (a guest that saw it
    // jump would find its timers late by that much; under kvm_pvm its RCU stall
    // report cost every restore a second of emulated kernel work).
    std::thread::sleep(Duration::from_secs(10).saturating_sub(first_restored.elapsed()));
    let mut a = vm(&cache, "a");
    let uptime: f64 = sh(&mut a, "cut -d' ' -f1 /proc/uptime").parse().unwrap();
    assert!(
        uptime - first_uptime < 6.0,
        "a VM restored {:?} after another has {uptime} s of uptime, the other had {first_uptime} s",
        first_restored.elapsed()
    );

    // Two VMs at once from the one snapshot: their own /tmp, their own random bytes,
    // the host's time.
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

    warm_pool_vms_take_the_policy_of_whoever_adopts_them(&tmp, &cache, &dir);
    killed_restores_leave_nothing_behind(&tmp, &cache, &dir);
    serve_takes_microvm_sandboxes_from_its_warm_pool(&cache);

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

/// A backend given a warm pool adopts one of its waiting VMs: the VM gets this backend's
/// shares (bound into its slots over the VMM's control socket) and mounts, and the pool
/// refills behind it. Two adopted VMs with different policies each see only their own.
fn warm_pool_vms_take_the_policy_of_whoever_adopts_them(
    tmp: &TempDir,
    cache: &Path,
    snapshot: &Path,
) {
    let image = guest_image::BuildOptions {
        cache_dir: Some(cache.to_path_buf()),
        ..Default::default()
    };
    let pool = WarmPool::new(PoolOptions {
        size: 2,
        vmm_binary: Some(mxc_vm_bin()),
        image: image.clone(),
        ..PoolOptions::default()
    })
    .unwrap();
    let status = pool.wait_full(Duration::from_secs(600));
    assert_eq!((status.ready, &status.stopped), (2, &None), "{status:?}");

    let (rw, ro) = (tmp.join("pool-rw"), tmp.join("pool-ro"));
    for dir in [&rw, &ro] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("seen"), dir.display().to_string()).unwrap();
    }
    let adopt = |name: &str, overrides: policy::Overrides| {
        let mut policy = Policy::empty(PolicySource::Cli);
        policy
            .apply_overrides_at(&overrides, Path::new("/"))
            .unwrap();
        let view = policy::resolve_fs(&policy.filesystem, Path::new("/")).unwrap();
        let spec = SandboxSpec {
            policy,
            view,
            id: format!("pool-{name}-{}", std::process::id()),
            net: Default::default(),
        };
        let mut vm = MicrovmBackend::new(MicrovmOptions {
            vmm_binary: Some(mxc_vm_bin()),
            image: image.clone(),
            pool: Some(pool.clone()),
            ..MicrovmOptions::default()
        });
        vm.provision(&spec).expect("provision");
        vm.start().expect("start");
        assert!(vm.timeline.pooled, "{name} did not come from the pool");
        vm
    };
    let mut writer = adopt(
        "rw",
        policy::Overrides {
            rw: vec![rw.clone()],
            ..Default::default()
        },
    );
    let mut reader = adopt(
        "ro",
        policy::Overrides {
            ro: vec![ro.clone()],
            ..Default::default()
        },
    );
    let (rw_s, ro_s) = (rw.display().to_string(), ro.display().to_string());
    assert_eq!(
        sh(
            &mut writer,
            &format!(
                "cat {rw_s}/seen; echo pooled > {rw_s}/out; test -e {ro_s} && echo shown || echo hidden"
            )
        ),
        format!("{rw_s}hidden")
    );
    assert_eq!(std::fs::read_to_string(rw.join("out")).unwrap(), "pooled\n");
    // A jailed VMM (run as root) was given the share in its first slot, from outside its
    // jail: the host path itself is no mount point of its namespace.
    if sandbox::host::vmm_jailed() {
        let pid = writer.vmm_pid().unwrap();
        let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        let points: Vec<&str> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .collect();
        assert!(points.contains(&"/.mxc-slots/0"), "{mountinfo}");
        assert!(!points.contains(&rw_s.as_str()), "{mountinfo}");
        // The snapshot it was restored from, which every later VM restores from too, is
        // read-only to it: a VMM taken over by its guest cannot plant its guest's state
        // in the VMs that come after.
        for file in ["memory", "vm.json"] {
            let theirs = format!("/proc/{pid}/root{}/{file}", snapshot.display());
            let opened = std::fs::OpenOptions::new().append(true).open(&theirs);
            assert_eq!(
                opened.map_err(|e| e.raw_os_error()).err(),
                Some(Some(libc::EROFS)),
                "the restored VMM can write {theirs}"
            );
        }
    }
    assert_eq!(
        sh(
            &mut reader,
            &format!(
                "cat {ro_s}/seen; echo; touch {ro_s}/new 2>/dev/null || echo refused; test -e {rw_s} && echo shown || echo hidden"
            )
        ),
        format!("{ro_s}\nrefused\nhidden")
    );
    assert!(!ro.join("new").exists());
    let status = pool.wait_full(Duration::from_secs(600));
    assert_eq!(
        (status.ready, status.taken),
        (2, 2),
        "the pool refills: {status:?}"
    );
    for mut vm in [writer, reader] {
        vm.stop().unwrap();
        vm.deprovision().unwrap();
    }
    let pids = pool.vmm_pids();
    drop(pool);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "a pooled VMM outlived its pool: {pid}"
        );
    }
}

/// `kill -9` of the VMM while it restores, and of `mxc-vm` itself: no process, runtime
/// directory or socket is left (a dead mxc-vm's directory is swept by the next run), and
/// the snapshot is as it was.
fn killed_restores_leave_nothing_behind(tmp: &TempDir, cache: &Path, snapshot: &Path) {
    let runtime = tmp.join("runtime");
    std::fs::create_dir_all(&runtime).unwrap();
    let listing = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            // A restore may record its checksum of a settled memory file.
            .filter(|n| n != vmm::snapshot::VERIFIED_FILE)
            .collect();
        names.sort();
        names
    };
    let before = listing(snapshot);
    let run = |argv: &[&str]| {
        Command::new(mxc_vm_bin())
            .args(argv)
            .env("MXC_VM_CACHE_DIR", cache)
            .env("XDG_RUNTIME_DIR", &runtime)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let wait_gone = |marker: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pids_with(marker).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(pids_with(marker), Vec::<u32>::new(), "processes left");
    };
    for victim in ["the VMM", "mxc-vm"] {
        let child = run(&["run", "--backend", "microvm", "--", "sleep", "60"]);
        let marker = format!("mxc-vm-{}-", child.id());
        // The VMM shows up the moment it is spawned to restore.
        let deadline = Instant::now() + Duration::from_secs(120);
        let vmm = loop {
            if let Some(&pid) = pids_with(&format!("__vmm {}", runtime.display())).first() {
                break pid;
            }
            assert!(Instant::now() < deadline, "no VMM appeared");
            std::thread::sleep(Duration::from_millis(1));
        };
        let target = if victim == "the VMM" { vmm } else { child.id() };
        // SAFETY: kill() on a pid this test started (or its child); no memory involved.
        unsafe { libc::kill(target as i32, libc::SIGKILL) };
        let out = child.wait_with_output().unwrap();
        wait_gone(&marker);
        if victim == "the VMM" {
            assert_eq!(code(&out), 125, "{}", stderr(&out));
            assert!(stderr(&out).contains("VMM"), "{}", stderr(&out));
        } else {
            // The next run sweeps what the killed one left.
            let next = run(&["run", "--backend", "microvm", "--", "true"])
                .wait_with_output()
                .unwrap();
            assert_eq!(code(&next), 0, "{}", stderr(&next));
        }
        let left: Vec<String> = listing(&runtime)
            .into_iter()
            .filter(|n| n.starts_with(&marker))
            .collect();
        assert!(left.is_empty(), "after killing {victim}: {left:?} left");
        let sockets = std::fs::read_to_string("/proc/net/unix")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&marker))
            .count();
        assert_eq!(sockets, 0, "after killing {victim}: sockets left");
    }
    assert_eq!(listing(snapshot), before, "the snapshot directory changed");
}

/// `mxc-vm serve --warm-pool 1`: a microVM sandbox takes the waiting VM, runs commands,
/// and the metrics say so; the service leaves no VMM behind when it stops.
fn serve_takes_microvm_sandboxes_from_its_warm_pool(cache: &Path) {
    let server =
        tests::serve::Server::start_with_env(&["--warm-pool", "1"], &[("MXC_VM_CACHE_DIR", cache)]);
    let metric = |name: &str| -> Option<u64> {
        let reply = server.call("GET", "/metrics", b"");
        String::from_utf8_lossy(&reply.body)
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_string))
            .and_then(|v| v.parse().ok())
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while metric("mxc_warm_pool_ready") != Some(1) {
        assert_eq!(metric("mxc_warm_pool_stopped"), Some(0), "the pool stopped");
        assert!(Instant::now() < deadline, "the pool never filled");
        std::thread::sleep(Duration::from_millis(200));
    }
    let reply = server.json(
        "POST",
        "/v1/sandboxes",
        serde_json::json!({"backend": "microvm"}),
    );
    assert_eq!(
        reply.status,
        201,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let id = reply.json()["id"].as_str().unwrap().to_string();
    assert_eq!(metric("mxc_warm_pool_taken_total"), Some(1));
    assert_eq!(metric("mxc_warm_pool_missed_total"), Some(0));
    let reply = server.json(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        serde_json::json!({"argv": ["sh", "-c", "echo pooled; exit 3"]}),
    );
    let events = reply.lines();
    let out: Vec<u8> = events
        .iter()
        .filter(|e| e["type"] == "stdout")
        .flat_map(|e| tests::serve::unb64(e["data_b64"].as_str().unwrap()))
        .collect();
    assert_eq!(String::from_utf8_lossy(&out), "pooled\n", "{events:?}");
    assert_eq!(events.last().unwrap()["exit_code"], 3, "{events:?}");
    let marker = format!("mxc-vm-{}-", server.child.id());
    assert_eq!(
        server.stop(),
        128 + libc::SIGTERM,
        "SIGTERM ends the service"
    );
    assert_eq!(
        pids_with(&marker),
        Vec::<u32>::new(),
        "a VMM outlived the service"
    );
}

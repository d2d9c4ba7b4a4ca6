//! virtio-fs shares in a real microVM guest, end to end: the policy's files as the guest
//! sees them, the host as the enforcement point, data safety when the VMM is killed.
//!
//! A boot takes minutes under the nested kvm_pvm hypervisor of our CI machines, so this
//! file boots as few VMs as it can: one VM runs every single-guest check; a second one,
//! started at the same time, shares one read-write directory with the first for the
//! concurrency check and is then SIGKILLed for the durability check; the `mxc-vm run`
//! check of the "done when" boots the third, from the binary, after them. Sizes
//! are modest: every new guest page costs milliseconds under PVM (`mxc-vm bench fs`
//! measures the larger runs). Where /dev/kvm is missing these tests fail: they never
//! skip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use policy::{Overrides, Policy, PolicySource};
use sandbox::microvm::{MicrovmBackend, MicrovmOptions};
use sandbox::output::{Collect, StdinMode};
use sandbox::{Backend, ExecIo, ExecRequest, SandboxSpec};
use tests::{code, mxc_vm_bin, pids_with, require_kvm, stderr, stdout, TempDir};

/// The sandbox spec for `--ro`, `--rw` and `--deny` flags, resolved as `mxc-vm run` does.
fn spec(id: &str, ro: &[PathBuf], rw: &[PathBuf], deny: &[PathBuf]) -> SandboxSpec {
    let mut policy = Policy::empty(PolicySource::Cli);
    let overrides = Overrides {
        ro: ro.to_vec(),
        rw: rw.to_vec(),
        deny: deny.to_vec(),
        ..Overrides::default()
    };
    policy
        .apply_overrides_at(&overrides, Path::new("/"))
        .unwrap();
    let view = policy::resolve_fs(&policy.filesystem, Path::new("/")).unwrap();
    SandboxSpec {
        policy,
        view,
        id: format!("{id}-{}", std::process::id()),
        net: Default::default(),
    }
}

/// At most this file's two VMs boot at once: an emulated guest kernel that gets too little
/// CPU spends all of it on timer ticks and stops making progress.
static ONE_TEST_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serialize() -> std::sync::MutexGuard<'static, ()> {
    ONE_TEST_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Boots here take minutes, more when several VMs (ours and other jobs') share the two
/// cores: give them time rather than fail on a busy machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(1800);

fn boot(spec: &SandboxSpec) -> MicrovmBackend {
    let mut vm = MicrovmBackend::new(MicrovmOptions {
        vmm_binary: Some(mxc_vm_bin()),
        boot_timeout: Some(BOOT_TIMEOUT),
        ..MicrovmOptions::default()
    });
    vm.provision(spec)
        .expect("provision (is the guest image built?)");
    let start = Instant::now();
    vm.start().expect("boot to agent ready");
    eprintln!("{} booted in {:?}", spec.id, start.elapsed());
    vm
}

/// What one shell script in the guest gave.
#[derive(Debug)]
struct Ran {
    code: i32,
    out: String,
    err: String,
}

fn sh(vm: &mut MicrovmBackend, script: &str) -> Ran {
    let req = ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec![],
        cwd: None,
        timeout: Some(Duration::from_secs(900)),
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
    let code = match outcome.exit {
        sandbox::ExitKind::Code(c) => c,
        sandbox::ExitKind::Signal(s) => 128 + s,
    };
    Ran {
        code,
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `sha256sum` of a host file (the guest uses the same tool).
fn host_sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    stdout(&out)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Deterministic bytes (xorshift), so a corrupted copy cannot match by chance.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Small files, and the big file's size: full on hardware KVM (the nested lane runs these
/// in two minutes); smaller under kvm_pvm, where the guest kernel is emulated and these
/// took a quarter of an hour of the CI run (`mxc-vm bench fs` measures large runs).
fn small_files() -> usize {
    if under_pvm() {
        500
    } else {
        2000
    }
}

fn big_mib() -> usize {
    if under_pvm() {
        16
    } else {
        64
    }
}

fn under_pvm() -> bool {
    !vmm::hypervisor::host_flavour().is_hardware()
}
/// Files each VM writes into the directory both share.
const SHARED_FILES: usize = 100;

/// The host tree both VMs see.
struct Tree {
    dir: TempDir,
}

impl Tree {
    fn new() -> Self {
        let dir = TempDir::new("vmfs");
        std::fs::create_dir_all(dir.join("ro/small")).unwrap();
        std::fs::create_dir_all(dir.join("rw/sub")).unwrap();
        std::fs::create_dir_all(dir.join("shared")).unwrap();
        std::fs::write(dir.join("ro/ro.txt"), b"read-only content\n").unwrap();
        std::fs::write(dir.join("rw/.env"), b"TOKEN=host-secret\n").unwrap();
        std::fs::write(dir.join("outside.txt"), b"not shared\n").unwrap();
        std::os::unix::fs::symlink("/etc/shadow", dir.join("rw/host-made-link")).unwrap();
        for i in 0..small_files() {
            let body = format!("small file {i}\n{}\n", "x".repeat(i % 97));
            std::fs::write(dir.join(&format!("ro/small/f{i:04}")), body).unwrap();
        }
        std::fs::write(
            dir.join("ro/big.bin"),
            pseudo_random(big_mib() << 20, 0x5eed),
        )
        .unwrap();
        Self { dir }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn s(&self, rel: &str) -> String {
        self.dir.s(rel)
    }
}

/// The single-guest checks, in one VM.
fn single_guest_checks(vm: &mut MicrovmBackend, t: &Tree) {
    // A read-only file reads.
    let r = sh(vm, &format!("cat {}", t.s("ro/ro.txt")));
    assert_eq!(
        (r.code, r.out.as_str()),
        (0, "read-only content\n"),
        "{r:?}"
    );

    // Writing a read-only share fails (EROFS) and the host file is unchanged.
    let r = sh(
        vm,
        &format!(
            "echo changed > {ro}; echo $?; touch {dir}/new 2>&1; echo $?; rm -f {ro} 2>&1; echo $?",
            ro = t.s("ro/ro.txt"),
            dir = t.s("ro")
        ),
    );
    assert!(r.err.contains("Read-only file system"), "{r:?}");
    assert!(!r.out.lines().any(|l| l == "0"), "{r:?}");
    assert_eq!(
        std::fs::read(t.p("ro/ro.txt")).unwrap(),
        b"read-only content\n"
    );
    assert!(!t.p("ro/new").exists());

    // Writing a read-write share lands on the host.
    let r = sh(vm, &format!("echo from-guest > {}", t.s("rw/sub/new.txt")));
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        std::fs::read_to_string(t.p("rw/sub/new.txt")).unwrap(),
        "from-guest\n"
    );

    // A denied path inside the read-write share is absent and cannot be made.
    let r = sh(
        vm,
        &format!(
            "cd {rw} && ls -a; cat .env; echo TOKEN=guest > .env; echo rc=$?",
            rw = t.s("rw")
        ),
    );
    assert!(!r.out.contains(".env"), "{r:?}");
    assert!(
        r.err.contains("No such file") || r.err.contains("can't open"),
        "{r:?}"
    );
    assert!(!r.out.contains("rc=0"), "{r:?}");
    assert_eq!(
        std::fs::read(t.p("rw/.env")).unwrap(),
        b"TOKEN=host-secret\n"
    );

    // Symlinks to host secrets lead nowhere: the guest resolves them in its own tree,
    // whose /etc has no shadow.
    let shadow_head = std::fs::read_to_string("/etc/shadow")
        .ok()
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "root:".into());
    let r = sh(
        vm,
        &format!(
            "cd {rw} && ln -s /etc/shadow x && cat x; cat host-made-link; ls /etc/shadow",
            rw = t.s("rw")
        ),
    );
    assert!(
        !r.out.contains(&shadow_head) && !r.out.contains("root:"),
        "{r:?}"
    );
    assert!(r.err.contains("No such file"), "{r:?}");

    // `..` from a share's root stays in the guest's own tree: the host's neighbours of the
    // shared directories are not there.
    let r = sh(
        vm,
        &format!(
            "ls -a {rw}/..; cat {rw}/../outside.txt; cat {rw}/../../../../etc/shadow",
            rw = t.s("rw")
        ),
    );
    assert!(
        !r.out.contains("outside.txt") && !r.out.contains("not shared"),
        "{r:?}"
    );
    assert!(!r.out.contains("root:"), "{r:?}");

    // 2,000 small files round-trip: the guest reads the host's, the host reads the guest's.
    let host_concat: Vec<u8> = (0..small_files())
        .flat_map(|i| std::fs::read(t.p(&format!("ro/small/f{i:04}"))).unwrap())
        .collect();
    let concat_path = t.p("small.concat");
    std::fs::write(&concat_path, &host_concat).unwrap();
    let r = sh(vm, &format!("cd {} && cat f* | sha256sum", t.s("ro/small")));
    assert_eq!(
        r.out.split_whitespace().next(),
        Some(host_sha256(&concat_path).as_str()),
        "{r:?}"
    );
    let start = Instant::now();
    let r = sh(
        vm,
        &format!(
            "mkdir {d} && cd {d} && i=0; while [ $i -lt {n} ]; do \
             echo \"guest file $i\" > g$i; i=$((i+1)); done; sync",
            d = t.s("rw/many"),
            n = small_files()
        ),
    );
    assert_eq!(r.code, 0, "{r:?}");
    eprintln!(
        "guest wrote {} files in {:?}",
        small_files(),
        start.elapsed()
    );
    let wrong: Vec<usize> = (0..small_files())
        .filter(|i| {
            std::fs::read_to_string(t.p(&format!("rw/many/g{i}"))).ok()
                != Some(format!("guest file {i}\n"))
        })
        .collect();
    assert!(wrong.is_empty(), "files wrong on the host: {wrong:?}");

    // One big file (64 MiB on hardware KVM) round-trips with checksums.
    let big_sum = host_sha256(&t.p("ro/big.bin"));
    let start = Instant::now();
    let r = sh(
        vm,
        &format!(
            "sha256sum {ro} && cp {ro} {rw} && sync && echo copied",
            ro = t.s("ro/big.bin"),
            rw = t.s("rw/big.copy")
        ),
    );
    eprintln!(
        "guest read and copied {} MiB in {:?}",
        big_mib(),
        start.elapsed()
    );
    assert_eq!(
        r.out.split_whitespace().next(),
        Some(big_sum.as_str()),
        "{r:?}"
    );
    assert!(r.out.ends_with("copied\n"), "{r:?}");
    assert_eq!(host_sha256(&t.p("rw/big.copy")), big_sum);

    // The host's /usr runs in the guest: python3 and git, as on the host.
    let r = sh(
        vm,
        "python3 -c 'import sys, json; print(sys.version_info[0], json.dumps([1]))' && git --version",
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.out.starts_with("3 [1]\ngit version"), "{r:?}");

    // Nothing of the host beyond the system view and the shares: no shadow, no home
    // directories, the guest's own /proc.
    let r = sh(
        vm,
        "ls /etc/shadow /etc/ssh 2>&1; \
         echo home=$(ls -A /home 2>/dev/null | wc -l) root=$(ls -A /root 2>/dev/null | wc -l); \
         uname -r; cat /etc/hostname 2>&1",
    );
    assert!(r.out.contains("cannot access '/etc/shadow'"), "{r:?}");
    assert!(r.out.contains("cannot access '/etc/ssh'"), "{r:?}");
    assert!(r.out.contains("home=0 root=0\n"), "{r:?}");
    assert!(r.out.contains("6.1."), "{r:?}");
}

/// What each VM runs at the same time: its own files, and its half of one common file.
fn shared_script(t: &Tree, name: &str, half: usize) -> String {
    format!(
        "cd {dir} && i=0; while [ $i -lt {SHARED_FILES} ]; do \
         printf '%s %s\\n' {name} $i > {name}-$i; i=$((i+1)); done; \
         yes {name} | head -c 1048576 | dd of={common} bs=65536 seek={seek} \
         conv=notrunc,fsync iflag=fullblock 2>/dev/null && echo done",
        dir = t.s("shared"),
        common = t.s("shared/common.bin"),
        seek = half * 16,
    )
}

/// After both VMs ran [`shared_script`]: every file as its writer meant it.
fn check_shared(t: &Tree) {
    for name in ["vma", "vmb"] {
        let wrong: Vec<usize> = (0..SHARED_FILES)
            .filter(|i| {
                std::fs::read_to_string(t.p(&format!("shared/{name}-{i}"))).ok()
                    != Some(format!("{name} {i}\n"))
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "{name}'s files are wrong on the host: {wrong:?}"
        );
    }
    let bytes = std::fs::read(t.p("shared/common.bin")).unwrap();
    let expect = |name: &str| {
        format!("{name}\n")
            .bytes()
            .cycle()
            .take(1 << 20)
            .collect::<Vec<u8>>()
    };
    assert_eq!(bytes.len(), 2 << 20);
    assert!(
        bytes[..1 << 20] == expect("vma")[..],
        "vma's half is corrupted"
    );
    assert!(
        bytes[1 << 20..] == expect("vmb")[..],
        "vmb's half is corrupted"
    );
}

/// Boot, wait for the other VM, run `script`, wait again. Both VMs meet at the two
/// barriers whatever happens to either (a panic is kept for later), so neither waits for
/// ever.
fn boot_and_run_together(
    spec: &SandboxSpec,
    script: &str,
    barrier: &Barrier,
) -> (MicrovmBackend, Ran) {
    let booted = catch_unwind(AssertUnwindSafe(|| boot(spec)));
    barrier.wait();
    let ran = booted.map(|mut vm| {
        let ran = catch_unwind(AssertUnwindSafe(|| sh(&mut vm, script)));
        (vm, ran)
    });
    barrier.wait();
    match ran {
        Ok((vm, Ok(ran))) => (vm, ran),
        Ok((_, Err(panic))) | Err(panic) => resume_unwind(panic),
    }
}

/// The guest writes and fsyncs, then the VMM dies by SIGKILL mid-way through more
/// writes: everything fsynced is on the host.
fn fsynced_data_survives_sigkill(mut vm: MicrovmBackend, spec: &SandboxSpec, t: &Tree) {
    let r = sh(
        &mut vm,
        &format!(
            "yes durable | head -c 4194304 | dd of={f} bs=65536 conv=fsync 2>/dev/null && echo synced",
            f = t.s("shared/durable.txt")
        ),
    );
    assert_eq!(r.out, "synced\n", "{r:?}");
    let vmm_pids = pids_with(&format!("mxc-vm-{}", spec.id));
    assert!(!vmm_pids.is_empty(), "no VMM process found");
    // Writes still in flight when the VMM dies.
    let more = format!("while :; do echo more >> {}; done", t.s("shared/more.txt"));
    let writer = std::thread::spawn(move || {
        let req = ExecRequest {
            argv: vec!["/bin/sh".into(), "-c".into(), more],
            env: vec![],
            cwd: None,
            timeout: Some(Duration::from_secs(120)),
        };
        let mut out = Collect::default();
        let mut io = ExecIo {
            stdin: StdinMode::Null,
            sink: Some(&mut out),
            output_limit: None,
            signals: None,
        };
        let result = vm.exec(&req, &mut io).map(|_| ());
        (vm, result)
    });
    std::thread::sleep(Duration::from_secs(5));
    for pid in &vmm_pids {
        // SAFETY: kill() has no memory effects; the pid is the VMM of this test's VM.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    let (mut vm, result) = writer.join().unwrap();
    assert!(
        result.is_err(),
        "the exec cannot finish once its VM is gone"
    );
    let data = std::fs::read(t.p("shared/durable.txt")).unwrap();
    assert_eq!(data.len(), 4 << 20);
    assert!(data.chunks(8).all(|c| c == b"durable\n"));
    let _ = vm.stop();
    vm.deprovision().expect("deprovision after SIGKILL");
    assert!(pids_with(&format!("mxc-vm-{}", spec.id)).is_empty());
}

#[test]
fn shares_in_real_guests_enforce_the_policy_and_keep_the_data() {
    require_kvm();
    let _one = serialize();
    let t = Tree::new();
    let spec_a = spec(
        "vmfs-a",
        &[t.p("ro")],
        &[t.p("rw"), t.p("shared")],
        &[t.p("rw/.env")],
    );
    let spec_b = spec("vmfs-b", &[], &[t.p("shared")], &[]);
    std::fs::write(t.p("shared/common.bin"), vec![0u8; 2 << 20]).unwrap();
    let barrier = Barrier::new(2);
    // Each VM lives on one thread from boot to end: the VMM process dies with the thread
    // that spawned it (PR_SET_PDEATHSIG follows the thread, not the process).
    std::thread::scope(|s| {
        let vm_b = s.spawn(|| {
            let (b, ran) = boot_and_run_together(&spec_b, &shared_script(&t, "vmb", 1), &barrier);
            assert_eq!(ran.out, "done\n", "{ran:?}");
            fsynced_data_survives_sigkill(b, &spec_b, &t);
        });
        let (mut a, ran) = boot_and_run_together(&spec_a, &shared_script(&t, "vma", 0), &barrier);
        assert_eq!(ran.out, "done\n", "{ran:?}");
        check_shared(&t);
        // Each guest sees the other's files as the host has them.
        let r = sh(&mut a, &format!("cat {}/vmb-7", t.s("shared")));
        assert_eq!(r.out, "vmb 7\n", "{r:?}");

        single_guest_checks(&mut a, &t);

        a.stop().expect("stop");
        a.deprovision().expect("deprovision");
        assert!(pids_with(&format!("mxc-vm-{}", spec_a.id)).is_empty());
        if let Err(panic) = vm_b.join() {
            resume_unwind(panic);
        }
    });
}

/// The "done when": `mxc-vm run --backend microvm --rw ./project -- sh -c
/// 'python3 -c "print(1)" > out.txt'` leaves `out.txt` with `1` in `./project`.
#[test]
fn mxc_vm_run_writes_into_the_project_with_the_hosts_python() {
    require_kvm();
    let _one = serialize();
    let dir = TempDir::new("vmfs-run");
    std::fs::create_dir(dir.join("project")).unwrap();
    // Also: with all of /etc granted, no path of the secret list shows (entries listed
    // or bytes read, summed over the list).
    let probe: String = sandbox::view::SECRET_PATHS
        .iter()
        .map(|p| {
            format!("if [ -d {p} ]; then ls -A {p} | wc -l; else cat {p} 2>/dev/null | wc -c; fi; ")
        })
        .collect();
    let script = format!(
        "python3 -c \"print(1)\" > out.txt; ({probe}) | awk '{{s += $1}} END {{print \"secrets:\", s}}'"
    );
    let out = std::process::Command::new(mxc_vm_bin())
        .args([
            "run",
            "--backend",
            "microvm",
            "--boot-timeout",
            "1800s",
            "--rw",
            "./project",
            "--ro",
            "/etc",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(dir.join("project/out.txt")).unwrap(),
        "1\n"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "secrets: 0\n",
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_policy_the_vm_cannot_enforce_is_refused_before_boot() {
    let t = TempDir::new("vmfs-refuse");
    std::fs::create_dir_all(t.join("w/docs")).unwrap();
    let spec = spec("vmfs-refuse", &[t.join("w/docs")], &[t.join("w")], &[]);
    let mut vm = MicrovmBackend::new(MicrovmOptions {
        vmm_binary: Some(mxc_vm_bin()),
        ..MicrovmOptions::default()
    });

    let err = vm.provision(&spec).unwrap_err().to_string();

    assert!(
        err.contains("read-only inside the read-write share"),
        "{err}"
    );
}

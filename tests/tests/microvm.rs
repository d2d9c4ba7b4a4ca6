//! End-to-end tests of the microVM tier on /dev/kvm, with our kernel and guest agent.
//!
//! A boot takes about a minute under the nested kvm_pvm hypervisor of our CI machines,
//! so the lifecycle test boots ONE VM and runs every check against it through the
//! Backend API; the tests that drive the `mxc-vm` binary each boot their own VM and run
//! in parallel. Where /dev/kvm is missing these tests fail loudly: they never skip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use policy::{Policy, PolicySource};
use sandbox::microvm::{MicrovmBackend, MicrovmOptions};
use sandbox::output::{Collect, StdinMode};
use sandbox::{Backend, ExecIo, ExecRequest, ExitKind, SandboxSpec};
use tests::{code, mxc_vm, mxc_vm_bin, pids_with, require_kvm, stderr, stdout};

fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        cwd: None,
        timeout: Some(Duration::from_secs(120)),
    }
}

fn exec(vm: &mut MicrovmBackend, r: &ExecRequest) -> (sandbox::ExecOutcome, Collect) {
    let mut out = Collect::default();
    let outcome = {
        let mut io = ExecIo {
            stdin: StdinMode::Null,
            sink: Some(&mut out),
            output_limit: None,
            signals: None,
        };
        vm.exec(r, &mut io).expect("exec")
    };
    (outcome, out)
}

/// FNV-1a, enough to compare 10 MB of output with what was generated.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

#[test]
fn one_vm_runs_many_checks_through_the_lifecycle() {
    require_kvm();
    let spec = SandboxSpec {
        policy: Policy::empty(PolicySource::Cli),
        view: policy::FsView::default(),
        id: format!("e2e-{}", std::process::id()),
        net: Default::default(),
    };
    let mut vm = MicrovmBackend::new(MicrovmOptions {
        vmm_binary: Some(mxc_vm_bin()),
        ..MicrovmOptions::default()
    });
    vm.provision(&spec)
        .expect("provision (is the guest image built?)");
    let boot = Instant::now();
    vm.start().expect("boot to agent ready");
    eprintln!("microvm booted to agent ready in {:?}", boot.elapsed());

    // Run as root, the VMM has left the host's network, IPC and UTS namespaces, and the
    // threads that handle what the guest sends hold no capability.
    // SAFETY: geteuid() has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let pid = vm.vmm_pid().expect("the VMM runs");
        for ns in ["net", "ipc", "uts"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
            assert_ne!(theirs, ours, "the VMM shares the host's {ns} namespace");
        }
        // Its network namespace has nothing but a loopback interface.
        let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap();
        let interfaces: Vec<&str> = dev
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(interfaces, ["lo"], "{dev}");
        assert_jailed(pid);
        for (name, status) in thread_statuses(pid) {
            if name.starts_with("mxc-devices") || name.starts_with("fs-") {
                assert_eq!(
                    status_field(&status, "CapEff:").as_deref(),
                    Some("0000000000000000"),
                    "{name}: {status}"
                );
            }
        }
    }

    // echo hello prints hello
    let (o, out) = exec(&mut vm, &req(&["/bin/echo", "hello"]));
    assert_eq!(
        (o.exit, out.stdout.as_slice()),
        (ExitKind::Code(0), &b"hello\n"[..])
    );

    // exit code 3 comes back as 3
    let (o, _) = exec(&mut vm, &req(&["/bin/sh", "-c", "exit 3"]));
    assert_eq!(o.exit, ExitKind::Code(3));

    // stderr is kept apart
    let (_, out) = exec(&mut vm, &req(&["/bin/sh", "-c", "echo oops >&2"]));
    assert_eq!(out.stderr, b"oops\n");

    // the environment is exactly what was sent (plus the sandbox base PATH/HOME, and
    // under kvm_pvm the variables that keep glibc and OpenSSL off AVX)
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    let mut r = req(&["env"]);
    r.env = vec![("GIVEN".into(), "yes".into())];
    let (_, out) = exec(&mut vm, &r);
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('=').next().unwrap_or("").to_string())
        .collect();
    names.sort();
    let mut expected = vec!["GIVEN", "HOME", "PATH"];
    if pvm {
        expected = vec!["GIVEN", "GLIBC_TUNABLES", "HOME", "OPENSSL_ia32cap", "PATH"];
    }
    assert_eq!(names, expected);

    // 10 MB of output arrives intact (slow under kvm_pvm: every guest kernel copy of
    // the data is emulated, so give it time)
    let mut big = req(&["/bin/sh", "-c", "head -c 10485760 /dev/zero | tr '\\0' 'x'"]);
    big.timeout = Some(Duration::from_secs(1800));
    let (o, out) = exec(&mut vm, &big);
    eprintln!("10 MB of output took {:?}", o.duration);
    assert_eq!(o.exit, ExitKind::Code(0));
    assert_eq!(out.stdout.len(), 10 * 1024 * 1024);
    assert_eq!(fnv(&out.stdout), fnv(&vec![b'x'; 10 * 1024 * 1024]));

    // a timeout kills the command (and what it started)
    let mut r = req(&["/bin/sh", "-c", "sleep 300 & sleep 300"]);
    r.timeout = Some(Duration::from_secs(3));
    let start = Instant::now();
    let (o, _) = exec(&mut vm, &r);
    assert!(o.timed_out, "{o:?}");
    assert!(start.elapsed() < Duration::from_secs(60));
    let (_, out) = exec(
        &mut vm,
        // pgrep reads /proc alike in busybox and procps (procps `ps` without a
        // terminal lists nothing, and the guest runs the host's by default).
        &req(&["/bin/sh", "-c", "pgrep -f '[s]leep 300' | wc -l"]),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");

    // the guest sees its own kernel, not the host's
    let (_, out) = exec(&mut vm, &req(&["/bin/uname", "-r"]));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("6.1."));

    // a missing command is the command's failure (127), reported, not a hang
    let (o, out) = exec(&mut vm, &req(&["/no/such/program"]));
    assert_eq!(o.exit, ExitKind::Code(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/program"));

    // stop powers the guest off; deprovision leaves nothing behind
    let runtime_dirs = || -> Vec<String> {
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("mxc-vm-{}", spec.id)))
            .collect()
    };
    vm.stop().expect("stop");
    vm.deprovision().expect("deprovision");
    let report = vm.report.clone().expect("the VMM wrote its exit report");
    eprintln!("VM ended: {:?}", report.reason);
    assert!(runtime_dirs().is_empty());
    assert!(pids_with(&format!("mxc-vm-{}", spec.id)).is_empty());
}

/// Run `mxc-vm ARGS` with `stdin`, then check that nothing of its VM is left: the
/// runtime directory and the VMM process are named after the sandbox id, which starts
/// with the mxc-vm process's pid.
fn run_and_check_gone(args: &[&str], stdin: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(mxc_vm_bin())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let marker = format!("mxc-vm-{}-", child.id());
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(pids_with(&marker).is_empty(), "a VMM process is left");
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&marker))
        .collect();
    assert!(left.is_empty(), "runtime files are left: {left:?}");
    out
}

#[test]
fn mxc_vm_run_microvm_pipes_stdin_and_output() {
    require_kvm();
    let out = run_and_check_gone(
        &[
            "run",
            "--backend",
            "microvm",
            "--",
            "/bin/sh",
            "-c",
            "cat; echo hello",
        ],
        b"from stdin\n",
    );
    assert_eq!(stdout(&out), "from stdin\nhello\n", "{}", stderr(&out));
    assert_eq!(code(&out), 0);
}

#[test]
fn mxc_vm_run_microvm_timeout_kills_command_and_vm() {
    require_kvm();
    let out = run_and_check_gone(
        &[
            "run",
            "--backend",
            "microvm",
            "--timeout",
            "5s",
            "--",
            "/bin/sleep",
            "1000",
        ],
        b"",
    );
    assert_eq!(code(&out), 124, "{}", stderr(&out));
}

/// A file and a directory that what started mxc-vm left open (no close-on-exec), and the
/// environment it ran in, are not the VMM's: a VMM taken over by its guest could read
/// through the descriptors or walk out of its jail from the directory, and read a token
/// from its environment.
#[test]
fn what_started_mxc_vm_left_it_does_not_reach_the_vmm() {
    require_kvm();
    let dir = tests::TempDir::new("inherited");
    std::fs::write(dir.join("secret"), "INHERITED-SECRET").unwrap();
    let mut cmd = std::process::Command::new(mxc_vm_bin());
    cmd.args(["run", "--backend", "microvm", "--", "/bin/sleep", "3"])
        .env("MXC_TEST_TOKEN", "INHERITED-TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    tests::leave_open(
        &mut cmd,
        9,
        std::fs::File::open(dir.join("secret")).unwrap(),
    );
    tests::leave_open(&mut cmd, 8, std::fs::File::open(dir.path()).unwrap());
    let child = cmd.spawn().unwrap();
    let marker = format!("mxc-vm-{}-", child.id());
    let end = Instant::now() + Duration::from_secs(120);
    let vmm = loop {
        if let Some(&pid) = pids_with(&marker).first() {
            break pid;
        }
        assert!(Instant::now() < end, "no VMM process appeared");
        std::thread::sleep(Duration::from_millis(5));
    };
    // Its descriptors once it runs the guest (the first ones it opens are its own).
    std::thread::sleep(Duration::from_millis(500));
    let open: Vec<std::path::PathBuf> = std::fs::read_dir(format!("/proc/{vmm}/fd"))
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    let environ = std::fs::read(format!("/proc/{vmm}/environ")).unwrap_or_default();
    let out = child.wait_with_output().unwrap();
    assert!(
        !String::from_utf8_lossy(&environ).contains("INHERITED-TOKEN"),
        "the VMM holds the environment mxc-vm ran in"
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for path in [dir.join("secret"), dir.path().to_path_buf()] {
        assert!(
            !open.contains(&path),
            "the VMM holds {} it inherited: {open:?}",
            path.display()
        );
    }
}

#[test]
fn guest_poweroff_ends_the_run() {
    require_kvm();
    // Busybox's poweroff: without the host's system view a command PATH does not have
    // runs as busybox's applet of that name (the host's /usr has no poweroff that works
    // without an init system). It signals PID 1, which only root may: --guest-root.
    let out = run_and_check_gone(
        &[
            "run",
            "--backend",
            "microvm",
            "--guest-system",
            "none",
            "--guest-root",
            "--",
            "poweroff",
            "-f",
        ],
        b"",
    );
    // The command takes its own VM down mid-exec: mxc-vm reports that (125) and returns.
    assert_eq!(code(&out), 125, "{}", stderr(&out));
}

#[test]
fn vcpus_flag_gives_the_guest_that_many_cpus_and_signals_pass_through() {
    require_kvm();
    // In the nested hardware-KVM lane (QEMU's TCG emulating the host) only 2: 4 vCPUs
    // failed 2 of 5 runs there, with an XSAVE consistency warning of the emulated CPU and
    // then a triple fault. On kvm_pvm and real hardware both counts run.
    let lane = std::env::var("MXC_VM_LANE").is_ok_and(|v| v == "hwkvm");
    for (vcpus, want) in [("2", "2\n"), ("4", "4\n")] {
        if lane && vcpus == "4" {
            eprintln!("--vcpus 4: not in the nested lane (see the comment above)");
            continue;
        }
        // The command kills itself with SIGTERM after printing the CPU count: the exit
        // status is 128 + 15, as on every tier.
        let out = run_and_check_gone(
            &[
                "run",
                "--backend",
                "microvm",
                "--guest-system",
                "none",
                "--vcpus",
                vcpus,
                "--timeout",
                "120s",
                "--",
                "/bin/sh",
                "-c",
                "nproc; grep -c ^processor /proc/cpuinfo >&2; kill -TERM $$",
            ],
            b"",
        );
        assert_eq!(stdout(&out), want, "{}", stderr(&out));
        assert_eq!(stderr(&out), want, "/proc/cpuinfo agrees");
        assert_eq!(code(&out), 143, "{}", stderr(&out));
    }
}

/// SIGTERM to `mxc-vm run` while its command runs, and SIGINT while the VM still boots:
/// the VM is stopped, its runtime directory (config, report, log, vsock sockets) and VMM
/// process are gone, and mxc-vm exits 128+N saying why.
#[test]
fn signals_stop_the_vm_and_leave_nothing() {
    require_kvm();
    let limit = Duration::from_secs(60);
    let running = tests::signal_a_run(
        &[
            "run",
            "--backend",
            "microvm",
            "--",
            "/bin/sh",
            "-c",
            "echo ready; sleep 1000",
        ],
        Some("ready"),
        Duration::ZERO,
        libc::SIGTERM,
        // The boot comes first: a minute and more under kvm_pvm.
        Duration::from_secs(900),
        // While the guest runs, the VMM is under its seccomp filter (vmm::seccomp).
        &|pid| {
            let vmm = pids_with(&format!("mxc-vm-{pid}-"));
            assert_eq!(vmm.len(), 1, "one VMM process: {vmm:?}");
            let status = std::fs::read_to_string(format!("/proc/{}/status", vmm[0])).unwrap();
            assert_eq!(
                status_field(&status, "Seccomp:").as_deref(),
                Some("2"),
                "the VMM runs without its seccomp filter:\n{status}"
            );
            // The VMM-only binary beside mxc-vm runs it.
            assert_eq!(status_field(&status, "Name:").as_deref(), Some("mxc-vmm"));
            // Every thread adds its own list to the process-wide ones: the device loop
            // at once, an fs worker when the guest first uses its share, so the one
            // that served the shell's files (the system view) has as many as the loop.
            let filters = thread_filters(vmm[0]);
            let count = |name: &str| filters.iter().find(|(n, _)| n == name).map(|f| f.1);
            let own = count("mxc-devices").expect("the device loop thread");
            let workers: Vec<u32> = filters
                .iter()
                .filter(|(n, _)| n.starts_with("fs-mxcfs"))
                .map(|f| f.1)
                .collect();
            assert!(own >= 2, "{filters:?}");
            assert!(
                workers.contains(&own),
                "no fs worker filtered itself after serving: {filters:?}"
            );
            assert!(workers.iter().all(|&n| n + 1 >= own), "{filters:?}");
        },
    );
    let booting = tests::signal_a_run(
        &["run", "--backend", "microvm", "--cold", "--", "/bin/true"],
        None,
        Duration::ZERO,
        libc::SIGINT,
        limit,
        // Signalled once the VMM is up: before mxc-vm installs its handlers a SIGINT takes
        // the inherited disposition, which a harness run in the background has set to
        // ignore (the nested lane lost it there at a fixed 300 ms).
        &|pid| {
            let end = std::time::Instant::now() + limit;
            while pids_with(&format!("mxc-vm-{pid}-")).is_empty() {
                assert!(std::time::Instant::now() < end, "no VMM process appeared");
                std::thread::sleep(Duration::from_millis(5));
            }
        },
    );

    for (run, signal, name) in [
        (&running, libc::SIGTERM, "SIGTERM"),
        (&booting, libc::SIGINT, "SIGINT"),
    ] {
        assert_eq!(run.code, 128 + signal, "{name}: {}", run.stderr);
        assert!(
            run.stderr.contains(&format!("stopped by {name}")),
            "{name}: {}",
            run.stderr
        );
        std::thread::sleep(Duration::from_millis(300));
        let marker = format!("mxc-vm-{}-", run.pid);
        assert!(
            pids_with(&marker).is_empty(),
            "{name}: a VMM process is left"
        );
        assert_eq!(
            tests::runtime_dirs_of(run.pid),
            Vec::<String>::new(),
            "{name}"
        );
    }
}

/// The VMM `pid` runs jailed (vmm::jail): in a mount namespace of its own whose root, a
/// read-only tmpfs, holds only `/dev/kvm`, its own `/proc` entry, its runtime directory,
/// the image's kernel and initramfs, and the guest's shares (here the host's system
/// directories).
fn assert_jailed(pid: u32) {
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    assert_ne!(theirs, ours, "the VMM shares the host's mount namespace");
    let names = |dir: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root/{dir}"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    // Where mxc-vm can make cgroups, the VMM runs in a pids cgroup of its own.
    if !matches!(
        sandbox::limits::detect(),
        sandbox::limits::Enforcement::Rlimits { .. }
    ) {
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(
            cgroups.lines().any(|l| l.ends_with("-vmm")),
            "the VMM is in no cgroup of its own: {cgroups}"
        );
    }
    assert_eq!(names("dev"), ["kvm"]);
    assert_eq!(names("proc"), ["self"]);
    // Of the host's /etc, only what its guest may see: the allowlisted entries, the
    // secrets among them covered.
    let etc = names("etc");
    assert!(
        etc.iter()
            .all(|n| sandbox::view::ETC_ALLOWLIST.contains(&n.as_str())),
        "the jailed VMM sees more of /etc than its guest: {etc:?}"
    );
    assert_eq!(
        std::fs::read(format!("/proc/{pid}/root/etc/passwd")).ok(),
        std::fs::read("/etc/passwd").ok()
    );
    for secret in sandbox::view::SECRET_PATHS {
        let at = format!("/proc/{pid}/root{secret}");
        let shown = match std::fs::read_dir(&at) {
            Ok(entries) => entries.count() > 0,
            Err(_) => std::fs::read(&at).is_ok_and(|data| !data.is_empty()),
        };
        assert!(!shown, "the jailed VMM reads {secret}");
    }
    let image = guest_image::cached(&guest_image::BuildOptions::default()).unwrap();
    let cache = image.vmlinux.ancestors().nth(3).unwrap().to_path_buf();
    let runtime = std::env::temp_dir().join("mxc-vm-");
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (point, options) = (fields[4], fields[5]);
        if point == "/" {
            assert!(options.split(',').any(|o| o == "ro"), "{line}");
            continue;
        }
        let allowed = ["/dev/kvm", "/proc/self"].contains(&point)
            || point.starts_with(&*runtime.to_string_lossy())
            || std::path::Path::new(point).starts_with(&cache)
            || ["/usr", "/etc", "/bin", "/sbin", "/lib"]
                .iter()
                .any(|dir| point.starts_with(dir));
        assert!(allowed, "the jailed VMM sees {point}: {mountinfo}");
    }
}

/// `(thread name, Seccomp_filters)` of each thread of process `pid`.
fn thread_filters(pid: u32) -> Vec<(String, u32)> {
    thread_statuses(pid)
        .into_iter()
        .map(|(name, status)| {
            let n = status_field(&status, "Seccomp_filters:").and_then(|v| v.parse().ok());
            (name, n.unwrap_or(0))
        })
        .collect()
}

/// `(thread name, /proc status text)` of each thread of process `pid` (a thread that
/// ended while they were read left out).
fn thread_statuses(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .filter_map(|status| Some((status_field(&status, "Name:")?, status)))
        .collect()
}

/// The value of field `name` (with its colon) in a `/proc/PID/status` text.
fn status_field(status: &str, name: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_owned())
}

/// The escape suite's attacks on host files and the host's network (tests/src/escape.rs,
/// SECURITY.md), in one VM: read-write and read-only shares with denied paths, an
/// ungranted directory, the host's loopback listener and abstract socket.
#[test]
fn the_vm_contains_the_escape_suites_host_attacks() {
    use tests::escape::{attacks, judge, shown, Ctx, MICROVM_ATTACKS, PRELUDE};
    require_kvm();
    let ctx = Ctx::new("microvm");
    let (ro, rw, deny) = ctx.grants();
    // A second name the host gave a denied file: hidden by its inode. (The VMM's jail
    // covers the denied name; the inode it covered still hides this one.)
    let alias = rw[0].join("alias");
    std::fs::hard_link(rw[0].join("secret.txt"), &alias).unwrap();
    let secret = std::fs::read(&deny[0]).unwrap();
    let mut policy = Policy::empty(PolicySource::Cli);
    let overrides = policy::Overrides {
        ro,
        rw: rw.clone(),
        deny: deny.clone(),
        ..policy::Overrides::default()
    };
    policy
        .apply_overrides_at(&overrides, std::path::Path::new("/"))
        .unwrap();
    let view = policy::resolve_fs(&policy.filesystem, std::path::Path::new("/")).unwrap();
    let spec = SandboxSpec {
        policy,
        view,
        id: format!("escape-{}", std::process::id()),
        net: Default::default(),
    };
    let mut vm = MicrovmBackend::new(MicrovmOptions {
        vmm_binary: Some(mxc_vm_bin()),
        ..MicrovmOptions::default()
    });
    vm.provision(&spec).expect("provision");
    vm.start().expect("boot to agent ready");

    let chosen: Vec<_> = attacks()
        .into_iter()
        .filter(|a| MICROVM_ATTACKS.contains(&a.name))
        .collect();
    assert_eq!(
        chosen.len(),
        MICROVM_ATTACKS.len(),
        "every named attack exists"
    );
    // One Python process runs every attack in turn (each in its own globals, after a
    // line naming it): a process start in the guest costs seconds under kvm_pvm.
    let mut program = format!("{PRELUDE}\nG = dict(globals())\n");
    for (i, a) in chosen.iter().enumerate() {
        let hex: String = a.code.bytes().map(|b| format!("{b:02x}")).collect();
        program.push_str(&format!(
            "print('@@ATTACK {i}', flush=True)\nprint('MARKER-RAN', flush=True)\n\
             try:\n    exec(bytes.fromhex('{hex}').decode(), dict(G))\n\
             except BaseException as e:\n    print('RAISED:', repr(e), flush=True)\n"
        ));
    }
    let mut r = req(&["python3", "-c", &program]);
    r.env = ctx.env();
    r.cwd = Some(rw[0].clone());
    let (_, out) = exec(&mut vm, &r);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut failures = Vec::new();
    for (i, a) in chosen.iter().enumerate() {
        let start = format!("@@ATTACK {i}\n");
        let section = stdout.split(start.as_str()).nth(1).map_or("", |rest| {
            rest.split("@@ATTACK ").next().unwrap_or_default()
        });
        let verdict = judge(&ctx, a, section.as_bytes());
        eprintln!(
            "microvm: {:<45} {} {}",
            a.name,
            if verdict.is_ok() {
                "contained"
            } else {
                "ESCAPED"
            },
            shown(section.as_bytes())
        );
        if let Err(why) = verdict {
            failures.push(format!("{}: {why}\n    output: {}", a.name, section.trim()));
        }
    }
    if !failures.is_empty() {
        eprintln!("stderr: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Commands run as nobody: the guest agent (PID 1) is out of their reach, and the VM
    // serves on.
    let (_, who) = exec(
        &mut vm,
        &req(&[
            "/bin/sh",
            "-c",
            "id -u; id -g; kill -9 1 2>/dev/null && echo KILLED || echo REFUSED",
        ]),
    );
    let (_, alive) = exec(&mut vm, &req(&["echo", "still serving"]));
    let alias = alias.to_string_lossy().into_owned();
    let (_, through_alias) = exec(&mut vm, &req(&["/bin/cat", &alias]));
    // Run as root, the VMM is jailed: what its guest may not read, the VMM cannot read
    // either (a VMM taken over by its guest gains no file).
    // SAFETY: geteuid() has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let pid = vm.vmm_pid().expect("the VMM runs");
        for path in &deny {
            let theirs = std::fs::read(format!("/proc/{pid}/root{}", path.display()));
            assert!(
                !theirs.as_ref().is_ok_and(|data| *data == secret),
                "the jailed VMM reads the denied {}",
                path.display()
            );
        }
    }
    vm.stop().unwrap();
    vm.deprovision().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&who.stdout),
        "65534\n65534\nREFUSED\n",
        "{}",
        String::from_utf8_lossy(&who.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&alive.stdout), "still serving\n");
    assert!(
        through_alias.stdout.is_empty(),
        "a hard link to a denied file is readable: {}",
        String::from_utf8_lossy(&through_alias.stdout)
    );
    assert!(
        failures.is_empty(),
        "{} of {} attacks escaped the VM:\n{}",
        failures.len(),
        chosen.len(),
        failures.join("\n")
    );
}

/// Sequential VM runs through the real binary leave nothing behind: no process (the
/// VMM included), runtime directory, socket or mount. `MXC_VM_SOAK_VM_RUNS` runs (5 by
/// default) on hardware KVM; one under kvm_pvm, where a boot takes a minute. Each run is
/// bounded (`--timeout`), so a VM that stops answering fails the test with its run
/// number instead of holding it: in the nested lane one run in a few hundred has been
/// seen to hang (QEMU's TCG emulating SVM, not yet explained).
#[test]
fn sequential_vm_runs_leave_nothing_behind() {
    require_kvm();
    let runs = if vmm::hypervisor::host_flavour().is_hardware() {
        std::env::var("MXC_VM_SOAK_VM_RUNS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(5)
    } else {
        1
    };
    // Every run's runtime directory lives in `tmp`, and every run names `work`: what is
    // left is found by those paths, whatever other tests run beside this one.
    let dir = tests::TempDir::new("vm-soak");
    let (tmp, work) = (dir.join("tmp"), dir.join("work"));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let marker = dir.path().display().to_string();
    let mounts_before = tests::mount_table().lines().count();
    let start = Instant::now();
    for n in 0..runs {
        let out = std::process::Command::new(mxc_vm_bin())
            .env("TMPDIR", &tmp)
            .env("XDG_RUNTIME_DIR", &tmp)
            .args(["run", "--backend", "microvm", "--timeout", "300s", "--rw"])
            .arg(&work)
            .args(["--", "/bin/sh", "-c"])
            .arg(format!("echo {n} > {}/out-{n}", work.display()))
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "run {n}: {}", stderr(&out));
    }
    eprintln!(
        "{runs} sequential microVM runs in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let left_in_tmp: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
    let sockets: Vec<String> = std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&marker))
        .map(str::to_string)
        .collect();
    let written = std::fs::read_dir(&work).unwrap().flatten().count();

    assert_eq!(written, runs, "every run wrote its file");
    assert!(left_in_tmp.is_empty(), "runtime dirs left: {left_in_tmp:?}");
    assert_eq!(pids_with(&marker), Vec::<u32>::new(), "processes left");
    assert!(sockets.is_empty(), "sockets left: {sockets:?}");
    assert_eq!(tests::mount_table().lines().count(), mounts_before);
}

/// `limits.diskMiB`: what the command writes into its grants is counted on the host;
/// past the limit the guest gets ENOSPC and no more lands on the host disk.
#[test]
fn a_disk_limit_stops_writes_into_the_grants() {
    require_kvm();
    let dir = tests::TempDir::new("vm-disk");
    std::fs::create_dir_all(dir.join("work")).unwrap();
    let policy = dir.join("p.json");
    std::fs::write(
        &policy,
        format!(
            r#"{{"version":"1","filesystem":{{"readwrite":["{}"]}},"limits":{{"diskMiB":4}}}}"#,
            dir.s("work")
        ),
    )
    .unwrap();
    let out = mxc_vm(&[
        "run",
        "--backend",
        "microvm",
        "--policy",
        &policy.display().to_string(),
        "--",
        "/bin/sh",
        "-c",
        &format!(
            "dd if=/dev/zero of={}/big bs=1M count=16 2>&1 | grep -o 'No space left on device'; \
             echo dd-done",
            dir.s("work")
        ),
    ]);
    let text = stdout(&out);
    let written = std::fs::metadata(dir.join("work/big")).map_or(0, |m| m.len());

    assert_eq!(code(&out), 0, "{text}{}", stderr(&out));
    assert!(text.contains("No space left on device"), "{text}");
    assert!(written <= 4 << 20, "{written} bytes reached the host");
    assert!(written > 0, "{text}");
}

/// `mxc-vm serve` with a microVM sandbox: it boots once at creation, runs several execs
/// (stdin, exit codes), sees a file uploaded into its read-write grant, runs execs side by
/// side, delivers a signal to a running one, and deleting it while a command runs ends
/// the command and leaves no VMM behind.
#[test]
fn serve_runs_execs_and_files_in_a_microvm_sandbox() {
    require_kvm();
    use tests::serve::{b64, unb64, Server};
    let server = Server::start(&[]);
    let dir = tests::TempDir::new("serve-vm");
    let rw = dir.s("work");
    std::fs::create_dir_all(&rw).unwrap();
    let created = server.json(
        "POST",
        "/v1/sandboxes",
        serde_json::json!({"backend": "microvm",
            "policy": {"version": "1", "filesystem": {"readwrite": [rw]}}}),
    );
    assert_eq!(
        created.status,
        201,
        "{}",
        String::from_utf8_lossy(&created.body)
    );
    let id = created.json()["id"].as_str().unwrap().to_string();
    let exec = |body: serde_json::Value| {
        let reply = server.json("POST", &format!("/v1/sandboxes/{id}/exec"), body);
        let (mut out, mut exit) = (Vec::new(), serde_json::Value::Null);
        for e in reply.lines() {
            match e["type"].as_str().unwrap() {
                "stdout" => out.extend(unb64(e["data_b64"].as_str().unwrap())),
                "stderr" => {}
                _ => exit = e,
            }
        }
        (String::from_utf8_lossy(&out).into_owned(), exit)
    };
    let (out, exit) = exec(serde_json::json!({"argv": ["sh", "-c", "cat; exit 5"],
                                               "stdin_b64": b64(b"into the vm\n")}));
    assert_eq!(
        (out.as_str(), exit["exit_code"].as_i64()),
        ("into the vm\n", Some(5)),
        "{exit}"
    );
    let put = server.call(
        "PUT",
        &format!("/v1/sandboxes/{id}/files?path={rw}/f.txt"),
        b"from the host",
    );
    assert_eq!(put.status, 201);
    let (out, _) = exec(serde_json::json!({"argv": ["cat", format!("{rw}/f.txt")]}));
    assert_eq!(out, "from the host");
    let (_, exit) =
        exec(serde_json::json!({"argv": ["sh", "-c", format!("echo back > {rw}/g.txt")]}));
    assert_eq!(exit["exit_code"], 0);
    let got = server.call(
        "GET",
        &format!("/v1/sandboxes/{id}/files?path={rw}/g.txt"),
        b"",
    );
    assert_eq!(got.body, b"back\n");
    // Execs run side by side, each on its own agent connection: one waits for a file
    // the other makes; then a running exec takes a TERM it traps, by its id.
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            exec(serde_json::json!({"argv": ["sh", "-c", format!(
                "i=0; while [ ! -e {rw}/go ]; do i=$((i+1)); [ $i -gt 600 ] && exit 9; \
                 sleep 0.1; done; echo went")], "timeout_ms": 120000}))
        });
        std::thread::sleep(Duration::from_millis(500));
        let (_, made) = exec(serde_json::json!({"argv": ["touch", format!("{rw}/go")]}));
        assert_eq!(made["exit_code"], 0, "{made}");
        let (out, exit) = waiter.join().unwrap();
        assert_eq!(
            (out.as_str(), &exit["exit_code"]),
            ("went\n", &serde_json::json!(0))
        );

        let trapped = s.spawn(|| {
            exec(serde_json::json!({"argv": ["sh", "-c", format!(
                "trap 'echo got-term; exit 7' TERM; touch {rw}/trapped; \
                 while :; do sleep 0.1; done")]}))
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        while !std::path::Path::new(&format!("{rw}/trapped")).exists() {
            assert!(
                Instant::now() < deadline,
                "the trapping command never started"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let listed = server.call("GET", &format!("/v1/sandboxes/{id}/execs"), b"");
        let execs = listed.json()["execs"].as_array().unwrap().clone();
        assert_eq!(execs.len(), 1, "{execs:?}");
        let one = execs[0]["id"].as_u64().unwrap();
        let sent = server.json(
            "POST",
            &format!("/v1/sandboxes/{id}/execs/{one}/signal"),
            serde_json::json!({"signal": "TERM"}),
        );
        assert_eq!(sent.status, 200, "{}", String::from_utf8_lossy(&sent.body));
        let (out, exit) = trapped.join().unwrap();
        assert_eq!(
            (out.as_str(), &exit["exit_code"]),
            ("got-term\n", &serde_json::json!(7))
        );
    });
    // Deleting the sandbox while a command runs kills the VM at once.
    let (deleted, last, took) =
        server.delete_during_exec(&id, &["sleep", "600"], Duration::from_secs(2));
    assert_eq!(deleted, 200);
    assert_eq!(last["type"], "error", "{last}");
    assert!(took < Duration::from_secs(120), "{took:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pids_with(&id).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the VMM of {id} outlived its sandbox"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(server.stop(), 128 + libc::SIGTERM);
}

//! End-to-end tests of the process-level tiers (`process` and `bubblewrap`), driving the
//! real `mxc-vm` binary. Every case runs on both backends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::net::TcpListener;

use tests::{code, mount_table, mxc_vm, pids_with, stderr, stdout, TempDir};

/// Generates one test per backend for a case function `fn(backend: &str)`.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod process {
            $(#[test] fn $name() { super::$name("process"); })*
        }
        mod bubblewrap {
            $(#[test] fn $name() { super::$name("bubblewrap"); })*
        }
    };
}

both_backends!(
    echo_prints_and_exit_code_passes_through,
    denied_path_is_unreadable,
    readonly_path_is_unwritable,
    readwrite_path_writes_land_on_host,
    symlink_to_denied_file_does_not_leak,
    proc_shows_only_sandbox_processes,
    host_loopback_is_unreachable_under_deny_all,
    timeout_kills_the_whole_tree,
    environment_is_clean,
    fork_bomb_is_stopped_by_pids_limit,
    memory_hog_is_stopped_by_memory_limit,
    nothing_is_left_behind,
    json_output_streams_and_reports_exit,
    command_not_found_is_127,
    secrets_in_etc_and_home_are_invisible,
    every_secret_path_is_hidden_even_under_a_grant,
    dangerous_syscalls_are_denied,
    signals_stop_the_sandbox_and_leave_nothing,
    a_denied_path_cannot_be_moved_out_from_under_its_rule,
    the_ram_backed_tmp_is_bounded_by_the_memory_limit,
    a_missing_denied_path_a_grant_would_show_is_refused,
    a_disk_limit_is_refused,
    fifos_and_sockets_cannot_be_made_in_a_grant,
    every_namespace_is_the_sandboxs_own,
    an_inherited_ignored_hangup_stays_ignored,
    a_descriptor_mxc_vm_inherited_does_not_reach_the_command,
);

/// A file and a directory outside every grant, left open (no close-on-exec) by what
/// started mxc-vm, are not the command's: it cannot read the file through its number, nor
/// walk out of its view from the directory (`openat(fd, "..")`). Only 0, 1 and 2 reach it.
fn a_descriptor_mxc_vm_inherited_does_not_reach_the_command(backend: &str) {
    let dir = TempDir::new("inherited");
    std::fs::write(dir.join("secret"), "INHERITED-SECRET").unwrap();
    let mut cmd = std::process::Command::new(tests::mxc_vm_bin());
    cmd.args([
        "run",
        "--backend",
        backend,
        "--",
        "/bin/sh",
        "-c",
        "echo MARKER-RAN; cat <&9; ls -a /proc/self/fd/8/; ls /proc/self/fd",
    ]);
    tests::leave_open(
        &mut cmd,
        9,
        std::fs::File::open(dir.join("secret")).unwrap(),
    );
    tests::leave_open(&mut cmd, 8, std::fs::File::open(dir.path()).unwrap());
    let out = cmd.output().unwrap();
    let text = stdout(&out);
    assert!(text.starts_with("MARKER-RAN\n"), "{text}{}", stderr(&out));
    assert!(!text.contains("INHERITED-SECRET"), "{text}");
    assert!(
        !text.contains("secret"),
        "the inherited directory is open: {text}"
    );
    // ls's own listing of /proc/self/fd: 0, 1, 2 and the directory it reads (3).
    let fds: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(fds, ["0", "1", "2", "3"], "{text}");
}

fn run(backend: &str, extra: &[&str], cmd: &[&str]) -> std::process::Output {
    let mut args = vec!["run", "--backend", backend];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(cmd);
    mxc_vm(&args)
}

fn sh(backend: &str, extra: &[&str], script: &str) -> std::process::Output {
    run(backend, extra, &["/bin/sh", "-c", script])
}

fn echo_prints_and_exit_code_passes_through(backend: &str) {
    let hello = run(backend, &[], &["echo", "hello"]);
    let three = sh(backend, &[], "exit 3");
    assert_eq!((stdout(&hello), code(&hello)), ("hello\n".to_string(), 0));
    assert_eq!(code(&three), 3);
}

fn denied_path_is_unreadable(backend: &str) {
    let dir = TempDir::new("deny");
    std::fs::create_dir(dir.join("work")).unwrap();
    std::fs::write(dir.join("work/secret.txt"), "TOPSECRET").unwrap();
    std::fs::write(dir.join("work/ok.txt"), "fine").unwrap();
    let out = sh(
        backend,
        &["--rw", &dir.s("work"), "--deny", &dir.s("work/secret.txt")],
        &format!(
            "cat {}; cat {}",
            dir.s("work/ok.txt"),
            dir.s("work/secret.txt")
        ),
    );
    assert!(stdout(&out).contains("fine"));
    assert!(!stdout(&out).contains("TOPSECRET"), "{}", stdout(&out));
}

/// Review hole 1: inside a read-write grant, `mv T/d T/d2; mkdir T/d` carried the mask
/// along with the directory and left the host's file at `T/d2/secret`, which the next
/// run's rule (`T/d/secret`) no longer covers. Every directory between the grant and
/// the denied path, and the denied path itself, must stay where they are.
fn a_denied_path_cannot_be_moved_out_from_under_its_rule(backend: &str) {
    let dir = TempDir::new("pinned");
    std::fs::create_dir_all(dir.join("T/d/deeper")).unwrap();
    std::fs::write(dir.join("T/d/deeper/secret"), "TOPSECRET").unwrap();
    std::fs::create_dir(dir.join("T/free")).unwrap();
    let t = dir.s("T");
    let script = format!(
        "cd {t} || exit 9
         for attempt in 'mv d d2' 'mv d/deeper moved' 'mv d/deeper/secret s' \
                        'rm -rf d' 'rmdir d/deeper' 'mv -T free d'; do
           if $attempt 2>/dev/null; then echo \"ALLOWED: $attempt\"; fi
         done
         mv free free2 && echo MOVED-FREE
         cat d/deeper/secret d2/deeper/secret 2>/dev/null"
    );

    let out = sh(
        backend,
        &["--rw", &t, "--deny", &dir.s("T/d/deeper/secret")],
        &script,
    );

    let text = stdout(&out);
    assert!(!text.contains("ALLOWED"), "{text}\n{}", stderr(&out));
    assert!(!text.contains("TOPSECRET"), "{text}");
    assert!(text.contains("MOVED-FREE"), "{text}\n{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(dir.join("T/d/deeper/secret")).unwrap(),
        "TOPSECRET"
    );
}

/// A deny rule for a file that does not exist yet cannot be kept by a mask (nothing to
/// cover): a file the host writes there during the run would be visible. The attack: the
/// host creates the file while the sandbox runs; the policy is refused before anything
/// runs. Outside every grant such a rule is harmless and accepted.
fn a_missing_denied_path_a_grant_would_show_is_refused(backend: &str) {
    let dir = TempDir::new("later");
    std::fs::create_dir_all(dir.join("work")).unwrap();
    let later = dir.s("work/later.env");
    let script = format!(
        "i=0; while [ ! -e {later} ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; \
         cat {later} 2>/dev/null || echo NOT-SEEN"
    );
    let writer = {
        let later = later.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            std::fs::write(later, "HOST-SECRET-LATER").unwrap();
        })
    };
    let out = sh(
        backend,
        &["--rw", &dir.s("work"), "--deny", &later],
        &script,
    );
    writer.join().unwrap();
    let outside = run(
        backend,
        &["--deny", "/nonexistent-mxc/later.env"],
        &["true"],
    );

    assert!(
        !stdout(&out).contains("HOST-SECRET-LATER"),
        "{}",
        stdout(&out)
    );
    assert_eq!(code(&out), 125, "{}", stderr(&out));
    assert!(stderr(&out).contains(&later), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--backend microvm"),
        "{}",
        stderr(&out)
    );
    assert_eq!(code(&outside), 0, "{}", stderr(&outside));
}

/// `limits.diskMiB` needs the microVM, which counts what is written; the process tiers
/// say so instead of running without it.
fn a_disk_limit_is_refused(backend: &str) {
    let dir = TempDir::new("disk");
    let p = dir.join("p.json");
    std::fs::write(&p, r#"{"version":"1","limits":{"diskMiB":4}}"#).unwrap();
    let out = run(backend, &["--policy", &p.display().to_string()], &["true"]);

    assert_eq!(code(&out), 125, "{}", stderr(&out));
    assert!(stderr(&out).contains("limits.diskMiB"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--backend microvm"),
        "{}",
        stderr(&out)
    );
}

fn readonly_path_is_unwritable(backend: &str) {
    let dir = TempDir::new("ro");
    std::fs::write(dir.join("data.txt"), "original").unwrap();
    let out = sh(
        backend,
        &["--ro", &dir.s("")],
        &format!(
            "cat {f}; echo changed > {f} || echo WRITE-FAILED; touch {n} || echo CREATE-FAILED",
            f = dir.s("data.txt"),
            n = dir.s("new.txt")
        ),
    );
    let text = stdout(&out);
    assert!(text.contains("original"), "{text}");
    assert!(
        text.contains("WRITE-FAILED") && text.contains("CREATE-FAILED"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("data.txt")).unwrap(),
        "original"
    );
    assert!(!dir.join("new.txt").exists());
}

fn readwrite_path_writes_land_on_host(backend: &str) {
    let dir = TempDir::new("rw");
    let out = sh(
        backend,
        &["--rw", &dir.s("")],
        &format!("echo from-sandbox > {}", dir.s("out.txt")),
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(dir.join("out.txt")).unwrap(),
        "from-sandbox\n"
    );
}

fn symlink_to_denied_file_does_not_leak(backend: &str) {
    let dir = TempDir::new("symlink");
    std::fs::create_dir_all(dir.join("work")).unwrap();
    std::fs::create_dir_all(dir.join("private")).unwrap();
    std::fs::write(dir.join("private/key"), "PRIVATEKEY").unwrap();
    std::fs::write(dir.join("work/.env"), "ENVSECRET").unwrap();
    std::os::unix::fs::symlink(dir.join("private/key"), dir.join("work/link-out")).unwrap();
    std::os::unix::fs::symlink(".env", dir.join("work/link-in")).unwrap();
    let out = sh(
        backend,
        &[
            "--rw",
            &dir.s("work"),
            "--deny",
            &dir.s("private"),
            "--deny",
            &dir.s("work/.env"),
        ],
        &format!(
            "cat {a}; cat {b}; ln -s {k} {c} && cat {c}",
            a = dir.s("work/link-out"),
            b = dir.s("work/link-in"),
            k = dir.s("private/key"),
            c = dir.s("work/new-link"),
        ),
    );
    let text = stdout(&out);
    assert!(
        !text.contains("PRIVATEKEY") && !text.contains("ENVSECRET"),
        "{text}"
    );
}

fn proc_shows_only_sandbox_processes(backend: &str) {
    let out = sh(backend, &[], "ls /proc | grep -E '^[0-9]+$' | wc -l");
    let count: usize = stdout(&out).trim().parse().unwrap_or(usize::MAX);
    // PID 1 of the sandbox, sh, ls, grep, wc: a handful, never the host's hundreds.
    assert!(count <= 8, "{count} processes visible: {}", stdout(&out));
}

fn host_loopback_is_unreachable_under_deny_all(backend: &str) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let out = run(
        backend,
        &[],
        &[
            "python3",
            "-c",
            &format!(
                "import socket\ns=socket.socket()\ns.settimeout(3)\n\
                 try:\n  s.connect(('127.0.0.1',{port})); print('CONNECTED')\n\
                 except OSError as e: print('FAILED', e)"
            ),
        ],
    );
    let text = stdout(&out);
    assert!(
        text.contains("FAILED") && !text.contains("CONNECTED"),
        "{text}"
    );
}

fn timeout_kills_the_whole_tree(backend: &str) {
    let marker = format!("1{}.25", std::process::id() % 1000);
    let start = std::time::Instant::now();
    let out = sh(
        backend,
        &["--timeout", "1s"],
        &format!("sleep {marker} & sleep {marker} & wait"),
    );
    assert_eq!(code(&out), 124, "{}", stderr(&out));
    assert!(start.elapsed() < std::time::Duration::from_secs(30));
    // The PID namespace dies with its PID 1: give the kernel a moment to reap.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(pids_with(&format!("sleep {marker}")), Vec::<u32>::new());
}

fn environment_is_clean(backend: &str) {
    // SAFETY-free: set a host variable that must not appear inside.
    let out = std::process::Command::new(tests::mxc_vm_bin())
        .args(["run", "--backend", backend, "-e", "GIVEN=yes", "--", "env"])
        .env("HOST_ONLY_SECRET", "leak")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let mut vars: Vec<String> = stdout(&out)
        .lines()
        .map(|l| l.split('=').next().unwrap_or("").to_string())
        .collect();
    vars.sort();
    vars.dedup();
    // PWD and SHLVL may be added by a shell; `env` itself adds nothing.
    vars.retain(|v| v != "PWD");
    assert_eq!(vars, vec!["GIVEN", "HOME", "PATH"], "{}", stdout(&out));
}

fn policy_file(dir: &TempDir, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    path.display().to_string()
}

/// `limits.pids` holds even when mxc-vm runs as root (the kernel exempts root from
/// RLIMIT_NPROC, so a cgroup must count): of 100 forks with `pids: 32`, fewer than 32
/// succeed. Then a fork bomb: stopped, and nothing of it is left.
fn fork_bomb_is_stopped_by_pids_limit(backend: &str) {
    let dir = TempDir::new("forkbomb");
    let p = policy_file(&dir, "p.json", r#"{"version":"1","limits":{"pids":32}}"#);
    let forks = run(
        backend,
        &["--policy", &p, "--timeout", "30s"],
        &[
            "python3",
            "-c",
            "import os, time\n\
             n = 0\n\
             for i in range(100):\n\
             \x20   try:\n\
             \x20       pid = os.fork()\n\
             \x20   except OSError:\n\
             \x20       continue\n\
             \x20   if pid == 0:\n\
             \x20       time.sleep(3)\n\
             \x20       os._exit(0)\n\
             \x20   n += 1\n\
             print(f'forked={n}', flush=True)\n",
        ],
    );
    let forked: usize = stdout(&forks)
        .trim()
        .strip_prefix("forked=")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}{}", stdout(&forks), stderr(&forks)));
    assert!(forked < 32, "{forked} of 100 forks succeeded with pids: 32");

    let out = sh(
        backend,
        &["--policy", &p, "--timeout", "3s"],
        "bomb() { bomb | bomb & }; bomb; sleep 1; ls /proc | grep -cE '^[0-9]+$'",
    );
    let count: usize = stdout(&out)
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        count <= 40 || code(&out) == 124,
        "{count} processes: {}",
        stderr(&out)
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(pids_with("bomb").is_empty());
}

/// Review hole 8: `/tmp` is a tmpfs (RAM), so writing 512 MiB there with
/// `memoryMiB: 128` used host memory past the limit. It now holds at most the limit.
fn the_ram_backed_tmp_is_bounded_by_the_memory_limit(backend: &str) {
    let dir = TempDir::new("tmpfs");
    let p = policy_file(
        &dir,
        "p.json",
        r#"{"version":"1","limits":{"memoryMiB":128}}"#,
    );

    let out = sh(
        backend,
        &["--policy", &p, "--timeout", "60s"],
        "dd if=/dev/zero of=/tmp/big bs=1M count=512 2>/dev/null; echo rc=$?; \
         du -m /tmp/big | cut -f1",
    );

    let text = stdout(&out);
    let mut lines = text.lines();
    assert_ne!(lines.next(), Some("rc=0"), "{text}{}", stderr(&out));
    let mib: u64 = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(u64::MAX);
    assert!(
        mib <= 128,
        "{mib} MiB written to /tmp: {text}{}",
        stderr(&out)
    );
}

fn memory_hog_is_stopped_by_memory_limit(backend: &str) {
    let dir = TempDir::new("memhog");
    let p = policy_file(
        &dir,
        "p.json",
        r#"{"version":"1","limits":{"memoryMiB":128}}"#,
    );
    let hog = run(
        backend,
        &["--policy", &p],
        &[
            "python3",
            "-c",
            "x = bytearray(512 * 1024 * 1024); print('ALLOCATED')",
        ],
    );
    let small = run(
        backend,
        &["--policy", &p],
        &[
            "python3",
            "-c",
            "x = bytearray(16 * 1024 * 1024); print('OK')",
        ],
    );
    assert!(!stdout(&hog).contains("ALLOCATED"));
    assert_ne!(code(&hog), 0);
    assert_eq!(stdout(&small), "OK\n", "{}", stderr(&small));
}

fn nothing_is_left_behind(backend: &str) {
    let mounts_before = mount_table();
    let tmp_before: Vec<_> = std::fs::read_dir("/tmp")
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("mxc-vm"))
        .collect();
    let marker = format!("2{}.75", std::process::id() % 1000);
    let out = sh(backend, &[], &format!("(sleep {marker} &) ; echo started"));
    assert_eq!(code(&out), 0);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let tmp_after: Vec<_> = std::fs::read_dir("/tmp")
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("mxc-vm"))
        .collect();
    assert_eq!(pids_with(&format!("sleep {marker}")), Vec::<u32>::new());
    assert_eq!(mount_table(), mounts_before);
    assert_eq!(tmp_after, tmp_before);
}

/// SIGTERM (`timeout`, a service manager), SIGINT (Ctrl-C) and SIGHUP (a closed terminal)
/// to mxc-vm while its sandbox runs: the sandbox dies, nothing of it is left (processes,
/// mounts, temp dirs), and mxc-vm exits 128+N saying why. Once with the policy proxy
/// (allowed egress), whose network namespace and listener must go too.
fn signals_stop_the_sandbox_and_leave_nothing(backend: &str) {
    let mounts_before = mount_table();
    let dir = TempDir::new("signals");
    let allow_all = policy_file(
        &dir,
        "allow-all.json",
        r#"{"version":"1","network":{"egress":{"default":"allow"}}}"#,
    );
    for (i, (signal, name)) in [
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGHUP, "SIGHUP"),
    ]
    .into_iter()
    .enumerate()
    {
        let marker = format!("3{}.{}5", std::process::id() % 1000, i + 1);
        let script = format!("sleep {marker} & sleep {marker} & echo ready; wait");
        let mut args = vec!["run", "--backend", backend];
        if signal == libc::SIGHUP {
            args.extend(["--policy", &allow_all]);
        }
        args.extend(["--", "/bin/sh", "-c", &script]);

        let run = tests::signal_a_run(
            &args,
            Some("ready"),
            std::time::Duration::ZERO,
            signal,
            std::time::Duration::from_secs(30),
            &|_| {},
        );

        assert_eq!(run.code, 128 + signal, "{name}: {}", run.stderr);
        assert!(
            run.stderr.contains(&format!("stopped by {name}")),
            "{name}: {}",
            run.stderr
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(pids_with(&format!("sleep {marker}")), Vec::<u32>::new());
        assert_eq!(tests::runtime_dirs_of(run.pid), Vec::<String>::new());
    }
    assert_eq!(mount_table(), mounts_before);
}

/// `nohup mxc-vm run ...`: SIGHUP was ignored when mxc-vm started, so a hangup neither
/// stops the run nor reaches the command, which finishes and passes its exit code on.
fn an_inherited_ignored_hangup_stays_ignored(backend: &str) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(tests::mxc_vm_bin());
    cmd.args([
        "run",
        "--backend",
        backend,
        "--",
        "/bin/sh",
        "-c",
        "echo ready; sleep 1; echo done; exit 4",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // SAFETY: signal() is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    // SAFETY: kill() on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    assert_eq!(lines.next().unwrap().unwrap(), "done");
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(4), "{err}");
    assert!(!err.contains("stopped by"), "{err}");
}

fn json_output_streams_and_reports_exit(backend: &str) {
    let out = sh(backend, &["--json"], "echo out; echo err >&2; exit 5");
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "exit");
    assert_eq!(last["code"], 5);
    assert!(lines
        .iter()
        .any(|l| l["type"] == "stdout" && l["data"] == "out\n"));
    assert!(lines
        .iter()
        .any(|l| l["type"] == "stderr" && l["data"] == "err\n"));
    assert_eq!(code(&out), 5);
}

fn command_not_found_is_127(backend: &str) {
    let out = run(backend, &[], &["no-such-command-xyz"]);
    assert_eq!(code(&out), 127, "{}", stderr(&out));
}

fn secrets_in_etc_and_home_are_invisible(backend: &str) {
    let out = sh(
        backend,
        &[],
        "cat /etc/shadow 2>/dev/null && echo SHADOW; ls /root 2>/dev/null && echo ROOT; \
         ls /home 2>/dev/null && echo HOME; echo done",
    );
    let text = stdout(&out);
    assert!(
        !text.contains("SHADOW") && !text.contains("ROOT") && !text.contains("HOME"),
        "{text}"
    );
}

/// Every path on the one secret list is invisible on this tier: with the default system
/// view (whose `/etc` allowlist has `ssl`) and when the policy grants all of `/etc`.
fn every_secret_path_is_hidden_even_under_a_grant(backend: &str) {
    for extra in [&[][..], &["--ro", "/etc"][..]] {
        for secret in sandbox::view::SECRET_PATHS {
            let Ok(meta) = std::fs::symlink_metadata(secret) else {
                continue;
            };
            // Entries listed, or bytes read: none.
            let probe = if meta.is_dir() {
                format!("ls -A {secret} 2>/dev/null | wc -l")
            } else {
                format!("cat {secret} 2>/dev/null | wc -c")
            };
            let out = sh(backend, extra, &probe);
            assert_eq!(
                stdout(&out).trim(),
                "0",
                "{secret} with {extra:?}: {}",
                stderr(&out)
            );
        }
    }
}

fn dangerous_syscalls_are_denied(backend: &str) {
    let out = run(
        backend,
        &[],
        &[
            "python3",
            "-c",
            "import ctypes, os, socket\n\
             libc = ctypes.CDLL(None, use_errno=True)\n\
             print('unshare', libc.unshare(0x10000000), ctypes.get_errno())\n\
             print('ptrace', libc.ptrace(0, 0, 0, 0), ctypes.get_errno())\n\
             print('x32-unshare', libc.syscall(0x40000000 | 272, 0x10000000), ctypes.get_errno())\n\
             print('x32-ptrace', libc.syscall(0x40000000 | 521, 0, 0, 0, 0), ctypes.get_errno())\n\
             try:\n  socket.socket(40, socket.SOCK_STREAM); print('vsock OPEN')\n\
             except OSError as e: print('vsock', e.errno)\n",
        ],
    );
    let text = stdout(&out);
    assert!(text.contains("unshare -1 1"), "{text}");
    assert!(text.contains("ptrace -1 1"), "{text}");
    // The x32 numbers (bit 30) are refused by our filter (EPERM), not left to the
    // kernel's x32 switch (ENOSYS where it is off, the call itself where it is on).
    assert!(text.contains("x32-unshare -1 1"), "{text}");
    assert!(text.contains("x32-ptrace -1 1"), "{text}");
    assert!(text.contains("vsock 1"), "{text}");
}

#[test]
fn bad_policy_fails_with_125_and_names_the_field() {
    let dir = TempDir::new("badpolicy");
    let p = policy_file(
        &dir,
        "bad.json",
        "{\n  \"version\": \"1\",\n  \"filesystem\": { \"readonlyy\": [\"/x\"] }\n}\n",
    );
    let out = mxc_vm(&["run", "--policy", &p, "--", "true"]);
    let err = stderr(&out);
    assert_eq!(code(&out), 125);
    assert!(err.contains("bad.json:3"), "{err}");
    assert!(err.contains("readonly"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn bad_policy_with_json_gives_an_error_object() {
    let dir = TempDir::new("badpolicyjson");
    let p = policy_file(
        &dir,
        "bad.json",
        r#"{"version":"1","limits":{"pids":"many"}}"#,
    );
    let out = mxc_vm(&["run", "--json", "--policy", &p, "--", "true"]);
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(code(&out), 125);
    assert_eq!(v["type"], "error");
    assert!(v["error"]["path"]
        .as_str()
        .unwrap_or("")
        .contains("limits.pids"));
}

#[test]
fn bad_duration_flag_fails_with_125() {
    let out = mxc_vm(&["run", "--timeout", "soon", "--", "true"]);
    assert_eq!(code(&out), 125);
    assert!(stderr(&out).contains("--timeout"));
}

/// A FIFO or a Unix socket made in a read-write grant is a channel a host process could
/// open (a socket where the host's tools look for a daemon's, e.g. `.git/`): Landlock
/// refuses making them in grants on both process tiers (bubblewrap's through our exec
/// helper); the sandbox's own /tmp keeps them.
fn fifos_and_sockets_cannot_be_made_in_a_grant(backend: &str) {
    if process_landlock_abi() < 1 {
        eprintln!("skipped: no Landlock on this kernel");
        return;
    }
    // Landlock rights reach through mount points, so a grant below /tmp (a checkout
    // under /tmp) takes the sandbox's own /tmp down to the grants' rights.
    let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("fifo-{backend}-{}", std::process::id()));
    let tmp_keeps_them = !base.starts_with("/tmp");
    let dir = Scratch(base.clone());
    std::fs::create_dir_all(base.join("work")).unwrap();
    let script = format!(
        "import os, socket\n\
         for p in ['{w}/fifo', '/tmp/fifo']:\n\
         \x20   try:\n        os.mkfifo(p); print('MADE', p)\n\
         \x20   except OSError as e:\n        print('REFUSED', p, e.strerror)\n\
         for p in ['{w}/daemon.sock', '/tmp/daemon.sock']:\n\
         \x20   s = socket.socket(socket.AF_UNIX)\n\
         \x20   try:\n        s.bind(p); print('MADE', p)\n\
         \x20   except OSError as e:\n        print('REFUSED', p, e.strerror)\n",
        w = dir.s("work")
    );
    let out = run(
        backend,
        &["--rw", &dir.s("work")],
        &["python3", "-c", &script],
    );
    let text = stdout(&out);

    assert_eq!(code(&out), 0, "{text}\n{}", stderr(&out));
    assert!(
        text.contains(&format!("REFUSED {}/fifo", dir.s("work"))),
        "{text}"
    );
    assert!(
        text.contains(&format!("REFUSED {}/daemon.sock", dir.s("work"))),
        "{text}"
    );
    assert_eq!(
        text.contains("MADE /tmp/fifo") && text.contains("MADE /tmp/daemon.sock"),
        tmp_keeps_them,
        "{text}"
    );
    assert!(!dir.join("work/fifo").exists() && !dir.join("work/daemon.sock").exists());
}

/// A directory removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn join(&self, p: &str) -> std::path::PathBuf {
        self.0.join(p)
    }
    fn s(&self, p: &str) -> String {
        self.0.join(p).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn process_landlock_abi() -> i32 {
    let out = mxc_vm(&["backends", "--json"]);
    let text = stdout(&out);
    text.split("landlock ABI ")
        .nth(1)
        .and_then(|r| {
            r.split(|c: char| !c.is_ascii_digit())
                .find(|s| !s.is_empty())
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn policy_check_and_explain_work() {
    let dir = TempDir::new("explain");
    std::fs::create_dir(dir.join("data")).unwrap();
    let p = policy_file(
        &dir,
        "p.json",
        r#"{"version":"1","filesystem":{"readonly":["./data"],"denied":["./data/x"]},
            "process":{"argv":["true"]}}"#,
    );
    let check = mxc_vm(&["policy", "check", &p]);
    let explain = mxc_vm(&["policy", "explain", &p]);
    assert_eq!(code(&check), 0, "{}", stderr(&check));
    assert_eq!(code(&explain), 0, "{}", stderr(&explain));
    assert!(stdout(&explain).contains(&dir.s("data")));
}

#[test]
fn policy_schema_prints_json_schema() {
    let out = mxc_vm(&["policy", "schema"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.get("$schema").is_some() || v.get("properties").is_some());
}

#[test]
fn backends_lists_every_backend() {
    let out = mxc_vm(&["backends", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["process", "bubblewrap", "microvm", "hyperlight"]
    );
}

#[test]
fn mxc_command_line_runs_through_sh() {
    let dir = TempDir::new("mxccmd");
    let p = policy_file(
        &dir,
        "mxc.json",
        r#"{"version":"0.8.0-alpha","containment":"process",
            "process":{"commandLine":"echo one && echo two"}}"#,
    );
    let out = mxc_vm(&["run", "--policy", &p]);
    assert_eq!(stdout(&out), "one\ntwo\n", "{}", stderr(&out));
}

/// `MXC_VM_STAGES` (what `bench exec --stages` reads): every setup stage of the process
/// tier is timed, in order, from the host and from each of the sandbox's processes, and
/// a run's output and exit code are unchanged.
#[test]
fn stage_times_cover_every_process_of_a_run() {
    let dir = TempDir::new("stages");
    let file = dir.join("stages.jsonl");
    let out = std::process::Command::new(tests::mxc_vm_bin())
        .args([
            "run",
            "--backend",
            "process",
            "--",
            "sh",
            "-c",
            "echo hi; exit 3",
        ])
        .env("MXC_VM_STAGES", &file)
        .output()
        .unwrap();
    assert_eq!(
        (code(&out), stdout(&out).as_str()),
        (3, "hi\n"),
        "{}",
        stderr(&out)
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let run: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(run["backend"], "process");
    let stages: Vec<(String, u64)> = serde_json::from_value(run["stages"].clone()).unwrap();
    let names: Vec<&str> = stages.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "host: main",
        "init: namespaces, id maps",
        "root built",
        "pid 1: /proc, pivot_root",
        "command: landlock",
        "command: seccomp",
        "command ran",
        "host: init reaped",
        "host: done",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    assert_eq!(stages.first().map(|(_, t)| *t), Some(0));
    assert!(stages.windows(2).all(|w| w[0].1 <= w[1].1), "{stages:?}");
}

/// `policy explain` lists what every sandbox sees besides the policy's own paths, and the
/// policy commands name what went wrong: the read error's reason, a missing version, a
/// proxy URL's credentials never echoed.
#[test]
fn explain_shows_the_system_view_and_errors_keep_secrets_out() {
    let dir = TempDir::new("explain");
    let p = policy_file(
        &dir,
        "p.json",
        r#"{"containment":"process","process":{"commandLine":"true"}}"#,
    );
    let out = mxc_vm(&["policy", "explain", &p]);
    let text = stdout(&out);
    assert!(text.contains("(no paths of its own)"), "{text}");
    assert!(
        text.contains("system view") && text.contains("/usr"),
        "{text}"
    );
    assert!(
        text.contains("/etc/shadow") && text.contains("never shown"),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&mxc_vm(&["policy", "explain", "--json", &p]).stdout).unwrap();
    assert!(json["filesystem"]["systemView"].as_array().unwrap().len() >= 5);
    assert!(stdout(&mxc_vm(&["policy", "check", &p])).contains("MXC ContainerConfig, no version"));

    let missing = mxc_vm(&["policy", "check", &dir.s("none.json")]);
    assert!(
        stderr(&missing).contains("No such file or directory"),
        "{}",
        stderr(&missing)
    );
    let secret = policy_file(
        &dir,
        "s.json",
        r#"{"version":"0.8.0-alpha","containment":"process","process":{"commandLine":"true"},
            "network":{"proxy":{"url":"http://alice:s3cret@proxy.example:8080"}}}"#,
    );
    for args in [
        vec!["policy", "check", &secret],
        vec!["policy", "check", "--json", &secret],
    ] {
        let out = mxc_vm(&args);
        let all = format!("{}{}", stdout(&out), stderr(&out));
        assert_ne!(code(&out), 0);
        assert!(
            all.contains("alice:***@proxy.example") && !all.contains("s3cret"),
            "{all}"
        );
    }
}

/// The sandbox has a namespace of its own of every kind, however it was made (the
/// process tier's fast path makes the network and IPC ones in a helper and passes them
/// to PID 1): none is the host's.
fn every_namespace_is_the_sandboxs_own(backend: &str) {
    let kinds = ["user", "mnt", "pid", "net", "ipc", "uts", "cgroup"];
    let script = kinds
        .iter()
        .map(|k| format!("echo {k} $(readlink /proc/self/ns/{k})"))
        .collect::<Vec<_>>()
        .join("; ");

    let out = sh(backend, &[], &script);

    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    for kind in kinds {
        let host = std::fs::read_link(format!("/proc/self/ns/{kind}")).unwrap();
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(kind))
            .unwrap_or_else(|| panic!("no {kind} line in {text:?}"));
        let inside = line.split_whitespace().nth(1).unwrap_or_default();
        assert!(
            inside.starts_with(&format!("{kind}:[")),
            "{kind}: {inside:?}"
        );
        assert_ne!(inside, host.to_string_lossy(), "{kind} is the host's");
    }
}

/// SIGKILL of `mxc-vm` (nothing can be cleaned up then) at every moment of a sandbox's
/// start: every process of the sandbox dies with it, on both process tiers. bubblewrap
/// sets its children's parent-death signal only once it has built the sandbox, so a
/// supervisor killed while it does so left bwrap's sandbox and the command running (one
/// run in five under load); bwrap's process is now the init of a PID namespace of our
/// own, whose end ends everything in it.
#[test]
fn sigkill_of_mxc_vm_at_any_moment_of_the_start_leaves_no_process() {
    for backend in ["process", "bubblewrap"] {
        let marker = format!("4{}.{}7", std::process::id() % 1000, backend.len());
        for i in 0..40u64 {
            let mut child = std::process::Command::new(tests::mxc_vm_bin())
                .args(["run", "--backend", backend, "--", "sleep", &marker])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            // Wait for mxc-vm's first child (bwrap, or the sandbox's init), then kill
            // it a varying moment later: inside the sandbox's setup.
            let children = format!("/proc/{0}/task/{0}/children", child.id());
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::fs::read_to_string(&children)
                .map(|c| c.trim().is_empty())
                .unwrap_or(false)
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
            std::thread::sleep(std::time::Duration::from_micros(250 * (i % 20)));
            let _ = child.kill();
            let _ = child.wait();
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        let left = pids_with(&format!("sleep {marker}"));
        for pid in &left {
            // SAFETY: kill() on leftovers of this test, by their unique marker.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        assert_eq!(
            left,
            Vec::<u32>::new(),
            "{backend}: processes outlived mxc-vm"
        );
    }
}

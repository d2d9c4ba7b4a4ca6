//! Soak: many sandboxes, one after another and side by side, leave nothing behind on
//! the host -- no process, mount, cgroup, network namespace, Unix socket or temp
//! directory more than before. Each process tier does 1,000 sequential runs and 20
//! concurrent ones through the real `mxc-vm` binary, with a policy that makes every run
//! set up all it can: a cgroup (pids and memory), the policy proxy (an allowed name), a
//! read-write grant and a denied path.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Mutex;

use tests::leaks::HostState;
use tests::{code, mxc_vm, stderr, TempDir};

/// One backend at a time: the counts are host-wide.
static HOST: Mutex<()> = Mutex::new(());

const SEQUENTIAL: usize = 1000;
const CONCURRENT: usize = 20;

#[test]
fn process_runs_leave_nothing_behind() {
    soak("process");
}

#[test]
fn bubblewrap_runs_leave_nothing_behind() {
    soak("bubblewrap");
}

fn soak(backend: &str) {
    let _host = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("soak");
    std::fs::create_dir_all(dir.join("work/private")).unwrap();
    std::fs::write(dir.join("work/private/key"), "secret").unwrap();
    let policy = dir.join("policy.json");
    std::fs::write(
        &policy,
        format!(
            r#"{{"version":"1",
                "filesystem":{{"readwrite":["{w}"],"denied":["{w}/private"]}},
                "network":{{"egress":{{"default":"deny","allow":["allowed.test"]}}}},
                "limits":{{"pids":32,"memoryMiB":128}}}}"#,
            w = dir.s("work")
        ),
    )
    .unwrap();
    let policy = policy.display().to_string();
    let args = |n: usize| -> Vec<String> {
        [
            "run",
            "--backend",
            backend,
            "--policy",
            &policy,
            "--",
            "/bin/sh",
            "-c",
            &format!(
                "echo {n} > {}/out-{n}; test ! -e {}/key",
                dir.s("work"),
                dir.s("work/private")
            ),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |n: usize| {
        let a = args(n);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = mxc_vm(&a);
        assert_eq!(code(&out), 0, "run {n} on {backend}: {}", stderr(&out));
    };

    let before = HostState::now();
    let start = std::time::Instant::now();
    for n in 0..SEQUENTIAL {
        run(n);
    }
    let sequential = start.elapsed();
    let after_sequential = HostState::now();
    std::thread::scope(|s| {
        for n in 0..CONCURRENT {
            s.spawn(move || run(SEQUENTIAL + n));
        }
    });
    let after_concurrent = HostState::now();
    eprintln!(
        "{backend}: {SEQUENTIAL} sequential runs in {:.1} s ({:.1} ms each), then {CONCURRENT} \
         concurrent",
        sequential.as_secs_f64(),
        sequential.as_secs_f64() * 1000.0 / SEQUENTIAL as f64
    );

    let written = std::fs::read_dir(dir.join("work"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("out-"))
        .count();
    assert_eq!(written, SEQUENTIAL + CONCURRENT, "every run wrote its file");
    assert_eq!(
        after_sequential.left_since(&before),
        Vec::<String>::new(),
        "after {SEQUENTIAL} sequential runs"
    );
    assert_eq!(
        after_concurrent.left_since(&before),
        Vec::<String>::new(),
        "after {CONCURRENT} concurrent runs"
    );
}

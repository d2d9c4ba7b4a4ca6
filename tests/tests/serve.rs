//! `mxc-vm serve`, end to end through its Unix socket and TCP: the API's routes and
//! errors, sandboxes with execs and files on the process tiers, limits, TTLs, the
//! token on TCP, and a load run (20 sandboxes at once, 1,000 execs) after which SIGTERM
//! leaves nothing behind.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tests::leaks::HostState;
use tests::serve::{b64, exchange, unb64, Reply, Server};
use tests::TempDir;

/// The load test counts host-wide; the others must not run beside it.
static HOST: Mutex<()> = Mutex::new(());

/// Run a command; (stdout, stderr, the exit event).
fn exec(server: &Server, id: &str, body: serde_json::Value) -> (String, String, serde_json::Value) {
    let reply = server.json("POST", &format!("/v1/sandboxes/{id}/exec"), body);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let (mut out, mut err, mut exit) = (Vec::new(), Vec::new(), serde_json::Value::Null);
    for event in reply.lines() {
        match event["type"].as_str().unwrap() {
            "stdout" => out.extend(unb64(event["data_b64"].as_str().unwrap())),
            "stderr" => err.extend(unb64(event["data_b64"].as_str().unwrap())),
            _ => exit = event,
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        exit,
    )
}

fn create(server: &Server, body: serde_json::Value) -> String {
    let reply = server.json("POST", "/v1/sandboxes", body);
    assert_eq!(
        reply.status,
        201,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    reply.json()["id"].as_str().unwrap().to_string()
}

fn path_str(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

#[test]
fn health_openapi_and_every_error_is_json() {
    let _host = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start(&["--max-body", "2000"]);

    let health = server.call("GET", "/v1/health", b"");
    assert_eq!(
        (health.status, health.json()),
        (200, serde_json::json!({"status": "ok"}))
    );
    let api = server.call("GET", "/v1/openapi.json", b"");
    assert_eq!(api.json()["openapi"], "3.0.3");
    let metrics = server.call("GET", "/metrics", b"");
    assert!(String::from_utf8_lossy(&metrics.body)
        .contains("# TYPE mxc_exec_duration_seconds histogram"));

    let cases: Vec<(Reply, u16, &str, &str)> = vec![
        (
            server.call("GET", "/nowhere", b""),
            404,
            "not_found",
            "/nowhere",
        ),
        (
            server.call("DELETE", "/v1/health", b""),
            405,
            "method_not_allowed",
            "DELETE",
        ),
        (
            server.call("POST", "/v1/sandboxes", b"{bad"),
            400,
            "malformed_request",
            "invalid request body",
        ),
        (
            server.call("POST", "/v1/sandboxes", br#"{"policy": 3}"#),
            400,
            "malformed_request",
            "`policy`",
        ),
        (
            server.call("POST", "/v1/sandboxes", br#"{"colour": "red"}"#),
            400,
            "malformed_request",
            "colour",
        ),
        (
            server.call("POST", "/v1/sandboxes", br#"{"backend": "lxd"}"#),
            400,
            "unsupported_containment",
            "lxd",
        ),
        (
            server.call(
                "POST",
                "/v1/sandboxes",
                br#"{"policy": {"version": "1", "filesystem": {"deny": []}}}"#,
            ),
            400,
            "policy_validation",
            "filesystem.deny",
        ),
        (
            server.call("POST", "/v1/sandboxes", &vec![b' '; 5000]),
            413,
            "body_too_large",
            "2000",
        ),
        (
            server.call("GET", "/v1/sandboxes/sb-none", b""),
            404,
            "not_found",
            "sb-none",
        ),
        (
            server.call(
                "POST",
                "/v1/sandboxes/sb-none/exec",
                br#"{"argv":["true"]}"#,
            ),
            404,
            "not_found",
            "sb-none",
        ),
    ];
    for (reply, status, code, needle) in cases {
        let (s, c, m) = reply.error();
        assert_eq!((s, c.as_str()), (status, code), "{m}");
        assert!(m.contains(needle), "{m:?} should name {needle:?}");
    }
    assert_eq!(server.stop(), 128 + libc::SIGTERM);
}

#[test]
fn a_process_sandbox_runs_many_commands_and_moves_files_under_its_policy() {
    let _host = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start(&[]);
    let dir = TempDir::new("serve-files");
    for d in ["rw/sub", "rw/secret", "ro"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::write(dir.join("rw/secret/key"), "top secret").unwrap();
    std::fs::write(dir.join("ro/readme"), "read me").unwrap();
    std::os::unix::fs::symlink(dir.join("rw/secret/key"), dir.join("rw/sub/link")).unwrap();
    let (rw, ro) = (path_str(&dir.join("rw")), path_str(&dir.join("ro")));
    for backend in ["process", "bubblewrap"] {
        let id = create(
            &server,
            serde_json::json!({
                "backend": backend,
                "labels": {"team": "a"},
                "policy": {"version": "1", "filesystem": {
                    "readwrite": [rw], "readonly": [ro], "denied": [format!("{rw}/secret")]}},
            }),
        );
        let info = server
            .call("GET", &format!("/v1/sandboxes/{id}"), b"")
            .json();
        assert_eq!(
            (info["backend"].as_str(), info["labels"]["team"].as_str()),
            (Some(backend), Some("a"))
        );

        // Commands: output streamed per stream, stdin, exit code, env, cwd, timeout.
        let (out, err, exit) = exec(
            &server,
            &id,
            serde_json::json!({"argv": ["sh", "-c", "echo out; echo err >&2; cat; echo $X; pwd; exit 7"],
                                "stdin_b64": b64(b"from stdin\n"), "env": {"X": "y"}, "cwd": rw}),
        );
        assert_eq!(out, format!("out\nfrom stdin\ny\n{rw}\n"));
        assert_eq!(
            (err.as_str(), exit["exit_code"].as_i64()),
            ("err\n", Some(7))
        );
        let (_, _, exit) = exec(
            &server,
            &id,
            serde_json::json!({"argv": ["sleep", "10"], "timeout_ms": 300}),
        );
        assert_eq!(exit["timed_out"], true, "{exit}");
        let (out, _, exit) = exec(
            &server,
            &id,
            serde_json::json!({"argv": ["cat", format!("{rw}/secret/key")]}),
        );
        assert_eq!((out.as_str(), exit["exit_code"].as_i64()), ("", Some(1)));
        let (_, err, exit) = exec(
            &server,
            &id,
            serde_json::json!({"argv": ["no-such-program"]}),
        );
        assert_eq!(exit["exit_code"].as_i64(), Some(127), "{err}");

        // Files: written where the policy allows, read back, seen by the sandbox.
        let files = |p: &str| format!("/v1/sandboxes/{id}/files?path={p}");
        let up = server.call(
            "PUT",
            &files(&format!("{rw}/sub/up.txt")),
            b"uploaded bytes",
        );
        assert_eq!((up.status, up.json()["bytes"].as_u64()), (201, Some(14)));
        assert_eq!(
            server
                .call("GET", &files(&format!("{rw}/sub/up.txt")), b"")
                .body,
            b"uploaded bytes"
        );
        let (out, _, _) = exec(
            &server,
            &id,
            serde_json::json!({"argv": ["cat", format!("{rw}/sub/up.txt")]}),
        );
        assert_eq!(out, "uploaded bytes");
        assert_eq!(
            server
                .call("GET", &files(&format!("{ro}/readme")), b"")
                .body,
            b"read me"
        );
        let listing = server
            .call("GET", &format!("/v1/sandboxes/{id}/list?path={rw}"), b"")
            .json();
        let names: Vec<&str> = listing["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["sub"], "the denied directory is not listed");

        // What the policy withholds is refused with the rule, and nothing changes.
        let refusals = [
            (
                server.call("GET", &files(&format!("{rw}/secret/key")), b""),
                403,
                "path_denied",
                "rule:",
            ),
            (
                server.call("PUT", &files(&format!("{rw}/secret/new")), b"x"),
                403,
                "path_denied",
                "secret",
            ),
            (
                server.call("PUT", &files(&format!("{ro}/readme")), b"x"),
                403,
                "read_only",
                "rule:",
            ),
            (
                server.call("GET", &files(&format!("{rw}/sub/link")), b""),
                403,
                "path_denied",
                "symlink",
            ),
            (
                server.call("GET", &files("/etc/passwd"), b""),
                403,
                "path_denied",
                "not granted",
            ),
            (
                server.call("GET", &files(&format!("{rw}/../ro/readme")), b""),
                400,
                "bad_path",
                "..",
            ),
            (
                server.call("GET", &files(&format!("{rw}/sub/none")), b""),
                404,
                "not_found",
                "does not exist",
            ),
            (
                server.call("GET", &files(&format!("{rw}/sub")), b""),
                400,
                "is_a_directory",
                "list",
            ),
            (
                server.call("GET", &format!("/v1/sandboxes/{id}/files"), b""),
                400,
                "bad_request",
                "path",
            ),
        ];
        for (reply, status, code, needle) in refusals {
            let (s, c, m) = reply.error();
            assert_eq!((s, c.as_str()), (status, code), "{m}");
            assert!(m.contains(needle), "{m:?} should say {needle:?}");
        }
        assert_eq!(
            std::fs::read_to_string(dir.join("rw/secret/key")).unwrap(),
            "top secret"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("ro/readme")).unwrap(),
            "read me"
        );
        assert!(!dir.join("rw/secret/new").exists());

        let deleted = server
            .call("DELETE", &format!("/v1/sandboxes/{id}"), b"")
            .json();
        assert_eq!(
            (deleted["state"].as_str(), deleted["execs"].as_u64()),
            (Some("deleted"), Some(5))
        );
        assert_eq!(
            server
                .call("GET", &format!("/v1/sandboxes/{id}"), b"")
                .status,
            404
        );
    }
    assert_eq!(server.stop(), 128 + libc::SIGTERM);
}

#[test]
fn limits_and_ttls() {
    let _host = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start(&["--max-sandboxes", "1"]);
    let id = create(
        &server,
        serde_json::json!({"backend": "process", "ttl_s": 1}),
    );
    let (status, code, message) = server
        .json(
            "POST",
            "/v1/sandboxes",
            serde_json::json!({"backend": "process"}),
        )
        .error();
    assert_eq!((status, code.as_str()), (429, "limit_reached"), "{message}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while server
        .call("GET", &format!("/v1/sandboxes/{id}"), b"")
        .status
        == 200
    {
        assert!(Instant::now() < deadline, "the TTL never reaped {id}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let idle = create(
        &server,
        serde_json::json!({"backend": "process", "idle_ttl_s": 1}),
    );
    std::thread::sleep(Duration::from_millis(1600));
    assert_eq!(
        server
            .call("GET", &format!("/v1/sandboxes/{idle}"), b"")
            .status,
        404
    );

    // The policy's timeout (the smaller of process.timeout and limits.timeout) is a
    // ceiling: a request asking for longer still ends at the policy's limit.
    let capped = create(
        &server,
        serde_json::json!({"backend": "process", "policy": {"version": "1",
            "process": {"timeout": "30s"}, "limits": {"timeout": "300ms"}}}),
    );
    let started = Instant::now();
    let (_, _, exit) = exec(
        &server,
        &capped,
        serde_json::json!({"argv": ["sleep", "20"], "timeout_ms": 60000}),
    );
    assert_eq!(exit["timed_out"], true, "{exit}");
    assert!(started.elapsed() < Duration::from_secs(15), "{exit}");
    assert_eq!(server.stop(), 128 + libc::SIGTERM);
}

#[test]
fn tcp_needs_a_token_and_checks_it() {
    let _host = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let no_token = Command::new(tests::mxc_vm_bin())
        .args([
            "serve",
            "--socket",
            "/nonexistent/s.sock",
            "--listen",
            "0.0.0.0:0",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&no_token.stderr);
    assert_eq!(no_token.status.code(), Some(125), "{text}");
    assert!(
        text.contains("--token-file") && text.contains("other machines"),
        "{text}"
    );

    let dir = TempDir::new("serve-token");
    let token = "0123456789abcdef-token";
    std::fs::write(dir.join("token"), format!("{token}\n")).unwrap();
    let server = Server::start(&["--listen", "127.0.0.1:0", "--token-file", &dir.s("token")]);
    let addr = server.tcp.clone().expect("a TCP address");
    let call = |headers: &[(&str, &str)]| {
        exchange(
            std::net::TcpStream::connect(&addr).unwrap(),
            "GET",
            "/v1/health",
            b"",
            headers,
        )
    };
    assert_eq!(call(&[]).error().0, 401);
    assert_eq!(
        call(&[("Authorization", "Bearer wrong")]).error().1,
        "unauthorized"
    );
    let bearer = format!("Bearer {token}");
    assert_eq!(call(&[("Authorization", &bearer)]).status, 200);
    // The Unix socket is its owner's alone and needs no token.
    let meta = std::fs::metadata(&server.socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
    assert_eq!(server.call("GET", "/v1/health", b"").status, 200);
    assert_eq!(server.stop(), 128 + libc::SIGTERM);
}

/// 20 sandboxes at once, 50 execs in each (1,000 in all); deleting them gives back every
/// descriptor the service took for them; then SIGTERM with sandboxes still open: no
/// process, mount, cgroup, socket or temp entry is left.
#[test]
fn a_load_run_then_sigterm_leaves_nothing_behind() {
    let _host = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let before = HostState::now();
    let server = Server::start(&[]);
    assert_eq!(server.call("GET", "/v1/health", b"").status, 200);
    let fds_idle = server.open_fds();
    let dir = TempDir::new("serve-load");
    let rw = path_str(dir.path());
    std::thread::scope(|s| {
        for t in 0..20 {
            let (server, rw) = (&server, &rw);
            s.spawn(move || {
                let backend = if t % 2 == 0 { "process" } else { "bubblewrap" };
                let id = create(
                    server,
                    serde_json::json!({"backend": backend, "policy": {"version": "1",
                        "filesystem": {"readwrite": [rw]}, "limits": {"pids": 64}}}),
                );
                for i in 0..50 {
                    let (out, _, exit) = exec(
                        server,
                        &id,
                        serde_json::json!({"argv": ["sh", "-c", format!("echo {t}-{i} | tee {rw}/{t}")]}),
                    );
                    assert_eq!((out, exit["exit_code"].as_i64()), (format!("{t}-{i}\n"), Some(0)));
                }
            });
        }
    });
    let listed = server.call("GET", "/v1/sandboxes", b"").json();
    assert_eq!(listed["sandboxes"].as_array().unwrap().len(), 20);
    let metrics = String::from_utf8(server.call("GET", "/metrics", b"").body).unwrap();
    assert!(
        metrics.contains("mxc_exec_duration_seconds_count 1000"),
        "{metrics}"
    );
    let fds_loaded = server.open_fds();
    for sandbox in listed["sandboxes"].as_array().unwrap() {
        let id = sandbox["id"].as_str().unwrap();
        let status = server
            .call("DELETE", &format!("/v1/sandboxes/{id}"), b"")
            .status;
        assert!(status == 200 || status == 204, "DELETE {id}: {status}");
    }
    // A few descriptors of the runtime may come and go; one per sandbox or exec would not.
    let fds_after = server.fds_settle_to(fds_idle + 3);
    eprintln!(
        "service descriptors: {fds_idle} idle, {fds_loaded} with 20 sandboxes, {fds_after} \
         after deleting them"
    );
    assert!(
        fds_after <= fds_idle + 3,
        "the service held {fds_idle} descriptors idle and {fds_after} after deleting its sandboxes"
    );
    for backend in ["process", "bubblewrap"] {
        create(&server, serde_json::json!({"backend": backend}));
    }
    assert_eq!(server.stop(), 128 + libc::SIGTERM);
    drop(dir);
    let left = HostState::now().left_since(&before);
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A process sandbox of the service lives across its execs: its own /tmp persists (and
/// is not the host's), a command's leftover children die with it, one that escapes its
/// process group lives until the sandbox is deleted, and then nothing is left.
#[test]
fn a_process_sandbox_lives_across_execs_and_leaves_nothing_when_deleted() {
    let _host = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start(&[]);
    let id = create(&server, serde_json::json!({"backend": "process"}));
    let marker = format!("mxc-serve-marker-{}", std::process::id());
    let (_, _, exit) = exec(
        &server,
        &id,
        serde_json::json!({"argv": ["sh", "-c", format!("echo kept > /tmp/{marker}")]}),
    );
    assert_eq!(exit["exit_code"], 0);
    assert!(
        !Path::new(&format!("/tmp/{marker}")).exists(),
        "the sandbox's /tmp is its own"
    );
    let (out, _, _) = exec(
        &server,
        &id,
        serde_json::json!({"argv": ["cat", format!("/tmp/{marker}")]}),
    );
    assert_eq!(out, "kept\n");

    // A child left behind holding the output pipe dies with its command: the exec ends.
    let started = Instant::now();
    let (out, _, exit) = exec(
        &server,
        &id,
        serde_json::json!({"argv": ["sh", "-c", "sleep 300 & echo started"], "timeout_ms": 60000}),
    );
    assert_eq!(
        (out.as_str(), exit["exit_code"].as_i64()),
        ("started\n", Some(0))
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // One that leaves its process group (and the pipes) lives on in the sandbox...
    let (_, _, exit) = exec(
        &server,
        &id,
        serde_json::json!({"argv": ["sh", "-c", format!(
            "setsid sh -c 'sleep 300; : {marker}' </dev/null >/dev/null 2>&1 & sleep 0.3")]}),
    );
    assert_eq!(exit["exit_code"], 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        tests::pids_with(&marker).len(),
        1,
        "the escaped process runs on"
    );
    let (out, _, _) = exec(
        &server,
        &id,
        serde_json::json!({"argv": ["sh", "-c", "kill -9 1; echo $?"]}),
    );
    assert_ne!(out.trim(), "", "PID 1 cannot be killed from inside");
    let (_, _, exit) = exec(&server, &id, serde_json::json!({"argv": ["true"]}));
    assert_eq!(exit["exit_code"], 0, "the sandbox serves on");
    // ...until the sandbox is deleted.
    assert_eq!(
        server
            .call("DELETE", &format!("/v1/sandboxes/{id}"), b"")
            .status,
        200
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tests::pids_with(&marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the sandbox's processes outlived it"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.stop(), 128 + libc::SIGTERM);
}

/// Deleting a process sandbox while a command runs ends the command at once: its
/// stream ends with an error event, not at the command's own end.
#[test]
fn deleting_a_sandbox_ends_its_running_exec() {
    let _host = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start(&[]);
    let id = create(&server, serde_json::json!({"backend": "process"}));
    let (deleted, last, took) =
        server.delete_during_exec(&id, &["sleep", "120"], Duration::from_millis(500));
    assert_eq!(deleted, 200);
    assert_eq!(last["type"], "error", "{last}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert_eq!(server.stop(), 128 + libc::SIGTERM);
}

/// A client that asks for a command's output and never reads it cannot freeze the
/// sandbox: after a while its output is dropped, the command's timeout fires, and the
/// next exec of the same sandbox runs.
#[test]
fn a_client_that_stops_reading_cannot_freeze_its_sandbox() {
    use std::io::Write;
    let _host = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start(&[]);
    let id = create(&server, serde_json::json!({"backend": "process"}));
    let body = serde_json::json!({"argv": ["yes"], "timeout_ms": 1000}).to_string();
    let mut stalled = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
    write!(
        stalled,
        "POST /v1/sandboxes/{id}/exec HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let (out, _, exit) = exec(&server, &id, serde_json::json!({"argv": ["echo", "next"]}));
    assert_eq!(
        (out.as_str(), exit["exit_code"].as_i64()),
        ("next\n", Some(0))
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    drop(stalled);
    assert_eq!(server.stop(), 128 + libc::SIGTERM);
}

/// The running execs of a sandbox whose argv starts with `first`: their ids.
fn running_ids(server: &Server, id: &str, first: &str) -> Vec<u64> {
    let reply = server.call("GET", &format!("/v1/sandboxes/{id}/execs"), b"");
    assert_eq!(reply.status, 200);
    reply.json()["execs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["argv"][0] == first)
        .map(|e| e["id"].as_u64().unwrap())
        .collect()
}

/// Run `probe` until it exits 0 (at most 20 s).
fn wait_for(server: &Server, id: &str, probe: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, _, exit) = exec(server, id, serde_json::json!({ "argv": probe }));
        if exit["exit_code"] == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{probe:?} never succeeded");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Execs of one persistent process sandbox run side by side (one waits for a file the
/// other makes), a running exec takes a signal by its id (a trapped TERM, a KILL by
/// number), and bad signal requests are refused naming what is wrong. A bubblewrap
/// sandbox, which makes a fresh sandbox per exec, ends an exec on KILL and refuses
/// other signals instead of pretending.
#[test]
fn execs_run_side_by_side_and_take_signals() {
    let _host = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start(&[]);
    let id = create(&server, serde_json::json!({"backend": "process"}));
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            exec(
                &server,
                &id,
                serde_json::json!({"argv": ["sh", "-c",
                    "i=0; while [ ! -e /tmp/go ]; do i=$((i+1)); [ $i -gt 1500 ] && exit 9; \
                     sleep 0.01; done; echo went"],
                    "timeout_ms": 60000}),
            )
        });
        std::thread::sleep(Duration::from_millis(200));
        let (_, _, made) = exec(
            &server,
            &id,
            serde_json::json!({"argv": ["touch", "/tmp/go"]}),
        );
        assert_eq!(made["exit_code"], 0, "{made}");
        let (out, err, exit) = waiter.join().unwrap();
        assert_eq!(
            (out.as_str(), &exit["exit_code"]),
            ("went\n", &serde_json::json!(0)),
            "{err}"
        );

        // A TERM the command traps.
        let trapped = s.spawn(|| {
            exec(
                &server,
                &id,
                serde_json::json!({"argv": ["sh", "-c",
                    "trap 'echo got-term; exit 7' TERM; touch /tmp/trapped; \
                     while :; do sleep 0.05; done"]}),
            )
        });
        wait_for(&server, &id, &["test", "-e", "/tmp/trapped"]);
        let ids = running_ids(&server, &id, "sh");
        assert_eq!(ids.len(), 1, "{ids:?}");
        let term = ids[0];
        let path = format!("/v1/sandboxes/{id}/execs/{term}/signal");
        // Bad requests first: the exec must still be running after them.
        for (body, code) in [
            (serde_json::json!({"signal": "SIGFOO"}), "malformed_request"),
            (serde_json::json!({"signal": 0}), "malformed_request"),
            (serde_json::json!({"signal": 65}), "malformed_request"),
            (serde_json::json!({"signal": [15]}), "malformed_request"),
            (serde_json::json!({"sig": 15}), "malformed_request"),
        ] {
            let reply = server.json("POST", &path, body.clone());
            let (status, got, message) = reply.error();
            assert_eq!((status, got.as_str()), (400, code), "{body}: {message}");
        }
        for other in ["999999", "abc"] {
            let reply = server.json(
                "POST",
                &format!("/v1/sandboxes/{id}/execs/{other}/signal"),
                serde_json::json!({"signal": "TERM"}),
            );
            assert_eq!(reply.error().0, 404, "{other}");
        }
        let reply = server.json("POST", &path, serde_json::json!({"signal": "TERM"}));
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        let (out, _, exit) = trapped.join().unwrap();
        assert_eq!(
            (out.as_str(), &exit["exit_code"]),
            ("got-term\n", &serde_json::json!(7))
        );
        // Ended: its id is no longer running.
        let again = server.json("POST", &path, serde_json::json!({"signal": "TERM"}));
        assert_eq!(again.error().0, 404);

        // KILL by number ends a command that ignores TERM.
        let stubborn = s.spawn(|| {
            exec(
                &server,
                &id,
                serde_json::json!({"argv": ["sh", "-c", "trap '' TERM; touch /tmp/stubborn; sleep 120"]}),
            )
        });
        wait_for(&server, &id, &["test", "-e", "/tmp/stubborn"]);
        let kill = running_ids(&server, &id, "sh")[0];
        let reply = server.json(
            "POST",
            &format!("/v1/sandboxes/{id}/execs/{kill}/signal"),
            serde_json::json!({"signal": 9}),
        );
        assert_eq!(reply.status, 200);
        let started = Instant::now();
        let (_, _, exit) = stubborn.join().unwrap();
        assert_eq!(exit["signal"], libc::SIGKILL, "{exit}");
        assert!(started.elapsed() < Duration::from_secs(30));
    });
    assert!(running_ids(&server, &id, "sh").is_empty());
    let (out, _, _) = exec(&server, &id, serde_json::json!({"argv": ["echo", "still"]}));
    assert_eq!(out, "still\n");

    // bubblewrap: a fresh sandbox per exec; KILL ends it, TERM is refused.
    let bw = create(&server, serde_json::json!({"backend": "bubblewrap"}));
    std::thread::scope(|s| {
        let running = s.spawn(|| exec(&server, &bw, serde_json::json!({"argv": ["sleep", "120"]})));
        let deadline = Instant::now() + Duration::from_secs(20);
        let one = loop {
            if let Some(one) = running_ids(&server, &bw, "sleep").first() {
                break *one;
            }
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(20));
        };
        let path = format!("/v1/sandboxes/{bw}/execs/{one}/signal");
        let refused = server.json("POST", &path, serde_json::json!({"signal": "TERM"}));
        let (status, code, message) = refused.error();
        assert_eq!(
            (status, code.as_str()),
            (409, "signal_refused"),
            "{message}"
        );
        assert!(message.contains("SIGKILL"), "{message}");
        let killed = server.json("POST", &path, serde_json::json!({"signal": "KILL"}));
        assert_eq!(
            killed.status,
            200,
            "{}",
            String::from_utf8_lossy(&killed.body)
        );
        let (_, _, exit) = running.join().unwrap();
        assert!(
            exit["exit_code"] != 0 || !exit["signal"].is_null(),
            "{exit}"
        );
    });
    assert_eq!(server.stop(), 128 + libc::SIGTERM);
}

//! `mxc-vm bench serve`: an exec round trip through `mxc-vm serve`'s API in a live
//! sandbox against `mxc-vm run` of the same command and plain fork+exec, interleaved in
//! one run; then many clients at once (each with its own sandbox): throughput, errors.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::stats::{latency_table, summarize, Summary};
use crate::cli::BenchServeArgs;
use crate::failure::Failure;

/// The service under test, stopped (SIGTERM) when dropped.
struct Server {
    child: Child,
    socket: PathBuf,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill() on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_server(exe: &Path) -> Result<Server, Failure> {
    let dir = std::env::temp_dir().join(format!("mxc-vm-bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Failure::new(format!("cannot create {}: {e}", dir.display())))?;
    let socket = dir.join("api.sock");
    let mut child = Command::new(exe)
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Failure::new(format!("cannot start mxc-vm serve: {e}")))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    let server = Server { child, socket, dir };
    if !line.contains("\"listening\"") {
        return Err(Failure::new(format!(
            "mxc-vm serve did not start: {}",
            line.trim()
        )));
    }
    Ok(server)
}

/// One request on a fresh connection (`Connection: close`); the status and the body,
/// chunked transfer decoded.
fn call(socket: &Path, method: &str, path: &str, body: &str) -> Result<(u16, Vec<u8>), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: mxc\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no reply head")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    let mut rest = &raw[split + 4..];
    if !head.contains("transfer-encoding: chunked") {
        return Ok((status, rest.to_vec()));
    }
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunk")?;
        let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16)
            .map_err(|e| e.to_string())?;
        if size == 0 {
            break;
        }
        let data = rest.get(eol + 2..eol + 2 + size).ok_or("short chunk")?;
        out.extend_from_slice(data);
        rest = rest.get(eol + 4 + size..).ok_or("short chunk")?;
    }
    Ok((status, out))
}

fn create_sandbox(socket: &Path) -> Result<String, Failure> {
    let (status, body) = call(socket, "POST", "/v1/sandboxes", r#"{"backend":"process"}"#)
        .map_err(|e| Failure::new(format!("creating a sandbox: {e}")))?;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    match v["id"].as_str() {
        Some(id) if status == 201 => Ok(id.to_string()),
        _ => Err(Failure::new(format!(
            "creating a sandbox: HTTP {status}: {}",
            String::from_utf8_lossy(&body)
        ))),
    }
}

/// One exec of /bin/true through the API, start to exit event.
fn api_exec(socket: &Path, id: &str) -> Result<Duration, String> {
    let start = Instant::now();
    let (status, body) = call(
        socket,
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        r#"{"argv":["/bin/true"]}"#,
    )?;
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&body);
    if status != 200 || !text.contains("\"exit_code\":0") {
        return Err(format!("HTTP {status}: {}", text.trim()));
    }
    Ok(took)
}

fn spawn_once(argv: &[&str]) -> Result<Duration, Failure> {
    let start = Instant::now();
    let status = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| Failure::new(format!("cannot run {}: {e}", argv[0])))?;
    if !status.success() {
        return Err(Failure::new(format!(
            "`{}` failed ({status})",
            argv.join(" ")
        )));
    }
    Ok(start.elapsed())
}

pub fn run(args: BenchServeArgs) -> Result<i32, Failure> {
    let exe = std::env::current_exe()
        .map_err(|e| Failure::new(format!("cannot find the mxc-vm binary: {e}")))?;
    let exe_s = exe.display().to_string();
    let server = start_server(&exe)?;
    let id = create_sandbox(&server.socket)?;
    let run_argv = [
        exe_s.as_str(),
        "run",
        "--backend",
        "process",
        "--",
        "/bin/true",
    ];
    for _ in 0..args.warmup {
        api_exec(&server.socket, &id).map_err(Failure::new)?;
        spawn_once(&run_argv)?;
    }
    let (mut fork, mut api, mut cli) = (Vec::new(), Vec::new(), Vec::new());
    let mut progress = std::io::stderr().lock();
    for i in 0..args.runs {
        fork.push(spawn_once(&["/bin/true"])?);
        api.push(api_exec(&server.socket, &id).map_err(Failure::new)?);
        cli.push(spawn_once(&run_argv)?);
        if !args.json && (i + 1) % 10 == 0 {
            let _ = write!(progress, "\r{}/{} rounds", i + 1, args.runs);
        }
    }
    if !args.json {
        let _ = writeln!(progress);
    }
    // Many clients at once, each with a sandbox of its own.
    let socket = server.socket.clone();
    let per_client = args.concurrent_execs;
    let started = Instant::now();
    let results: Vec<Result<Vec<Duration>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.clients)
            .map(|_| {
                let socket = &socket;
                s.spawn(move || {
                    let id = create_sandbox(socket).map_err(|e| e.message)?;
                    (0..per_client)
                        .map(|_| api_exec(socket, &id))
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a client panicked".into())))
            .collect()
    });
    let wall = started.elapsed();
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let samples: Vec<Duration> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .flatten()
        .copied()
        .collect();
    let concurrent = summarize(&samples);
    let throughput = samples.len() as f64 / wall.as_secs_f64();
    drop(server);

    let series: Vec<(String, Summary)> = vec![
        ("fork+exec /bin/true (baseline)".into(), summarize(&fork)),
        ("API exec in a live process sandbox".into(), summarize(&api)),
        ("mxc-vm run --backend process".into(), summarize(&cli)),
    ];
    let speedup = series[2].1.p50_ms / series[1].1.p50_ms;
    let mut out = std::io::stdout().lock();
    if args.json {
        let value = serde_json::json!({
            "benchmark": "serve exec round trip (/bin/true)",
            "runs": args.runs,
            "series": series.iter().map(|(n, s)| serde_json::json!({"name": n, "summary": s})).collect::<Vec<_>>(),
            "api_vs_run_p50_speedup": speedup,
            "concurrent": {
                "clients": args.clients,
                "execs_per_client": per_client,
                "summary": concurrent,
                "execs_per_second": throughput,
                "errors": errors,
            },
        });
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    } else {
        let mut all = series.clone();
        all.push((
            format!("  the same, {} clients at once", args.clients),
            concurrent.clone(),
        ));
        let _ = write!(out, "{}", latency_table("exec round trip", &all));
        let _ = writeln!(
            out,
            "the API exec is {speedup:.1}x faster than `mxc-vm run` at p50 (goal: <= 2 ms p50 and faster)\n\
             {} clients x {per_client} execs: {throughput:.0} execs/s, {} errors",
            args.clients,
            errors.len()
        );
        for e in &errors {
            let _ = writeln!(out, "  error: {e}");
        }
    }
    Ok(if errors.is_empty() { 0 } else { 1 })
}

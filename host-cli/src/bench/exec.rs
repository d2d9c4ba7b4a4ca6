//! `mxc-vm bench exec`: `mxc-vm run -- /bin/true` per backend against plain fork+exec,
//! interleaved round-robin in one run so every series sees the same machine state.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::stats::{latency_table, summarize, table, Summary};
use crate::cli::BenchExecArgs;
use crate::failure::Failure;

struct Series {
    name: String,
    argv: Vec<String>,
    samples: Vec<Duration>,
}

fn time_once(argv: &[String]) -> Result<Duration, Failure> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| Failure::new("empty benchmark command"))?;
    let start = Instant::now();
    let status = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| Failure::new(format!("cannot run {prog}: {e}")))?;
    let took = start.elapsed();
    if !status.success() {
        return Err(Failure::new(format!(
            "`{}` failed ({status}); run it by hand to see why",
            argv.join(" ")
        )));
    }
    Ok(took)
}

pub fn run(args: BenchExecArgs) -> Result<i32, Failure> {
    let exe: PathBuf = std::env::current_exe()
        .map_err(|e| Failure::new(format!("cannot find the mxc-vm binary: {e}")))?;
    let exe = exe.display().to_string();
    let mut series = vec![Series {
        name: "fork+exec (baseline)".into(),
        argv: vec!["/bin/true".into()],
        samples: vec![],
    }];
    for backend in &args.backends {
        series.push(Series {
            name: format!("mxc-vm run --backend {backend}"),
            argv: [&exe, "run", "--backend", backend, "--", "/bin/true"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            samples: vec![],
        });
    }
    // Warm-up: page cache, first-run costs; also surfaces a broken backend early.
    for s in &series {
        for _ in 0..args.warmup {
            time_once(&s.argv)?;
        }
    }
    let mut progress = std::io::stderr().lock();
    for i in 0..args.runs {
        for s in &mut series {
            s.samples.push(time_once(&s.argv)?);
        }
        if !args.json && (i + 1) % 10 == 0 {
            let _ = write!(progress, "\r{}/{} rounds", i + 1, args.runs);
        }
    }
    if !args.json {
        let _ = writeln!(progress);
    }
    let summaries: Vec<(String, Summary)> = series
        .iter()
        .map(|s| (s.name.clone(), summarize(&s.samples)))
        .collect();
    let p50 = |prefix: &str| {
        summaries
            .iter()
            .find(|(n, _)| n.ends_with(prefix))
            .map(|(_, s)| s.p50_ms)
    };
    let speedup = match (p50("bubblewrap"), p50("process")) {
        (Some(b), Some(p)) if p > 0.0 => Some(b / p),
        _ => None,
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        let value = serde_json::json!({
            "benchmark": "exec /bin/true",
            "runs": args.runs,
            "series": summaries.iter().map(|(n, s)| serde_json::json!({"name": n, "summary": s})).collect::<Vec<_>>(),
            "process_vs_bubblewrap_p50_speedup": speedup,
        });
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    } else {
        let _ = write!(out, "{}", latency_table("command (/bin/true)", &summaries));
        if let Some(x) = speedup {
            let _ = writeln!(out, "process is {x:.1}x faster than bubblewrap at p50");
        }
    }
    if args.stages {
        let stages = stage_times(&exe, args.runs)?;
        if args.json {
            let value = serde_json::json!({
                "benchmark": "process tier setup stages",
                "runs": args.runs,
                "stages": stages.iter().map(|(n, s)| serde_json::json!({"stage": n, "summary": s})).collect::<Vec<_>>(),
            });
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
        } else {
            let rows: Vec<Vec<String>> = stages
                .iter()
                .map(|(n, s)| {
                    vec![
                        n.clone(),
                        format!("{:.3}", s.p50_ms),
                        format!("{:.3}", s.p90_ms),
                    ]
                })
                .collect();
            let _ = write!(
                out,
                "\n{}",
                table(&["process tier, stage ended", "p50 ms", "p90 ms"], &rows)
            );
        }
    }
    Ok(0)
}

/// Run the process tier `runs` times with stage timing on and summarise how long each
/// stage took after the one before it (the first row: from spawning `mxc-vm` to its
/// `main`; the last: from its last stage until it was reaped).
fn stage_times(exe: &str, runs: usize) -> Result<Vec<(String, Summary)>, Failure> {
    let dir = std::env::temp_dir().join(format!("mxc-vm-stages-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Failure::new(format!("cannot create {}: {e}", dir.display())))?;
    let file = dir.join("stages.jsonl");
    let mut names: Vec<String> = Vec::new();
    let mut samples: Vec<Vec<Duration>> = Vec::new();
    let ns = |n: u64| Duration::from_nanos(n);
    for _ in 0..runs.max(1) {
        let _ = std::fs::remove_file(&file);
        let spawned = sandbox::stages::now_ns();
        let status = Command::new(exe)
            .args(["run", "--backend", "process", "--", "/bin/true"])
            .env(sandbox::stages::ENV, &file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| Failure::new(format!("cannot run {exe}: {e}")))?;
        let reaped = sandbox::stages::now_ns();
        if !status.success() {
            return Err(Failure::new(format!(
                "a timed process-tier run failed ({status})"
            )));
        }
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let run: sandbox::stages::RunStages = serde_json::from_str(text.trim())
            .map_err(|e| Failure::new(format!("cannot read the stage times: {e}")))?;
        let mut row = vec![(
            "mxc-vm started (exec, loader)".to_string(),
            ns(run.origin_ns.saturating_sub(spawned)),
        )];
        let mut before = 0;
        for (name, at) in &run.stages {
            row.push((name.clone(), ns(at.saturating_sub(before))));
            before = *at;
        }
        row.push((
            "mxc-vm exited, reaped".to_string(),
            ns(reaped.saturating_sub(run.origin_ns + before)),
        ));
        if names.is_empty() {
            names = row.iter().map(|(n, _)| n.clone()).collect();
            samples = vec![Vec::new(); names.len()];
        }
        // A run whose stages differ (a failure path) is left out of the table.
        if row.len() == names.len() && row.iter().zip(&names).all(|((n, _), m)| n == m) {
            for (i, (_, d)) in row.into_iter().enumerate() {
                samples[i].push(d);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(names
        .into_iter()
        .zip(samples)
        .map(|(n, s)| (n, summarize(&s)))
        .collect())
}

//! `mxc-vm bench exec`: `mxc-vm run -- /bin/true` per backend against plain fork+exec,
//! interleaved round-robin in one run so every series sees the same machine state.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::stats::{summarize, table, Summary};
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
        let rows: Vec<Vec<String>> = summaries
            .iter()
            .map(|(n, s)| {
                vec![
                    n.clone(),
                    format!("{:.2}", s.p50_ms),
                    format!("{:.2}", s.p90_ms),
                    format!("{:.2}", s.p99_ms),
                    format!("{:.2}", s.mean_ms),
                ]
            })
            .collect();
        let _ = write!(
            out,
            "{}",
            table(
                &[
                    "command (/bin/true)",
                    "p50 ms",
                    "p90 ms",
                    "p99 ms",
                    "mean ms"
                ],
                &rows
            )
        );
        if let Some(x) = speedup {
            let _ = writeln!(out, "process is {x:.1}x faster than bubblewrap at p50");
        }
    }
    Ok(0)
}

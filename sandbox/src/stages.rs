//! Per-stage timing of a process-tier run, for finding where the milliseconds go.
//!
//! Off unless `MXC_VM_STAGES=<file>` is set: then the host marks its own stages, the
//! sandbox's processes report theirs over the status pipe (one `stage` line each, with a
//! `CLOCK_MONOTONIC` time, which every process of the host shares), and the run appends
//! one JSON line to the file: `{"backend": "...", "stages": [["name", ns], ...]}` with
//! times relative to the first mark. `mxc-vm bench exec --stages` reads them back.

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};

/// The variable naming the file runs append their stages to.
pub const ENV: &str = "MXC_VM_STAGES";

/// One run's stages, as appended to the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunStages {
    pub backend: String,
    /// `CLOCK_MONOTONIC` of the first mark.
    pub origin_ns: u64,
    /// (stage, nanoseconds since the first mark), in the order they happened.
    pub stages: Vec<(String, u64)>,
}

fn target() -> Option<&'static std::path::PathBuf> {
    static TARGET: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    TARGET
        .get_or_init(|| std::env::var_os(ENV).map(std::path::PathBuf::from))
        .as_ref()
}

/// Whether stages are being recorded (decided once per process).
pub fn enabled() -> bool {
    target().is_some()
}

/// `CLOCK_MONOTONIC` in nanoseconds (async-signal-safe).
pub fn now_ns() -> u64 {
    vmm::timeline::monotonic_ns()
}

fn marks() -> &'static Mutex<Vec<(String, u64)>> {
    static MARKS: OnceLock<Mutex<Vec<(String, u64)>>> = OnceLock::new();
    MARKS.get_or_init(|| Mutex::new(Vec::new()))
}

/// Record a stage of this process now (no-op unless enabled).
pub fn mark(name: &str) {
    if enabled() {
        record(name, now_ns());
    }
}

/// Record a stage at a given time (a sandbox process's report).
pub(crate) fn record(name: &str, at_ns: u64) {
    if let Ok(mut m) = marks().lock() {
        // A hostile sandbox could report stages forever.
        if m.len() < 256 {
            m.push((name.to_string(), at_ns));
        }
    }
}

/// Append this run's stages to the file and start over (no-op unless enabled).
pub fn flush(backend: &str) {
    let Some(path) = target() else { return };
    let mut taken = match marks().lock() {
        Ok(mut m) => std::mem::take(&mut *m),
        Err(_) => return,
    };
    taken.sort_by_key(|(_, t)| *t);
    let first = taken.first().map_or(0, |(_, t)| *t);
    let run = RunStages {
        backend: backend.to_string(),
        origin_ns: first,
        stages: taken
            .into_iter()
            .map(|(n, t)| (n, t.saturating_sub(first)))
            .collect(),
    };
    let Ok(mut line) = serde_json::to_vec(&run) else {
        return;
    };
    line.push(b'\n');
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(&line);
    }
}

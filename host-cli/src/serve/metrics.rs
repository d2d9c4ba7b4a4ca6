//! `/metrics` in the Prometheus text format: sandboxes by backend, execs and their
//! latency, file requests refused by the policy, responses by status.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use sandbox::ExecOutcome;

/// Upper bounds of the exec latency histogram, seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0, 60.0,
];

#[derive(Debug, Default)]
pub struct Metrics {
    created: Mutex<BTreeMap<String, u64>>,
    deleted: Mutex<BTreeMap<String, u64>>,
    exec_buckets: [AtomicU64; BUCKETS.len()],
    exec_count: AtomicU64,
    exec_sum_us: AtomicU64,
    exec_timeouts: AtomicU64,
    pub denials: AtomicU64,
    responses: Mutex<BTreeMap<u16, u64>>,
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, key: &str) {
    if let Ok(mut m) = map.lock() {
        *m.entry(key.to_string()).or_default() += 1;
    }
}

impl Metrics {
    pub fn created(&self, backend: &str) {
        bump(&self.created, backend);
    }
    pub fn deleted(&self, backend: &str) {
        bump(&self.deleted, backend);
    }
    pub fn exec_done(&self, took: Duration, outcome: &ExecOutcome) {
        let secs = took.as_secs_f64();
        for (bound, count) in BUCKETS.iter().zip(&self.exec_buckets) {
            if secs <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.exec_count.fetch_add(1, Ordering::Relaxed);
        self.exec_sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        if outcome.timed_out {
            self.exec_timeouts.fetch_add(1, Ordering::Relaxed);
        }
    }
    pub fn response(&self, status: u16) {
        if let Ok(mut m) = self.responses.lock() {
            *m.entry(status).or_default() += 1;
        }
    }

    /// The text format; `active` is (backend, live sandboxes).
    pub fn render(&self, active: &BTreeMap<String, u64>) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, kind: &str| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        };
        counter(
            &mut out,
            "mxc_sandboxes",
            "Live sandboxes by backend.",
            "gauge",
        );
        for (b, n) in active {
            out.push_str(&format!("mxc_sandboxes{{backend=\"{b}\"}} {n}\n"));
        }
        for (name, map, help) in [
            (
                "mxc_sandboxes_created_total",
                &self.created,
                "Sandboxes created.",
            ),
            (
                "mxc_sandboxes_deleted_total",
                &self.deleted,
                "Sandboxes deleted or expired.",
            ),
        ] {
            counter(&mut out, name, help, "counter");
            for (b, n) in map.lock().map(|m| m.clone()).unwrap_or_default() {
                out.push_str(&format!("{name}{{backend=\"{b}\"}} {n}\n"));
            }
        }
        counter(
            &mut out,
            "mxc_exec_duration_seconds",
            "Exec latency, request accepted by the sandbox to exit.",
            "histogram",
        );
        for (bound, count) in BUCKETS.iter().zip(&self.exec_buckets) {
            out.push_str(&format!(
                "mxc_exec_duration_seconds_bucket{{le=\"{bound}\"}} {}\n",
                count.load(Ordering::Relaxed)
            ));
        }
        let total = self.exec_count.load(Ordering::Relaxed);
        out.push_str(&format!(
            "mxc_exec_duration_seconds_bucket{{le=\"+Inf\"}} {total}\n\
             mxc_exec_duration_seconds_sum {}\n\
             mxc_exec_duration_seconds_count {total}\n",
            self.exec_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        ));
        counter(
            &mut out,
            "mxc_exec_timeouts_total",
            "Execs killed at their timeout.",
            "counter",
        );
        out.push_str(&format!(
            "mxc_exec_timeouts_total {}\n",
            self.exec_timeouts.load(Ordering::Relaxed)
        ));
        counter(
            &mut out,
            "mxc_file_denials_total",
            "File requests the policy refused.",
            "counter",
        );
        out.push_str(&format!(
            "mxc_file_denials_total {}\n",
            self.denials.load(Ordering::Relaxed)
        ));
        counter(
            &mut out,
            "mxc_http_responses_total",
            "Responses by status.",
            "counter",
        );
        for (status, n) in self.responses.lock().map(|m| m.clone()).unwrap_or_default() {
            out.push_str(&format!(
                "mxc_http_responses_total{{status=\"{status}\"}} {n}\n"
            ));
        }
        // Warm-pool counters appear with the warm pool (issue 10); none exists yet.
        out
    }
}

/// The warm pool's gauges and counter.
pub fn render_pool(status: &sandbox::microvm::PoolStatus) -> String {
    let mut out = String::new();
    for (name, kind, help, value) in [
        (
            "mxc_warm_pool_ready",
            "gauge",
            "Restored microVMs waiting in the warm pool.",
            status.ready as u64,
        ),
        (
            "mxc_warm_pool_starting",
            "gauge",
            "MicroVMs being restored for the warm pool.",
            status.starting as u64,
        ),
        (
            "mxc_warm_pool_capacity",
            "gauge",
            "The most microVMs the warm pool keeps (size within its memory budget).",
            status.capacity as u64,
        ),
        (
            "mxc_warm_pool_taken_total",
            "counter",
            "MicroVM sandboxes that took a VM from the warm pool.",
            status.taken,
        ),
        (
            "mxc_warm_pool_missed_total",
            "counter",
            "MicroVM sandboxes that started a VM of their own (none waiting, or another shape).",
            status.missed,
        ),
        (
            "mxc_warm_pool_stopped",
            "gauge",
            "1 when the warm pool stopped refilling (the service log says why).",
            u64::from(status.stopped.is_some()),
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    out
}

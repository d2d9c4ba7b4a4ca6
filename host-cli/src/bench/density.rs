//! `mxc-vm bench density`: how many idle microVMs restored from the ready snapshot this
//! machine holds, and what each costs in private memory, against one VM booted cold in
//! the same run.
//!
//! The restored VMs come from a warm pool ([`sandbox::microvm::WarmPool`]): restored,
//! agent answering, nothing policy-specific yet. Each VMM's memory is read from
//! `/proc/PID/smaps_rollup`: private (clean + dirty) is what that VM alone costs (its
//! heap and the guest pages it changed since the restore); the snapshot's unchanged
//! pages are shared by all of them through the page cache.

use std::io::Write;
use std::time::{Duration, Instant};

use sandbox::microvm::{MicrovmBackend, MicrovmOptions, PoolOptions, WarmPool};
use sandbox::{Backend, SandboxSpec};

use super::stats::{quantile, table};
use crate::cli::BenchDensityArgs;
use crate::failure::Failure;

/// The goal: every idle restored VM's private memory, MiB.
const GOAL_PRIVATE_MIB: f64 = 20.0;
/// The goal: VMs held at once.
const GOAL_VMS: usize = 50;

/// One VMM's memory, in MiB.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Memory {
    rss: f64,
    pss: f64,
    private: f64,
}

/// The memory of process `pid` from its `smaps_rollup`.
fn memory_of(pid: u32) -> Result<Memory, Failure> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Failure::new(format!("cannot read {path}: {e}")))?;
    let field = |name: &str| kib_field(&text, name) / 1024.0;
    Ok(Memory {
        rss: field("Rss:"),
        pss: field("Pss:"),
        private: field("Private_Clean:") + field("Private_Dirty:"),
    })
}

/// The value of the `name` line (`Name:   123 kB`) of a /proc file, in KiB (0 if absent).
fn kib_field(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(0.0)
}

/// The host's MemAvailable, MiB.
fn mem_available() -> f64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    kib_field(&text, "MemAvailable:") / 1024.0
}

/// One VM booted cold, idle at its agent's Ready: its VMM's memory.
fn cold_baseline(args: &BenchDensityArgs) -> Result<Memory, Failure> {
    let mut policy = policy::Policy::empty(policy::PolicySource::Cli);
    policy.limits.memory_mib = Some(args.mem);
    policy.limits.vcpus = Some(1);
    let spec = SandboxSpec {
        policy,
        view: policy::FsView::default(),
        id: format!("bench-density-{}", std::process::id()),
        net: Default::default(),
    };
    let mut vm = MicrovmBackend::new(MicrovmOptions {
        cold: true,
        ..MicrovmOptions::default()
    });
    vm.provision(&spec)?;
    let measured = vm.start().map_err(Failure::from).and_then(|()| {
        std::thread::sleep(Duration::from_secs(args.settle));
        let pid = vm
            .vmm_pid()
            .ok_or_else(|| Failure::new("the cold VM has no VMM process"))?;
        memory_of(pid)
    });
    let _ = vm.stop();
    let _ = vm.deprovision();
    measured
}

pub fn run(args: BenchDensityArgs) -> Result<i32, Failure> {
    let say = |line: &str| {
        if !args.json {
            let _ = writeln!(std::io::stderr(), "bench density: {line}");
        }
    };
    say("one VM booted cold, for the baseline");
    let cold = cold_baseline(&args)?;

    let before = mem_available();
    say(&format!(
        "restoring {} VMs from the ready snapshot into a warm pool",
        args.vms
    ));
    let started = Instant::now();
    let pool = WarmPool::new(PoolOptions {
        size: args.vms,
        memory_budget_mib: args.mem.saturating_mul(args.vms as u64),
        mem_mib: args.mem,
        ..PoolOptions::default()
    })?;
    let deadline = started + Duration::from_secs(args.timeout);
    let status = loop {
        let status = pool.wait_full(Duration::from_secs(10));
        if !args.json {
            let _ = write!(
                std::io::stderr(),
                "\r{}/{} restored, {:.0} s",
                status.ready,
                status.capacity,
                started.elapsed().as_secs_f64()
            );
        }
        if status.ready >= status.capacity || status.stopped.is_some() || Instant::now() >= deadline
        {
            break status;
        }
    };
    if !args.json {
        let _ = writeln!(std::io::stderr());
    }
    if let Some(why) = &status.stopped {
        return Err(Failure::new(format!("the warm pool stopped: {why}")));
    }
    let filled = started.elapsed();
    std::thread::sleep(Duration::from_secs(args.settle));
    let pids = pool.vmm_pids();
    let vms: Vec<Memory> = pids
        .iter()
        .map(|&pid| memory_of(pid))
        .collect::<Result<_, _>>()?;
    let after = mem_available();
    drop(pool);

    let sorted = |f: fn(&Memory) -> f64| {
        let mut v: Vec<f64> = vms.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let private = sorted(|m| m.private);
    let pss = sorted(|m| m.pss);
    let rss = sorted(|m| m.rss);
    let max_private = private.last().copied().unwrap_or(0.0);
    let per_vm_host = if vms.is_empty() {
        0.0
    } else {
        (before - after) / vms.len() as f64
    };
    let met = vms.len() >= GOAL_VMS.min(args.vms) && max_private <= GOAL_PRIVATE_MIB;
    let mut out = std::io::stdout().lock();
    if args.json {
        let value = serde_json::json!({
            "benchmark": "density of idle restored microVMs",
            "vms_asked": args.vms,
            "vms": vms.len(),
            "mem_mib": args.mem,
            "fill_seconds": filled.as_secs_f64(),
            "cold_baseline_mib": cold,
            "private_mib": {"p50": quantile(&private, 0.5), "p90": quantile(&private, 0.9), "max": max_private},
            "pss_mib_p50": quantile(&pss, 0.5),
            "rss_mib_p50": quantile(&rss, 0.5),
            "host_available_drop_per_vm_mib": per_vm_host,
            "goal": {"vms": GOAL_VMS, "private_mib_max": GOAL_PRIVATE_MIB, "met": met},
        });
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    } else {
        let row = |name: &str, v: &[f64]| {
            vec![
                name.to_string(),
                format!("{:.1}", quantile(v, 0.5)),
                format!("{:.1}", quantile(v, 0.9)),
                format!("{:.1}", v.last().copied().unwrap_or(0.0)),
            ]
        };
        let _ = writeln!(
            out,
            "{} idle VMs restored from the ready snapshot ({} MiB guests) in {:.1} s",
            vms.len(),
            args.mem,
            filled.as_secs_f64()
        );
        let _ = write!(
            out,
            "{}",
            table(
                &["per VMM process, MiB", "p50", "p90", "max"],
                &[
                    row("private (restored)", &private),
                    row("PSS (restored)", &pss),
                    row("RSS (restored)", &rss),
                    vec![
                        "private (cold boot, baseline)".into(),
                        format!("{:.1}", cold.private),
                        "".into(),
                        "".into()
                    ],
                ],
            )
        );
        let _ = writeln!(
            out,
            "host MemAvailable fell by {:.1} MiB per VM (all {} together: {:.0} MiB)",
            per_vm_host,
            vms.len(),
            before - after
        );
        let _ = writeln!(
            out,
            "goal: {GOAL_VMS} VMs, each <= {GOAL_PRIVATE_MIB} MiB private: {}",
            if met { "met" } else { "MISSED" }
        );
    }
    Ok(0)
}

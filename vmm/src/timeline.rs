//! Boot-stage timestamps: when the VMM process started, the VM was created, the kernel
//! loaded, the first vCPU entered the guest, the guest first exited, the guest agent
//! reported each stage through the boot-timer device, and the VM went away.
//!
//! Times are CLOCK_MONOTONIC nanoseconds; the report gives them relative to the VMM
//! process start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::layout::{BOOT_STAGE_AGENT_READY, BOOT_STAGE_AGENT_STARTED};

/// Most entries kept; boot-timer writes beyond this are counted, not stored.
pub const MAX_ENTRIES: usize = 256;

/// A boot stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The VMM process started (exec).
    ProcessStart,
    /// The VMM's code began building the VM (the process is running; the time since
    /// `ProcessStart` is the spawn, exec and program start-up).
    SetupStart,
    /// The hypervisor VM exists (with its interrupt controller).
    VmCreated,
    /// Guest memory is allocated and the kernel (and initrd) are loaded into it.
    KernelLoaded,
    /// The boot vCPU's first `KVM_RUN`.
    FirstVcpuEntry,
    /// The boot vCPU's first exit: the kernel is running.
    FirstGuestExit,
    /// Boot-timer code 1: the guest agent started.
    AgentStarted,
    /// Boot-timer code 2: the guest agent is ready.
    AgentReady,
    /// Any other boot-timer code.
    Other(u8),
    /// A restored VM's memory is mapped and its vCPUs have their saved state (instead
    /// of `KernelLoaded`).
    SnapshotLoaded,
    /// The VM was saved into a snapshot.
    SnapshotSaved,
    /// The VM is torn down (all vCPU and device threads joined).
    VmGone,
}

impl Stage {
    /// The stage's name (as serialised; `other` for unnamed boot-timer codes).
    pub fn name(self) -> &'static str {
        match self {
            Stage::ProcessStart => "process_start",
            Stage::SetupStart => "setup_start",
            Stage::VmCreated => "vm_created",
            Stage::KernelLoaded => "kernel_loaded",
            Stage::FirstVcpuEntry => "first_vcpu_entry",
            Stage::FirstGuestExit => "first_guest_exit",
            Stage::AgentStarted => "agent_started",
            Stage::AgentReady => "agent_ready",
            Stage::Other(_) => "other",
            Stage::SnapshotLoaded => "snapshot_loaded",
            Stage::SnapshotSaved => "snapshot_saved",
            Stage::VmGone => "vm_gone",
        }
    }

    /// The stage a boot-timer write of `code` marks.
    pub fn from_boot_timer(code: u8) -> Self {
        match code {
            BOOT_STAGE_AGENT_STARTED => Stage::AgentStarted,
            BOOT_STAGE_AGENT_READY => Stage::AgentReady,
            other => Stage::Other(other),
        }
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// This process's start time as CLOCK_MONOTONIC nanoseconds, from `/proc/self/stat`
/// (resolution: one clock tick, usually 10 ms). `None` if it cannot be read.
pub fn process_start_monotonic_ns() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the
    // last ')'. Field 22 (starttime) is then the 20th field.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0)?;
    let start_since_boot = ticks.checked_mul(1_000_000_000)? / hz;
    // starttime counts from boot (CLOCK_BOOTTIME); shift it onto CLOCK_MONOTONIC.
    let boot_now = clock_ns(libc::CLOCK_BOOTTIME);
    let mono_now = monotonic_ns();
    let age = boot_now.checked_sub(start_since_boot)?;
    mono_now.checked_sub(age)
}

/// Stage timestamps of one VM.
#[derive(Debug)]
pub struct Timeline {
    start_ns: u64,
    entries: Mutex<Vec<(Stage, u64)>>,
    dropped: AtomicU64,
}

impl Timeline {
    /// A timeline whose process start is `start_ns` (CLOCK_MONOTONIC).
    pub fn new(start_ns: u64) -> Self {
        let timeline = Self {
            start_ns,
            entries: Mutex::new(Vec::with_capacity(16)),
            dropped: AtomicU64::new(0),
        };
        timeline.record_at(Stage::ProcessStart, start_ns);
        timeline
    }

    /// Process start as CLOCK_MONOTONIC nanoseconds.
    pub fn start_ns(&self) -> u64 {
        self.start_ns
    }

    /// Record `stage` now.
    pub fn record(&self, stage: Stage) {
        self.record_at(stage, monotonic_ns());
    }

    /// Record `stage` at `mono_ns` (CLOCK_MONOTONIC).
    pub fn record_at(&self, stage: Stage, mono_ns: u64) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= MAX_ENTRIES {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        entries.push((stage, mono_ns));
    }

    /// Entries so far as (stage, nanoseconds since process start), in time order.
    pub fn relative(&self) -> Vec<(Stage, u64)> {
        let Ok(entries) = self.entries.lock() else {
            return Vec::new();
        };
        let mut relative: Vec<(Stage, u64)> = entries
            .iter()
            .map(|&(stage, t)| (stage, t.saturating_sub(self.start_ns)))
            .collect();
        relative.sort_by_key(|&(_, t)| t);
        relative
    }

    /// Boot-timer writes not stored because the timeline was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_names_are_their_serialised_names() {
        for stage in [
            Stage::ProcessStart,
            Stage::SetupStart,
            Stage::VmCreated,
            Stage::KernelLoaded,
            Stage::FirstVcpuEntry,
            Stage::FirstGuestExit,
            Stage::AgentStarted,
            Stage::AgentReady,
            Stage::VmGone,
        ] {
            let json = serde_json::to_string(&stage).unwrap();
            assert_eq!(json, format!("\"{}\"", stage.name()));
        }
    }

    #[test]
    fn stages_are_relative_to_process_start() {
        let timeline = Timeline::new(1_000);

        timeline.record_at(Stage::VmCreated, 3_500);
        timeline.record_at(Stage::Other(9), 500);

        assert_eq!(
            timeline.relative(),
            vec![
                (Stage::ProcessStart, 0),
                (Stage::Other(9), 0),
                (Stage::VmCreated, 2_500),
            ]
        );
    }

    #[test]
    fn the_timeline_is_bounded() {
        let timeline = Timeline::new(0);

        for _ in 0..MAX_ENTRIES + 10 {
            timeline.record(Stage::Other(7));
        }

        assert_eq!(timeline.relative().len(), MAX_ENTRIES);
        assert_eq!(timeline.dropped(), 11);
    }

    #[test]
    fn boot_timer_codes_map_to_stages() {
        let stages: Vec<Stage> = [1, 2, 0, 200]
            .into_iter()
            .map(Stage::from_boot_timer)
            .collect();

        assert_eq!(
            stages,
            vec![
                Stage::AgentStarted,
                Stage::AgentReady,
                Stage::Other(0),
                Stage::Other(200)
            ]
        );
    }

    #[test]
    fn process_start_is_in_the_past() {
        let start = process_start_monotonic_ns().unwrap();

        assert!(start <= monotonic_ns());
    }
}

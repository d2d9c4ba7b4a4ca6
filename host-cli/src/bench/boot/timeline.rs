//! One boot's stages on one clock: the VMM's report (nanoseconds since the VMM process
//! start, itself a CLOCK_MONOTONIC instant) merged with what the host saw (std's
//! `Instant`, also CLOCK_MONOTONIC on Linux, converted through one shared anchor).

use std::time::{Duration, Instant};

use serde::Serialize;

use super::super::stats::{summarize, Summary};

/// A boot stage: one the VMM reports ([`vmm::Stage`]) or one only the host sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootStage {
    /// A stage from the VMM's report (its process start is the origin of every time).
    Vmm(vmm::Stage),
    /// The host finished the agent handshake over vsock.
    Handshake,
    /// The first output chunk of the first exec reached the host.
    FirstOutput,
    /// The host reaped the VMM process.
    ProcessExit,
}

impl BootStage {
    /// Every stage, in boot order.
    pub const ALL: [BootStage; 12] = [
        BootStage::Vmm(vmm::Stage::ProcessStart),
        BootStage::Vmm(vmm::Stage::SetupStart),
        BootStage::Vmm(vmm::Stage::VmCreated),
        BootStage::Vmm(vmm::Stage::KernelLoaded),
        BootStage::Vmm(vmm::Stage::FirstVcpuEntry),
        BootStage::Vmm(vmm::Stage::FirstGuestExit),
        BootStage::Vmm(vmm::Stage::AgentStarted),
        BootStage::Vmm(vmm::Stage::AgentReady),
        BootStage::Handshake,
        BootStage::FirstOutput,
        BootStage::Vmm(vmm::Stage::VmGone),
        BootStage::ProcessExit,
    ];

    /// The stage's name in tables, JSON and the SVG.
    pub fn name(self) -> &'static str {
        match self {
            BootStage::Vmm(stage) => stage.name(),
            BootStage::Handshake => "handshake",
            BootStage::FirstOutput => "first_output",
            BootStage::ProcessExit => "process_exit",
        }
    }

    /// The stage a VMM timeline entry marks (`None` for boot-timer codes we do not name).
    pub fn from_vmm(stage: vmm::Stage) -> Option<Self> {
        let stage = BootStage::Vmm(stage);
        BootStage::ALL.contains(&stage).then_some(stage)
    }

    fn index(self) -> usize {
        BootStage::ALL
            .iter()
            .position(|&s| s == self)
            .unwrap_or(usize::MAX)
    }
}

impl Serialize for BootStage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Converts `Instant`s to CLOCK_MONOTONIC nanoseconds: both clocks are read once, side
/// by side, and every later `Instant` is placed relative to that pair.
#[derive(Clone, Copy, Debug)]
pub struct MonoAnchor {
    instant: Instant,
    mono_ns: u64,
}

impl MonoAnchor {
    /// Read both clocks now.
    pub fn now() -> Self {
        Self::at(Instant::now(), vmm::timeline::monotonic_ns())
    }

    /// An anchor from a pair read together.
    pub fn at(instant: Instant, mono_ns: u64) -> Self {
        Self { instant, mono_ns }
    }

    /// `t` as CLOCK_MONOTONIC nanoseconds.
    pub fn mono_ns(&self, t: Instant) -> u64 {
        match t.checked_duration_since(self.instant) {
            Some(after) => self.mono_ns.saturating_add(after.as_nanos() as u64),
            None => self
                .mono_ns
                .saturating_sub((self.instant - t).as_nanos() as u64),
        }
    }
}

/// One boot: nanoseconds since the VMM process start, per stage (absent: not reached
/// or not measured in this mode).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunTimeline {
    at: [Option<u64>; BootStage::ALL.len()],
}

impl RunTimeline {
    /// Merge the VMM's report with host events given as CLOCK_MONOTONIC nanoseconds.
    /// The first entry of a stage wins; host events before the process start count as 0.
    pub fn merge(report: &vmm::VmExitReport, host: &[(BootStage, u64)]) -> Self {
        let mut timeline = Self::default();
        for &(stage, ns) in &report.boot_timeline {
            if let Some(stage) = BootStage::from_vmm(stage) {
                timeline.set_once(stage, ns);
            }
        }
        for &(stage, mono) in host {
            timeline.set_once(
                stage,
                mono.saturating_sub(report.process_start_monotonic_ns),
            );
        }
        timeline
    }

    /// A timeline of host events only (a VMM that reports nothing, such as QEMU), with
    /// `start` as the process start; all in CLOCK_MONOTONIC nanoseconds.
    pub fn host_only(start: u64, host: &[(BootStage, u64)]) -> Self {
        let mut timeline = Self::default();
        timeline.set_once(BootStage::Vmm(vmm::Stage::ProcessStart), 0);
        for &(stage, mono) in host {
            timeline.set_once(stage, mono.saturating_sub(start));
        }
        timeline
    }

    fn set_once(&mut self, stage: BootStage, ns: u64) {
        if let Some(slot) = self.at.get_mut(stage.index()) {
            slot.get_or_insert(ns);
        }
    }

    /// Time of `stage` since the process start.
    pub fn get(&self, stage: BootStage) -> Option<u64> {
        self.at.get(stage.index()).copied().flatten()
    }

    /// Time from the latest earlier stage (in boot order) to `stage`; zero when `stage`
    /// finished while an earlier one was still running (they overlapped).
    pub fn delta(&self, stage: BootStage) -> Option<u64> {
        let t = self.get(stage)?;
        let before = BootStage::ALL
            .iter()
            .take_while(|&&s| s != stage)
            .filter_map(|&s| self.get(s))
            .max()
            .unwrap_or(0);
        Some(t.saturating_sub(before))
    }

    /// (stage, ns since process start) for the stages present, in boot order.
    pub fn stages(&self) -> Vec<(BootStage, u64)> {
        BootStage::ALL
            .iter()
            .filter_map(|&s| self.get(s).map(|t| (s, t)))
            .collect()
    }
}

/// Percentiles of one stage over many boots.
#[derive(Clone, Debug, Serialize)]
pub struct StageSummary {
    pub stage: BootStage,
    /// Since the process start.
    pub cumulative: Summary,
    /// Since the latest earlier stage.
    pub delta: Summary,
}

/// Per-stage summaries of the stages that any run reached.
pub fn summarize_stages(runs: &[RunTimeline]) -> Vec<StageSummary> {
    BootStage::ALL
        .iter()
        .filter(|&&stage| stage != BootStage::Vmm(vmm::Stage::ProcessStart))
        .filter_map(|&stage| {
            let cumulative: Vec<Duration> = runs
                .iter()
                .filter_map(|r| r.get(stage))
                .map(Duration::from_nanos)
                .collect();
            if cumulative.is_empty() {
                return None;
            }
            let delta: Vec<Duration> = runs
                .iter()
                .filter_map(|r| r.delta(stage))
                .map(Duration::from_nanos)
                .collect();
            Some(StageSummary {
                stage,
                cumulative: summarize(&cumulative),
                delta: summarize(&delta),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(start: u64, timeline: Vec<(vmm::Stage, u64)>) -> vmm::VmExitReport {
        vmm::VmExitReport {
            reason: vmm::ExitReason::GuestReset,
            boot_timeline: timeline,
            process_start_monotonic_ns: start,
            vcpu_exits: 0,
            boot_timer_dropped: 0,
            cmdline: String::new(),
        }
    }

    #[test]
    fn vmm_and_host_events_share_the_process_start_origin() {
        let report = report(
            1_000_000,
            vec![
                (vmm::Stage::ProcessStart, 0),
                (vmm::Stage::FirstVcpuEntry, 4_000),
                (vmm::Stage::AgentReady, 9_000),
                (vmm::Stage::Other(7), 9_500),
                (vmm::Stage::VmGone, 20_000),
            ],
        );

        let merged = RunTimeline::merge(
            &report,
            &[
                (BootStage::Handshake, 1_010_000),
                (BootStage::FirstOutput, 1_015_000),
            ],
        );

        assert_eq!(
            merged.stages(),
            vec![
                (BootStage::Vmm(vmm::Stage::ProcessStart), 0),
                (BootStage::Vmm(vmm::Stage::FirstVcpuEntry), 4_000),
                (BootStage::Vmm(vmm::Stage::AgentReady), 9_000),
                (BootStage::Handshake, 10_000),
                (BootStage::FirstOutput, 15_000),
                (BootStage::Vmm(vmm::Stage::VmGone), 20_000),
            ]
        );
    }

    #[test]
    fn the_first_entry_of_a_stage_wins_and_early_host_events_clamp_to_zero() {
        let report = report(
            500,
            vec![
                (vmm::Stage::AgentStarted, 30),
                (vmm::Stage::AgentStarted, 40),
            ],
        );

        let merged = RunTimeline::merge(&report, &[(BootStage::Handshake, 100)]);

        assert_eq!(
            merged.get(BootStage::Vmm(vmm::Stage::AgentStarted)),
            Some(30)
        );
        assert_eq!(merged.get(BootStage::Handshake), Some(0));
    }

    #[test]
    fn a_delta_counts_from_the_latest_earlier_stage() {
        let report = report(
            0,
            vec![
                (vmm::Stage::ProcessStart, 0),
                (vmm::Stage::KernelLoaded, 3_000),
                (vmm::Stage::VmCreated, 5_000),
                (vmm::Stage::FirstVcpuEntry, 6_000),
            ],
        );

        let merged = RunTimeline::merge(&report, &[]);

        assert_eq!(
            merged.delta(BootStage::Vmm(vmm::Stage::VmCreated)),
            Some(5_000)
        );
        assert_eq!(
            merged.delta(BootStage::Vmm(vmm::Stage::KernelLoaded)),
            Some(0)
        );
        assert_eq!(
            merged.delta(BootStage::Vmm(vmm::Stage::FirstVcpuEntry)),
            Some(1_000)
        );
        assert_eq!(merged.delta(BootStage::Vmm(vmm::Stage::AgentReady)), None);
    }

    #[test]
    fn the_anchor_places_instants_before_and_after_it() {
        let base = Instant::now();
        let anchor = MonoAnchor::at(base + Duration::from_micros(10), 1_000_000);

        let before = anchor.mono_ns(base);
        let after = anchor.mono_ns(base + Duration::from_micros(25));

        assert_eq!((before, after), (990_000, 1_015_000));
    }

    #[test]
    fn host_only_timelines_start_at_zero() {
        let timeline = RunTimeline::host_only(2_000, &[(BootStage::ProcessExit, 9_000)]);

        assert_eq!(
            timeline.stages(),
            vec![
                (BootStage::Vmm(vmm::Stage::ProcessStart), 0),
                (BootStage::ProcessExit, 7_000)
            ]
        );
    }

    #[test]
    fn stage_summaries_skip_unreached_stages() {
        let runs: Vec<RunTimeline> = [1_000_000u64, 2_000_000, 3_000_000]
            .iter()
            .map(|&t| {
                RunTimeline::merge(
                    &report(0, vec![(vmm::Stage::FirstVcpuEntry, t)]),
                    &[(BootStage::ProcessExit, 2 * t)],
                )
            })
            .collect();

        let summaries = summarize_stages(&runs);

        let names: Vec<&str> = summaries.iter().map(|s| s.stage.name()).collect();
        assert_eq!(names, ["first_vcpu_entry", "process_exit"]);
        assert_eq!(summaries[0].cumulative.p50_ms, 2.0);
        assert_eq!(summaries[1].delta.p50_ms, 2.0);
    }
}

//! The goals of `--vs-qemu`, as ratios of QEMU's p50 to ours measured in the same run:
//! the VMM's own setup (spawn → the one-instruction guest resets → reaped), a boot to
//! the agent's ready, and the VMM's peak RSS in the ready boots.

use serde::Serialize;

use super::{rss_summary, Series, Vmm};
use crate::cli::BootUntil;

/// How the setup series are compared.
pub const ONE_INSTRUCTION: &str = "one-instruction guest: spawn of the VMM -> the guest's \
    first instruction resets the machine through the i8042 -> the host reaps the VMM; the \
    same PVH ELF, RAM and 1 vCPU in both, no initramfs: the VMM's own setup and teardown \
    (QEMU's includes its firmware)";

/// Setup: QEMU's p50 at least this many times ours.
const SETUP_FACTOR: f64 = 5.0;
/// Boot to the agent's ready: QEMU's p50 at least this many times ours.
const READY_FACTOR: f64 = 1.5;
/// Peak RSS in the ready boots: ours at most this fraction of QEMU's.
const RSS_FRACTION: f64 = 0.5;

/// One comparison with QEMU.
#[derive(Debug, Serialize)]
pub struct RatioGoal {
    pub goal: &'static str,
    /// Our p50 (ms, or MiB for memory).
    pub mxc_vm: Option<f64>,
    /// QEMU's p50 (same unit).
    pub qemu: Option<f64>,
    /// QEMU / ours.
    pub qemu_over_mxc_vm: Option<f64>,
    /// `None` when a side has no figures.
    pub met: Option<bool>,
}

impl std::fmt::Display for RatioGoal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        let verdict = match self.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "n/a",
        };
        write!(
            f,
            "{}: mxc-vm {} / qemu {} -> QEMU/mxc-vm {}: {verdict}",
            self.goal,
            num(self.mxc_vm),
            num(self.qemu),
            num(self.qemu_over_mxc_vm)
        )
    }
}

fn ratio(goal: &'static str, ours: Option<f64>, qemu: Option<f64>, want: f64) -> RatioGoal {
    let r = match (ours, qemu) {
        (Some(o), Some(q)) if o > 0.0 => Some(q / o),
        _ => None,
    };
    RatioGoal {
        goal,
        mxc_vm: ours,
        qemu,
        qemu_over_mxc_vm: r,
        met: r.map(|r| r >= want),
    }
}

fn series(all: &[Series], vmm: Vmm) -> Option<&Series> {
    all.iter().find(|s| s.vmm == vmm)
}

fn rss_mib(s: Option<&Series>) -> Option<f64> {
    s.and_then(|s| rss_summary(&s.boots))
        .map(|r| r.p50_kib / 1024.0)
}

/// The three comparisons, from whatever series ran.
pub fn goals(all: &[Series]) -> Vec<RatioGoal> {
    let exit = |vmm| series(all, vmm).and_then(Series::exit_p50);
    let ready = Vmm::Ours(BootUntil::Ready);
    vec![
        ratio(
            "VMM setup, one-instruction guest, p50 ms (QEMU >= 5x ours)",
            exit(Vmm::OursReset),
            exit(Vmm::QemuReset),
            SETUP_FACTOR,
        ),
        ratio(
            "boot to agent ready, p50 ms (QEMU >= 1.5x ours)",
            exit(ready),
            exit(Vmm::Qemu),
            READY_FACTOR,
        ),
        ratio(
            "VMM peak RSS in the ready boots, p50 MiB (ours <= half of QEMU's)",
            rss_mib(series(all, ready)),
            rss_mib(series(all, Vmm::Qemu)),
            1.0 / RSS_FRACTION,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ratio_goal_is_met_at_the_factor() {
        let g = ratio("x", Some(2.0), Some(10.0), 5.0);
        assert_eq!((g.qemu_over_mxc_vm, g.met), (Some(5.0), Some(true)));
        let g = ratio("x", Some(2.0), Some(9.0), 5.0);
        assert_eq!(g.met, Some(false));
        let g = ratio("x", None, Some(9.0), 5.0);
        assert_eq!(g.met, None);
        assert!(g.to_string().ends_with("n/a"), "{g}");
    }
}

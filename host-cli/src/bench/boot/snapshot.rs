//! `bench boot --snapshot`: VMs started from the ready snapshot, interleaved with cold
//! boots of the same guest through the same backend (restore -> first output of `echo`
//! against boot -> first output, in one run).

use sandbox::microvm::{MicrovmBackend, MicrovmOptions};
use sandbox::{Backend, SandboxSpec};
use vmm::HostKind;

use super::timeline::{summarize_stages, BootStage};
use super::{Goal, Series, Setup, Vmm};
use crate::failure::Failure;

/// VMM-side restore goal: process start -> first vCPU entry with the restored state.
const GOAL_RESTORE_SETUP_MS: f64 = 5.0;
/// Under kvm_pvm: restore -> first output, p50.
const GOAL_PVM_FIRST_OUTPUT_MS: f64 = 2000.0;
/// On hardware KVM: restored first output as a share of the cold boot's.
const GOAL_HARDWARE_SHARE: f64 = 0.10;

/// How a lifecycle VM of the benchmark starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Start {
    /// Boot the kernel (never the snapshot).
    Cold,
    /// From the ready snapshot.
    Restore,
    /// Make the ready snapshot (if missing or stale) and stop.
    Save,
}

/// The spec and backend of lifecycle boot `n`: the same guest whichever way it starts.
pub(super) fn backend(setup: &Setup, n: usize, start: Start) -> (SandboxSpec, MicrovmBackend) {
    let mut policy = policy::Policy::empty(policy::PolicySource::Cli);
    policy.limits.memory_mib = Some(u64::from(setup.mem_mib));
    policy.limits.vcpus = Some(1);
    let spec = SandboxSpec {
        policy,
        view: policy::FsView::default(),
        id: format!("bench-{}-{n}", std::process::id()),
        net: Default::default(),
    };
    let vm = MicrovmBackend::new(MicrovmOptions {
        kernel: Some(setup.kernel.clone()),
        initrd: Some(setup.initrd.clone()),
        boot_timeout: Some(setup.boot_timeout),
        vmm_binary: Some(setup.exe.clone()),
        cold: start == Start::Cold,
        save_ready_snapshot: start == Start::Save,
        ..MicrovmOptions::default()
    });
    (spec, vm)
}

/// Restore our VMM from the ready snapshot, as `run` would for this VM, and end it at
/// `until` (its first vCPU entry or exit): the VMM's own restore, without the agent's
/// setup, fast enough for hundreds of runs.
pub(super) fn restore_direct(
    setup: &Setup,
    until: crate::cli::BootUntil,
    n: usize,
) -> Result<super::Boot, Failure> {
    let stop_at = match until {
        crate::cli::BootUntil::FirstExit => vmm::Stage::FirstGuestExit,
        _ => vmm::Stage::FirstVcpuEntry,
    };
    let (spec, mut vm) = backend(setup, n, Start::Restore);
    vm.provision(&spec)?;
    let boot = vm
        .restore_config()
        .map_err(Failure::from)
        .and_then(|planned| {
            let (mut config, dir) = planned.ok_or_else(|| {
                Failure::new(
                    "the VM would boot (see the line above: the ready snapshot cannot be used)",
                )
            })?;
            config.stop_at = Some(stop_at);
            super::run_vmm(setup, &config, &dir, vmm::ExitReason::Killed, None)
        });
    vm.deprovision()?;
    boot
}

/// Make the ready snapshot of the benchmark's VM if it is missing or stale (not
/// measured).
pub(super) fn prepare(setup: &Setup) -> Result<(), Failure> {
    let (spec, mut vm) = backend(setup, 0, Start::Save);
    eprintln!("bench boot: the ready snapshot (a missing or stale one is made first)");
    vm.provision(&spec)?;
    vm.start()?;
    vm.deprovision()?;
    Ok(())
}

/// The warm-start goals, where a restored series ran.
pub(super) fn goals(series: &[Series], host: &HostKind) -> Vec<Goal> {
    let p50 = |vmm: Vmm, stage: BootStage| -> Option<f64> {
        let s = series.iter().find(|s| s.vmm == vmm)?;
        summarize_stages(&s.timelines())
            .into_iter()
            .find(|x| x.stage == stage)
            .map(|x| x.cumulative.p50_ms)
    };
    let Some(restored) = series
        .iter()
        .map(|s| s.vmm)
        .find(|v| matches!(v, Vmm::Restored(_)))
    else {
        return Vec::new();
    };
    let setup = p50(restored, BootStage::Vmm(vmm::Stage::FirstVcpuEntry));
    let warm = p50(restored, BootStage::FirstOutput);
    let cold = p50(
        Vmm::Ours(crate::cli::BootUntil::Output),
        BootStage::FirstOutput,
    );
    let mut goals = vec![Goal {
        goal: "restore_setup (process start -> first vCPU entry, restored)",
        limit_ms: GOAL_RESTORE_SETUP_MS,
        p50_ms: setup,
        met: setup.map(|v| v <= GOAL_RESTORE_SETUP_MS),
        note: "memory mapped (its checksum is read once per version of the file), devices and vCPUs restored".into(),
    }];
    if restored != Vmm::Restored(crate::cli::BootUntil::Output) {
        // The restores stopped before the guest ran: no first output to compare.
        return goals;
    }
    if host.is_hardware() {
        let limit = cold.map_or(f64::NAN, |c| c * GOAL_HARDWARE_SHARE);
        goals.push(Goal {
            goal: "restored first output <= 10 % of the cold boot's",
            limit_ms: limit,
            p50_ms: warm,
            met: warm.zip(cold).map(|(w, c)| w <= c * GOAL_HARDWARE_SHARE),
            note: format!(
                "cold first output p50 {} ms, measured on {host}",
                cold.map_or("-".into(), |c| format!("{c:.1}"))
            ),
        });
    } else {
        goals.push(Goal {
            goal: "restored first output, kvm_pvm",
            limit_ms: GOAL_PVM_FIRST_OUTPUT_MS,
            p50_ms: warm,
            met: warm.map(|w| w <= GOAL_PVM_FIRST_OUTPUT_MS),
            note: format!(
                "cold first output p50 {} ms in the same run",
                cold.map_or("-".into(), |c| format!("{c:.1}"))
            ),
        });
    }
    goals
}

//! `mxc-vm bench boot`: cold microVM boots, timed stage by stage on one clock.
//!
//! Each boot spawns a fresh VMM process (`mxc-vmm`). Its report gives the VMM's own
//! stages (VM created, kernel loaded, first vCPU entry and exit, the guest agent's
//! boot-timer marks, VM gone) in nanoseconds since the spawn; the host adds what only it
//! sees (agent handshake over vsock, first output of an exec, process reaped). `--until`
//! picks how far a boot goes; `--vs-qemu` interleaves boots of the same kernel,
//! initramfs and command line in QEMU's microvm machine and compares spawn-to-exit with
//! the agent powering the VM off as soon as it is ready, in both VMMs.

mod child;
mod profile;
mod qemu;
mod snapshot;
mod svg;
mod timeline;
mod vs_qemu;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sandbox::output::{Collect, StdinMode};
use sandbox::{Backend, ExecIo, ExecRequest};
use serde::Serialize;
use vmm::HostKind;

use super::stats::{quantile, table};
use crate::cli::{BenchBootArgs, BootUntil};
use crate::failure::{chain, Failure};
use child::{log_tail, vm_hwm_kib, wait_with_deadline};
use timeline::{summarize_stages, BootStage, MonoAnchor, RunTimeline, StageSummary};

/// What `/bin/echo` prints in the `output` mode.
const ECHO_WORD: &str = "mxc-vm-bench";
/// The kernel command-line key that makes the agent power off once it is ready.
const BENCH_POWEROFF: &str = "mxc.bench_poweroff=1";
/// Goal: VMM setup (process start to first vCPU entry), p50.
const GOAL_SETUP_MS: f64 = 5.0;
/// Goal on hardware KVM: agent ready, p50.
const GOAL_READY_MS: f64 = 20.0;

/// What is the same for every boot.
struct Setup {
    exe: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    mem_mib: u32,
    pvm: bool,
    boot_timeout: Duration,
    qemu: PathBuf,
    /// A one-instruction PVH guest that resets the machine through the i8042: booted by
    /// both VMMs, spawn to reaped is the VMM's own setup and teardown.
    reset_kernel: PathBuf,
    work: WorkDir,
    /// `/proc/loadavg` (1, 5, 15 min) when the benchmark began: boots on a busy host
    /// wait for CPU time.
    load_before: String,
    /// Profiled boots (`--profile`): the kernel log of each is kept here.
    profile_log: Option<PathBuf>,
}

/// The 1, 5 and 15 minute load averages (empty if unreadable).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A scratch directory removed on drop.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Who boots, and how far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vmm {
    Ours(BootUntil),
    Qemu,
    /// Our VMM booting the one-instruction guest that resets at once.
    OursReset,
    /// QEMU booting the same.
    QemuReset,
    /// Our VMM started from the ready snapshot (`--snapshot`): to the first output, or
    /// to its first vCPU entry or exit (`--until`).
    Restored(BootUntil),
}

impl Vmm {
    fn program(self) -> &'static str {
        match self {
            Vmm::Ours(_) | Vmm::OursReset | Vmm::Restored(_) => "mxc-vm",
            Vmm::Qemu | Vmm::QemuReset => "qemu",
        }
    }

    fn until(self) -> &'static str {
        match self {
            Vmm::Ours(u) => until_name(u),
            Vmm::Qemu => "ready",
            Vmm::OursReset | Vmm::QemuReset => "first-instruction-reset",
            Vmm::Restored(BootUntil::Output) => "restored-output",
            Vmm::Restored(BootUntil::FirstExit) => "restored-first-exit",
            Vmm::Restored(_) => "restored-first-entry",
        }
    }
}

fn until_name(until: BootUntil) -> &'static str {
    match until {
        BootUntil::FirstEntry => "first-entry",
        BootUntil::FirstExit => "first-exit",
        BootUntil::Ready => "ready",
        BootUntil::Output => "output",
    }
}

/// One measured boot.
struct Boot {
    timeline: RunTimeline,
    /// Peak RSS of the VMM process, KiB.
    rss_kib: Option<u64>,
    /// How the VM ended.
    reason: String,
    /// The guest's kernel command line.
    cmdline: String,
}

struct Series {
    name: String,
    vmm: Vmm,
    boots: Vec<Boot>,
}

impl Series {
    fn timelines(&self) -> Vec<RunTimeline> {
        self.boots.iter().map(|b| b.timeline.clone()).collect()
    }

    /// p50 of spawn to process exit, ms.
    fn exit_p50(&self) -> Option<f64> {
        let s = summarize_stages(&self.timelines());
        s.iter()
            .find(|s| s.stage == BootStage::ProcessExit)
            .map(|s| s.cumulative.p50_ms)
    }
}

/// Peak RSS percentiles, KiB.
#[derive(Debug, Serialize)]
struct RssSummary {
    runs: usize,
    p50_kib: f64,
    p90_kib: f64,
    max_kib: f64,
}

fn rss_summary(boots: &[Boot]) -> Option<RssSummary> {
    let mut kib: Vec<f64> = boots
        .iter()
        .filter_map(|b| b.rss_kib)
        .map(|k| k as f64)
        .collect();
    kib.sort_by(f64::total_cmp);
    let max = *kib.last()?;
    Some(RssSummary {
        runs: kib.len(),
        p50_kib: quantile(&kib, 0.5),
        p90_kib: quantile(&kib, 0.9),
        max_kib: max,
    })
}

fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; a benchmark's VMM must not outlive it.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// The guest command line our VMM appends to its own (and QEMU gets in full).
fn extra_cmdline(until: BootUntil) -> String {
    let base = guest_image::kernel_cmdline(guest_image::GuestConsole::Off, false);
    match until {
        BootUntil::Ready => format!("{base} {BENCH_POWEROFF}"),
        _ => base,
    }
}

/// Boot our VMM as a child we spawn and reap ourselves (every mode but `output`).
/// The bytes of the one-instruction guest: `mov al, 0xfe; out 0x64, al` (reset through
/// the i8042), entered through PVH.
fn reset_kernel() -> Vec<u8> {
    vmm::boot::tiny::elf_kernel(&vmm::boot::tiny::program(&[0xb0, 0xfe, 0xe6, 0x64]), true)
}

/// Boot our VMM as a child we spawn and reap ourselves: the image up to `until`, or
/// with `reset` the one-instruction guest (which ends the VM at once).
fn boot_direct(setup: &Setup, until: BootUntil, reset: bool, n: usize) -> Result<Boot, Failure> {
    let dir = setup.work.0.join(format!("vmm-{n}"));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Failure::new(format!("cannot create {}: {e}", dir.display())))?;
    let kernel = if reset {
        &setup.reset_kernel
    } else {
        &setup.kernel
    };
    let mut config = vmm::VmConfig::new(kernel, setup.mem_mib, 1);
    config.initrd = (!reset).then(|| setup.initrd.clone());
    config.cmdline_extra = extra_cmdline(until);
    if setup.profile_log.is_some() && !reset {
        config.cmdline_extra = format!("{} {}", config.cmdline_extra, profile::PROFILE_CMDLINE);
        config.console = vmm::ConsoleMode::File(dir.join("console.log"));
    }
    config.pvm_cmdline = guest_image::KERNEL_CMDLINE_PVM.to_string();
    let (stop_at, expected) = match until {
        _ if reset => (None, vmm::ExitReason::GuestReset),
        BootUntil::FirstEntry => (Some(vmm::Stage::FirstVcpuEntry), vmm::ExitReason::Killed),
        BootUntil::FirstExit => (Some(vmm::Stage::FirstGuestExit), vmm::ExitReason::Killed),
        BootUntil::Ready | BootUntil::Output => (None, vmm::ExitReason::GuestReset),
    };
    config.stop_at = stop_at;
    let profile_log = setup.profile_log.as_ref().filter(|_| !reset);
    let boot = run_vmm(setup, &config, &dir, expected, profile_log)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(boot)
}

/// Spawn our VMM with `config` (its files in `dir`), reap it and read its report: it must
/// have ended with `expected`. With `profile_log` its console log is kept there.
fn run_vmm(
    setup: &Setup,
    config: &vmm::VmConfig,
    dir: &Path,
    expected: vmm::ExitReason,
    profile_log: Option<&PathBuf>,
) -> Result<Boot, Failure> {
    let (mut cmd, files) = sandbox::microvm::vmm_command(config, dir, false, Some(&setup.exe))?;
    let (report_path, log_path) = (files.report, files.log);
    // The VMM's cgroup (if any) goes once the VMM has been reaped.
    let _cgroup = files.cgroup;
    let child = cmd
        .spawn()
        .map_err(|e| Failure::new(format!("cannot start the VMM process: {e}")))?;
    let reaped = wait_with_deadline(child, setup.boot_timeout)
        .map_err(|e| Failure::new(format!("waiting for the VMM: {e}")))?;
    let anchor = MonoAnchor::now();
    let tail = || log_tail(&log_path, 5);
    if reaped.timed_out {
        return Err(Failure::new(format!(
            "the boot did not end within {:?} (raise --boot-timeout); VMM log: {}",
            setup.boot_timeout,
            tail()
        )));
    }
    if reaped.code != Some(0) {
        return Err(Failure::new(format!(
            "the VMM failed (exit code {:?}); VMM log: {}",
            reaped.code,
            tail()
        )));
    }
    let report: vmm::VmExitReport = std::fs::read(&report_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| Failure::new(format!("no VMM report in {}: {e}", report_path.display())))?;
    if report.reason != expected {
        return Err(Failure::new(format!(
            "the VM ended with {} instead of {expected}; VMM log: {}",
            report.reason,
            tail()
        )));
    }
    let timeline = RunTimeline::merge(
        &report,
        &[(BootStage::ProcessExit, anchor.mono_ns(reaped.exited_at))],
    );
    if let Some(keep) = profile_log {
        std::fs::copy(dir.join("console.log"), keep)
            .map_err(|e| Failure::new(format!("no kernel log of the profiled boot: {e}")))?;
    }
    Ok(Boot {
        timeline,
        rss_kib: Some(reaped.max_rss_kib),
        reason: report.reason.to_string(),
        cmdline: report.cmdline,
    })
}

/// The whole lifecycle through the microvm backend: boot (or restore) to the agent's
/// answer, run `/bin/echo`, power off.
fn boot_lifecycle(setup: &Setup, n: usize, start: snapshot::Start) -> Result<Boot, Failure> {
    let (spec, mut vm) = snapshot::backend(setup, n, start);
    vm.provision(&spec)?;
    vm.start()?;
    if vm.timeline.restored != (start == snapshot::Start::Restore) {
        return Err(Failure::new(format!(
            "the VM was {} instead",
            if vm.timeline.restored {
                "restored"
            } else {
                "booted (see the line above: the ready snapshot cannot be used)"
            }
        )));
    }
    let mut out = Collect::default();
    let outcome = {
        let mut io = ExecIo {
            stdin: StdinMode::Null,
            sink: Some(&mut out),
            output_limit: None,
            signals: None,
        };
        vm.exec(
            &ExecRequest {
                argv: vec!["/bin/echo".into(), ECHO_WORD.into()],
                env: vec![],
                cwd: None,
                timeout: Some(setup.boot_timeout),
            },
            &mut io,
        )?
    };
    let want = format!("{ECHO_WORD}\n");
    if outcome.exit != sandbox::ExitKind::Code(0) || out.stdout != want.as_bytes() {
        return Err(Failure::new(format!(
            "/bin/echo in the guest gave {:?} and stdout {:?} (an initramfs without \
             busybox has no /bin/echo: use --until ready there)",
            outcome.exit,
            String::from_utf8_lossy(&out.stdout)
        )));
    }
    // Peak RSS so far: the VM is about to end.
    let rss_kib = vm.vmm_pid().and_then(vm_hwm_kib);
    vm.stop()?;
    let report = vm
        .report
        .clone()
        .ok_or_else(|| Failure::new("the VMM wrote no report"))?;
    vm.deprovision()?;
    let anchor = MonoAnchor::now();
    let host: Vec<(BootStage, u64)> = [
        (BootStage::Handshake, vm.timeline.agent_ready),
        (BootStage::FirstOutput, vm.timeline.first_output),
    ]
    .into_iter()
    .filter_map(|(stage, t)| t.map(|t| (stage, anchor.mono_ns(t))))
    .collect();
    Ok(Boot {
        timeline: RunTimeline::merge(&report, &host),
        rss_kib,
        reason: report.reason.to_string(),
        cmdline: report.cmdline,
    })
}

/// The command line our VMM gives the guest in the `ready` mode (no virtio devices).
fn ready_cmdline(pvm: bool) -> Result<String, Failure> {
    let extra = extra_cmdline(BootUntil::Ready);
    vmm::boot::cmdline::build(&vmm::boot::cmdline::CmdlineParts {
        virtio_slots: 0,
        console: false,
        pvm: if pvm {
            guest_image::KERNEL_CMDLINE_PVM
        } else {
            ""
        },
        extra: &extra,
    })
    .map_err(|e| Failure::new(chain(&e)))
}

/// Boot QEMU to the agent's power-off at ready, or with `reset` the one-instruction
/// guest.
fn boot_qemu(setup: &Setup, reset: bool, n: usize) -> Result<Boot, Failure> {
    let cmdline = ready_cmdline(setup.pvm)?;
    let log_path = setup.work.0.join(format!("qemu-{n}.log"));
    let log = std::fs::File::create(&log_path)
        .map_err(|e| Failure::new(format!("cannot create {}: {e}", log_path.display())))?;
    let log2 = log
        .try_clone()
        .map_err(|e| Failure::new(format!("{}: {e}", log_path.display())))?;
    let args = qemu::QemuBoot {
        kernel: if reset {
            &setup.reset_kernel
        } else {
            &setup.kernel
        },
        initrd: (!reset).then_some(setup.initrd.as_path()),
        cmdline: &cmdline,
        mem_mib: setup.mem_mib,
        vcpus: 1,
        pvm: setup.pvm,
    }
    .args();
    let mut cmd = Command::new(&setup.qemu);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    die_with_parent(&mut cmd);
    let start = vmm::timeline::monotonic_ns();
    let child = cmd.spawn().map_err(|e| {
        Failure::new(format!(
            "cannot run {}: {e} (install qemu-system-x86 or pass --qemu PATH)",
            setup.qemu.display()
        ))
    })?;
    let reaped = wait_with_deadline(child, setup.boot_timeout)
        .map_err(|e| Failure::new(format!("waiting for QEMU: {e}")))?;
    let anchor = MonoAnchor::now();
    if reaped.timed_out || reaped.code != Some(0) {
        return Err(Failure::new(format!(
            "QEMU {} (exit code {:?}); its output: {}",
            if reaped.timed_out {
                "did not finish the boot in time"
            } else {
                "failed"
            },
            reaped.code,
            log_tail(&log_path, 5)
        )));
    }
    let _ = std::fs::remove_file(&log_path);
    Ok(Boot {
        timeline: RunTimeline::host_only(
            start,
            &[(BootStage::ProcessExit, anchor.mono_ns(reaped.exited_at))],
        ),
        rss_kib: Some(reaped.max_rss_kib),
        reason: "guest reset (-no-reboot)".into(),
        cmdline,
    })
}

fn boot_once(setup: &Setup, vmm: Vmm, n: usize) -> Result<Boot, Failure> {
    match vmm {
        Vmm::Ours(BootUntil::Output) => boot_lifecycle(setup, n, snapshot::Start::Cold),
        Vmm::Restored(BootUntil::Output) => boot_lifecycle(setup, n, snapshot::Start::Restore),
        Vmm::Restored(until) => snapshot::restore_direct(setup, until, n),
        Vmm::Ours(until) => boot_direct(setup, until, false, n),
        Vmm::OursReset => boot_direct(setup, BootUntil::Ready, true, n),
        Vmm::Qemu => boot_qemu(setup, false, n),
        Vmm::QemuReset => boot_qemu(setup, true, n),
    }
}

fn series_for(args: &BenchBootArgs, qemu_name: &str) -> Vec<Series> {
    let mut list = vec![Series {
        name: format!("mxc-vm ({})", until_name(args.until)),
        vmm: Vmm::Ours(args.until),
        boots: vec![],
    }];
    if args.snapshot {
        list.push(Series {
            name: format!(
                "mxc-vm restored from the ready snapshot ({})",
                until_name(args.until)
            ),
            vmm: Vmm::Restored(args.until),
            boots: vec![],
        });
    }
    if args.vs_qemu {
        if args.until != BootUntil::Ready {
            list.push(Series {
                name: "mxc-vm (ready)".into(),
                vmm: Vmm::Ours(BootUntil::Ready),
                boots: vec![],
            });
        }
        list.push(Series {
            name: format!("{qemu_name} (ready)"),
            vmm: Vmm::Qemu,
            boots: vec![],
        });
        list.push(Series {
            name: "mxc-vm (one-instruction guest)".into(),
            vmm: Vmm::OursReset,
            boots: vec![],
        });
        list.push(Series {
            name: format!("{qemu_name} (one-instruction guest)"),
            vmm: Vmm::QemuReset,
            boots: vec![],
        });
    }
    list
}

fn resolve_image(args: &BenchBootArgs) -> Result<(PathBuf, PathBuf), Failure> {
    if let (Some(k), Some(i)) = (&args.kernel, &args.initrd) {
        return Ok((k.clone(), i.clone()));
    }
    let image = guest_image::cached(&guest_image::BuildOptions::default()).ok_or_else(|| {
        Failure::new(
            "no guest image is cached for the current inputs: run `mxc-vm image build` \
             (or pass --kernel and --initrd)",
        )
    })?;
    Ok((
        args.kernel.clone().unwrap_or(image.vmlinux),
        args.initrd.clone().unwrap_or(image.initramfs),
    ))
}

fn fmt_ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v < 100.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.1}")
    }
}

/// A goal and whether it was met (`None`: it does not apply on this host).
#[derive(Debug, Serialize)]
struct Goal {
    goal: &'static str,
    limit_ms: f64,
    p50_ms: Option<f64>,
    met: Option<bool>,
    note: String,
}

fn goals(series: &[Series], host: &HostKind) -> Vec<Goal> {
    let p50 = |stage: BootStage| -> Option<f64> {
        series
            .iter()
            .filter(|s| matches!(s.vmm, Vmm::Ours(_)))
            .find_map(|s| {
                summarize_stages(&s.timelines())
                    .into_iter()
                    .find(|x| x.stage == stage)
                    .map(|x| x.cumulative.p50_ms)
            })
    };
    let setup = p50(BootStage::Vmm(vmm::Stage::FirstVcpuEntry));
    let ready = p50(BootStage::Vmm(vmm::Stage::AgentReady));
    let hardware = host.is_hardware();
    let mut list = vec![
        Goal {
            goal: "vmm_setup (process start -> first vCPU entry)",
            limit_ms: GOAL_SETUP_MS,
            p50_ms: setup,
            met: setup.map(|v| v <= GOAL_SETUP_MS),
            note: "no guest code runs, so this holds on kvm_pvm too; it grows with host CPU load"
                .into(),
        },
        Goal {
            goal: "agent_ready (process start -> boot-timer stage 2), hardware KVM",
            limit_ms: GOAL_READY_MS,
            p50_ms: ready,
            met: if hardware {
                ready.map(|v| v <= GOAL_READY_MS)
            } else {
                None
            },
            note: if hardware {
                format!("measured on {host}")
            } else {
                format!("does not apply here ({host}): guest kernel code is emulated")
            },
        },
    ];
    list.extend(snapshot::goals(series, host));
    list
}

fn stage_rows(stages: &[StageSummary]) -> Vec<Vec<String>> {
    stages
        .iter()
        .map(|s| {
            vec![
                s.stage.name().to_string(),
                s.cumulative.runs.to_string(),
                fmt_ms(s.cumulative.p50_ms),
                fmt_ms(s.cumulative.p90_ms),
                fmt_ms(s.cumulative.p99_ms),
                fmt_ms(s.delta.p50_ms),
                fmt_ms(s.delta.p90_ms),
                fmt_ms(s.delta.p99_ms),
            ]
        })
        .collect()
}

/// Ratio of QEMU's p50 spawn-to-exit to ours, both in the `ready` mode.
fn qemu_ratio(series: &[Series]) -> Option<(f64, f64, f64)> {
    let ours = series
        .iter()
        .find(|s| s.vmm == Vmm::Ours(BootUntil::Ready))?
        .exit_p50()?;
    let qemu = series.iter().find(|s| s.vmm == Vmm::Qemu)?.exit_p50()?;
    (ours > 0.0).then(|| (ours, qemu, qemu / ours))
}

const COMPARED: &str = "spawn of the VMM process -> the host reaps it, as seen by the \
    host; same kernel, initramfs, kernel command line, RAM and 1 vCPU; the guest agent \
    powers off as soon as it is ready (mxc.bench_poweroff=1); no vsock device in either";

fn print_text(setup: &Setup, args: &BenchBootArgs, host: &HostKind, series: &[Series]) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "boot benchmark: {} runs per series, until {}, {host}, 1 vCPU, {} MiB",
        args.runs,
        until_name(args.until),
        setup.mem_mib
    );
    let _ = writeln!(
        out,
        "host: {} CPUs, load average (1/5/15 min) {} before, {} after",
        cpus(),
        setup.load_before,
        loadavg()
    );
    let _ = writeln!(
        out,
        "kernel {}; initramfs {} ({} bytes)\n",
        setup.kernel.display(),
        setup.initrd.display(),
        std::fs::metadata(&setup.initrd).map_or(0, |m| m.len())
    );
    for s in series
        .iter()
        .filter(|s| matches!(s.vmm, Vmm::Ours(_) | Vmm::Restored(_)))
    {
        let _ = writeln!(
            out,
            "{} (ms since the VMM process was spawned; delta = since the latest earlier stage)",
            s.name
        );
        let _ = write!(
            out,
            "{}",
            table(
                &[
                    "stage",
                    "n",
                    "p50",
                    "p90",
                    "p99",
                    "delta p50",
                    "delta p90",
                    "delta p99"
                ],
                &stage_rows(&summarize_stages(&s.timelines())),
            )
        );
        if let Some(rss) = rss_summary(&s.boots) {
            let _ = writeln!(
                out,
                "VMM peak RSS: p50 {:.1} MiB, max {:.1} MiB ({})\n",
                rss.p50_kib / 1024.0,
                rss.max_kib / 1024.0,
                if matches!(
                    s.vmm,
                    Vmm::Ours(BootUntil::Output) | Vmm::Restored(BootUntil::Output)
                ) {
                    "VmHWM just before the VM ends"
                } else {
                    "ru_maxrss of the reaped process"
                }
            );
        }
    }
    if args.vs_qemu {
        let rows: Vec<Vec<String>> = series
            .iter()
            .filter(|s| !matches!(s.vmm, Vmm::Ours(u) if u != BootUntil::Ready))
            .map(|s| {
                let exit: Vec<Duration> = s
                    .boots
                    .iter()
                    .filter_map(|b| b.timeline.get(BootStage::ProcessExit))
                    .map(Duration::from_nanos)
                    .collect();
                let sum = super::stats::summarize(&exit);
                let rss = rss_summary(&s.boots).map_or(f64::NAN, |r| r.p50_kib / 1024.0);
                vec![
                    s.name.clone(),
                    fmt_ms(sum.p50_ms),
                    fmt_ms(sum.p90_ms),
                    fmt_ms(sum.p99_ms),
                    fmt_ms(sum.mean_ms),
                    format!("{rss:.1}"),
                ]
            })
            .collect();
        let _ = writeln!(out, "vs QEMU: {COMPARED}");
        let _ = write!(
            out,
            "{}",
            table(
                &[
                    "series",
                    "p50 ms",
                    "p90 ms",
                    "p99 ms",
                    "mean ms",
                    "peak RSS p50 MiB"
                ],
                &rows
            )
        );
        if let Some((_, _, ratio)) = qemu_ratio(series) {
            let _ = writeln!(out, "QEMU / mxc-vm at p50 (ready): {ratio:.3}");
        }
        let _ = writeln!(out, "{}", vs_qemu::ONE_INSTRUCTION);
        let _ = writeln!(out, "vs QEMU goals ({host}):");
        for g in vs_qemu::goals(series) {
            let _ = writeln!(out, "  {g}");
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out, "goals:");
    for g in goals(series, host) {
        let verdict = match g.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "n/a",
        };
        let _ = writeln!(
            out,
            "  {}: p50 {} ms, goal <= {} ms: {verdict} ({})",
            g.goal,
            g.p50_ms.map_or("-".into(), fmt_ms),
            g.limit_ms,
            g.note
        );
    }
}

fn print_json(
    setup: &Setup,
    args: &BenchBootArgs,
    host: &HostKind,
    series: &[Series],
    profile: Option<&profile::Profile>,
) {
    let series_json: Vec<serde_json::Value> = series
        .iter()
        .map(|s| {
            let runs: Vec<serde_json::Value> = s
                .boots
                .iter()
                .map(|b| {
                    let stages: serde_json::Map<String, serde_json::Value> = b
                        .timeline
                        .stages()
                        .into_iter()
                        .map(|(stage, ns)| (stage.name().to_string(), ns.into()))
                        .collect();
                    serde_json::json!({
                        "stages_ns": stages,
                        "peak_rss_kib": b.rss_kib,
                        "exit_reason": b.reason,
                        "cmdline": b.cmdline,
                    })
                })
                .collect();
            serde_json::json!({
                "name": s.name,
                "vmm": s.vmm.program(),
                "until": s.vmm.until(),
                "stages": summarize_stages(&s.timelines()),
                "peak_rss": rss_summary(&s.boots),
                "runs": runs,
            })
        })
        .collect();
    let vs_qemu = qemu_ratio(series).map(|(ours, qemu, ratio)| {
        serde_json::json!({
            "compared": COMPARED,
            "mxc_vm_p50_ms": ours,
            "qemu_p50_ms": qemu,
            "qemu_over_mxc_vm_p50": ratio,
            "one_instruction": vs_qemu::ONE_INSTRUCTION,
            "goals": vs_qemu::goals(series),
        })
    });
    let value = serde_json::json!({
        "benchmark": "boot",
        "host": host.to_string(),
        "pvm": setup.pvm,
        "until": until_name(args.until),
        "runs": args.runs,
        "warmup": args.warmup,
        "mem_mib": setup.mem_mib,
        "vcpus": 1,
        "kernel": setup.kernel,
        "initrd": setup.initrd,
        "initrd_bytes": std::fs::metadata(&setup.initrd).map_or(0, |m| m.len()),
        "host_cpus": cpus(),
        "load_average": { "before": setup.load_before, "after": loadavg() },
        "series": series_json,
        "vs_qemu": vs_qemu,
        "goals": goals(series, host),
        "profile": profile,
    });
    let _ = writeln!(
        std::io::stdout().lock(),
        "{}",
        serde_json::to_string_pretty(&value).unwrap_or_default()
    );
}

/// Progress on stderr: one line per boot that runs the guest, a counter otherwise.
struct Progress {
    per_boot_lines: bool,
}

impl Progress {
    fn before(&self, label: &str, name: &str) {
        if self.per_boot_lines {
            let _ = write!(std::io::stderr().lock(), "{label} {name}: booting... ");
        }
    }

    fn after(&self, label: &str, boot: &Boot) {
        let mut err = std::io::stderr().lock();
        if self.per_boot_lines {
            let end = [BootStage::ProcessExit, BootStage::Vmm(vmm::Stage::VmGone)]
                .iter()
                .find_map(|&s| boot.timeline.get(s))
                .unwrap_or(0);
            let ready = boot
                .timeline
                .get(BootStage::Vmm(vmm::Stage::AgentReady))
                .map(|t| format!(", agent ready at {:.1} s", t as f64 / 1e9))
                .unwrap_or_default();
            let _ = writeln!(err, "{:.2} s{ready}", end as f64 / 1e9);
        } else {
            let _ = write!(err, "\r{label}");
        }
    }

    fn finish(&self) {
        if !self.per_boot_lines {
            let _ = writeln!(std::io::stderr().lock());
        }
    }
}

pub fn run(mut args: BenchBootArgs) -> Result<i32, Failure> {
    if args.profile {
        // The profiled boots are our VMM's own, to agent ready.
        args.until = BootUntil::Ready;
    }
    if args.runs == 0 {
        return Err(Failure::new("--runs must be at least 1"));
    }
    let host = vmm::detect();
    if let HostKind::NoKvm(reason) = &host {
        return Err(Failure::new(format!(
            "the boot benchmark needs KVM: {reason}"
        )));
    }
    let boot_timeout = policy::parse_duration(&args.boot_timeout)
        .map_err(|e| Failure::new(format!("--boot-timeout {:?}: {e}", args.boot_timeout)))?;
    let (kernel, initrd) = resolve_image(&args)?;
    for p in [&kernel, &initrd] {
        if !p.is_file() {
            return Err(Failure::new(format!("{} does not exist", p.display())));
        }
    }
    let exe = std::env::current_exe()
        .map_err(|e| Failure::new(format!("cannot find the mxc-vm binary: {e}")))?;
    let work = std::env::temp_dir().join(format!("mxc-vm-bench-boot-{}", std::process::id()));
    std::fs::create_dir_all(&work)
        .map_err(|e| Failure::new(format!("cannot create {}: {e}", work.display())))?;
    let reset_path = work.join("reset-vmlinux");
    std::fs::write(&reset_path, reset_kernel())
        .map_err(|e| Failure::new(format!("cannot write {}: {e}", reset_path.display())))?;
    let setup = Setup {
        exe,
        kernel,
        initrd,
        mem_mib: args.mem,
        pvm: host == HostKind::Pvm,
        boot_timeout,
        qemu: args.qemu.clone(),
        reset_kernel: reset_path,
        load_before: loadavg(),
        profile_log: args.profile.then(|| work.join("kernel-log.txt")),
        work: WorkDir(work),
    };
    let qemu_name = Path::new(&setup.qemu)
        .file_name()
        .map_or("qemu".into(), |n| n.to_string_lossy().into_owned());
    if args.snapshot {
        if args.until == BootUntil::Ready {
            return Err(Failure::new(
                "--snapshot starts VMs at the agent's Ready: it compares first outputs \
                 (--until output, the default) or the VMM's own setup (first-entry, \
                 first-exit), not --until ready",
            ));
        }
        snapshot::prepare(&setup)?;
    }
    let mut series = series_for(&args, &qemu_name);
    let progress = Progress {
        per_boot_lines: args.vs_qemu || matches!(args.until, BootUntil::Ready | BootUntil::Output),
    };
    let rounds = args.warmup + args.runs;
    let mut n = 0;
    for round in 0..rounds {
        let label = if round < args.warmup {
            format!("warm-up {}/{}", round + 1, args.warmup)
        } else {
            format!("run {}/{}", round + 1 - args.warmup, args.runs)
        };
        // Rotate the order every round so no series always goes first.
        let count = series.len();
        for k in 0..count {
            let Some(s) = series.get_mut((round + k) % count) else {
                continue;
            };
            progress.before(&label, &s.name);
            let boot = boot_once(&setup, s.vmm, n)?;
            n += 1;
            progress.after(&label, &boot);
            if round >= args.warmup {
                s.boots.push(boot);
            }
        }
    }
    progress.finish();
    if let (Some(ours), Some(qemu)) = (
        series
            .iter()
            .find(|s| s.vmm == Vmm::Ours(BootUntil::Ready))
            .and_then(|s| s.boots.first()),
        series
            .iter()
            .find(|s| s.vmm == Vmm::Qemu)
            .and_then(|s| s.boots.first()),
    ) {
        if ours.cmdline != qemu.cmdline {
            let _ = writeln!(
                std::io::stderr().lock(),
                "mxc-vm: warning: the guests' command lines differ:\n  ours: {}\n  qemu: {}",
                ours.cmdline,
                qemu.cmdline
            );
        }
    }
    if let Some(path) = &args.svg {
        let timelines: Vec<(String, Vec<RunTimeline>)> = series
            .iter()
            .map(|s| (s.name.clone(), s.timelines()))
            .collect();
        let refs: Vec<(&str, &[RunTimeline])> = timelines
            .iter()
            .map(|(n, t)| (n.as_str(), t.as_slice()))
            .collect();
        let title = format!(
            "mxc-vm bench boot: {} runs, until {}, {host}",
            args.runs,
            until_name(args.until)
        );
        std::fs::write(path, svg::render(&title, &refs))
            .map_err(|e| Failure::new(format!("cannot write {}: {e}", path.display())))?;
    }
    let profiled = setup
        .profile_log
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|log| {
            let mut p = profile::analyse(&log, 15);
            profile::name_addresses(&mut p, &setup.kernel);
            p
        });
    if args.json {
        print_json(&setup, &args, &host, &series, profiled.as_ref());
    } else {
        print_text(&setup, &args, &host, &series);
        if let Some(p) = &profiled {
            let _ = write!(std::io::stdout().lock(), "{}", profile::render(p));
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(until: BootUntil, vs_qemu: bool) -> BenchBootArgs {
        BenchBootArgs {
            runs: 1,
            warmup: 0,
            until,
            vs_qemu,
            qemu: "qemu-system-x86_64".into(),
            svg: None,
            mem: 128,
            kernel: None,
            initrd: None,
            boot_timeout: "1m".into(),
            profile: false,
            snapshot: false,
            json: false,
        }
    }

    fn names(series: &[Series]) -> Vec<&str> {
        series.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn vs_qemu_adds_ready_and_one_instruction_series_of_ours_and_qemu() {
        let full = series_for(&args(BootUntil::Output, true), "qemu");
        let ready = series_for(&args(BootUntil::Ready, true), "qemu");
        let alone = series_for(&args(BootUntil::FirstEntry, false), "qemu");
        let pairs = [
            "qemu (ready)",
            "mxc-vm (one-instruction guest)",
            "qemu (one-instruction guest)",
        ];

        assert_eq!(names(&full)[..2], ["mxc-vm (output)", "mxc-vm (ready)"]);
        assert_eq!(names(&full)[2..], pairs);
        assert_eq!(names(&ready)[..1], ["mxc-vm (ready)"]);
        assert_eq!(names(&ready)[1..], pairs);
        assert_eq!(names(&alone), ["mxc-vm (first-entry)"]);
    }

    #[test]
    fn only_the_ready_mode_asks_the_agent_to_power_off() {
        let ready = extra_cmdline(BootUntil::Ready);
        let output = extra_cmdline(BootUntil::Output);

        assert!(ready.ends_with(" mxc.bench_poweroff=1"));
        assert!(!output.contains("bench_poweroff"));
    }

    #[test]
    fn qemu_gets_the_command_line_our_vmm_builds() {
        let pvm = ready_cmdline(true).unwrap();
        let hardware = ready_cmdline(false).unwrap();

        assert!(pvm.starts_with(vmm::boot::cmdline::BASE_CMDLINE));
        assert!(pvm.contains("mxc_pvm_syscall"));
        assert!(!hardware.contains("mxc_pvm_syscall"));
        assert!(hardware.ends_with(BENCH_POWEROFF));
    }

    fn boot_ending_at(ms: u64) -> Boot {
        Boot {
            timeline: RunTimeline::host_only(
                0,
                &[
                    (BootStage::Vmm(vmm::Stage::FirstVcpuEntry), ms * 100_000),
                    (BootStage::Vmm(vmm::Stage::AgentReady), ms * 900_000),
                    (BootStage::ProcessExit, ms * 1_000_000),
                ],
            ),
            rss_kib: Some(ms * 1024),
            reason: String::new(),
            cmdline: String::new(),
        }
    }

    #[test]
    fn the_qemu_ratio_compares_ready_boots_at_p50() {
        let series = vec![
            Series {
                name: "ours".into(),
                vmm: Vmm::Ours(BootUntil::Ready),
                boots: vec![boot_ending_at(100), boot_ending_at(200)],
            },
            Series {
                name: "qemu".into(),
                vmm: Vmm::Qemu,
                boots: vec![boot_ending_at(300), boot_ending_at(400)],
            },
        ];

        let (ours, qemu, ratio) = qemu_ratio(&series).unwrap();

        assert_eq!((ours, qemu, ratio), (100.0, 300.0, 3.0));
    }

    #[test]
    fn goals_apply_the_ready_limit_only_on_hardware_kvm() {
        let series = vec![Series {
            name: "ours".into(),
            vmm: Vmm::Ours(BootUntil::Ready),
            boots: vec![boot_ending_at(10)],
        }];

        let hardware = goals(
            &series,
            &HostKind::HardwareKvm {
                flavour: vmm::Flavour::HardwareVmx,
                nested: false,
            },
        );
        let pvm = goals(&series, &HostKind::Pvm);

        assert_eq!(hardware[0].met, Some(true));
        assert_eq!(hardware[1].met, Some(true));
        assert_eq!(pvm[1].met, None);
    }

    #[test]
    fn rss_summary_reports_kib_percentiles() {
        let boots = vec![boot_ending_at(1), boot_ending_at(2), boot_ending_at(3)];

        let rss = rss_summary(&boots).unwrap();

        assert_eq!((rss.runs, rss.p50_kib, rss.max_kib), (3, 2048.0, 3072.0));
    }
}

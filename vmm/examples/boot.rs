//! Boot a kernel by hand and print the boot timeline.
//!
//! ```text
//! cargo run --release -p vmm --example boot -- --kernel vmlinux [--initrd initrd.cpio]
//!     [--mem MIB] [--vcpus N] [--console | --console-file PATH] [--cmdline "..."]
//!     [--pvm-cmdline "..."] [--pvm auto|on|off] [--vsock CID:UDS_PATH] [--timeout SECS]
//!     [--spawn] [--json]
//! ```
//!
//! `--spawn` re-runs the example as a child process, passing the time just before the
//! spawn, so "process start" in the timeline is exact (otherwise it comes from
//! `/proc/self/stat`, which has a 10 ms resolution).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use vmm::timeline::monotonic_ns;
use vmm::{ConsoleMode, PvmMode, Vm, VmConfig, VsockConfig};

struct Args {
    config: VmConfig,
    timeout: Option<Duration>,
    spawn: bool,
    json: bool,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args> {
    let mut kernel = None;
    let mut config = VmConfig::new("", 128, 1);
    let mut timeout = None;
    let mut spawn = false;
    let mut json = false;
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow!("{arg} needs a value"));
        match arg.as_str() {
            "--kernel" => kernel = Some(PathBuf::from(value()?)),
            "--initrd" => config.initrd = Some(PathBuf::from(value()?)),
            "--mem" => config.mem_mib = value()?.parse().context("--mem")?,
            "--vcpus" => config.vcpus = value()?.parse().context("--vcpus")?,
            "--console" => config.console = ConsoleMode::Stdout,
            "--console-file" => config.console = ConsoleMode::File(value()?.into()),
            "--cmdline" => config.cmdline_extra = value()?,
            "--pvm-cmdline" => config.pvm_cmdline = value()?,
            "--pvm" => {
                config.pvm = match value()?.as_str() {
                    "auto" => PvmMode::Auto,
                    "on" => PvmMode::On,
                    "off" => PvmMode::Off,
                    other => bail!("--pvm takes auto, on or off, not {other}"),
                }
            }
            "--timeout" => {
                timeout = Some(Duration::from_secs_f64(
                    value()?.parse().context("--timeout")?,
                ))
            }
            "--vsock" => {
                let spec = value()?;
                let (cid, path) = spec
                    .split_once(':')
                    .ok_or_else(|| anyhow!("--vsock takes CID:UDS_PATH"))?;
                config.vsock = Some(VsockConfig {
                    guest_cid: cid.parse().context("--vsock CID")?,
                    uds_path: path.into(),
                });
            }
            "--start-ns" => config.start_monotonic_ns = Some(value()?.parse()?),
            "--spawn" => spawn = true,
            "--json" => json = true,
            other => bail!("unknown argument {other}"),
        }
    }
    config.kernel = kernel.ok_or_else(|| anyhow!("--kernel is required"))?;
    Ok(Args {
        config,
        timeout,
        spawn,
        json,
    })
}

fn main() -> Result<()> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let args = parse(raw.clone().into_iter())?;
    if args.spawn {
        let exe = std::env::current_exe()?;
        let child_args: Vec<String> = raw.into_iter().filter(|a| a != "--spawn").collect();
        let start = monotonic_ns();
        let status = Command::new(exe)
            .args(&child_args)
            .arg("--start-ns")
            .arg(start.to_string())
            .status()?;
        std::process::exit(status.code().unwrap_or(1));
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();

    let vm = Vm::new(args.config)?;
    let handle = vm.handle();
    vmm::kill_on_termination_signals(&handle)?;
    eprintln!("cmdline: {}", vm.cmdline()?);
    eprintln!("pvm changes: {}", vm.pvm());
    if let Some(timeout) = args.timeout {
        std::thread::spawn(move || {
            std::thread::sleep(timeout);
            handle.kill();
        });
    }
    let report = vm.run()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    eprintln!("\nVM ended: {}", report.reason);
    eprintln!("vCPU exits handled: {}", report.vcpu_exits);
    eprintln!("{:<18} {:>14} {:>14}", "stage", "since start", "delta");
    let mut previous = 0;
    for (stage, ns) in &report.boot_timeline {
        eprintln!(
            "{:<18} {:>11.3} ms {:>11.3} ms",
            format!("{stage:?}"),
            *ns as f64 / 1e6,
            ns.saturating_sub(previous) as f64 / 1e6
        );
        previous = *ns;
    }
    Ok(())
}

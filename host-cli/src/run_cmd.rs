//! `mxc-vm run`.

use std::io::Write;
use std::path::Path;

use policy::{Overrides, Policy, PolicySource};
use std::sync::Arc;

use sandbox::output::{PassThrough, StdinMode};
use sandbox::proxy::{NetOptions, Notices};
use sandbox::{ExecIo, ExecRequest, OutputSink, SandboxSpec};

use crate::cli::{GuestSystemArg, RunArgs};
use crate::failure::Failure;
use crate::jsonl::{self, JsonSink};
use sandbox::microvm::SystemView;

fn parse_env(items: &[String]) -> Result<Vec<(String, String)>, Failure> {
    items
        .iter()
        .map(|item| {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| Failure::new(format!("-e {item:?}: expected KEY=VALUE")))?;
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

/// Load the policy file (or start empty) and apply the flags.
pub fn effective_policy(args: &RunArgs) -> Result<Policy, Failure> {
    let mut policy = match &args.policy {
        Some(file) => policy::load_file(file)?,
        None => Policy::empty(PolicySource::Cli),
    };
    let timeout = args
        .timeout
        .as_deref()
        .map(|t| {
            policy::parse_duration(t).map_err(|e| Failure::new(format!("--timeout {t:?}: {e}")))
        })
        .transpose()?;
    let overrides = Overrides {
        ro: args.ro.clone(),
        rw: args.rw.clone(),
        deny: args.deny.clone(),
        env: parse_env(&args.env)?,
        timeout,
        cwd: args.cwd.clone(),
        command: (!args.command.is_empty()).then(|| args.command.clone()),
        containment: args.backend.map(Into::into),
        guest_root: args.guest_root,
    };
    policy.apply_overrides(&overrides)?;
    // The stricter (smaller) value wins, as for every flag that meets the policy.
    let smaller = |flag: Option<u64>, policy: Option<u64>| match (flag, policy) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    policy.limits.vcpus = smaller(
        args.vcpus.map(u64::from),
        policy.limits.vcpus.map(u64::from),
    )
    .and_then(|v| u32::try_from(v).ok());
    policy.limits.memory_mib = smaller(args.memory, policy.limits.memory_mib);
    Ok(policy)
}

fn warn(json: bool, message: &str) {
    if json {
        jsonl::emit(&serde_json::json!({ "type": "warning", "message": message }));
    } else {
        let text = format!("mxc-vm: warning: {message}\n");
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }
}

/// A one-line notice (not a warning: nothing is wrong), e.g. why a VM boots cold.
fn note(json: bool, message: &str) {
    if json {
        jsonl::emit(&serde_json::json!({ "type": "notice", "message": message }));
    } else {
        let text = format!("mxc-vm: {message}\n");
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }
}

fn sandbox_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}-{nanos:08x}", std::process::id())
}

/// Environment variable naming a hosts file the proxy resolves names with (tests).
pub const PROXY_HOSTS_ENV: &str = "MXC_VM_PROXY_HOSTS";

/// The host-side network options: `--audit`, `MXC_VM_PROXY_HOSTS`, and notices of
/// refused connections on stderr (or as JSON lines).
///
/// `MXC_VM_PROXY_HOSTS` is read from the environment of whoever runs mxc-vm, never from
/// the sandbox, and only changes which addresses the names a policy already allows
/// resolve to; every address is still checked (a private or loopback address still needs
/// an IP rule). It is announced with a warning on every run so it is never in effect
/// unnoticed.
fn net_options(args: &RunArgs) -> Result<NetOptions, Failure> {
    let json = args.json;
    let mut options = NetOptions {
        audit: args.audit.clone(),
        ..NetOptions::default()
    };
    if let Some(file) = std::env::var_os(PROXY_HOSTS_ENV) {
        let path = std::path::PathBuf::from(file);
        let resolver = sandbox::proxy::HostsResolver::from_file(&path)
            .map_err(|e| Failure::new(format!("{PROXY_HOSTS_ENV}: {e}")))?;
        warn(
            json,
            &format!(
                "the network proxy resolves names through {} ({PROXY_HOSTS_ENV}), not DNS",
                path.display()
            ),
        );
        options.resolver = Some(Arc::new(resolver));
    }
    options.notices = Some(Notices::new(move |line: &str| {
        if json {
            jsonl::emit(&serde_json::json!({ "type": "network", "message": line }));
        } else {
            // One write, so the line cannot interleave with the sandbox's own stderr.
            let text = format!("mxc-vm: {line}\n");
            let _ = std::io::stderr().lock().write_all(text.as_bytes());
        }
    }));
    Ok(options)
}

/// The guest's system view from `--guest-system` (the rootfs must have been built).
fn guest_system(arg: Option<GuestSystemArg>) -> Result<SystemView, Failure> {
    Ok(match arg.unwrap_or(GuestSystemArg::Host) {
        GuestSystemArg::Host => SystemView::Host,
        GuestSystemArg::None => SystemView::None,
        GuestSystemArg::Rootfs => {
            let opts = guest_image::BuildOptions::default();
            let root = guest_image::cached_rootfs(&opts).ok_or_else(|| {
                Failure::new(
                    "--guest-system rootfs: no rootfs is built; run `sudo mxc-vm image build \
                     --rootfs` first",
                )
            })?;
            SystemView::Rootfs(root)
        }
    })
}

/// Say that a signal stopped the run; returns the exit status, 128 + the signal.
pub fn report_interrupt(signal: i32, json: bool) -> i32 {
    let code = 128 + signal;
    let name = sandbox::interrupt::name(signal);
    if json {
        jsonl::emit(&serde_json::json!({
            "type": "interrupted",
            "signal": name,
            "exit_status": code,
        }));
    } else {
        let text = format!("mxc-vm: stopped by {name}; the sandbox was stopped and removed\n");
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }
    code
}

pub fn run(args: RunArgs) -> Result<i32, Failure> {
    let policy = effective_policy(&args)?;
    run_with_policy(args, policy)
}

/// `run` with the policy already made (the flags' overrides applied), e.g. by `lxc-exec`.
pub fn run_with_policy(args: RunArgs, policy: Policy) -> Result<i32, Failure> {
    // From here on SIGTERM, SIGINT and SIGHUP stop the sandbox and remove it.
    sandbox::interrupt::install()
        .map_err(|e| Failure::new(format!("installing the signal handlers: {e}")))?;
    sandbox::stages::mark("host: policy");
    let base = std::env::current_dir().unwrap_or_else(|_| Path::new("/").to_path_buf());
    let view = policy::resolve_fs(&policy.filesystem, &base)?;
    sandbox::stages::mark("host: policy resolved");
    for w in &view.warnings {
        warn(args.json, w);
    }
    let containment = sandbox::select_backend(policy.containment);
    let microvm = if containment == policy::Containment::Microvm {
        let boot_timeout = args
            .boot_timeout
            .as_deref()
            .map(|t| {
                policy::parse_duration(t)
                    .map_err(|e| Failure::new(format!("--boot-timeout {t:?}: {e}")))
            })
            .transpose()?;
        sandbox::microvm::MicrovmOptions {
            kernel: args.kernel.clone(),
            initrd: args.initrd.clone(),
            console: args.console,
            image: guest_image::BuildOptions::default(),
            progress: Some(Box::new(crate::progress::reporter(args.json))),
            boot_timeout,
            verbose: args.verbose,
            vmm_binary: None,
            system: guest_system(args.guest_system)?,
            cold: args.cold,
            save_ready_snapshot: false,
            notice: Some(Box::new({
                let json = args.json;
                move |line: String| note(json, &line)
            })),
            pool: None,
        }
    } else {
        if args.kernel.is_some()
            || args.initrd.is_some()
            || args.console
            || args.verbose
            || args.vcpus.is_some()
            || args.guest_system.is_some()
            || args.cold
        {
            return Err(Failure::new(format!(
                "--kernel, --initrd, --console, --verbose, --vcpus, --guest-system and --cold \
                 apply to the microvm backend, not {}",
                containment.as_str()
            )));
        }
        Default::default()
    };
    let mut backend = sandbox::backend_for(
        containment,
        sandbox::BackendOptions {
            microvm,
            persistent: false,
        },
    )?;
    let req = ExecRequest::from_policy(&policy)?;
    let spec = SandboxSpec {
        policy: policy.clone(),
        view,
        id: sandbox_id(),
        net: net_options(&args)?,
    };

    let mut json_sink = JsonSink;
    let mut pass = PassThrough;
    let sink: Option<&mut dyn OutputSink> = if args.json {
        Some(&mut json_sink)
    } else if policy.limits.output_bytes.is_some() {
        Some(&mut pass)
    } else {
        None
    };
    let mut io = ExecIo {
        stdin: StdinMode::Inherit,
        sink,
        output_limit: policy.limits.output_bytes,
        signals: None,
    };
    let outcome = sandbox::run_once(backend.as_mut(), &spec, &req, &mut io)?;
    sandbox::stages::mark("host: done");
    sandbox::stages::flush(backend.name());
    if outcome.output_truncated {
        warn(
            args.json,
            &format!(
                "output was cut at {} bytes (limits.outputBytes)",
                policy.limits.output_bytes.unwrap_or(0)
            ),
        );
    }
    let code = outcome.shell_code();
    if args.json {
        let (exit_code, signal) = match outcome.exit {
            sandbox::ExitKind::Code(c) => (Some(c), None),
            sandbox::ExitKind::Signal(s) => (None, Some(s)),
        };
        jsonl::emit(&serde_json::json!({
            "type": "exit",
            "backend": backend.name(),
            "code": exit_code,
            "signal": signal,
            "timed_out": outcome.timed_out,
            "duration_ms": outcome.duration.as_secs_f64() * 1000.0,
            "output_truncated": outcome.output_truncated,
            "exit_status": code,
        }));
    } else if outcome.timed_out {
        let limit = req.timeout.map(policy::format_duration).unwrap_or_default();
        warn(
            false,
            &format!("the command timed out after {limit} and was killed"),
        );
    }
    Ok(code)
}

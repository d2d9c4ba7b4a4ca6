//! guest-agent: PID 1 of the mxc-vm guest. It runs commands for the host over vsock,
//! speaking the `proto` protocol.
//!
//! Started by the kernel as `/init` (detected by `getpid() == 1`), it mounts the basic
//! file systems, marks the boot-timer stages, listens on the vsock port from the kernel
//! command line (`mxc.port=`, default 1024) and powers the VM off on `Shutdown`, on a
//! termination signal, or when the first host connection closes
//! (`mxc.poweroff_on_disconnect=1`, the default).
//!
//! As a normal process it does none of the PID-1 work and serves one socket:
//!
//! ```text
//! guest-agent --unix PATH   [--exit-on-disconnect] [--cgroup DIR] [PROXY]
//! guest-agent --vsock PORT  [--exit-on-disconnect] [--cgroup DIR] [PROXY]
//! PROXY: --proxy-port PORT [--proxy-unix PATH]
//! ```
//!
//! `--proxy-port` (as PID 1: `mxc.proxy_port=`) relays 127.0.0.1:PORT to the host's
//! network policy proxy at vsock CID 2 port 1080, or to the Unix socket
//! `--proxy-unix PATH` (for tests); see `proxy_forward`.
//!
//! Build the static `/init` (a static-pie: no `INTERP` program header):
//!
//! ```text
//! RUSTFLAGS="-C target-feature=+crt-static" cargo build --profile release-guest \
//!     -p guest-agent --target x86_64-unknown-linux-gnu
//! ```
//!
//! Guest kernel needs: `DEVTMPFS`, `TMPFS`, `PROC_FS`, `SYSFS`, `VSOCKETS` +
//! `VIRTIO_VSOCKETS`, `INET` (loopback); for per-exec cgroups `CGROUPS` (cgroup2, kill of
//! escaped processes) and `CGROUP_PIDS` (without it `rlimits.nproc` is refused); for the
//! boot timer `DEVMEM`.

mod cgroup;
mod cmdline;
mod conn;
mod exec;
mod init;
mod proxy_forward;
mod registry;
mod server;
mod shares;
mod sys;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use cgroup::CgroupRoot;
use exec::SpawnContext;
use proxy_forward::Forwarder;
use server::{Options, Server, StopReason};

/// Writes one line to stderr (the console as PID 1); never fails, never panics.
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log_line(format_args!($($arg)*))
    };
}
pub(crate) use log;

pub(crate) fn log_line(args: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "guest-agent: {args}");
}

/// An error and its causes, joined with ": " (for messages to the host).
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

const VERSION: &str = env!("CARGO_PKG_VERSION");

const USAGE: &str = "usage: guest-agent (--unix PATH | --vsock PORT) \
                     [--exit-on-disconnect] [--cgroup DIR] \
                     [--proxy-port PORT [--proxy-unix PATH]]\n\
                     As PID 1 it takes its settings from the kernel command line.";

/// Where a normal-process agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Listen {
    Unix(PathBuf),
    Vsock(u32),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix socket {}", path.display()),
            Self::Vsock(port) => write!(f, "vsock port {port}"),
        }
    }
}

/// Settings of a normal-process agent.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Args {
    listen: Listen,
    exit_on_disconnect: bool,
    cgroup: Option<PathBuf>,
    /// Relay 127.0.0.1:PORT to the host's network proxy.
    proxy_port: Option<u16>,
    /// Relay to this Unix socket instead of vsock CID 2 port 1080.
    proxy_unix: Option<PathBuf>,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Command {
    Serve(Args),
    Version,
    Help,
}

fn parse_args(args: &[String]) -> Result<Command, String> {
    let mut listen = None;
    let mut exit_on_disconnect = false;
    let mut cgroup = None;
    let mut proxy_port = None;
    let mut proxy_unix = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "--unix" => listen = Some(Listen::Unix(PathBuf::from(value("--unix")?))),
            "--vsock" => {
                let v = value("--vsock")?;
                let port = v.parse().map_err(|_| format!("bad vsock port {v:?}"))?;
                listen = Some(Listen::Vsock(port));
            }
            "--exit-on-disconnect" => exit_on_disconnect = true,
            "--cgroup" => cgroup = Some(PathBuf::from(value("--cgroup")?)),
            "--proxy-port" => {
                let v = value("--proxy-port")?;
                let port = v
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("bad proxy port {v:?}"))?;
                proxy_port = Some(port);
            }
            "--proxy-unix" => proxy_unix = Some(PathBuf::from(value("--proxy-unix")?)),
            "--version" => return Ok(Command::Version),
            "--help" | "-h" => return Ok(Command::Help),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let listen = listen.ok_or("one of --unix PATH or --vsock PORT is required")?;
    if proxy_unix.is_some() && proxy_port.is_none() {
        return Err("--proxy-unix needs --proxy-port".into());
    }
    Ok(Command::Serve(Args {
        listen,
        exit_on_disconnect,
        cgroup,
        proxy_port,
        proxy_unix,
    }))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if sys::getpid() == 1 {
        run_pid1(pid1_unix_path(&args));
    }
    let code = match parse_args(&args) {
        Ok(Command::Serve(args)) => run_process(&args),
        Ok(Command::Version) => {
            println!(
                "guest-agent {VERSION} (protocol {})",
                proto::PROTOCOL_VERSION
            );
            0
        }
        Ok(Command::Help) => {
            println!("{USAGE}");
            0
        }
        Err(msg) => {
            log!("{msg}\n{USAGE}");
            2
        }
    };
    std::process::exit(code);
}

/// As PID 1 the arguments are whatever the kernel passed on; only `--unix PATH` is
/// honoured (listen there instead of on vsock: for running as PID 1 of a PID namespace
/// in tests and containers). Everything else is ignored.
fn pid1_unix_path(args: &[String]) -> Option<PathBuf> {
    args.iter()
        .position(|a| a == "--unix")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
}

/// PID 1: set the guest up, serve, power off. Never returns (PID 1 must not exit).
fn run_pid1(unix: Option<PathBuf>) -> ! {
    init::early();
    // A Unix socket is bound before the mounts: its directory may lie under /tmp or
    // /run, which PID 1 covers with fresh tmpfs (the listener outlives the path).
    let unix_listener = unix.map(|path| {
        let listen = Listen::Unix(path);
        bind(&listen).map(|fd| (listen, fd))
    });
    init::mount_all();
    let (cfg, warnings) = cmdline::parse(&init::kernel_cmdline());
    for w in warnings {
        log!("{w}");
    }
    init::configure(&cfg.hostname);
    let refusal = match &cfg.share_error {
        Some(e) => Some(shares::SharesError::BadList(e.clone())),
        None => shares::set_up(&cfg.links, &cfg.mounts).err(),
    }
    .map(|e| error_chain(&e));
    if let Some(msg) = &refusal {
        log!("{msg}; refusing to run commands");
    }
    let cgroups = match CgroupRoot::open(Path::new(init::CGROUP_ROOT)) {
        Ok(root) => Some(root),
        Err(e) => {
            log!("no per-exec cgroups: {}", error_chain(&e));
            None
        }
    };
    let ctx = SpawnContext {
        cgroups,
        reset_oom_score: true,
        is_root: true,
        extra_env: exec::hypervisor_env(),
        applets: exec::image_applets(),
    };
    let opts = Options {
        stop_on_disconnect: cfg.poweroff_on_disconnect,
        pid1: true,
        max_frame: proto::DEFAULT_MAX_FRAME,
        agent_version: VERSION.into(),
        refusal,
        accept_setup: true,
    };
    let bench_poweroff = cfg.bench_poweroff;
    let served = std::panic::catch_unwind(move || {
        let (listen, listener) = match unix_listener {
            Some(bound) => bound?,
            None => {
                let listen = Listen::Vsock(cfg.port);
                let fd = bind(&listen)?;
                (listen, fd)
            }
        };
        log!("ready on {listen} (protocol {})", proto::PROTOCOL_VERSION);
        let mut server = Server::new(listener, ctx, opts)
            .map_err(|e| format!("cannot start the event loop: {e}"))?;
        if let Some(port) = cfg.proxy_port {
            start_forwarder(&mut server, port, None);
        }
        init::boot_stage(proto::STAGE_AGENT_READY);
        if bench_poweroff {
            log!("mxc.bench_poweroff: powering off at ready");
            init::power_off();
        }
        Ok::<StopReason, String>(server.run())
    });
    match served {
        Ok(Ok(reason)) => log!("stopping: {reason}"),
        Ok(Err(msg)) => log!("{msg}"),
        Err(_) => log!("the agent panicked"),
    }
    init::power_off()
}

/// A normal process serving one socket; returns the exit code.
fn run_process(args: &Args) -> i32 {
    sys::ensure_std_fds();
    let listener = match bind(&args.listen) {
        Ok(l) => l,
        Err(msg) => {
            log!("{msg}");
            return 1;
        }
    };
    log!(
        "ready on {} (protocol {})",
        args.listen,
        proto::PROTOCOL_VERSION
    );
    if let Err(e) = sys::set_child_subreaper() {
        log!("cannot become a child subreaper: {e}");
    }
    let cgroups = match args.cgroup.as_deref().map(CgroupRoot::open).transpose() {
        Ok(root) => root,
        Err(e) => {
            log!("{}", error_chain(&e));
            return 1;
        }
    };
    let ctx = SpawnContext {
        cgroups,
        reset_oom_score: false,
        is_root: sys::is_root(),
        extra_env: Vec::new(),
        applets: Vec::new(),
    };
    let opts = Options {
        stop_on_disconnect: args.exit_on_disconnect,
        pid1: false,
        max_frame: proto::DEFAULT_MAX_FRAME,
        agent_version: VERSION.into(),
        refusal: None,
        accept_setup: false,
    };
    let reason = match Server::new(listener, ctx, opts) {
        Ok(mut server) => {
            if let Some(port) = args.proxy_port {
                start_forwarder(&mut server, port, args.proxy_unix.clone());
            }
            server.run()
        }
        Err(e) => StopReason::Failed(e),
    };
    if let Listen::Unix(path) = &args.listen {
        let _ = std::fs::remove_file(path);
    }
    log!("stopping: {reason}");
    match reason {
        StopReason::Failed(_) => 1,
        _ => 0,
    }
}

/// Starts the network proxy relay on 127.0.0.1:`port`, to the host proxy over vsock
/// (or to `unix`). Without it the guest simply has no way out, so a failure is logged
/// and the agent carries on.
fn start_forwarder(server: &mut Server, port: u16, unix: Option<PathBuf>) {
    let target = match unix {
        Some(path) => sys::StreamTarget::Unix(path),
        None => sys::StreamTarget::Vsock {
            cid: proto::HOST_CID,
            port: proto::PROXY_VSOCK_PORT,
        },
    };
    let shown = format!("{target:?}");
    let started = Forwarder::bind(port, target).and_then(|f| {
        let bound = f.port();
        server.add_forwarder(f).map(|()| bound)
    });
    match started {
        Ok(bound) => log!("network proxy relay on 127.0.0.1:{bound} to {shown}"),
        Err(e) => log!("no network proxy relay on 127.0.0.1:{port}: {e}"),
    }
}

fn bind(listen: &Listen) -> Result<OwnedFd, String> {
    match listen {
        Listen::Unix(path) => {
            use std::os::unix::fs::FileTypeExt;
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(path);
            }
            let l = std::os::unix::net::UnixListener::bind(path)
                .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
            l.set_nonblocking(true)
                .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
            Ok(OwnedFd::from(l))
        }
        Listen::Vsock(port) => {
            sys::vsock_listen(*port).map_err(|e| format!("cannot listen on vsock port {port}: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn unix_mode_with_options_parses() {
        let cmd = parse_args(&args(&["--unix", "/tmp/a.sock", "--exit-on-disconnect"])).unwrap();

        assert_eq!(
            cmd,
            Command::Serve(Args {
                listen: Listen::Unix("/tmp/a.sock".into()),
                exit_on_disconnect: true,
                cgroup: None,
                proxy_port: None,
                proxy_unix: None,
            })
        );
    }

    #[test]
    fn vsock_mode_parses_port() {
        let cmd = parse_args(&args(&["--vsock", "1024"])).unwrap();

        assert!(matches!(
            cmd,
            Command::Serve(Args {
                listen: Listen::Vsock(1024),
                ..
            })
        ));
    }

    #[test]
    fn missing_listener_is_an_error() {
        let err = parse_args(&args(&["--exit-on-disconnect"])).unwrap_err();

        assert!(err.contains("--unix"));
    }

    #[test]
    fn missing_value_is_an_error() {
        let err = parse_args(&args(&["--unix"])).unwrap_err();

        assert_eq!(err, "--unix needs a value");
    }

    #[test]
    fn unknown_argument_is_an_error() {
        let err = parse_args(&args(&["--frob"])).unwrap_err();

        assert_eq!(err, "unknown argument \"--frob\"");
    }

    #[test]
    fn proxy_relay_options_parse() {
        let cmd = parse_args(&args(&[
            "--unix",
            "/tmp/a.sock",
            "--proxy-port",
            "3128",
            "--proxy-unix",
            "/tmp/p.sock",
        ]))
        .unwrap();

        assert!(matches!(
            cmd,
            Command::Serve(Args {
                proxy_port: Some(3128),
                proxy_unix: Some(ref p),
                ..
            }) if p == Path::new("/tmp/p.sock")
        ));
    }

    #[test]
    fn a_proxy_unix_path_without_a_port_is_an_error() {
        let err = parse_args(&args(&["--unix", "/a", "--proxy-unix", "/p"])).unwrap_err();

        assert_eq!(err, "--proxy-unix needs --proxy-port");
    }

    #[test]
    fn a_bad_proxy_port_is_an_error() {
        let err = parse_args(&args(&["--unix", "/a", "--proxy-port", "0"])).unwrap_err();

        assert_eq!(err, "bad proxy port \"0\"");
    }

    #[test]
    fn pid1_takes_only_the_unix_path_from_its_arguments() {
        let path = pid1_unix_path(&args(&["quiet", "--unix", "/run/a.sock", "--frob"]));

        assert_eq!(path, Some(PathBuf::from("/run/a.sock")));
    }

    #[test]
    fn pid1_without_unix_argument_uses_vsock() {
        assert_eq!(pid1_unix_path(&args(&["--unix"])), None);
    }

    #[test]
    fn error_chain_joins_causes() {
        let err = cgroup::CgroupError::NotCgroup {
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };

        let text = error_chain(&err);

        assert!(text.starts_with("/x is not a usable cgroup v2 directory: No such file"));
    }
}

//! The `microvm` backend: our VMM (`mxc-vmm`, a separate process) boots our guest
//! kernel and initramfs; the guest agent (PID 1) runs each command and streams its output
//! over virtio-vsock, reached through the VMM's hybrid-vsock Unix socket.
//!
//! Files: the policy's file view and the guest's system view become virtio-fs shares
//! that the VMM serves with the policy enforced on the host; the agent mounts them before
//! it reports ready (see [`shares`]).
//!
//! Lifecycle: provision = shares planned (what cannot be enforced is refused here),
//! image ready (built on first use) and a private runtime directory; start = VMM process spawned and the agent answering; exec = one vsock
//! connection per command; stop = the agent powers the guest off (the VMM is killed if
//! it does not); deprovision = nothing left (no process, socket or file).
//!
//! Network: the guest has no network device; a policy that lets anything out gets the
//! sandbox's policy proxy on the host, reached through the guest agent's relay over
//! vsock (see `net.rs` for the route and how allow-all is handled).

mod boot_failure;
mod net;
mod pool;
pub mod shares;
mod vmm_process;

use std::cell::RefCell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use proto::client::{AgentClient, ExecIo as AgentIo};
use proto::{Exec, Rlimits};

use crate::output::{ExecIo, Limiter, StdinMode, StreamKind};
use crate::{Backend, ExecOutcome, ExecRequest, ExitKind, SandboxError, SandboxSpec};

pub use pool::{PoolOptions, PoolStatus, WarmPool};
pub use shares::{never_shared, GuestFiles, SharesError, SystemView};
pub use vmm_process::{vmm_command, vmm_main, vmm_program, VmmFiles, VMM_ARG, VMM_BINARY};

type Client = AgentClient<std::os::unix::net::UnixStream, std::os::unix::net::UnixStream>;

/// Virtio-fs slots of a VM that starts from (or makes) a ready snapshot: a policy with
/// more shared directories boots instead.
pub const SHARE_SLOTS: u8 = 8;

/// Guest RAM when the policy sets no memory limit. Under kvm_pvm every page the guest
/// touches for the first time costs milliseconds, so keep the default modest.
pub const DEFAULT_MEM_MIB: u64 = 256;
/// How long the guest may take to boot to a ready agent under `kvm_pvm` (a boot takes
/// about a minute there; ten on a busy host).
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// The same on hardware KVM, where a boot takes well under a second on bare metal and
/// seconds in a nested or emulated host.
pub const DEFAULT_BOOT_TIMEOUT_HARDWARE: Duration = Duration::from_secs(60);

/// The boot timeout for this host's KVM flavour.
pub fn default_boot_timeout() -> Duration {
    if vmm::hypervisor::host_flavour().is_hardware() {
        DEFAULT_BOOT_TIMEOUT_HARDWARE
    } else {
        DEFAULT_BOOT_TIMEOUT
    }
}

/// The guest console log in the runtime directory (when `--console` is off).
const CONSOLE_LOG: &str = "console.log";
/// Extra time the host waits past an exec's timeout for the agent's own kill to report.
const TIMEOUT_GRACE: Duration = Duration::from_secs(30);

/// Image build progress callback.
pub type ProgressFn = Box<dyn FnMut(guest_image::Progress) + Send>;

/// Options of the microVM backend that are not part of the policy.
#[derive(Default)]
pub struct MicrovmOptions {
    /// Use this kernel instead of the built image's.
    pub kernel: Option<PathBuf>,
    /// Use this initramfs instead of the built image's.
    pub initrd: Option<PathBuf>,
    /// Show the guest's serial console on stdout.
    pub console: bool,
    /// Image build options (cache directory, agent binary, …).
    pub image: guest_image::BuildOptions,
    /// Called while the image is being built.
    pub progress: Option<ProgressFn>,
    /// Boot timeout; default [`default_boot_timeout`].
    pub boot_timeout: Option<Duration>,
    /// Put the whole guest console into a boot failure's message (not just its tail).
    pub verbose: bool,
    /// The mxc-vm executable whose VMM runs the VM: `mxc-vmm` beside it when it is there,
    /// else it with `__vmm` (default: this executable, which must then call
    /// [`crate::init_hook`]; tests and other embedders point it at `mxc-vm`).
    pub vmm_binary: Option<PathBuf>,
    /// The read-only system directories the guest gets (default: the host's).
    pub system: SystemView,
    /// Boot the kernel even where a ready snapshot would do (`run --cold`).
    pub cold: bool,
    /// `start` boots to the agent's Ready, saves this VM's ready snapshot and stops
    /// the VM instead of serving commands (`mxc-vm image build`).
    pub save_ready_snapshot: bool,
    /// Told, in one line, why a VM that could start from a snapshot boots instead.
    pub notice: Option<NoticeFn>,
    /// Take the VM from this warm pool when it has one of this VM's shape waiting
    /// (otherwise start one as usual).
    pub pool: Option<WarmPool>,
}

/// Receives one-line notices (e.g. why a VM boots cold).
pub type NoticeFn = Box<dyn FnMut(String) + Send>;

impl std::fmt::Debug for MicrovmOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicrovmOptions")
            .field("kernel", &self.kernel)
            .field("initrd", &self.initrd)
            .field("console", &self.console)
            .finish_non_exhaustive()
    }
}

/// Timestamps of one VM's life, for `mxc-vm bench boot`.
#[derive(Debug, Clone, Default)]
pub struct HostTimeline {
    /// When `start()` spawned the VMM.
    pub spawned: Option<Instant>,
    /// When the agent answered the handshake.
    pub agent_ready: Option<Instant>,
    /// When the first output chunk of the first exec arrived.
    pub first_output: Option<Instant>,
    /// When the VMM process was gone.
    pub vm_gone: Option<Instant>,
    /// The VM started from its ready snapshot instead of booting.
    pub restored: bool,
    /// Where the VM's ready snapshot is (or would be), when it can have one.
    pub snapshot: Option<PathBuf>,
    /// The VM came from a warm pool (restored before this backend asked for it).
    pub pooled: bool,
}

#[derive(Debug)]
pub struct MicrovmBackend {
    opts: MicrovmOptions,
    spec: Option<SandboxSpec>,
    /// The guest's shares, planned at provision.
    files: GuestFiles,
    runtime: Option<PathBuf>,
    vmm: Option<vmm_process::VmmProcess>,
    /// The first agent connection, held for the VM's lifetime: the agent powers the
    /// guest off when it closes (so a dead host never leaves a VM behind).
    control: Option<Client>,
    /// The sandbox's network policy proxy, if the policy lets anything out.
    net: net::VmNet,
    /// Host-side timestamps of this VM.
    pub timeline: HostTimeline,
    /// The VMM's own report (boot stages), once it has exited.
    pub report: Option<vmm::VmExitReport>,
    /// This VM is for a warm pool: restored, with its VMM's control socket, and left
    /// without shares or setup until a backend adopts it.
    pooled: bool,
    /// The caller named no kernel or initramfs: the VM boots the image's (`provision`
    /// fills `opts.kernel` and `opts.initrd` in either way).
    image_kernel: bool,
}

impl MicrovmBackend {
    pub fn new(opts: MicrovmOptions) -> Self {
        Self {
            image_kernel: opts.kernel.is_none() && opts.initrd.is_none(),
            opts,
            spec: None,
            files: GuestFiles::default(),
            runtime: None,
            vmm: None,
            control: None,
            net: net::VmNet::default(),
            timeline: HostTimeline::default(),
            report: None,
            pooled: false,
        }
    }

    /// The VMM process's id while the VM runs (`mxc-vm bench boot` samples its RSS).
    pub fn vmm_pid(&self) -> Option<u32> {
        self.vmm.as_ref().and_then(|v| u32::try_from(v.pid()).ok())
    }

    fn socket(&self) -> Result<PathBuf, SandboxError> {
        self.runtime
            .as_ref()
            .map(|r| r.join("vsock.sock"))
            .ok_or(SandboxError::Lifecycle("the VM is not provisioned"))
    }

    /// A connection to the agent, after the handshake.
    fn connect(&self) -> Result<Client, String> {
        self.try_connect().map_err(ConnectFailure::into_message)
    }

    /// What running a command needs, copied out of the started VM.
    fn agent_exec(&self) -> Result<AgentExec, SandboxError> {
        let Some(spec) = &self.spec else {
            return Err(SandboxError::Lifecycle("exec before provision"));
        };
        let Some(vmm) = &self.vmm else {
            return Err(SandboxError::Lifecycle("exec before start"));
        };
        Ok(AgentExec {
            socket: self.socket()?,
            proxy_port: self.net.port,
            default_cwd: self.files.default_cwd.clone(),
            nproc: spec.policy.limits.pids.map(u64::from),
            root: spec.policy.process.guest_root,
            vmm_pid: vmm.pid(),
        })
    }

    /// Like [`Self::connect`], telling an agent that refuses to serve (the guest could not
    /// be set up, e.g. a share did not mount) from one that is not there yet.
    fn try_connect(&self) -> Result<Client, ConnectFailure> {
        let socket = self.socket().map_err(|e| e.to_string())?;
        connect_agent(&socket)
    }

    fn image_paths(&mut self) -> Result<(PathBuf, PathBuf), SandboxError> {
        if let (Some(k), Some(i)) = (&self.opts.kernel, &self.opts.initrd) {
            return Ok((k.clone(), i.clone()));
        }
        let image = match guest_image::cached(&self.opts.image) {
            Some(image) => image,
            None => {
                let mut noop = |_p: guest_image::Progress| {};
                let progress: &mut dyn FnMut(guest_image::Progress) = match &mut self.opts.progress
                {
                    Some(p) => p,
                    None => &mut noop,
                };
                guest_image::build(&self.opts.image, progress).map_err(|e| {
                    SandboxError::Unavailable {
                        backend: "microvm",
                        reason: format!(
                            "the guest image cannot be built: {}",
                            crate::error_chain(&e)
                        ),
                    }
                })?
            }
        };
        Ok((
            self.opts.kernel.clone().unwrap_or(image.vmlinux),
            self.opts.initrd.clone().unwrap_or(image.initramfs),
        ))
    }
}

impl MicrovmBackend {
    /// Decide how this VM starts: save its ready snapshot (`save_ready_snapshot`),
    /// restore from it, or boot (with a notice saying why, when a snapshot could have
    /// been used). A VM that uses a snapshot is configured with share slots instead of
    /// its shares on the command line (see [`SHARE_SLOTS`]).
    fn plan_snapshot(
        &mut self,
        config: &mut vmm::VmConfig,
        runtime: &Path,
    ) -> Result<Start, SandboxError> {
        let planned = self.slot_config(config, runtime).and_then(|slotted| {
            let (dir, identity) = self.ready_snapshot_dir(&slotted)?;
            Ok((slotted, dir, identity))
        });
        if self.opts.save_ready_snapshot {
            let (mut slotted, dir, identity) =
                planned.map_err(|why| SandboxError::Unenforceable {
                    backend: "microvm",
                    what: format!("a ready snapshot of this VM: {why}"),
                })?;
            self.timeline.snapshot = Some(dir.clone());
            if vmm::snapshot::check(&dir, &identity).is_ok() {
                return Ok(Start::SnapshotUpToDate);
            }
            make_placeholder(&slotted)?;
            slotted.snapshot = Some(vmm::SnapshotMode::SaveAtReady(dir));
            *config = slotted;
            return Ok(Start::Save);
        }
        if self.opts.cold {
            return Ok(Start::Boot);
        }
        let (mut slotted, dir, identity) = match planned {
            Ok(planned) => planned,
            Err(why) => {
                self.notify(format!("booting the guest kernel: {why}"));
                return Ok(Start::Boot);
            }
        };
        self.timeline.snapshot = Some(dir.clone());
        if !dir.join(vmm::snapshot::STATE_FILE).exists() {
            // `image build` makes the snapshot of the default VM (the image's kernel and
            // initramfs, 256 MiB, 1 vCPU, no console); a VM of another shape boots
            // without a word once some snapshot exists. The default VM says so always:
            // its snapshot is missing because none was made, or because this mxc-vm
            // (its VMM, kernel command line or image) differs from the one that made the
            // snapshots there are.
            let none_made = dir
                .parent()
                .and_then(|all| std::fs::read_dir(all).ok())
                .is_none_or(|mut entries| entries.next().is_none());
            let default_shape = u64::from(slotted.mem_mib) == DEFAULT_MEM_MIB
                && slotted.vcpus == 1
                && !self.opts.console
                && self.image_kernel;
            let line = if none_made {
                "booting the guest kernel: no ready snapshot has been made \
                 (`mxc-vm image build` makes one)"
            } else {
                "booting the guest kernel: no ready snapshot for this version of mxc-vm \
                 and its image (`mxc-vm image build` makes one)"
            };
            if none_made || default_shape {
                self.notify(line.into());
            } else {
                tracing::info!("{line} for a VM of this shape");
            }
            return Ok(Start::Boot);
        }
        match vmm::snapshot::check(&dir, &identity).map_err(|e| crate::error_chain(&e)) {
            Ok(_) => {
                make_placeholder(&slotted)?;
                slotted.snapshot = Some(vmm::SnapshotMode::Restore(dir));
                *config = slotted;
                self.timeline.restored = true;
            }
            Err(why) => self.notify(format!(
                "booting the guest kernel: the ready snapshot cannot be used ({why}); \
                 `mxc-vm image build` makes a new one"
            )),
        }
        Ok(Start::Boot)
    }

    /// `config` as a VM that uses a snapshot has it: the same guest, with its shares in
    /// [`SHARE_SLOTS`] virtio-fs slots (the rest serving an empty directory) and nothing
    /// policy-specific on the kernel command line (the agent gets the links and mounts
    /// after the restore; the proxy relay always listens, and only reaches the host
    /// where the policy lets something out).
    fn slot_config(&self, config: &vmm::VmConfig, runtime: &Path) -> Result<vmm::VmConfig, String> {
        if config.shares.len() > usize::from(SHARE_SLOTS) {
            return Err(format!(
                "its {} shared directories are more than a snapshot's {SHARE_SLOTS} slots",
                config.shares.len()
            ));
        }
        let console = if self.opts.console {
            guest_image::GuestConsole::Shown
        } else {
            guest_image::GuestConsole::Logged
        };
        let mut slotted = config.clone();
        slotted.cmdline_extra = format!(
            "{} mxc.port={}{}",
            guest_image::kernel_cmdline(console, false),
            proto::AGENT_VSOCK_PORT,
            net::VmNet::relay_cmdline()
        );
        slotted.share_slots = SHARE_SLOTS;
        slotted.share_placeholder = Some(runtime.join("empty"));
        Ok(slotted)
    }

    /// Where the ready snapshot of a VM configured as `config` lives: in the image
    /// cache, named by what it is made from.
    fn ready_snapshot_dir(
        &self,
        config: &vmm::VmConfig,
    ) -> Result<(PathBuf, vmm::snapshot::Identity), String> {
        let identity = vmm::snapshot_identity_for(config).map_err(|e| crate::error_chain(&e))?;
        let cache = guest_image::cache_dir(&self.opts.image).map_err(|e| e.to_string())?;
        Ok((cache.join("snapshots").join(identity.key()), identity))
    }

    /// Tell the agent of a VM that started without its policy (restored, `which`) the
    /// links and mounts of this backend's files.
    fn send_setup(&self, client: &mut Client, which: &str) -> Result<(), SandboxError> {
        let (links, mounts) = self
            .files
            .encoded()
            .map_err(|e| SandboxError::setup("shares", e))?;
        client
            .setup(&links, &mounts)
            .map_err(|e| SandboxError::Setup {
                stage: "guest setup".into(),
                message: format!(
                    "the {which} guest could not set up its files: {}",
                    crate::error_chain(&e)
                ),
            })
    }

    fn notify(&mut self, line: String) {
        match &mut self.opts.notice {
            Some(notice) => notice(line),
            None => tracing::info!("{line}"),
        }
    }
}

/// 32 bytes from the host kernel's generator, for the guest's.
fn host_entropy() -> Result<Vec<u8>, SandboxError> {
    let mut bytes = vec![0u8; 32];
    let mut filled = 0;
    while filled < bytes.len() {
        let rest = bytes.get_mut(filled..).unwrap_or_default();
        // SAFETY: `rest` is a live, writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(SandboxError::io("reading the host's random generator", e));
        }
        filled += n as usize;
    }
    Ok(bytes)
}

/// The host's wall-clock time in nanoseconds since the epoch.
fn wall_clock_ns() -> Option<u64> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_nanos()).ok())
}

/// Create the empty directory a snapshot VM's unused share slots serve.
fn make_placeholder(config: &vmm::VmConfig) -> Result<(), SandboxError> {
    let Some(dir) = &config.share_placeholder else {
        return Ok(());
    };
    match std::fs::DirBuilder::new().mode(0o555).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(SandboxError::io(format!("creating {}", dir.display()), e))
        }
        _ => Ok(()),
    }
}

/// How `start` goes on once the snapshot is planned.
enum Start {
    /// Boot the kernel or restore the snapshot (as the config now says), then serve.
    Boot,
    /// Boot to Ready and save the ready snapshot.
    Save,
    /// `save_ready_snapshot`, and the snapshot is already there and usable: nothing runs.
    SnapshotUpToDate,
}

/// Why a connection to the agent failed.
#[derive(Debug)]
enum ConnectFailure {
    /// The agent answered with an error instead of `Ready`: it will not serve.
    Refused(String),
    /// Not (yet) reachable.
    Other(String),
}

impl From<String> for ConnectFailure {
    fn from(message: String) -> Self {
        Self::Other(message)
    }
}

impl ConnectFailure {
    fn into_message(self) -> String {
        match self {
            Self::Refused(m) => format!("the guest agent refused to serve: {m}"),
            Self::Other(m) => m,
        }
    }
}

/// Refuse what this backend cannot enforce, and plan the shares for what it can. (The
/// network always goes through the host's policy proxy, see `net.rs`.)
fn check_enforceable(spec: &SandboxSpec, system: &SystemView) -> Result<GuestFiles, SandboxError> {
    let host_cwd = std::env::current_dir().ok();
    shares::plan(&spec.view, system, host_cwd.as_deref()).map_err(|e| SandboxError::Unenforceable {
        backend: "microvm",
        what: format!("the file view: {e}"),
    })
}

/// A private directory for the VM's sockets and logs.
fn make_runtime_dir(id: &str) -> Result<PathBuf, SandboxError> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    sweep_stale_runtime_dirs(&base);
    let dir = base.join(format!("mxc-vm-{id}"));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| SandboxError::io(format!("creating {}", dir.display()), e))?;
    Ok(dir)
}

use std::os::unix::fs::DirBuilderExt;

/// Remove the runtime directories of runs whose mxc-vm process is gone (killed with
/// SIGKILL, or a crash): `mxc-vm-<pid>-<hex>` in `base`, ours, with no process `<pid>`.
/// Returns how many were removed.
fn sweep_stale_runtime_dirs(base: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(base) else {
        return 0;
    };
    // SAFETY: geteuid() has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("mxc-vm-"))
            .and_then(|rest| rest.split_once('-'))
            .filter(|(_, tag)| !tag.is_empty() && tag.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let ours = entry
            .path()
            .symlink_metadata()
            .is_ok_and(|m| m.is_dir() && m.uid() == uid);
        if ours
            && !Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::remove_dir_all(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

impl MicrovmBackend {
    /// The config of the VMM [`Backend::start`] spawns for the provisioned spec, how it
    /// goes on (boot or restore, save the ready snapshot, or nothing to do), and the
    /// runtime directory the VMM's files live in.
    fn vmm_config(&mut self) -> Result<(vmm::VmConfig, Start, PathBuf), SandboxError> {
        let (Some(spec), Some(runtime), Some(kernel), Some(initrd)) = (
            &self.spec,
            &self.runtime,
            &self.opts.kernel,
            &self.opts.initrd,
        ) else {
            return Err(SandboxError::Lifecycle("start before provision"));
        };
        let limits = &spec.policy.limits;
        let mem_mib = limits.memory_mib.unwrap_or(DEFAULT_MEM_MIB);
        let mut config = vmm::VmConfig::new(
            kernel.clone(),
            u32::try_from(mem_mib).unwrap_or(u32::MAX),
            u8::try_from(limits.vcpus.unwrap_or(1)).unwrap_or(u8::MAX),
        );
        config.initrd = Some(initrd.clone());
        let mounts = self
            .files
            .cmdline()
            .map_err(|e| SandboxError::setup("shares", e))?;
        let console = if self.opts.console {
            guest_image::GuestConsole::Shown
        } else {
            guest_image::GuestConsole::Logged
        };
        config.cmdline_extra = format!(
            "{} mxc.port={}{} {mounts}",
            guest_image::kernel_cmdline(console, false),
            proto::AGENT_VSOCK_PORT,
            self.net.cmdline()
        );
        config.shares = self.files.shares.clone();
        config.share_run_as = shares::sudo_user();
        // Commands run as `nobody` unless the policy asks for root in the guest: the
        // shares then show the server's own files as nobody's, so nobody may write where
        // the policy lets the sandbox write.
        config.share_guest_owner = (!spec.policy.process.guest_root).then_some(proto::GUEST_USER);
        config.share_write_limit = spec.policy.limits.disk_mib.map(|m| m << 20);
        config.pvm_cmdline = guest_image::KERNEL_CMDLINE_PVM.to_string();
        // Without --console the guest's warnings and the agent's lines are kept (capped
        // by the VMM) for a boot failure's message.
        let console_log = runtime.join(CONSOLE_LOG);
        config.console = if self.opts.console {
            vmm::ConsoleMode::Stdout
        } else {
            vmm::ConsoleMode::File(console_log.clone())
        };
        config.vsock = Some(vmm::VsockConfig {
            guest_cid: proto::GUEST_CID,
            uds_path: runtime.join("vsock.sock"),
        });
        let runtime = runtime.clone();
        let plan = self.plan_snapshot(&mut config, &runtime)?;
        Ok((config, plan, runtime))
    }

    /// The config of the VMM that [`Backend::start`] would spawn to restore this VM from
    /// the ready snapshot, and the runtime directory it lives in; `None` when `start`
    /// would boot the kernel instead (`cold`, no usable snapshot: the line saying why has
    /// been printed). After `provision`; for benchmarks that spawn and time the VMM
    /// themselves (`bench boot --snapshot --until first-entry`).
    pub fn restore_config(&mut self) -> Result<Option<(vmm::VmConfig, PathBuf)>, SandboxError> {
        let (config, _, runtime) = self.vmm_config()?;
        let restoring = matches!(config.snapshot, Some(vmm::SnapshotMode::Restore(_)));
        Ok(restoring.then_some((config, runtime)))
    }

    /// Spawn the VMM with `config`, its files in `runtime`, and wait for its agent's
    /// Ready (or, `saving`, for the VMM to save the ready snapshot and end).
    fn spawn_vmm(
        &mut self,
        mut config: vmm::VmConfig,
        runtime: PathBuf,
        saving: bool,
    ) -> Result<(), SandboxError> {
        let console_log = runtime.join(CONSOLE_LOG);
        if let Some(pool) = &self.opts.pool {
            let warm = match (self.timeline.restored, &config.snapshot) {
                (true, Some(vmm::SnapshotMode::Restore(dir))) => pool.take(dir),
                // Another shape, or --cold: the pool's VMs do not fit.
                _ => None,
            };
            match warm {
                Some(warm) => return self.adopt(warm),
                None => pool.missed(),
            }
        }
        if self.pooled {
            if !self.timeline.restored {
                return Err(SandboxError::Unavailable {
                    backend: "microvm",
                    reason: "a warm pool restores its VMs from the ready snapshot, and there \
                             is none for them (`mxc-vm image build` makes it)"
                        .into(),
                });
            }
            // Its shares come when a backend adopts it.
            config.shares.clear();
            config.control_socket = Some(runtime.join(pool::CONTROL_SOCKET));
        }
        // The proxy listens before the guest can try to reach it.
        self.net.start(&runtime.join("vsock.sock"))?;
        self.timeline.spawned = Some(Instant::now());
        let process = vmm_process::VmmProcess::spawn(
            &config,
            &runtime,
            self.opts.console,
            self.opts.vmm_binary.as_deref(),
        )?;
        self.vmm = Some(process);
        let console_log = (!self.opts.console).then_some(console_log);

        let boot_timeout = self.opts.boot_timeout.unwrap_or_else(default_boot_timeout);
        let deadline = Instant::now() + boot_timeout;
        // A refused try costs the guest kernel milliseconds of emulated work under
        // kvm_pvm but microseconds on hardware KVM, where a boot takes tens of ms.
        let poll = if vmm::PvmMode::Auto.enabled() {
            Duration::from_millis(50)
        } else {
            Duration::from_millis(2)
        };
        let mut last_error: Option<String> = None;
        let verbose = self.opts.verbose;
        let explain = |what: String, report: Option<&vmm::VmExitReport>, last: Option<&str>| {
            let failure = boot_failure::BootFailure {
                what,
                report,
                last_error: last,
                console: console_log.as_deref(),
                verbose,
            };
            SandboxError::Setup {
                stage: "boot".into(),
                message: failure.message(),
            }
        };
        loop {
            if let Some(vmm) = &mut self.vmm {
                if let Some(early) = vmm.exited_early() {
                    let saved = early
                        .report
                        .as_ref()
                        .is_some_and(|r| r.reason == vmm::ExitReason::Saved);
                    if saving && saved {
                        self.report = early.report;
                        self.vmm = None;
                        // What older builds made of this VM can never be restored now.
                        if let Some(dir) = &self.timeline.snapshot {
                            for gone in vmm::snapshot::prune_superseded(dir) {
                                tracing::info!("removed the stale snapshot {}", gone.display());
                            }
                        }
                        return Ok(());
                    }
                    let error = explain(early.what, early.report.as_ref(), last_error.as_deref());
                    self.report = early.report;
                    return Err(error);
                }
            }
            // While a snapshot is being made nothing connects: the VM is saved with no
            // connection open.
            if !saving && self.socket()?.exists() {
                match self.try_connect() {
                    Ok(mut client) => {
                        if self.timeline.restored && !self.pooled {
                            // The restored guest mounts its shares now.
                            self.send_setup(&mut client, "restored")?;
                        }
                        self.control = Some(client);
                        self.timeline.agent_ready = Some(Instant::now());
                        return Ok(());
                    }
                    Err(refused @ ConnectFailure::Refused(_)) => {
                        return Err(SandboxError::Setup {
                            stage: "guest setup".into(),
                            message: refused.into_message(),
                        })
                    }
                    Err(ConnectFailure::Other(e)) => last_error = Some(e),
                }
            }
            if let Some(signal) = crate::interrupt::taken() {
                return Err(SandboxError::Interrupted { signal });
            }
            if Instant::now() >= deadline {
                // Stop the VMM so that it reports how far the boot got.
                let report = self
                    .vmm
                    .as_mut()
                    .and_then(|v| v.terminate(Duration::from_secs(5)));
                let what = format!(
                    "the guest agent did not send Ready within {} (--boot-timeout)",
                    policy::format_duration(boot_timeout)
                );
                let error = explain(what, report.as_ref(), last_error.as_deref());
                self.report = report;
                return Err(error);
            }
            std::thread::sleep(poll);
        }
    }
}

impl Backend for MicrovmBackend {
    fn name(&self) -> &'static str {
        "microvm"
    }

    /// The VMM: the VM and every exec in it end with it.
    fn root_pid(&self) -> Option<u32> {
        self.vmm.as_ref().and_then(|v| u32::try_from(v.pid()).ok())
    }

    fn provision(&mut self, spec: &SandboxSpec) -> Result<(), SandboxError> {
        vmm_process::prepare_vmm_namespaces();
        self.files = check_enforceable(spec, &self.opts.system)?;
        crate::host::kvm_kind().map_err(|reason| SandboxError::Unavailable {
            backend: "microvm",
            reason,
        })?;
        let (kernel, initrd) = self.image_paths()?;
        for p in [&kernel, &initrd] {
            if !p.is_file() {
                return Err(SandboxError::Unavailable {
                    backend: "microvm",
                    reason: format!("{} does not exist", p.display()),
                });
            }
        }
        let network = net::VmNet::provision(spec)?;
        let runtime = make_runtime_dir(&spec.id)?;
        self.net = network;
        self.runtime = Some(runtime);
        self.spec = Some(spec.clone());
        // Absolute, as the VMM (jailed, its working directory is its own root) and the
        // snapshot it may start from name them.
        let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        self.opts.kernel = Some(absolute(kernel));
        self.opts.initrd = Some(absolute(initrd));
        Ok(())
    }

    fn start(&mut self) -> Result<(), SandboxError> {
        let (config, plan, runtime) = self.vmm_config()?;
        let saving = match plan {
            Start::SnapshotUpToDate => return Ok(()),
            Start::Save => true,
            Start::Boot => false,
        };
        self.spawn_vmm(config, runtime, saving)
    }

    fn exec(
        &mut self,
        req: &ExecRequest,
        io: &mut ExecIo<'_>,
    ) -> Result<ExecOutcome, SandboxError> {
        let agent = self.agent_exec()?;
        agent.run(req, io, &mut self.timeline.first_output)
    }

    fn shared_exec(&self) -> Option<std::sync::Arc<dyn crate::SharedExec>> {
        self.agent_exec()
            .ok()
            .map(|a| std::sync::Arc::new(a) as std::sync::Arc<dyn crate::SharedExec>)
    }

    fn stop(&mut self) -> Result<(), SandboxError> {
        let Some(mut vmm) = self.vmm.take() else {
            return Ok(());
        };
        match self.control.take() {
            Some(client) => {
                let _ = client.shutdown();
            }
            None => {
                if let Ok(client) = self.connect() {
                    let _ = client.shutdown();
                }
            }
        }
        self.report = vmm.wait_or_kill(Duration::from_secs(20));
        self.timeline.vm_gone = Some(Instant::now());
        self.net.stop();
        Ok(())
    }

    fn deprovision(&mut self) -> Result<(), SandboxError> {
        self.control = None;
        if let Some(mut vmm) = self.vmm.take() {
            self.report = vmm.wait_or_kill(Duration::ZERO);
            self.timeline.vm_gone = Some(Instant::now());
        }
        self.net.stop();
        self.net = net::VmNet::default();
        if let Some(dir) = self.runtime.take() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| SandboxError::io(format!("removing {}", dir.display()), e))?;
        }
        self.spec = None;
        self.files = GuestFiles::default();
        Ok(())
    }
}

impl Drop for MicrovmBackend {
    fn drop(&mut self) {
        let _ = self.deprovision();
    }
}

/// A connection to the agent behind the VM's vsock socket, after the handshake.
fn connect_agent(socket: &Path) -> Result<Client, ConnectFailure> {
    // Neither the vsock handshake nor the agent's Ready may hang us.
    let stream = proto::client::connect_hybrid_vsock_within(
        socket,
        proto::AGENT_VSOCK_PORT,
        Some(Duration::from_secs(15)),
    )
    .map_err(|e| e.to_string())?;
    let control = stream.try_clone().map_err(|e| e.to_string())?;
    let client = match AgentClient::over_unix(stream) {
        Ok(client) => client,
        Err(proto::client::ClientError::Remote { id: None, message }) => {
            return Err(ConnectFailure::Refused(message))
        }
        Err(e) => return Err(crate::error_chain(&e).into()),
    };
    control.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(client)
}

/// Runs commands over connections of their own to a started VM's agent (one per
/// command, so many may run at once).
#[derive(Debug, Clone)]
struct AgentExec {
    socket: PathBuf,
    proxy_port: Option<u16>,
    default_cwd: Option<PathBuf>,
    nproc: Option<u64>,
    root: bool,
    vmm_pid: i32,
}

impl AgentExec {
    fn run(
        &self,
        req: &ExecRequest,
        io: &mut ExecIo<'_>,
        first_output: &mut Option<Instant>,
    ) -> Result<ExecOutcome, SandboxError> {
        let result = self.run_connected(req, io, first_output);
        // The command is over (or never started): no signal may follow it.
        if let Some(signals) = &io.signals {
            signals.end();
        }
        result
    }

    fn run_connected(
        &self,
        req: &ExecRequest,
        io: &mut ExecIo<'_>,
        first_output: &mut Option<Instant>,
    ) -> Result<ExecOutcome, SandboxError> {
        if req.argv.is_empty() {
            return Err(SandboxError::NoCommand);
        }
        let mut client = connect_agent(&self.socket)
            .map_err(ConnectFailure::into_message)
            .map_err(|message| SandboxError::Setup {
                stage: "agent".into(),
                message,
            })?;
        let env = net::guest_env(self.proxy_port, crate::env::compose_env(&req.env));
        let exec = Exec {
            argv: req.argv.clone(),
            env: env.into_iter().collect(),
            cwd: Some(
                req.cwd
                    .as_ref()
                    .or(self.default_cwd.as_ref())
                    .map_or_else(|| "/".to_string(), |c| c.display().to_string()),
            ),
            timeout_ms: req.timeout.map(|t| t.as_millis() as u64),
            rlimits: Rlimits {
                nproc: self.nproc,
                ..Rlimits::default()
            },
            root: self.root,
            // Every command reseeds the guest's random generator and sets its clock: a
            // VM restored from a snapshot starts with the saved random state and time.
            entropy: host_entropy()?,
            wall_clock_ns: wall_clock_ns(),
            ..Exec::default()
        };
        if let Some(signals) = &io.signals {
            signals.attach(agent_deliverer(client.signaller()));
        }
        let start = Instant::now();
        let writer = ChunkWriter {
            io,
            limiter: Limiter::default(),
            first_output,
        };
        let vmm_pid = self.vmm_pid;
        let kill_vm = move || {
            if vmm_pid > 0 {
                // SAFETY: kill() has no memory effects; the pid is our own child.
                unsafe { libc::kill(vmm_pid, libc::SIGKILL) };
            }
        };
        let (exit, truncated) = run_agent_exec(&mut client, exec, writer, req.timeout, kill_vm)?;
        let kind = match (exit.code, exit.signal) {
            (Some(c), _) => ExitKind::Code(c),
            (None, Some(s)) => ExitKind::Signal(s),
            (None, None) => ExitKind::Code(-1),
        };
        Ok(ExecOutcome {
            exit: kind,
            timed_out: exit.timed_out,
            duration: start.elapsed(),
            output_truncated: truncated,
        })
    }
}

impl crate::SharedExec for AgentExec {
    fn exec(&self, req: &ExecRequest, io: &mut ExecIo<'_>) -> Result<ExecOutcome, SandboxError> {
        self.run(req, io, &mut None)
    }
}

/// Signals through the exec's own agent connection. The agent learns the command only
/// with the `Exec` frame; a signal sent in the moment before it is retried briefly.
fn agent_deliverer(
    signaller: proto::client::Signaller<std::os::unix::net::UnixStream>,
) -> crate::signals::Deliver {
    Box::new(move |signo| match signaller.signal(signo) {
        Ok(true) => Ok(crate::signals::Delivered::Yes),
        Ok(false) => Ok(crate::signals::Delivered::NotYet),
        Err(e) => Err(crate::error_chain(&e)),
    })
}

/// Run one exec over the client: stdout/stderr chunks go to `writer`, stdin is forwarded
/// when the request inherits it. The agent enforces the timeout; if it has not reported
/// a grace period later, `on_hang` (which kills the VM) runs and the exec fails.
fn run_agent_exec(
    client: &mut Client,
    exec: Exec,
    writer: ChunkWriter<'_, '_>,
    timeout: Option<Duration>,
    on_hang: impl FnOnce() + Send + 'static,
) -> Result<(proto::Exit, bool), SandboxError> {
    let stdin = writer.io.stdin;
    let shared = Rc::new(RefCell::new(writer));
    let mut out = KindWriter {
        shared: Rc::clone(&shared),
        kind: StreamKind::Stdout,
    };
    let mut err = KindWriter {
        shared: Rc::clone(&shared),
        kind: StreamKind::Stderr,
    };
    let mut agent_io = AgentIo::new(&mut out, &mut err);
    match stdin {
        StdinMode::Inherit => agent_io = agent_io.with_stdin(Box::new(std::io::stdin())),
        StdinMode::Fd(fd) => {
            // SAFETY: the caller keeps `fd` open for the exec; we only duplicate it.
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            let owned = borrowed
                .try_clone_to_owned()
                .map_err(|e| SandboxError::io("duplicating stdin", e))?;
            agent_io = agent_io.with_stdin(Box::new(std::fs::File::from(owned)));
        }
        StdinMode::Null => {}
    }
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    if let Some(t) = timeout {
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                done_rx.recv_timeout(t + TIMEOUT_GRACE)
            {
                on_hang();
            }
        });
    }
    let result = client.exec(exec, agent_io);
    drop(done_tx);
    let truncated = shared.borrow().limiter.truncated;
    match result {
        Ok(exit) => Ok((exit, truncated)),
        // The agent could not start the program: that is the command's failure (127 not
        // found, 126 otherwise), as on the process tiers, not mxc-vm's.
        Err(proto::client::ClientError::Remote { message, .. }) => {
            let code = if message.contains("No such file or directory") {
                127
            } else {
                126
            };
            let text = format!("mxc-vm: {message}\n");
            let _ = shared
                .borrow_mut()
                .write_chunk(StreamKind::Stderr, text.as_bytes());
            Ok((
                proto::Exit {
                    id: 0,
                    code: Some(code),
                    signal: None,
                    timed_out: false,
                    duration_ms: 0,
                },
                truncated,
            ))
        }
        Err(e) => Err(SandboxError::setup("exec", e)),
    }
}

/// Routes output to the exec's sink (or our own stdout/stderr), applying the limit.
struct ChunkWriter<'a, 'b> {
    io: &'a mut ExecIo<'b>,
    limiter: Limiter,
    first_output: &'a mut Option<Instant>,
}

impl ChunkWriter<'_, '_> {
    fn write_chunk(&mut self, kind: StreamKind, data: &[u8]) -> std::io::Result<()> {
        if self.first_output.is_none() && !data.is_empty() {
            *self.first_output = Some(Instant::now());
        }
        let admitted = self.limiter.admit(self.io.output_limit, data);
        if admitted.is_empty() {
            return Ok(());
        }
        match self.io.sink.as_deref_mut() {
            Some(sink) => sink.chunk(kind, admitted),
            None => match kind {
                StreamKind::Stdout => {
                    let mut o = std::io::stdout().lock();
                    o.write_all(admitted)?;
                    o.flush()
                }
                StreamKind::Stderr => {
                    let mut e = std::io::stderr().lock();
                    e.write_all(admitted)?;
                    e.flush()
                }
            },
        }
    }
}

/// One of the two output streams, sharing the [`ChunkWriter`] (the agent client writes
/// to them one at a time, on the calling thread).
struct KindWriter<'a, 'b> {
    shared: Rc<RefCell<ChunkWriter<'a, 'b>>>,
    kind: StreamKind,
}

impl Write for KindWriter<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.shared.borrow_mut().write_chunk(self.kind, buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Paths a caller may want to show: where the VM keeps its sockets.
pub fn runtime_socket(runtime: &Path) -> PathBuf {
    runtime.join("vsock.sock")
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::{Policy, PolicySource};

    fn spec_with(policy: Policy) -> SandboxSpec {
        SandboxSpec {
            policy,
            view: policy::FsView::default(),
            id: "t".into(),
            net: Default::default(),
        }
    }

    #[test]
    fn network_access_is_enforceable_through_the_proxy() {
        let mut policy = Policy::empty(PolicySource::Cli);
        policy.network.egress.default = policy::Action::Allow;

        assert!(check_enforceable(&spec_with(policy), &SystemView::None).is_ok());
    }

    #[test]
    fn deny_all_without_shares_is_enforceable() {
        let policy = Policy::empty(PolicySource::Cli);
        assert!(check_enforceable(&spec_with(policy), &SystemView::None).is_ok());
    }

    #[test]
    fn stale_runtime_dirs_of_dead_runs_are_swept_and_others_kept() {
        let base = std::env::temp_dir().join(format!("mxc-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        // No process has a pid above the kernel's limit (4194304 at most).
        let dead = base.join("mxc-vm-99999999-0badcafe");
        let alive = base.join(format!("mxc-vm-{}-0badcafe", std::process::id()));
        let other = base.join("mxc-vm-99999999-notours");
        let file = base.join("mxc-vm-99999999-abc");
        for d in [&dead, &alive, &other] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(dead.join("vmm.json"), b"{}").unwrap();
        std::fs::write(&file, b"").unwrap();

        let removed = sweep_stale_runtime_dirs(&base);

        assert_eq!(removed, 1);
        assert!(!dead.exists());
        assert!(alive.exists() && other.exists() && file.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}

//! Command-line definitions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// mxc-vm: run untrusted code under one JSON policy, in a microVM or a process sandbox.
///
/// Exit codes: the sandboxed command's own code is passed through; 124 = the timeout
/// killed it; 125 = mxc-vm itself failed (bad policy or flags, backend unavailable);
/// 126 = the command could not be executed; 127 = the command was not found; 128+N =
/// the command was killed by signal N.
#[derive(Debug, Parser)]
#[command(name = "mxc-vm", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Commands,
}

#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Run a command in a sandbox.
    Run(Box<RunArgs>),
    /// Check, explain or describe policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Show which backends this host supports, and why the others are unavailable.
    Backends(BackendsArgs),
    /// Build or show the microVM guest image (kernel + initramfs).
    #[command(subcommand)]
    Image(ImageCommand),
    /// Measure latency against a baseline in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Serve the HTTP/JSON API for code-execution services (long-lived sandboxes, execs
    /// with streamed output, files in and out) on a Unix socket, optionally on TCP.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The Unix socket to listen on (mode 0600) [default: $XDG_RUNTIME_DIR/mxc-vm/serve.sock,
    /// else /tmp/mxc-vm-UID/serve.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Also listen on TCP at ADDRESS:PORT (needs --token-file; clients send
    /// `Authorization: Bearer <token>`).
    #[arg(long, value_name = "ADDRESS:PORT")]
    pub listen: Option<String>,
    /// File holding the bearer token for --listen (at least 16 printable characters).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Most sandboxes at once (more are answered 429).
    #[arg(long, default_value_t = 64)]
    pub max_sandboxes: usize,
    /// Most execs running at once across all sandboxes (more are answered 429).
    #[arg(long, default_value_t = 64)]
    pub max_execs: usize,
    /// Most bytes of a JSON request body (more are answered 413; file uploads stream and
    /// have no such limit).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body: usize,
    /// Timeout of an exec that names none (and whose policy names none).
    #[arg(long, value_name = "DUR", default_value = "10m")]
    pub exec_timeout: String,
    /// Keep N microVMs restored from the ready snapshot waiting: a microVM sandbox that
    /// fits it (256 MiB, 1 vCPU) takes one instead of starting its own, and the pool
    /// refills in the background (needs `mxc-vm image build`'s ready snapshot).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub warm_pool: usize,
    /// Guest RAM the waiting VMs may hold together, MiB (bounds --warm-pool).
    #[arg(long, value_name = "MIB", default_value_t = 4096)]
    pub warm_pool_memory: u64,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build the guest kernel and initramfs (cached; rebuilt only when inputs change).
    Build(ImageArgs),
    /// Show the cached image, if any.
    Show(ImageArgs),
}

#[derive(Debug, Args)]
pub struct ImageArgs {
    /// The static guest-agent binary to put in the initramfs.
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// Cache directory (default: $MXC_VM_CACHE_DIR, $XDG_CACHE_HOME/mxc-vm, ~/.cache/mxc-vm).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Also build (or show) the read-only Debian rootfs that `run --guest-system rootfs`
    /// shares instead of the host's /usr and /etc (debootstrap, minbase variant; needs
    /// root and the Debian mirror: $MXC_VM_DEBIAN_MIRROR, default deb.debian.org).
    #[arg(long)]
    pub rootfs: bool,
    /// Do not make the ready snapshot. By default `image build` then boots the new
    /// image once (where /dev/kvm is usable) and saves it at the agent's Ready, so that
    /// `run` can start VMs without shared directories from it instead of booting.
    #[arg(long)]
    pub no_snapshot: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// `mxc-vm run -- /bin/true` per backend against plain fork+exec.
    Exec(BenchExecArgs),
    /// The network policy proxy against a direct connection on loopback: added latency
    /// per connection and throughput.
    Proxy(BenchProxyArgs),
    /// Cold microVM boots: time per boot stage (p50/p90/p99), VMM peak RSS, optionally
    /// against QEMU's microvm machine in the same run.
    Boot(BenchBootArgs),
    /// File I/O in a microVM guest on a virtio-fs share against the same operations on
    /// the host: sequential write/read throughput, create/stat/unlink latency.
    Fs(BenchFsArgs),
    /// An exec round trip through `mxc-vm serve` in a live process sandbox against
    /// `mxc-vm run` of the same command and fork+exec; then many clients at once.
    Serve(BenchServeArgs),
    /// Idle microVMs restored from the ready snapshot into a warm pool: how many this
    /// machine holds and each one's private memory (`/proc/PID/smaps_rollup`), against
    /// one VM booted cold in the same run.
    Density(BenchDensityArgs),
}

#[derive(Debug, Args)]
pub struct BenchDensityArgs {
    /// Restored VMs to hold at once.
    #[arg(long, default_value_t = 50)]
    pub vms: usize,
    /// Guest RAM of each, MiB (the ready snapshot's size restores; others boot).
    #[arg(long, default_value_t = 256)]
    pub mem: u64,
    /// Seconds to let the VMs go idle before reading their memory.
    #[arg(long, default_value_t = 5)]
    pub settle: u64,
    /// Give up filling the pool after this many seconds (and report what it holds).
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchServeArgs {
    /// Measured rounds (each runs every series once).
    #[arg(long, default_value_t = 200)]
    pub runs: usize,
    /// Unmeasured rounds first.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Clients at once in the concurrent part (each with a sandbox of its own).
    #[arg(long, default_value_t = 20)]
    pub clients: usize,
    /// Execs per client in the concurrent part.
    #[arg(long, default_value_t = 50)]
    pub concurrent_execs: usize,
    #[arg(long)]
    pub json: bool,
}

/// How far each measured boot goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BootUntil {
    /// VMM setup only: the VM ends just before the boot vCPU's first entry (no guest
    /// code runs; fast enough for hundreds of runs).
    FirstEntry,
    /// The VM ends at the boot vCPU's first exit to the VMM (the kernel runs; under
    /// kvm_pvm that exit comes some 30 s into the boot).
    FirstExit,
    /// The guest agent powers the VM off as soon as it is ready (`mxc.bench_poweroff=1`;
    /// no vsock device): what `--vs-qemu` compares.
    Ready,
    /// The whole lifecycle: boot to the agent's answer over vsock, run `/bin/echo` and
    /// wait for its output, power off.
    Output,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Stages (ms since the VMM process was spawned, one clock: CLOCK_MONOTONIC):
  setup_start       the VMM's code starts building the VM (spawn, exec, start-up done)
  vm_created        KVM VM and in-kernel irqchip exist, guest memory mapped
  kernel_loaded     kernel and initramfs copied into guest memory (parallel to the above)
  first_vcpu_entry  the boot vCPU's first KVM_RUN         (goal: <= 5 ms p50)
  first_guest_exit  its first exit to the VMM: the kernel runs
  agent_started     the guest agent (/init) wrote boot-timer stage 1
  agent_ready       the agent listens: boot-timer stage 2
  handshake         the host finished the agent handshake over vsock (goal on hardware KVM: <= 20 ms p50)
  first_output      the first output chunk of `/bin/echo` reached the host
  vm_gone           the VMM tore the VM down
  process_exit      the host reaped the VMM process (spawned-directly modes)

Under the nested kvm_pvm hypervisor a boot takes minutes (guest kernel code is emulated):
keep --runs small there, or use --until first-entry for many runs of the VMM setup.")]
pub struct BenchBootArgs {
    /// Measured boots (per series).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Unmeasured boots first (per series).
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// How far each boot goes.
    #[arg(long, value_enum, default_value_t = BootUntil::Output)]
    pub until: BootUntil,
    /// Also boot the same kernel and initramfs in `qemu-system-x86_64 -M microvm`,
    /// interleaved with ours, and compare spawn-to-exit with the agent powering off at
    /// ready (`--until ready`) in both.
    #[arg(long)]
    pub vs_qemu: bool,
    /// The QEMU binary for --vs-qemu.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Write an SVG plot of the stages to FILE.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    pub mem: u32,
    /// Boot this kernel instead of the built image's.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Use this initramfs instead of the built image's.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Give up on a boot after DUR (e.g. 90s, 10m).
    #[arg(long, value_name = "DUR", default_value = "10m")]
    pub boot_timeout: String,
    /// Profile the guest kernel instead: boot `--runs` times to agent ready with
    /// `initcall_debug` and the kernel log on the console, then print the slowest
    /// initcalls and the largest gaps of the last boot (the console slows every boot,
    /// so compare shares, not absolute times).
    #[arg(long, conflicts_with = "vs_qemu")]
    pub profile: bool,
    /// Also start VMs from the ready snapshot (made first when missing or stale, not
    /// measured), interleaved with the cold boots: restore -> first output of `echo`
    /// against boot -> first output (needs `--until output`, the default).
    #[arg(long, conflicts_with = "profile")]
    pub snapshot: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchFsArgs {
    /// MiB written and read sequentially (every new guest page costs milliseconds under
    /// kvm_pvm: mind the guest's memory, 256 MiB by default).
    #[arg(long, default_value_t = 64)]
    pub mib: u64,
    /// Files created, stat'ed and unlinked.
    #[arg(long, default_value_t = 1000)]
    pub files: u64,
    /// Directory to work in (default: the temporary directory); it must be on a real
    /// file system, not a tmpfs, to compare like with like.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Give up when the guest agent has not answered after DUR.
    #[arg(long, value_name = "DUR")]
    pub boot_timeout: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchProxyArgs {
    /// Measured connections per series (latency).
    #[arg(long, default_value_t = 2000)]
    pub connections: usize,
    /// Unmeasured connections per series first.
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    /// Bytes per throughput run (e.g. 1GiB, 512MiB).
    #[arg(long, default_value = "1GiB")]
    pub bytes: String,
    /// Throughput runs per series (the best and the median are shown).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Write an audit log during the run (as `mxc-vm run --audit` does).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub audit: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchExecArgs {
    /// Measured rounds (each round runs every series once).
    #[arg(long, default_value_t = 200)]
    pub runs: usize,
    /// Unmeasured runs per series first.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Backends to measure.
    #[arg(long = "backend", default_values_t = ["process".to_string(), "bubblewrap".to_string()])]
    pub backends: Vec<String>,
    /// Then time each setup stage of the process tier over `--runs` more runs and print
    /// where the milliseconds go (p50/p90 per stage).
    #[arg(long)]
    pub stages: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GuestSystemArg {
    Host,
    Rootfs,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    Process,
    Bubblewrap,
    Microvm,
    Hyperlight,
    Auto,
}

impl From<BackendArg> for policy::Containment {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Process => policy::Containment::Process,
            BackendArg::Bubblewrap => policy::Containment::Bubblewrap,
            BackendArg::Microvm => policy::Containment::Microvm,
            BackendArg::Hyperlight => policy::Containment::Hyperlight,
            BackendArg::Auto => policy::Containment::Auto,
        }
    }
}

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  mxc-vm run -- echo hello
  mxc-vm run --rw ./project --cwd ./project -- python3 main.py
  mxc-vm run --policy policy.json --timeout 30s
  mxc-vm run --backend bubblewrap --ro /data --deny /data/secrets -- ls /data
  mxc-vm run --policy net.json --audit audit.jsonl -- curl https://pypi.org/simple/

Flags compose with the policy file; on conflicts the stricter wins (a path in two
lists gets the stricter access, the smaller timeout applies). A command after `--`
replaces the policy's command.

Network: no sandbox ever shares the host's network. With any network policy but
deny-all the sandbox's only route out is mxc-vm's policy proxy on 127.0.0.1:3128 inside
it (HTTP_PROXY/HTTPS_PROXY/ALL_PROXY are set); refused connections get HTTP 403 with an
X-Mxc-Deny header naming the rule. `default: deny` with no rules means no network at
all; `default: allow` with no rules lets every name and public address through the
proxy, while loopback, private, link-local and metadata addresses still need an IP
rule. A microVM has no network device: its guest reaches the proxy over vsock.

Environment:
  MXC_VM_PROXY_HOSTS=FILE  resolve names the policy allows through this hosts file
                           instead of DNS (for tests; a warning says it is in use).")]
pub struct RunArgs {
    /// Policy file (mxc-vm native format, or an MXC ContainerConfig 0.6-0.9).
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Isolation backend; overrides the policy's containment.
    #[arg(long, value_enum, value_name = "BACKEND")]
    pub backend: Option<BackendArg>,
    /// Grant read-only access to PATH (repeatable).
    #[arg(long = "ro", value_name = "PATH")]
    pub ro: Vec<PathBuf>,
    /// Grant read-write access to PATH (repeatable).
    #[arg(long = "rw", value_name = "PATH")]
    pub rw: Vec<PathBuf>,
    /// Hide PATH completely (repeatable).
    #[arg(long = "deny", value_name = "PATH")]
    pub deny: Vec<PathBuf>,
    /// Set an environment variable in the sandbox (repeatable). The host environment is
    /// never inherited.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Kill the command and everything it started after DUR (e.g. 500ms, 2s, 1m).
    #[arg(long, value_name = "DUR")]
    pub timeout: Option<String>,
    /// Working directory inside the sandbox.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
    /// Machine-readable output: one JSON object per line on stdout (stdout/stderr
    /// chunks, warnings, then the exit or error).
    #[arg(long)]
    pub json: bool,
    /// microVM: boot this kernel (vmlinux or bzImage) instead of the built image's.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// microVM: use this initramfs instead of the built image's.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Virtual CPUs of a microVM (1-64); with the policy's `limits.vcpus` the smaller
    /// wins.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vcpus: Option<u32>,
    /// Memory limit in MiB (16-1048576): a microVM's RAM, the process tiers' address
    /// space; with the policy's `limits.memoryMiB` the smaller wins.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(16..=1_048_576))]
    pub memory: Option<u64>,
    /// microVM: show the guest's serial console (slow: every byte is a VM exit).
    #[arg(long)]
    pub console: bool,
    /// microVM: when the boot fails, print the whole guest console kept for the error
    /// (warnings and errors of the guest kernel, the agent's lines), not only its tail.
    #[arg(long)]
    pub verbose: bool,
    /// microVM: give up when the guest agent has not answered after DUR.
    #[arg(long, value_name = "DUR")]
    pub boot_timeout: Option<String>,
    /// microVM: the read-only system the guest sees: `host` (the host's /usr, /bin,
    /// /sbin, /lib* and the non-secret part of /etc; the default), `rootfs` (the Debian
    /// rootfs from `mxc-vm image build --rootfs`) or `none` (busybox only).
    #[arg(long, value_enum, value_name = "VIEW")]
    pub guest_system: Option<GuestSystemArg>,
    /// microVM: boot the guest kernel even where the VM's ready snapshot (made by
    /// `mxc-vm image build`) would do. A VM starts from its snapshot by default when
    /// it has no shared directories (`--guest-system none` and no file grants).
    #[arg(long)]
    pub cold: bool,
    /// microVM: run the command as root in the guest (the policy's
    /// `process.guestRoot`). By default it runs as the unprivileged user `nobody`, which
    /// cannot signal, trace or replace the guest agent.
    #[arg(long)]
    pub guest_root: bool,
    /// Append one JSON line per network decision (allowed or denied connection) to
    /// FILE. This puts the policy proxy in front of every network policy, allow-all
    /// included (then loopback and private addresses need an IP rule, as always
    /// through the proxy).
    #[arg(long, value_name = "FILE")]
    pub audit: Option<PathBuf>,
    /// The command and its arguments.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file (exit 0 when valid, 125 with the error otherwise).
    Check {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show the effective policy: every path with its access, network rules, limits,
    /// backend.
    Explain {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print the JSON Schema of the native policy format.
    Schema,
}

#[derive(Debug, Args)]
pub struct BackendsArgs {
    #[arg(long)]
    pub json: bool,
}

//! The internal policy model.
//!
//! Every input format (our native `"version": "1"` files, MXC ContainerConfig 0.6–0.9,
//! CLI flags) is mapped onto these types, and every backend consumes only these types.
//! Nothing here is format-specific; parsing lives in `native` and `mxc`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Which input format a policy came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// mxc-vm native format; the string is the `version` field (currently `"1"`).
    Native { version: String },
    /// Microsoft MXC ContainerConfig; the string is its `version` (e.g. `0.8.0-alpha`).
    Mxc { version: String },
    /// Built only from CLI flags, without a file.
    Cli,
}

/// A whole sandbox policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub source: PolicySource,
    /// MXC `containerId`, or a native `name`; informational.
    pub name: Option<String>,
    pub process: Process,
    pub filesystem: Filesystem,
    pub network: Network,
    pub limits: Limits,
    pub containment: Containment,
    pub lifecycle: Lifecycle,
    /// Non-fatal findings made while loading (e.g. rules that cannot match anything).
    pub warnings: Vec<String>,
}

impl Policy {
    /// The wall-clock limit of each command: the smaller of `process.timeout` and
    /// `limits.timeout` (the one place this rule is applied to a policy).
    pub fn exec_timeout(&self) -> Option<Duration> {
        tighter_timeout(self.process.timeout, self.limits.timeout)
    }

    /// An empty policy: no command, no paths, network denied, no limits, `auto` backend.
    pub fn empty(source: PolicySource) -> Self {
        Self {
            source,
            name: None,
            process: Process::default(),
            filesystem: Filesystem::default(),
            network: Network::default(),
            limits: Limits::default(),
            containment: Containment::Auto,
            lifecycle: Lifecycle::default(),
            warnings: Vec::new(),
        }
    }
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Executed directly (`argv[0]` is looked up in the sandbox's PATH).
    Argv(Vec<String>),
    /// A shell command line, run as `/bin/sh -c LINE` (MXC `process.commandLine`).
    Shell(String),
}

impl Command {
    /// The argv this command executes.
    pub fn to_argv(&self) -> Vec<String> {
        match self {
            Command::Argv(v) => v.clone(),
            Command::Shell(line) => vec!["/bin/sh".into(), "-c".into(), line.clone()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Process {
    pub command: Option<Command>,
    /// Working directory inside the sandbox.
    pub cwd: Option<PathBuf>,
    /// The complete environment. The host environment is never inherited.
    pub env: Vec<(String, String)>,
    /// Wall-clock timeout of the command.
    pub timeout: Option<Duration>,
    /// In the microVM, run the command as root in the guest (default: the unprivileged
    /// user `nobody`, which cannot signal, trace or replace the guest agent).
    pub guest_root: bool,
}

/// Access granted to a path. Ordered from strictest to most permissive, so
/// `min()` of two accesses is the stricter one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    Denied,
    ReadOnly,
    ReadWrite,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Denied => "denied",
            Access::ReadOnly => "readonly",
            Access::ReadWrite => "readwrite",
        }
    }
}

/// Where a rule came from, for `policy explain` and error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A policy file field, e.g. `filesystem.readonlyPaths[2]`.
    Field(String),
    /// A CLI flag, e.g. `--ro`.
    Flag(String),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Field(p) => write!(f, "{p}"),
            Origin::Flag(p) => write!(f, "flag {p}"),
        }
    }
}

/// One filesystem rule (not yet resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRule {
    /// Absolute after loading (relative paths in a file are joined to the file's
    /// directory, CLI paths to the current directory) but not canonical: it may still
    /// contain symlinks. `resolve_fs` makes it canonical.
    pub path: PathBuf,
    pub access: Access,
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filesystem {
    pub rules: Vec<PathRule>,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Action {
    Allow,
    #[default]
    Deny,
}

/// A domain pattern: `example.com` (exact) or `*.example.com` (any depth below, not the apex).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DomainPattern {
    Exact(String),
    /// The suffix without the leading `*.`.
    Wildcard(String),
}

/// An IP network (address plus prefix length).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// What a network rule matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NetTarget {
    Domain(DomainPattern),
    Ip(IpNet),
    /// Any destination (only valid in deny rules, or as MXC `0.0.0.0/0`).
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Any,
}

/// One network rule. Empty `ports` means every port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetRule {
    pub target: NetTarget,
    pub ports: Vec<PortRange>,
    pub protocol: Protocol,
    pub origin: Origin,
}

/// Egress policy: deny rules first, then allow rules, then the default.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Egress {
    pub default: Action,
    pub allow: Vec<NetRule>,
    pub deny: Vec<NetRule>,
}

/// Ingress policy. Only "deny everything" is enforceable today.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ingress {
    pub default: Action,
    /// Whether the sandbox may reach the host's loopback.
    pub host_loopback: Action,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Network {
    pub egress: Egress,
    pub ingress: Ingress,
    /// MXC `runtimeConfig.networkProxy` / native `network.upstreamProxy`: chain egress
    /// through this proxy (`http://host:port`).
    pub upstream_proxy: Option<String>,
}

impl Network {
    /// True when the policy is "no network at all" (loopback only).
    pub fn is_deny_all(&self) -> bool {
        self.egress.default == Action::Deny && self.egress.allow.is_empty()
    }
    /// True when the policy is "everything allowed".
    pub fn is_allow_all(&self) -> bool {
        self.egress.default == Action::Allow && self.egress.deny.is_empty()
    }
}

/// The one timeout rule: of two limits the smaller wins (`None`: no limit).
pub fn tighter_timeout(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub memory_mib: Option<u64>,
    pub vcpus: Option<u32>,
    pub pids: Option<u32>,
    /// Wall-clock limit of each command run in the sandbox, from its start to its exit
    /// (a microVM's boot is bounded by `--boot-timeout`, not by this); with
    /// `process.timeout` also set, the smaller applies ([`Policy::exec_timeout`]).
    pub timeout: Option<Duration>,
    /// Most bytes of stdout+stderr passed through; the rest is dropped with a notice.
    pub output_bytes: Option<u64>,
    /// Network: most concurrent connections through the proxy.
    pub max_connections: Option<u32>,
    /// Network: bandwidth cap in bytes per second through the proxy.
    pub bandwidth_bps: Option<u64>,
    /// Network: idle timeout of a proxied connection.
    pub idle_timeout: Option<Duration>,
    /// Most MiB written into read-write grants in one run (microVM only).
    pub disk_mib: Option<u64>,
}

/// Isolation backend choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Containment {
    Process,
    Bubblewrap,
    Microvm,
    Hyperlight,
    Auto,
}

impl Containment {
    pub fn as_str(self) -> &'static str {
        match self {
            Containment::Process => "process",
            Containment::Bubblewrap => "bubblewrap",
            Containment::Microvm => "microvm",
            Containment::Hyperlight => "hyperlight",
            Containment::Auto => "auto",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifecycle {
    /// Tear the sandbox down when the command exits (MXC `lifecycle.destroyOnExit`).
    pub destroy_on_exit: bool,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            destroy_on_exit: true,
        }
    }
}

/// The resolved filesystem view: canonical absolute paths with their effective access.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FsView {
    /// Sorted by path (so parents come before children); no duplicates.
    pub entries: Vec<ViewEntry>,
    /// Non-fatal findings, e.g. a path that does not exist.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewEntry {
    /// Absolute, canonical (symlinks resolved) path.
    pub path: PathBuf,
    pub access: Access,
    /// False when the path did not exist at resolution time (a warning was emitted).
    pub exists: bool,
    /// True when the entry names a directory.
    pub is_dir: bool,
    /// The rules that produced this entry (several when lists overlapped).
    pub origins: Vec<Origin>,
}

impl FsView {
    /// The access of `path` (absolute, canonical): the most specific entry that contains
    /// it wins; a path under no entry is `Denied` (default deny).
    pub fn access_for(&self, path: &std::path::Path) -> Access {
        self.entries
            .iter()
            .filter(|e| path.starts_with(&e.path))
            .max_by_key(|e| e.path.components().count())
            .map_or(Access::Denied, |e| e.access)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smaller_timeout_wins_wherever_it_is_set() {
        let s = Duration::from_secs;
        assert_eq!(tighter_timeout(None, None), None);
        assert_eq!(tighter_timeout(Some(s(3)), None), Some(s(3)));
        assert_eq!(tighter_timeout(None, Some(s(2))), Some(s(2)));
        assert_eq!(tighter_timeout(Some(s(3)), Some(s(2))), Some(s(2)));

        let mut p = Policy::empty(PolicySource::Cli);
        p.process.timeout = Some(s(30));
        p.limits.timeout = Some(s(5));
        assert_eq!(p.exec_timeout(), Some(s(5)));
        p.limits.timeout = None;
        assert_eq!(p.exec_timeout(), Some(s(30)));
    }
}

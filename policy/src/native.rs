//! The native format, `"version": "1"`: serde types (which also generate the JSON
//! Schema) and their mapping onto the model.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;

use crate::error::PolicyError;
use crate::fields::{
    ArgKind, DurationKind, EnvKind, PathKind, ProxyUrlKind, RuleKind, ShellKind, Str,
};
use crate::model::{
    Access, Action, Command, Containment, Egress, Filesystem, Limits, NetRule, Network, Origin,
    PathRule, Policy, PolicySource, Process, Protocol,
};
use crate::resolve::is_root_lexically;
use crate::source::Source;

/// An mxc-vm sandbox policy (native format, version 1). Everything not granted is
/// denied: no filesystem paths, no network, no host environment.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(title = "mxc-vm policy, version 1")]
pub(crate) struct NativePolicy {
    /// Format version: always "1".
    pub version: NativeVersion,
    /// Optional label, shown in logs and `policy explain`.
    pub name: Option<String>,
    /// Isolation backend; `auto` (the default) picks the strongest one this host runs.
    pub containment: Option<ContainmentName>,
    /// What to run. A policy without a command takes it from the command line.
    pub process: Option<NativeProcess>,
    /// Paths the sandbox may see. The most specific rule wins; a path in several lists
    /// gets the strictest access.
    pub filesystem: Option<NativeFilesystem>,
    /// Network egress (default deny).
    pub network: Option<NativeNetwork>,
    /// Resource limits.
    pub limits: Option<NativeLimits>,
}

/// The format version.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(rename = "Version")]
pub(crate) enum NativeVersion {
    #[serde(rename = "1")]
    V1,
}

/// Isolation backend.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(rename = "Containment")]
pub(crate) enum ContainmentName {
    /// Namespaces, Landlock and seccomp (fastest).
    Process,
    /// Debian's bwrap with the same policy.
    Bubblewrap,
    /// A microVM booted by mxc-vm's own VMM (strongest).
    Microvm,
    /// A Hyperlight micro-VM.
    Hyperlight,
    /// The strongest backend this host supports.
    Auto,
}

impl From<ContainmentName> for Containment {
    fn from(c: ContainmentName) -> Self {
        match c {
            ContainmentName::Process => Containment::Process,
            ContainmentName::Bubblewrap => Containment::Bubblewrap,
            ContainmentName::Microvm => Containment::Microvm,
            ContainmentName::Hyperlight => Containment::Hyperlight,
            ContainmentName::Auto => Containment::Auto,
        }
    }
}

/// The command and its environment.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(rename = "Process")]
pub(crate) struct NativeProcess {
    /// The program and its arguments, executed directly. Exclusive with `command`.
    pub argv: Option<Vec<Str<ArgKind>>>,
    /// A shell command line, run as /bin/sh -c. Exclusive with `argv`.
    pub command: Option<Str<ShellKind>>,
    /// Working directory inside the sandbox.
    pub cwd: Option<Str<PathKind>>,
    /// The complete environment as KEY=VALUE entries; the host environment is never
    /// inherited. Each KEY at most once.
    pub env: Option<Vec<Str<EnvKind>>>,
    /// Wall-clock timeout of the command; with limits.timeout also set, the smaller
    /// applies.
    pub timeout: Option<Str<DurationKind>>,
    /// In the microVM, run the command as root in the guest. By default it runs as the
    /// unprivileged user `nobody` (65534), which cannot signal, trace or replace the guest
    /// agent. The process tiers run every command as root inside their own namespaces,
    /// without capabilities, and ignore this field.
    pub guest_root: Option<bool>,
}

/// Filesystem rules; relative paths are relative to the policy file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(rename = "Filesystem")]
pub(crate) struct NativeFilesystem {
    /// Paths the sandbox may read and write. `/` is refused.
    pub readwrite: Option<Vec<Str<PathKind>>>,
    /// Paths the sandbox may read.
    pub readonly: Option<Vec<Str<PathKind>>>,
    /// Paths hidden from the sandbox even inside a granted directory.
    pub denied: Option<Vec<Str<PathKind>>>,
}

/// Network policy.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(rename = "Network")]
pub(crate) struct NativeNetwork {
    /// Outbound connections: deny rules first, then allow rules, then the default.
    pub egress: Option<NativeEgress>,
    /// Chain allowed egress through this HTTP proxy.
    pub upstream_proxy: Option<Str<ProxyUrlKind>>,
}

/// Outbound rules.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(rename = "Egress")]
pub(crate) struct NativeEgress {
    /// What happens when no rule matches (default: deny).
    pub default: Option<ActionName>,
    /// Destinations to allow (only with "default": "deny").
    pub allow: Option<Vec<Str<RuleKind>>>,
    /// Destinations to refuse; they beat allow rules.
    pub deny: Option<Vec<Str<RuleKind>>>,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(rename = "Action")]
pub(crate) enum ActionName {
    Allow,
    Deny,
}

impl From<ActionName> for Action {
    fn from(a: ActionName) -> Self {
        match a {
            ActionName::Allow => Action::Allow,
            ActionName::Deny => Action::Deny,
        }
    }
}

/// Resource limits. Unset limits are left to the backend's defaults.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(rename = "Limits")]
pub(crate) struct NativeLimits {
    /// Memory in MiB (at least 16).
    #[serde(rename = "memoryMiB")]
    #[schemars(range(min = 16, max = 1048576))]
    pub memory_mib: Option<u64>,
    /// Virtual CPUs (1 to 64).
    #[schemars(range(min = 1, max = 64))]
    pub vcpus: Option<u32>,
    /// Most processes and threads at once.
    #[schemars(range(min = 1))]
    pub pids: Option<u32>,
    /// Wall-clock limit of each command run in the sandbox, from its start to its exit
    /// (not a microVM's boot); with process.timeout also set, the smaller applies.
    pub timeout: Option<Str<DurationKind>>,
    /// Most bytes of stdout and stderr passed through.
    #[schemars(range(min = 1))]
    pub output_bytes: Option<u64>,
    /// Most concurrent proxied connections.
    #[schemars(range(min = 1))]
    pub max_connections: Option<u32>,
    /// Proxied bandwidth cap in bytes per second.
    #[schemars(range(min = 1))]
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// Idle timeout of a proxied connection.
    pub idle_timeout: Option<Str<DurationKind>>,
    /// Most MiB the command may write into its read-write grants in one run (writes,
    /// file extensions and allocations, counted as made; ENOSPC past it). The microVM
    /// counts them on the host; the process tiers refuse the limit (they cannot count).
    #[serde(rename = "diskMiB")]
    #[schemars(range(min = 1))]
    pub disk_mib: Option<u64>,
}

/// Lowest memory limit accepted: less cannot start a useful sandbox.
pub(crate) const MIN_MEMORY_MIB: u64 = 16;
/// Highest memory limit accepted (1 TiB): more is a unit mistake.
pub(crate) const MAX_MEMORY_MIB: u64 = 1 << 20;
pub(crate) const MAX_VCPUS: u32 = 64;

/// Parses native text (the format has been detected already).
pub(crate) fn parse(src: &Source<'_>) -> Result<Policy, PolicyError> {
    let np: NativePolicy = src.deserialize()?;
    let version = match np.version {
        NativeVersion::V1 => "1",
    };
    let mut policy = Policy::empty(PolicySource::Native {
        version: version.into(),
    });
    policy.name = np.name;
    if let Some(c) = np.containment {
        policy.containment = c.into();
    }
    if let Some(p) = np.process {
        policy.process = process(src, p)?;
    }
    if let Some(fs) = np.filesystem {
        policy.filesystem = filesystem(src, fs)?;
    }
    if let Some(n) = np.network {
        policy.network = network(src, n, &mut policy.warnings)?;
    }
    if let Some(l) = np.limits {
        policy.limits = limits(src, l)?;
    }
    Ok(policy)
}

fn process(src: &Source<'_>, p: NativeProcess) -> Result<Process, PolicyError> {
    let command = match (p.argv, p.command) {
        (Some(_), Some(_)) => {
            return Err(src
                .err_key("process.command", "set either argv or command, not both")
                .with_hint("argv runs a program directly; command runs a line with /bin/sh -c"))
        }
        (Some(argv), None) => {
            let argv: Vec<String> = argv.into_iter().map(|a| a.0).collect();
            match argv.first() {
                None => return Err(src.err("process.argv", "argv is empty: name a program")),
                Some(a) if a.is_empty() => {
                    return Err(src.err("process.argv[0]", "the program name is empty"))
                }
                Some(_) => Some(Command::Argv(argv)),
            }
        }
        (None, Some(line)) => Some(Command::Shell(line.0)),
        (None, None) => None,
    };
    Ok(Process {
        command,
        cwd: p.cwd.map(|c| src.abs(c.0)),
        env: env_list(src, "process.env", p.env.unwrap_or_default())?,
        timeout: p.timeout.map(|t| t.0),
        guest_root: p.guest_root.unwrap_or(false),
    })
}

/// Checks that no variable is set twice.
pub(crate) fn env_list(
    src: &Source<'_>,
    field: &str,
    entries: Vec<Str<EnvKind>>,
) -> Result<Vec<(String, String)>, PolicyError> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(entries.len());
    for (i, Str((k, v))) in entries.into_iter().enumerate() {
        if let Some(first) = out.iter().position(|(ok, _)| *ok == k) {
            return Err(src.err(
                &format!("{field}[{i}]"),
                format!("variable \"{k}\" is already set by {field}[{first}]"),
            ));
        }
        out.push((k, v));
    }
    Ok(out)
}

fn filesystem(src: &Source<'_>, fs: NativeFilesystem) -> Result<Filesystem, PolicyError> {
    let mut rules = Vec::new();
    for (list, access, name) in [
        (fs.readwrite, Access::ReadWrite, "readwrite"),
        (fs.readonly, Access::ReadOnly, "readonly"),
        (fs.denied, Access::Denied, "denied"),
    ] {
        push_rules(
            src,
            &mut rules,
            list.unwrap_or_default(),
            access,
            &format!("filesystem.{name}"),
        )?;
    }
    Ok(Filesystem { rules })
}

/// Appends one list's rules, made absolute; refuses `/` as readwrite.
pub(crate) fn push_rules(
    src: &Source<'_>,
    rules: &mut Vec<PathRule>,
    list: Vec<Str<PathKind>>,
    access: Access,
    field: &str,
) -> Result<(), PolicyError> {
    for (i, Str(path)) in list.into_iter().enumerate() {
        let origin = format!("{field}[{i}]");
        let path: PathBuf = src.abs(path);
        if access == Access::ReadWrite && is_root_lexically(&path) {
            return Err(src
                .err(&origin, crate::resolve::ROOT_RW_MESSAGE)
                .with_hint(crate::resolve::ROOT_RW_HINT));
        }
        rules.push(PathRule {
            path,
            access,
            origin: Origin::Field(origin),
        });
    }
    Ok(())
}

fn network(
    src: &Source<'_>,
    n: NativeNetwork,
    warnings: &mut Vec<String>,
) -> Result<Network, PolicyError> {
    let net = network_rules(src, n, warnings)?;
    upstream_warning(&net, "network.upstreamProxy", warnings);
    Ok(net)
}

/// An upstream proxy only carries what the egress rules allow: with nothing allowed,
/// nothing reaches it (a warning, since MXC passes everything to its proxy).
pub(crate) fn upstream_warning(net: &Network, field: &str, warnings: &mut Vec<String>) {
    if net.upstream_proxy.is_some() && net.is_deny_all() {
        warnings.push(format!(
            "{field}: egress denies everything, so nothing is chained through the upstream \
             proxy; mxc-vm decides first and chains only allowed connections (allow the \
             hosts to reach through it)"
        ));
    }
}

fn network_rules(
    src: &Source<'_>,
    n: NativeNetwork,
    warnings: &mut Vec<String>,
) -> Result<Network, PolicyError> {
    let mut net = Network {
        upstream_proxy: n.upstream_proxy.map(|u| u.0),
        ..Network::default()
    };
    let Some(e) = n.egress else {
        return Ok(net);
    };
    let rules = |list: Option<Vec<Str<RuleKind>>>, field: &str| -> Vec<NetRule> {
        list.unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, Str(spec))| NetRule {
                target: spec.target,
                ports: spec.ports,
                protocol: Protocol::Tcp,
                origin: Origin::Field(format!("{field}[{i}]")),
            })
            .collect()
    };
    let egress = Egress {
        default: e.default.map_or(Action::Deny, Action::from),
        allow: rules(e.allow, "network.egress.allow"),
        deny: rules(e.deny, "network.egress.deny"),
    };
    check_egress(
        src,
        &egress,
        "network.egress.allow",
        "network.egress.deny",
        warnings,
    )?;
    net.egress = egress;
    Ok(net)
}

/// Rules that can never matter are warned about (deny rules are checked first, so
/// under `default: allow` the allow rules change nothing, and under `default: deny`
/// without allow rules the deny rules change nothing); the rules that do matter apply.
pub(crate) fn check_egress(
    _src: &Source<'_>,
    egress: &Egress,
    allow_field: &str,
    deny_field: &str,
    warnings: &mut Vec<String>,
) -> Result<(), PolicyError> {
    if egress.default == Action::Allow && !egress.allow.is_empty() {
        warnings.push(format!(
            "{allow_field}: allow rules have no effect when the default is allow (the deny \
             rules, checked first, still apply)"
        ));
    }
    if egress.default == Action::Deny && egress.allow.is_empty() && !egress.deny.is_empty() {
        warnings.push(format!(
            "{deny_field}: deny rules have no effect: everything is already denied \
             (no allow rules, default deny)"
        ));
    }
    Ok(())
}

fn limits(src: &Source<'_>, l: NativeLimits) -> Result<Limits, PolicyError> {
    let positive = |v: Option<u64>, field: &str| -> Result<(), PolicyError> {
        match v {
            Some(0) => Err(src.err(&format!("limits.{field}"), "must be greater than zero")),
            _ => Ok(()),
        }
    };
    if let Some(m) = l.memory_mib {
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&m) {
            return Err(src.err(
                "limits.memoryMiB",
                format!("{m} MiB is outside {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} MiB"),
            ));
        }
    }
    if let Some(v) = l.vcpus {
        if !(1..=MAX_VCPUS).contains(&v) {
            return Err(src.err(
                "limits.vcpus",
                format!("{v} vCPUs is outside 1 to {MAX_VCPUS}"),
            ));
        }
    }
    positive(l.pids.map(u64::from), "pids")?;
    positive(l.output_bytes, "outputBytes")?;
    positive(l.max_connections.map(u64::from), "maxConnections")?;
    positive(l.bandwidth_bytes_per_sec, "bandwidthBytesPerSec")?;
    positive(l.disk_mib, "diskMiB")?;
    if let Some(d) = l.disk_mib {
        if d.checked_mul(1 << 20).is_none() {
            return Err(src.err("limits.diskMiB", format!("{d} MiB is too large")));
        }
    }
    Ok(Limits {
        memory_mib: l.memory_mib,
        vcpus: l.vcpus,
        pids: l.pids,
        timeout: l.timeout.map(|t| t.0),
        output_bytes: l.output_bytes,
        max_connections: l.max_connections,
        bandwidth_bps: l.bandwidth_bytes_per_sec,
        idle_timeout: l.idle_timeout.map(|t| t.0),
        disk_mib: l.disk_mib,
    })
}

//! Microsoft MXC ContainerConfig 0.6–0.9, mapped onto the model. MXC's own rule
//! applies: what cannot be enforced is an error naming the field, never ignored.
//! Every decision is listed in `policy/MXC-COMPAT.md`.

use serde::Deserialize;
use serde_json::Value;

use crate::error::{quote_list, suggest, PolicyError, HINT_SEP};
use crate::fields::{EnvKind, PathKind, ProxyUrlKind, RuleKind, ShellKind, Str, StrKind};
use crate::model::{
    Access, Action, Command, Containment, Egress, Filesystem, IpNet, NetRule, NetTarget, Network,
    Origin, Policy, PolicySource, PortRange, Process, Protocol,
};
use crate::native::{check_egress, env_list, push_rules, upstream_warning, ActionName};
use crate::net_rules::parse_cidr;
use crate::source::Source;

/// The minor number of an MXC `version` (`0.8.0-alpha` → 8), if it is one.
fn minor(v: &str) -> Option<u32> {
    let core = v.split(['-', '+']).next().unwrap_or(v);
    let mut parts = core.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("0"), Some(m), Some(p), None) if p.parse::<u32>().is_ok() => m.parse::<u32>().ok(),
        (Some("0"), Some(m), None, None) => m.parse::<u32>().ok(),
        _ => None,
    }
}

/// Checks an MXC `version` (`0.6.0-alpha` … `0.9.0-dev`): semver, as MXC requires.
pub(crate) fn check_version(v: &str) -> Result<(), String> {
    let core = v.split(['-', '+']).next().unwrap_or(v);
    if core.split('.').count() != 3 {
        return Err(format!(
            "\"{v}\" is not a valid MXC config version{HINT_SEP}MXC versions are semver: \
             \"0.8.0-alpha\", not \"0.8\""
        ));
    }
    match minor(v) {
        Some(6..=9) => Ok(()),
        Some(_) => Err(format!(
            "MXC config version \"{v}\" is not supported{HINT_SEP}mxc-vm reads MXC 0.6 to 0.9"
        )),
        None => Err(format!("\"{v}\" is not a valid MXC config version")),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MxcConfig {
    #[serde(rename = "version")]
    _version: Option<String>,
    #[serde(rename = "$schema")]
    _schema: Option<String>,
    #[serde(rename = "_comment")]
    _comment: Option<Value>,
    container_id: Option<String>,
    containment: Option<String>,
    lifecycle: Option<MxcLifecycle>,
    process: Option<MxcProcess>,
    filesystem: Option<MxcFilesystem>,
    fallback: Option<MxcFallback>,
    network: Option<MxcNetwork>,
    ui: Option<MxcUi>,
    runtime_config: Option<MxcRuntimeConfig>,
    // Sections mxc-vm refuses whenever they are present (see REFUSED_SECTIONS).
    process_container: Option<Value>,
    app_container: Option<Value>,
    lxc: Option<Value>,
    seatbelt: Option<Value>,
    #[serde(rename = "macos_sandbox")]
    macos_sandbox: Option<Value>,
    experimental: Option<Value>,
    phase: Option<Value>,
    sandbox_id: Option<Value>,
    correlation_vector: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MxcLifecycle {
    destroy_on_exit: Option<bool>,
    preserve_policy: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MxcProcess {
    command_line: Option<Str<ShellKind>>,
    cwd: Option<Str<PathKind>>,
    env: Option<Vec<Str<EnvKind>>>,
    /// Milliseconds; 0 means no timeout.
    timeout: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MxcFilesystem {
    readwrite_paths: Option<Vec<Str<PathKind>>>,
    readonly_paths: Option<Vec<Str<PathKind>>>,
    denied_paths: Option<Vec<Str<PathKind>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MxcFallback {
    allow_dacl_mutation: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MxcUi {
    disable: Option<bool>,
    clipboard: Option<Clipboard>,
    injection: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Clipboard {
    None,
    Read,
    Write,
    All,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MxcRuntimeConfig {
    network_proxy: Option<Str<ProxyUrlKind>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MxcNetwork {
    default_policy: Option<DefaultPolicy>,
    enforcement_mode: Option<Enforcement>,
    allowed_hosts: Option<Vec<Str<RuleKind>>>,
    blocked_hosts: Option<Vec<Str<RuleKind>>>,
    allow_local_network: Option<bool>,
    proxy: Option<MxcProxy>,
    egress: Option<MxcEgress>,
    ingress: Option<MxcIngress>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum DefaultPolicy {
    Allow,
    Block,
    Deny,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Enforcement {
    Capabilities,
    Firewall,
    Both,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MxcProxy {
    localhost: Option<u64>,
    builtin_test_server: Option<bool>,
    url: Option<Str<ProxyUrlKind>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MxcEgress {
    default: Option<ActionName>,
    allow: Option<Vec<MxcRule>>,
    deny: Option<Vec<MxcRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MxcIngress {
    default: Option<ActionName>,
    host_loopback: Option<ActionName>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MxcRule {
    to: Option<Vec<MxcPeer>>,
    ports: Option<Vec<MxcPort>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MxcPeer {
    cidr: Str<CidrKind>,
    except: Option<Vec<Str<CidrKind>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MxcPort {
    protocol: Option<ProtocolName>,
    port: Option<u64>,
    end_port: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ProtocolName {
    Tcp,
    Udp,
    Icmp,
    Any,
}

/// An IPv4 or IPv6 CIDR (a bare address is a host network).
#[derive(Debug)]
enum CidrKind {}
impl StrKind for CidrKind {
    type Out = IpNet;
    const NAME: &'static str = "Cidr";
    const EXPECTING: &'static str = "an IPv4 or IPv6 CIDR such as \"192.0.2.0/24\"";
    fn parse(s: &str) -> Result<IpNet, String> {
        parse_cidr(s).map_err(|e| e.serde_message())
    }
    fn schema() -> Value {
        serde_json::json!({"type": "string"})
    }
}

/// Containment names MXC knows, mapped where mxc-vm has the same isolation.
const SUPPORTED: &[&str] = &["process", "bubblewrap", "vm", "hyperlight", "lxc"];
const KNOWN_UNSUPPORTED: &[&str] = &[
    "microvm",
    "processcontainer",
    "appcontainer",
    "seatbelt",
    "macos_sandbox",
    "windows_sandbox",
    "wslc",
    "isolation_session",
];

fn containment(src: &Source<'_>, name: &str) -> Result<Containment, PolicyError> {
    let use_instead = format!(
        "use one of {}; the native format also has \"microvm\" and \"auto\"",
        quote_list(SUPPORTED)
    );
    let refuse = |why: &str| {
        src.err(
            "containment",
            format!("\"{name}\" is not supported by mxc-vm: {why}"),
        )
        .with_hint(use_instead.clone())
    };
    match name {
        "process" => Ok(Containment::Process),
        "bubblewrap" => Ok(Containment::Bubblewrap),
        "vm" => Ok(Containment::Microvm),
        "hyperlight" => Ok(Containment::Hyperlight),
        "microvm" => Err(src
            .err(
                "containment",
                "\"microvm\" is MXC's NanVix micro-VM, whose commandLine is a Python \
                 script; mxc-vm does not run NanVix",
            )
            .with_hint("use \"vm\": mxc-vm runs commandLine with /bin/sh -c in its own microVM")),
        "processcontainer" | "appcontainer" => Err(refuse("it is a Windows AppContainer backend")),
        "windows_sandbox" | "wslc" | "isolation_session" => Err(refuse("it is a Windows backend")),
        "seatbelt" | "macos_sandbox" => Err(refuse("it is a macOS backend")),
        // An LXC config's policy (files, network, limits) is what the process tier
        // enforces; the container image is the one thing it cannot give (see `parse`).
        "lxc" => Ok(Containment::Process),
        other => {
            let all: Vec<&str> = SUPPORTED.iter().chain(KNOWN_UNSUPPORTED).copied().collect();
            let hint = match suggest(other, &all) {
                Some(s) => format!("did you mean \"{s}\"?"),
                None => use_instead,
            };
            Err(src
                .err("containment", format!("unknown value \"{other}\""))
                .with_hint(hint))
        }
    }
}

/// Sections that exist in some MXC schema but configure a backend or a protocol
/// mxc-vm does not have; present (non-null) means refused.
fn refused_sections(c: &MxcConfig) -> [(&'static str, bool, &'static str); 9] {
    const WIN: &str = "Windows ProcessContainer settings cannot be honoured on Linux";
    const MAC: &str = "macOS Seatbelt settings cannot be honoured by mxc-vm";
    const STATE: &str = "state-aware lifecycle requests are not supported: a policy file \
                         describes one run (the library API drives provision/start/exec)";
    [
        ("processContainer", c.process_container.is_some(), WIN),
        ("appContainer", c.app_container.is_some(), WIN),
        (
            "lxc",
            c.lxc.is_some() && c.containment.as_deref() != Some("lxc"),
            "the lxc section belongs to containment \"lxc\"",
        ),
        ("seatbelt", c.seatbelt.is_some(), MAC),
        ("macos_sandbox", c.macos_sandbox.is_some(), MAC),
        (
            "experimental",
            c.experimental.is_some(),
            "experimental MXC features are not supported",
        ),
        ("phase", c.phase.is_some(), STATE),
        ("sandboxId", c.sandbox_id.is_some(), STATE),
        (
            "correlationVector",
            c.correlation_vector.is_some(),
            "correlation vectors belong to state-aware requests, which are not supported",
        ),
    ]
}

/// Parses MXC text; `version` is the file's version ("" when it has none).
pub(crate) fn parse(src: &Source<'_>, version: String) -> Result<Policy, PolicyError> {
    let c: MxcConfig = src.deserialize().map_err(|e| {
        if e.path() == "process.timeout" && e.hint().is_none() {
            e.with_hint("MXC timeouts are whole milliseconds, e.g. 30000; 0 means none")
        } else {
            e
        }
    })?;
    let mut policy = Policy::empty(PolicySource::Mxc {
        version: version.clone(),
    });
    policy.name = c.container_id.clone();
    policy.containment = match &c.containment {
        Some(name) => containment(src, name)?,
        None => Containment::Process,
    };
    if c.containment.as_deref() == Some("lxc") {
        let image = c
            .lxc
            .as_ref()
            .and_then(|l| l.get("distribution"))
            .and_then(Value::as_str)
            .map(|d| format!(" (its {d} image is not used)"))
            .unwrap_or_default();
        policy.warnings.push(format!(
            "containment: \"lxc\" runs on mxc-vm's process tier (namespaces, Landlock, \
             seccomp), which enforces this policy's files, network and limits; the command \
             sees the host's system view{image}"
        ));
    }
    for (field, present, why) in refused_sections(&c) {
        if present {
            return Err(src.err_key(field, why).with_hint("remove it"));
        }
    }
    let Some(p) = c.process else {
        return Err(src.err("", "missing required field \"process\""));
    };
    policy.process = process(src, p)?;
    if let Some(fs) = c.filesystem {
        policy.filesystem = filesystem(src, fs)?;
    }
    if let Some(l) = c.lifecycle {
        if l.preserve_policy == Some(true) {
            return Err(src
                .err(
                    "lifecycle.preservePolicy",
                    "preserving policies after exit is not supported: mxc-vm tears every \
                     sandbox's policy down with it",
                )
                .with_hint("remove it or set it to false"));
        }
        if let Some(d) = l.destroy_on_exit {
            policy.lifecycle.destroy_on_exit = d;
        }
    }
    // `fallback.allowDaclMutation` is operator consent for a Windows fallback mxc-vm
    // never uses: accepted either way, nothing to enforce.
    let _ = c.fallback.and_then(|f| f.allow_dacl_mutation);
    if let Some(ui) = c.ui {
        check_ui(src, &ui)?;
    }
    // runtimeConfig came with 0.8, as the directional rules did.
    if c.runtime_config.is_some() && minor(&version).is_some_and(|m| m < 8) {
        return Err(src
            .err_key(
                "runtimeConfig",
                format!("runtimeConfig needs MXC 0.8 or later; this file is \"{version}\""),
            )
            .with_hint("set \"version\": \"0.8.0-alpha\", or use network.proxy"));
    }
    let runtime_proxy = c.runtime_config.and_then(|r| r.network_proxy).map(|u| u.0);
    // With a runtime proxy every connection goes to it: direct egress rules beside it
    // would say something the proxy decides (MXC refuses them too).
    let direct_rules = c
        .network
        .as_ref()
        .and_then(|n| n.egress.as_ref())
        .is_some_and(|e| {
            matches!(e.default, Some(ActionName::Allow))
                || e.allow.as_ref().is_some_and(|r| !r.is_empty())
                || e.deny.as_ref().is_some_and(|r| !r.is_empty())
        });
    if runtime_proxy.is_some() && direct_rules {
        return Err(src
            .err(
                "runtimeConfig.networkProxy",
                "a runtime proxy needs network.egress.default \"deny\" with no allow or deny \
                 rules: every connection goes to that proxy, which decides",
            )
            .with_hint("remove the egress rules, or the runtime proxy"));
    }
    policy.network = match c.network {
        Some(n) => network(src, n, &version, &mut policy.warnings)?,
        None => Network::default(),
    };
    if let Some(url) = runtime_proxy {
        if let Some(other) = &policy.network.upstream_proxy {
            if *other != url {
                return Err(src.err(
                    "runtimeConfig.networkProxy",
                    format!("conflicts with network.proxy ({other}); give one proxy"),
                ));
            }
        }
        policy.network.upstream_proxy = Some(url);
        upstream_warning(
            &policy.network,
            "runtimeConfig.networkProxy",
            &mut policy.warnings,
        );
    } else {
        upstream_warning(&policy.network, "network.proxy", &mut policy.warnings);
    }
    Ok(policy)
}

/// Largest `process.timeout` in the schemas (u32 milliseconds).
const MAX_TIMEOUT_MS: u64 = u32::MAX as u64;

fn process(src: &Source<'_>, p: MxcProcess) -> Result<Process, PolicyError> {
    let timeout = match p.timeout {
        None | Some(0) => None,
        Some(ms) if ms > MAX_TIMEOUT_MS => {
            return Err(src.err(
                "process.timeout",
                format!("{ms} ms is more than the schema's maximum ({MAX_TIMEOUT_MS})"),
            ))
        }
        Some(ms) => Some(std::time::Duration::from_millis(ms)),
    };
    Ok(Process {
        command: p.command_line.map(|l| Command::Shell(l.0)),
        cwd: p.cwd.map(|c| src.abs(c.0)),
        env: env_list(src, "process.env", p.env.unwrap_or_default())?,
        timeout,
        guest_root: false,
    })
}

fn filesystem(src: &Source<'_>, fs: MxcFilesystem) -> Result<Filesystem, PolicyError> {
    let mut rules = Vec::new();
    for (list, access, name) in [
        (fs.readwrite_paths, Access::ReadWrite, "readwritePaths"),
        (fs.readonly_paths, Access::ReadOnly, "readonlyPaths"),
        (fs.denied_paths, Access::Denied, "deniedPaths"),
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

fn check_ui(src: &Source<'_>, ui: &MxcUi) -> Result<(), PolicyError> {
    const HEADLESS: &str = "sandboxes have no display: UI access cannot be granted";
    if ui.disable == Some(false) {
        return Err(src
            .err("ui.disable", HEADLESS)
            .with_hint("remove it or set it to true"));
    }
    if ui.clipboard.is_some_and(|c| c != Clipboard::None) {
        return Err(src
            .err("ui.clipboard", HEADLESS)
            .with_hint("remove it or set it to \"none\""));
    }
    if ui.injection == Some(true) {
        return Err(src
            .err("ui.injection", HEADLESS)
            .with_hint("remove it or set it to false"));
    }
    Ok(())
}

fn network(
    src: &Source<'_>,
    n: MxcNetwork,
    version: &str,
    warnings: &mut Vec<String>,
) -> Result<Network, PolicyError> {
    let mut net = Network::default();
    // The directional rules came with 0.8; an older file that has them was written for
    // a schema that never had them (a version without a number is taken as current).
    if n.egress.is_some() && minor(version).is_some_and(|m| m < 8) {
        return Err(src
            .err_key(
                "network.egress",
                format!("the directional egress rules need MXC 0.8 or later; this file is \"{version}\""),
            )
            .with_hint("set \"version\": \"0.8.0-alpha\", or use defaultPolicy/allowedHosts/blockedHosts"));
    }
    if n.allow_local_network == Some(true) {
        return Err(src
            .err(
                "network.allowLocalNetwork",
                "inbound connections are not supported: sandboxes cannot accept connections \
                 from outside (listening on the sandbox's own loopback always works)",
            )
            .with_hint("remove it or set it to false"));
    }
    if let Some(mode) = n.enforcement_mode {
        let name = match mode {
            Enforcement::Capabilities => "capabilities",
            Enforcement::Firewall => "firewall",
            Enforcement::Both => "both",
        };
        warnings.push(format!(
            "network.enforcementMode \"{name}\": mxc-vm enforces egress on the host through its \
             policy proxy in every mode; connections that bypass the proxy have no route"
        ));
    }
    if let Some(p) = n.proxy {
        net.upstream_proxy = Some(proxy(src, p)?);
    }
    let legacy =
        n.default_policy.is_some() || n.allowed_hosts.is_some() || n.blocked_hosts.is_some();
    net.egress = match n.egress {
        Some(_) if legacy => {
            return Err(src
                .err_key(
                    "network.egress",
                    "the 0.8 directional egress rules cannot be combined with the legacy \
                     defaultPolicy/allowedHosts/blockedHosts",
                )
                .with_hint("use one shape"))
        }
        Some(e) => directional(src, e, warnings)?,
        None => legacy_egress(
            src,
            &n.default_policy,
            n.allowed_hosts,
            n.blocked_hosts,
            warnings,
        )?,
    };
    if let Some(i) = n.ingress {
        for (field, action) in [
            ("network.ingress.default", i.default),
            ("network.ingress.hostLoopback", i.host_loopback),
        ] {
            if matches!(action, Some(ActionName::Allow)) {
                return Err(src
                    .err(
                        field,
                        "inbound and host-loopback traffic cannot be allowed: the sandbox reaches \
                         the outside only through the policy proxy",
                    )
                    .with_hint(
                        "set it to deny; to reach a host service, allow it as an egress rule",
                    ));
            }
        }
    }
    if net.egress.allow.iter().any(|r| r.protocol == Protocol::Any) {
        warnings.push(
            "network: only TCP passes mxc-vm's policy proxy; UDP and ICMP to allowed \
             destinations stay blocked"
                .into(),
        );
    }
    Ok(net)
}

fn proxy(src: &Source<'_>, p: MxcProxy) -> Result<String, PolicyError> {
    let set = [
        p.localhost.is_some(),
        p.builtin_test_server.is_some(),
        p.url.is_some(),
    ];
    if set.iter().filter(|s| **s).count() != 1 {
        return Err(src.err(
            "network.proxy",
            "give exactly one of localhost, builtinTestServer or url",
        ));
    }
    if p.builtin_test_server.is_some() {
        return Err(src
            .err(
                "network.proxy.builtinTestServer",
                "WXC's built-in test proxy is not part of mxc-vm",
            )
            .with_hint("give the url of a proxy to chain through, or remove network.proxy"));
    }
    if let Some(port) = p.localhost {
        if !(1..=65535).contains(&port) {
            return Err(src.err(
                "network.proxy.localhost",
                format!("{port} is not a valid port: ports are 1 to 65535"),
            ));
        }
        return Ok(format!("http://127.0.0.1:{port}"));
    }
    Ok(p.url.map(|u| u.0).unwrap_or_default())
}

fn legacy_egress(
    src: &Source<'_>,
    default: &Option<DefaultPolicy>,
    allowed: Option<Vec<Str<RuleKind>>>,
    blocked: Option<Vec<Str<RuleKind>>>,
    warnings: &mut Vec<String>,
) -> Result<Egress, PolicyError> {
    let rules = |list: Option<Vec<Str<RuleKind>>>, field: &str| -> Vec<NetRule> {
        list.unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, Str(spec))| NetRule {
                target: spec.target,
                ports: spec.ports,
                protocol: Protocol::Any,
                origin: Origin::Field(format!("{field}[{i}]")),
            })
            .collect()
    };
    let egress = Egress {
        default: match default {
            Some(DefaultPolicy::Allow) => Action::Allow,
            _ => Action::Deny,
        },
        allow: rules(allowed, "network.allowedHosts"),
        deny: rules(blocked, "network.blockedHosts"),
    };
    check_egress(
        src,
        &egress,
        "network.allowedHosts",
        "network.blockedHosts",
        warnings,
    )?;
    Ok(egress)
}

fn directional(
    src: &Source<'_>,
    e: MxcEgress,
    warnings: &mut Vec<String>,
) -> Result<Egress, PolicyError> {
    let mut egress = Egress {
        default: e.default.map_or(Action::Deny, Action::from),
        ..Egress::default()
    };
    for (list, action, field) in [
        (e.allow, Action::Allow, "network.egress.allow"),
        (e.deny, Action::Deny, "network.egress.deny"),
    ] {
        for (i, rule) in list.unwrap_or_default().into_iter().enumerate() {
            let at = format!("{field}[{i}]");
            let rules = directional_rule(src, &rule, action, &at, warnings)?;
            match action {
                Action::Allow => egress.allow.extend(rules),
                Action::Deny => egress.deny.extend(rules),
            }
        }
    }
    check_egress(
        src,
        &egress,
        "network.egress.allow",
        "network.egress.deny",
        warnings,
    )?;
    Ok(egress)
}

/// Most network rules one `{to, ports}` rule may expand into (CIDRs minus their
/// exceptions, times port selectors); more is a mistake, and would cost memory.
const MAX_EXPANDED_RULES: usize = 10_000;

fn too_many(src: &Source<'_>, at: &str) -> PolicyError {
    src.err(
        at,
        format!(
            "expands into more than {MAX_EXPANDED_RULES} rules (each except splits its CIDR; \
             each port selector repeats every destination)"
        ),
    )
    .with_hint("use fewer, wider CIDRs, or split the rule")
}

/// One `{to, ports}` rule: every destination (CIDR minus its exceptions) times every
/// protocol/port selector.
fn directional_rule(
    src: &Source<'_>,
    rule: &MxcRule,
    action: Action,
    at: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<NetRule>, PolicyError> {
    let targets: Vec<NetTarget> = match &rule.to {
        None => vec![NetTarget::Any],
        Some(peers) if peers.is_empty() => {
            return Err(src
                .err(&format!("{at}.to"), "empty destination list")
                .with_hint("omit \"to\" to match every destination"))
        }
        Some(peers) => {
            let mut out = Vec::new();
            for (j, peer) in peers.iter().enumerate() {
                let mut nets = vec![peer.cidr.0];
                for (k, ex) in peer.except.iter().flatten().enumerate() {
                    if !peer.cidr.0.covers(&ex.0) {
                        return Err(src.err(
                            &format!("{at}.to[{j}].except[{k}]"),
                            format!("{} is not inside {}", ex.0, peer.cidr.0),
                        ));
                    }
                    nets = nets.iter().flat_map(|n| n.subtract(&ex.0)).collect();
                    if nets.len() + out.len() > MAX_EXPANDED_RULES {
                        return Err(too_many(src, at));
                    }
                }
                out.extend(nets.into_iter().map(NetTarget::Ip));
                if out.len() > MAX_EXPANDED_RULES {
                    return Err(too_many(src, at));
                }
            }
            out
        }
    };
    let selectors: Vec<(Protocol, Vec<PortRange>)> = match &rule.ports {
        None => vec![(Protocol::Any, Vec::new())],
        Some(ports) if ports.is_empty() => {
            return Err(src
                .err(&format!("{at}.ports"), "empty port list")
                .with_hint("omit \"ports\" to match every port"))
        }
        Some(ports) => {
            let mut out = Vec::new();
            for (k, p) in ports.iter().enumerate() {
                let pat = format!("{at}.ports[{k}]");
                let proto = match p.protocol.unwrap_or(ProtocolName::Any) {
                    ProtocolName::Tcp => Protocol::Tcp,
                    ProtocolName::Any => Protocol::Any,
                    ProtocolName::Udp if action == Action::Deny => Protocol::Udp,
                    ProtocolName::Icmp if action == Action::Deny => {
                        warnings.push(format!(
                            "{pat}: ICMP deny rule dropped: no ICMP ever leaves an mxc-vm sandbox"
                        ));
                        continue;
                    }
                    other => {
                        let name = if other == ProtocolName::Udp {
                            "UDP"
                        } else {
                            "ICMP"
                        };
                        return Err(src
                            .err(
                                &format!("{pat}.protocol"),
                                format!(
                                    "{name} egress cannot be allowed: mxc-vm passes egress only \
                                     through its TCP policy proxy"
                                ),
                            )
                            .with_hint("use \"tcp\""));
                    }
                };
                out.push((proto, port_range(src, p, &pat)?));
            }
            out
        }
    };
    if targets.len().saturating_mul(selectors.len()) > MAX_EXPANDED_RULES {
        return Err(too_many(src, at));
    }
    let mut rules = Vec::new();
    for target in &targets {
        for (protocol, ports) in &selectors {
            rules.push(NetRule {
                target: target.clone(),
                ports: ports.clone(),
                protocol: *protocol,
                origin: Origin::Field(at.to_string()),
            });
        }
    }
    Ok(rules)
}

fn port_range(src: &Source<'_>, p: &MxcPort, at: &str) -> Result<Vec<PortRange>, PolicyError> {
    let check = |v: u64, field: &str| -> Result<u16, PolicyError> {
        u16::try_from(v).ok().filter(|v| *v >= 1).ok_or_else(|| {
            src.err(
                &format!("{at}.{field}"),
                format!("{v} is not a valid port: ports are 1 to 65535"),
            )
        })
    };
    match (p.port, p.end_port) {
        (None, None) => Ok(Vec::new()),
        (None, Some(_)) => Err(src
            .err_key(&format!("{at}.endPort"), "endPort requires port")
            .with_hint("give the first port of the range as \"port\"")),
        (Some(first), end) => {
            let first = check(first, "port")?;
            let last = match end {
                Some(e) => check(e, "endPort")?,
                None => first,
            };
            if last < first {
                return Err(src.err(
                    &format!("{at}.endPort"),
                    format!("endPort {last} is below port {first}"),
                ));
            }
            Ok(vec![PortRange { first, last }])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_06_to_09_are_accepted() {
        for v in [
            "0.6.0-alpha",
            "0.7.0-alpha",
            "0.8.0-alpha",
            "0.9.0-alpha",
            "0.9.0-dev",
        ] {
            assert_eq!(check_version(v), Ok(()), "{v}");
        }
    }

    #[test]
    fn other_versions_are_refused() {
        for v in [
            "0.5.0-alpha",
            "0.10.0",
            "0.x",
            "0.8.0.1",
            "0.",
            "0.8",
            "0.8-alpha",
        ] {
            assert!(check_version(v).is_err(), "{v}");
        }
    }

    #[test]
    fn expansion_is_bounded() {
        // Each /32 hole adds about 15 CIDRs: about 3900 destinations, times four port
        // selectors.
        let excepts: Vec<String> = (0..=255).map(|i| format!("\"10.{i}.1.1/32\"")).collect();
        let text = format!(
            r#"{{"process": {{}}, "network": {{"egress": {{"allow": [
            {{"to": [{{"cidr": "10.0.0.0/8", "except": [{}]}}],
              "ports": [{}]}}]}}}}}}"#,
            excepts.join(","),
            ["{}"; 4].join(",")
        );
        let src = Source::new("p.json", &text, std::path::Path::new("/"));

        let err = parse(&src, String::new()).unwrap_err();

        assert_eq!(err.path(), "network.egress.allow[0]");
        assert!(err.message().contains("expands into more than 10000 rules"));
    }

    #[test]
    fn directional_ports_become_ranges() {
        let text = r#"{"process": {}, "network": {"egress": {"allow": [
            {"ports": [{"port": 80}, {"port": 8000, "endPort": 8100}, {}]}]}}}"#;
        let src = Source::new("p.json", text, std::path::Path::new("/"));

        let p = parse(&src, String::new()).unwrap();

        let ports: Vec<Vec<PortRange>> = p
            .network
            .egress
            .allow
            .iter()
            .map(|r| r.ports.clone())
            .collect();
        assert_eq!(
            ports,
            vec![
                vec![PortRange {
                    first: 80,
                    last: 80
                }],
                vec![PortRange {
                    first: 8000,
                    last: 8100
                }],
                vec![],
            ]
        );
        assert!(p
            .network
            .egress
            .allow
            .iter()
            .all(|r| r.target == NetTarget::Any));
    }
}

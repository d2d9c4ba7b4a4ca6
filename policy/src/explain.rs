//! `mxc-vm policy explain`: the effective policy, as JSON and as text.

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::duration::format_duration;
use crate::model::{Access, Action, Command, FsView, NetRule, Policy, PolicySource};

/// How egress is carried on every tier: never the host's network namespace.
pub fn egress_route_text(policy: &Policy) -> &'static str {
    let n = &policy.network;
    if n.is_deny_all() && n.upstream_proxy.is_none() {
        "none: a private network (only the sandbox's own loopback; no proxy, no route out)"
    } else {
        "only the host-side policy proxy (127.0.0.1:3128 in the sandbox, HTTP_PROXY and \
         HTTPS_PROXY set; a microVM reaches it over vsock): a private network otherwise, \
         never the host's; the proxy decides every connection by the rules above and \
         refuses loopback, private, link-local, CGNAT and cloud-metadata addresses unless \
         an IP rule names them"
    }
}

fn action_str(a: Action) -> &'static str {
    match a {
        Action::Allow => "allow",
        Action::Deny => "deny",
    }
}

fn source_json(s: &PolicySource) -> Value {
    match s {
        PolicySource::Native { version } => json!({"format": "native", "version": version}),
        PolicySource::Mxc { version } => json!({"format": "mxc", "version": version}),
        PolicySource::Cli => json!({"format": "cli", "version": null}),
    }
}

/// The egress rules in evaluation order: deny rules, allow rules, then the default.
fn egress_rows(p: &Policy) -> Vec<(Action, Option<&NetRule>)> {
    let e = &p.network.egress;
    e.deny
        .iter()
        .map(|r| (Action::Deny, Some(r)))
        .chain(e.allow.iter().map(|r| (Action::Allow, Some(r))))
        .chain(std::iter::once((e.default, None)))
        .collect()
}

/// What each tier does with FIFOs, Unix sockets and device nodes made in a read-write
/// grant.
const SPECIAL_FILES: &str = "device nodes are refused on every tier; FIFOs and Unix sockets \
     in read-write grants are refused on process and bubblewrap (Landlock) and left inert on \
     the host by the microVM (no host process can reach the guest through them)";

/// Who the command runs as, on each tier.
fn user_text(policy: &Policy) -> &'static str {
    if policy.process.guest_root {
        "root in the microVM's guest (process.guestRoot); on the process tiers root inside \
         their own namespaces, without capabilities"
    } else {
        "nobody (65534) in the microVM's guest (process.guestRoot: true for root); on the \
         process tiers root inside their own namespaces, without capabilities"
    }
}

/// The effective policy as JSON: each path with its access and origins, each network
/// rule in evaluation order, limits, containment, process and warnings.
/// What every sandbox sees besides the policy's paths (the "system view"), as the
/// caller that builds sandboxes knows it: (path or paths, what the sandbox gets).
pub type SystemView = [(String, String)];

/// [`explain`] plus the system view every sandbox sees (`systemView`).
pub fn explain_with_system(policy: &Policy, view: &FsView, system: &SystemView) -> Value {
    let mut v = explain(policy, view);
    v["filesystem"]["systemView"] = system
        .iter()
        .map(|(path, what)| json!({"path": path, "access": what}))
        .collect();
    v
}

/// [`explain_text`] with the system view every sandbox sees listed under the policy's
/// own paths.
pub fn explain_text_with_system(policy: &Policy, view: &FsView, system: &SystemView) -> String {
    write_text(policy, view, system)
}

pub fn explain(policy: &Policy, view: &FsView) -> Value {
    let command = policy.process.command.as_ref().map(|c| match c {
        Command::Argv(a) => json!({"kind": "argv", "argv": a}),
        Command::Shell(l) => json!({"kind": "shell", "line": l, "argv": c.to_argv()}),
    });
    let paths: Vec<Value> = view
        .entries
        .iter()
        .map(|e| {
            json!({
                "path": e.path.display().to_string(),
                "access": e.access.as_str(),
                "exists": e.exists,
                "isDir": e.is_dir,
                "origins": e.origins.iter().map(|o| o.to_string()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let egress: Vec<Value> = egress_rows(policy)
        .into_iter()
        .map(|(action, rule)| match rule {
            Some(r) => json!({
                "action": action_str(action),
                "rule": r.rule_string(),
                "protocol": r.protocol.as_str(),
                "origin": r.origin.to_string(),
            }),
            None => json!({
                "action": action_str(action),
                "rule": "default",
                "protocol": "any",
                "origin": "default",
            }),
        })
        .collect();
    let l = &policy.limits;
    json!({
        "source": source_json(&policy.source),
        "name": policy.name,
        "containment": policy.containment.as_str(),
        "process": {
            "command": command,
            "cwd": policy.process.cwd.as_ref().map(|c| c.display().to_string()),
            "env": policy.process.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "timeout": policy.process.timeout.map(format_duration),
            "guestRoot": policy.process.guest_root,
            "user": user_text(policy),
        },
        "filesystem": {
            "default": "denied",
            "paths": paths,
            "specialFiles": SPECIAL_FILES,
            "warnings": view.warnings,
        },
        "network": {
            "egress": egress,
            "ingress": {
                "default": action_str(policy.network.ingress.default),
                "hostLoopback": action_str(policy.network.ingress.host_loopback),
            },
            "upstreamProxy": policy.network.upstream_proxy,
            "route": egress_route_text(policy),
        },
        "limits": {
            "memoryMiB": l.memory_mib,
            "vcpus": l.vcpus,
            "pids": l.pids,
            "timeout": l.timeout.map(format_duration),
            "outputBytes": l.output_bytes,
            "maxConnections": l.max_connections,
            "bandwidthBytesPerSec": l.bandwidth_bps,
            "idleTimeout": l.idle_timeout.map(format_duration),
            "diskMiB": l.disk_mib,
        },
        "lifecycle": {"destroyOnExit": policy.lifecycle.destroy_on_exit},
        "warnings": policy.warnings,
    })
}

/// The effective policy for people to read.
pub fn explain_text(policy: &Policy, view: &FsView) -> String {
    write_text(policy, view, &[])
}

/// The text of `explain`, with the system view's section when there is one.
fn write_text(policy: &Policy, view: &FsView, system: &SystemView) -> String {
    let mut s = String::new();
    let source = match &policy.source {
        PolicySource::Native { version } => format!("native format, version {version}"),
        PolicySource::Mxc { version } if version.is_empty() => {
            "MXC ContainerConfig (no version)".into()
        }
        PolicySource::Mxc { version } => format!("MXC ContainerConfig {version}"),
        PolicySource::Cli => "command-line flags".into(),
    };
    let _ = writeln!(s, "policy: {source}");
    if let Some(n) = &policy.name {
        let _ = writeln!(s, "name: {n}");
    }
    let _ = writeln!(s, "containment: {}", policy.containment.as_str());

    let _ = writeln!(s, "process:");
    match &policy.process.command {
        Some(Command::Argv(a)) => {
            let _ = writeln!(s, "  command: {a:?}");
        }
        Some(Command::Shell(l)) => {
            let _ = writeln!(s, "  command: /bin/sh -c {l:?}");
        }
        None => {
            let _ = writeln!(s, "  command: (none; give one after --)");
        }
    }
    if let Some(c) = &policy.process.cwd {
        let _ = writeln!(s, "  cwd: {}", c.display());
    }
    if policy.process.env.is_empty() {
        let _ = writeln!(s, "  env: (empty; the host environment is never inherited)");
    } else {
        for (k, v) in &policy.process.env {
            let _ = writeln!(s, "  env: {k}={v}");
        }
    }
    if let Some(t) = policy.exec_timeout() {
        let _ = writeln!(
            s,
            "  timeout: {} (each command, from its start; the smaller of process.timeout \
             and limits.timeout)",
            format_duration(t)
        );
    }
    let _ = writeln!(s, "  user: {}", user_text(policy));

    let _ = writeln!(s, "filesystem (everything else: denied):");
    if view.entries.is_empty() {
        let _ = writeln!(s, "  (no paths of its own)");
    }
    for e in &view.entries {
        let origins: Vec<String> = e.origins.iter().map(|o| o.to_string()).collect();
        let missing = match (e.exists, e.access) {
            (true, _) => "",
            (false, Access::Denied) => {
                " [missing: the microVM denies it by name; the process tiers refuse a \
                 missing denied path that a grant would show]"
            }
            (false, _) => " [missing]",
        };
        let _ = writeln!(
            s,
            "  {:<9}  {}{missing}  <- {}",
            e.access.as_str(),
            e.path.display(),
            origins.join(", ")
        );
    }

    if !system.is_empty() {
        let _ = writeln!(
            s,
            "  system view (every sandbox besides its own paths; a denied path inside it is \
             hidden; the microVM shows the same unless --guest-system says otherwise):"
        );
        for (path, what) in system {
            let _ = writeln!(s, "    {path}: {what}");
        }
    }
    let _ = writeln!(s, "  special files: {SPECIAL_FILES}");

    let _ = writeln!(s, "network egress (first match wins):");
    for (i, (action, rule)) in egress_rows(policy).into_iter().enumerate() {
        let _ = match rule {
            Some(r) => writeln!(
                s,
                "  {}. {:<5}  {} ({})  <- {}",
                i + 1,
                action_str(action),
                r.rule_string(),
                r.protocol.as_str(),
                r.origin
            ),
            None => writeln!(
                s,
                "  {}. {:<5}  everything else (default)",
                i + 1,
                action_str(action)
            ),
        };
    }
    let _ = writeln!(s, "network route: {}", egress_route_text(policy));
    let _ = writeln!(
        s,
        "network ingress: {}; host loopback: {}",
        action_str(policy.network.ingress.default),
        action_str(policy.network.ingress.host_loopback)
    );
    if let Some(p) = &policy.network.upstream_proxy {
        let _ = writeln!(s, "upstream proxy: {p}");
    }

    let l = &policy.limits;
    let limits: Vec<String> = [
        l.memory_mib.map(|v| {
            format!("memory {v} MiB (on the process tiers /tmp, a RAM disk, holds at most {v} MiB)")
        }),
        l.vcpus.map(|v| format!("vcpus {v}")),
        l.pids.map(|v| format!("pids {v}")),
        l.timeout.map(|v| format!("timeout {}", format_duration(v))),
        l.output_bytes.map(|v| format!("output {v} bytes")),
        l.max_connections.map(|v| format!("connections {v}")),
        l.bandwidth_bps.map(|v| format!("bandwidth {v} B/s")),
        l.idle_timeout
            .map(|v| format!("idle timeout {}", format_duration(v))),
        l.disk_mib.map(|v| {
            format!(
                "disk {v} MiB written into read-write grants (counted by the microVM; the \
                 process tiers refuse it)"
            )
        }),
    ]
    .into_iter()
    .flatten()
    .collect();
    if limits.is_empty() {
        let _ = writeln!(s, "limits: (backend defaults)");
    } else {
        let _ = writeln!(s, "limits: {}", limits.join(", "));
    }
    let _ = writeln!(
        s,
        "lifecycle: {}",
        if policy.lifecycle.destroy_on_exit {
            "destroyed on exit"
        } else {
            "kept after exit"
        }
    );
    let warnings: Vec<&String> = policy.warnings.iter().chain(&view.warnings).collect();
    if !warnings.is_empty() {
        let _ = writeln!(s, "warnings:");
        for w in warnings {
            let _ = writeln!(s, "  - {w}");
        }
    }
    s
}

//! The native format end to end, CLI overrides composed with a file, and explain.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::parse;
use policy::{
    explain, explain_text, resolve_fs, Access, Action, Command, Containment, DomainPattern,
    NetTarget, Origin, Overrides, Policy, PolicySource, PortRange, Protocol,
};

const FULL: &str = r#"{
  "version": "1",
  "name": "build job",
  "containment": "bubblewrap",
  "process": {
    "argv": ["python3", "main.py"],
    "cwd": "/work",
    "env": ["KEY=VALUE", "LANG=C.UTF-8"],
    "timeout": "30s"
  },
  "filesystem": { "readwrite": ["./project"], "readonly": ["/data"], "denied": ["./project/.env"] },
  "network": {
    "egress": {
      "default": "deny",
      "allow": ["pypi.org", "*.pythonhosted.org:443", "10.1.0.0/16:80-90", "192.0.2.7", "[2001:db8::1]:443"],
      "deny":  ["evil.example.com"]
    },
    "upstreamProxy": "http://proxy.corp:3128"
  },
  "limits": { "memoryMiB": 512, "vcpus": 1, "pids": 256, "timeout": "5m", "outputBytes": 10485760,
              "maxConnections": 64, "bandwidthBytesPerSec": 10485760, "idleTimeout": "60s" }
}"#;

#[test]
fn the_documented_native_example_maps_onto_the_model() {
    let p = parse(FULL).unwrap();

    assert_eq!(
        p.source,
        PolicySource::Native {
            version: "1".into()
        }
    );
    assert_eq!(p.name.as_deref(), Some("build job"));
    assert_eq!(p.containment, Containment::Bubblewrap);
    assert_eq!(
        p.process.command,
        Some(Command::Argv(vec!["python3".into(), "main.py".into()]))
    );
    assert_eq!(p.process.cwd.as_deref(), Some(Path::new("/work")));
    assert_eq!(
        p.process.env,
        vec![
            ("KEY".into(), "VALUE".into()),
            ("LANG".into(), "C.UTF-8".into())
        ]
    );
    assert_eq!(p.process.timeout, Some(Duration::from_secs(30)));
    let rules: Vec<(PathBuf, Access)> = p
        .filesystem
        .rules
        .iter()
        .map(|r| (r.path.clone(), r.access))
        .collect();
    assert_eq!(
        rules,
        vec![
            (PathBuf::from("/base/project"), Access::ReadWrite),
            (PathBuf::from("/data"), Access::ReadOnly),
            (PathBuf::from("/base/project/.env"), Access::Denied),
        ]
    );
    let e = &p.network.egress;
    assert_eq!(e.default, Action::Deny);
    assert_eq!(e.allow.len(), 5);
    assert_eq!(
        e.allow[1].target,
        NetTarget::Domain(DomainPattern::Wildcard("pythonhosted.org".into()))
    );
    assert_eq!(
        e.allow[2].ports,
        vec![PortRange {
            first: 80,
            last: 90
        }]
    );
    assert_eq!(e.allow[4].rule_string(), "[2001:db8::1]:443");
    assert!(e.allow.iter().all(|r| r.protocol == Protocol::Tcp));
    assert_eq!(
        e.deny[0].origin,
        Origin::Field("network.egress.deny[0]".into())
    );
    assert_eq!(
        p.network.upstream_proxy.as_deref(),
        Some("http://proxy.corp:3128")
    );
    let l = p.limits;
    assert_eq!(
        (l.memory_mib, l.vcpus, l.pids, l.output_bytes),
        (Some(512), Some(1), Some(256), Some(10485760))
    );
    assert_eq!(l.timeout, Some(Duration::from_secs(300)));
    assert_eq!(l.idle_timeout, Some(Duration::from_secs(60)));
    assert_eq!(
        (l.max_connections, l.bandwidth_bps),
        (Some(64), Some(10485760))
    );
    assert!(p.warnings.is_empty());
}

#[test]
fn a_minimal_native_policy_denies_everything() {
    let p = parse(r#"{"version": "1"}"#).unwrap();

    assert_eq!(p.containment, Containment::Auto);
    assert_eq!(p.process.command, None);
    assert!(p.filesystem.rules.is_empty());
    assert!(p.network.is_deny_all());
}

#[test]
fn a_shell_command_runs_under_sh() {
    let p = parse(r#"{"version": "1", "process": {"command": "echo hi && ls"}}"#).unwrap();

    assert_eq!(
        p.process.command.unwrap().to_argv(),
        vec!["/bin/sh", "-c", "echo hi && ls"]
    );
}

#[test]
fn deny_rules_under_deny_all_warn() {
    let p = parse(r#"{"version": "1", "network": {"egress": {"deny": ["a.example"]}}}"#).unwrap();

    assert_eq!(p.warnings.len(), 1);
    assert!(p.warnings[0].starts_with("network.egress.deny: deny rules have no effect"));
}

/// MXC runs such configs (its firewall denylist test): the deny rule matters, the allow
/// rules under a default of allow do not, which a warning says.
#[test]
fn allow_rules_under_allow_all_warn_and_the_deny_rules_apply() {
    let native = parse(
        r#"{"version": "1", "network": {"egress": {"default": "allow",
            "allow": ["1.1.1.0/24"], "deny": ["1.1.1.1/32"]}}}"#,
    )
    .unwrap();
    let mxc = parse(
        r#"{"version": "0.8.0-alpha", "process": {}, "network": {"defaultPolicy": "allow",
            "allowedHosts": ["1.1.1.0/24"], "blockedHosts": ["1.1.1.1/32"]}}"#,
    )
    .unwrap();

    for p in [&native, &mxc] {
        let redundant = p
            .warnings
            .iter()
            .filter(|w| w.contains("allow rules have no effect"))
            .count();
        assert_eq!(redundant, 1, "{:?}", p.warnings);
        assert_eq!(p.network.egress.deny.len(), 1);
        assert_eq!(p.network.egress.default, Action::Allow);
    }
}

#[test]
fn an_upstream_proxy_under_deny_all_warns() {
    let native =
        parse(r#"{"version": "1", "network": {"upstreamProxy": "http://p.test:3128"}}"#).unwrap();
    let mxc = parse(
        r#"{"version": "0.8.0-alpha", "process": {"commandLine": "true"},
            "runtimeConfig": {"networkProxy": "http://p.test:3128"}}"#,
    )
    .unwrap();

    assert!(native.warnings[0].starts_with("network.upstreamProxy: egress denies everything"));
    assert!(mxc.warnings[0].starts_with("runtimeConfig.networkProxy: egress denies everything"));
}

fn file_policy() -> Policy {
    parse(
        r#"{"version": "1",
            "process": {"argv": ["make"], "env": ["A=1", "B=2"], "timeout": "30s"},
            "filesystem": {"readonly": ["/srv/data"]}}"#,
    )
    .unwrap()
}

#[test]
fn flags_add_rules_with_flag_origins_relative_to_the_base() {
    let mut p = file_policy();
    let o = Overrides {
        ro: vec!["docs".into()],
        rw: vec!["/srv/out".into()],
        deny: vec!["/srv/data/secret".into()],
        ..Overrides::default()
    };

    p.apply_overrides_at(&o, Path::new("/home/u")).unwrap();

    let added: Vec<(PathBuf, Access, Origin)> = p.filesystem.rules[1..]
        .iter()
        .map(|r| (r.path.clone(), r.access, r.origin.clone()))
        .collect();
    assert_eq!(
        added,
        vec![
            (
                "/srv/out".into(),
                Access::ReadWrite,
                Origin::Flag("--rw".into())
            ),
            (
                "/home/u/docs".into(),
                Access::ReadOnly,
                Origin::Flag("--ro".into())
            ),
            (
                "/srv/data/secret".into(),
                Access::Denied,
                Origin::Flag("--deny".into())
            ),
        ]
    );
}

#[test]
fn a_flag_cannot_loosen_a_file_rule_on_the_same_path() {
    let t = common::TempDir::new("compose");
    std::fs::create_dir(t.join("data")).unwrap();
    let mut p = parse(&format!(
        r#"{{"version": "1", "filesystem": {{"readonly": ["{}"]}}}}"#,
        t.join("data").display()
    ))
    .unwrap();
    let o = Overrides {
        rw: vec![t.join("data")],
        ..Overrides::default()
    };

    p.apply_overrides(&o).unwrap();
    let view = resolve_fs(&p.filesystem, t.path()).unwrap();

    assert_eq!(view.access_for(&t.join("data/x")), Access::ReadOnly);
    assert_eq!(view.entries[0].origins.len(), 2);
}

#[test]
fn the_smaller_timeout_wins() {
    let mut shorter = file_policy();
    let mut longer = file_policy();
    let mut unset = Policy::empty(PolicySource::Cli);

    for p in [&mut shorter, &mut unset] {
        p.apply_overrides_at(
            &Overrides {
                timeout: Some(Duration::from_secs(10)),
                ..Overrides::default()
            },
            Path::new("/"),
        )
        .unwrap();
    }
    longer
        .apply_overrides_at(
            &Overrides {
                timeout: Some(Duration::from_secs(60)),
                ..Overrides::default()
            },
            Path::new("/"),
        )
        .unwrap();

    assert_eq!(shorter.process.timeout, Some(Duration::from_secs(10)));
    assert_eq!(longer.process.timeout, Some(Duration::from_secs(30)));
    assert_eq!(unset.process.timeout, Some(Duration::from_secs(10)));
}

#[test]
fn command_containment_cwd_and_env_flags_replace() {
    let mut p = file_policy();
    let o = Overrides {
        env: vec![("B".into(), "3".into()), ("C".into(), "4".into())],
        cwd: Some("sub".into()),
        command: Some(vec!["ls".into(), "-l".into()]),
        containment: Some(Containment::Microvm),
        ..Overrides::default()
    };

    p.apply_overrides_at(&o, Path::new("/w")).unwrap();

    assert_eq!(
        p.process.env,
        vec![
            ("A".into(), "1".into()),
            ("B".into(), "3".into()),
            ("C".into(), "4".into())
        ]
    );
    assert_eq!(p.process.cwd.as_deref(), Some(Path::new("/w/sub")));
    assert_eq!(
        p.process.command,
        Some(Command::Argv(vec!["ls".into(), "-l".into()]))
    );
    assert_eq!(p.containment, Containment::Microvm);
}

#[test]
fn bad_flags_are_errors_naming_the_flag() {
    let cases: Vec<(Overrides, &str, &str)> = vec![
        (
            Overrides {
                rw: vec!["/".into()],
                ..Overrides::default()
            },
            "--rw",
            "\"/\" cannot be readwrite",
        ),
        (
            Overrides {
                ro: vec!["".into()],
                ..Overrides::default()
            },
            "--ro",
            "empty path",
        ),
        (
            Overrides {
                env: vec![("1X".into(), "v".into())],
                ..Overrides::default()
            },
            "-e",
            "is not a valid variable name",
        ),
        (
            Overrides {
                timeout: Some(Duration::ZERO),
                ..Overrides::default()
            },
            "--timeout",
            "must be greater than zero",
        ),
        (
            Overrides {
                command: Some(vec![]),
                ..Overrides::default()
            },
            "--",
            "empty command",
        ),
    ];

    for (o, flag, message) in cases {
        let err = file_policy()
            .apply_overrides_at(&o, Path::new("/"))
            .unwrap_err();

        assert_eq!(err.path(), flag, "{err}");
        assert!(err.message().contains(message), "{err}");
        assert!(err.to_string().starts_with(&format!("{flag}: ")), "{err}");
    }
}

#[test]
fn explain_lists_paths_rules_in_order_limits_and_backend() {
    let t = common::TempDir::new("explain");
    std::fs::create_dir(t.join("project")).unwrap();
    let p = policy::parse_with_base(FULL, "p.json", t.path()).unwrap();
    let view = resolve_fs(&p.filesystem, t.path()).unwrap();

    let j = explain(&p, &view);

    assert_eq!(j["containment"], "bubblewrap");
    assert_eq!(j["source"]["format"], "native");
    assert_eq!(j["process"]["command"]["argv"][0], "python3");
    assert_eq!(j["process"]["timeout"], "30s");
    let paths = j["filesystem"]["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 3);
    assert_eq!(paths[1]["path"], t.join("project").display().to_string());
    assert_eq!(paths[1]["access"], "readwrite");
    assert_eq!(paths[1]["origins"][0], "filesystem.readwrite[0]");
    let egress = j["network"]["egress"].as_array().unwrap();
    let order: Vec<(&str, &str)> = egress
        .iter()
        .map(|r| (r["action"].as_str().unwrap(), r["rule"].as_str().unwrap()))
        .collect();
    assert_eq!(
        order,
        vec![
            ("deny", "evil.example.com"),
            ("allow", "pypi.org"),
            ("allow", "*.pythonhosted.org:443"),
            ("allow", "10.1.0.0/16:80-90"),
            ("allow", "192.0.2.7"),
            ("allow", "[2001:db8::1]:443"),
            ("deny", "default"),
        ]
    );
    assert_eq!(j["limits"]["memoryMiB"], 512);
    assert_eq!(j["limits"]["idleTimeout"], "1m");
    assert_eq!(j["network"]["upstreamProxy"], "http://proxy.corp:3128");
}

#[test]
fn explain_text_reads_top_to_bottom() {
    let p = parse(FULL).unwrap();
    let view = resolve_fs(&p.filesystem, Path::new("/base")).unwrap();

    let text = explain_text(&p, &view);

    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "policy: native format, version 1");
    assert!(lines.contains(&"containment: bubblewrap"));
    assert!(lines.contains(&"  command: [\"python3\", \"main.py\"]"));
    assert!(lines.contains(&"  1. deny   evil.example.com (tcp)  <- network.egress.deny[0]"));
    assert!(lines.contains(&"  7. deny   everything else (default)"));
    assert!(lines
        .iter()
        .any(|l| l.starts_with("  readwrite  /base/project [missing]")));
    assert!(lines.iter().any(|l| l.starts_with(
        "limits: memory 512 MiB (on the process tiers /tmp, a RAM disk, holds at most 512 MiB), \
         vcpus 1"
    )));
    assert!(lines.contains(&"warnings:"));
}

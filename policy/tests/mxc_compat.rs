//! MXC ContainerConfig compatibility against microsoft/mxc's own schemas and examples
//! (read from ../shared/mxc-compat; never copied into the repository).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{mxc_compat_dir, parse};
use policy::{
    Access, Action, Command, Containment, IpNet, NetTarget, PolicySource, PortRange, Protocol,
};
use serde_json::{json, Value};

/// Test values for the `{{PLACEHOLDER}}`s MXC's test scripts fill in.
const PLACEHOLDERS: &[(&str, &str)] = &[
    ("{{PROXY_HOST}}", "127.0.0.1"),
    ("{{PROXY_PORT}}", "3128"),
    ("{{ALLOWED_PORT}}", "8080"),
];

fn example_files() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(mxc_compat_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.ends_with(".json")
                && !n.starts_with("mxc-config.schema")
                && n != "schema-version.json"
        })
        .collect();
    names.sort();
    names
}

fn load_example(name: &str) -> Result<policy::Policy, policy::PolicyError> {
    let mut text = std::fs::read_to_string(mxc_compat_dir().join(name)).unwrap();
    for (k, v) in PLACEHOLDERS {
        text = text.replace(k, v);
    }
    assert!(!text.contains("{{"), "{name}: unsubstituted placeholder");
    policy::parse_with_base(&text, name, Path::new("/base"))
}

/// Ok, or the refused field and the stated reason.
type Outcome = Result<(), (&'static str, &'static str)>;

/// What each example must give.
const EXPECTED: &[(&str, Outcome)] = &[
    ("13_lxc_network_restricted.json", Ok(())),
    ("30_network_0_8_directional.json", Ok(())),
    ("bubblewrap_filesystem.json", Ok(())),
    ("bubblewrap_network_directional_proxy.json", Ok(())),
    ("bubblewrap_network_firewall_cidr.json", Ok(())),
    (
        "microvm_network_linux.json",
        Err(("containment", "MXC's NanVix micro-VM")),
    ),
];

#[test]
fn every_example_parses_or_is_refused_for_a_stated_reason() {
    let files = example_files();
    let listed: Vec<&str> = EXPECTED.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        files, listed,
        "examples changed: list each one's outcome in EXPECTED"
    );

    for (name, want) in EXPECTED {
        let got = load_example(name);

        match want {
            Ok(()) => assert!(got.is_ok(), "{name}: {}", got.unwrap_err()),
            Err((path, reason)) => {
                let e = got.expect_err(name);
                assert_eq!(e.path(), *path, "{name}: {e}");
                assert!(e.message().contains(reason), "{name}: {e}");
                assert!(e.line().is_some(), "{name}: {e}");
            }
        }
    }
}

/// An LXC config runs on the process tier, which enforces its policy; the warning says
/// that the container image is the host's system view instead.
#[test]
fn lxc_runs_on_the_process_tier_and_says_so() {
    let p = load_example("13_lxc_network_restricted.json").unwrap();

    assert_eq!(p.containment, policy::Containment::Process);
    assert!(
        p.warnings
            .iter()
            .any(|w| w.contains("process tier") && w.contains("alpine image is not used")),
        "{:?}",
        p.warnings
    );
    let lxc_section_elsewhere = parse(
        "{\"version\": \"0.8.0-alpha\", \"containment\": \"process\", \"process\": {}, \"lxc\": {}}",
    )
    .unwrap_err();
    assert_eq!(lxc_section_elsewhere.path(), "lxc");
}

#[test]
fn directional_example_maps_cidr_port_and_ingress() {
    let p = load_example("30_network_0_8_directional.json").unwrap();

    assert_eq!(
        p.source,
        PolicySource::Mxc {
            version: "0.8.0-alpha".into()
        }
    );
    assert_eq!(p.name.as_deref(), Some("directional-network-example"));
    assert_eq!(p.containment, Containment::Process);
    assert_eq!(
        p.process.command,
        Some(Command::Shell(
            "echo schema 0.8 directional network example".into()
        ))
    );
    let e = &p.network.egress;
    assert_eq!(e.default, Action::Deny);
    assert_eq!(e.allow.len(), 1);
    assert_eq!(
        e.allow[0].target,
        NetTarget::Ip(IpNet {
            addr: "192.0.2.0".parse().unwrap(),
            prefix: 24
        })
    );
    assert_eq!(
        e.allow[0].ports,
        vec![PortRange {
            first: 443,
            last: 443
        }]
    );
    assert_eq!(e.allow[0].protocol, Protocol::Tcp);
    assert_eq!(p.network.ingress.default, Action::Deny);
    assert_eq!(p.network.ingress.host_loopback, Action::Deny);
}

#[test]
fn filesystem_example_maps_the_three_lists() {
    let p = load_example("bubblewrap_filesystem.json").unwrap();

    let rules: Vec<(&str, Access, String)> = p
        .filesystem
        .rules
        .iter()
        .map(|r| (r.path.to_str().unwrap(), r.access, r.origin.to_string()))
        .collect();
    assert_eq!(p.containment, Containment::Bubblewrap);
    assert_eq!(
        rules,
        vec![
            (
                "/mnt/readwrite",
                Access::ReadWrite,
                "filesystem.readwritePaths[0]".into()
            ),
            (
                "/mnt/readonly",
                Access::ReadOnly,
                "filesystem.readonlyPaths[0]".into()
            ),
            (
                "/mnt/denied",
                Access::Denied,
                "filesystem.deniedPaths[0]".into()
            ),
        ]
    );
}

#[test]
fn proxy_example_maps_runtime_proxy_and_deny_all() {
    let p = load_example("bubblewrap_network_directional_proxy.json").unwrap();

    assert_eq!(
        p.network.upstream_proxy.as_deref(),
        Some("http://127.0.0.1:3128")
    );
    assert!(p.network.is_deny_all());
}

#[test]
fn firewall_example_maps_allowed_cidr_and_warns_about_the_mode() {
    let p = load_example("bubblewrap_network_firewall_cidr.json").unwrap();

    let allow = &p.network.egress.allow;
    assert_eq!(allow.len(), 1);
    assert_eq!(allow[0].target.to_string(), "10.0.2.2");
    assert_eq!(allow[0].origin.to_string(), "network.allowedHosts[0]");
    assert!(p
        .warnings
        .iter()
        .any(|w| w.contains("network.enforcementMode \"firewall\"")));
}

/// Where a schema definition's fields live in a config document.
const DEFINITION_PLACES: &[(&str, &[&str])] = &[
    ("Process", &["process"]),
    ("Filesystem", &["filesystem"]),
    ("Network", &["network"]),
    ("NetworkEgress", &["network", "egress"]),
    ("NetworkIngress", &["network", "ingress"]),
    ("NetworkRule", &["network", "egress", "deny", "0"]),
    (
        "NetworkPeer",
        &["network", "egress", "deny", "0", "to", "0"],
    ),
    (
        "NetworkPort",
        &["network", "egress", "deny", "0", "ports", "0"],
    ),
    ("Proxy", &["network", "proxy"]),
    ("Lifecycle", &["lifecycle"]),
    ("Fallback", &["fallback"]),
    ("Ui", &["ui"]),
    ("RuntimeConfig", &["runtimeConfig"]),
];

/// Builds a minimal config with `field: null` placed at `place` ("0" steps into the
/// first element of an array).
fn config_with(place: &[&str], field: &str) -> String {
    let mut doc = json!({"version": "0.8.0-alpha", "process": {"commandLine": "x"}});
    let mut cur = &mut doc;
    let mut i = 0;
    while i < place.len() {
        let key = place[i];
        let next_is_index = place.get(i + 1) == Some(&"0");
        if cur.get(key).is_none() {
            cur[key] = if next_is_index {
                json!([{}])
            } else {
                json!({})
            };
        }
        cur = &mut cur[key];
        if next_is_index {
            cur = &mut cur[0];
            i += 1;
        }
        i += 1;
    }
    cur[field] = Value::Null;
    doc.to_string()
}

/// (place, field) pairs for every property of every schema version.
fn schema_fields() -> Vec<(String, Vec<String>, String)> {
    let mut out = Vec::new();
    for file in [
        "mxc-config.schema.0.6.0-alpha.json",
        "mxc-config.schema.0.7.0-alpha.json",
        "mxc-config.schema.0.8.0-alpha.json",
        "mxc-config.schema.0.9.0-dev.json",
    ] {
        let text = std::fs::read_to_string(mxc_compat_dir().join(file)).unwrap();
        let schema: Value = serde_json::from_str(&text).unwrap();
        let root = schema["properties"].as_object().unwrap();
        for (name, prop) in root {
            out.push((file.to_string(), vec![], name.clone()));
            // 0.6/0.7 define sections inline.
            if let Some(props) = prop["properties"].as_object() {
                if DEFINITION_PLACES.iter().any(|(_, p)| p == &[name.as_str()]) {
                    for f in props.keys() {
                        out.push((file.to_string(), vec![name.clone()], f.clone()));
                    }
                }
            }
        }
        for variant in schema["properties"]["network"]["properties"]["proxy"]["oneOf"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for f in variant["properties"].as_object().unwrap().keys() {
                out.push((
                    file.to_string(),
                    vec!["network".into(), "proxy".into()],
                    f.clone(),
                ));
            }
        }
        if let Some(defs) = schema["definitions"].as_object() {
            for (def, place) in DEFINITION_PLACES {
                for f in defs[*def]["properties"].as_object().unwrap().keys() {
                    let place = place.iter().map(|s| s.to_string()).collect();
                    out.push((file.to_string(), place, f.clone()));
                }
            }
        }
    }
    out
}

#[test]
fn every_schema_field_is_known_accepted_or_refused_by_name() {
    let fields = schema_fields();
    assert!(fields.len() > 100, "schemas not read: {}", fields.len());

    for (file, place, field) in fields {
        if place.is_empty() && (field == "version" || field == "process") {
            continue;
        }
        let place_refs: Vec<&str> = place.iter().map(String::as_str).collect();
        let text = config_with(&place_refs, &field);

        let result = parse(&text);

        if let Err(e) = result {
            assert!(
                !e.message().starts_with("unknown field"),
                "{file}: {}.{field} is in the schema but unknown to mxc-vm: {e}",
                place.join(".")
            );
        }
    }
}

#[test]
fn backend_sections_are_refused_by_name() {
    for section in [
        "processContainer",
        "appContainer",
        "lxc",
        "seatbelt",
        "macos_sandbox",
        "experimental",
        "sandboxId",
        "correlationVector",
    ] {
        let text =
            format!("{{\"version\": \"0.9.0-alpha\", \"process\": {{}}, \"{section}\": {{}}}}");

        let e = parse(&text).unwrap_err();

        assert_eq!(e.path(), section, "{e}");
        assert_eq!(e.hint(), Some("remove it"), "{e}");
    }
}

#[test]
fn a_full_08_config_maps_onto_the_model() {
    let text = r#"{
      "$schema": "https://example/mxc.json",
      "_comment": ["anything"],
      "version": "0.8.0-alpha",
      "containerId": "full",
      "containment": "vm",
      "lifecycle": {"destroyOnExit": false, "preservePolicy": false},
      "process": {"commandLine": "python3 app.py", "cwd": "work",
                  "env": ["A=1", "B=x=y"], "timeout": 1500},
      "filesystem": {"readwritePaths": ["out"], "readonlyPaths": ["/usr"],
                     "deniedPaths": null},
      "fallback": {"allowDaclMutation": true},
      "ui": {"disable": true, "clipboard": "none", "injection": false},
      "network": {
        "allowLocalNetwork": false,
        "enforcementMode": null,
        "egress": {"default": "deny",
          "allow": [{"to": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]},
                            {"cidr": "2001:db8::/32"}],
                     "ports": [{"protocol": "tcp", "port": 8000, "endPort": 8080},
                               {"port": 443}]}],
          "deny": [{"ports": [{"protocol": "icmp"}, {"protocol": "udp"}]}]},
        "ingress": {"default": "deny", "hostLoopback": "deny"},
        "proxy": {"localhost": 3128}
      }
    }"#;

    let p = parse(text).unwrap();

    assert_eq!(p.name.as_deref(), Some("full"));
    assert_eq!(p.containment, Containment::Microvm);
    assert!(!p.lifecycle.destroy_on_exit);
    assert_eq!(p.process.cwd.as_deref(), Some(Path::new("/base/work")));
    assert_eq!(
        p.process.env,
        vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]
    );
    assert_eq!(p.process.timeout, Some(Duration::from_millis(1500)));
    assert_eq!(p.filesystem.rules[0].path, Path::new("/base/out"));
    assert_eq!(
        p.network.upstream_proxy.as_deref(),
        Some("http://127.0.0.1:3128")
    );
    // 10/8 minus 10.1/16 is 8 CIDRs, plus the IPv6 one; times two port selectors.
    assert_eq!(p.network.egress.allow.len(), 18);
    let shown: Vec<String> = p
        .network
        .egress
        .allow
        .iter()
        .map(|r| format!("{} {}", r.protocol.as_str(), r.rule_string()))
        .collect();
    assert!(shown.contains(&"tcp 10.0.0.0/16:8000-8080".to_string()));
    assert!(shown.contains(&"any [2001:db8::/32]:443".to_string()));
    assert!(!shown.iter().any(|s| s.contains("10.1.0.0/16")));
    // The ICMP deny is dropped (nothing ICMP ever leaves), the UDP one kept.
    assert_eq!(p.network.egress.deny.len(), 1);
    assert_eq!(p.network.egress.deny[0].protocol, Protocol::Udp);
    assert!(p
        .warnings
        .iter()
        .any(|w| w.contains("ICMP deny rule dropped")));
    assert!(p.warnings.iter().any(|w| w.contains("only TCP passes")));
}

#[test]
fn unversioned_mxc_is_detected_by_its_fields() {
    let p = parse(r#"{"process": {"commandLine": "true", "timeout": 0}}"#).unwrap();

    assert_eq!(
        p.source,
        PolicySource::Mxc {
            version: String::new()
        }
    );
    assert_eq!(p.process.timeout, None);
    assert_eq!(p.containment, Containment::Process);
}

#[test]
fn legacy_hosts_accept_names_wildcards_and_cidrs() {
    let p = parse(
        r#"{"version": "0.7.0-alpha", "process": {"commandLine": "x"},
            "network": {"defaultPolicy": "block",
                        "allowedHosts": ["api.github.com", "*.pythonhosted.org", "10.0.0.0/8"]}}"#,
    )
    .unwrap();

    let shown: Vec<String> = p
        .network
        .egress
        .allow
        .iter()
        .map(|r| r.rule_string())
        .collect();
    assert_eq!(
        shown,
        ["api.github.com", "*.pythonhosted.org", "10.0.0.0/8"]
    );
    assert_eq!(p.network.egress.default, Action::Deny);
}

#[test]
fn legacy_allow_default_with_blocked_hosts() {
    let p = parse(
        r#"{"version": "0.6.0-alpha", "process": {"commandLine": "x"},
            "network": {"defaultPolicy": "allow", "blockedHosts": ["evil.example"]}}"#,
    )
    .unwrap();

    assert_eq!(p.network.egress.default, Action::Allow);
    assert_eq!(p.network.egress.deny[0].rule_string(), "evil.example");
    assert!(!p.network.is_allow_all());
}

/// What MXC's own parser refuses is refused here too, naming the field: a proxy URL
/// without a port, a runtime proxy beside direct egress rules, `runtimeConfig` in a file
/// older than 0.8, and a version that is not semver.
#[test]
fn configs_mxc_refuses_are_refused() {
    for (text, path, needle) in [
        (
            r#"{"version":"0.8.0-alpha","process":{"commandLine":"true"},
               "runtimeConfig":{"networkProxy":"http://127.0.0.1"}}"#,
            "runtimeConfig.networkProxy",
            "no port",
        ),
        (
            r#"{"version":"0.8.0-alpha","process":{"commandLine":"true"},
               "network":{"proxy":{"url":"http://proxy.example"}}}"#,
            "network.proxy.url",
            "no port",
        ),
        (
            r#"{"version":"0.8.0-alpha","process":{"commandLine":"true"},
               "network":{"egress":{"default":"deny","allow":[{"to":[{"cidr":"10.0.0.0/8"}]}]}},
               "runtimeConfig":{"networkProxy":"http://127.0.0.1:3128"}}"#,
            "runtimeConfig.networkProxy",
            "no allow or deny rules",
        ),
        (
            r#"{"version":"0.8.0-alpha","process":{"commandLine":"true"},
               "network":{"egress":{"default":"allow"}},
               "runtimeConfig":{"networkProxy":"http://127.0.0.1:3128"}}"#,
            "runtimeConfig.networkProxy",
            "\"deny\"",
        ),
        (
            r#"{"version":"0.6.0-alpha","process":{"commandLine":"true"},
               "runtimeConfig":{"networkProxy":"http://127.0.0.1:3128"}}"#,
            "runtimeConfig",
            "0.8 or later",
        ),
        (
            r#"{"version":"0.8","process":{"commandLine":"true"}}"#,
            "version",
            "semver",
        ),
    ] {
        let err = parse(text).expect_err(text);
        assert_eq!(err.path(), path, "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    }
    // A runtime proxy with egress denied by default and no rules is what MXC asks for.
    let ok = parse(
        r#"{"version":"0.8.0-alpha","process":{"commandLine":"true"},
           "network":{"egress":{"default":"deny"},"ingress":{"default":"deny"}},
           "runtimeConfig":{"networkProxy":"http://127.0.0.1:3128"}}"#,
    )
    .unwrap();
    assert_eq!(
        ok.network.upstream_proxy.as_deref(),
        Some("http://127.0.0.1:3128")
    );
}

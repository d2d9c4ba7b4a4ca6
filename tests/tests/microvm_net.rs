//! End-to-end test of network egress on the microVM tier: the guest has no network
//! device; its agent relays 127.0.0.1:3128 over vsock to the sandbox's policy proxy on
//! the host, which reaches servers in a network namespace made for the test (see
//! `tests::net`). Names resolve through a hosts file given to the proxy; nothing here
//! touches the internet.
//!
//! A boot takes minutes under the nested kvm_pvm hypervisor of our CI machines, so this
//! boots ONE VM through the Backend API and runs every check against it. Where /dev/kvm
//! is missing it fails loudly: it never skips.
//!
//! Everything the guest kernel does is emulated there (see PVM-NOTES.md): on a loaded
//! host one proxied `wget` takes tens of seconds and the relay moves tens of KB/s, so the
//! concurrency and transfer checks are sized to show correctness, not load (the proxy's
//! own tests cover hundreds of connections and 1 GiB on the process tiers).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use policy::{Policy, PolicySource};
use sandbox::microvm::{MicrovmBackend, MicrovmOptions, SystemView};
use sandbox::output::{Collect, StdinMode};
use sandbox::proxy::{HostsResolver, NetOptions, Notices};
use sandbox::{Backend, ExecIo, ExecOutcome, ExecRequest, ExitKind, SandboxSpec};
use tests::net::NetLab;
use tests::{mxc_vm_bin, pids_with, require_kvm, TempDir};

/// Output of one command in the guest.
struct Ran {
    outcome: ExecOutcome,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?}\n--- stdout\n{}--- stderr\n{}",
            self.outcome.exit, self.stdout, self.stderr
        )
    }
}

fn sh(vm: &mut MicrovmBackend, script: &str) -> Ran {
    let req = ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec![],
        cwd: None,
        timeout: Some(Duration::from_secs(900)),
    };
    let mut out = Collect::default();
    let outcome = {
        let mut io = ExecIo {
            stdin: StdinMode::Null,
            sink: Some(&mut out),
            output_limit: None,
            signals: None,
        };
        vm.exec(&req, &mut io).expect("exec")
    };
    Ran {
        outcome,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A raw proxy request from inside the guest (busybox `nc` to the relay).
fn nc_proxy(request: &str) -> String {
    format!("printf '{request}' | nc 127.0.0.1 3128")
}

fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn one_vm_reaches_allowed_names_only_through_the_host_proxy() {
    require_kvm();
    let lab = NetLab::new(&["allowed.test", "denied.test"]);
    let hosts = lab.hosts(&["allowed.test", "denied.test"], &[]);
    let audit_dir = TempDir::new("microvm-audit");
    let audit = audit_dir.path().join("audit.jsonl");
    let notices = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = notices.clone();
    let mut policy = Policy::empty(PolicySource::Cli);
    let rule = policy::parse_rule("allowed.test").unwrap();
    policy.network.egress.allow.push(policy::NetRule {
        target: rule.target,
        ports: rule.ports,
        protocol: policy::Protocol::Tcp,
        origin: policy::Origin::Flag("--allow-host".into()),
    });
    let spec = SandboxSpec {
        policy,
        view: policy::FsView::default(),
        id: format!("net-{}", std::process::id()),
        net: NetOptions {
            audit: Some(audit.clone()),
            resolver: Some(Arc::new(HostsResolver::from_file(&hosts).unwrap())),
            notices: Some(Notices::new(move |line| {
                sink.lock().unwrap().push(line.to_string())
            })),
        },
    };
    let mut vm = MicrovmBackend::new(MicrovmOptions {
        vmm_binary: Some(mxc_vm_bin()),
        // The checks below are written for busybox's wget, nc and nslookup (their exit
        // codes and messages), not the host's tools.
        system: SystemView::None,
        ..MicrovmOptions::default()
    });
    vm.provision(&spec)
        .expect("provision (is the guest image built?)");
    let boot = Instant::now();
    vm.start().expect("boot to agent ready");
    eprintln!("microvm booted to agent ready in {:?}", boot.elapsed());

    // The guest has loopback only, and commands get the process tiers' proxy variables.
    let r = sh(
        &mut vm,
        "awk -F: 'NR > 2 { gsub(/ /, \"\", $1); print $1 }' /proc/net/dev; \
         env | grep -i _proxy= | sort",
    );
    let mut expected: Vec<String> = sandbox::proxy::proxy_env(3128)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    expected.sort();
    assert_eq!(r.stdout, format!("lo\n{}\n", expected.join("\n")), "{r:?}");

    // Plain HTTP to an allowed name, forwarded by the host proxy.
    let r = sh(&mut vm, "wget -q -O- 'http://allowed.test/page?x=1'");
    assert_eq!(r.outcome.exit, ExitKind::Code(0), "{r:?}");
    assert_eq!(r.stdout, "hello from the lab: allowed.test /page?x=1\n");

    // A CONNECT tunnel to an allowed name carries plain HTTP whose Host is that name.
    let r = sh(
        &mut vm,
        &nc_proxy(
            "CONNECT allowed.test:80 HTTP/1.1\\r\\nHost: allowed.test:80\\r\\n\\r\\n\
             GET /tunnel HTTP/1.1\\r\\nHost: allowed.test\\r\\nConnection: close\\r\\n\\r\\n",
        ),
    );
    assert!(
        r.stdout
            .starts_with("HTTP/1.1 200 Connection established\r\n"),
        "{r:?}"
    );
    assert!(
        r.stdout
            .ends_with("\r\n\r\nhello from the lab: allowed.test /tunnel\n"),
        "{r:?}"
    );

    // A denied name is refused by the host proxy, with the rule and the reason.
    let r = sh(&mut vm, "wget -q -O- http://denied.test/");
    assert_ne!(r.outcome.exit, ExitKind::Code(0), "{r:?}");
    assert!(r.stderr.contains("403 Forbidden"), "{r:?}");
    let r = sh(
        &mut vm,
        &nc_proxy("CONNECT denied.test:443 HTTP/1.1\\r\\nHost: denied.test:443\\r\\n\\r\\n"),
    );
    assert!(r.stdout.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{r:?}");
    assert!(r.stdout.contains("X-Mxc-Deny: default deny\r\n"), "{r:?}");
    assert!(
        r.stdout.contains("egress to denied.test:443 is denied"),
        "{r:?}"
    );

    // Without the proxy there is no route: no direct TCP, no UDP, no DNS.
    let addr = &lab.addr;
    let r = sh(
        &mut vm,
        &format!(
            "nc -w 5 {addr} 80 </dev/null; echo tcp=$?; \
             nslookup allowed.test {addr}; echo dns=$?; \
             env -u http_proxy -u HTTP_PROXY wget -q -O- http://allowed.test/; echo plain=$?"
        ),
    );
    assert!(r.stdout.contains("tcp=1\n"), "{r:?}");
    assert!(r.stdout.contains("dns=1\n"), "{r:?}");
    assert!(r.stdout.contains("plain=1\n"), "{r:?}");
    assert!(r.stderr.contains("Network is unreachable"), "{r:?}");
    assert!(r.stderr.contains("bad address 'allowed.test'"), "{r:?}");
    assert!(lab
        .wait_for_file("udp.log", Duration::from_secs(1))
        .is_none());

    // Several connections at once through the guest's relay.
    let r = sh(
        &mut vm,
        "i=0; while [ $i -lt 8 ]; do \
         wget -q -O /tmp/slow.$i http://allowed.test/slow & i=$((i+1)); done; wait; \
         cat /tmp/slow.* | grep -c '^ok$'",
    );
    assert_eq!(r.stdout, "8\n", "{r:?}");
    assert!(lab.get("/max").trim().parse::<u32>().unwrap() > 1);

    // 1 MiB arrives intact.
    let n = 1 << 20;
    let r = sh(
        &mut vm,
        &format!("wget -q -O- http://allowed.test/blob/{n} | sha256sum"),
    );
    let sent = lab
        .wait_for_file(&format!("blob-{n}.sha256"), Duration::from_secs(60))
        .expect("the lab recorded what it sent");
    assert_eq!(
        r.stdout.split_whitespace().next(),
        Some(sent.trim()),
        "{r:?}"
    );

    // Stop ends the proxy too: every decision is in the audit log, and nothing is left.
    vm.stop().expect("stop");
    vm.deprovision().expect("deprovision");
    let lines = audit_lines(&audit);
    let allowed = lines
        .iter()
        .filter(|l| l["host"] == "allowed.test" && l["action"] == "allow")
        .count();
    let denied: Vec<_> = lines
        .iter()
        .filter(|l| l["host"] == "denied.test")
        .collect();
    assert_eq!(allowed, 1 + 1 + 8 + 1, "{lines:#?}");
    assert_eq!(denied.len(), 2, "{lines:#?}");
    assert!(denied
        .iter()
        .all(|l| l["action"] == "deny" && l["rule"] == "default deny"));
    assert!(lines
        .iter()
        .all(|l| l["sandbox"] == serde_json::json!(spec.id)));
    assert!(lines.iter().any(|l| l["kind"] == "connect"));
    assert!(notices
        .lock()
        .unwrap()
        .iter()
        .any(|n| n.contains("egress to denied.test:443 is denied")));
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("mxc-vm-{}", spec.id))
        })
        .collect();
    assert!(left.is_empty(), "runtime files are left: {left:?}");
    assert!(pids_with(&format!("mxc-vm-{}", spec.id)).is_empty());
}

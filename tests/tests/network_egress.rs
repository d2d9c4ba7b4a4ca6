//! End-to-end tests of network egress on the process tiers: the real `mxc-vm` binary
//! runs `curl` (and Python) in a sandbox whose only way out is the host's policy proxy,
//! against servers in a network namespace made for each test (see `tests::net`). Names
//! resolve through a hosts file given to the proxy (`MXC_VM_PROXY_HOSTS`); nothing here
//! touches the internet. Every case runs on both backends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use tests::net::NetLab;
use tests::{code, mxc_vm_bin, stderr, stdout, TempDir};

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod process {
            $(#[test] fn $name() { super::$name("process"); })*
        }
        mod bubblewrap {
            $(#[test] fn $name() { super::$name("bubblewrap"); })*
        }
    };
}

both_backends!(
    https_to_an_allowed_name_works_and_a_denied_one_says_why,
    plain_http_is_forwarded_and_refusals_carry_the_rule,
    wildcards_match_any_depth_but_not_the_apex,
    port_scoped_rules_allow_only_their_port,
    deny_rules_beat_allow_rules,
    direct_connections_udp_and_dns_have_no_route,
    tls_naming_another_host_is_refused,
    names_resolving_to_private_or_metadata_addresses_are_refused,
    an_ip_rule_opts_a_loopback_address_in,
    without_the_proxy_variables_there_is_no_route,
    the_audit_log_has_one_line_per_decision,
    many_concurrent_connections,
    one_gib_through_the_proxy_keeps_its_checksum,
    mxc_legacy_allowed_hosts_are_enforced,
    mxc_directional_cidr_rules_with_ports_are_enforced,
    egress_chains_through_the_upstream_proxy,
    allow_all_never_shares_the_host_network,
);

const LAB_NAMES: &[&str] = &[
    "allowed.test",
    "denied.test",
    "a.wild.test",
    "a.b.c.wild.test",
    "wild.test",
    "ok.mix.test",
    "bad.mix.test",
];

/// A lab with every test name pointing at it.
fn lab() -> (NetLab, String) {
    let lab = NetLab::new(&["allowed.test", "denied.test"]);
    let hosts = lab
        .hosts(
            LAB_NAMES,
            &[
                ("10.255.255.1", "private.test"),
                ("169.254.169.254", "meta.test"),
                ("127.0.0.1", "loop.test"),
            ],
        )
        .display()
        .to_string();
    (lab, hosts)
}

fn write_policy(dir: &Path, text: &str) -> String {
    let path = dir.join(format!(
        "policy-{}.json",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A native policy with these egress rules.
fn egress(lab: &NetLab, allow: &[&str], deny: &[&str]) -> String {
    let json = serde_json::json!({
        "version": "1",
        "network": {"egress": {"default": "deny", "allow": allow, "deny": deny}},
    });
    write_policy(lab.dir(), &json.to_string())
}

/// `mxc-vm run --backend B --policy P --ro LABDIR [extra] -- sh -c SCRIPT` with the
/// lab's hosts file.
fn run_sh(
    backend: &str,
    lab: &NetLab,
    hosts: &str,
    policy: &str,
    extra: &[&str],
    script: &str,
) -> Output {
    let mut args = vec![
        "run",
        "--backend",
        backend,
        "--policy",
        policy,
        "--ro",
        lab.dir().to_str().unwrap(),
        "--timeout",
        "120s",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "/bin/sh", "-c", script]);
    Command::new(mxc_vm_bin())
        .args(&args)
        .env("MXC_VM_PROXY_HOSTS", hosts)
        .stdin(Stdio::null())
        .output()
        .expect("spawn mxc-vm")
}

fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn https_to_an_allowed_name_works_and_a_denied_one_says_why(backend: &str) {
    let (lab, hosts) = lab();
    let p = egress(&lab, &["allowed.test"], &[]);
    let ca = lab.path("cert.pem");

    let ok = run_sh(
        backend,
        &lab,
        &hosts,
        &p,
        &[],
        &format!("curl -sS --cacert {ca} https://allowed.test/"),
    );
    let denied = run_sh(
        backend,
        &lab,
        &hosts,
        &p,
        &[],
        &format!("curl -sS -v --cacert {ca} https://denied.test/"),
    );

    assert_eq!(code(&ok), 0, "{}", stderr(&ok));
    assert_eq!(stdout(&ok), "hello from the lab: allowed.test /\n");
    assert_ne!(code(&denied), 0);
    let err = stderr(&denied);
    assert!(err.contains("CONNECT tunnel failed, response 403"), "{err}");
    assert!(err.contains("< X-Mxc-Deny: default deny"), "{err}");
    assert!(
        err.contains("mxc-vm: network: egress to denied.test:443 is denied"),
        "{err}"
    );
}

fn plain_http_is_forwarded_and_refusals_carry_the_rule(backend: &str) {
    let (lab, hosts) = lab();
    let p = egress(&lab, &["allowed.test"], &[]);

    let out = run_sh(
        backend,
        &lab,
        &hosts,
        &p,
        &[],
        "curl -sS http://allowed.test/page?x=1; curl -sS -i http://denied.test/",
    );

    let text = stdout(&out);
    assert!(
        text.starts_with("hello from the lab: allowed.test /page?x=1\n"),
        "{text}"
    );
    assert!(text.contains("HTTP/1.1 403 Forbidden"), "{text}");
    assert!(text.contains("X-Mxc-Deny: default deny"), "{text}");
    assert!(
        text.contains("mxc-vm: egress to denied.test:80 is denied"),
        "{text}"
    );
}

/// `curl -s -o /dev/null -w CODE` for each URL, through the sandbox's proxy.
fn status_codes(backend: &str, lab: &NetLab, hosts: &str, policy: &str, urls: &[&str]) -> String {
    let script: String = urls
        .iter()
        .map(|u| format!("curl -s -o /dev/null -w '%{{http_code}} ' {u}; "))
        .collect();
    let out = run_sh(backend, lab, hosts, policy, &[], &script);
    stdout(&out).trim().to_string()
}

fn wildcards_match_any_depth_but_not_the_apex(backend: &str) {
    let (lab, hosts) = lab();
    let p = egress(&lab, &["*.wild.test"], &[]);

    let codes = status_codes(
        backend,
        &lab,
        &hosts,
        &p,
        &[
            "http://a.wild.test/",
            "http://a.b.c.wild.test/",
            "http://wild.test/",
        ],
    );

    assert_eq!(codes, "200 200 403");
}

fn port_scoped_rules_allow_only_their_port(backend: &str) {
    let (lab, hosts) = lab();
    let p = egress(&lab, &["allowed.test:8081"], &[]);

    let codes = status_codes(
        backend,
        &lab,
        &hosts,
        &p,
        &["http://allowed.test:8081/", "http://allowed.test/"],
    );

    assert_eq!(codes, "200 403");
}

fn deny_rules_beat_allow_rules(backend: &str) {
    let (lab, hosts) = lab();
    let p = egress(&lab, &["*.mix.test"], &["bad.mix.test"]);

    let out = run_sh(
        backend,
        &lab,
        &hosts,
        &p,
        &[],
        "curl -s -o /dev/null -w '%{http_code} ' http://ok.mix.test/; \
         curl -s -i http://bad.mix.test/ | grep -i x-mxc-deny",
    );

    let text = stdout(&out);
    assert!(text.starts_with("200 "), "{text}");
    assert!(
        text.contains("X-Mxc-Deny: network.egress.deny[0] bad.mix.test"),
        "{text}"
    );
}

fn direct_connections_udp_and_dns_have_no_route(backend: &str) {
    let (lab, hosts) = lab();
    let p = egress(&lab, &["allowed.test"], &[]);
    let host_server = TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = host_server.local_addr().unwrap().port();
    let script = format!(
        r#"
import socket
def tcp(addr, port):
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect((addr, port)); return "CONNECTED"
    except OSError as e:
        return "FAILED"
print("tcp-lab", tcp("{lab}", 80))
print("tcp-host-loopback", tcp("127.0.0.1", {host_port}))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"x" * 32, ("{lab}", 53)); print("udp SENT")
except OSError as e:
    print("udp FAILED")
q = bytes.fromhex("abcd01000001000000000000") + b"\x07allowed\x04test\x00\x00\x01\x00\x01"
try:
    u.settimeout(2); u.sendto(q, ("127.0.0.1", 53)); u.recvfrom(512); print("dns ANSWERED")
except OSError as e:
    print("dns FAILED")
try:
    socket.getaddrinfo("allowed.test", 80); print("resolve RESOLVED")
except OSError as e:
    print("resolve FAILED")
"#,
        lab = lab.addr
    );

    let out = run_sh(
        backend,
        &lab,
        &hosts,
        &p,
        &[],
        &format!("python3 -c '{}'", script.replace('\'', "\"")),
    );
    std::thread::sleep(std::time::Duration::from_millis(300));

    let text = stdout(&out);
    for want in [
        "tcp-lab FAILED",
        "tcp-host-loopback FAILED",
        "udp FAILED",
        "dns FAILED",
        "resolve FAILED",
    ] {
        assert!(text.contains(want), "{want}: {text}\n{}", stderr(&out));
    }
    assert!(
        !lab.dir().join("udp.log").exists(),
        "a datagram reached the lab"
    );
    drop(host_server);
}

fn tls_naming_another_host_is_refused(backend: &str) {
    let (lab, hosts) = lab();
    let p = egress(&lab, &["allowed.test"], &[]);
    let audit = TempDir::new("sni-audit");
    let log = audit.s("audit.jsonl");
    let ca = lab.path("cert.pem");

    // curl asks the proxy for allowed.test but says denied.test in its TLS hello.
    let out = run_sh(
        backend,
        &lab,
        &hosts,
        &p,
        &["--audit", &log],
        &format!(
            "curl -sS --cacert {ca} --connect-to denied.test:443:allowed.test:443 \
             https://denied.test/"
        ),
    );

    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("alert access denied"),
        "{}",
        stderr(&out)
    );
    let lines = audit_lines(Path::new(&log));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["rule"], "sni-mismatch denied.test");
    assert_eq!(lines[0]["host"], "allowed.test");
    assert_eq!(lines[0]["action"], "deny");
}

fn names_resolving_to_private_or_metadata_addresses_are_refused(backend: &str) {
    let (lab, hosts) = lab();
    let p = egress(&lab, &["private.test", "meta.test", "loop.test"], &[]);

    let out = run_sh(
        backend,
        &lab,
        &hosts,
        &p,
        &[],
        "for h in private.test meta.test loop.test; do \
           curl -s -i http://$h/latest/meta-data/ | grep -i x-mxc-deny; done",
    );

    let text = stdout(&out);
    assert!(
        text.contains("X-Mxc-Deny: private-address 10.255.255.1"),
        "{text}"
    );
    assert!(
        text.contains("X-Mxc-Deny: metadata-address 169.254.169.254"),
        "{text}"
    );
    assert!(
        text.contains("X-Mxc-Deny: loopback-address 127.0.0.1"),
        "{text}"
    );
}

/// A one-shot HTTP server on the host's loopback answering `body`.
fn host_http_server(body: &'static str) -> (u16, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (port, t)
}

fn an_ip_rule_opts_a_loopback_address_in(backend: &str) {
    let (lab, hosts) = lab();
    let (port, server) = host_http_server("host loopback service\n");
    let rule = format!("127.0.0.1:{port}");
    let p = egress(&lab, &["loop.test", &rule], &[]);

    let out = run_sh(
        backend,
        &lab,
        &hosts,
        &p,
        &[],
        &format!("curl -sS http://loop.test:{port}/"),
    );
    server.join().unwrap();

    assert_eq!(stdout(&out), "host loopback service\n", "{}", stderr(&out));
}

fn without_the_proxy_variables_there_is_no_route(backend: &str) {
    let (lab, hosts) = lab();
    let p = egress(&lab, &["allowed.test"], &[]);

    let out = run_sh(
        backend,
        &lab,
        &hosts,
        &p,
        &[],
        &format!(
            "unset HTTP_PROXY http_proxy HTTPS_PROXY https_proxy ALL_PROXY all_proxy; \
             curl -sS -m 5 http://allowed.test/; echo by-name=$?; \
             curl -sS -m 5 http://{}/; echo by-address=$?",
            lab.addr
        ),
    );

    let text = stdout(&out);
    assert!(text.contains("by-name=6"), "{text} {}", stderr(&out));
    assert!(text.contains("by-address=7"), "{text} {}", stderr(&out));
    assert!(!text.contains("hello from the lab"), "{text}");
}

fn the_audit_log_has_one_line_per_decision(backend: &str) {
    let (lab, hosts) = lab();
    let p = egress(&lab, &["allowed.test", "*.wild.test"], &[]);
    let audit = TempDir::new("audit");
    let log = audit.s("audit.jsonl");
    let ca = lab.path("cert.pem");

    let out = run_sh(
        backend,
        &lab,
        &hosts,
        &p,
        &["--audit", &log],
        &format!(
            "curl -s -o /dev/null http://allowed.test/; \
             curl -s -o /dev/null --cacert {ca} https://allowed.test/; \
             curl -s -o /dev/null http://a.wild.test:8081/; \
             curl -s -o /dev/null http://denied.test/; \
             curl -s -o /dev/null https://denied.test/; true"
        ),
    );
    let mut lines = audit_lines(Path::new(&log));
    // Lines are written when connections close; their times are when they were decided.
    lines.sort_by(|a, b| a["time"].as_str().cmp(&b["time"].as_str()));

    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let summary: Vec<String> = lines
        .iter()
        .map(|l| {
            format!(
                "{} {} {}:{} {}",
                l["action"].as_str().unwrap(),
                l["kind"].as_str().unwrap(),
                l["host"].as_str().unwrap(),
                l["port"],
                l["status"]
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            "allow http allowed.test:80 200",
            "allow connect allowed.test:443 200",
            "allow http a.wild.test:8081 200",
            "deny http denied.test:80 403",
            "deny connect denied.test:443 403",
        ]
    );
    let first = &lines[0];
    assert_eq!(first["resolved"], format!("{}:80", lab.addr));
    assert_eq!(first["rule"], "network.egress.allow[0] allowed.test");
    assert!(first["bytes_up"].as_u64().unwrap() > 0);
    assert!(first["bytes_down"].as_u64().unwrap() > 0);
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
    assert!(first["sandbox"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(lines[3]["rule"], "default deny");
    assert_eq!(lines[3]["resolved"], serde_json::Value::Null);
}

fn many_concurrent_connections(backend: &str) {
    let (lab, hosts) = lab();
    let p = egress(&lab, &["allowed.test"], &[]);
    let audit = TempDir::new("many");
    let log = audit.s("audit.jsonl");

    // 250 transfers at once; the server holds each for 2 s.
    let out = run_sh(
        backend,
        &lab,
        &hosts,
        &p,
        &["--audit", &log],
        "curl -s -Z --parallel-immediate --parallel-max 250 -o /dev/null \
         -w '%{http_code}\\n' 'http://allowed.test/slow?[1-250]'",
    );
    let max: usize = lab.get("/max").trim().parse().unwrap();

    let codes = stdout(&out);
    assert_eq!(
        codes.lines().filter(|l| *l == "200").count(),
        250,
        "{codes} {}",
        stderr(&out)
    );
    assert!(max >= 200, "only {max} requests were in flight at once");
    assert_eq!(audit_lines(Path::new(&log)).len(), 250);
}

fn one_gib_through_the_proxy_keeps_its_checksum(backend: &str) {
    let (lab, hosts) = lab();
    let p = egress(&lab, &["allowed.test"], &[]);
    let size: u64 = 1 << 30;
    let hasher = "import hashlib,sys\nh=hashlib.sha256()\nn=0\n\
                  while True:\n  b=sys.stdin.buffer.read(1<<20)\n  \
                  if not b: break\n  h.update(b); n+=len(b)\nprint(n, h.hexdigest())";

    let start = std::time::Instant::now();
    let out = run_sh(
        backend,
        &lab,
        &hosts,
        &p,
        &[],
        &format!("curl -sS http://allowed.test/blob/{size} | python3 -c '{hasher}'"),
    );
    let took = start.elapsed();
    let expected = lab
        .wait_for_file(
            &format!("blob-{size}.sha256"),
            std::time::Duration::from_secs(10),
        )
        .expect("the server's checksum");

    assert_eq!(
        stdout(&out).trim(),
        format!("{size} {expected}"),
        "{}",
        stderr(&out)
    );
    eprintln!("1 GiB through the proxy on {backend}: {took:?}");
}

fn mxc_legacy_allowed_hosts_are_enforced(backend: &str) {
    let (lab, hosts) = lab();
    let p = write_policy(
        lab.dir(),
        r#"{"version":"0.8.0-alpha","containment":"process",
            "process":{"commandLine":"true"},
            "network":{"defaultPolicy":"deny","allowedHosts":["allowed.test"],
                       "blockedHosts":["bad.mix.test"]}}"#,
    );

    let codes = status_codes(
        backend,
        &lab,
        &hosts,
        &p,
        &["http://allowed.test/", "http://denied.test/"],
    );

    assert_eq!(codes, "200 403");
}

fn mxc_directional_cidr_rules_with_ports_are_enforced(backend: &str) {
    let (lab, hosts) = lab();
    let cidr = format!(
        "{}/30",
        lab.addr
            .rsplit_once('.')
            .map_or(String::new(), |(net, last)| {
                let base = last.parse::<u32>().unwrap() & !3;
                format!("{net}.{base}")
            })
    );
    let p = write_policy(
        lab.dir(),
        &serde_json::json!({
            "version": "0.8.0-alpha",
            "process": {"commandLine": "true"},
            "network": {"egress": {"default": "deny", "allow": [
                {"to": [{"cidr": cidr}], "ports": [{"protocol": "tcp", "port": 80}]}
            ]}},
        })
        .to_string(),
    );
    let a = &lab.addr;

    let codes = status_codes(
        backend,
        &lab,
        &hosts,
        &p,
        &[&format!("http://{a}/"), &format!("http://{a}:8081/")],
    );

    assert_eq!(codes, "200 403");
}

/// A policy proxy in this test process, standing in for a corporate proxy: it allows
/// the lab's names and resolves them through the lab's hosts file.
fn upstream_proxy(
    hosts: &str,
) -> (
    sandbox::proxy::Proxy,
    sandbox::proxy::Server,
    String,
    TempDir,
) {
    use sandbox::proxy::{AuditLog, HostsResolver, Proxy, ProxyConfig};
    let dir = TempDir::new("upstream");
    let spec = policy::parse_rule("allowed.test").unwrap();
    let network = policy::Network {
        egress: policy::Egress {
            default: policy::Action::Deny,
            allow: vec![policy::NetRule {
                target: spec.target,
                ports: spec.ports,
                protocol: policy::Protocol::Tcp,
                origin: policy::Origin::Flag("upstream".into()),
            }],
            deny: Vec::new(),
        },
        ..policy::Network::default()
    };
    let mut config = ProxyConfig::from_policy("upstream", &network, &policy::Limits::default());
    config.resolver = std::sync::Arc::new(HostsResolver::from_file(Path::new(hosts)).unwrap());
    config.audit = Some(std::sync::Arc::new(
        AuditLog::open(&dir.join("audit.jsonl")).unwrap(),
    ));
    let proxy = Proxy::new(config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = proxy.serve(listener).unwrap();
    (proxy, server, url, dir)
}

/// Through an upstream proxy (`runtimeConfig.networkProxy`), and the attack of review hole
/// 6: allowed names that resolve to a metadata or loopback address are refused here, and
/// never handed to the upstream proxy to resolve and reach.
fn egress_chains_through_the_upstream_proxy(backend: &str) {
    let (lab, hosts) = lab();
    let (upstream, server, url, dir) = upstream_proxy(&hosts);
    let p = write_policy(
        lab.dir(),
        &serde_json::json!({
            "version": "0.8.0-alpha",
            "process": {"commandLine": "true"},
            "network": {
                "defaultPolicy": "deny",
                "allowedHosts": ["allowed.test", "denied.test", "meta.test", "loop.test"]
            },
            "runtimeConfig": {"networkProxy": url},
        })
        .to_string(),
    );
    let ca = lab.path("cert.pem");

    let out = run_sh(
        backend,
        &lab,
        &hosts,
        &p,
        &[],
        &format!(
            "curl -sS --cacert {ca} https://allowed.test/; curl -sS http://allowed.test/; \
             curl -s -o /dev/null -w '%{{http_code}}' http://denied.test/; \
             curl -s -o /dev/null -w ' %{{http_code}}' http://meta.test/latest/meta-data; \
             curl -s -o /dev/null -w ' %{{http_code}}' http://loop.test/"
        ),
    );
    server.stop();
    upstream.shutdown();
    let theirs = audit_lines(&dir.join("audit.jsonl"));

    assert_eq!(
        stdout(&out),
        "hello from the lab: allowed.test /\nhello from the lab: allowed.test /\n403 403 403",
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("metadata address"),
        "{}",
        stderr(&out)
    );
    let mut seen: Vec<String> = theirs
        .iter()
        .map(|l| format!("{} {} {}", l["action"], l["kind"], l["host"]))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            r#""allow" "connect" "allowed.test""#,
            r#""allow" "http" "allowed.test""#,
            r#""deny" "http" "denied.test""#,
        ]
    );
}

/// Allow-all never shares the host's network namespace (with or without `--audit`): a
/// host loopback listener and a host abstract Unix socket are out of reach, and through
/// the proxy loopback is still refused (403) because no IP rule names it.
fn allow_all_never_shares_the_host_network(backend: &str) {
    use std::os::linux::net::SocketAddrExt;
    let dir = TempDir::new("allowall");
    let p = write_policy(
        dir.path(),
        r#"{"version":"1","network":{"egress":{"default":"allow"}}}"#,
    );
    let audit = dir.s("audit.jsonl");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let name = format!("mxc-test-allowall-{}-{backend}", std::process::id());
    let abstract_addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
    let _abstract = std::os::unix::net::UnixListener::bind_addr(&abstract_addr).unwrap();
    let probe = format!(
        "import socket,os,urllib.request\n\
         s=socket.socket(); s.settimeout(3)\n\
         try:\n  s.connect((\"127.0.0.1\",{port})); print(\"tcp CONNECTED\")\n\
         except OSError: print(\"tcp FAILED\")\n\
         u=socket.socket(socket.AF_UNIX)\n\
         try:\n  u.connect(\"\\0{name}\"); print(\"abstract CONNECTED\")\n\
         except OSError: print(\"abstract FAILED\")\n\
         os.environ.pop(\"NO_PROXY\", None); os.environ.pop(\"no_proxy\", None)\n\
         try:\n  urllib.request.urlopen(\"http://127.0.0.1:{port}/\", timeout=5); print(\"proxy OPEN\")\n\
         except urllib.error.HTTPError as e: print(\"proxy\", e.code)\n\
         except OSError as e: print(\"proxy error\", e)\n\
         print(\"env\", os.environ.get(\"HTTP_PROXY\"))"
    );
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--backend", backend, "--policy", &p];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "python3", "-c", &probe]);
        tests::mxc_vm(&args)
    };

    for out in [run(&[]), run(&["--audit", &audit])] {
        assert_eq!(
            stdout(&out),
            "tcp FAILED\nabstract FAILED\nproxy 403\nenv http://127.0.0.1:3128\n",
            "{}",
            stderr(&out)
        );
    }
    drop(listener);
}

#[test]
fn policy_explain_shows_the_effective_egress_rules() {
    let dir = TempDir::new("explain-net");
    let p = write_policy(
        dir.path(),
        r#"{"version":"1","network":{"egress":{"default":"deny",
            "allow":["*.pythonhosted.org:443","10.1.0.0/16:80-90"],"deny":["evil.pythonhosted.org"]},
            "upstreamProxy":"http://proxy.corp.test:3128"}}"#,
    );

    let out = tests::mxc_vm(&["policy", "explain", &p]);

    let text = stdout(&out);
    let deny = text.find("evil.pythonhosted.org").unwrap();
    let allow = text.find("*.pythonhosted.org:443").unwrap();
    assert!(deny < allow, "deny rules are listed first: {text}");
    assert!(text.contains("10.1.0.0/16:80-90"), "{text}");
    assert!(text.contains("http://proxy.corp.test:3128"), "{text}");
}

//! Invalid policies, native and MXC: each error must name the right field (JSON path),
//! point at it (line:column of the given token), and say what was wrong.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{parse, pos_of};

/// One invalid policy.
struct Case {
    text: &'static str,
    /// Expected JSON path of the field at fault.
    path: &'static str,
    /// The token the error must point at (first occurrence); None: position not checked.
    at: Option<&'static str>,
    /// A part of the expected message.
    message: &'static str,
    /// A part of the expected hint.
    hint: Option<&'static str>,
}

const fn case(
    text: &'static str,
    path: &'static str,
    at: Option<&'static str>,
    message: &'static str,
    hint: Option<&'static str>,
) -> Case {
    Case {
        text,
        path,
        at,
        message,
        hint,
    }
}

const NATIVE: &[Case] = &[
    case(
        "{\n  \"version\": \"1\",\n  \"filesytem\": {}\n}",
        "filesytem",
        Some("\"filesytem\""),
        "unknown field \"filesytem\"",
        Some("did you mean \"filesystem\"?"),
    ),
    case(
        "{\"version\": \"1\",\n \"filesystem\": {\n   \"readonlyPaths\": [\"/data\"]}}",
        "filesystem.readonlyPaths",
        Some("\"readonlyPaths\""),
        "unknown field \"readonlyPaths\"",
        Some("did you mean \"readonly\"?"),
    ),
    case(
        "{\"version\": \"1\",\n \"filesystem\": {\n   \"readonly\": [\"/a\", \"/b\", 5]}}",
        "filesystem.readonly[2]",
        Some("5]"),
        "expected an absolute or relative path string, found a number (5)",
        None,
    ),
    case(
        "{\"version\": \"1\", \"filesystem\": {\"readwrite\": [\"\"]}}",
        "filesystem.readwrite[0]",
        Some("\"\""),
        "empty path",
        Some("write \".\""),
    ),
    case(
        "{\"version\": \"1\",\n \"filesystem\": {\"readwrite\": [\"/tmp\", \"/\"]}}",
        "filesystem.readwrite[1]",
        Some("\"/\""),
        "\"/\" cannot be readwrite",
        Some("grant the directories"),
    ),
    case(
        "{\"version\": \"1\", \"filesystem\": {\"readwrite\": [\"/tmp/..\"]}}",
        "filesystem.readwrite[0]",
        Some("\"/tmp/..\""),
        "\"/\" cannot be readwrite",
        None,
    ),
    case(
        "{\"version\": \"1\", \"filesystem\": {\"denied\": \"/etc\"}}",
        "filesystem.denied",
        Some("\"/etc\""),
        "expected an array, found the string \"/etc\"",
        None,
    ),
    case(
        "{\n  \"version\": \"2\"\n}",
        "version",
        Some("\"2\""),
        "unsupported policy version \"2\"",
        Some("native format \"1\""),
    ),
    case(
        "{\"version\": 1}",
        "version",
        Some("1}"),
        "expected a version string, found a number (1)",
        Some("write \"version\": \"1\""),
    ),
    case(
        "{\"process\": {\"argv\": [\"ls\"]}}",
        "",
        Some("{"),
        "missing \"version\"",
        Some("\"version\": \"1\""),
    ),
    case(
        "{\"version\": \"1\",\n \"containment\": \"bubblwrap\"}",
        "containment",
        Some("\"bubblwrap\""),
        "unknown value \"bubblwrap\"",
        Some("did you mean \"bubblewrap\"?"),
    ),
    case(
        "{\"version\": \"1\", \"containment\": 5}",
        "containment",
        Some("5}"),
        "expected a name (a string), found a number (5)",
        None,
    ),
    case(
        "{\"version\": \"1\", \"process\": {\"argv\": [\"ls\"],\n  \"command\": \"ls\"}}",
        "process.command",
        Some("\"command\""),
        "set either argv or command, not both",
        Some("/bin/sh -c"),
    ),
    case(
        "{\"version\": \"1\", \"process\": {\"argv\": []}}",
        "process.argv",
        Some("[]"),
        "argv is empty",
        None,
    ),
    case(
        "{\"version\": \"1\", \"process\": {\"argv\": [\"\", \"x\"]}}",
        "process.argv[0]",
        Some("\"\""),
        "the program name is empty",
        None,
    ),
    case(
        "{\"version\": \"1\", \"process\": {\"argv\": [\"a\", \"b\\u0000\"]}}",
        "process.argv[1]",
        Some("\"b\\u0000\""),
        "contains a NUL byte",
        None,
    ),
    case(
        "{\"version\": \"1\", \"process\": {\"command\": \"  \"}}",
        "process.command",
        Some("\"  \""),
        "empty command line",
        None,
    ),
    case(
        "{\"version\": \"1\",\n \"process\": {\"env\": [\"NOEQUALS\"]}}",
        "process.env[0]",
        Some("\"NOEQUALS\""),
        "is not KEY=VALUE",
        Some("write \"NOEQUALS=value\""),
    ),
    case(
        "{\"version\": \"1\", \"process\": {\"env\": [\"A=1\", \"1A=x\"]}}",
        "process.env[1]",
        Some("\"1A=x\""),
        "\"1A\" is not a valid variable name",
        Some("start with a letter"),
    ),
    case(
        "{\"version\": \"1\", \"process\": {\"env\": [\"A=1\", \"B=2\",\n   \"A=3\"]}}",
        "process.env[2]",
        Some("\"A=3\""),
        "variable \"A\" is already set by process.env[0]",
        None,
    ),
    case(
        "{\"version\": \"1\", \"process\": {\"timeout\": \"30\"}}",
        "process.timeout",
        Some("\"30\""),
        "has no unit",
        Some("write \"30s\""),
    ),
    case(
        "{\"version\": \"1\", \"process\": {\"timeout\": 30}}",
        "process.timeout",
        Some("30}"),
        "expected a duration string such as \"30s\"",
        Some("write \"30s\""),
    ),
    case(
        "{\"version\": \"1\", \"process\": {\"timeout\": \"1.5s\"}}",
        "process.timeout",
        Some("\"1.5s\""),
        "fractions are not supported",
        Some("1500ms"),
    ),
    case(
        "{\"version\": \"1\", \"network\": {\"egress\": {\"allow\": [\"pypi.org\",\n \"*\"]}}}",
        "network.egress.allow[1]",
        Some("\"*\""),
        "\"*\" alone would match every host",
        Some("\"default\": \"allow\""),
    ),
    case(
        "{\"version\": \"1\", \"network\": {\"egress\": {\"allow\": [\"*.com\"]}}}",
        "network.egress.allow[0]",
        Some("\"*.com\""),
        "public suffix \"com\"",
        Some("*.example.com"),
    ),
    case(
        "{\"version\": \"1\", \"network\": {\"egress\": {\"deny\": [\"*.co.uk:443\"]}}}",
        "network.egress.deny[0]",
        Some("\"*.co.uk:443\""),
        "public suffix \"co.uk\"",
        None,
    ),
    case(
        "{\"version\": \"1\", \"network\": {\"egress\": {\"allow\": [\"example.com:0\"]}}}",
        "network.egress.allow[0]",
        Some("\"example.com:0\""),
        "\"0\" is not a valid port",
        None,
    ),
    case(
        "{\"version\": \"1\", \"network\": {\"egress\": {\"allow\": [\"example.com:70000\"]}}}",
        "network.egress.allow[0]",
        Some("\"example.com:70000\""),
        "\"70000\" is not a valid port",
        None,
    ),
    case(
        "{\"version\": \"1\", \"network\": {\"egress\": {\"allow\": [\"example.com:90-80\"]}}}",
        "network.egress.allow[0]",
        Some("\"example.com:90-80\""),
        "port range 90-80 is reversed",
        None,
    ),
    case(
        "{\"version\": \"1\", \"network\": {\"egress\": {\"allow\": [\"10.1.2.3/16:80\"]}}}",
        "network.egress.allow[0]",
        Some("\"10.1.2.3/16:80\""),
        "has host bits set",
        Some("the network address is 10.1.0.0/16"),
    ),
    case(
        "{\"version\": \"1\", \"network\": {\"egress\": {\"allow\": [\"10.0.0.0/40\"]}}}",
        "network.egress.allow[0]",
        Some("\"10.0.0.0/40\""),
        "prefix /40 is too long for IPv4",
        None,
    ),
    case(
        "{\"version\": \"1\", \"network\": {\"egress\": {\"allow\": [\"bücher.de\"]}}}",
        "network.egress.allow[0]",
        Some("\"bücher.de\""),
        "is not ASCII",
        Some("punycode"),
    ),
    case(
        "{\"version\": \"1\", \"network\": {\"egress\": {\"allow\": [\"[2001:db8::1]:0\"]}}}",
        "network.egress.allow[0]",
        Some("\"[2001:db8::1]:0\""),
        "not a valid port",
        None,
    ),
    case(
        "{\"version\": \"1\", \"network\": {\"egress\": {\"default\": \"block\"}}}",
        "network.egress.default",
        Some("\"block\""),
        "unknown value \"block\"",
        Some("expected one of \"allow\", \"deny\""),
    ),
    case(
        "{\"version\": \"1\", \"network\": {\"upstreamProxy\": \"https://p.example:3128\"}}",
        "network.upstreamProxy",
        Some("\"https://p.example:3128\""),
        "is not an http:// proxy URL",
        None,
    ),
    case(
        "{\"version\": \"1\",\n \"limits\": {\"memoryMiB\": 8}}",
        "limits.memoryMiB",
        Some("8}"),
        "8 MiB is outside 16 to 1048576 MiB",
        None,
    ),
    case(
        "{\"version\": \"1\", \"limits\": {\"vcpus\": 65}}",
        "limits.vcpus",
        Some("65}"),
        "65 vCPUs is outside 1 to 64",
        None,
    ),
    case(
        "{\"version\": \"1\", \"limits\": {\"vcpus\": 1, \"pids\": 0}}",
        "limits.pids",
        Some("0}"),
        "must be greater than zero",
        None,
    ),
    case(
        "{\"version\": \"1\", \"limits\": {\"diskMiB\": 0}}",
        "limits.diskMiB",
        Some("0}"),
        "must be greater than zero",
        None,
    ),
    case(
        "{\"version\": \"1\", \"limits\": {\"diskMiB\": 18446744073709551615}}",
        "limits.diskMiB",
        Some("18446744073709551615}"),
        "18446744073709551615 MiB is too large",
        None,
    ),
    case(
        "{\"version\": \"1\", \"limits\": {\"outputBytes\": -1}}",
        "limits.outputBytes",
        Some("-1}"),
        "expected a whole number, 0 or more, found a number (-1)",
        None,
    ),
    case(
        "{\"version\": \"1\", \"limits\": {\"idleTimeout\": \"5d\"}}",
        "limits.idleTimeout",
        Some("\"5d\""),
        "unknown unit \"d\"",
        Some("units are h, m, s and ms"),
    ),
    case(
        "{\"version\": \"1\", \"limits\": {\"memoryMb\": 512}}",
        "limits.memoryMb",
        Some("\"memoryMb\""),
        "unknown field \"memoryMb\"",
        Some("did you mean \"memoryMiB\"?"),
    ),
    case(
        "{\"version\": \"1\", \"name\": 5}",
        "name",
        Some("5}"),
        "expected a string, found a number (5)",
        None,
    ),
    case(
        "{\"version\": \"1\",\n  \"process\": null,\n}",
        "",
        Some("}"),
        "invalid JSON: trailing comma",
        None,
    ),
    case(
        "[\"version\", \"1\"]",
        "",
        Some("["),
        "expected a JSON object at the top level",
        None,
    ),
    case(
        "{\"version\": \"1\"} {}",
        "",
        Some("{}"),
        "invalid JSON: trailing characters",
        None,
    ),
    case(
        "{\"version\": \"1\", \"process\": {}, \"process\": {}}",
        "",
        None,
        "field \"process\" is given twice",
        None,
    ),
];

const MXC: &[Case] = &[
    case(
        "{\"version\": \"0.7.0-alpha\", \"process\": {},\n \"network\": {\"egress\": {\"default\": \"deny\"}}}",
        "network.egress",
        Some("\"egress\""),
        "the directional egress rules need MXC 0.8 or later; this file is \"0.7.0-alpha\"",
        Some("set \"version\": \"0.8.0-alpha\", or use defaultPolicy/allowedHosts/blockedHosts"),
    ),
    case(
        "{\"version\": \"0.6.0-alpha\",\n \"containment\": \"seatbelt\", \"process\": {\"commandLine\": \"x\"}}",
        "containment",
        Some("\"seatbelt\""),
        "\"seatbelt\" is not supported by mxc-vm: it is a macOS backend",
        Some("use one of \"process\", \"bubblewrap\", \"vm\", \"hyperlight\", \"lxc\""),
    ),
    case(
        "{\"containment\": \"microvm\", \"process\": {\"commandLine\": \"x\"}}",
        "containment",
        Some("\"microvm\""),
        "NanVix",
        Some("use \"vm\""),
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"containment\": \"bubblewarp\", \"process\": {}}",
        "containment",
        Some("\"bubblewarp\""),
        "unknown value \"bubblewarp\"",
        Some("did you mean \"bubblewrap\"?"),
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"containment\": \"windows_sandbox\", \"process\": {}}",
        "containment",
        Some("\"windows_sandbox\""),
        "it is a Windows backend",
        None,
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {},\n \"filesystem\": {\"readonlyPath\": []}}",
        "filesystem.readonlyPath",
        Some("\"readonlyPath\""),
        "unknown field \"readonlyPath\"",
        Some("did you mean \"readonlyPaths\"?"),
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {}, \"filesystem\": {\"readwritePaths\": [\"/\"]}}",
        "filesystem.readwritePaths[0]",
        Some("\"/\""),
        "\"/\" cannot be readwrite",
        None,
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {},\n \"filesystem\": {\"deniedPaths\": [\"C:\\\\Users\"]}}",
        "filesystem.deniedPaths[0]",
        Some("\"C:"),
        "is a Windows path",
        Some("give the Linux path"),
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {\"timeout\": \"30s\"}}",
        "process.timeout",
        Some("\"30s\""),
        "expected a whole number, 0 or more, found the string \"30s\"",
        Some("whole milliseconds"),
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {\"timeout\": 5000000000}}",
        "process.timeout",
        Some("5000000000"),
        "more than the schema's maximum",
        None,
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {\"env\": [\"A=1\", \"A=2\"]}}",
        "process.env[1]",
        Some("\"A=2\""),
        "variable \"A\" is already set by process.env[0]",
        None,
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"containment\": \"bubblewrap\", \"process\": {},\n \"lxc\": {\"distribution\": \"alpine\"}}",
        "lxc",
        Some("\"lxc\""),
        "the lxc section belongs to containment \"lxc\"",
        Some("remove it"),
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {}, \"processContainer\": {\"leastPrivilege\": true}}",
        "processContainer",
        Some("\"processContainer\""),
        "Windows ProcessContainer settings",
        None,
    ),
    case(
        "{\"version\": \"0.9.0-dev\", \"process\": {}, \"experimental\": {\"telemetry\": {}}}",
        "experimental",
        Some("\"experimental\""),
        "experimental MXC features are not supported",
        None,
    ),
    case(
        "{\"version\": \"0.9.0-alpha\", \"phase\": \"provision\", \"process\": {}}",
        "phase",
        Some("\"phase\""),
        "state-aware lifecycle requests are not supported",
        None,
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {}, \"network\": {\"allowLocalNetwork\": true}}",
        "network.allowLocalNetwork",
        Some("true"),
        "inbound connections are not supported",
        None,
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {}, \"network\": {\"ingress\": {\"default\": \"deny\",\n \"hostLoopback\": \"allow\"}}}",
        "network.ingress.hostLoopback",
        Some("\"allow\""),
        "host-loopback traffic cannot be allowed",
        None,
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {}, \"network\": {\"egress\": {\"allow\": [\n {\"to\": [{\"cidr\": \"192.0.2.0/24\"}], \"ports\": [{\"protocol\": \"udp\", \"port\": 53}]}]}}}",
        "network.egress.allow[0].ports[0].protocol",
        Some("\"udp\""),
        "UDP egress cannot be allowed",
        Some("use \"tcp\""),
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {}, \"network\": {\"egress\": {\"allow\": [\n {\"ports\": [{\"protocol\": \"tcp\", \"endPort\": 90}]}]}}}",
        "network.egress.allow[0].ports[0].endPort",
        Some("\"endPort\""),
        "endPort requires port",
        None,
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {}, \"network\": {\"egress\": {\"allow\": [\n {\"ports\": [{\"port\": 90, \"endPort\": 80}]}]}}}",
        "network.egress.allow[0].ports[0].endPort",
        Some("80}"),
        "endPort 80 is below port 90",
        None,
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {}, \"network\": {\"egress\": {\"deny\": [\n {\"ports\": [{\"port\": 70000}]}]}}}",
        "network.egress.deny[0].ports[0].port",
        Some("70000"),
        "70000 is not a valid port",
        None,
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {}, \"network\": {\"egress\": {\"allow\": [\n {\"to\": [{\"cidr\": \"10.0.0.1/8\"}]}]}}}",
        "network.egress.allow[0].to[0].cidr",
        Some("\"10.0.0.1/8\""),
        "has host bits set",
        Some("the network address is 10.0.0.0/8"),
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {}, \"network\": {\"egress\": {\"allow\": [\n {\"to\": [{\"cidr\": \"10.0.0.0/8\", \"except\": [\"11.0.0.0/16\"]}]}]}}}",
        "network.egress.allow[0].to[0].except[0]",
        Some("\"11.0.0.0/16\""),
        "11.0.0.0/16 is not inside 10.0.0.0/8",
        None,
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {}, \"network\": {\"egress\": {\"allow\": [\n {\"to\": []}]}}}",
        "network.egress.allow[0].to",
        Some("[]"),
        "empty destination list",
        None,
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {}, \"network\": {\"egress\": {\"allow\": [\n {\"to\": [{\"host\": \"example.com\"}]}]}}}",
        "network.egress.allow[0].to[0].host",
        Some("\"host\""),
        "unknown field \"host\"",
        None,
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {}, \"network\": {\"defaultPolicy\": \"block\",\n \"egress\": {\"default\": \"deny\"}}}",
        "network.egress",
        Some("\"egress\""),
        "cannot be combined with the legacy",
        None,
    ),
    case(
        "{\"version\": \"0.6.0-alpha\", \"process\": {}, \"network\": {\"allowedHosts\": [\"ok.example\", \"*\"]}}",
        "network.allowedHosts[1]",
        Some("\"*\""),
        "\"*\" alone would match every host",
        None,
    ),
    case(
        "{\"version\": \"0.6.0-alpha\", \"process\": {}, \"network\": {\"defaultPolicy\": \"open\"}}",
        "network.defaultPolicy",
        Some("\"open\""),
        "unknown value \"open\"",
        Some("expected one of \"allow\", \"block\", \"deny\""),
    ),
    case(
        "{\"version\": \"0.7.0-alpha\", \"process\": {}, \"network\": {\"proxy\": {\"builtinTestServer\": true}}}",
        "network.proxy.builtinTestServer",
        Some("true"),
        "built-in test proxy is not part of mxc-vm",
        None,
    ),
    case(
        "{\"version\": \"0.7.0-alpha\", \"process\": {}, \"network\": {\"proxy\": {\"localhost\": 3128, \"url\": \"http://p:1\"}}}",
        "network.proxy",
        Some("{\"localhost\""),
        "give exactly one of localhost, builtinTestServer or url",
        None,
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {}, \"network\": {\"proxy\": {\"url\": \"http://a.example:1\"}},\n \"runtimeConfig\": {\"networkProxy\": \"http://b.example:2\"}}",
        "runtimeConfig.networkProxy",
        Some("\"http://b.example:2\""),
        "conflicts with network.proxy",
        None,
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {}, \"ui\": {\"clipboard\": \"all\"}}",
        "ui.clipboard",
        Some("\"all\""),
        "UI access cannot be granted",
        None,
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {}, \"ui\": {\"disable\": false}}",
        "ui.disable",
        Some("false"),
        "UI access cannot be granted",
        None,
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {}, \"lifecycle\": {\"preservePolicy\": true}}",
        "lifecycle.preservePolicy",
        Some("true"),
        "preserving policies after exit is not supported",
        None,
    ),
    case(
        "{\n \"version\": \"0.5.0-alpha\", \"process\": {}}",
        "version",
        Some("\"0.5.0-alpha\""),
        "MXC config version \"0.5.0-alpha\" is not supported",
        Some("0.6 to 0.9"),
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"containerId\": \"x\"}",
        "",
        Some("{"),
        "missing required field \"process\"",
        None,
    ),
    case(
        "{\"version\": \"0.8.0-alpha\", \"process\": {\"commandLine\": \"ls\", \"args\": []}}",
        "process.args",
        Some("\"args\""),
        "unknown field \"args\"",
        None,
    ),
];

fn check(cases: &[Case]) {
    for (i, c) in cases.iter().enumerate() {
        let err = parse(c.text).expect_err(&format!("case {i} should fail: {}", c.text));

        let ctx = format!("case {i}: {err}\n  text: {}", c.text);
        assert_eq!(err.path(), c.path, "path, {ctx}");
        assert!(err.message().contains(c.message), "message, {ctx}");
        if let Some(h) = c.hint {
            assert!(err.hint().is_some_and(|got| got.contains(h)), "hint, {ctx}");
        }
        if let Some(needle) = c.at {
            let (line, column) = pos_of(c.text, needle);
            assert_eq!(
                (err.line(), err.column()),
                (Some(line), Some(column)),
                "position, {ctx}"
            );
        }
        assert_eq!(err.file(), "policy.json", "{ctx}");
        assert!(!err.to_string().contains('\n'), "one line, {ctx}");
    }
}

#[test]
fn invalid_native_policies_point_at_the_field() {
    check(NATIVE);
}

#[test]
fn invalid_mxc_policies_point_at_the_field() {
    check(MXC);
}

#[test]
fn there_are_at_least_forty_invalid_policies() {
    assert!(NATIVE.len() + MXC.len() >= 40);
}

#[test]
fn json_error_object_has_every_key() {
    let err = parse("{\"version\": \"1\",\n \"containment\": \"bubblwrap\"}").unwrap_err();

    let j = err.to_json();

    assert_eq!(
        j,
        serde_json::json!({
            "file": "policy.json", "line": 2, "column": 17, "path": "containment",
            "message": "unknown value \"bubblwrap\"",
            "hint": "did you mean \"bubblewrap\"?"
        })
    );
}

#[test]
fn display_is_file_line_column_path_message_hint() {
    let err =
        parse("{\"version\": \"1\",\n \"filesystem\": {\"readonly\": [\"/a\", 5]}}").unwrap_err();

    assert_eq!(
        err.to_string(),
        "policy.json:2:36: filesystem.readonly[1]: expected an absolute or relative path \
         string, found a number (5)"
    );
}

#[test]
fn unreadable_file_names_the_file() {
    let err = policy::load_file(std::path::Path::new("/nonexistent/p.json")).unwrap_err();

    assert_eq!(err.file(), "/nonexistent/p.json");
    assert!(err.message().contains("cannot read the policy file"));
    assert_eq!(err.to_json()["path"], "");
}

/// Every problem is reported, each at its own line and column, the containment first and
/// the rest in the order of the text; a member emptied only because a problem inside it
/// was taken out is not reported as a problem of its own.
#[test]
fn every_problem_is_reported_the_containment_first() {
    let text = "{\n  \"version\": \"0.8.0-alpha\",\n  \"process\": {\"commandLine\": \"ls\", \"args\": []},\n  \"filesystem\": {\"readwritePaths\": [\"C:\\\\a\", \"/ok\", \"D:\\\\b\"]},\n  \"containment\": \"processcontainer\"\n}";
    let err = parse(text).expect_err("four problems");
    let d = err.diagnostic().expect("a diagnostic");
    let all: Vec<(&str, Option<usize>, Option<usize>)> = std::iter::once(d)
        .chain(d.also.iter())
        .map(|d| (d.path.as_str(), d.line, d.column))
        .collect();
    assert_eq!(
        all,
        vec![
            ("containment", Some(5), Some(18)),
            ("process.args", Some(3), Some(36)),
            ("filesystem.readwritePaths[0]", Some(4), Some(37)),
            ("filesystem.readwritePaths[2]", Some(4), Some(53)),
        ],
        "{err}"
    );
    let shown = err.to_string();
    assert_eq!(shown.lines().count(), 4, "{shown}");
    assert!(
        shown
            .lines()
            .nth(3)
            .unwrap()
            .contains("\"D:\\b\" is a Windows path"),
        "{shown}"
    );
    let json = err.to_json();
    assert_eq!(json["path"], "containment");
    assert_eq!(json["also"].as_array().map(Vec::len), Some(3), "{json}");

    // One problem inside a list: the list, now empty, is not a second problem.
    let one = parse(
        "{\"version\": \"0.8.0-alpha\", \"process\": {}, \"network\": {\"egress\": {\"allow\": [\n {\"to\": [{\"cidr\": \"10.0.0.1/8\"}]}]}}}",
    )
    .expect_err("host bits");
    assert!(one.diagnostic().unwrap().also.is_empty(), "{one}");
}

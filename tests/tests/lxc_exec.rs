//! `lxc-exec`: mxc-vm as the executor MXC's own SDK starts, driven here the way that SDK
//! drives it (`$MXC_BIN_DIR/x64/lxc-exec --config-base64 <JSON> [--dry-run] …`, the
//! command from `process.commandLine` as `sh -c`, the exit code passed through, one plain
//! JSON error line and exit 1 on a config error).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output};

use tests::TempDir;

/// An `lxc-exec` link to the mxc-vm binary in `<dir>/x64/`, where the SDK looks.
fn executor(dir: &TempDir) -> std::path::PathBuf {
    let x64 = dir.join("x64");
    std::fs::create_dir_all(&x64).unwrap();
    let exe = x64.join("lxc-exec");
    std::os::unix::fs::symlink(tests::mxc_vm_bin(), &exe).unwrap();
    exe
}

fn b64(s: &str) -> String {
    tests::serve::b64(s.as_bytes())
}

fn run(exe: &std::path::Path, args: &[&str]) -> Output {
    Command::new(exe).args(args).output().unwrap()
}

/// The first stderr line that parses as `{"error": {"code", "message"}}`, as the SDK reads it.
fn sdk_error(o: &Output) -> (String, String) {
    let text = String::from_utf8_lossy(&o.stderr);
    text.lines()
        .find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((
                v["error"]["code"].as_str()?.to_string(),
                v["error"]["message"].as_str()?.to_string(),
            ))
        })
        .unwrap_or_else(|| panic!("no JSON error line in {text:?}"))
}

#[test]
fn runs_the_command_line_and_passes_the_exit_code() {
    let dir = TempDir::new("lxcexec");
    let exe = executor(&dir);
    for containment in ["process", "bubblewrap"] {
        let config = format!(
            r#"{{"version":"0.8.0-alpha","containment":"{containment}",
                "process":{{"commandLine":"echo out && echo err >&2 && exit 3"}}}}"#
        );
        let o = run(
            &exe,
            &[
                "--config-base64",
                &b64(&config),
                "--debug",
                "--experimental",
            ],
        );
        assert_eq!(
            o.status.code(),
            Some(3),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
        assert!(String::from_utf8_lossy(&o.stderr).contains("err"));
    }
    // A config file, positional or with --config.
    let file = dir.join("config.json");
    std::fs::write(&file, r#"{"version":"0.6.0-alpha","containment":"process","process":{"commandLine":"echo file"}}"#).unwrap();
    for args in [
        vec![file.to_str().unwrap()],
        vec!["--config", file.to_str().unwrap()],
    ] {
        let o = run(&exe, &args);
        assert_eq!(
            (
                o.status.code(),
                String::from_utf8_lossy(&o.stdout).into_owned()
            ),
            (Some(0), "file\n".to_string())
        );
    }
}

#[test]
fn a_dry_run_validates_only() {
    let dir = TempDir::new("lxcexec-dry");
    let exe = executor(&dir);
    let marker = dir.join("ran");
    let config = format!(
        r#"{{"version":"0.8.0-alpha","containment":"process","process":{{"commandLine":"touch {}"}}}}"#,
        marker.display()
    );
    let o = run(&exe, &["--config-base64", &b64(&config), "--dry-run"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "Dry run completed. Result: validation passed\n"
    );
    assert!(!marker.exists());
}

#[test]
fn config_errors_are_one_json_line_with_mxc_s_codes() {
    let dir = TempDir::new("lxcexec-err");
    let exe = executor(&dir);
    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        (
            vec![
                "--config-base64".into(),
                b64(
                    r#"{"version":"0.8.0-alpha","containment":"lxd","process":{"commandLine":"x"}}"#,
                ),
            ],
            "unsupported_containment",
            "lxd",
        ),
        (
            vec![
                "--config-base64".into(),
                b64(
                    r#"{"version":"0.8.0-alpha","containment":"process","process":{"commandLine":"x"},"filesystem":{"readonly":[]}}"#,
                ),
            ],
            "policy_validation",
            "filesystem",
        ),
        // An unknown field's hint lists "containment": still a policy error.
        (
            vec![
                "--config-base64".into(),
                b64(
                    r#"{"version":"0.8.0-alpha","containment":"process","process":{"commandLine":"x"},"frobnicate":true}"#,
                ),
            ],
            "policy_validation",
            "frobnicate",
        ),
        (
            vec!["--config-base64".into(), "%%%".into()],
            "malformed_request",
            "base64",
        ),
        (
            vec![
                "--config-base64".into(),
                b64(r#"{"version":"0.8.0-alpha","containment":"process"}"#),
            ],
            "policy_validation",
            "process",
        ),
        (
            vec!["--frobnicate".into()],
            "malformed_request",
            "--frobnicate",
        ),
        (vec![], "malformed_request", "no config"),
        (
            vec![dir.s("missing.json")],
            "malformed_request",
            "missing.json",
        ),
    ];
    for (args, code, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run(&exe, &args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let (c, m) = sdk_error(&o);
        assert_eq!(c, code, "{m}");
        assert!(m.contains(needle), "{m:?} should name {needle:?}");
        assert!(
            !String::from_utf8_lossy(&o.stderr).contains('\x1b'),
            "no colour"
        );
    }
}

/// A state-aware request (one with a `phase`) is answered on stdout with one error
/// envelope, where MXC's SDK reads a state-aware answer, and with MXC's code.
#[test]
fn a_state_aware_request_gets_its_error_envelope_on_stdout() {
    let dir = TempDir::new("lxcexec-phase");
    let exe = executor(&dir);
    let config = b64(r#"{"version":"0.8.0-alpha","phase":"provision","containment":"process"}"#);
    let o = run(&exe, &["--config-base64", &config]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.lines().count(), 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["error"]["code"], "unsupported_phase", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("phase"));
}

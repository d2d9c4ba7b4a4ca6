//! `lxc-exec`: the executor MXC's own SDK (`@microsoft/mxc-sdk`) starts on Linux, so that
//! the SDK can drive mxc-vm unchanged. The same binary answers to that name (a link or a
//! copy named `lxc-exec`, placed where the SDK looks: `$MXC_BIN_DIR/x64/lxc-exec`).
//!
//! The contract, as MXC's SDK uses it: `lxc-exec --config-base64 <JSON> [--dry-run]
//! [--debug] [--experimental] [--allow-testing-features] [--log-file F]` (MXC's own
//! executor also takes `[CONFIG_PATH]` and `--config PATH`); never a trailing command:
//! the config's `process.commandLine` runs as `sh -c`. The command's exit code is the
//! executor's. A failure before the command runs prints one plain JSON line
//! `{"error":{"code":…,"message":…}}` (to stderr, which a PTY merges with stdout) with
//! one of MXC's error codes and exits 1. A dry run validates and prints
//! `Dry run completed. Result: validation passed`.

use std::io::Write;
use std::path::PathBuf;

use base64::Engine as _;
use clap::Parser;

use crate::cli::{Cli, Commands};
use crate::failure::Failure;

/// The name this binary answers to as MXC's executor.
pub const NAME: &str = "lxc-exec";

/// Exit code of a failure before the command ran (MXC's executor's).
const CONFIG_ERROR: i32 = 1;

#[derive(Debug, Default)]
struct Args {
    config_base64: Option<String>,
    config_path: Option<PathBuf>,
    dry_run: bool,
    log_file: Option<PathBuf>,
}

/// Whether the config is a state-aware request (it names a `phase`).
fn is_state_aware(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .is_some_and(|v| v.get("phase").is_some())
}

/// MXC's error codes this executor answers with.
fn error_line(code: &str, message: &str) -> String {
    serde_json::json!({ "error": { "code": code, "message": message } }).to_string()
}

fn fail(code: &str, message: &str) -> i32 {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{}", error_line(code, message));
    CONFIG_ERROR
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut args = Args::default();
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match a.as_str() {
            "--config-base64" => args.config_base64 = Some(value(a)?),
            "--config" => args.config_path = Some(value(a)?.into()),
            "--log-file" => args.log_file = Some(value(a)?.into()),
            "--dry-run" => args.dry_run = true,
            // Accepted for compatibility; they change nothing here.
            "--debug" | "--experimental" | "--allow-testing-features" => {}
            flag if flag.starts_with('-') => return Err(format!("unknown option {flag}")),
            path if args.config_path.is_none() && args.config_base64.is_none() => {
                args.config_path = Some(path.into())
            }
            extra => {
                return Err(format!(
                    "unexpected argument {extra:?}: the command comes from the config's \
                     process.commandLine"
                ))
            }
        }
    }
    if args.config_base64.is_some() && args.config_path.is_some() {
        return Err("give the config once: --config-base64 or a path".into());
    }
    Ok(args)
}

/// The error code MXC would give a policy the parser refused: by the field at fault (the
/// message may name `containment` elsewhere, e.g. in an unknown field's hint).
fn policy_code(path: &str) -> &'static str {
    match path {
        "containment" => "unsupported_containment",
        "phase" => "unsupported_phase",
        _ => "policy_validation",
    }
}

/// The error code for a failure of the run itself.
fn run_code(failure: &Failure) -> &'static str {
    match failure.details["kind"].as_str() {
        Some("backend_unavailable") => "backend_unavailable",
        Some("policy_unenforceable") => "policy_validation",
        _ => "backend_error",
    }
}

/// Run as `lxc-exec` with the arguments after `argv[0]`; returns the exit code.
pub fn main(argv: &[String]) -> i32 {
    let args = match parse_args(argv) {
        Ok(a) => a,
        Err(e) => return fail("malformed_request", &e),
    };
    let (text, label) = match (&args.config_base64, &args.config_path) {
        (Some(b64), _) => {
            match base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| e.to_string())
                .and_then(|b| String::from_utf8(b).map_err(|e| e.to_string()))
            {
                Ok(t) => (t, "--config-base64".to_string()),
                Err(e) => {
                    return fail(
                        "malformed_request",
                        &format!("--config-base64 is not base64 of UTF-8 JSON: {e}"),
                    )
                }
            }
        }
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(t) => (t, path.display().to_string()),
            Err(e) => {
                return fail(
                    "malformed_request",
                    &format!("cannot read the config {}: {e}", path.display()),
                )
            }
        },
        (None, None) => {
            return fail(
                "malformed_request",
                "no config: give --config-base64 <JSON>, --config PATH or a path",
            )
        }
    };
    if let Some(log) = &args.log_file {
        // The file exists afterwards, as with MXC's executor; what mxc-vm logs goes there.
        if let Err(e) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            return fail(
                "malformed_request",
                &format!("cannot open --log-file {}: {e}", log.display()),
            );
        }
    }
    let base = match (&args.config_path, std::env::current_dir()) {
        (Some(p), _) if p.parent().is_some_and(|d| !d.as_os_str().is_empty()) => {
            p.parent().map(PathBuf::from).unwrap_or_default()
        }
        (_, Ok(cwd)) => cwd,
        (_, Err(_)) => PathBuf::from("/"),
    };
    let policy = match policy::parse_with_base(&text, &label, &base) {
        Ok(p) => p,
        Err(e) if is_state_aware(&text) => {
            // A state-aware request's caller reads its answer, an error envelope here,
            // from stdout (MXC's SDK: `provisionSandbox`, `execInSandboxAsync`, ...).
            let line = error_line(policy_code(e.path()), &e.to_string());
            let _ = writeln!(std::io::stdout().lock(), "{line}");
            let _ = writeln!(std::io::stderr().lock(), "{line}");
            return CONFIG_ERROR;
        }
        Err(e) => return fail(policy_code(e.path()), &e.to_string()),
    };
    if policy.process.command.is_none() {
        return fail(
            "malformed_request",
            "the config has no process.commandLine to run",
        );
    }
    if args.dry_run {
        let _ = writeln!(
            std::io::stdout().lock(),
            "Dry run completed. Result: validation passed"
        );
        return 0;
    }
    let run_args = match Cli::try_parse_from(["mxc-vm", "run"]) {
        Ok(Cli {
            command: Commands::Run(a),
        }) => a,
        _ => return fail("backend_error", "internal: default run arguments"),
    };
    match crate::run_cmd::run_with_policy(*run_args, policy) {
        Ok(code) => code,
        Err(failure) => fail(run_code(&failure), &failure.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(a: &[&str]) -> Result<Args, String> {
        parse_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn the_sdk_s_arguments_parse() {
        let a = parse(&[
            "--config-base64",
            "e30=",
            "--dry-run",
            "--debug",
            "--experimental",
        ])
        .unwrap();
        assert_eq!(
            (a.config_base64.as_deref(), a.dry_run),
            (Some("e30="), true)
        );
        let p = parse(&["cfg.json"]).unwrap();
        assert_eq!(p.config_path, Some(PathBuf::from("cfg.json")));
        let c = parse(&["--config", "c.json", "--log-file", "l"]).unwrap();
        assert_eq!(c.config_path, Some(PathBuf::from("c.json")));
    }

    #[test]
    fn bad_arguments_say_why() {
        assert!(parse(&["--config-base64"])
            .unwrap_err()
            .contains("needs a value"));
        assert!(parse(&["--nope"]).unwrap_err().contains("--nope"));
        assert!(parse(&["a.json", "echo"])
            .unwrap_err()
            .contains("commandLine"));
        assert!(parse(&["--config", "a", "--config-base64", "e30="])
            .unwrap_err()
            .contains("once"));
    }

    #[test]
    fn error_lines_are_plain_json() {
        let line = error_line("policy_validation", "bad \"x\"");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["error"]["code"], "policy_validation");
        assert!(!line.contains('\n') && !line.contains('\x1b'));
        assert_eq!(policy_code("containment"), "unsupported_containment");
        assert_eq!(policy_code("frobnicate"), "policy_validation");
        assert_eq!(policy_code("phase"), "unsupported_phase");
        assert!(is_state_aware(r#"{"phase": "provision"}"#));
        assert!(!is_state_aware(r#"{"process": {}}"#));
    }
}

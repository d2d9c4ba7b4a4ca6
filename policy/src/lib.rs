//! The one sandbox policy model every backend consumes.
//!
//! Two input formats map onto [`Policy`]: mxc-vm's native format (`"version": "1"`,
//! see `schema/mxc-vm-policy.v1.schema.json`) and Microsoft MXC ContainerConfig
//! 0.6–0.9 (see `MXC-COMPAT.md`). [`load_file`] and [`parse_str`] detect which one a
//! file is. CLI flags compose with a policy through [`Policy::apply_overrides`],
//! [`resolve_fs`] turns the filesystem rules into the canonical [`FsView`] backends
//! enforce, and [`explain`] shows the effective result.

mod collect;
mod duration;
mod error;
mod explain;
mod fields;
mod locate;
pub mod model;
mod mxc;
mod native;
mod net_rules;
mod overrides;
mod resolve;
mod schema;
mod source;

use std::io::Read;
use std::path::Path;

pub use duration::{format_duration, parse_duration, DurationError};
pub use error::{edit_distance, redact_credentials, suggest, Diagnostic, PolicyError};
pub use explain::{
    explain, explain_text, explain_text_with_system, explain_with_system, SystemView,
};
pub use model::*;
pub use net_rules::{
    is_public_suffix, parse_cidr, parse_domain, parse_ports, parse_rule, Decision, Destination,
    RuleError, RuleSpec,
};
pub use overrides::Overrides;
pub use resolve::resolve_fs;
pub use schema::native_schema;

use source::Source;

/// Largest policy file accepted; a policy is a few kilobytes.
pub const MAX_POLICY_BYTES: u64 = 4 << 20;

/// Reads and parses a policy file (native or MXC, detected from its `version`).
/// Relative paths in it resolve against the file's directory.
pub fn load_file(path: &Path) -> Result<Policy, PolicyError> {
    let file = path.display().to_string();
    let read_err = |source| PolicyError::Read {
        file: file.clone(),
        source,
    };
    let f = std::fs::File::open(path).map_err(read_err)?;
    let mut text = String::new();
    f.take(MAX_POLICY_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(read_err)?.join(path)
    };
    let base = abs.parent().unwrap_or(Path::new("/"));
    parse_with_base(&text, &file, base)
}

/// Parses policy text (native or MXC, detected from its `version`). Relative paths
/// resolve against the current directory; `file_label` names the text in errors.
pub fn parse_str(text: &str, file_label: &str) -> Result<Policy, PolicyError> {
    let base = std::env::current_dir().map_err(|source| PolicyError::Read {
        file: file_label.to_string(),
        source,
    })?;
    parse_with_base(text, file_label, &base)
}

/// Like [`parse_str`], with relative paths resolved against `base_dir`.
pub fn parse_with_base(
    text: &str,
    file_label: &str,
    base_dir: &Path,
) -> Result<Policy, PolicyError> {
    parse_once(text, file_label, base_dir).map_err(|first| {
        collect::every_problem(first, text, |edited| {
            parse_once(edited, file_label, base_dir).map(drop)
        })
    })
}

/// Parse, stopping at the first problem.
fn parse_once(text: &str, file_label: &str, base_dir: &Path) -> Result<Policy, PolicyError> {
    let src = Source::new(file_label, text, base_dir);
    if text.len() as u64 > MAX_POLICY_BYTES {
        return Err(src.err(
            "",
            format!("policy is larger than {} bytes", MAX_POLICY_BYTES),
        ));
    }
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| src.syntax_error(&e))?;
    let Some(obj) = value.as_object() else {
        return Err(src.err("", "expected a JSON object at the top level"));
    };
    match detect(&src, obj)? {
        Format::Native => native::parse(&src),
        Format::Mxc(version) => mxc::parse(&src, version),
    }
}

enum Format {
    Native,
    Mxc(String),
}

/// Top-level keys only MXC files have.
const MXC_ONLY_KEYS: &[&str] = &[
    "containerId",
    "lifecycle",
    "fallback",
    "ui",
    "processContainer",
    "appContainer",
    "lxc",
    "seatbelt",
    "macos_sandbox",
    "runtimeConfig",
    "experimental",
    "phase",
    "sandboxId",
    "correlationVector",
    "_comment",
    "$schema",
];

fn detect(
    src: &Source<'_>,
    obj: &serde_json::Map<String, serde_json::Value>,
) -> Result<Format, PolicyError> {
    use serde_json::Value;
    match obj.get("version") {
        Some(Value::String(v)) if v == "1" => Ok(Format::Native),
        Some(Value::String(v)) if v.starts_with("0.") => {
            mxc::check_version(v).map_err(|m| src.err("version", m))?;
            Ok(Format::Mxc(v.clone()))
        }
        Some(Value::String(v)) => Err(src
            .err("version", format!("unsupported policy version \"{v}\""))
            .with_hint("mxc-vm reads its native format \"1\" and MXC ContainerConfig 0.6 to 0.9")),
        Some(Value::Number(n)) => Err(src
            .err(
                "version",
                format!("expected a version string, found a number ({n})"),
            )
            .with_hint("write \"version\": \"1\"")),
        Some(Value::Null) | None if looks_like_mxc(obj) => Ok(Format::Mxc(String::new())),
        Some(Value::Null) | None => Err(src
            .err("", "missing \"version\"")
            .with_hint("native policies start with \"version\": \"1\"")),
        Some(_) => Err(src.err("version", "expected a version string such as \"1\"")),
    }
}

/// An unversioned file is read as MXC when it uses fields only MXC has.
fn looks_like_mxc(obj: &serde_json::Map<String, serde_json::Value>) -> bool {
    let has = |section: &str, keys: &[&str]| {
        obj.get(section)
            .and_then(|v| v.as_object())
            .is_some_and(|o| keys.iter().any(|k| o.contains_key(*k)))
    };
    MXC_ONLY_KEYS.iter().any(|k| obj.contains_key(*k))
        || has("process", &["commandLine"])
        || has(
            "filesystem",
            &["readwritePaths", "readonlyPaths", "deniedPaths"],
        )
        || has(
            "network",
            &[
                "defaultPolicy",
                "allowedHosts",
                "blockedHosts",
                "enforcementMode",
                "allowLocalNetwork",
                "proxy",
                "ingress",
            ],
        )
}

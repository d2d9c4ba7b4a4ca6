//! `mxc-vm policy check|explain|schema`.

use std::io::Write;
use std::path::Path;

use crate::cli::PolicyCommand;
use crate::failure::Failure;

pub fn run(cmd: PolicyCommand) -> Result<i32, Failure> {
    let mut out = std::io::stdout().lock();
    match cmd {
        PolicyCommand::Check { file, json } => {
            let policy = policy::load_file(&file)?;
            if json {
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::json!({ "valid": true, "file": file.display().to_string(),
                                        "format": format_name(&policy) })
                );
            } else {
                let _ = writeln!(out, "{}: valid ({})", file.display(), format_name(&policy));
            }
            Ok(0)
        }
        PolicyCommand::Explain { file, json } => {
            let policy = policy::load_file(&file)?;
            let base = std::env::current_dir().unwrap_or_else(|_| Path::new("/").to_path_buf());
            let view = policy::resolve_fs(&policy.filesystem, &base)?;
            if json {
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&policy::explain_with_system(
                        &policy,
                        &view,
                        &sandbox::view::system_view_summary()
                    ))
                    .unwrap_or_default()
                );
            } else {
                let _ = write!(
                    out,
                    "{}",
                    policy::explain_text_with_system(
                        &policy,
                        &view,
                        &sandbox::view::system_view_summary()
                    )
                );
            }
            Ok(0)
        }
        PolicyCommand::Schema => {
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&policy::native_schema()).unwrap_or_default()
            );
            Ok(0)
        }
    }
}

fn format_name(p: &policy::Policy) -> String {
    match &p.source {
        policy::PolicySource::Native { version } => format!("mxc-vm native policy v{version}"),
        policy::PolicySource::Mxc { version } if version.is_empty() => {
            "MXC ContainerConfig, no version".into()
        }
        policy::PolicySource::Mxc { version } => format!("MXC ContainerConfig {version}"),
        policy::PolicySource::Cli => "flags".into(),
    }
}

//! Finding the static guest-agent binary that becomes the guest's `/init`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::elf::{self, ElfError};

/// Environment variable naming the guest-agent binary.
pub const AGENT_ENV: &str = "MXC_VM_GUEST_AGENT";

/// How to build a guest agent that qualifies.
pub const AGENT_BUILD_COMMAND: &str = "RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --profile release-guest -p guest-agent --target x86_64-unknown-linux-gnu";

/// Errors while locating or checking a guest binary.
#[derive(Debug, Error)]
pub enum AgentError {
    /// No candidate exists.
    #[error("guest agent not found (looked at {}); build it with `{AGENT_BUILD_COMMAND}` or set MXC_VM_GUEST_AGENT", list(.tried))]
    NotFound {
        /// Every path looked at.
        tried: Vec<PathBuf>,
    },
    /// The file cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The guest agent is not a static x86-64 executable.
    #[error("guest agent {path} cannot run as the guest's /init; build it static with `{AGENT_BUILD_COMMAND}`")]
    NotStatic {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: ElfError,
    },
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Candidate paths, in order: explicit, environment, next to the executable, and the
/// cargo target layout (`<exe_dir>/../x86_64-unknown-linux-gnu/release/guest-agent`;
/// for test binaries in `deps/`, the same from its parent).
pub(crate) fn candidates(
    explicit: Option<&Path>,
    env: Option<OsString>,
    exe: Option<&Path>,
) -> (Vec<PathBuf>, bool) {
    if let Some(path) = explicit {
        return (vec![path.to_owned()], true);
    }
    if let Some(path) = env.filter(|v| !v.is_empty()) {
        return (vec![PathBuf::from(path)], true);
    }
    let mut found = Vec::new();
    let mut dir = exe.and_then(Path::parent).map(Path::to_owned);
    while let Some(exe_dir) = dir.take() {
        found.push(exe_dir.join("guest-agent"));
        if let Some(target) = exe_dir.parent() {
            // The stripped, size-optimised build the scripts make (every byte of the
            // initramfs is unpacked by emulated kernel code under kvm_pvm), then a
            // plain release build.
            found.push(target.join("x86_64-unknown-linux-gnu/release-guest/guest-agent"));
            found.push(target.join("x86_64-unknown-linux-gnu/release/guest-agent"));
        }
        if exe_dir.file_name().is_some_and(|n| n == "deps") {
            dir = exe_dir.parent().map(Path::to_owned);
        }
    }
    (found, false)
}

/// Reads `path` and checks it is a static x86-64 executable.
fn check(path: &Path) -> Result<(), AgentError> {
    let bytes = std::fs::read(path).map_err(|source| AgentError::Read {
        path: path.to_owned(),
        source,
    })?;
    elf::check_static_x86_64(&bytes).map_err(|source| AgentError::NotStatic {
        path: path.to_owned(),
        source,
    })
}

/// A named path (explicit or from the environment) must exist and be static. When
/// searching, the first static candidate wins: a plain `cargo build` puts a dynamic
/// `guest-agent` next to the executable, and the static one built for the explicit
/// target must still be found. If only unsuitable files exist, the error names the
/// first one.
pub(crate) fn find(
    explicit: Option<&Path>,
    env: Option<OsString>,
    exe: Option<&Path>,
) -> Result<PathBuf, AgentError> {
    let (tried, named) = candidates(explicit, env, exe);
    let mut first_problem = None;
    for path in tried.iter().filter(|p| named || p.is_file()) {
        if named && !path.exists() {
            break;
        }
        match check(path) {
            Ok(()) => return Ok(path.clone()),
            Err(problem) => {
                first_problem.get_or_insert(problem);
            }
        }
    }
    Err(first_problem.unwrap_or(AgentError::NotFound { tried }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::tests::fake_elf;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("guest-image-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::create_dir_all(&dir);
        dir
    }

    #[test]
    fn explicit_path_wins() {
        let (paths, named) =
            candidates(Some(Path::new("/x/agent")), Some("/env/agent".into()), None);

        assert_eq!((paths, named), (vec![PathBuf::from("/x/agent")], true));
    }

    #[test]
    fn environment_comes_before_the_executable() {
        let (paths, named) = candidates(
            None,
            Some("/env/agent".into()),
            Some(Path::new("/t/release/mxc-vm")),
        );

        assert_eq!((paths, named), (vec![PathBuf::from("/env/agent")], true));
    }

    #[test]
    fn executable_layout_is_searched() {
        let (paths, _) = candidates(None, None, Some(Path::new("/t/debug/deps/test-abc")));

        assert_eq!(
            paths,
            [
                "/t/debug/deps/guest-agent",
                "/t/debug/x86_64-unknown-linux-gnu/release-guest/guest-agent",
                "/t/debug/x86_64-unknown-linux-gnu/release/guest-agent",
                "/t/debug/guest-agent",
                "/t/x86_64-unknown-linux-gnu/release-guest/guest-agent",
                "/t/x86_64-unknown-linux-gnu/release/guest-agent",
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn missing_agent_error_gives_the_build_command() {
        let result = find(Some(Path::new("/nonexistent/guest-agent")), None, None);

        let message = result.err().map(|e| e.to_string()).unwrap_or_default();

        assert!(message.contains("/nonexistent/guest-agent"), "{message}");
        assert!(message.contains("+crt-static"), "{message}");
    }

    #[test]
    fn dynamic_agent_is_refused_with_the_build_command() {
        let dir = temp_dir("dynamic");
        let path = dir.join("guest-agent");
        let _ = std::fs::write(&path, fake_elf(3, &[6, 3, 1]));

        let result = find(Some(&path), None, None);

        assert!(matches!(
            result,
            Err(AgentError::NotStatic {
                source: ElfError::Dynamic,
                ..
            })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn dynamic_agent_next_to_the_executable_does_not_hide_the_static_one() {
        let dir = temp_dir("layout");
        let release = dir.join("release");
        let static_dir = dir.join("x86_64-unknown-linux-gnu/release");
        let _ = std::fs::create_dir_all(&release);
        let _ = std::fs::create_dir_all(&static_dir);
        let _ = std::fs::write(release.join("guest-agent"), fake_elf(3, &[3]));
        let _ = std::fs::write(static_dir.join("guest-agent"), fake_elf(3, &[1]));

        let result = find(None, None, Some(&release.join("mxc-vm")));

        assert_eq!(result.ok(), Some(static_dir.join("guest-agent")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_a_dynamic_agent_is_reported_as_such() {
        let dir = temp_dir("only-dynamic");
        let _ = std::fs::write(dir.join("guest-agent"), fake_elf(3, &[3]));

        let result = find(None, None, Some(&dir.join("mxc-vm")));

        assert!(matches!(result, Err(AgentError::NotStatic { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn static_agent_next_to_the_executable_is_found() {
        let dir = temp_dir("static");
        let path = dir.join("guest-agent");
        let _ = std::fs::write(&path, fake_elf(2, &[1]));

        let result = find(None, None, Some(&dir.join("mxc-vm")));

        assert_eq!(result.ok(), Some(path));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

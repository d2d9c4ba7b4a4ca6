//! A read-only Debian root file system for the guest's system view, for hosts whose own
//! `/usr` and `/etc` must not be exposed to guests.
//!
//! [`build_rootfs`] runs Debian's `debootstrap` (the `minbase` variant: essential
//! packages and apt, nothing else) from a Debian mirror into the cache, under a key hashed
//! from the suite, variant and mirror. The microVM backend then shares its `/usr` and
//! `/etc` read-only and recreates its `/bin -> usr/bin` links, instead of the host's.
//! Building needs root (debootstrap unpacks as root and runs maintainer scripts in a
//! chroot) and network access to the mirror; it takes a few minutes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

use crate::hash::KeyHasher;
use crate::{cache_dir, cache_err, BuildOptions, CacheLock, ImageError, Progress, Stage};

/// The Debian release debootstrap installs (override: [`SUITE_ENV`]).
pub const DEFAULT_SUITE: &str = "bookworm";
/// The mirror it downloads from (override: [`MIRROR_ENV`]).
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Environment variable naming another Debian mirror.
pub const MIRROR_ENV: &str = "MXC_VM_DEBIAN_MIRROR";
/// Environment variable naming another Debian suite.
pub const SUITE_ENV: &str = "MXC_VM_DEBIAN_SUITE";
/// debootstrap's variant: essential packages and apt only.
pub const VARIANT: &str = "minbase";
/// Changes whenever the build steps below change their output.
const ROOTFS_VERSION: &str = "rootfs-1";

/// Errors building the rootfs.
#[derive(Debug, Error)]
pub enum RootfsError {
    /// debootstrap needs root.
    #[error("building the rootfs needs root (debootstrap unpacks packages as root); run `sudo mxc-vm image build --rootfs`")]
    NotRoot,
    /// debootstrap could not be started.
    #[error("cannot run debootstrap; install Debian's package (`apt-get install debootstrap`)")]
    Spawn(#[source] std::io::Error),
    /// debootstrap failed.
    #[error("debootstrap failed ({status}); its last lines: {tail}")]
    Failed {
        /// How it ended.
        status: String,
        /// The end of its output.
        tail: String,
    },
}

/// What the rootfs is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Source {
    suite: String,
    mirror: String,
}

impl Source {
    fn from_env() -> Self {
        let var = |name: &str, default: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_owned())
        };
        Self {
            suite: var(SUITE_ENV, DEFAULT_SUITE),
            mirror: var(MIRROR_ENV, DEFAULT_MIRROR),
        }
    }

    fn key(&self) -> String {
        KeyHasher::new("mxc-vm rootfs")
            .field("version", ROOTFS_VERSION.as_bytes())
            .field("suite", self.suite.as_bytes())
            .field("variant", VARIANT.as_bytes())
            .field("mirror", self.mirror.as_bytes())
            .key()
    }
}

/// Where the rootfs for `opts` lives in the cache (whether built or not).
pub fn rootfs_path(opts: &BuildOptions) -> Result<PathBuf, ImageError> {
    Ok(cache_dir(opts)?
        .join("rootfs")
        .join(Source::from_env().key()))
}

/// The rootfs for `opts` if it has been built; never builds.
pub fn cached_rootfs(opts: &BuildOptions) -> Option<PathBuf> {
    rootfs_path(opts)
        .ok()
        .filter(|p| p.join("usr").is_dir() && p.join("etc").is_dir())
}

/// Builds (or reuses) the Debian rootfs, reporting debootstrap's steps through `progress`.
pub fn build_rootfs(
    opts: &BuildOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<PathBuf, ImageError> {
    let cache = cache_dir(opts)?;
    let source = Source::from_env();
    let parent = cache.join("rootfs");
    let target = parent.join(source.key());
    std::fs::create_dir_all(&parent).map_err(cache_err(&parent))?;
    let _lock = CacheLock::acquire(&cache)?;
    crate::remove_leftovers(&cache);
    if let Some(done) = cached_rootfs(opts) {
        progress(Progress {
            stage: Stage::Done,
            fraction: Some(1.0),
            message: format!("rootfs {}", done.display()),
        });
        return Ok(done);
    }
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(RootfsError::NotRoot.into());
    }
    let staging = parent.join(format!("{}.tmp-{}", source.key(), std::process::id()));
    run_debootstrap(&source, &staging, progress)?;
    trim(&staging);
    std::fs::rename(&staging, &target).map_err(cache_err(&target))?;
    progress(Progress {
        stage: Stage::Done,
        fraction: Some(1.0),
        message: format!("rootfs {}", target.display()),
    });
    Ok(target)
}

fn run_debootstrap(
    source: &Source,
    staging: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), ImageError> {
    progress(Progress {
        stage: Stage::Rootfs,
        fraction: None,
        message: format!("debootstrap {} from {}", source.suite, source.mirror),
    });
    let mut child = Command::new("debootstrap")
        .arg(format!("--variant={VARIANT}"))
        .arg(&source.suite)
        .arg(staging)
        .arg(&source.mirror)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(RootfsError::Spawn)?;
    let mut tail: Vec<String> = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            progress(Progress {
                stage: Stage::Rootfs,
                fraction: None,
                message: line.trim_start_matches("I: ").to_owned(),
            });
            tail.push(line);
            if tail.len() > 5 {
                tail.remove(0);
            }
        }
    }
    let status = child.wait().map_err(RootfsError::Spawn)?;
    if !status.success() {
        remove_tree(staging);
        return Err(RootfsError::Failed {
            status: status.to_string(),
            tail: tail.join(" | "),
        }
        .into());
    }
    Ok(())
}

/// Whether anything is mounted at or below `path` (debootstrap mounts `/proc` and `/sys`
/// in its target while it configures packages, and an interrupted run can leave them).
fn has_mounts_under(path: &Path) -> bool {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return true;
    };
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|point| Path::new(point).starts_with(path))
}

/// Remove a (partial) rootfs tree, unless something is still mounted inside it: removing
/// then could reach into the mounted file system (a host `/dev` or `/proc`).
pub(crate) fn remove_tree(path: &Path) {
    if has_mounts_under(path) {
        return;
    }
    let _ = std::fs::remove_dir_all(path);
}

/// Drop what a read-only guest system never needs: downloaded packages and apt lists.
fn trim(root: &Path) {
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_changes_with_the_suite_and_the_mirror() {
        let base = Source {
            suite: "bookworm".into(),
            mirror: DEFAULT_MIRROR.into(),
        };
        let suite = Source {
            suite: "trixie".into(),
            ..base.clone()
        };
        let mirror = Source {
            mirror: "http://mirror.example/debian".into(),
            ..base.clone()
        };

        assert_ne!(base.key(), suite.key());
        assert_ne!(base.key(), mirror.key());
        assert_eq!(base.key(), base.clone().key());
    }

    #[test]
    fn a_tree_with_a_mount_inside_is_left_alone() {
        assert!(has_mounts_under(Path::new("/")));
        assert!(!has_mounts_under(Path::new("/no/such/rootfs")));
    }

    #[test]
    fn trimming_removes_package_files_only() {
        let root = std::env::temp_dir().join(format!("rootfs-trim-{}", std::process::id()));
        let archives = root.join("var/cache/apt/archives");
        std::fs::create_dir_all(archives.join("partial")).unwrap();
        std::fs::write(archives.join("x.deb"), b"deb").unwrap();

        trim(&root);

        assert!(!archives.join("x.deb").exists());
        assert!(archives.join("partial").is_dir());
        std::fs::remove_dir_all(&root).unwrap();
    }
}

//! The host's file shares: create the symbolic links of the system view, then mount every
//! virtio-fs share where the policy puts it, before the agent reports ready.
//!
//! The host names both on the kernel command line (`mxc.links=`, `mxc.mounts=`, see
//! [`proto::mounts`]). Links come first: on a merged-`/usr` host `/bin` is `usr/bin`, and
//! the initramfs's own `/bin` (busybox's `sh` link) gives way to it. Mounts follow,
//! parents before children, each with `nosuid,nodev` and `ro` for read-only shares (the
//! host refuses writes to those anyway; this is defence in depth and gives `EROFS` without
//! a round trip). Any failure is fatal: the agent then answers every connection with the
//! error instead of running commands without the files the policy promised.

use std::io;
use std::path::{Path, PathBuf};

use proto::mounts::{GuestLink, GuestMount};

use crate::sys;

/// What went wrong setting up the shares.
#[derive(Debug, thiserror::Error)]
pub enum SharesError {
    #[error("bad share list on the kernel command line: {0}")]
    BadList(String),
    #[error("cannot create the link {} -> {}", .path.display(), .target.display())]
    Link {
        path: PathBuf,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount share {tag} at {}", .path.display())]
    Mount {
        tag: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Mount flags for a share.
pub fn mount_flags(readonly: bool) -> u64 {
    let base = libc::MS_NOSUID | libc::MS_NODEV;
    if readonly {
        base | libc::MS_RDONLY
    } else {
        base
    }
}

/// The mounts in the order they must happen: fewer path components first (a share's
/// mount point may lie inside another share), otherwise as given.
pub fn mount_order(mounts: &[GuestMount]) -> Vec<&GuestMount> {
    let mut ordered: Vec<&GuestMount> = mounts.iter().collect();
    ordered.sort_by_key(|m| m.path.components().count());
    ordered
}

/// `path` (absolute) under `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Make `link.path` (under `root`) a symbolic link to `link.target`, replacing whatever
/// is there: the initramfs's directories at those paths hold at most busybox applet links.
pub fn place_link(root: &Path, link: &GuestLink) -> Result<(), SharesError> {
    let path = under(root, &link.path);
    let fail = |source| SharesError::Link {
        path: link.path.clone(),
        target: link.target.clone(),
        source,
    };
    match std::fs::symlink_metadata(&path) {
        Ok(md) if md.file_type().is_symlink() => {
            if std::fs::read_link(&path).map_err(fail)? == link.target {
                return Ok(());
            }
            std::fs::remove_file(&path).map_err(fail)?;
        }
        Ok(md) if md.is_dir() => set_aside(root, &path).map_err(fail)?,
        Ok(_) => std::fs::remove_file(&path).map_err(fail)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(fail)?;
            }
        }
        Err(e) => return Err(fail(e)),
    }
    std::os::unix::fs::symlink(&link.target, &path).map_err(fail)
}

/// Where [`set_aside`] moves the directories links replace, under the root.
pub const SET_ASIDE_DIR: &str = ".mxc/replaced";

/// Move the directory `path` out of the way, into [`SET_ASIDE_DIR`] under `root`: one
/// rename, where deleting its entries one by one cost a restored VM's setup emulated
/// kernel work under `kvm_pvm` (when the initramfs's `/bin` and `/sbin` held 128 busybox
/// links: about half a second). What is moved is the initramfs's own, already in the
/// guest's memory and reachable through `/.mxc/bin/busybox` anyway. Where a rename cannot be
/// made (another file system), the directory is deleted.
fn set_aside(root: &Path, path: &Path) -> io::Result<()> {
    let aside = under(root, Path::new(SET_ASIDE_DIR));
    std::fs::create_dir_all(&aside)?;
    for n in 0u32..64 {
        match sys::rename_noreplace(path, &aside.join(n.to_string())) {
            Ok(()) => return Ok(()),
            Err(e) => match e.raw_os_error() {
                Some(libc::EEXIST) => continue,
                Some(libc::EXDEV | libc::EBUSY | libc::EINVAL | libc::ENOSYS) => break,
                _ => return Err(e),
            },
        }
    }
    std::fs::remove_dir_all(path)
}

/// Create the links, then mount the shares. Stops at the first failure.
pub fn set_up(links: &[GuestLink], mounts: &[GuestMount]) -> Result<(), SharesError> {
    let root = Path::new("/");
    for link in links {
        place_link(root, link)?;
    }
    for share in mount_order(mounts) {
        let fail = |source| SharesError::Mount {
            tag: share.tag.clone(),
            path: share.path.clone(),
            source,
        };
        // A mount point inside a read-only share already exists (the host made it);
        // anywhere else (the initramfs, /tmp) it is created here.
        if !share.path.is_dir() {
            std::fs::create_dir_all(&share.path).map_err(fail)?;
        }
        sys::mount(
            &share.tag,
            &share.path,
            "virtiofs",
            mount_flags(share.readonly),
            "",
        )
        .map_err(fail)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let dir =
                std::env::temp_dir().join(format!("agent-shares-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn link(path: &str, target: &str) -> GuestLink {
        GuestLink {
            path: path.into(),
            target: target.into(),
        }
    }

    #[test]
    fn a_link_replaces_the_initramfs_directory_and_is_idempotent() {
        let dir = TempDir::new();
        std::fs::create_dir_all(dir.0.join("bin")).unwrap();
        std::os::unix::fs::symlink("/.mxc/bin/busybox", dir.0.join("bin/sh")).unwrap();

        std::fs::create_dir_all(dir.0.join("sbin")).unwrap();
        std::fs::write(dir.0.join("sbin/init"), "x").unwrap();

        place_link(&dir.0, &link("/bin", "usr/bin")).unwrap();
        place_link(&dir.0, &link("/bin", "usr/bin")).unwrap();
        place_link(&dir.0, &link("/sbin", "usr/sbin")).unwrap();
        place_link(&dir.0, &link("/deep/lib64", "/usr/lib64")).unwrap();

        assert_eq!(
            std::fs::read_link(dir.0.join("bin")).unwrap(),
            PathBuf::from("usr/bin")
        );
        assert_eq!(
            std::fs::read_link(dir.0.join("deep/lib64")).unwrap(),
            PathBuf::from("/usr/lib64")
        );
        // The replaced directories were set aside whole, each under a name of its own.
        let aside = dir.0.join(SET_ASIDE_DIR);
        assert!(aside.join("0/sh").symlink_metadata().is_ok());
        assert_eq!(std::fs::read_to_string(aside.join("1/init")).unwrap(), "x");
    }

    #[test]
    fn parents_are_mounted_before_children() {
        let mount = |p: &str| GuestMount {
            tag: "t".into(),
            path: p.into(),
            readonly: true,
        };
        let mounts = [mount("/usr/local"), mount("/home/u/p"), mount("/usr")];

        let order: Vec<&Path> = mount_order(&mounts)
            .into_iter()
            .map(|m| m.path.as_path())
            .collect();

        assert_eq!(
            order,
            [
                Path::new("/usr"),
                Path::new("/usr/local"),
                Path::new("/home/u/p")
            ]
        );
    }

    #[test]
    fn read_only_shares_are_mounted_read_only() {
        assert_eq!(mount_flags(true) & libc::MS_RDONLY, libc::MS_RDONLY);
        assert_eq!(mount_flags(false) & libc::MS_RDONLY, 0);
        assert_eq!(
            mount_flags(false) & (libc::MS_NOSUID | libc::MS_NODEV),
            libc::MS_NOSUID | libc::MS_NODEV
        );
    }
}

//! The files API: reading, writing and listing the paths a sandbox's policy grants,
//! from the host side (every tier sees a granted path at the same place as the host).
//!
//! A request names an absolute path. The longest policy entry containing it decides: a
//! denied entry (or none at all) is a 403 naming the rule, a read-only entry refuses
//! writes. The secret paths every tier hides are refused whatever the policy says. The
//! file is then opened with `openat2` beneath the entry's directory with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`: no symlink, `..` or mount trick can lead
//! the request out of the granted tree or into a denied path inside it.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use policy::{Access, FsView};

use super::error::ApiError;

/// Where a request's path lies: the directory of its policy entry and the rest.
#[derive(Debug, PartialEq, Eq)]
pub struct Located {
    /// The directory the file is opened beneath (the entry itself, or a file entry's
    /// directory).
    pub root: PathBuf,
    /// The path below `root` (empty for the root itself).
    pub rel: PathBuf,
    pub access: Access,
}

/// Check `path` against the view; `write` asks for read-write access.
pub fn locate(view: &FsView, path: &str, write: bool) -> Result<Located, ApiError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(ApiError::bad_request(
            "bad_path",
            format!("path {path:?} is not absolute"),
        ));
    }
    if p.components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        || path.contains('\0')
    {
        return Err(ApiError::bad_request(
            "bad_path",
            format!("path {path:?} has a '.' or '..' component or a NUL"),
        ));
    }
    if let Some(secret) = sandbox::view::SECRET_PATHS
        .iter()
        .find(|s| p.starts_with(Path::new(s)))
    {
        return Err(ApiError::forbidden(
            "path_denied",
            format!("{path} is never reachable from a sandbox ({secret} holds host secrets)"),
        ));
    }
    let entry = view
        .entries
        .iter()
        .filter(|e| p.starts_with(&e.path))
        .max_by_key(|e| e.path.components().count())
        .ok_or_else(|| {
            ApiError::forbidden(
                "path_denied",
                format!("{path} is not granted by the sandbox's policy"),
            )
        })?;
    match entry.access {
        Access::Denied => {
            return Err(ApiError::forbidden(
                "path_denied",
                format!(
                    "{path} is denied by the sandbox's policy (rule: {})",
                    entry.path.display()
                ),
            ))
        }
        Access::ReadOnly if write => {
            return Err(ApiError::forbidden(
                "read_only",
                format!(
                    "{path} is read-only for the sandbox (rule: {})",
                    entry.path.display()
                ),
            ))
        }
        _ => {}
    }
    let rel = p.strip_prefix(&entry.path).unwrap_or(Path::new(""));
    if entry.is_dir {
        return Ok(Located {
            root: entry.path.clone(),
            rel: rel.to_path_buf(),
            access: entry.access,
        });
    }
    if !rel.as_os_str().is_empty() {
        return Err(ApiError::bad_request(
            "bad_path",
            format!("{} is a file, not a directory", entry.path.display()),
        ));
    }
    Ok(Located {
        root: entry.path.parent().unwrap_or(Path::new("/")).to_path_buf(),
        rel: PathBuf::from(entry.path.file_name().unwrap_or_default()),
        access: entry.access,
    })
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
const RESOLVE_BENEATH: u64 = 0x08;
const SYS_OPENAT2: libc::c_long = 437;

/// `openat2` beneath `dir` without following any symlink (`dir` = AT_FDCWD: an
/// absolute path, still without symlinks).
fn openat2(dir: libc::c_int, path: &Path, flags: i32, mode: u32) -> std::io::Result<OwnedFd> {
    let rel = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    let c = CString::new(rel.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: u64::from(mode),
        resolve: if dir == libc::AT_FDCWD {
            RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
        } else {
            RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
        },
    };
    // SAFETY: openat2 reads the NUL-terminated path and the open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            SYS_OPENAT2,
            dir,
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn io_error(path: &str, e: std::io::Error) -> ApiError {
    match e.raw_os_error() {
        Some(libc::ENOENT) => ApiError::not_found(format!("{path} does not exist")),
        Some(libc::ELOOP) | Some(libc::EXDEV) => ApiError::forbidden(
            "path_denied",
            format!(
                "{path} leads through a symlink or out of its grant; the files API follows none"
            ),
        ),
        Some(libc::EISDIR) => {
            ApiError::bad_request("is_a_directory", format!("{path} is a directory"))
        }
        Some(libc::ENOTDIR) => {
            ApiError::bad_request("not_a_directory", format!("{path} is not a directory"))
        }
        Some(libc::EACCES) | Some(libc::EPERM) => {
            ApiError::forbidden("permission_denied", format!("{path}: {e}"))
        }
        _ => ApiError::internal(format!("{path}: {e}")),
    }
}

fn open_root(loc: &Located, path: &str) -> Result<OwnedFd, ApiError> {
    // The entry's path is canonical (the policy resolved it); no symlink is followed here
    // either, so one swapped in since cannot redirect us.
    openat2(
        libc::AT_FDCWD,
        &loc.root,
        libc::O_PATH | libc::O_DIRECTORY,
        0,
    )
    .map_err(|e| io_error(path, e))
}

/// Open a file to read.
pub fn open_read(view: &FsView, path: &str) -> Result<(File, u64), ApiError> {
    let loc = locate(view, path, false)?;
    let root = open_root(&loc, path)?;
    let fd =
        openat2(root.as_raw_fd(), &loc.rel, libc::O_RDONLY, 0).map_err(|e| io_error(path, e))?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(|e| io_error(path, e))?;
    if meta.is_dir() {
        return Err(ApiError::bad_request(
            "is_a_directory",
            format!("{path} is a directory; list it with GET .../list?path="),
        ));
    }
    if !meta.is_file() {
        return Err(ApiError::bad_request(
            "not_a_file",
            format!("{path} is not a regular file"),
        ));
    }
    Ok((file, meta.len()))
}

/// A file being uploaded: written under a temporary name beside its target and renamed
/// over it by [`Upload::commit`]; dropped uncommitted, it is removed.
pub struct Upload {
    pub file: File,
    dir: OwnedFd,
    tmp: CString,
    name: CString,
    committed: bool,
}

impl Upload {
    /// Put the new file in place of the target (atomically; a symlink there is
    /// replaced, never followed).
    pub fn commit(mut self) -> std::io::Result<()> {
        self.file.sync_data()?;
        // SAFETY: both names are NUL-terminated and relative to our directory descriptor.
        let rc = unsafe {
            libc::renameat(
                self.dir.as_raw_fd(),
                self.tmp.as_ptr(),
                self.dir.as_raw_fd(),
                self.name.as_ptr(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.committed {
            // SAFETY: unlinkat of our own temporary name in our directory descriptor.
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.tmp.as_ptr(), 0) };
        }
    }
}

/// Start writing a file (its directory must exist); see [`Upload`].
pub fn open_write(view: &FsView, path: &str) -> Result<Upload, ApiError> {
    let loc = locate(view, path, true)?;
    let Some(name) = loc.rel.file_name().map(|n| n.to_os_string()) else {
        return Err(ApiError::bad_request(
            "is_a_directory",
            format!("{path} is a granted directory"),
        ));
    };
    let root = open_root(&loc, path)?;
    let parent = loc.rel.parent().unwrap_or(Path::new(""));
    let dir = openat2(
        root.as_raw_fd(),
        parent,
        libc::O_PATH | libc::O_DIRECTORY,
        0,
    )
    .map_err(|e| io_error(path, e))?;
    // An existing target must be a regular file (or a symlink, which is replaced).
    if let Ok(existing) = openat2(dir.as_raw_fd(), Path::new(&name), libc::O_PATH, 0) {
        let meta = File::from(existing)
            .metadata()
            .map_err(|e| io_error(path, e))?;
        if !meta.is_file() {
            return Err(ApiError::bad_request(
                "not_a_file",
                format!("{path} exists and is not a regular file"),
            ));
        }
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp_name = format!(".mxc-upload-{}-{nanos:08x}", std::process::id());
    let fd = openat2(
        dir.as_raw_fd(),
        Path::new(&tmp_name),
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
        0o644,
    )
    .map_err(|e| io_error(path, e))?;
    let to_c = |s: &[u8]| {
        CString::new(s).map_err(|_| ApiError::bad_request("bad_path", "path contains NUL"))
    };
    Ok(Upload {
        file: File::from(fd),
        tmp: to_c(tmp_name.as_bytes())?,
        name: to_c(name.as_encoded_bytes())?,
        dir,
        committed: false,
    })
}

/// One directory entry.
#[derive(Debug, serde::Serialize, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    /// "file", "dir", "symlink" or "other".
    pub kind: &'static str,
    pub size: u64,
}

/// List a directory; entries the policy denies are left out.
pub fn list(view: &FsView, path: &str) -> Result<Vec<DirEntry>, ApiError> {
    let loc = locate(view, path, false)?;
    let root = open_root(&loc, path)?;
    let dir = openat2(
        root.as_raw_fd(),
        &loc.rel,
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    )
    .map_err(|e| io_error(path, e))?;
    let listing = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
        .map_err(|e| io_error(path, e))?;
    let base = Path::new(path);
    let mut out = Vec::new();
    for entry in listing.flatten() {
        let name = entry.file_name();
        let full = base.join(&name);
        let hidden = view
            .entries
            .iter()
            .filter(|e| full.starts_with(&e.path))
            .max_by_key(|e| e.path.components().count())
            .is_none_or(|e| e.access == Access::Denied)
            || sandbox::view::SECRET_PATHS
                .iter()
                .any(|s| full.starts_with(Path::new(s)));
        if hidden {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        let ft = meta.file_type();
        out.push(DirEntry {
            name: name.to_string_lossy().into_owned(),
            kind: if ft.is_symlink() {
                "symlink"
            } else if ft.is_dir() {
                "dir"
            } else if ft.is_file() {
                "file"
            } else {
                "other"
            },
            size: meta.len(),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::ViewEntry;

    fn view(entries: &[(&str, Access, bool)]) -> FsView {
        FsView {
            entries: entries
                .iter()
                .map(|(p, a, d)| ViewEntry {
                    path: PathBuf::from(p),
                    access: *a,
                    exists: true,
                    is_dir: *d,
                    origins: vec![],
                })
                .collect(),
            warnings: vec![],
        }
    }

    #[test]
    fn the_longest_rule_decides() {
        let v = view(&[
            ("/data", Access::ReadWrite, true),
            ("/data/secret", Access::Denied, true),
            ("/data/ro", Access::ReadOnly, true),
        ]);

        let ok = locate(&v, "/data/a/b.txt", true).unwrap();
        assert_eq!(ok.root, PathBuf::from("/data"));
        assert_eq!(ok.rel, PathBuf::from("a/b.txt"));
        let denied = locate(&v, "/data/secret/x", false).unwrap_err();
        assert_eq!((denied.status.as_u16(), denied.code), (403, "path_denied"));
        assert!(
            denied.message.contains("rule: /data/secret"),
            "{}",
            denied.message
        );
        let ro = locate(&v, "/data/ro/x", true).unwrap_err();
        assert_eq!(ro.code, "read_only");
        assert!(locate(&v, "/data/ro/x", false).is_ok());
        assert_eq!(
            locate(&v, "/elsewhere", false).unwrap_err().code,
            "path_denied"
        );
    }

    #[test]
    fn relative_dotdot_and_secret_paths_are_refused() {
        let v = view(&[("/", Access::ReadWrite, true)]);

        assert_eq!(locate(&v, "data/x", false).unwrap_err().code, "bad_path");
        assert_eq!(
            locate(&v, "/data/../etc/x", false).unwrap_err().code,
            "bad_path"
        );
        assert_eq!(
            locate(&v, "/etc/shadow", false).unwrap_err().code,
            "path_denied"
        );
    }

    #[test]
    fn a_file_rule_opens_beneath_its_directory() {
        let v = view(&[("/data/f.txt", Access::ReadOnly, false)]);

        let loc = locate(&v, "/data/f.txt", false).unwrap();
        assert_eq!(
            (loc.root, loc.rel),
            (PathBuf::from("/data"), PathBuf::from("f.txt"))
        );
        assert_eq!(
            locate(&v, "/data/f.txt/x", false).unwrap_err().code,
            "bad_path"
        );
        assert_eq!(
            locate(&v, "/data/other", false).unwrap_err().code,
            "path_denied"
        );
    }

    #[test]
    fn symlinks_inside_a_grant_are_not_followed() {
        let dir = std::env::temp_dir().join(format!("mxc-files-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("secret")).unwrap();
        std::fs::write(dir.join("secret/key"), b"k").unwrap();
        std::fs::write(dir.join("ok.txt"), b"hello").unwrap();
        let _ = std::os::unix::fs::symlink("secret/key", dir.join("link"));
        let root = dir.to_str().unwrap().to_string();
        let v = view(&[
            (&root, Access::ReadWrite, true),
            (&format!("{root}/secret"), Access::Denied, true),
        ]);

        let (_, len) = open_read(&v, &format!("{root}/ok.txt")).unwrap();
        assert_eq!(len, 5);
        let via_link = open_read(&v, &format!("{root}/link")).unwrap_err();
        assert_eq!(
            (via_link.status.as_u16(), via_link.code),
            (403, "path_denied")
        );
        let names: Vec<String> = list(&v, &root)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["link", "ok.txt"]);
        // Writing over the link replaces the link, never the file it points to.
        let mut up = open_write(&v, &format!("{root}/link")).unwrap();
        std::io::Write::write_all(&mut up.file, b"new").unwrap();
        up.commit().unwrap();
        assert_eq!(std::fs::read(dir.join("secret/key")).unwrap(), b"k");
        assert_eq!(std::fs::read(dir.join("link")).unwrap(), b"new");
        // An upload dropped before its commit leaves the old file and no new one.
        let mut up = open_write(&v, &format!("{root}/ok.txt")).unwrap();
        std::io::Write::write_all(&mut up.file, b"partial").unwrap();
        drop(up);
        assert_eq!(std::fs::read(dir.join("ok.txt")).unwrap(), b"hello");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 3);
        assert!(open_write(&v, &format!("{root}/secret/new")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
